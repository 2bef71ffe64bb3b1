"""The console's own state: admin keys (stored hashed), every applied policy version, cache replay runs
started from the console, and request bodies (written only when the policy asks for them). And when a
cache entry's feedback last changed, so every replica takes it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column and an index: no table rewrite on either database.
    op.add_column("cache_entries", sa.Column("feedback_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f("ix_cache_entries_feedback_at"), "cache_entries", ["feedback_at"], unique=False)
    op.create_table(
        "admin_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_keys")),
    )
    op.create_index(op.f("ix_admin_keys_key_hash"), "admin_keys", ["key_hash"], unique=True)
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
    )
    op.create_table(
        "replay_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("author", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("budget_usd", sa.Double(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_runs")),
    )
    op.create_table(
        "request_bodies",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_request_bodies")),
    )
    op.create_index(op.f("ix_request_bodies_created_at"), "request_bodies", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_cache_entries_feedback_at"), table_name="cache_entries")
    with op.batch_alter_table("cache_entries") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("feedback_at")
    op.drop_index(op.f("ix_request_bodies_created_at"), table_name="request_bodies")
    op.drop_table("request_bodies")
    op.drop_table("replay_runs")
    op.drop_table("policy_versions")
    op.drop_index(op.f("ix_admin_keys_key_hash"), table_name="admin_keys")
    op.drop_table("admin_keys")
