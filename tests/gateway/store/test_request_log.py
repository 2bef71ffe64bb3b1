from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.records import RequestBodies, RequestRecord
from icgate.gateway.store import tables
from icgate.gateway.store.request_log import RequestLogWriter


def record(i: int, **overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": f"req-{i:06d}",
        "created_at": datetime.now(UTC),
        "tenant_id": 1,
        "api_key_id": 2,
        "endpoint": "chat",
        "model_requested": "auto",
        "route": "small",
        "backend": "small-1",
        "fallback_from": None,
        "stream": False,
        "status_code": 200,
        "error_type": None,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "cost_usd": 0.001,
        "latency_ms": 12.5,
        "overhead_ms": 1.5,
        "queue_ms": 0.0,
        "decisions": {"router": {"score": 0.25, "tier": "small"}},
    }
    fields.update(overrides)
    return RequestRecord(**fields)


def count_rows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tables.RequestLog)).scalar_one())


@contextmanager
def outage(engine: sa.Engine) -> Iterator[dict[str, bool]]:
    """Make every request_log insert fail while state["down"] is true."""
    state = {"down": True}

    def fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if state["down"] and "request_log" in statement:
            raise sa.exc.OperationalError(statement, None, ConnectionError("database is down"))

    sa.event.listen(engine, "before_cursor_execute", fail)
    try:
        yield state
    finally:
        sa.event.remove(engine, "before_cursor_execute", fail)


async def test_all_records_land_after_close(engine: sa.Engine) -> None:
    writer = RequestLogWriter(engine, RequestLogConfig(queue_size=1000, batch_size=50, flush_interval_s=0.05))
    await writer.start()
    for i in range(500):
        assert writer.submit(record(i))
        if i % 100 == 0:
            await asyncio.sleep(0)
    await writer.close()
    assert (writer.written, writer.dropped, writer.pending) == (500, 0, 0)
    assert count_rows(engine) == 500
    assert writer.submit(record(1000)) is False  # closed: refused, counted
    assert writer.dropped == 1


async def test_rows_round_trip(engine: sa.Engine) -> None:
    writer = RequestLogWriter(engine, RequestLogConfig(flush_interval_s=0.01))
    await writer.start()
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    decisions = {"cache": {"similarity": math.nan, "hit": False}, "ids": (1, 2)}
    writer.submit(record(1, created_at=created, decisions=decisions, fallback_from="small-2", stream=True))
    await writer.flush()
    with engine.connect() as conn:
        row = conn.execute(sa.select(tables.RequestLog)).one()
    await writer.close()
    assert row.request_id == "req-000001" and row.created_at == created
    assert row.decisions == {"cache": {"similarity": None, "hit": False}, "ids": [1, 2]}
    assert row.fallback_from == "small-2" and row.stream is True and row.backend == "small-1"


async def test_full_queue_drops_and_counts_without_blocking(engine: sa.Engine) -> None:
    writer = RequestLogWriter(engine, RequestLogConfig(queue_size=10, batch_size=5, flush_interval_s=0.01))
    # Not started: nothing drains the queue, so it fills up.
    started = time.perf_counter()
    accepted = [writer.submit(record(i)) for i in range(25)]
    assert time.perf_counter() - started < 0.5
    assert accepted == [True] * 10 + [False] * 15
    assert writer.dropped == 15 and writer.pending == 10
    await writer.close()  # drains what was accepted
    assert writer.written == 10 and count_rows(engine) == 10


async def test_short_outage_is_retried_without_loss(engine: sa.Engine) -> None:
    writer = RequestLogWriter(
        engine, RequestLogConfig(batch_size=10, flush_interval_s=0.01), max_attempts=5, retry_backoff_s=0.05
    )
    await writer.start()
    with outage(engine) as state:
        for i in range(30):
            writer.submit(record(i))
        await asyncio.sleep(0.1)
        assert writer.written == 0 and writer.pending == 30
        state["down"] = False
        await writer.flush()
    await writer.close()
    assert (writer.written, writer.dropped) == (30, 0)
    assert count_rows(engine) == 30


async def test_long_outage_is_waited_out_without_loss(engine: sa.Engine) -> None:
    writer = RequestLogWriter(
        engine,
        RequestLogConfig(batch_size=10, flush_interval_s=0.01),
        max_attempts=2,
        retry_backoff_s=0.01,
        max_backoff_s=0.02,
    )
    await writer.start()
    with outage(engine) as state:
        for i in range(20):
            writer.submit(record(i))
        await asyncio.sleep(0.3)  # a dozen attempts at 20 ms apart: well past max_attempts
        assert writer.failed == 0 and writer.dropped == 0 and writer.pending == 20
        state["down"] = False
        for i in range(20, 40):
            writer.submit(record(i))
        await writer.flush()
    await writer.close()
    assert (writer.written, writer.dropped) == (40, 0)
    assert count_rows(engine) == 40


async def test_bad_row_does_not_sink_its_batch(engine: sa.Engine) -> None:
    writer = RequestLogWriter(engine, RequestLogConfig(batch_size=10, flush_interval_s=0.05))
    await writer.start()
    writer.submit(record(1))
    await writer.flush()
    for i in range(1, 6):  # req-000001 is a duplicate: the other four must still land
        writer.submit(record(i))
    await writer.close()
    assert writer.written == 5 and writer.failed == 1
    assert count_rows(engine) == 5


