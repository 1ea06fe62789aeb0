"""per-key rate limits: requests and tokens per minute (0: no limit)

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("requests_per_minute", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("tokens_per_minute", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tokens_per_minute")
        batch.drop_column("requests_per_minute")
