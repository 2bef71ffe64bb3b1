"""A bounded write-behind queue: the hot path appends, a background task writes batches.

The hot path only appends to an in-memory queue (`submit`, never blocks);
a background task writes batches from a worker thread. A database that stops
answering (a PostgreSQL restart, a full or read-only SQLite file) is waited
out: the batch in hand is retried with capped exponential backoff until it is
written, while the queue keeps accepting records until it is full; only then
are records dropped, counted and logged, rather than slowing requests down.
Rows the database rejects (a duplicate key, a bad value) are written one by
one so the rest of their batch lands. `close()` drains the queue, so nothing
accepted is lost on a clean shutdown; with the database still away it gives up
after a bound and counts what it held as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from icgate.gateway.config import RequestLogConfig
from icgate.gateway.store.db import NEARLY_FULL_BYTES, filesystem_state, sqlite_file
from icgate.gateway.store.tables import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()

# What a failed write says (`classify`). The first three are the database's state, not the rows': the
# batch is retried until they pass.
UNAVAILABLE = "unavailable"  # no connection, a server shutting down or starting, a pool timeout, locked
FULL = "full"  # SQLITE_FULL, PostgreSQL's disk_full, ENOSPC
READ_ONLY = "read_only"  # SQLITE_READONLY, a read-only transaction (a standby), EROFS
REJECTED = "rejected"  # the rows themselves: retrying the same batch cannot help
OTHER = "other"  # anything else: retried `max_attempts` times, as a bug might be
TRANSIENT = frozenset({UNAVAILABLE, FULL, READ_ONLY})

# A failing database is reported at most this often (the first failure and the recovery always are).
LOG_EVERY_S = 30.0
# close(): how long past its deadline a writer stuck in one database call is waited for.
STUCK_CALL_S = 2.0

_SQLITE_CODES = {13: FULL, 8: READ_ONLY, 5: UNAVAILABLE, 6: UNAVAILABLE, 10: UNAVAILABLE, 14: UNAVAILABLE}
_SQLITE_FILE_CODES = {8, 10, 13, 14}  # READONLY, IOERR, FULL, CANTOPEN: the file's filesystem may say more


class StorageEvents(Protocol):
    """Where a queue reports what it lost and why its writes failed (`telemetry.Metrics`)."""

    def storage_dropped(self, what: str, count: int) -> None: ...

    def storage_error(self, what: str, kind: str) -> None: ...


def _is_permanent(exc: BaseException) -> bool:
    """Errors caused by the rows themselves: retrying the same batch cannot help."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


def classify(exc: BaseException, sqlite_file: Path | None = None) -> str:
    """One of UNAVAILABLE, FULL, READ_ONLY (wait for the database), REJECTED (the rows) or OTHER."""
    if _is_permanent(exc):
        return REJECTED
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    said = _sqlite_kind(orig, sqlite_file) if isinstance(orig, sqlite3.Error) else _server_kind(orig)
    if said is not None:
        return said
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return UNAVAILABLE
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | DisconnectionError):
        return UNAVAILABLE
    return OTHER


def _sqlite_kind(orig: sqlite3.Error, sqlite_file: Path | None) -> str | None:
    """With the file given, an error of its I/O is put down to its filesystem when that is read-only or
    full: SQLite says "disk I/O error" when a filesystem turns read-only under an open file."""
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _SQLITE_CODES:
        if sqlite_file is not None and code & 0xFF in _SQLITE_FILE_CODES:
            read_only, free = filesystem_state(sqlite_file)
            if read_only:
                return READ_ONLY
            if free is not None and free < NEARLY_FULL_BYTES:
                return FULL
        return _SQLITE_CODES[code & 0xFF]
    text = str(orig).lower()
    if "disk is full" in text:
        return FULL
    return READ_ONLY if "readonly" in text or "read-only" in text else None


def _server_kind(orig: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE (psycopg), or the operating system's errno."""
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str):
        if state == "53100":
            return FULL
        if state == "25006":
            return READ_ONLY
        if state.startswith(("08", "57P", "53")):
            return UNAVAILABLE
    if isinstance(orig, OSError):
        return {errno.ENOSPC: FULL, errno.EROFS: READ_ONLY}.get(orig.errno or 0, UNAVAILABLE)
    return None


