"""IC-Cache: cached examples and routed answers awaiting feedback

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "iccache_examples",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_text", sa.Text, nullable=False),
        sa.Column("answer_text", sa.Text, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("created_unix_s", sa.Float, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("value_at_unix_s", sa.Float, nullable=False),
        sa.Column("num_uses", sa.Integer, nullable=False),
        sa.Column("num_successes", sa.Integer, nullable=False),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("num_ratings", sa.Integer, nullable=False),
        sa.Column("num_replays", sa.Integer, nullable=False),
    )
    op.create_table(
        "iccache_answers",
        sa.Column("response_id", sa.String(128), primary_key=True),
        sa.Column("arm", sa.String(16), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("chosen", sa.JSON, nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("request_text", sa.Text, nullable=False),
        sa.Column("answer_text", sa.Text, nullable=False),
        sa.Column("example_id", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("quality", sa.Float, nullable=True),
    )
    op.create_index("ix_iccache_answers_created_at", "iccache_answers", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_iccache_answers_created_at", "iccache_answers")
    op.drop_table("iccache_answers")
    op.drop_table("iccache_examples")
