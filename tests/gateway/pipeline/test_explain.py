"""`explain`: the stages' outcomes as `ctx.decisions`, and those decisions as `x-icgate-*` headers."""

from __future__ import annotations

import pytest

from icgate.gateway.config import BackendConfig, PriorityClass
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.route import RouteOutcome
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import Tenant
from icgate.gateway.store.cache_entries import Candidate, Hit
from icgate.lengths.predict import LengthEstimate
from icgate.routers.base import RouteDecision
from tests.gateway.pipeline.fakes import NewEntries, axis, chat_ctx, entry_for, make_policy


def backend(name: str) -> BackendConfig:
    found = make_policy().backend(name)
    assert found is not None
    return found


SMALL, LARGE = backend("small"), backend("large")


def a_lookup(new_entries: NewEntries, hit: bool) -> CacheLookup:
    entries = new_entries()
    ctx = chat_ctx("What is 2+2?")
    near = entry_for(entries, chat_ctx("What's 2+2?"), 11, axis(0))
    far = entry_for(entries, chat_ctx("What is 3+3?"), 12, axis(1))
    return CacheLookup(
        namespace="anonymous",
        exact_key="k",
        servable=True,
        storable=True,
        embed_text=ctx.body["messages"][0]["content"],
        prompt_text=ctx.body["messages"][0]["content"],
        fingerprint="",
        exact=True,
        semantic=True,
        examples=True,
        store=True,
        candidates=[Candidate(near, 0.96), Candidate(far, 0.7)],
        hit=Hit(near, 0.96, "semantic", 0.88) if hit else None,
    )


def test_tenant_target_and_priority() -> None:
    ctx = chat_ctx("hi", Tenant(id=3, name="alice"))
    explain.tenant(ctx)
    explain.target(ctx, Target(routed=False, backend=SMALL))
    explain.priority(ctx, "gold", PriorityClass(rank=1, ttft_slo_ms=250))
    assert ctx.decisions == {
        "authenticate": {"tenant": "alice"},
        "target": {"routed": False},
        "priority": {"class": "gold", "rank": 1, "ttft_slo_ms": 250},
    }


def test_cache_hit_and_miss(new_entries: NewEntries) -> None:
    ctx = chat_ctx("What is 2+2?")
    explain.cache(ctx, a_lookup(new_entries, hit=True))
    assert ctx.decisions["cache"] == {
        "hit": "semantic",
        "entry": 11,
        "similarity": 0.96,
        "verifier": 0.88,
        "candidates": 2,
        "servable": True,
    }
    explain.cache(ctx, a_lookup(new_entries, hit=False))
    assert ctx.decisions["cache"] == {
        "hit": None,
        "entry": None,
        "similarity": 0.96,  # the best candidate's, though it did not serve
        "verifier": None,
        "candidates": 2,
        "servable": True,
    }


def test_route() -> None:
    ctx = chat_ctx("hi")
    outcome = RouteOutcome(
        decision=RouteDecision("large", 0.31, ("P 0.31 < threshold 0.5",)),
        prompt_tokens=12,
        predicted=LengthEstimate(80, 200),
        router_version="router-v3",
        length_version="heuristic",
    )
    explain.route(ctx, outcome)
    assert ctx.decisions["route"] == {
        "tier": "large",
        "score": 0.31,
        "reasons": ["P 0.31 < threshold 0.5"],
        "prompt_tokens_est": 12,
        "predicted_tokens": {"p50": 80, "p90": 200},
        "router": "router-v3",
        "length_model": "heuristic",
    }


def test_admission_outcomes_replace_each_other() -> None:
    ctx = chat_ctx("hi")
    ctx.queue_s = 0.012345
    explain.admitted(ctx, SMALL)
    assert ctx.decisions["admit"] == {"backend": "small", "queue_ms": 12.35}
    explain.refused(ctx, "backend small is saturated")
    assert ctx.decisions["admit"] == {"refused": "backend small is saturated"}
    explain.unavailable(ctx, ["small", "large"])
    assert ctx.decisions["admit"] == {"unavailable": ["small", "large"]}


