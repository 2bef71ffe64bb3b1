"""Indexes for the admin console's request log: each filter, newest first, in one index range.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_request_log_tenant_id_id": ["tenant_id", "id"],
    "ix_request_log_route_id": ["route", "id"],
    "ix_request_log_backend_id": ["backend", "id"],
    "ix_request_log_status_code_id": ["status_code", "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "request_log", columns, unique=False)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="request_log")
