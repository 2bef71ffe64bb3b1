"""Admission decisions and queueing on plain asyncio (the HTTP path: test_admission_api.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from icgate.gateway.backends.admission import (
    Admission,
    AdmissionRefused,
    Ask,
    BackendSignals,
    BackendUnavailable,
    Job,
    Placement,
    TtftModel,
    Waiter,
)
from icgate.gateway.config import AdmissionConfig, BackendConfig, CircuitBreakerConfig


def backend(name: str, max_concurrent: int = 4, tier: str = "small", **kw: Any) -> BackendConfig:
    return BackendConfig.model_validate(
        {"name": name, "tier": tier, "model": f"openai/{name}", "max_concurrent": max_concurrent, **kw}
    )


def ask(output: int = 100, rank: int = 0, slo_ms: float | None = None, prompt: int = 10) -> Ask:
    return Ask(prompt, output, rank=rank, ttft_slo_s=slo_ms / 1000 if slo_ms else None)


def admission(*backends: BackendConfig, **config: Any) -> Admission:
    return Admission(list(backends), AdmissionConfig.model_validate(config))


def test_place_prefers_a_backend_with_room_then_the_least_utilised() -> None:
    a, b = backend("a", 1), backend("b", 4)
    adm = admission(a, b)
    assert adm.place(ask(), [a, b]) == (a, False)
    adm.states["a"].jobs.add(_job())
    assert adm.place(ask(), [a, b]) == (b, False)


async def test_hold_never_exceeds_max_concurrent_and_reports_queue_time() -> None:
    a = backend("a", max_concurrent=3)
    adm = admission(a, max_queue_wait_s=5)
    observed: list[int] = []
    queued: list[float] = []

    async def one() -> None:
        async with adm.hold(a, ask()) as job:
            queued.append(job.queued_s)
            for _ in range(3):
                observed.append(adm.states["a"].in_flight)
                await asyncio.sleep(0.002)

    await asyncio.gather(*(one() for _ in range(30)))
    assert max(observed) == 3
    assert sorted(queued)[:3] == [0.0, 0.0, 0.0]  # the first three never waited
    assert max(queued) > 0.01  # the last ones did, and it was measured
    assert adm.states["a"].in_flight == 0 and adm.states["a"].waiting == 0


async def served_order(adm: Admission, a: BackendConfig, arrivals: list[tuple[str, Ask, float]]) -> list[str]:
    """Hold the backend's only slot, queue `arrivals` (name, request, seconds before the next), then
    free the slot: the order in which they were served."""
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with adm.hold(a, ask()):
            await release.wait()

    async def waiter(name: str, request: Ask) -> None:
        async with adm.hold(a, request):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = []
    for name, request, pause in arrivals:
        tasks.append(asyncio.create_task(waiter(name, request)))
        await asyncio.sleep(pause)
    await asyncio.sleep(0.01)
    assert adm.states[a.name].waiting == len(arrivals)
    release.set()
    await asyncio.gather(first, *tasks)
    return order


async def test_queue_serves_higher_class_then_shortest_predicted_output_first() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue_wait_s=5, ageing_tokens_per_s=0)
    arrivals = [
        ("batch-short", ask(output=10, rank=1), 0.0),
        ("long", ask(output=500), 0.0),
        ("short", ask(output=20), 0.0),
        ("medium", ask(output=100), 0.0),
    ]
    assert await served_order(adm, a, arrivals) == ["short", "medium", "long", "batch-short"]


async def test_ageing_lets_a_long_request_overtake_newer_short_ones() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue_wait_s=5, ageing_tokens_per_s=10_000)
    # 0.1 s at 10k tokens/s ages the long one by 1000 tokens: by then "shorter" than 20.
    arrivals = [("long", ask(output=500), 0.1), ("short", ask(output=20), 0.0)]
    assert await served_order(adm, a, arrivals) == ["long", "short"]


def test_wait_estimate_plays_in_flight_and_queue_forward_over_the_slots() -> None:
    a = backend("a", max_concurrent=2, expected_ttft_ms=100, expected_tpot_ms=10)
    adm = admission(a)
    state = adm.states["a"]
    now = time.perf_counter()
    # Two in flight, predicted to end in ~0.6 s and ~1.1 s (0.1 s + 50 or 100 tokens at 10 ms).
    state.jobs.update({_job(output=50, started=now), _job(output=100, started=now)})
    wait = adm.wait_s(state, ask(output=10), now)
    assert wait == pytest.approx(0.6, abs=0.01)
    # One queued ahead (service 0.1 + 0.3 s) takes the slot that frees at 0.6 s and ends at 1.0 s,
    # before the other in-flight request (1.1 s): ours starts at 1.0 s.
    state.waiters.append(_waiter(adm, ask(output=30), now))
    assert adm.wait_s(state, ask(output=100), now) == pytest.approx(1.0, abs=0.01)
    # A higher class is not behind that waiter.
    assert adm.wait_s(state, ask(output=100, rank=-1), now) == pytest.approx(0.6, abs=0.01)
    assert adm.ttft_s(state, ask(output=10), now) == pytest.approx(0.7, abs=0.01)


def test_a_waiter_is_not_overtaken_into_missing_its_objective() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=1, expected_tpot_ms=10)
    adm = admission(a, ageing_tokens_per_s=0)
    state = adm.states["a"]
    now = time.perf_counter()
    state.jobs.add(_job(output=50, started=now))  # frees the slot at ~0.5 s
    long = _waiter(adm, ask(output=100), now)
    long.latest_start = now + 1.0  # told it could start by 1.0 s (it would at 0.5 s)
    state.waiters.append(long)
    # A shorter newcomer may go first while the long one still starts in time (0.8 s)...
    pos, start = adm._plan(state, ask(output=30), now)
    assert (pos, start) == (0, pytest.approx(0.5, abs=0.01))
    state.waiters.insert(0, _waiter(adm, ask(output=30), now))
    # ...but a second one would push it to 1.1 s: it queues behind the long one instead.
    pos, start = adm._plan(state, ask(output=30), now)
    assert (pos, start) == (2, pytest.approx(1.8, abs=0.01))
    # Without an objective, the long one can be overtaken as far as shortest-first says.
    long.latest_start = None
    assert adm._plan(state, ask(output=30), now)[0] == 1


def test_overtaking_allows_for_the_queues_recent_misses() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=1, expected_tpot_ms=10)
    adm = admission(a, ageing_tokens_per_s=0, wait_quantile=0.9)
    state = adm.states["a"]
    now = time.perf_counter()
    state.jobs.add(_job(output=50, started=now))  # frees the slot at ~0.5 s
    long = _waiter(adm, ask(output=100), now)
    long.latest_start = now + 1.0  # overtaken by one short request, it would start at 0.8 s
    state.waiters.append(long)
    for _ in range(20):  # recent waits came 0.1 s later than predicted: a margin of 0.1 s
        state.wait_error.add(0.2, 0.3, now)
    assert adm._plan(state, ask(output=30), now)[0] == 0  # 0.8 s + 0.1 s is still in time
    for _ in range(20):  # now half came 0.3 s later: the 0.9 quantile is 0.3 s
        state.wait_error.add(0.2, 0.5, now)
    assert state.wait_error.margin_s(0.9, now) == pytest.approx(0.3)
    pos, start = adm._plan(state, ask(output=30), now)  # 0.8 s + 0.3 s would not be: it goes behind
    assert (pos, start) == (1, pytest.approx(1.5, abs=0.01))


def test_time_to_first_token_grows_with_the_prompt_tokens_to_prefill() -> None:
    model = TtftModel(prior_s=0.5)
    assert model.estimate_s(4000) == 0.5  # the prior until it has samples
    for tokens in (100, 500, 1000, 2000, 4000, 300, 800, 1500):
        model.add(tokens, 0.02 + 0.0001 * tokens)
    assert model.estimate_s(1000) == pytest.approx(0.12, abs=0.005)
    assert model.estimate_s(8000) == pytest.approx(0.82, abs=0.02)
    flat = TtftModel(prior_s=0.5)
    for tokens in (100, 500, 1000, 2000, 4000, 300, 800, 1500):
        flat.add(tokens, 0.3 - 0.00001 * tokens)  # noise that slopes down: no negative cost per token
    assert flat.estimate_s(100_000) == pytest.approx(0.3 - 0.00001 * 1275, abs=0.01)


async def test_queued_request_waits_for_the_prompts_prefilling_ahead_of_it() -> None:
    a = backend("a", max_concurrent=4, expected_ttft_ms=100)
    adm = admission(a)
    state = adm.states["a"]
    for tokens in (100, 500, 1000, 2000, 4000, 300, 800, 1500):
        state.ttft.add(tokens, 0.0001 * tokens)
    async with adm.hold(a, ask(prompt=3000)) as first:
        assert first.prefill_tokens == 3000
        async with adm.hold(a, ask(prompt=1000)) as second:
            assert second.prefill_tokens == 4000  # the first is still prefilling
            now = time.perf_counter()
            assert adm.ttft_s(state, ask(prompt=1000), now) == pytest.approx(0.5, abs=0.02)
            first.first_token_at = second.first_token_at = time.perf_counter()
            assert adm.ttft_s(state, ask(prompt=1000), now) == pytest.approx(0.1, abs=0.02)


async def test_a_waiter_whose_first_token_would_be_late_is_refused_at_its_turn() -> None:
    a = backend("a", max_concurrent=2)
    adm = admission(a, max_queue_wait_s=30)
    state = adm.states["a"]
    for tokens in (100, 500, 1000, 2000, 4000, 300, 800, 1500):
        state.ttft.add(tokens, 0.0001 * tokens)  # 0.1 ms a prompt token
    release = asyncio.Event()

    async def holder(prompt: int, first_token: bool, output: int = 100) -> None:
        async with adm.hold(a, ask(prompt=prompt, output=output)) as job:
            if first_token:
                job.first_token_at = time.perf_counter()
            await release.wait()

    # A short answer decoding (it should end in ~0.3 s: the waiter is told it can wait) and a long prompt.
    decoding = asyncio.create_task(holder(10, first_token=True, output=10))
    prefilling = asyncio.create_task(holder(20_000, first_token=False))  # ~2 s to its first token
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    waiter = asyncio.create_task(adm.hold(a, ask(prompt=1000, slo_ms=2000)).__aenter__())
    await asyncio.sleep(0.05)
    assert state.waiting == 1
    # The decoding request ends: the slot is free, but behind 20k prompt tokens the waiter's first
    # token would come after ~2.1 s, past its objective. Refused now, not admitted into a miss.
    decoding.cancel()
    with pytest.raises(AdmissionRefused) as info:
        await waiter
    assert info.value.stage == "queued"
    assert time.perf_counter() - started < 1.0
    assert state.waiting == 0 and state.in_flight == 1
    release.set()
    await prefilling
    assert state.in_flight == 0


def test_an_overrunning_job_is_expected_to_run_on() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=1, expected_tpot_ms=10)
    adm = admission(a)
    state = adm.states["a"]
    now = time.perf_counter()
    job = Job(Ask(10, 100, output_tokens_p90=200), started=now - 5.0)  # p50 end 1 s, p90 end 2 s ago
    assert state.remaining_s(job, now) == pytest.approx(3.0, abs=0.01)  # overran its p90 by 3 s
    fresh = Job(Ask(10, 100, output_tokens_p90=200), started=now - 1.5)  # past p50, not p90
    assert state.remaining_s(fresh, now) == pytest.approx(0.5, abs=0.01)


def test_place_refuses_when_no_candidate_can_meet_the_objective() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=100, expected_tpot_ms=10)
    adm = admission(a)
    adm.states["a"].jobs.add(_job(output=300))  # busy for ~3.1 s
    assert adm.place(ask(slo_ms=5000), [a]) == (a, False)  # it can wait
    with pytest.raises(AdmissionRefused) as info:
        adm.place(ask(slo_ms=1500), [a])
    refused = info.value
    assert refused.backend == "a"
    assert refused.retry_after_s >= 2  # ~3.2 s predicted against 1.5 s: retry in about 2 s
    assert "1500 ms" in refused.reason


def test_decide_says_what_it_saw_of_the_backend_it_chose() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=100, expected_tpot_ms=10)
    b = backend("b", max_concurrent=2, tier="large")
    adm = admission(a, b)
    assert adm.decide(ask(slo_ms=5000), [a]) == Placement(a, False, 0, 0)  # a free slot: no prediction needed
    adm.states["a"].jobs.add(_job(output=300))  # busy for ~3.1 s
    placed = adm.decide(ask(slo_ms=5000), [a])
    assert (placed.backend, placed.spilled, placed.in_flight, placed.waiting) == (a, False, 1, 0)
    assert placed.ttft_s == pytest.approx(3.2, abs=0.1)  # the prediction it decided on, kept
    spilled = adm.decide(ask(slo_ms=1000), [a], spill=[b])
    assert (spilled.backend, spilled.spilled, spilled.in_flight) == (b, True, 0)
    for _ in range(5):
        adm.backend_failed(a)  # its circuit opens: the spill candidate stands in
    assert adm.decide(ask(), [a], spill=[b]) == Placement(b, True, 0, 0)


def test_margin_keeps_part_of_the_objective_in_reserve() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=100, expected_tpot_ms=10)
    job = _job(output=120)  # busy ~1.3 s: first token predicted at ~1.4 s
    exact, careful = admission(a), admission(a, ttft_margin=0.1)
    exact.states["a"].jobs.add(job)
    careful.states["a"].jobs.add(job)
    assert exact.place(ask(slo_ms=1500), [a]) == (a, False)
    with pytest.raises(AdmissionRefused):
        careful.place(ask(slo_ms=1500), [a])  # aims at 1350 ms


def test_place_spills_a_routed_request_to_the_other_tier_only_when_that_meets_the_objective() -> None:
    small = backend("small", 1, expected_ttft_ms=50, expected_tpot_ms=5)
    large = backend("large", 1, tier="large", expected_ttft_ms=100, expected_tpot_ms=10)
    adm = admission(small, large)
    adm.states["large"].jobs.add(_job(output=300))
    assert adm.place(ask(slo_ms=1000), [large], spill=[small]) == (small, True)
    adm.states["small"].jobs.add(_job(output=400))  # small busy ~2 s as well
    with pytest.raises(AdmissionRefused):
        adm.place(ask(slo_ms=1000), [large], spill=[small])
    assert adm.place(ask(slo_ms=1000_000), [large], spill=[small]) == (large, False)


def test_without_an_objective_a_saturated_backend_queues_rather_than_refusing() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a)
    adm.states["a"].jobs.add(_job(output=10_000))
    assert adm.place(ask(), [a]) == (a, False)


def test_a_full_queue_refuses() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue=1)
    adm.states["a"].jobs.add(_job())
    adm.states["a"].waiters.append(_waiter(adm, ask(), time.perf_counter()))
    with pytest.raises(AdmissionRefused, match="queued"):
        adm.place(ask(slo_ms=60_000), [a])


async def test_queued_request_is_refused_once_it_can_no_longer_meet_its_objective() -> None:
    a = backend("a", max_concurrent=1, expected_ttft_ms=100)
    adm = admission(a, max_queue_wait_s=30)
    async with adm.hold(a, ask(output=5)):  # predicted to end in 0.25 s; it holds the slot longer
        started = time.perf_counter()
        with pytest.raises(AdmissionRefused) as info:
            async with adm.hold(a, ask(slo_ms=400)):  # told it can wait: first token predicted at 0.35 s
                pytest.fail("admitted past its objective")
        waited = time.perf_counter() - started
    assert 0.25 <= waited < 2.0  # gave up at 0.4 s - 0.1 s predicted first token, not at 30 s
    assert info.value.stage == "queued"
    assert info.value.waited_s == pytest.approx(waited, abs=0.05)
    assert adm.states["a"].waiting == 0 and adm.states["a"].in_flight == 0


@pytest.mark.parametrize("max_wait", [0.05, 1.2])
async def test_waiting_longer_than_max_queue_wait_is_refused(max_wait: float) -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue_wait_s=max_wait)
    async with adm.hold(a, ask()):
        started = time.perf_counter()
        with pytest.raises(AdmissionRefused) as info:
            async with adm.hold(a, ask()):
                pytest.fail("admitted past the limit")
        assert time.perf_counter() - started >= max_wait * 0.9
    assert info.value.retry_after_s >= 1
    async with adm.hold(a, ask()) as job:  # the refused request left nothing behind
        assert job.queued_s == 0


async def test_zero_queue_wait_admits_when_a_slot_is_free() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue_wait_s=0)
    async with adm.hold(a, ask()) as job:
        assert job.queued_s == 0
        with pytest.raises(AdmissionRefused):
            async with adm.hold(a, ask()):
                pass


async def test_slot_released_on_exception_and_cancelled_waiter_leaves_no_trace() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, max_queue_wait_s=5)
    with pytest.raises(RuntimeError):
        async with adm.hold(a, ask()):
            raise RuntimeError("backend call failed")
    assert adm.states["a"].in_flight == 0
    async with adm.hold(a, ask()):
        task = asyncio.create_task(adm.hold(a, ask()).__aenter__())
        await asyncio.sleep(0.01)
        assert adm.states["a"].waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.states["a"].waiting == 0
    assert adm.states["a"].in_flight == 0
    async with adm.hold(a, ask()) as job:
        assert job.queued_s == 0


async def test_finished_requests_teach_time_to_first_token_and_per_token() -> None:
    a = backend("a", expected_ttft_ms=1000, expected_tpot_ms=1000)
    adm = admission(a)
    async with adm.hold(a, ask()) as job:
        await asyncio.sleep(0.05)
        job.first_token_at = time.perf_counter()
        await asyncio.sleep(0.05)
        job.completion_tokens = 11
    state = adm.states["a"]
    assert 0.04 <= state.ttft.estimate_s(10) < 0.5
    assert 0.004 <= state.tpot.estimate_s < 0.05  # ~0.05 s over 10 tokens
    snapshot = adm.snapshot()["a"]
    assert snapshot["served"] == 1 and snapshot["in_flight"] == 0


def test_fresh_backend_signals_count_and_stale_ones_do_not() -> None:
    a = backend("a", max_concurrent=2, expected_ttft_ms=100, expected_tpot_ms=10)
    adm = admission(a, metrics_stale_s=5)
    state = adm.states["a"]
    now = time.perf_counter()
    adm.note_signals("a", BackendSignals(waiting=4, running=8, kv_usage=0.5, read_at=time.monotonic()))
    # Four requests queued inside the backend, ~1.1 s each over 2 slots, come first.
    assert adm.wait_s(state, ask(output=100), now) == pytest.approx(2.2, abs=0.05)
    adm.note_signals("a", BackendSignals(waiting=0, running=2, kv_usage=0.99, read_at=time.monotonic()))
    state.jobs.add(_job(output=10, started=now))
    assert not adm.has_room(state, ask(), now)  # KV cache full: hold new work
    adm.note_signals("a", BackendSignals(waiting=9, running=2, kv_usage=0.99, read_at=time.monotonic() - 60))
    assert adm.has_room(state, ask(), now)
    assert adm.wait_s(state, ask(output=100), now) == 0
    assert adm.snapshot()["a"]["backend_waiting"] is None


def test_tokens_in_flight_limit_holds_new_work() -> None:
    a = backend("a", max_concurrent=8, max_tokens_in_flight=1000)
    adm = admission(a)
    state = adm.states["a"]
    state.jobs.add(_job(output=500, prompt=300))
    now = time.perf_counter()
    assert adm.has_room(state, ask(output=100, prompt=100), now)
    assert not adm.has_room(state, ask(output=100, prompt=200), now)


async def test_disabled_admission_commits_everything_at_once() -> None:
    a = backend("a", max_concurrent=1)
    adm = admission(a, enabled=False, ttft_slo_ms=1)
    held = []
    async with adm.hold(a, ask()) as one, adm.hold(a, ask()) as two:
        held = [one.queued_s, two.queued_s]
        assert adm.states["a"].in_flight == 2
        assert adm.place(ask(slo_ms=1), [a]) == (a, False)
    assert held == [0.0, 0.0]


def _job(output: int = 100, prompt: int = 10, started: float | None = None) -> Job:
    return Job(ask(output=output, prompt=prompt), started if started is not None else time.perf_counter())


def _waiter(adm: Admission, request: Ask, now: float) -> Waiter:
    """A queued request, as data (its future is never awaited)."""
    loop = asyncio.new_event_loop()
    try:
        return Waiter(request, next(adm._seq), now, loop.create_future())
    finally:
        loop.close()


# --- the circuit breaker ------------------------------------------------------------------------------


def breaker_admission(*backends: BackendConfig, **breaker: Any) -> Admission:
    return Admission(list(backends), AdmissionConfig(), CircuitBreakerConfig.model_validate(breaker))


def test_circuit_opens_after_consecutive_failures_and_the_backend_is_skipped() -> None:
    a, b = backend("a"), backend("b")
    adm = breaker_admission(a, b, failures=3, cooldown_s=60)
    for _ in range(2):
        adm.backend_failed(a)
    assert adm.place(ask(), [a, b])[0] == a  # still closed: two failures are not three
    adm.backend_succeeded(a)  # a success resets the count
    for _ in range(3):
        adm.backend_failed(a)
    assert adm.circuits() == {"a": "open", "b": "closed"}
    assert adm.place(ask(), [a, b]) == (b, False)
    assert adm.snapshot()["a"]["circuit_open"] == 1 and adm.snapshot()["b"]["circuit_open"] == 0
    assert adm.serving()


def test_circuit_opens_on_a_failure_ratio_over_its_window() -> None:
    a = backend("a")
    adm = breaker_admission(a, failures=100, failure_ratio=0.5, window=10, min_calls=10)
    for n in range(10):
        adm.backend_failed(a) if n % 2 else adm.backend_succeeded(a)
    assert adm.circuits()["a"] == "open"


def test_an_open_tier_spills_and_with_nothing_left_the_backend_is_unavailable() -> None:
    a, b = backend("a"), backend("b", tier="large")
    adm = breaker_admission(a, b, failures=1, cooldown_s=60)
    adm.backend_failed(a)
    assert adm.place(ask(), [a], spill=[b]) == (b, True)
    with pytest.raises(BackendUnavailable) as info:
        adm.place(ask(), [a])
    assert info.value.backends == ["a"] and 1 <= info.value.retry_after_s <= 60
    adm.backend_failed(b)
    assert not adm.serving()


def test_half_open_lets_one_probe_through_which_closes_or_reopens() -> None:
    a = backend("a")
    adm = breaker_admission(a, failures=1, cooldown_s=0.05)
    adm.backend_failed(a)
    assert not adm.available(a)
    time.sleep(0.06)
    assert adm.circuits()["a"] == "half_open" and adm.available(a)
    assert adm.place(ask(), [a])[0] == a  # the probe
    assert not adm.available(a) and not adm.claim(a)  # one probe at a time
    adm.backend_failed(a)
    assert adm.circuits()["a"] == "open"
    time.sleep(0.06)
    assert adm.claim(a)
    adm.backend_neutral(a)  # a client's error says nothing: the next request may probe
    assert adm.claim(a)
    adm.backend_succeeded(a)
    assert adm.circuits()["a"] == "closed" and adm.available(a)


def test_a_disabled_breaker_never_opens() -> None:
    a = backend("a")
    adm = breaker_admission(a, enabled=False, failures=1)
    for _ in range(5):
        adm.backend_failed(a)
    assert adm.available(a) and adm.place(ask(), [a])[0] == a
