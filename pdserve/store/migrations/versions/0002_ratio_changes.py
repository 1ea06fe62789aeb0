"""ratio change history of the P/D ratio controller

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ratio_changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scenario", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("old_prefill", sa.Integer, nullable=False),
        sa.Column("old_decode", sa.Integer, nullable=False),
        sa.Column("new_prefill", sa.Integer, nullable=False),
        sa.Column("new_decode", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
    )
    op.create_index("ix_ratio_changes_scenario", "ratio_changes", ["scenario"])


def downgrade() -> None:
    op.drop_table("ratio_changes")
