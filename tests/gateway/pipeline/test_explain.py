"""`explain`: the stages' outcomes as `ctx.decisions`, and those decisions as `x-icgate-*` headers."""

from __future__ import annotations

import pytest

from icgate.cache.examples import Example
from icgate.gateway.backends.admission import Ask, Placement
from icgate.gateway.backends.client import BackendError
from icgate.gateway.config import BackendConfig, PriorityClass
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.augment import Augmented
from icgate.gateway.pipeline.cache_lookup import BELOW_PREFILTER, CacheLookup
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
        "nearest": [
            {"entry": 11, "similarity": 0.96, "why": "served"},
            {"entry": 12, "similarity": 0.7, "why": "not_tried"},
        ],
    }
    explain.cache(ctx, a_lookup(new_entries, hit=False))
    assert ctx.decisions["cache"] == {
        "hit": None,
        "entry": None,
        "similarity": 0.96,  # the best candidate's, though it did not serve
        "verifier": None,
        "candidates": 2,
        "servable": True,
        "nearest": [
            {"entry": 11, "similarity": 0.96, "why": "not_tried"},
            {"entry": 12, "similarity": 0.7, "why": "not_tried"},
        ],
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


def test_the_predicted_tokens_header_is_the_serving_backends_size_once_admitted() -> None:
    ctx = chat_ctx("hi")
    outcome = RouteOutcome(RouteDecision("small", None, ()), 3, LengthEstimate(42, 90), None, "heuristic")
    explain.route(ctx, outcome)
    assert explain.response_headers(ctx)["x-icgate-predicted-tokens"] == "42"  # the shared prediction
    explain.admitted(ctx, SMALL, 0.25, predicted_tokens=17)  # the backend's own predictor said 17
    assert ctx.decisions["admit"] == {
        "backend": "small",
        "queue_ms": 0.0,
        "predicted_wait_ms": 250.0,
        "predicted_tokens": 17,
    }
    assert explain.response_headers(ctx)["x-icgate-predicted-tokens"] == "17"
    assert ctx.decisions["route"]["predicted_tokens"] == {"p50": 42, "p90": 90}


@pytest.mark.parametrize("lower", [False, True])
def test_spill_fallback_and_examples(lower: bool) -> None:
    ctx = chat_ctx("hi")
    explain.spilled(ctx, "small", LARGE)
    explain.fell_back(ctx, SMALL, LARGE, "timeout", lower)
    explain.fallback_refused(ctx, SMALL, "circuit open")
    explain.examples(ctx, Augmented({}, [4, 2]))
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
    explain.examples(ctx, Augmented({}, [11, 12]))
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


def a_miss(new_entries: NewEntries, **judged: object) -> CacheLookup:
    """The two-candidate lookup, no hit, with what the semantic step judged set from `judged`."""
    lookup = a_lookup(new_entries, hit=False)
    for name, value in judged.items():
        setattr(lookup, name, value)
    return lookup


def test_the_nearest_candidates_say_what_the_verifier_made_of_each(new_entries: NewEntries) -> None:
    ctx = chat_ctx("What is 2+2?")
    lookup = a_miss(new_entries, scores={11: 0.4123456}, threshold=0.62, prefilter=0.8)
    lookup.passed_over[12] = BELOW_PREFILTER
    explain.cache(ctx, lookup)
    cached = ctx.decisions["cache"]
    assert cached["nearest"] == [
        {"entry": 11, "similarity": 0.96, "verifier": 0.4123, "why": "below_threshold"},
        {"entry": 12, "similarity": 0.7, "why": "prefilter"},
    ]
    assert (cached["threshold"], cached["prefilter"]) == (0.62, 0.8)

    served = chat_ctx("What is 2+2?")
    explain.cache(served, a_lookup(new_entries, hit=True))
    assert served.decisions["cache"]["nearest"][0]["why"] == "served"
    outscored = chat_ctx("What is 2+2?")
    explain.cache(outscored, a_miss(new_entries, scores={11: 0.9}, threshold=None))
    assert outscored.decisions["cache"]["nearest"][0] == {
        "entry": 11,
        "similarity": 0.96,
        "verifier": 0.9,
        "why": "outscored",
    }
    assert "threshold" not in outscored.decisions["cache"]


@pytest.mark.parametrize(
    ("judged", "why"),
    [
        ({"semantic": False}, "semantic_off"),
        ({"servable": False}, "not_servable"),
        ({"no_semantic": "too_long"}, "too_long"),
        ({"skipped": "verifier-busy"}, "verifier-busy"),
        ({}, "not_tried"),
    ],
)
def test_a_candidate_the_verifier_never_saw_says_why(
    new_entries: NewEntries, judged: dict[str, object], why: str
) -> None:
    ctx = chat_ctx("What is 2+2?")
    explain.cache(ctx, a_miss(new_entries, **judged))
    assert [c["why"] for c in ctx.decisions["cache"]["nearest"]] == [why, why]


def test_an_exact_hit_keeps_no_candidates_and_a_lookup_keeps_five(new_entries: NewEntries) -> None:
    ctx = chat_ctx("What is 2+2?")
    lookup = a_lookup(new_entries, hit=True)
    lookup.hit = Hit(lookup.candidates[0].entry, 1.0, "exact", 1.0)
    lookup.candidates = []
    explain.cache(ctx, lookup)
    assert "nearest" not in ctx.decisions["cache"]
    many = a_lookup(new_entries, hit=True)
    many.hit = Hit(many.candidates[0].entry, 1.0, "exact", 1.0)
    many.candidates = many.candidates * 4
    explain.cache(ctx, many)
    nearest = ctx.decisions["cache"]["nearest"]
    assert len(nearest) == explain.NEAREST_SHOWN and nearest[1]["why"] == "exact_hit"


def test_the_examples_prepended_with_their_relevance_and_utility() -> None:
    ctx = chat_ctx("hi")
    shown = [Example(7, "q", "a", 0.912345, 0.8, "large", 10), Example(3, "q2", "a2", 0.7, 0.25, "small", 9)]
    explain.examples(ctx, Augmented({}, [7, 3], shown))
    assert ctx.decisions["examples"] == [7, 3]
    assert ctx.decisions["examples_shown"] == [
        {"entry": 7, "similarity": 0.9123, "utility": 0.8},
        {"entry": 3, "similarity": 0.7, "utility": 0.25},
    ]
    explain.examples(ctx, Augmented({}))  # the fallback's attempt, on a tier that gets none
    assert ctx.decisions["examples"] == [] and "examples_shown" not in ctx.decisions


def test_the_knob_that_turned_the_score_into_the_tier() -> None:
    ctx = chat_ctx("hi")
    decision = RouteDecision("small", 0.7, ("P 0.700 >= threshold 0.600",))
    outcome = RouteOutcome(decision, 3, LengthEstimate(4, 8), "r", "h", knob=("router.threshold", 0.6))
    explain.route(ctx, outcome)
    assert ctx.decisions["route"]["knob"] == {"name": "router.threshold", "value": 0.6}


def test_what_admission_saw_of_the_backend_it_chose() -> None:
    ctx = chat_ctx("hi")
    explain.placed(ctx, Placement(SMALL, False, 1, 0), Ask(10, 20))
    assert ctx.decisions["admission"] == {
        "backend": "small",
        "in_flight": 1,
        "max_concurrent": 2,
        "waiting": 0,
    }
    explain.placed(ctx, Placement(LARGE, True, 2, 3, ttft_s=0.8504), Ask(10, 20, ttft_slo_s=1.0))
    assert ctx.decisions["admission"] == {
        "backend": "large",
        "in_flight": 2,
        "max_concurrent": 2,
        "waiting": 3,
        "ttft_ms": 850.4,
        "ttft_slo_ms": 1000.0,
    }


def test_every_attempt_in_order_with_its_error_bounded() -> None:
    ctx = chat_ctx("hi")
    failed = BackendError("small", 500, "The backend 'small' failed (500). " + "x" * 400, True)
    explain.attempt(ctx, SMALL, "first", 0.01234, error=failed)
    explain.attempt(ctx, LARGE, "fallback", 0.5, queued_s=0.002)
    explain.attempt(ctx, LARGE, "spill", 0.0, refused="backend large is saturated")
    first, second, third = ctx.decisions["attempts"]
    assert {k: first[k] for k in ("backend", "role", "ms", "outcome", "status")} == {
        "backend": "small",
        "role": "first",
        "ms": 12.3,
        "outcome": "failed",
        "status": 500,
    }
    assert first["error"].startswith("http_500: The backend 'small' failed (500).")
    assert len(first["error"]) == len("http_500: ") + explain.ERROR_MAX_CHARS
    assert second == {
        "backend": "large",
        "role": "fallback",
        "ms": 500.0,
        "queued_ms": 2.0,
        "outcome": "answered",
    }
    assert third["outcome"] == "refused" and third["error"] == "backend large is saturated"
    explain.stream_cut(ctx, BackendError("large", 504, "The backend 'large' stopped sending.", True))
    assert ctx.decisions["attempts"][-1]["outcome"] == "cut"
    assert ctx.decisions["attempts"][-1]["error"] == "timeout: The backend 'large' stopped sending."
    nothing = chat_ctx("hi")
    explain.stream_cut(nothing, failed)  # a cache hit's replay has no attempt to mark
    assert "attempts" not in nothing.decisions
