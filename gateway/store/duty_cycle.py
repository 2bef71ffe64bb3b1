"""A share of the clock for work done after the response: embedding a named request's answer to store it.

A request that names a backend is a pass-through, and its answer is embedded only after the response, so
that routed traffic can find it later. That embedding costs more than the request's own path: a profile
of named requests one at a time kept the embedder busy 72% of the time for 46% on the event loop that
served them (docs/performance.md). On two cores the stores then compete with the next request. A
`DutyCycle` runs such work one piece at a time and rests after each piece in proportion to what it took,
so the work holds at most `share` of the clock. Pieces that arrive while it works or rests wait their
turn, in order; beyond `backlog` waiting pieces, a new one is refused rather than held (`BacklogFullError`).
At a few stores a second nothing waits; only a flood of named requests is slowed down, or thinned out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class BacklogFullError(RuntimeError):
    """`backlog` pieces are already waiting for their turn: this one is not run."""


class DutyCycle:
    """At most `share` of the clock for the work handed to `run`, one piece at a time."""

    def __init__(
        self,
        share: float,
        backlog: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        if backlog < 0:
            raise ValueError("backlog must be >= 0")
        self.share = share
        self.backlog = backlog
        self.clock = clock
        self.sleep = sleep
        self._lock = asyncio.Lock()
        self._waiting = 0  # pieces inside run() that have not started
        self._ready_at = float("-inf")  # the earliest the next piece may start

    @property
    def waiting(self) -> int:
        return self._waiting

    def drain(self) -> None:
        """No more rests: what waits now runs back to back, after the rest already begun (at shutdown, the
        backlog is stored in a fraction of a second instead of at the share's pace)."""
        self.share = 1.0

    def _must_wait(self) -> bool:
        return self._lock.locked() or self.clock() < self._ready_at

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """`await work()` in its turn. The rest after it is what it took times (1 - share) / share: a piece
        that waited for the embedder's queue is charged for the wait too, so when the request path keeps
        the embedder busy, stores back off further."""
        if self._must_wait() and self._waiting >= self.backlog:
            raise BacklogFullError(f"{self._waiting} pieces of background work are waiting")
        self._waiting += 1
        started = False
        try:
            async with self._lock:
                rest = self._ready_at - self.clock()
                if rest > 0:
                    await self.sleep(rest)
                self._waiting -= 1
                started = True
                began = self.clock()
                try:
                    return await work()
                finally:
                    took = self.clock() - began
                    self._ready_at = self.clock() + took * (1 - self.share) / self.share
        finally:
            if not started:
                self._waiting -= 1
