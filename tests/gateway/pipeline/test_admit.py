"""The admit stage on plain data: what admission is asked, and where a request may go."""

from __future__ import annotations

from typing import Any

import pytest

from icgate.gateway.backends.admission import AdmissionRefused, BackendUnavailable
from icgate.gateway.config import Policy, PriorityClass
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.admit import (
    ask_for,
    candidates_for,
    priority_of,
    refusal,
    spill_candidates,
    unavailable,
)
from icgate.gateway.pipeline.route import RouteOutcome
from icgate.gateway.pipeline.target import Target, resolve_target
from icgate.gateway.records import Tenant
from icgate.lengths.predict import LengthEstimate
from icgate.routers.base import RouteDecision
from tests.gateway.pipeline.fakes import chat_ctx, make_policy


def three_tiers(**overrides: Any) -> Policy:
    return make_policy(
        backends=[
            {"name": "s1", "tier": "small", "model": "m"},
            {"name": "s2", "tier": "small", "model": "m"},
            {"name": "m1", "tier": "medium", "model": "m"},
            {"name": "l1", "tier": "large", "model": "m"},
        ],
        tiers=["small", "medium", "large"],
        **overrides,
    )


def routed_to(tier: str, prompt_tokens: int = 12, p50: int = 80, p90: int = 200) -> RouteOutcome:
    return RouteOutcome(
        RouteDecision(tier, None, ()), prompt_tokens, LengthEstimate(p50, p90), "rule", "heuristic"
    )


def test_ask_for_carries_the_sizes_the_class_and_the_arrival() -> None:
    ctx = chat_ctx("hi")
    ask = ask_for(ctx, routed_to("small"), PriorityClass(rank=2, ttft_slo_ms=250, tpot_slo_ms=40))
    assert (ask.prompt_tokens, ask.output_tokens, ask.output_tokens_p90) == (12, 80, 200)
    assert (ask.rank, ask.ttft_slo_s, ask.tpot_slo_s) == (2, 0.25, 0.04)
    assert ask.arrived == ctx.arrived  # the objective counts from the request's arrival, not from now


def test_ask_for_without_objectives() -> None:
    ask = ask_for(chat_ctx("hi"), routed_to("small"), PriorityClass())
    assert (ask.rank, ask.ttft_slo_s, ask.tpot_slo_s) == (0, None, None)


def test_priority_of_the_tenants_class_else_the_default_with_the_sections_objectives() -> None:
    policy = make_policy(
        admission={
            "ttft_slo_ms": 1000,
            "classes": {"gold": {"rank": 0, "ttft_slo_ms": 200}, "bulk": {"rank": 5}},
            "default_class": "bulk",
            "tenants": {"alice": {"priority": "gold"}},
        }
    )
    assert priority_of(chat_ctx("hi", Tenant(id=3, name="alice")), policy) == (
        "gold",
        PriorityClass(rank=0, ttft_slo_ms=200),
    )
    assert priority_of(chat_ctx("hi"), policy) == ("bulk", PriorityClass(rank=5, ttft_slo_ms=1000))


def test_candidates_are_the_named_backend_else_the_tiers() -> None:
    policy = three_tiers()
    assert [b.name for b in candidates_for(Target(routed=True), "small", policy)] == ["s1", "s2"]
    named = resolve_target("m1", policy)
    assert [b.name for b in candidates_for(named, "large", policy)] == ["m1"]
    with pytest.raises(GatewayError) as info:
        candidates_for(Target(routed=True), "huge", policy)
    assert (info.value.status_code, info.value.type) == (503, "server_error")


def test_spill_candidates_are_the_other_tiers_for_routed_requests_only() -> None:
    policy = three_tiers()
    assert [b.name for b in spill_candidates(Target(routed=True), "small", policy)] == ["m1", "l1"]
    assert [b.name for b in spill_candidates(Target(routed=True), "large", policy)] == ["s1", "s2", "m1"]
    assert spill_candidates(resolve_target("s1", policy), "small", policy) == []
    no_spill = three_tiers(admission={"spill": False})
    assert spill_candidates(Target(routed=True), "small", no_spill) == []


def test_refusal_and_unavailable_tell_the_client_when_to_come_back() -> None:
    refused = refusal(AdmissionRefused("s1", 2.7, "backend s1 is saturated"))
    assert (refused.status_code, refused.type, refused.code) == (
        429,
        "rate_limit_error",
        "backend_at_capacity",
    )
    assert refused.headers == {"retry-after": "2", "x-icgate-refused": "arrival"}
    assert "backend s1 is saturated" in refused.message
    late = refusal(AdmissionRefused("s1", 1.0, "could not start in time", stage="queued", waited_s=1.2))
    assert (late.status_code, late.code, late.headers["x-icgate-refused"]) == (
        429,
        "backend_at_capacity",
        "queued",
    )
    down = unavailable(BackendUnavailable(["s1", "s2"], 30.0))
    assert (down.status_code, down.type, down.code) == (503, "server_error", "backend_unavailable")
    assert down.headers == {"retry-after": "30"} and "'s1', 's2'" in down.message
