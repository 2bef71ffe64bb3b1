"""Cache entries: request/response pairs with their vectors.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=160), nullable=False),
        sa.Column("exact_key", sa.String(length=64), nullable=False),
        sa.Column("context_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("embed_text", sa.Text(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("response_text", sa.Text(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("backend", sa.String(length=128), nullable=False),
        sa.Column("tier", sa.String(length=32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("utility", sa.Float(), nullable=False),
        sa.Column("feedback_sum", sa.Float(), nullable=False),
        sa.Column("feedback_count", sa.Integer(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("helped", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_entries")),
    )
    op.create_index(op.f("ix_cache_entries_namespace"), "cache_entries", ["namespace"], unique=False)
    op.create_index(op.f("ix_cache_entries_deleted_at"), "cache_entries", ["deleted_at"], unique=False)
    op.create_index(
        "ix_cache_entries_namespace_exact_key", "cache_entries", ["namespace", "exact_key"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_cache_entries_namespace_exact_key", table_name="cache_entries")
    op.drop_index(op.f("ix_cache_entries_deleted_at"), table_name="cache_entries")
    op.drop_index(op.f("ix_cache_entries_namespace"), table_name="cache_entries")
    op.drop_table("cache_entries")
