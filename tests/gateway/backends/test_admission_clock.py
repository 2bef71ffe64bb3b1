"""Admission's waits, deadlines and cool-downs driven by a fake clock: no sleeping, exact numbers."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest

from icgate.gateway.backends.admission import (
    Admission,
    AdmissionRefused,
    Ask,
    BackendSignals,
    BackendUnavailable,
)
from icgate.gateway.config import AdmissionConfig, BackendConfig, CircuitBreakerConfig


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def backend(name: str = "a", max_concurrent: int = 1, **kw: Any) -> BackendConfig:
    # Before any measurement: 100 ms to the first token, 10 ms per output token.
    return BackendConfig.model_validate(
        {
            "name": name,
            "model": f"openai/{name}",
            "max_concurrent": max_concurrent,
            "expected_ttft_ms": 100,
            "expected_tpot_ms": 10,
            **kw,
        }
    )


def admission(*backends: BackendConfig, clock: FakeClock, **kw: Any) -> Admission:
    breaker, signals = kw.pop("breaker", None), kw.pop("signals", clock)
    config = AdmissionConfig.model_validate({"max_queue_wait_s": 30, **kw})
    return Admission(list(backends), config, breaker, clock=clock, signals_clock=signals)


async def test_queue_wait_is_measured_on_the_clock() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)

    async def queued_for() -> float:
        async with adm.hold(a, Ask(10, 10, arrived=clock())) as job:
            return job.queued_s

    async with AsyncExitStack() as holding:
        await holding.enter_async_context(adm.hold(a, Ask(10, 10, arrived=clock())))
        waiter = asyncio.create_task(queued_for())
        await asyncio.sleep(0)  # the waiter runs until it waits in the queue
        assert (adm.states["a"].in_flight, adm.states["a"].waiting) == (1, 1)
        clock.advance(2.5)
    assert await waiter == 2.5
    assert (adm.states["a"].in_flight, adm.states["a"].waiting) == (0, 0)


async def test_a_request_past_its_first_token_deadline_is_refused_at_placement() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)
    async with adm.hold(a, Ask(10, 10, arrived=clock())):  # predicted to end at 0.2 s
        late = Ask(10, 10, ttft_slo_s=1.0, arrived=clock())
        assert adm.place(late, [a]) == (a, False)  # it would queue: first token predicted at 0.3 s
        clock.advance(0.9)  # 0.1 s of its objective left; the slot frees in 0.7 s at best
        with pytest.raises(AdmissionRefused) as info:
            adm.place(late, [a])
    assert "objective (1000 ms; predicted 800 ms)" in info.value.reason
    assert info.value.retry_after_s == 1


async def test_a_waiter_whose_first_token_would_be_late_is_refused_at_its_turn() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)

    async def wait_in_line() -> None:
        async with adm.hold(a, Ask(10, 10, ttft_slo_s=1.0, arrived=clock())):
            pytest.fail("granted a slot it could not use in time")

    async with AsyncExitStack() as holding:
        await holding.enter_async_context(adm.hold(a, Ask(10, 10, arrived=clock())))
        waiter = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0)
        assert adm.states["a"].waiting == 1
        clock.advance(5.0)  # the holder ran long: at its turn the waiter is 4 s past its objective
    with pytest.raises(AdmissionRefused) as info:
        await waiter
    assert "could not start in time" in info.value.reason
    assert (adm.states["a"].in_flight, adm.states["a"].waiting) == (0, 0)


async def test_measured_latencies_come_from_the_clock() -> None:
    clock = FakeClock()
    a = backend(max_concurrent=4)
    adm = admission(a, clock=clock)
    async with adm.hold(a, Ask(10, 10, arrived=clock())) as job:
        clock.advance(0.25)
        job.first_token_at = clock()
        clock.advance(1.0)
        job.completion_tokens = 11  # 10 tokens after the first, in 1 s
    state = adm.snapshot()["a"]
    assert state["ttft_ms"] == pytest.approx(250.0)
    assert state["tpot_ms"] == pytest.approx(100.0)


def test_circuit_cool_down_runs_on_the_clock() -> None:
    clock = FakeClock()
    a, b = backend("a"), backend("b")
    adm = admission(a, b, clock=clock, breaker=CircuitBreakerConfig(failures=2, cooldown_s=30))
    adm.backend_failed(a)
    adm.backend_failed(a)
    assert adm.circuits() == {"a": "open", "b": "closed"}
    clock.advance(29)
    with pytest.raises(BackendUnavailable) as info:
        adm.place(Ask(10, 10, arrived=clock()), [a])
    assert info.value.retry_after_s == 1
    assert adm.place(Ask(10, 10, arrived=clock()), [a], [b]) == (b, True)  # spilled around it
    clock.advance(1)
    assert adm.circuits()["a"] == "half_open" and adm.serving()
    assert adm.place(Ask(10, 10, arrived=clock()), [a]) == (a, False)  # the probe
    assert not adm.claim(a)  # one probe at a time, until it is lost for a cool-down
    clock.advance(30)
    assert adm.claim(a)
    adm.backend_succeeded(a)
    assert adm.circuits()["a"] == "closed"


def test_backend_signals_go_stale_on_the_signals_clock() -> None:
    clock, signals = FakeClock(), FakeClock(500.0)
    a = backend(max_concurrent=4)
    adm = admission(a, clock=clock, signals=signals, metrics_stale_s=10)
    adm.note_signals("a", BackendSignals(waiting=4, running=8, kv_usage=0.99, read_at=signals()))
    assert adm.snapshot()["a"]["backend_waiting"] == 4
    with_job = Ask(10, 10, arrived=clock())
    adm.states["a"].start_job(with_job, clock())
    assert not adm.has_room(adm.states["a"], with_job, clock())  # the backend's KV cache is full
    signals.advance(10.5)
    assert adm.snapshot()["a"]["backend_waiting"] is None
    assert adm.has_room(adm.states["a"], with_job, clock())
