"""Backend slots shared through the real Redis on 127.0.0.1:6379: one count for every replica, a fair line
across replicas, leases that come back when a replica dies, and a clear signal when Redis is away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from icgate.gateway.backends.shared import Outage, SharedSlots, SharedStateDown

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"icgate-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def replica(prefix: str, lease_s: float = 6.0) -> SharedSlots:
    slots = SharedSlots.from_url(REDIS_URL, prefix, lease_s)
    await slots.start()
    return slots


async def test_two_replicas_together_never_take_more_than_the_limit(prefix: str) -> None:
    one, two = await replica(prefix), await replica(prefix)
    try:
        taken = [
            await slots.try_acquire("b", 2, slots.new_owner(), float(i))
            for i, slots in enumerate([one, two, one, two])
        ]
        assert taken == [True, True, False, False]
        assert await one.in_flight("b") == 2
    finally:
        await one.close()
        await two.close()


async def test_a_freed_slot_goes_to_the_head_of_the_line_on_any_replica(prefix: str) -> None:
    one, two = await replica(prefix), await replica(prefix)
    try:
        holder = one.new_owner()
        assert await one.try_acquire("b", 1, holder, 0.0)
        first, second = two.new_owner(), one.new_owner()
        waiting_first = asyncio.create_task(two.acquire("b", 1, first, 1.0, timeout_s=5))
        await asyncio.sleep(0.1)  # in line first
        waiting_second = asyncio.create_task(one.acquire("b", 1, second, 2.0, timeout_s=5))
        await asyncio.sleep(0.1)
        newcomer = one.new_owner()
        await one.release("b", holder)
        assert await waiting_first  # woken by the release message, on the other replica
        assert not waiting_second.done()
        # A newcomer does not jump the line while someone waits, even when a slot is free.
        await two.release("b", first)
        assert not await one.try_acquire("b", 1, newcomer, 3.0)
        assert await waiting_second
    finally:
        await one.close()
        await two.close()


async def test_a_wait_that_runs_out_gives_up_its_place(prefix: str) -> None:
    one = await replica(prefix)
    try:
        assert await one.try_acquire("b", 1, one.new_owner(), 0.0)
        assert not await one.acquire("b", 1, one.new_owner(), 1.0, timeout_s=0.3)
        client = aioredis.Redis.from_url(REDIS_URL)
        assert await client.zcard(f"{prefix}:slots:b:waiting") == 0
        await client.aclose()
    finally:
        await one.close()


async def test_the_slots_of_a_replica_that_died_come_back_with_their_lease(prefix: str) -> None:
    dead = SharedSlots.from_url(REDIS_URL, prefix, lease_s=1.0)  # never started: it renews nothing
    assert await dead.try_acquire("b", 1, dead.new_owner(), 0.0)
    alive = await replica(prefix, lease_s=1.0)
    try:
        assert not await alive.acquire("b", 1, alive.new_owner(), 1.0, timeout_s=0.2)
        assert await alive.acquire("b", 1, alive.new_owner(), 1.0, timeout_s=3)  # after ~1 s
    finally:
        await alive.close()
        await dead.client.aclose()


async def test_a_living_replica_keeps_its_slots_past_the_lease(prefix: str) -> None:
    alive = await replica(prefix, lease_s=0.6)
    other = await replica(prefix, lease_s=0.6)
    try:
        assert await alive.try_acquire("b", 1, alive.new_owner(), 0.0)
        await asyncio.sleep(1.5)  # renewed meanwhile
        assert not await other.acquire("b", 1, other.new_owner(), 1.0, timeout_s=0.2)
    finally:
        await alive.close()
        await other.close()


async def test_admission_hears_what_the_other_replicas_hold(prefix: str) -> None:
    one, two = await replica(prefix), await replica(prefix)
    heard: list[dict[str, int]] = []
    two.backends, two.on_counts = ["b"], heard.append
    try:
        assert await one.try_acquire("b", 5, one.new_owner(), 0.0)
        assert await two.try_acquire("b", 5, two.new_owner(), 0.0)
        deadline = asyncio.get_running_loop().time() + 3
        while not heard and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert heard[-1] == {"b": 1}  # two holds one itself; one more is elsewhere
    finally:
        await one.close()
        await two.close()


async def test_a_revocation_reaches_every_replica(prefix: str) -> None:
    one, two = await replica(prefix), await replica(prefix)
    forgot = asyncio.Event()
    two.on_keys_revoked = forgot.set
    try:
        await asyncio.sleep(0.2)  # subscribed
        await one.announce_revocation()
        await asyncio.wait_for(forgot.wait(), 3)
    finally:
        await one.close()
        await two.close()


async def test_redis_away_is_said_plainly() -> None:
    away = SharedSlots.from_url("redis://127.0.0.1:1/0", "icgate-away")
    with pytest.raises(SharedStateDown):
        await away.try_acquire("b", 1, away.new_owner(), 0.0)
    await away.client.aclose()


async def test_a_waiter_that_is_cancelled_leaves_no_place_in_line(prefix: str) -> None:
    one = await replica(prefix)
    try:
        holder = one.new_owner()
        assert await one.try_acquire("b", 1, holder, 0.0)
        waiting = asyncio.create_task(one.acquire("b", 1, one.new_owner(), 1.0, timeout_s=10))
        await asyncio.sleep(0.2)  # in line
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        client = aioredis.Redis.from_url(REDIS_URL)
        assert await client.zcard(f"{prefix}:slots:b:waiting") == 0
        await client.aclose()
        await one.release("b", holder)
        assert await one.try_acquire("b", 1, one.new_owner(), 2.0)  # nobody ahead of a newcomer
    finally:
        await one.close()


def test_an_outage_is_not_asked_again_for_its_pause_and_warns_once_in_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    outage = Outage("the store", retry_s=5.0, warn_every_s=30.0, clock=lambda: now[0])
    assert outage.up
    outage.failed(ConnectionError())
    assert not outage.up
    now[0] += 4.9
    assert not outage.up
    now[0] += 0.2
    assert outage.up  # asked again after its pause
    outage.failed(ConnectionError())  # 5.1 s after the first: no second warning yet
    now[0] += 30.0
    outage.failed(ConnectionError())
    warnings = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert warnings == ["the store does not answer (ConnectionError): counted by this replica alone"] * 2