@pytest.mark.parametrize("lower", [False, True])
def test_spill_fallback_and_examples(lower: bool) -> None:
    ctx = chat_ctx("hi")
    explain.spilled(ctx, "small", LARGE)
    explain.fell_back(ctx, SMALL, LARGE, "timeout", lower)
    explain.fallback_refused(ctx, SMALL, "circuit open")
    explain.examples(ctx, [4, 2])
    assert ctx.decisions["spill"] == {"from": "small", "to": "large"}
    expected = {"from": "small", "to": "large", "error": "timeout"}
    assert ctx.decisions["fallback"] == ({**expected, "downgraded": True} if lower else expected)
    assert ctx.decisions["fallback_refused"] == {"to": "small", "reason": "circuit open"}
    assert ctx.decisions["examples"] == [4, 2]


def test_headers_tell_what_the_decisions_say(new_entries: NewEntries) -> None:
    ctx = chat_ctx("hi")
    ctx.route, ctx.backend, ctx.queue_s, ctx.fallback_from = "large", LARGE, 0.002, "small"
    ctx.backend_s = 0.25
    explain.fell_back(ctx, SMALL, LARGE, "http_502", lower=True)
    explain.cache(ctx, a_lookup(new_entries, hit=False))
    explain.examples(ctx, [11, 12])
    explain.route(
        ctx,
        RouteOutcome(RouteDecision("small", 0.8, ()), 3, LengthEstimate(42, 90), "r", "heuristic"),
    )
    ctx.freeze_overhead()
    headers = explain.response_headers(ctx)
    assert headers == {
        "x-icgate-request-id": ctx.request_id,
        "x-icgate-route": "large",
        "x-icgate-backend": "large",
        "x-icgate-overhead-ms": f"{ctx.overhead_ms():.2f}",
        "x-icgate-queue-ms": "2.00",
        "x-icgate-backend-ms": "250.00",
        "x-icgate-total-ms": f"{ctx.total_ms():.2f}",
        "x-icgate-fallback-from": "small",
        "x-icgate-downgraded": "true",
        "x-icgate-similarity": "0.9600",
        "x-icgate-examples": "2",
        "x-icgate-router-score": "0.8000",
        "x-icgate-predicted-tokens": "42",
    }


def test_total_time_is_what_the_gateway_held_the_request_and_is_fixed_with_the_overhead() -> None:
    ctx = chat_ctx("hi")
    ctx.arrived -= 0.5  # arrived half a second ago, of which the backend took 0.3 s
    ctx.backend_s = 0.3
    ctx.freeze_overhead()
    total, overhead = ctx.total_ms(), ctx.overhead_ms()
    assert 500.0 <= total < 600.0 and abs(total - 300.0 - overhead) < 1e-6
    ctx.arrived -= 10.0  # delivery after the answer was in hand changes neither
    assert (ctx.total_ms(), ctx.overhead_ms()) == (total, overhead)


def test_a_skipped_cache_is_explained_in_a_header(new_entries: NewEntries) -> None:
    ctx = chat_ctx("hi")
    lookup = a_lookup(new_entries, hit=False)
    lookup.skipped = "embedder-busy"
    explain.cache(ctx, lookup)
    assert ctx.decisions["cache"]["skipped"] == "embedder-busy"
    assert explain.response_headers(ctx)["x-icgate-cache-skipped"] == "embedder-busy"


def test_headers_leave_out_what_was_not_decided() -> None:
    ctx = chat_ctx("hi")
    ctx.fallback_from = "small"
    explain.fell_back(ctx, SMALL, LARGE, "timeout", lower=False)
    headers = explain.response_headers(ctx)
    assert headers["x-icgate-fallback-from"] == "small" and "x-icgate-downgraded" not in headers
    for absent in ("similarity", "examples", "router-score", "predicted-tokens", "cache-skipped"):
        assert f"x-icgate-{absent}" not in headers
