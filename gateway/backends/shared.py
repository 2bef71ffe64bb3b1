"""Backend slots counted across replicas, in Redis: every replica takes a backend's slots from one count, so
several replicas together never send a backend more than its `max_concurrent`.

A slot is a lease: a member of the backend's sorted set whose score is its expiry. The replica holding it
renews its leases every third of `lease_s`; a replica that dies stops renewing, and its slots come back when
the leases run out. A request that finds no slot free waits in a second sorted set, ordered by priority class
and then arrival, also leased; a freed slot goes to the head of that line, whichever replica holds it, so a
waiter is never kept behind a newcomer on another replica. A release is published, and waiters on every
replica try again at once (and every `poll_s` anyway, in case a message is lost).

Each step is one Lua script, so it is atomic in Redis; time is Redis's own (`TIME`), so replicas' clocks do
not matter. Redis unreachable: the caller falls back to its own replica's count (`SharedStateDown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("icgate.shared")

# KEYS: slots, waiting, waiting leases. ARGV: owner, limit, lease_s, order score.
# Returns 1 (a slot is the owner's) or 0 (the owner waits, in order).
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, m in ipairs(gone) do redis.call('ZREM', KEYS[2], m) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[2], ARGV[1])
local ahead = rank
if not rank then ahead = redis.call('ZCARD', KEYS[2]) end
if free > 0 and ahead < free then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  return 1
end
if not rank then redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), ARGV[1]) end
redis.call('ZADD', KEYS[3], now + lease, ARGV[1])
return 0
"""

# KEYS: slots, waiting, waiting leases. ARGV: owner, channel, backend. Frees a slot or a place in line.
RELEASE = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if held > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return held
"""

# KEYS: slots, waiting leases. ARGV: lease_s, then owners. Pushes the owners' leases forward (only those
# still there: XX).
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', until_, ARGV[i])
end
return 1
"""