def backoff_s(failures: int, first_s: float, cap_s: float) -> float:
    """The wait after `failures` failed attempts in a row: `first_s`, doubling, never above `cap_s`."""
    return min(cap_s, first_s * 2.0 ** min(max(failures, 1) - 1, 30))


@dataclass(frozen=True)
class Retry:
    """How a queue waits out a database that does not take its writes."""

    backoff_s: float = 0.5  # the first wait after a failure; it doubles with each failure in a row ...
    max_backoff_s: float = 5.0  # ... up to this: a database back is written to within it
    max_attempts: int = 3  # for errors that are neither the database's state nor the rows'
    close_timeout_s: float = 30.0  # close(): how long a database still away is waited for by default


class WriteBehindQueue(Generic[T]):
    """Bounded write-behind queue in front of one table (or one kind of write).

    Call `submit` from the event loop only. A write the database did not take
    because it is away, full or read-only is retried with capped exponential
    backoff (`Retry`) for as long as it takes; rejected rows are retried one by
    one and the bad ones dropped; any other error is retried
    `Retry.max_attempts` times, then the batch is dropped. Every record dropped
    is reported to `events` under `what`. `sqlite_file`, the database's file if
    SQLite, lets `classify` ask its filesystem.
    """

    def __init__(
        self,
        write_batch: Callable[[list[T]], None],
        config: RequestLogConfig,
        *,
        name: str = "write-behind",
        what: str | None = None,
        events: StorageEvents | None = None,
        retry: Retry = Retry(),
        sqlite_file: Path | None = None,
    ) -> None:
        self._write_batch = write_batch
        self._sqlite_file = sqlite_file
        self._name = name
        self.what = what or name.replace(" ", "_")
        self._events = events
        self._config = config
        self._max_attempts = max(1, retry.max_attempts)
        self._retry_backoff_s = retry.backoff_s
        self._max_backoff_s = max(retry.backoff_s, retry.max_backoff_s)
        self._close_timeout_s = retry.close_timeout_s
        # One slot more than configured, kept for the stop marker.
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=config.queue_size + 1)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # cuts a backoff short when close() is called
        self._give_up_at: float | None = None  # loop time, set by close()
        self._gave_up = False  # close()'s deadline passed with the database away: lose the rest
        self._in_hand: list[T] = []  # the batch being written
        self._closed = False
        self._accepted = 0
        self._written = 0
        self._rejected = 0  # queue full or writer closed
        self._failed = 0  # accepted, then given up on: rows rejected, other errors, still down at close
        self._rejected_logged = 0
        self._rejected_log_at = float("-inf")
        self._down_since: float | None = None  # monotonic time of the first failure in a row
        self._down_log_at = float("-inf")

    @property
    def written(self) -> int:
        return self._written

    @property
    def dropped(self) -> int:
        """Records that will never be written: rejected at submit, or failed to write."""
        return self._rejected + self._failed

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def pending(self) -> int:
        """Accepted and not yet written or given up on."""
        return self._accepted - self._written - self._failed

    @property
    def waiting_for_database(self) -> bool:
        """True while the batch in hand is being retried because the database is away, full or read-only."""
        return self._down_since is not None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self._name} writer")

    def submit(self, record: T) -> bool:
        """Queue `record` for writing; False (and counted) if the queue is full or closed."""
        if self._closed or self._queue.qsize() >= self._config.queue_size:
            self._reject()
            return False
        self._queue.put_nowait(record)
        self._accepted += 1
        return True

    def refuse(self) -> None:
        """Count a record its producer could not even hand over (it had no room either) as dropped."""
        self._reject()

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted so far is written or given up on (with the database away: until
        it is back, or close() gives up), or at most `timeout_s`: False if that passed first."""
        if self._task is None:
            raise RuntimeError(f"{self._name}: flush() before start()")
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting, write everything queued, then stop the writer task.

        With the database away, it is retried for `timeout_s` more (default: `close_timeout_s`); what
        is still unwritten then is counted as lost and logged. A writer making progress is never cut
        off; one stuck in a single database call is, `STUCK_CALL_S` after the deadline.
        """
        if self._closed and self._task is None:
            return
        self._closed = True
        await self.start()
        task = self._task
        assert task is not None
        loop = asyncio.get_running_loop()
        bound = self._close_timeout_s if timeout_s is None else max(0.0, timeout_s)
        self._give_up_at = loop.time() + bound
        self._wake.set()  # a writer backing off tries once more now, then until the deadline
        self._queue.put_nowait(_STOP)  # the reserved slot guarantees room
        while True:
            progress = self._written + self._failed
            wait = max(0.0, self._give_up_at - loop.time()) + STUCK_CALL_S
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                break
            if self._written + self._failed == progress:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                break
        self._task = None
        self._lose_queued()

    # --- bookkeeping ----------------------------------------------------------------------------------

    def _reject(self) -> None:
        self._rejected += 1
        if self._events is not None:
            self._events.storage_dropped(self.what, 1)
        now = time.monotonic()
        if now - self._rejected_log_at >= LOG_EVERY_S:
            log.warning(
                "%s queue full or closed: %d records dropped (%d since the last report)%s",
                self._name,
                self._rejected,
                self._rejected - self._rejected_logged,
                " while the database is not answering" if self._down_since is not None else "",
            )
            self._rejected_log_at, self._rejected_logged = now, self._rejected

    def _lose(self, records: list[T], why: str) -> None:
        """Give up on accepted records: counted, reported, logged."""
        if not records:
            return
        self._failed += len(records)
        if self._events is not None:
            self._events.storage_dropped(self.what, len(records))
        log.error("%s: %d records lost: %s", self._name, len(records), why)
        self._after_loss(records)

    def _lose_queued(self) -> None:
        """Records still queued once the writer is gone (it gave up, or was cut off)."""
        left: list[T] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._queue.task_done()
            if item is not _STOP:
                left.append(item)
        self._lose(left, "the database was still not answering at shutdown")

    def _wrote(self, records: list[T]) -> None:
        self._written += len(records)
        if self._down_since is not None:
            log.warning(
                "%s: the database answers again after %.1f s; %d records waiting",
                self._name,
                time.monotonic() - self._down_since,
                self.pending,
            )
            self._down_since = None
            self._down_log_at = float("-inf")
        self._after_write(records)

    def _failed_write(self, kind: str, exc: BaseException, count: int) -> None:
        """Count a failed attempt; log the first of a run, then at most every LOG_EVERY_S."""
        if self._events is not None:
            self._events.storage_error(self.what, kind)
        now = time.monotonic()
        if kind in TRANSIENT and self._down_since is None:
            self._down_since = now
        if now - self._down_log_at >= LOG_EVERY_S or kind not in TRANSIENT:
            self._down_log_at = now
            since = f" for {now - self._down_since:.0f} s" if self._down_since is not None else ""
            log.warning(
                "%s: write of %d records failed (%s%s): %s; %d records waiting, %d dropped so far",
                self._name,
                count,
                kind.replace("_", "-"),
                since,
                _describe(exc),
                self.pending,
                self.dropped,
            )

    def _after_write(self, records: list[T]) -> None:
        """Called on the event loop once `records` are in the database (a subclass's hook)."""

    def _after_loss(self, records: list[T]) -> None:
        """Called on the event loop when `records` are given up on (a subclass's hook)."""

    # --- the writer -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch, stop = await self._next_batch()
            self._in_hand = batch
            try:
                if batch:
                    await self._write(batch)
            except asyncio.CancelledError:  # close() cut off a call that did not return
                self._lose(
                    self._in_hand, "the database call did not return before shutdown (it may yet land)"
                )
                raise
            except Exception:
                # A bug in here must not end the writer and silently stop the log.
                log.exception("%s writer: unexpected error", self._name)
                self._lose(self._in_hand, "unexpected error in the writer")
            finally:
                self._in_hand = []
                for _ in range(len(batch) + (1 if stop else 0)):
                    self._queue.task_done()
            if self._gave_up and not stop:
                # Past close()'s deadline with the database away: the rest is not tried (each try could
                # wait out a connect timeout), and counted in one go. The stop marker is among it.
                self._lose_queued()
                return
            if stop:
                return

    async def _next_batch(self) -> tuple[list[T], bool]:
        """Up to batch_size records, waiting at most flush_interval_s after the first."""
        first = await self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.flush_interval_s
        while len(batch) < self._config.batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _write(self, batch: list[T]) -> None:
        """Write `batch`, whatever it takes: see the class's docstring."""
        todo = batch
        failures = others = 0
        while todo:
            self._in_hand = todo
            try:
                await asyncio.to_thread(self._insert, todo)
            except Exception as exc:
                kind = classify(exc, self._sqlite_file)
                self._failed_write(kind, exc, len(todo))
                if kind == REJECTED:
                    todo, exc2 = await self._write_one_by_one(todo)
                    if not todo:
                        return
                    kind = classify(exc2, self._sqlite_file) if exc2 is not None else UNAVAILABLE
                if kind == OTHER:
                    others += 1
                    if others >= self._max_attempts:
                        self._lose(todo, f"{others} attempts failed: {_describe(exc)}")
                        return
                failures += 1
                if not await self._backoff(failures):
                    self._gave_up = True
                    self._lose(todo, f"the database was still not answering at shutdown ({kind})")
                    return
            else:
                self._wrote(todo)
                return

    async def _backoff(self, failures: int) -> bool:
        """Wait before the next attempt; False once close() has given up."""
        loop = asyncio.get_running_loop()
        delay = backoff_s(failures, self._retry_backoff_s, self._max_backoff_s)
        if self._give_up_at is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            return True  # if close() was called during the wait: one more try right away
        remaining = self._give_up_at - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(delay, remaining))
        return True

    def _insert(self, batch: list[T]) -> None:
        self._write_batch(batch)

    async def _write_one_by_one(self, batch: list[T]) -> tuple[list[T], BaseException | None]:
        """Write what can be written when some rows in a batch are bad. Returns the records not tried
        yet (and the error) if the database stops answering part way: those go back to waiting."""
        for i, record in enumerate(batch):
            self._in_hand = batch[i:]
            try:
                await asyncio.to_thread(self._insert, [record])
            except Exception as exc:
                kind = classify(exc, self._sqlite_file)
                if kind in TRANSIENT:
                    self._failed_write(kind, exc, len(batch) - i)
                    return batch[i:], exc
                self._lose([record], f"the database rejected it: {_describe(exc)}")
            else:
                self._wrote([record])
        return [], None


