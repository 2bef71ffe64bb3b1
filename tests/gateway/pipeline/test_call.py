"""The call stage through `Pipeline.run`: placement, spill, open circuits, timeouts and the one fallback."""

from __future__ import annotations

from typing import Any

import pytest

from icgate.gateway.backends.admission import Ask
from icgate.gateway.backends.client import BackendError
from icgate.gateway.config import Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.records import RequestContext
from tests.gateway.pipeline.fakes import HANG, FakeClient, Harness, chat_ctx, harness, make_policy

QUESTION = "What is the capital of Italy?"
IDLE = {"small": 0, "large": 0}


def one_slot_each(**overrides: Any) -> Policy:
    """One slot per backend; before measuring, 500 ms to a first token and 30 ms per output token."""
    return make_policy(
        backends=[
            {"name": "small", "tier": "small", "model": "openai/s", "max_concurrent": 1},
            {"name": "large", "tier": "large", "model": "openai/l", "max_concurrent": 1},
        ],
        **overrides,
    )


def trip(h: Harness, name: str) -> None:
    backend = h.policy.backend(name)
    assert backend is not None
    for _ in range(h.policy.circuit_breaker.failures):
        h.admission.backend_failed(backend)


async def refused(h: Harness, ctx: RequestContext) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(ctx)
    return info.value


async def test_a_routed_request_spills_to_the_other_tier_when_its_own_would_be_late() -> None:
    h = harness(one_slot_each(admission={"ttft_slo_ms": 1000}))
    small = h.policy.backend("small")
    assert small is not None
    # The small backend's one slot is held by an answer predicted to take 0.5 + 500 x 0.03 = 15.5 s.
    async with h.admission.hold(small, Ask(prompt_tokens=10, output_tokens=500)):
        ctx = chat_ctx(QUESTION)
        await h.pipeline.run(ctx)
    assert h.client.backends == ["large"]
    assert (ctx.route, ctx.decisions["spill"]) == ("large", {"from": "small", "to": "large"})
    # what admission saw of the backend it spilled to: idle, first token predicted within the objective
    seen = ctx.decisions["admission"]
    assert (seen["backend"], seen["in_flight"], seen["max_concurrent"], seen["waiting"]) == ("large", 0, 1, 0)
    assert seen["ttft_ms"] <= seen["ttft_slo_ms"] == 1000.0
    assert [(a["backend"], a["role"]) for a in ctx.decisions["attempts"]] == [("large", "spill")]
    assert ctx.decisions["route"]["tier"] == "small"  # what the router chose, before admission
    assert h.metric("icgate_admission_total", {"backend": "large", "outcome": "spilled"}) == 1
    assert h.in_flight() == IDLE


async def test_a_request_no_backend_can_start_in_time_is_refused_at_placement() -> None:
    h = harness(one_slot_each(admission={"ttft_slo_ms": 1000, "spill": False}))
    small = h.policy.backend("small")
    assert small is not None
    async with h.admission.hold(small, Ask(prompt_tokens=10, output_tokens=500)):
        ctx = chat_ctx(QUESTION)
        err = await refused(h, ctx)
    assert (err.status_code, err.code) == (429, "backend_at_capacity")
    assert "time-to-first-token objective" in ctx.decisions["admit"]["refused"]
    assert h.client.backends == [] and h.in_flight() == IDLE
    assert h.metric("icgate_admission_total", {"backend": "small", "outcome": "refused"}) == 1


async def test_a_named_backend_with_an_open_circuit_falls_back_to_a_better_tier() -> None:
    h = harness()
    trip(h, "small")
    ctx = chat_ctx(QUESTION, model="small")
    await h.pipeline.run(ctx)
    assert h.client.backends == ["large"]
    assert ctx.decisions["fallback"] == {"from": "small", "to": "large", "error": "circuit_open"}
    assert (ctx.fallback_from, ctx.route) == ("small", "large")
    assert [(a["backend"], a["role"]) for a in ctx.decisions["attempts"]] == [("large", "fallback")]
    assert "admission" not in ctx.decisions  # never placed: the circuit decided


async def test_a_routed_request_goes_around_an_open_circuit_as_a_spill() -> None:
    h = harness()
    trip(h, "small")
    ctx = chat_ctx(QUESTION)
    await h.pipeline.run(ctx)
    assert h.client.backends == ["large"] and ctx.route == "large"
    assert ctx.decisions["spill"] == {"from": "small", "to": "large"}


