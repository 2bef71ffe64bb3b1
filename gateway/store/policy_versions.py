"""Every policy applied, kept: the newest row is the policy in force; older rows are the history a
rollback goes back to. Blocking calls: the gateway runs them in a thread."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from icgate.gateway.store import tables
from icgate.gateway.store.tables import utcnow


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PolicyVersion:
    id: int
    created_at: datetime
    author: str
    source: str  # file | console | router-knob | tenant-limits | rollback
    note: str
    text: str
    sha256: str
    base_sha256: str
    live: list[str]  # changed paths applied at once
    restart: list[str]  # changed paths that waited for a restart


def _version(row: tables.PolicyVersion) -> PolicyVersion:
    return PolicyVersion(
        row.id,
        row.created_at,
        row.author,
        row.source,
        row.note,
        row.text,
        row.sha256,
        row.base_sha256,
        list(row.changes.get("live", [])),
        list(row.changes.get("restart", [])),
    )


def record(
    engine: sa.Engine,
    text: str,
    author: str,
    source: str,
    note: str,
    base_sha256: str,
    live: list[str],
    restart: list[str],
) -> PolicyVersion:
    row = tables.PolicyVersion(
        created_at=utcnow(),
        author=author,
        source=source,
        note=note,
        text=text,
        sha256=sha256(text),
        base_sha256=base_sha256,
        changes={"live": live, "restart": restart},
    )
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add(row)
    return _version(row)


def newest(engine: sa.Engine) -> PolicyVersion | None:
    table = tables.PolicyVersion
    with Session(engine) as session:
        row = session.scalars(sa.select(table).order_by(table.id.desc()).limit(1)).first()
        return None if row is None else _version(row)


def newest_id(engine: sa.Engine) -> int | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(tables.PolicyVersion.id))).scalar_one_or_none()


def get(engine: sa.Engine, version_id: int) -> PolicyVersion | None:
    with Session(engine) as session:
        row = session.get(tables.PolicyVersion, version_id)
        return None if row is None else _version(row)


def history(engine: sa.Engine, limit: int, source: str | None = None) -> list[PolicyVersion]:
    """The newest `limit` versions, newest first (of one source, if given)."""
    table = tables.PolicyVersion
    query = sa.select(table).order_by(table.id.desc()).limit(limit)
    if source is not None:
        query = query.where(table.source == source)
    with Session(engine) as session:
        return [_version(row) for row in session.scalars(query)]