def test_the_console_reads_pages_and_filters_on_both_databases(engine: sa.Engine) -> None:
    from icgate.gateway.store.request_log import LogFilter, get_request, insert_records, list_requests

    with engine.begin() as conn:
        conn.execute(sa.insert(tables.TenantRow).values(id=1, name="acme", created_at=tables.utcnow()))
    batch = [record(i) for i in range(30)]
    batch += [record(100, request_id="req-abc1230", route="large", backend="large-1", status_code=502,
                     error_type="backend_error"),
              record(101, request_id="req-abc1299", route="cache", backend=None),
              record(102, request_id="req-abd0000", tenant_id=None)]  # fmt: skip
    insert_records(engine, batch)

    def ids(where: LogFilter, **kw: Any) -> list[str]:
        return [r.request_id for r in list_requests(engine, where, **kw)]

    newest = ids(LogFilter(), limit=5)
    assert newest == ["req-abd0000", "req-abc1299", "req-abc1230", "req-000029", "req-000028"]
    last = list_requests(engine, LogFilter(), limit=5)[-1]
    assert ids(LogFilter(), limit=2, before_id=last.id) == ["req-000027", "req-000026"]
    assert ids(LogFilter(text="req-abc12")) == ["req-abc1299", "req-abc1230"]  # a prefix, not req-abd
    assert ids(LogFilter(text="req-abc1230")) == ["req-abc1230"]
    assert ids(LogFilter(text="backend_err")) == ["req-abc1230"]
    assert ids(LogFilter(route="large", status=502)) == ["req-abc1230"]
    assert ids(LogFilter(tenant="acme"), limit=100) == [r.request_id for r in reversed(batch[:32])]
    assert ids(LogFilter(text="50%_")) == []  # LIKE's own characters are literal
    row = get_request(engine, "req-abd0000")
    assert row is not None and row.tenant is None and row.decisions == batch[-1].decisions
    assert get_request(engine, "req-nope") is None


def test_the_rollup_adds_up_to_the_log_across_batches_on_both_databases(engine: sa.Engine) -> None:
    from datetime import timedelta

    from icgate.gateway.store.request_log import insert_records, overview

    now = datetime.now(UTC).replace(second=30, microsecond=0)
    hit = {"cache": {"hit": "semantic"}}
    batch = [
        record(1, created_at=now, route="cache", backend=None, cost_usd=0.0, decisions=hit),
        record(2, created_at=now, route="small", decisions={"examples": [7]}),
        record(3, created_at=now, route="small", decisions={"examples": []}),
        record(4, created_at=now - timedelta(minutes=5), route="large", fallback_from="small"),
        record(5, created_at=now, route=None, backend=None, status_code=429, error_type="rate_limit"),
    ]
    insert_records(engine, batch[:3])
    insert_records(
        engine, [*batch[3:], record(6, created_at=now, route="small", decisions={"examples": [1]})]
    )
    data = overview(engine, now - timedelta(hours=1), now + timedelta(minutes=1), "small", buckets=12)
    totals = {m.mechanism: (m.requests, m.prompt_tokens, m.completion_tokens) for m in data.mechanisms}
    assert totals == {
        "semantic": (1, 10, 20),
        "examples": (2, 20, 40),
        "small": (1, 10, 20),
        "other": (1, 10, 20),
    }
    assert data.statuses == {200: 5, 429: 1} and data.fallbacks == 1
    assert sum(sum(b.routes.values()) for b in data.buckets) == 6
    assert sum(b.routes.get("error", 0) for b in data.buckets) == 1
    with engine.connect() as conn:
        answered = tables.RequestLog.status_code == 200
        cost = conn.execute(sa.select(sa.func.sum(tables.RequestLog.cost_usd)).where(answered)).scalar_one()
    assert math.isclose(sum(m.cost_usd for m in data.mechanisms), cost)
    assert len(data.latency_ms) == 6
    # a week is read from the hourly sums: the same totals
    week = overview(engine, now - timedelta(days=7), now + timedelta(hours=1), "small", buckets=7)
    assert {m.mechanism: m.requests for m in week.mechanisms} == {m: t[0] for m, t in totals.items()}
    assert week.statuses == data.statuses and week.fallbacks == 1


def count_bodies(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tables.RequestBody)).scalar_one())


async def test_bodies_are_written_with_their_rows_in_one_transaction(engine: sa.Engine) -> None:
    from icgate.gateway.store.request_log import get_request

    with engine.begin() as conn:  # a body already there for req-000001: its batch's insert fails
        conn.execute(
            sa.insert(tables.RequestBody).values(
                request_id="req-000001", created_at=datetime.now(UTC), prompt="old", answer="old"
            )
        )
    writer = RequestLogWriter(engine, RequestLogConfig(batch_size=10, flush_interval_s=0.05))
    await writer.start()
    for i in (1, 2):
        writer.submit(record(i, bodies=RequestBodies(prompt=f"question {i}", answer=f"answer {i}")))
    writer.submit(record(3))  # the policy kept no body for this one
    await writer.close()
    # req-000001 is dropped whole, its row with its body; the others land, each with what it had
    assert (writer.written, writer.failed) == (2, 1)
    assert get_request(engine, "req-000001") is None
    kept = get_request(engine, "req-000002")
    assert kept is not None and kept.bodies == RequestBodies("question 2", "answer 2")
    bare = get_request(engine, "req-000003")
    assert bare is not None and bare.bodies is None
    assert (count_rows(engine), count_bodies(engine)) == (2, 2)  # req-000001's old body, req-000002's
