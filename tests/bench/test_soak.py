"""The soak of bench/soak.py, short: a real `icgate serve` under the same mixed load leaves nothing behind.

The 30-minute run (bench/results/soak.md) judges slopes; a test this short cannot, so it checks what a
leak shows at once, against counts rather than times:

- Idle before vs idle after (the same pause without load, before and after the soak): open descriptors
  within 8 of before (the gateway's idle keep-alive connections to the stand-ins vary by a few with the
  load's last moments; a descriptor leaked per request, stream drop or error would be dozens), asyncio
  tasks within 3 (background loops are constant; a task leaked per hung-up stream would be dozens),
  threads within 4 (worker pools grow on demand up to their bound), nothing in flight, no database
  connection checked out.
- During the soak: database connections checked out never above the pool's limit (SQLAlchemy's 5 + 10
  overflow), and nothing dropped from the request log.
- RSS from the first sample after the settle time to the highest later one grows by under 25 MB. The
  cache is full from the prefill on (capped at the prefill's size), so stored answers do not grow it;
  about 180 requests follow the settle time, so this catches only a leak of ~150 KB per request (a
  request's whole context with its answer, spans and buffers); smaller leaks are the 30-minute run's to
  find, from its slope (bench/results/soak.md).
- Every outcome is one the request asked for: answers, cache hits, hung-up streams, broken streams as an
  OpenAI error event, the 4xx of malformed requests and the injected 503s as OpenAI error objects; no
  5xx that was not injected, no client-side failure.

It runs 24 s of soak at 10 req/s (half the default rate, so other tests on the machine do not starve it),
not 60: every check above but the RSS one compares counts, which a longer run does not sharpen, and the
RSS one cannot judge slow growth at any length a test affords. The faults are injected at higher rates
than in the 30-minute run (10% of the small stand-in's calls fail, 20% of its streams break) so that each
happens several times. With the gateway's start-up (about 15 s on an idle machine), the prefill, the
warm-up and the idle pauses, the test takes about 65 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from bench.soak import (
    DB_POOL_LIMIT,
    PASSED_THROUGH,
    QQP,
    Config,
    Result,
    from_json,
    parse_gauges,
    plot,
    report,
    run_soak,
    to_json,
    verdicts,
)
from icgate.gateway.store.db import make_engine
from icgate.gateway.telemetry import RuntimeCollector, running_tasks

SHORT = Config(
    duration_s=24.0,
    rate=10.0,
    sample_s=3.0,
    warmup_s=4.0,
    settle_s=6.0,
    idle_s=5.5,  # longer than the 5 s keep-alive timeouts: idle connections are closed by then
    prefill=100,
    cache_entries=100,
    backend_error_rate=0.10,
    stream_break_rate=0.20,
)
RSS_GROWTH_MB = 25.0
FDS_SLACK, TASKS_SLACK, THREADS_SLACK = 8, 3, 4


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Result:
    if not QQP.is_file():
        pytest.skip(f"data not found: {QQP}")
    return asyncio.run(run_soak(SHORT, tmp_path_factory.mktemp("soak")))


def test_every_outcome_is_one_the_request_asked_for(soak: Result) -> None:
    assert soak.unexpected == 0, (soak.outcomes, soak.unexpected_samples)
    assert soak.skipped == 0
    kinds = {key.split("/", 1)[1] for key in soak.outcomes}
    # Each path really ran: hits, hung-up clients, both kinds of error object.
    assert {"ok", "exact", "cut", "4xx", "5xx-injected"} <= kinds, soak.outcomes
    # The stand-in's 500s were retried on the other backend (any that reached the client, its circuit
    # being open, came as OpenAI errors); its broken streams ended in an error event.
    assert soak.injected["500"] > 0 and soak.fallbacks > 0, (soak.injected, soak.fallbacks)
    assert count(soak, PASSED_THROUGH) <= soak.injected["500"] + count(soak, "5xx-injected")
    assert 0 < count(soak, "stream-broken") <= soak.injected["stream-break"], soak.injected
    # Stopped cleanly by SIGTERM (uvicorn re-raises the signal once it has shut down).
    assert soak.exit_code in (0, -signal.SIGTERM) and soak.log_tracebacks == 0, soak.log_errors


def count(soak: Result, outcome: str) -> int:
    return sum(n for key, n in soak.outcomes.items() if key.endswith("/" + outcome))


def test_nothing_is_left_behind_once_the_load_stops(soak: Result) -> None:
    before, after = soak.phase("idle-before")[0], soak.phase("idle-after")[0]
    assert before.tasks is not None and after.tasks is not None  # the gateway exports them
    assert after.fds <= before.fds + FDS_SLACK, (before, after)
    assert after.tasks <= before.tasks + TASKS_SLACK, (before, after)
    assert after.threads <= before.threads + THREADS_SLACK, (before, after)
    assert after.inflight == 0 and after.db_checked_out == 0, after


def test_resources_stay_bounded_under_load(soak: Result) -> None:
    samples = soak.phase("soak")
    assert len(samples) >= 8
    assert all(s.db_checked_out is not None and s.db_checked_out <= DB_POOL_LIMIT for s in samples)
    assert all(s.log_dropped == 0 for s in samples)
    settled = [s.rss_mb for s in samples if s.t_s >= SHORT.settle_s]
    assert max(settled) - settled[0] < RSS_GROWTH_MB, [s.rss_mb for s in samples]


def test_the_report_is_made_again_from_its_json(soak: Result, tmp_path: Path) -> None:
    """`bench/soak.py --from-json` rebuilds the run (the report's verdicts can change without a new run)."""
    started = datetime.now(UTC)
    raw = json.loads(json.dumps(to_json(soak, {"cpu": "x"}, started, ["bench/soak.py"])))
    again, info, when, argv = from_json(raw)
    assert (info, when, argv) == ({"cpu": "x"}, started, ["bench/soak.py"])
    assert again.outcomes == soak.outcomes and again.injected == soak.injected
    same = [json.dumps(asdict(s), sort_keys=True) for s in again.samples]  # as text: NaN != NaN
    assert same == [json.dumps(asdict(s), sort_keys=True) for s in soak.samples]
    assert [v.flat for v in verdicts(again)] == [v.flat for v in verdicts(soak)]
    machine = {"cpu": "x", "nproc": "2", "python": "3", "platform": "p", "code": "c", "libs": "l"}
    text = report(again, {**machine, "loadavg_before": "0", "loadavg_after": "0"}, argv, when, "soak.png")
    assert "## Verdict" in text and "| fds |" in text
    pytest.importorskip("matplotlib")
    assert plot(again, tmp_path / "soak.png") and (tmp_path / "soak.png").stat().st_size > 0


async def test_runtime_gauges_count_tasks_and_checked_out_connections(tmp_path: Path) -> None:
    """`icgate_asyncio_tasks` counts the loop's live tasks; `icgate_db_connections` the pool's connections in
    use and idle, as they change."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(running_tasks, lambda: engine.pool))
    gate = asyncio.Event()
    waiting = [asyncio.create_task(gate.wait()) for _ in range(3)]
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            held = parse_gauges(generate_latest(registry).decode())
        idle = parse_gauges(generate_latest(registry).decode())
    finally:
        gate.set()
        await asyncio.gather(*waiting)
        engine.dispose()
    assert held["db_checked_out"] == 1 and held["db_idle"] == 0
    assert idle["db_checked_out"] == 0 and idle["db_idle"] == 1
    assert held["tasks"] is not None and held["tasks"] >= 4  # this test's task and the three waiting
    assert parse_gauges(generate_latest(registry).decode())["tasks"] == held["tasks"] - 3
    # Outside an event loop there is no task count, rather than a wrong one.
    assert running_tasks() is not None
    assert await asyncio.to_thread(running_tasks) is None


def test_heap_gauges_see_native_memory_sqlite_and_python_objects_held(tmp_path: Path) -> None:
    """The gauges the soak reads to tell where a growing RSS sits: 64 MB of C heap held shows in
    `icgate_malloc_bytes{state="in_use"}`, an SQLite page cache filled in `icgate_sqlite_memory_bytes`,
    200,000 small Python objects in `icgate_python_allocated_blocks`; each falls back once released."""
    import ctypes
    import sqlite3

    registry = CollectorRegistry()
    registry.register(RuntimeCollector(lambda: None, lambda: None))

    def read() -> dict[str, float | None]:
        return parse_gauges(generate_latest(registry).decode())

    before = read()
    assert before["malloc_in_use"] is not None and before["sqlite_memory"] is not None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(64 * 2**20)
    try:
        held = read()
    finally:
        libc.free(block)
    assert held["malloc_in_use"] - before["malloc_in_use"] >= 63 * 2**20  # type: ignore[operator]
    assert read()["malloc_in_use"] < held["malloc_in_use"] - 32 * 2**20  # type: ignore[operator]

    conn = sqlite3.connect(tmp_path / "pages.sqlite")
    conn.execute("PRAGMA cache_size = -8000")
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", ((str(i) * 40,) for i in range(100_000)))
    conn.commit()
    filled = read()["sqlite_memory"]
    conn.close()
    assert filled - before["sqlite_memory"] >= 2 * 2**20  # type: ignore[operator]
    assert read()["sqlite_memory"] < filled - 2 * 2**20  # type: ignore[operator]

    objects = [object() for _ in range(200_000)]
    many = read()["py_blocks"]
    del objects
    assert many - before["py_blocks"] >= 190_000  # type: ignore[operator]
    assert read()["py_blocks"] < many - 190_000  # type: ignore[operator]
