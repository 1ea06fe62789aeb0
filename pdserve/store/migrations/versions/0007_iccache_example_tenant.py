"""IC-Cache: the tenant whose request made an example (examples stay within their tenant)

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Examples cached before this revision came from requests of unknown tenants: they get the
    # tenant of a gateway without API keys (""), which only such a gateway, or one that shares
    # examples across tenants, shows to requests.
    with op.batch_alter_table("iccache_examples") as batch:
        batch.add_column(sa.Column("tenant", sa.String(128), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("iccache_examples") as batch:
        batch.drop_column("tenant")
