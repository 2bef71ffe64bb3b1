"""A bounded write-behind queue: the hot path appends, a background task writes batches.

The hot path only appends to an in-memory queue (`submit`, never blocks);
a background task writes batches from a worker thread. `close()` drains the
queue, so nothing accepted is lost on a clean shutdown; on a crash at most the
unwritten tail is. When the queue is full, records are dropped and counted
rather than slowing requests down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from icgate.gateway.config import RequestLogConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


def _is_permanent(exc: BaseException) -> bool:
    """Errors caused by the rows themselves: retrying the same batch cannot help."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class WriteBehindQueue(Generic[T]):
    """Bounded write-behind queue in front of one table (or one kind of write).

    Call `submit` from the event loop only. A failing write is retried
    `max_attempts` times with exponential backoff, then the batch is dropped
    and counted; the writer itself keeps running.
    """

    def __init__(
        self,
        write_batch: Callable[[list[T]], None],
        config: RequestLogConfig,
        *,
        name: str = "write-behind",
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._write_batch = write_batch
        self._name = name
        self._config = config
        self._max_attempts = max(1, max_attempts)
        self._retry_backoff_s = retry_backoff_s
        # One slot more than configured, kept for the stop marker.
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=config.queue_size + 1)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._accepted = 0
        self._written = 0
        self._rejected = 0  # queue full or writer closed
        self._failed = 0  # accepted, then given up on after failed writes

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

    async def flush(self) -> None:
        """Wait until everything submitted so far is written or given up on."""
        if self._task is None:
            raise RuntimeError(f"{self._name}: flush() before start()")
        await self._queue.join()

    async def close(self) -> None:
        """Stop accepting, write everything queued, then stop the writer task."""
        if self._closed and self._task is None:
            return
        self._closed = True
        await self.start()
        assert self._task is not None
        self._queue.put_nowait(_STOP)  # the reserved slot guarantees room
        await self._task
        self._task = None

    def _reject(self) -> None:
        self._rejected += 1
        if self._rejected == 1 or self._rejected % 1000 == 0:
            log.warning("%s queue full or closed: %d records dropped so far", self._name, self._rejected)

    async def _run(self) -> None:
        while True:
            batch, stop = await self._next_batch()
            try:
                if batch:
                    await self._write(batch)
            except Exception:
                # A bug in here must not end the writer and silently stop the log.
                log.exception("%s writer: unexpected error, %d records dropped", self._name, len(batch))
                self._failed += len(batch)
            finally:
                for _ in range(len(batch) + (1 if stop else 0)):
                    self._queue.task_done()
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
        for attempt in range(1, self._max_attempts + 1):
            try:
                await asyncio.to_thread(self._insert, batch)
            except Exception as exc:
                if _is_permanent(exc):
                    written = await asyncio.to_thread(self._insert_one_by_one, batch)
                    self._written += written
                    self._failed += len(batch) - written
                    return
                log.warning(
                    "%s write of %d records failed (attempt %d/%d): %s",
                    self._name,
                    len(batch),
                    attempt,
                    self._max_attempts,
                    _describe(exc),
                )
                if attempt < self._max_attempts:
                    await asyncio.sleep(self._retry_backoff_s * 2 ** (attempt - 1))
            else:
                self._written += len(batch)
                return
        self._failed += len(batch)
        log.error("%s: dropped a batch of %d records after %d attempts", self._name, len(batch), attempt)

    def _insert(self, batch: list[T]) -> None:
        self._write_batch(batch)

    def _insert_one_by_one(self, batch: list[T]) -> int:
        """Write what can be written when some rows in a batch are bad."""
        written = 0
        for record in batch:
            try:
                self._insert([record])
                written += 1
            except Exception as exc:
                log.error("%s: dropped one record: %s", self._name, _describe(exc))
        return written


def _describe(exc: BaseException) -> str:
    # DBAPI errors: the driver's message, not SQLAlchemy's wrapper with the
    # statement; parameters are hidden by the engine in any case.
    if isinstance(exc, SQLAlchemyError) and isinstance(getattr(exc, "orig", None), BaseException):
        orig = exc.orig  # type: ignore[attr-defined]
        return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"
    return f"{type(exc).__name__}: {exc}"
