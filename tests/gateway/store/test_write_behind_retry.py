"""The write-behind queue against a database that stops answering, with an injected writer: a failure of the
database (away, full, read-only) is waited out however long it lasts, rows the database rejects are dropped
one by one, drops happen only when the queue is full, every drop is reported, and close() gives up after
its bound. The errors are genuine: raised by SQLite, psycopg and SQLAlchemy's pool, not constructed."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from bench.harness import free_port
from icgate.gateway.config import RequestLogConfig
from icgate.gateway.store import write_behind
from icgate.gateway.store.write_behind import (
    FULL,
    OTHER,
    READ_ONLY,
    REJECTED,
    UNAVAILABLE,
    Retry,
    WriteBehindQueue,
    backoff_s,
    classify,
)

FAST = Retry(backoff_s=0.001, max_backoff_s=0.004)  # the same doubling, in milliseconds


def _raised(action: Callable[[], Any]) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def sqlite_full(tmp: Path) -> BaseException:
    """SQLITE_FULL, as a file capped by max_page_count reports it through SQLAlchemy."""
    engine = sa.create_engine(f"sqlite:///{tmp / 'full.db'}")

    def fill() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x BLOB)")
            conn.exec_driver_sql("PRAGMA max_page_count = 3")
            conn.exec_driver_sql("INSERT INTO t VALUES (zeroblob(100000))")

    try:
        return _raised(fill)
    finally:
        engine.dispose()


def sqlite_read_only(tmp: Path) -> BaseException:
    """SQLITE_READONLY: a file opened read-only (as SQLite does when it may not write it)."""
    path = tmp / "ro.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (x)")
    setup.close()
    engine = sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True))

    def write() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    try:
        return _raised(write)
    finally:
        engine.dispose()


def duplicate_key() -> BaseException:
    engine = sa.create_engine("sqlite://")

    def insert_twice() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    try:
        return _raised(insert_twice)
    finally:
        engine.dispose()


def connection_refused() -> BaseException:
    """psycopg connecting to a port nobody listens on, through SQLAlchemy."""
    engine = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x", poolclass=sa.NullPool
    )
    try:
        return _raised(lambda: engine.connect().close())
    finally:
        engine.dispose()


def pool_timeout(tmp: Path) -> BaseException:
    """Every pooled connection busy for longer than the pool waits."""
    engine = sa.create_engine(f"sqlite:///{tmp / 'pool.db'}", pool_size=1, max_overflow=0, pool_timeout=0.01)
    held = engine.connect()
    try:
        return _raised(lambda: engine.connect().close())
    finally:
        held.close()
        engine.dispose()


def server_shutting_down() -> BaseException:
    """What psycopg raises when PostgreSQL ends the session for a shutdown (SQLSTATE 57P01)."""
    return sa.exc.OperationalError("INSERT", None, psycopg.errors.AdminShutdown("terminating connection"))


def test_each_failure_is_classified_by_what_the_database_said(tmp_path: Path) -> None:
    lost = sa.exc.DBAPIError("INSERT", None, psycopg.InterfaceError("lost"), connection_invalidated=True)
    found = {
        "sqlite full": classify(sqlite_full(tmp_path)),
        "sqlite read-only": classify(sqlite_read_only(tmp_path)),
        "duplicate key": classify(duplicate_key()),
        "refused": classify(connection_refused()),
        "pool timeout": classify(pool_timeout(tmp_path)),
        "shutting down": classify(server_shutting_down()),
        "invalidated": classify(lost),
        "a bug": classify(ValueError("not a database error")),
    }
    assert found == {
        "sqlite full": FULL,
        "sqlite read-only": READ_ONLY,
        "duplicate key": REJECTED,
        "refused": UNAVAILABLE,
        "pool timeout": UNAVAILABLE,
        "shutting down": UNAVAILABLE,
        "invalidated": UNAVAILABLE,
        "a bug": OTHER,
    }


def test_backoff_doubles_from_its_first_wait_up_to_its_cap() -> None:
    assert [backoff_s(n, 0.5, 5.0) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff_s(10_000, 0.5, 5.0) == 5.0  # no overflow however long the outage


class Events:
    """What the queue reports (the gateway's metrics implement the same two methods)."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()

    def storage_dropped(self, what: str, count: int) -> None:
        self.dropped[what] += count

    def storage_error(self, what: str, kind: str) -> None:
        self.errors[(what, kind)] += 1


class Database:
    """An injected writer: each call first takes the next scripted outcome (an error to raise, or None for
    a normal write); with the script empty it raises `down` while that is set, else writes, refusing the
    whole batch (like a transaction) if it holds a record in `bad`."""

    def __init__(self, duplicate: BaseException | None = None) -> None:
        self.rows: list[int] = []
        self.calls: list[list[int]] = []
        self.script: list[BaseException | None] = []
        self.down: BaseException | None = None
        self.bad: set[int] = set()
        self.duplicate = duplicate

    def write(self, batch: list[int]) -> None:
        self.calls.append(list(batch))
        outcome = self.script.pop(0) if self.script else self.down
        if outcome is not None:
            raise outcome
        if self.bad & set(batch):
            assert self.duplicate is not None
            raise self.duplicate
        self.rows.extend(batch)


def queue(db: Database, events: Events, **overrides: Any) -> WriteBehindQueue[int]:
    config = RequestLogConfig(
        queue_size=overrides.pop("queue_size", 100),
        batch_size=overrides.pop("batch_size", 10),
        flush_interval_s=0.001,
    )
    return WriteBehindQueue(
        db.write,
        config,
        name="test rows",
        what="test",
        events=events,
        retry=dataclasses.replace(FAST, **overrides),
    )


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_a_database_away_for_many_attempts_loses_nothing(tmp_path: Path) -> None:
    db, events = Database(), Events()
    failures = [connection_refused(), server_shutting_down(), sqlite_full(tmp_path)]
    failures += [sqlite_read_only(tmp_path), pool_timeout(tmp_path)] * 2  # 7 in a row: max_attempts is 3
    db.script = list(failures)
    writer = queue(db, events, max_attempts=3)
    await writer.start()
    for i in range(25):
        assert writer.submit(i)
        await asyncio.sleep(0)
    await writer.flush()
    await writer.close()
    assert db.rows == list(range(25))  # all, once each, in order
    assert (writer.written, writer.dropped, writer.pending) == (25, 0, 0)
    assert events.dropped == Counter()
    assert events.errors == Counter({("test", UNAVAILABLE): 4, ("test", FULL): 1, ("test", READ_ONLY): 2})
    assert not writer.waiting_for_database


async def test_a_full_queue_while_the_database_is_away_drops_counts_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, events = Database(), Events()
    db.down = connection_refused()
    writer = queue(db, events, queue_size=4, batch_size=2)
    await writer.start()
    writer.submit(0)
    await until(lambda: len(db.calls) >= 2)  # the writer holds [0] and is backing off
    assert writer.waiting_for_database
    with caplog.at_level(logging.WARNING, logger=write_behind.__name__):
        accepted = [writer.submit(i) for i in range(1, 31)]  # plain calls: nothing to wait on
    assert accepted == [True] * 4 + [False] * 26
    assert events.dropped == Counter({"test": 26}) and writer.dropped == 26
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1 and "while the database is not answering" in full[0].getMessage()
    db.down = None  # back: what was held and queued is written
    await writer.flush()
    await writer.close()
    assert db.rows == [0, 1, 2, 3, 4]
    assert (writer.written, writer.dropped, writer.pending) == (5, 26, 0)


async def test_rejected_rows_are_dropped_one_by_one_and_an_outage_meanwhile_is_waited_out() -> None:
    db, events = Database(duplicate=duplicate_key()), Events()
    db.bad = {2}
    # The batch is rejected, [0] lands, then the database goes away for two attempts in the middle.
    db.script = [None, None, connection_refused(), connection_refused()]
    writer = queue(db, events, batch_size=5)
    for i in range(5):
        writer.submit(i)
    await writer.start()
    await writer.close()
    assert db.rows == [0, 1, 3, 4]
    assert (writer.written, writer.failed, writer.pending) == (4, 1, 0)
    assert events.dropped == Counter({"test": 1})
    assert events.errors[("test", REJECTED)] >= 1 and events.errors[("test", UNAVAILABLE)] == 2


async def test_other_errors_are_retried_max_attempts_then_dropped_and_the_writer_goes_on() -> None:
    db, events = Database(), Events()
    db.script = [ValueError("a bug")] * 3
    writer = queue(db, events, max_attempts=3)
    await writer.start()
    writer.submit(1)
    await writer.flush()
    writer.submit(2)
    await writer.close()
    assert db.rows == [2] and writer.failed == 1
    assert events.dropped == Counter({"test": 1}) and events.errors == Counter({("test", OTHER): 3})


async def test_close_with_the_database_still_away_gives_up_after_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, events = Database(), Events()
    db.down = connection_refused()
    writer = queue(db, events, batch_size=3)
    await writer.start()
    for i in range(10):
        writer.submit(i)
    with caplog.at_level(logging.ERROR, logger=write_behind.__name__):
        await asyncio.wait_for(writer.close(timeout_s=0.05), 10)
    assert db.rows == [] and (writer.written, writer.failed, writer.pending) == (0, 10, 0)
    assert events.dropped == Counter({"test": 10})
    lost = sum(
        int(r.getMessage().split(": ")[1].split()[0]) for r in caplog.records if "lost" in r.getMessage()
    )
    assert lost == 10
    assert writer.submit(99) is False and events.dropped == Counter({"test": 11})


async def test_close_cuts_off_a_database_call_that_never_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_behind, "STUCK_CALL_S", 0.05)
    release = threading.Event()
    events = Events()

    def hang(batch: list[int]) -> None:
        release.wait(10)

    writer: WriteBehindQueue[int] = WriteBehindQueue(
        hang, RequestLogConfig(batch_size=2, flush_interval_s=0.001), what="test", events=events, retry=FAST
    )
    await writer.start()
    for i in range(5):
        writer.submit(i)
    try:
        await asyncio.wait_for(writer.close(timeout_s=0.0), 10)
    finally:
        release.set()
    assert (writer.written, writer.failed, writer.pending) == (0, 5, 0)
    assert events.dropped == Counter({"test": 5})


async def test_close_never_cuts_off_a_writer_that_makes_progress() -> None:
    rows: list[int] = []

    def slow(batch: list[int]) -> None:
        time.sleep(0.02)
        rows.extend(batch)

    writer: WriteBehindQueue[int] = WriteBehindQueue(
        slow, RequestLogConfig(batch_size=1, flush_interval_s=0.001), what="test", retry=FAST
    )
    await writer.start()
    for i in range(10):
        writer.submit(i)
    await writer.close(timeout_s=0.0)  # the bound is for a database that is away, not a slow one
    assert rows == list(range(10)) and writer.failed == 0
