"""The request log: one row per request, written off the hot path."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.records import RequestBodies, RequestRecord
from icgate.gateway.store import tables
from icgate.gateway.store.db import sqlite_file
from icgate.gateway.store.write_behind import Retry, StorageEvents, WriteBehindQueue

# The request_log row's columns: every field but the bodies, which have their own table.
_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord) if f.name != "bodies")


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
    """The rows, their sums in the roll-up and the bodies kept (`request_log.store_bodies`), in one
    transaction: the three always agree."""
    rows = [_row(r) for r in batch]
    bodies = [
        {
            "request_id": r.request_id,
            "created_at": r.created_at,
            "prompt": r.bodies.prompt,
            "answer": r.bodies.answer,
        }
        for r in batch
        if r.bodies is not None
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(tables.RequestLog), rows)
        if bodies:
            conn.execute(sa.insert(tables.RequestBody), bodies)
        add_to_rollup(conn, batch)


def mechanism(record: RequestRecord) -> str:
    """What a request's answer came from, as the roll-up counts it (`tables.RequestRollup`)."""
    decisions = record.decisions or {}
    if record.route == "cache":
        hit = (decisions.get("cache") or {}).get("hit")
        return "semantic" if hit == "semantic" else "exact"
    return "examples" if decisions.get("examples") else "none"


ROLLUP_KEY = ("span_s", "start", "route", "mechanism", "status_code")
ROLLUP_SPANS = (60, 3600)
ROLLUP_SUMS = ("requests", "fallbacks", "prompt_tokens", "completion_tokens", "cost_usd")
ROLLUP_ROWS_PER_STATEMENT = 1000  # 9,000 parameters: PostgreSQL takes 65,535, SQLite 32,766


def add_to_rollup(conn: sa.Connection, batch: list[RequestRecord]) -> None:
    """Sum the batch per roll-up key, then add the sums to the stored ones (an upsert: replicas writing the
    same minute add up, never overwrite)."""
    sums: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in batch:
        minute = r.created_at.astimezone(UTC).replace(second=0, microsecond=0)
        for span, start in ((60, minute), (3600, minute.replace(minute=0))):
            key = (span, start, r.route or "none", mechanism(r), r.status_code)
            row = sums.setdefault(
                key, dict(zip(ROLLUP_KEY, key, strict=True)) | dict.fromkeys(ROLLUP_SUMS, 0)
            )
            row["requests"] += 1
            row["fallbacks"] += 1 if r.fallback_from else 0
            row["prompt_tokens"] += r.prompt_tokens
            row["completion_tokens"] += r.completion_tokens
            row["cost_usd"] += r.cost_usd if math.isfinite(r.cost_usd) else 0.0
    rows = list(sums.values())
    step = ROLLUP_ROWS_PER_STATEMENT  # within every database's cap on bound parameters
    for first in range(0, len(rows), step):
        conn.execute(_upsert(conn.dialect.name, rows[first : first + step]))


def _upsert(dialect: str, rows: list[dict[str, Any]]) -> sa.Executable:
    """`INSERT ... ON CONFLICT (key) DO UPDATE SET sum = sum + new`, in the dialect's own words."""
    table = tables.RequestRollup
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = postgresql.insert(table).values(rows)
        return pg.on_conflict_do_update(
            index_elements=list(ROLLUP_KEY),
            set_={c: getattr(table, c) + getattr(pg.excluded, c) for c in ROLLUP_SUMS},
        )
    from sqlalchemy.dialects import sqlite

    lite = sqlite.insert(table).values(rows)
    return lite.on_conflict_do_update(
        index_elements=list(ROLLUP_KEY),
        set_={c: getattr(table, c) + getattr(lite.excluded, c) for c in ROLLUP_SUMS},
    )


