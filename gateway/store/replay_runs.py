"""Cache replay runs started from the console: their budget, progress and result, readable by every
replica's console. Blocking calls: the gateway runs them in a thread."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.gateway.store import tables
from icgate.gateway.store.tables import utcnow


@dataclass(frozen=True)
class ReplayRun:
    id: int
    created_at: datetime
    finished_at: datetime | None
    author: str
    status: str  # running | done | failed | stopped
    budget_usd: float
    tenant: str | None
    summary: dict[str, Any]
    error: str | None


def _run(row: tables.ReplayRun) -> ReplayRun:
    return ReplayRun(
        row.id,
        row.created_at,
        row.finished_at,
        row.author,
        row.status,
        row.budget_usd,
        row.tenant,
        dict(row.summary),
        row.error,
    )


def create(engine: sa.Engine, author: str, budget_usd: float, tenant: str | None) -> int:
    row = tables.ReplayRun(
        created_at=utcnow(), author=author, status="running", budget_usd=budget_usd, tenant=tenant, summary={}
    )
    with Session(engine) as session, session.begin():
        session.add(row)
        session.flush()
        return int(row.id)


def update(
    engine: sa.Engine, run_id: int, summary: dict[str, Any], status: str = "running", error: str | None = None
) -> None:
    """The run's progress so far; a status other than running ends it."""
    values: dict[str, Any] = {"summary": summary, "status": status, "error": error}
    if status != "running":
        values["finished_at"] = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.update(tables.ReplayRun).where(tables.ReplayRun.id == run_id).values(**values))


def recent(engine: sa.Engine, limit: int = 10) -> list[ReplayRun]:
    table = tables.ReplayRun
    with Session(engine) as session:
        return [_run(r) for r in session.scalars(sa.select(table).order_by(table.id.desc()).limit(limit))]


def get(engine: sa.Engine, run_id: int) -> ReplayRun | None:
    with Session(engine) as session:
        row = session.get(tables.ReplayRun, run_id)
        return None if row is None else _run(row)
