"""IC-Cache: learned routing state that survives restarts

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "iccache_policy_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("updated_unix_s", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("iccache_policy_state")