class RequestLogWriter(WriteBehindQueue[RequestRecord]):
    """The write-behind queue in front of the `request_log` table: a database that stops answering is
    waited out (`WriteBehindQueue`), so an acknowledged request keeps its row."""

    def __init__(
        self,
        engine: sa.Engine,
        config: RequestLogConfig,
        *,
        events: StorageEvents | None = None,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        close_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            lambda batch: insert_records(engine, batch),
            config,
            name="request log",
            what="request_log",
            events=events,
            retry=Retry(retry_backoff_s, max_backoff_s, max_attempts, close_timeout_s),
            sqlite_file=sqlite_file(engine),
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
class LogRow(RequestRecord):
    """A logged request as read back: the record, its row id (the pagination key) and its tenant's name."""

    id: int
    tenant: str | None


def _select() -> sa.Select[*tuple[Any, ...]]:  # a row of LogRow's fields, in order
    table = tables.RequestLog
    columns = [getattr(table, name) for name in _RECORD_FIELDS]
    query: sa.Select[*tuple[Any, ...]] = sa.select(*columns, table.id, tables.TenantRow.name).join(
        tables.TenantRow, tables.TenantRow.id == table.tenant_id, isouter=True
    )
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
    """One logged request, with its prompt and answer when they were kept (`LogRow.bodies`)."""
    table = tables.RequestBody
    with engine.connect() as conn:
        row = conn.execute(_select().where(tables.RequestLog.request_id == request_id)).first()
        if row is None:
            return None
        kept = conn.execute(
            sa.select(table.prompt, table.answer).where(table.request_id == request_id)
        ).first()
    return LogRow(*row, bodies=RequestBodies(kept.prompt, kept.answer) if kept is not None else None)


# --- totals over time (the console's overview) -----------------------------------------------------------


@dataclass(frozen=True)
class MechanismTotals:
    """Answered requests (status 200) of one mechanism: how many, their tokens, what they cost."""

    mechanism: str  # exact | semantic | examples | small (the small tier alone) | other
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


def overview(
    engine: sa.Engine,
    since: datetime,
    until: datetime,
    small_tier: str,
    buckets: int = 24,
    sample: int = 5000,
) -> Overview:
    """Totals of the requests that arrived in [since, until) from the roll-up: by mechanism, by route over
    time, by status; latencies of those among the log's newest `sample` rows. Up to a day, whole minutes;
    longer, whole hours (a month is 720 hours: the cost stays flat however long the log)."""
    rollup, log = tables.RequestRollup, tables.RequestLog
    span = 60 if until - since <= timedelta(days=1) else 3600
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                rollup.start,
                rollup.route,
                rollup.mechanism,
                rollup.status_code,
                rollup.requests,
                rollup.fallbacks,
                rollup.prompt_tokens,
                rollup.completion_tokens,
                rollup.cost_usd,
            ).where(rollup.span_s == span, rollup.start >= since, rollup.start < until)
        ).all()
        # The newest rows by primary key, then the range: a range filter in SQL would let the planner take
        # the arrival-time index and sort the whole range to find the newest.
        newest = [
            (latency, overhead)
            for latency, overhead, arrived in conn.execute(
                sa.select(log.latency_ms, log.overhead_ms, log.created_at)
                .order_by(log.id.desc())
                .limit(sample)
            )
            if since <= arrived < until
        ]
    width = (until - since) / buckets
    series = [Bucket(since + width * i, {}) for i in range(buckets)]
    totals: dict[str, list[float]] = {}
    statuses: dict[int, int] = {}
    fallbacks = 0
    for start, route, how, status, n, fell, prompt, completion, cost in rows:
        index = max(0, min(buckets - 1, int((start - since) / width)))
        shown = route if status == 200 else "error"
        series[index].routes[shown] = series[index].routes.get(shown, 0) + n
        statuses[status] = statuses.get(status, 0) + n
        fallbacks += fell
        if status == 200:
            name = how if how != "none" else ("small" if route == small_tier else "other")
            sums = totals.setdefault(name, [0, 0, 0, 0.0])
            for i, value in enumerate((n, prompt, completion, cost)):
                sums[i] += value
    mechanisms = [MechanismTotals(m, int(t[0]), int(t[1]), int(t[2]), float(t[3])) for m, t in totals.items()]
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


# --- routed requests the learned router scored (the console's router knob) --------------------------------


@dataclass(frozen=True)
class ScoredRoute:
    """A logged request with a router score: what replaying its decision under another knob needs."""

    id: int
    request_id: str
    created_at: datetime
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    decision: dict[str, Any]  # its decisions["route"]: tier, score, reasons, prompt_tokens_est, ...


def routed_query(tier: str, limit: int, before: int | None) -> sa.Select[Any]:
    """The newest `limit` rows that went to `tier` (below row `before`): one range of
    `ix_request_log_route_id`, read backwards."""
    table = tables.RequestLog
    query = (
        sa.select(
            table.id,
            table.request_id,
            table.created_at,
            table.status_code,
            table.prompt_tokens,
            table.completion_tokens,
            table.cost_usd,
            table.decisions,
        )
        .where(table.route == tier)
        .order_by(table.id.desc())
        .limit(limit)
    )
    return query.where(table.id < before) if before is not None else query


def scored_routes(
    engine: sa.Engine, tiers: list[str], limit: int, scan_limit: int | None = None
) -> list[ScoredRoute]:
    """The newest `limit` requests that went to one of `tiers` and carry a router score, newest first.

    Each tier is one range of `ix_request_log_route_id`, read newest first `limit` rows at a time and
    merged, so the cost follows `limit`, not the log. Rows without a score (a rule's decision, a backend
    named by the caller) are skipped; at most `scan_limit` rows (default 5 x `limit`) are read, so a log of
    mostly unscored rows stays cheap (and gives fewer rows)."""
    budget = scan_limit if scan_limit is not None else 5 * limit
    found: list[ScoredRoute] = []
    before: int | None = None
    scanned = 0
    with engine.connect() as conn:
        while len(found) < limit and scanned < budget and tiers:
            page: list[Any] = []
            for tier in dict.fromkeys(tiers):
                page.extend(conn.execute(routed_query(tier, limit, before)))
            if not page:
                break
            # The newest `limit` of the merged ranges: every row newer than the last of them was read.
            page = sorted(page, key=lambda r: -int(r.id))[:limit]
            scanned += len(page)
            before = int(page[-1].id)
            for row in page:
                decision = (row.decisions or {}).get("route") or {}
                if isinstance(decision.get("score"), int | float) and len(found) < limit:
                    found.append(
                        ScoredRoute(
                            int(row.id),
                            row.request_id,
                            row.created_at,
                            row.status_code,
                            row.prompt_tokens,
                            row.completion_tokens,
                            row.cost_usd,
                            decision,
                        )
                    )
            if len(page) < limit:
                break
    return found
