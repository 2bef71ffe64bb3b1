"""Identical requests in flight share one answer (request coalescing).

Without this, N identical requests that arrive together (a retry storm, a dashboard refreshing the same
prompt, a popular question) all miss the exact cache, since the first answer is not stored yet: each is
embedded, verified and sent to a backend. Here the first one leads: the others wait for its answer and
are served it as an exact hit, which is what they would have got a moment later. A follower never
depends on the leader for more than its answer: if the leader fails, is cancelled or stores nothing, the
followers go on as if alone, and none waits longer than `cache.coalesce_wait_s`.

Keys are (namespace, exact key): the exact cache's key within one tenant's namespace, so requests are
shared only where an exact hit could be. One registry per process (replicas do not wait for each
other: a replica learns another's answers when it syncs them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from icgate.cache.store import CacheEntry

Key = tuple[str, str]


@dataclass
class Lead:
    """The leader's handle: `share` the answer (an entry), or None when there is none to share. The first
    call settles it; later calls do nothing."""

    future: asyncio.Future[CacheEntry | None]

    def share(self, entry: CacheEntry | None) -> None:
        if not self.future.done():
            self.future.set_result(entry)


class InFlight:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._leaders: dict[Key, tuple[asyncio.Future[CacheEntry | None], float]] = {}

    def __len__(self) -> int:
        return len(self._leaders)

    def lead(self, key: Key, wait_s: float) -> Lead | None:
        """A handle if no identical request is in flight (this one leads; it must settle the handle), else
        None (follow the one that is). A leader older than `wait_s` is taken for gone, in case one were
        never settled: its key would otherwise make every later identical request wait out its bound."""
        if self._live(key, wait_s) is not None:
            return None
        future: asyncio.Future[CacheEntry | None] = asyncio.get_running_loop().create_future()
        self._leaders[key] = (future, self.clock())
        future.add_done_callback(lambda done: self._forget(key, done))
        return Lead(future)

    async def follow(self, key: Key, wait_s: float) -> CacheEntry | None:
        """The leader's answer, or None: no leader, none to share, or not within `wait_s`. Cancelling a
        follower leaves the leader alone."""
        future = self._live(key, wait_s)
        if future is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait_s)
        except TimeoutError:
            return None

    def _live(self, key: Key, wait_s: float) -> asyncio.Future[CacheEntry | None] | None:
        found = self._leaders.get(key)
        if found is None or self.clock() - found[1] > wait_s:
            return None
        return found[0]

    def _forget(self, key: Key, done: asyncio.Future[CacheEntry | None]) -> None:
        found = self._leaders.get(key)
        if found is not None and found[0] is done:
            del self._leaders[key]