async def test_every_circuit_open_is_503_unavailable() -> None:
    h = harness()
    trip(h, "small")
    trip(h, "large")
    ctx = chat_ctx(QUESTION, model="small")
    err = await refused(h, ctx)
    assert (err.status_code, err.code) == (503, "backend_unavailable")
    assert int(err.headers["retry-after"]) >= 1
    assert ctx.decisions["admit"] == {"unavailable": ["small"]}
    assert ctx.decisions["fallback_refused"] == {"to": "large", "reason": "circuit open"}
    assert h.client.backends == []


async def test_a_named_request_never_falls_back_to_a_lower_tier_unless_allowed() -> None:
    h = harness()
    trip(h, "large")
    ctx = chat_ctx(QUESTION, model="large")
    assert (await refused(h, ctx)).status_code == 503
    assert ctx.decisions["fallback_refused"] == {"to": "small", "reason": "lower tier"}

    allowed = harness(make_policy(allow_downgrade=True))
    trip(allowed, "large")
    ctx = chat_ctx(QUESTION, model="large")
    result = await allowed.pipeline.run(ctx)
    assert allowed.client.backends == ["small"]
    assert ctx.decisions["fallback"]["downgraded"] is True
    assert result.headers()["x-icgate-downgraded"] == "true"


async def test_no_fallback_to_a_backend_whose_circuit_is_open() -> None:
    h = harness(client=FakeClient({"small": [BackendError("small", 502, "down", retryable=True)]}))
    trip(h, "large")
    ctx = chat_ctx(QUESTION)
    err = await refused(h, ctx)
    assert (err.status_code, err.code) == (502, "backend_error")
    assert ctx.decisions["fallback_refused"] == {"to": "large", "reason": "circuit open"}
    assert h.client.backends == ["small"] and h.in_flight() == IDLE


async def test_a_backend_that_does_not_answer_in_time_falls_back() -> None:
    policy = make_policy(
        backends=[
            {"name": "small", "tier": "small", "model": "openai/s", "timeout_s": 0.02},
            {"name": "large", "tier": "large", "model": "openai/l"},
        ]
    )
    h = harness(policy, client=FakeClient({"small": [HANG]}))
    ctx = chat_ctx(QUESTION)
    result = await h.pipeline.run(ctx)
    assert result.response is not None and result.response["id"] == "cmpl-large"
    assert ctx.decisions["fallback"] == {"from": "small", "to": "large", "error": "timeout"}
    assert h.metric("icgate_backend_errors_total", {"backend": "small", "kind": "timeout"}) == 1
    assert ctx.backend_s >= 0.02


async def test_a_backend_rate_limit_with_nothing_left_to_try_is_429() -> None:
    limited = [BackendError(n, 429, f"{n} is busy", retryable=True) for n in ("small", "large")]
    h = harness(client=FakeClient({"small": [limited[0]], "large": [limited[1]]}))
    err = await refused(h, chat_ctx(QUESTION))
    assert (err.status_code, err.type, err.code) == (429, "rate_limit_error", "backend_rate_limited")
    assert err.headers == {"retry-after": "1"}
    assert h.client.backends == ["small", "large"]


async def test_every_attempt_is_recorded_in_order_with_its_error_and_what_admission_saw() -> None:
    down = BackendError("small", 500, "The backend 'small' failed (500).", retryable=True)
    h = harness(client=FakeClient({"small": [down]}))
    ctx = chat_ctx(QUESTION)
    await h.pipeline.run(ctx)
    first, second = ctx.decisions["attempts"]
    assert (first["backend"], first["role"], first["outcome"], first["status"]) == (
        "small",
        "first",
        "failed",
        500,
    )
    assert first["error"] == "http_500: The backend 'small' failed (500)." and first["ms"] >= 0
    assert (second["backend"], second["role"], second["outcome"]) == ("large", "fallback", "answered")
    assert ctx.decisions["admission"] == {
        "backend": "small",
        "in_flight": 0,
        "max_concurrent": 2,
        "waiting": 0,
    }
    assert [r.decisions["attempts"] for r in h.log.records] == [ctx.decisions["attempts"]]
