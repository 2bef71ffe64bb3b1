"""What the request log keeps of admission's waits: the wait it predicted, the wait there was, and when a
429 came (at arrival, or after queueing), through `Pipeline.run` on a fake admission clock."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from icgate.gateway.backends.admission import Admission, Ask
from icgate.gateway.errors import GatewayError
from icgate.gateway.records import RequestContext
from tests.gateway.backends.test_admission_clock import FakeClock
from tests.gateway.pipeline.fakes import Harness, chat_ctx, harness, make_policy


def one_slot(ttft_slo_ms: float) -> tuple[Harness, FakeClock]:
    """One slot on `small`; before measuring, 500 ms to a first token and 30 ms a token. Admission's clock
    starts at the real one (the request's arrival is real) and moves only when the test says."""
    policy = make_policy(
        backends=[{"name": "small", "tier": "small", "model": "openai/s", "max_concurrent": 1}],
        admission={"ttft_slo_ms": ttft_slo_ms, "spill": False},
    )
    clock = FakeClock(time.perf_counter())
    adm = Admission(policy.backends, policy.admission, policy.circuit_breaker, clock=clock)
    return harness(policy, admission=adm), clock


async def run_behind_a_holder(h: Harness, clock: FakeClock, hold_s: float) -> tuple[RequestContext, Any]:
    """A request to `small` while its slot is held by an answer predicted to take 0.5 + 10 x 0.03 = 0.8 s,
    which holds it `hold_s` of the fake clock: its context, and the 429 if it got one."""
    small = h.policy.backend("small")
    assert small is not None
    ctx = chat_ctx("What is the capital of Italy?", model="small")
    async with AsyncExitStack() as holding:
        await holding.enter_async_context(h.admission.hold(small, Ask(10, 10, arrived=clock())))
        task = asyncio.create_task(h.pipeline.run(ctx))
        for _ in range(20):  # until it waits in the queue (or was refused)
            await asyncio.sleep(0)
        clock.advance(hold_s)
    try:
        await task
    except GatewayError as err:
        return ctx, err
    return ctx, None


async def test_an_admitted_request_logs_its_predicted_and_actual_wait() -> None:
    h, clock = one_slot(ttft_slo_ms=3000)
    ctx, err = await run_behind_a_holder(h, clock, hold_s=0.3)
    assert err is None
    admit = ctx.decisions["admit"]
    assert admit["predicted_wait_ms"] == pytest.approx(800, abs=1)  # the holder's predicted end
    assert admit["queue_ms"] == pytest.approx(300)  # it freed sooner
    assert ctx.decisions["admission"]["wait_ms"] == pytest.approx(800, abs=1)  # what `decide` saw
    (row,) = h.log.records
    assert row.decisions["admit"] == admit and row.queue_ms == pytest.approx(300)


async def test_a_request_refused_at_arrival_is_logged_and_told_so() -> None:
    h, clock = one_slot(ttft_slo_ms=1000)  # 0.8 s wait + 0.5 s to its first token: cannot make it
    ctx, err = await run_behind_a_holder(h, clock, hold_s=0.3)
    assert err is not None and (err.status_code, err.code) == (429, "backend_at_capacity")
    assert err.headers["x-icgate-refused"] == "arrival"
    admit = ctx.decisions["admit"]
    assert (admit["at"], admit["waited_ms"]) == ("arrival", 0.0)
    assert admit["predicted_wait_ms"] == pytest.approx(800, abs=1)
    (row,) = h.log.records
    assert (row.status_code, row.decisions["admit"]) == (429, admit)
    assert row.queue_ms == pytest.approx(admit["waited_ms"])  # queue time, not the gateway's overhead


async def test_a_request_refused_after_queueing_is_logged_and_told_so() -> None:
    h, clock = one_slot(ttft_slo_ms=1500)  # 0.8 s wait + 0.5 s: told it can wait
    ctx, err = await run_behind_a_holder(h, clock, hold_s=2.0)  # the holder ran long
    assert err is not None and (err.status_code, err.code) == (429, "backend_at_capacity")
    assert err.headers["x-icgate-refused"] == "queued"
    assert "could not start in time" in err.message
    admit = ctx.decisions["admit"]
    assert admit["at"] == "queued"
    assert admit["waited_ms"] == pytest.approx(2000)
    assert admit["predicted_wait_ms"] == pytest.approx(800, abs=1)
    (row,) = h.log.records
    assert (row.status_code, row.decisions["admit"]) == (429, admit)
    assert row.queue_ms == pytest.approx(admit["waited_ms"])  # queue time, not the gateway's overhead
