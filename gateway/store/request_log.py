"""The request log: one row per request, written off the hot path."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.records import RequestRecord
from icgate.gateway.store import tables
from icgate.gateway.store.write_behind import WriteBehindQueue

_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


def _jsonable(value: Any) -> Any:
    """A copy of `value` that every JSON column accepts (no NaN, no numpy, no objects)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        try:
            return _jsonable(tolist())
        except Exception:
            pass
    return str(value)


def _row(record: RequestRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in _RECORD_FIELDS}
    row["decisions"] = _jsonable(record.decisions)
    return row


def insert_records(engine: sa.Engine, batch: list[RequestRecord]) -> None:
    rows = [_row(r) for r in batch]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.RequestLog), rows)


class RequestLogWriter(WriteBehindQueue[RequestRecord]):
    """The write-behind queue in front of the `request_log` table."""

    def __init__(
        self,
        engine: sa.Engine,
        config: RequestLogConfig,
        *,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        super().__init__(
            lambda batch: insert_records(engine, batch),
            config,
            name="request log",
            max_attempts=max_attempts,
            retry_backoff_s=retry_backoff_s,
        )


# --- reading it back (the admin console) ------------------------------------------------------------------


REQUEST_ID_PREFIX = "req-"  # what every request id starts with (gateway.records.RequestContext)


@dataclass(frozen=True)
class LogFilter:
    """What the console's request log may be narrowed to; None matches everything."""

    tenant: str | None = None
    route: str | None = None
    backend: str | None = None
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None  # a request id (or its start), a model name, or part of an error type


@dataclass(frozen=True)
class LogRow:
    id: int
    request_id: str
    created_at: datetime
    tenant: str | None
    endpoint: str
    model_requested: str
    route: str | None
    backend: str | None
    fallback_from: str | None
    stream: bool
    status_code: int
    error_type: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    overhead_ms: float
    queue_ms: float
    decisions: dict[str, Any]


def _select() -> sa.Select[*tuple[Any, ...]]:  # a row of LogRow's fields, in order
    table = tables.RequestLog
    query: sa.Select[*tuple[Any, ...]] = sa.select(
        table.id,
        table.request_id,
        table.created_at,
        tables.TenantRow.name,
        table.endpoint,
        table.model_requested,
        table.route,
        table.backend,
        table.fallback_from,
        table.stream,
        table.status_code,
        table.error_type,
        table.prompt_tokens,
        table.completion_tokens,
        table.cost_usd,
        table.latency_ms,
        table.overhead_ms,
        table.queue_ms,
        table.decisions,
    ).join(tables.TenantRow, tables.TenantRow.id == table.tenant_id, isouter=True)
    return query


def list_requests(
    engine: sa.Engine, where: LogFilter, limit: int = 50, before_id: int | None = None
) -> list[LogRow]:
    """Newest first, one page: keyset pagination on the primary key (`before_id` is the last row's id of the
    page before), so page 1,000 costs what page 1 costs."""
    table = tables.RequestLog
    query = _select().order_by(table.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(table.id < before_id)
    if where.tenant is not None:
        query = query.where(tables.TenantRow.name == where.tenant)
    for column, value in (
        (table.route, where.route),
        (table.backend, where.backend),
        (table.status_code, where.status),
    ):
        if value is not None:
            query = query.where(column == value)
    if where.since is not None:
        query = query.where(table.created_at >= where.since)
    if where.until is not None:
        query = query.where(table.created_at < where.until)
    if where.text and where.text.strip():
        text = where.text.strip()
        if text.startswith(REQUEST_ID_PREFIX):
            # A request id or its start: a range of the unique index (a LIKE would read the whole log).
            upper = text[:-1] + chr(ord(text[-1]) + 1)  # the first string past every one that starts so
            query = query.where(table.request_id >= text, table.request_id < upper)
        else:
            query = query.where(
                sa.or_(table.model_requested == text, table.error_type.contains(text, autoescape=True))
            )
    with engine.connect() as conn:
        return [LogRow(*row) for row in conn.execute(query)]


def get_request(engine: sa.Engine, request_id: str) -> LogRow | None:
    with engine.connect() as conn:
        row = conn.execute(_select().where(tables.RequestLog.request_id == request_id)).first()
    return LogRow(*row) if row is not None else None


# --- totals over time (the console's overview) -----------------------------------------------------------


@dataclass(frozen=True)
class MechanismTotals:
    """Answered requests (status 200) of one mechanism: how many, their tokens, what they cost."""

    mechanism: str  # exact | semantic | examples | small | other (see `mechanism_of`)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


@dataclass(frozen=True)
class Bucket:
    start: datetime
    routes: dict[str, int]  # route (cache, a tier, or "error") -> requests


@dataclass(frozen=True)
class Overview:
    since: datetime
    until: datetime
    mechanisms: list[MechanismTotals]
    buckets: list[Bucket]
    statuses: dict[int, int]
    fallbacks: int
    latency_ms: list[float]  # of the newest `sample` requests in the range, for percentiles
    overhead_ms: list[float]


def mechanism_of(table: type[tables.RequestLog], small_tier: str) -> sa.ColumnElement[str]:
    """What answered, by what it saved: an exact or a semantic hit, the small tier with examples, the small
    tier alone (the router's choice), or anything else."""
    hit = table.decisions["cache"]["hit"].as_string()
    first_example = table.decisions["examples"][0].as_integer()
    return sa.case(
        (sa.and_(table.route == "cache", hit == "exact"), "exact"),
        (table.route == "cache", "semantic"),
        (sa.and_(table.route == small_tier, first_example.is_not(None)), "examples"),
        (table.route == small_tier, "small"),
        else_="other",
    )


def overview(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    small_tier: str,
    buckets: int = 24,
    sample: int = 5000,
) -> Overview:
    """Totals of the requests that arrived in [since, until): by mechanism, by route over time, by status."""
    table = tables.RequestLog
    in_range = sa.and_(table.created_at >= since, table.created_at < until)
    mechanism = mechanism_of(table, small_tier).label("mechanism")
    width = (until - since) / buckets
    with engine.connect() as conn:
        mechanisms = [
            MechanismTotals(str(m), int(n), int(p or 0), int(c or 0), float(cost or 0.0))
            for m, n, p, c, cost in conn.execute(
                sa.select(
                    mechanism,
                    sa.func.count(),
                    sa.func.sum(table.prompt_tokens),
                    sa.func.sum(table.completion_tokens),
                    sa.func.sum(table.cost_usd),
                )
                .where(in_range, table.status_code == 200)
                .group_by(mechanism)
            )
        ]
        series = []
        route = sa.case((table.status_code != 200, "error"), else_=sa.func.coalesce(table.route, "none"))
        for i in range(buckets):
            start = since + width * i
            counts = conn.execute(
                sa.select(route, sa.func.count())
                .where(table.created_at >= start, table.created_at < start + width)
                .group_by(route)
            )
            series.append(Bucket(start, {str(r): int(n) for r, n in counts}))
        statuses = {
            int(s): int(n)
            for s, n in conn.execute(
                sa.select(table.status_code, sa.func.count()).where(in_range).group_by(table.status_code)
            )
        }
        fallbacks = int(
            conn.execute(
                sa.select(sa.func.count()).where(in_range, table.fallback_from.is_not(None))
            ).scalar_one()
        )
        newest = conn.execute(
            sa.select(table.latency_ms, table.overhead_ms)
            .where(in_range)
            .order_by(table.id.desc())
            .limit(sample)
        ).all()
    return Overview(
        since,
        until,
        mechanisms,
        series,
        statuses,
        fallbacks,
        [float(r[0]) for r in newest],
        [float(r[1]) for r in newest],
    )
