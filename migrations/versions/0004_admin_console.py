"""The admin console: an index per request-log filter (newest first, in one index range), and the request
log summed per minute and per hour as it is written (`request_rollup`), for the overview.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
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
    op.create_table(
        "request_rollup",
        sa.Column("span_s", sa.Integer(), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("route", sa.String(length=32), nullable=False),
        sa.Column("mechanism", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("fallbacks", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "span_s", "start", "route", "mechanism", "status_code", name=op.f("pk_request_rollup")
        ),
    )


def downgrade() -> None:
    op.drop_table("request_rollup")
    for name in INDEXES:
        op.drop_index(name, table_name="request_log")
