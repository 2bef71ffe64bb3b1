"""Predicted against actual waits, and refusing at arrival a request that would only give up at its
deadline: on a fake clock (exact numbers, no sleeping)."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from icgate.gateway.backends.admission import AdmissionRefused, Ask, Latency, Relayed
from tests.gateway.backends.test_admission_clock import FakeClock, admission, backend

# Before any measurement: 100 ms to the first token, 10 ms per output token (test_admission_clock).


async def test_a_request_whose_wait_is_already_too_long_is_refused_at_arrival_not_at_its_deadline() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)
    async with adm.hold(a, Ask(10, 100, arrived=clock())):  # predicted to end at 0.1 + 1.0 s
        # Placed without `decide` (a fallback is): its slot would come at 1.1 s, its first token must by
        # 1.0 s. It is refused now, having waited for nothing, rather than held until 0.9 s.
        with pytest.raises(AdmissionRefused) as info:
            async with adm.hold(a, Ask(10, 10, ttft_slo_s=1.0, arrived=clock())):
                pytest.fail("admitted past its objective")
        assert adm.states["a"].waiting == 0
    refused = info.value
    assert (refused.stage, refused.waited_s) == ("arrival", 0.0)
    assert refused.predicted_wait_s == pytest.approx(1.1)
    assert "could not start in time" not in refused.reason  # the words that meant "after queueing"


async def test_a_waiter_refused_at_its_turn_says_how_long_it_waited_and_was_told_it_would() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)

    async def wait_in_line() -> None:
        async with adm.hold(a, Ask(10, 10, ttft_slo_s=1.0, arrived=clock())):
            pytest.fail("granted a slot it could not use in time")

    async with AsyncExitStack() as holding:
        await holding.enter_async_context(adm.hold(a, Ask(10, 10, arrived=clock())))  # ends at 0.2 s
        waiter = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0)
        assert adm.states["a"].waiting == 1  # told it can wait: first token predicted at 0.3 s
        clock.advance(5.0)  # the holder ran long
    with pytest.raises(AdmissionRefused) as info:
        await waiter
    refused = info.value
    assert (refused.stage, refused.waited_s) == ("queued", 5.0)
    assert refused.predicted_wait_s == pytest.approx(0.2)
    assert "could not start in time" in refused.reason
    # What the queue learnt: it waited 4.8 s longer than predicted (at least).
    assert adm.snapshot()["a"]["wait_error_ms"] == pytest.approx(4800)


async def test_an_admitted_waiter_carries_its_predicted_and_actual_wait() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)

    async def waits() -> tuple[float, float]:
        async with adm.hold(a, Ask(10, 10, ttft_slo_s=5.0, arrived=clock())) as job:
            return job.predicted_wait_s, job.queued_s

    async with AsyncExitStack() as holding:
        first = await holding.enter_async_context(adm.hold(a, Ask(10, 10, arrived=clock())))
        assert first.predicted_wait_s == 0.0 and first.queued_s == 0.0  # a free slot: no wait
        waiter = asyncio.create_task(waits())
        await asyncio.sleep(0)
        clock.advance(0.5)
    predicted, actual = await waiter
    assert predicted == pytest.approx(0.2) and actual == 0.5
    assert adm.snapshot()["a"]["wait_error_ms"] == pytest.approx(300)


def test_the_queues_recent_misses_widen_the_wait_a_request_is_told_it_can_afford() -> None:
    clock = FakeClock()
    a = backend()
    careful, trusting = admission(a, clock=clock), admission(a, clock=clock, wait_quantile=None)
    for adm in (careful, trusting):
        adm.states["a"].start_job(Ask(10, 10, arrived=clock()), clock())  # ends at 0.2 s
        for _ in range(20):
            adm.states["a"].wait_error.add(0.2, 0.7, clock())  # recent waits came 0.5 s later than predicted
    late = Ask(10, 10, ttft_slo_s=0.6, arrived=clock())  # slot at 0.2 s, first token at 0.3 s
    assert trusting.place(late, [a]) == (a, False)
    with pytest.raises(AdmissionRefused) as info:
        careful.place(late, [a])
    assert info.value.stage == "arrival"
    assert "500 ms more for the queue's recent misses" in info.value.reason
    assert careful.snapshot()["a"]["wait_margin_ms"] == pytest.approx(500)
    # A request with room now needs no allowance.
    careful.states["a"].jobs.clear()
    assert careful.place(late, [a]) == (a, False)
    # And the misses age: five minutes on, with none since, the queue is trusted again.
    clock.advance(301)
    careful.states["a"].start_job(Ask(10, 10, arrived=clock()), clock())  # ends in 0.2 s
    late = Ask(10, 10, ttft_slo_s=0.6, arrived=clock())
    assert careful.snapshot()["a"]["wait_margin_ms"] == 0
    assert careful.place(late, [a]) == (a, False)


def test_a_stream_is_as_far_along_as_the_tokens_it_has_sent() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)
    state = adm.states["a"]
    job = state.start_job(Ask(10, 100, output_tokens_p90=200, arrived=clock()), clock())
    sent = [1]
    job.produced = lambda: Relayed(sent[0], 4 * sent[0])  # a token a chunk, four characters a token
    assert state.remaining_s(job, clock()) == pytest.approx(0.1 + 1.0)  # no first token yet
    job.first_token_at = 0.1
    clock.advance(2.0)  # twice its predicted time, but it has sent only 40 tokens (a slow batch)
    sent[0] = 40
    assert state.remaining_s(job, clock()) == pytest.approx(0.6)  # 60 tokens of its p50 left
    sent[0] = 150  # past its p50: to its p90
    assert state.remaining_s(job, clock()) == pytest.approx(0.5)


def test_a_wait_longer_than_max_queue_wait_is_refused_at_arrival_too() -> None:
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock, max_queue_wait_s=0.5)
    adm.states["a"].start_job(Ask(10, 100, arrived=clock()), clock())  # ends at 1.1 s
    patient = Ask(10, 10, ttft_slo_s=10.0, arrived=clock())  # its objective allows it; the queue does not
    with pytest.raises(AdmissionRefused) as info:
        adm.place(patient, [a])
    assert info.value.stage == "arrival"
    assert "max_queue_wait_s (0.5 s; predicted 1.1 s)" in info.value.reason
    longer = admission(a, clock=clock, max_queue_wait_s=2)
    longer.states["a"].start_job(Ask(10, 100, arrived=clock()), clock())
    placed = longer.decide(patient, [a])
    assert placed.backend == a and placed.wait_s == pytest.approx(1.1)  # it queues


def test_a_stream_that_sends_several_tokens_a_chunk_is_as_far_along_as_the_text_it_has_sent() -> None:
    """Servers may put several tokens in one chunk (vLLM's stream interval; the bench simulator sends at
    most a chunk per 50 ms). Counted a token a chunk, such a stream looks half as far along as it is, and
    its slot is predicted to free later than it will."""
    clock = FakeClock()
    a = backend()
    state = admission(a, clock=clock).states["a"]
    job = state.start_job(Ask(10, 100, output_tokens_p90=200, arrived=clock()), clock())
    job.first_token_at = clock()
    relayed = [Relayed(20, 160)]  # 20 chunks of two tokens, at the prior's four characters a token
    job.produced = lambda: relayed[0]
    assert state.progress(job, clock())[1] == 40
    assert state.remaining_s(job, clock()) == pytest.approx(0.6)  # 60 tokens at 10 ms, not 80
    relayed[0] = Relayed(30, 60)  # fewer characters than chunks (one-letter tokens): a token a chunk at least
    assert state.progress(job, clock())[1] == 30


async def test_the_characters_a_token_are_learned_from_the_usage_the_backend_reports() -> None:
    """A backend whose tokens are two characters long (code, another language): once its finished
    streams' usage says so, a stream's text is counted at that rate; a stream without usage is counted
    from its text for the time per output token it measures."""
    clock = FakeClock()
    a = backend()
    adm = admission(a, clock=clock)
    state = adm.states["a"]
    assert state.chars_per_token.estimate == pytest.approx(4.0)

    async def stream(chars: int, usage: int | None) -> None:
        async with adm.hold(a, Ask(10, 100, arrived=clock())) as job:
            clock.advance(0.1)
            job.first_token_at = clock()
            clock.advance(1.0)
            job.produced = lambda: Relayed(chars // 6, chars)  # three tokens a chunk
            job.completion_tokens = usage

    for _ in range(64):
        await stream(200, 100)
    # (400 + 64 x 200) / (100 + 64 x 100): the prior weighs as one short answer against 64.
    assert state.chars_per_token.estimate == pytest.approx(13200 / 6500)
    assert adm.snapshot()["a"]["chars_per_token"] == pytest.approx(13200 / 6500)
    for _ in range(10):  # the window keeps the last 64 answers
        await stream(300, 100)
    assert state.chars_per_token.estimate == pytest.approx((400 + 54 * 200 + 10 * 300) / 6500)
    job = state.start_job(Ask(10, 100, arrived=clock()), clock())
    job.first_token_at = clock()
    job.produced = lambda: Relayed(10, 60)
    assert state.progress(job, clock())[1] == pytest.approx(60 / state.chars_per_token.estimate)
    state.jobs.clear()
    # No usage: 200 characters at the learned rate, over the 1 s after the first token.
    tokens = round(200 / state.chars_per_token.estimate)
    state.tpot = Latency(0.5)  # a prior far off: the one sample is the estimate
    await stream(200, None)
    assert tokens > 80
    assert state.tpot.estimate_s == pytest.approx(1.0 / (tokens - 1))  # not 1.0 / 32, a token a chunk
