"""`InFlight`: the first of identical requests leads, the others wait for what it shares, never longer."""

from __future__ import annotations

import asyncio

import numpy as np

from icgate.cache.store import CacheEntry
from icgate.gateway.store.in_flight import InFlight

KEY = ("tenant-a", "key-1")


def entry(text: str = "hi") -> CacheEntry:
    return CacheEntry(
        id=0,
        namespace=KEY[0],
        exact_key=KEY[1],
        context_fingerprint="",
        embed_text="q",
        prompt_text="q",
        response_text=text,
        response={"choices": [{"message": {"content": text}}]},
        backend="small",
        tier="small",
        prompt_tokens=1,
        completion_tokens=1,
        vector=np.zeros(4, dtype=np.float32),
    )


async def test_followers_get_what_the_leader_shares_and_the_key_is_free_again() -> None:
    flight = InFlight()
    lead = flight.lead(KEY, 60.0)
    assert lead is not None
    assert flight.lead(KEY, 60.0) is None  # an identical request in flight: follow it instead
    waiting = [asyncio.create_task(flight.follow(KEY, 5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    answer = entry()
    lead.share(answer)
    assert await asyncio.gather(*waiting) == [answer, answer, answer]
    assert len(flight) == 0
    assert flight.lead(KEY, 60.0) is not None  # the next identical request leads anew


async def test_nothing_to_follow_returns_at_once_and_other_keys_are_separate() -> None:
    flight = InFlight()
    assert await asyncio.wait_for(flight.follow(KEY, 60.0), 1.0) is None
    lead = flight.lead(KEY, 60.0)
    assert lead is not None
    other_tenant = ("tenant-b", KEY[1])
    assert flight.lead(other_tenant, 60.0) is not None  # another tenant's identical request leads its own
    assert await asyncio.wait_for(flight.follow(("tenant-b", "other"), 60.0), 1.0) is None


async def test_a_leader_with_nothing_to_share_frees_its_followers() -> None:
    flight = InFlight()
    lead = flight.lead(KEY, 60.0)
    assert lead is not None
    waiting = asyncio.create_task(flight.follow(KEY, 5.0))
    await asyncio.sleep(0)
    lead.share(None)
    lead.share(entry())  # settled already: later calls change nothing
    assert await waiting is None
    assert len(flight) == 0


async def test_a_follower_waits_no_longer_than_its_bound_and_leaves_the_leader_alone() -> None:
    flight = InFlight()
    lead = flight.lead(KEY, 60.0)
    assert lead is not None
    assert await flight.follow(KEY, 0.01) is None  # the leader is slow: this one goes on alone
    cancelled = asyncio.create_task(flight.follow(KEY, 5.0))
    await asyncio.sleep(0)
    cancelled.cancel()  # a follower whose client left
    await asyncio.gather(cancelled, return_exceptions=True)
    late = asyncio.create_task(flight.follow(KEY, 5.0))
    await asyncio.sleep(0)
    answer = entry("late")
    lead.share(answer)
    assert await late is answer  # the leader was neither cancelled nor replaced


async def test_a_leader_never_settled_is_taken_for_gone_after_the_bound() -> None:
    now = [0.0]
    flight = InFlight(clock=lambda: now[0])
    lost = flight.lead(KEY, 60.0)  # a leader whose request never settles its handle (a bug, say)
    assert lost is not None
    now[0] = 59.0
    assert flight.lead(KEY, 60.0) is None  # still in flight: follow it
    now[0] = 61.0
    assert await asyncio.wait_for(flight.follow(KEY, 60.0), 1.0) is None  # no waiting on a stale one
    fresh = flight.lead(KEY, 60.0)
    assert fresh is not None  # the next identical request leads anew
    lost.share(None)  # the stale one settling late does not unregister the fresh one
    await asyncio.sleep(0)
    assert len(flight) == 1
    fresh.share(entry())
    await asyncio.sleep(0)
    assert len(flight) == 0
