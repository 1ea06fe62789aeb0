"""operator state that must survive a router restart: pinned ratios and drained workers

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ratio_pins",
        sa.Column("scenario", sa.String(128), primary_key=True),
        sa.Column("num_prefill", sa.Integer, nullable=False),
        sa.Column("num_decode", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "worker_drains",
        sa.Column("worker_id", sa.String(256), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("worker_drains")
    op.drop_table("ratio_pins")
