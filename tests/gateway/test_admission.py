"""Choosing a backend of a tier and holding its concurrency slots."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import AdmissionRefused, BackendLoad, BackendPool
from gateway.config import BackendConfig


def backend(name: str, max_concurrent: int = 4) -> BackendConfig:
    return BackendConfig.model_validate(
        {"name": name, "model": f"openai/{name}", "max_concurrent": max_concurrent}
    )


def test_utilisation_counts_in_flight_and_waiting() -> None:
    load = BackendLoad(backend("a", max_concurrent=4), in_flight=2, waiting=1)
    assert load.utilisation == pytest.approx(0.75)


def test_choose_picks_the_least_utilised() -> None:
    a, b, c = backend("a", 4), backend("b", 10), backend("c", 2)
    pool = BackendPool([a, b, c], max_queue_wait_s=1)
    pool.loads["a"].in_flight = 2  # 0.5
    pool.loads["b"].in_flight = 3  # 0.3
    pool.loads["c"].waiting = 1  # 0.5
    assert pool.choose([a, b, c]) == b
    pool.loads["b"].waiting = 3  # 0.6
    assert pool.choose([a, b, c]) == a  # tie between a and c: policy order
    assert pool.choose([c, a]) == c
    assert pool.choose([b]) == b


async def test_choose_follows_slots_taken_through_admit() -> None:
    a, b = backend("a", 2), backend("b", 2)
    pool = BackendPool([a, b], max_queue_wait_s=1)
    assert pool.choose([a, b]) == a
    async with pool.admit(a):
        assert pool.choose([a, b]) == b
        async with pool.admit(b), pool.admit(b):
            assert pool.choose([a, b]) == a
    assert pool.choose([a, b]) == a


async def test_admit_never_exceeds_max_concurrent() -> None:
    a = backend("a", max_concurrent=3)
    pool = BackendPool([a], max_queue_wait_s=5)
    observed: list[int] = []
    waits: list[float] = []

    async def one() -> None:
        async with pool.admit(a) as waited:
            waits.append(waited)
            for _ in range(3):
                observed.append(pool.loads["a"].in_flight)
                await asyncio.sleep(0.001)

    await asyncio.gather(*(one() for _ in range(30)))
    assert max(observed) == 3
    assert len(waits) == 30
    assert pool.loads["a"].in_flight == 0 and pool.loads["a"].waiting == 0


async def test_queue_wait_is_reported() -> None:
    a = backend("a", max_concurrent=1)
    pool = BackendPool([a], max_queue_wait_s=5)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> float:
        async with pool.admit(a) as waited:
            holding.set()
            await release.wait()
            return waited

    async def waiter() -> float:
        async with pool.admit(a) as waited:
            return waited

    held = asyncio.create_task(holder())
    await holding.wait()
    queued = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    assert pool.loads["a"].waiting == 1 and pool.loads["a"].in_flight == 1
    await asyncio.sleep(0.09)
    release.set()
    assert await held < 0.05
    assert 0.1 <= await queued < 2.0
    assert pool.loads["a"].in_flight == 0 and pool.loads["a"].waiting == 0


@pytest.mark.parametrize("max_wait", [0.05, 1.2])
async def test_waiting_longer_than_max_queue_wait_is_refused(max_wait: float) -> None:
    a = backend("a", max_concurrent=1)
    pool = BackendPool([a], max_queue_wait_s=max_wait)
    async with pool.admit(a):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AdmissionRefused) as info:
            async with pool.admit(a):
                pytest.fail("admitted past the limit")
        assert loop.time() - started >= max_wait * 0.9
    refused = info.value
    assert refused.backend == "a"
    assert refused.retry_after_s >= 1
    assert refused.retry_after_s >= max_wait
    assert "a" in refused.reason
    assert pool.loads["a"].in_flight == 0 and pool.loads["a"].waiting == 0
    async with pool.admit(a) as waited:  # the refused request left nothing behind
        assert waited < 0.05


async def test_zero_queue_wait_admits_when_a_slot_is_free() -> None:
    # `max_queue_wait_s: 0` (allowed by the policy schema) means "never queue": an idle
    # backend must still take the request, and only a saturated one refuses it.
    a = backend("a", max_concurrent=1)
    pool = BackendPool([a], max_queue_wait_s=0)
    async with pool.admit(a) as waited:
        assert waited == pytest.approx(0, abs=0.05)
        with pytest.raises(AdmissionRefused):
            async with pool.admit(a):
                pass


async def test_slot_released_on_exception() -> None:
    a = backend("a", max_concurrent=1)
    pool = BackendPool([a], max_queue_wait_s=0.05)
    with pytest.raises(RuntimeError):
        async with pool.admit(a):
            assert pool.loads["a"].in_flight == 1
            raise RuntimeError("backend call failed")
    assert pool.loads["a"].in_flight == 0
    async with pool.admit(a) as waited:  # would be refused if the slot had leaked
        assert pool.loads["a"].in_flight == 1
        assert waited < 0.05


async def test_cancelled_waiter_leaves_no_trace() -> None:
    a = backend("a", max_concurrent=1)
    pool = BackendPool([a], max_queue_wait_s=5)
    async with pool.admit(a):
        task = asyncio.create_task(pool.admit(a).__aenter__())
        await asyncio.sleep(0.01)
        assert pool.loads["a"].waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.loads["a"].waiting == 0
    assert pool.loads["a"].in_flight == 0
    async with pool.admit(a) as waited:
        assert waited < 0.05


async def test_backends_have_independent_slots() -> None:
    a, b = backend("a", 1), backend("b", 1)
    pool = BackendPool([a, b], max_queue_wait_s=0.05)
    async with pool.admit(a), pool.admit(b) as waited:
        assert waited < 0.05
        assert (pool.loads["a"].in_flight, pool.loads["b"].in_flight) == (1, 1)