def _describe(exc: BaseException) -> str:
    # DBAPI errors: the driver's message, not SQLAlchemy's wrapper with the
    # statement; parameters are hidden by the engine in any case.
    if isinstance(exc, SQLAlchemyError) and isinstance(getattr(exc, "orig", None), BaseException):
        orig = exc.orig  # type: ignore[attr-defined]
        return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"
    return f"{type(exc).__name__}: {exc}"


def insert_rows(engine: sa.Engine, table: Any, records: list[Any]) -> None:
    """Records (dataclasses whose fields are the table's columns) as rows, stamped `created_at`."""
    now = utcnow()
    rows = [{**record.__dict__, "created_at": now} for record in records]
    with engine.begin() as conn:
        conn.execute(sa.insert(table), rows)


class RowWriter(WriteBehindQueue[T]):
    """Records (dataclasses whose fields are the table's columns) appended to one table behind the
    request, each stamped `created_at` when its batch is written."""

    def __init__(
        self,
        engine: sa.Engine,
        table: Any,
        config: RequestLogConfig,
        *,
        name: str,
        what: str,
        events: StorageEvents | None = None,
        close_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(
            lambda batch: insert_rows(engine, table, batch),
            config,
            name=name,
            what=what,
            events=events,
            retry=Retry(close_timeout_s=close_timeout_s),
            sqlite_file=sqlite_file(engine),
        )