# KEYS: slots. The slots held now, expired leases left out.
COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
"""


class SharedStateDown(Exception):
    """Redis did not answer: the replica counts on its own until it does again."""


class Outage:
    """A shared store that stopped answering, as one replica sees it. After a failure it is not asked
    again for `retry_s` (a dead Redis must not cost every request a connection timeout), and the failure
    is logged at most every `warn_every_s`. Backend slots and tenants' limits each keep one."""

    def __init__(
        self,
        what: str,
        retry_s: float = 5.0,
        warn_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.retry_s = retry_s
        self.warn_every_s = warn_every_s
        self.clock = clock
        self._until = -math.inf
        self._warned = -math.inf

    @property
    def up(self) -> bool:
        return self.clock() >= self._until

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._until = now + self.retry_s
        if now - self._warned >= self.warn_every_s:
            self._warned = now
            log.warning(
                "%s does not answer (%s): counted by this replica alone", self.what, type(exc).__name__
            )


class SharedSlots:
    """One count of slots per backend, shared by every replica that points at the same Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "icgate",
        lease_s: float = 6.0,
        poll_s: float = 0.25,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.channel = f"{prefix}:released"
        self._seq = itertools.count()
        self._held: dict[str, set[str]] = {}  # backend -> owners whose lease this replica renews
        self._holding: dict[str, int] = {}  # backend -> slots this replica holds now
        self.backends: list[str] = []  # whose count `on_counts` hears, every `poll_s`
        self.on_counts: Callable[[dict[str, int]], None] | None = None
        self.revoked_channel = f"{prefix}:keys-revoked"
        self.on_keys_revoked: Callable[[], None] | None = None
        self._released: dict[str, asyncio.Event] = {}
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._count = client.register_script(COUNT)
        self._tasks: list[asyncio.Task[None]] = []
        self.outage = Outage("Redis (backend slots)")

    @classmethod
    def from_url(cls, url: str, prefix: str = "icgate", lease_s: float = 6.0) -> SharedSlots:
        client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, prefix, lease_s)

    def _keys(self, backend: str) -> list[str]:
        base = f"{self.prefix}:slots:{backend}"
        return [base, f"{base}:waiting", f"{base}:waiting-leases"]

    def new_owner(self) -> str:
        return f"{self.replica}:{next(self._seq)}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._renew_leases(), name="icgate-shared-renew"),
            loop.create_task(self._listen(), name="icgate-shared-listen"),
            loop.create_task(self._watch_counts(), name="icgate-shared-counts"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Give back what this replica still holds (a clean stop): the others need not wait for the leases.
        with contextlib.suppress(RedisError, OSError):
            for backend, owners in self._held.items():
                for owner in list(owners):
                    await self._release(keys=self._keys(backend), args=[owner, self.channel, backend])
        await self.client.aclose()

    async def _call(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """One step in Redis, unless it failed a moment ago (`Outage`)."""
        if not self.outage.up:
            raise SharedStateDown("Redis did not answer a moment ago")
        try:
            return await step()
        except (RedisError, OSError) as exc:
            self.outage.failed(exc)
            raise SharedStateDown(type(exc).__name__) from exc

    async def try_acquire(self, backend: str, limit: int, owner: str, order: float) -> bool:
        """Take a slot if one is free and nobody waits ahead; else take (or keep) a place in line."""
        self._held.setdefault(backend, set()).add(owner)
        got = await self._call(
            lambda: self._acquire(keys=self._keys(backend), args=[owner, limit, self.lease_s, order])
        )
        if int(got):
            self._holding[backend] = self._holding.get(backend, 0) + 1
        return bool(int(got))

    async def acquire(self, backend: str, limit: int, owner: str, order: float, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a slot; False when none came in time (the place in line is given up)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        event = self._released.setdefault(backend, asyncio.Event())
        try:
            while True:
                event.clear()
                if await self.try_acquire(backend, limit, owner, order):
                    return True
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, self.poll_s))
        except BaseException:
            # Cancelled (the client left) or Redis failed: never leave a place in line behind, which this
            # replica would go on renewing and which would hold up everyone after it.
            await self._give_up(backend, owner)
            raise
        await self._give_up(backend, owner)
        return False

    async def _give_up(self, backend: str, owner: str) -> None:
        with contextlib.suppress(SharedStateDown):  # the lease runs out on its own
            await asyncio.shield(self.release(backend, owner))

    async def release(self, backend: str, owner: str) -> None:
        """Give back a slot (or a place in line); every replica's waiters hear of it."""
        owners = self._held.get(backend)
        if owners is not None:
            owners.discard(owner)
        held = await self._call(
            lambda: self._release(keys=self._keys(backend), args=[owner, self.channel, backend])
        )
        if int(held):
            self._holding[backend] = max(0, self._holding.get(backend, 0) - 1)

    async def in_flight(self, backend: str) -> int:
        """The slots every replica together holds on `backend` now."""
        return int(await self._call(lambda: self._count(keys=self._keys(backend)[:1])))

    async def announce_revocation(self) -> None:
        """Every replica forgets the keys it knew (a revoked one among them)."""
        try:
            await self.client.publish(self.revoked_channel, "1")
        except (RedisError, OSError) as exc:
            log.warning("could not announce a key revocation in Redis: %s", type(exc).__name__)

    def mine(self, backend: str) -> int:
        return self._holding.get(backend, 0)

    async def _watch_counts(self) -> None:
        """Every `poll_s`, the slots the other replicas hold, for admission's estimates."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.on_counts is None or not self.backends:
                continue
            try:
                counts = {b: await self.in_flight(b) for b in self.backends}
            except SharedStateDown:
                continue  # the next acquire says so, and falls back
            self.on_counts({b: max(0, n - self.mine(b)) for b, n in counts.items()})

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for backend, owners in list(self._held.items()):
                if not owners:
                    continue
                keys = self._keys(backend)
                try:
                    await self._renew(keys=[keys[0], keys[2]], args=[self.lease_s, *owners])
                except (RedisError, OSError) as exc:
                    log.warning("could not renew slot leases in Redis: %s", type(exc).__name__)

    async def _listen(self) -> None:
        """Wake this replica's waiters when any replica frees a slot; forget keys when one is revoked.
        Reconnects with a growing pause (1 s to 30 s) while Redis is away, warning once per outage."""
        pause = 1.0
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel, self.revoked_channel)
                if pause > 1.0:
                    log.info("Redis answers again: release and revocation messages resumed")
                pause = 1.0
                async for message in pubsub.listen():
                    self._heard(message)
            except (RedisError, OSError) as exc:
                if pause == 1.0:
                    log.warning("lost Redis's messages (%s); waiters poll meanwhile", type(exc).__name__)
                    # A revocation may have been missed: forget the keys known now.
                    if self.on_keys_revoked is not None:
                        self.on_keys_revoked()
                await asyncio.sleep(pause)
                pause = min(30.0, pause * 2)

    def _heard(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if channel in (self.revoked_channel, self.revoked_channel.encode()):
            if self.on_keys_revoked is not None:
                self.on_keys_revoked()
            return
        data = message.get("data")
        backend = data.decode() if isinstance(data, bytes) else str(data)
        event = self._released.get(backend)
        if event is not None:
            event.set()
