"""The explainer on hand-built request-log rows: every decision the pipeline records, in plain words."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from icgate.gateway.admin.explain import BODIES_OFF, Fact, explain
from icgate.gateway.records import RequestBodies
from icgate.gateway.store.request_log import LogRow


def row(decisions: dict[str, Any], bodies: RequestBodies | None = None, **overrides: Any) -> LogRow:
    fields: dict[str, Any] = {
        "request_id": "req-0123456789abcdef01234567",
        "created_at": datetime(2026, 11, 27, 23, 0, tzinfo=UTC),
        "tenant_id": 1,
        "api_key_id": 2,
        "endpoint": "chat",
        "model_requested": "auto",
        "route": "small",
        "backend": "small",
        "fallback_from": None,
        "stream": False,
        "status_code": 200,
        "error_type": None,
        "prompt_tokens": 12,
        "completion_tokens": 40,
        "cost_usd": 0.00012,
        "latency_ms": 210.4,
        "overhead_ms": 3.21,
        "queue_ms": 0.0,
        "decisions": decisions,
        "id": 7,
        "tenant": "acme",
    }
    fields.update(overrides)
    return LogRow(**fields, bodies=bodies)


def facts(r: LogRow, threshold: float | None = None) -> dict[str, Fact]:
    return {f.key: f for stage in explain(r, threshold) for f in stage.facts}


NEAR_MISS = {
    "hit": None,
    "entry": None,
    "similarity": 0.9412,
    "verifier": None,
    "candidates": 3,
    "servable": True,
    "prefilter": 0.8,
    "threshold": 0.62,
    "nearest": [
        {"entry": 12, "similarity": 0.9412, "verifier": 0.3101, "why": "below_threshold"},
        {"entry": 31, "similarity": 0.85, "why": "context"},
        {"entry": 5, "similarity": 0.7, "why": "prefilter"},
    ],
}


def test_a_near_miss_lists_each_candidate_with_its_scores_and_why_it_did_not_serve() -> None:
    found = facts(row({"cache": NEAR_MISS}), threshold=0.9)  # the row's own threshold wins over the live one
    assert found["cache.hit"].value == "not from the cache: no stored answer was close enough"
    candidates = found["cache.candidates"]
    assert candidates.value == "3"
    assert candidates.items == (
        "#12: similarity 0.9412, verifier 0.310 against threshold 0.620: "
        "not served: the verifier's score is under the threshold",
        "#31: similarity 0.8500: not checked: a different conversation context or output constraints",
        "#5: similarity 0.7000: not checked: its similarity is under the verifier's prefilter 0.800",
    )


def test_a_semantic_hit_says_which_candidate_served_and_which_was_outscored() -> None:
    cache = {
        "hit": "semantic",
        "entry": 12,
        "similarity": 0.97,
        "verifier": 0.91,
        "candidates": 2,
        "servable": True,
        "nearest": [
            {"entry": 12, "similarity": 0.97, "verifier": 0.91, "why": "served"},
            {"entry": 13, "similarity": 0.95, "verifier": 0.7, "why": "outscored"},
            {"entry": 14, "similarity": 0.94, "why": "something new"},  # a code this console does not know
        ],
    }
    found = facts(row({"cache": cache}, route="cache", backend=None), threshold=0.62)
    assert found["cache.verifier"].value == "0.910 against threshold 0.620"  # the live one, for older rows
    assert found["cache.candidates"].items[0].endswith("verifier 0.910 against threshold 0.620: served")
    assert (
        found["cache.candidates"]
        .items[1]
        .endswith("it passed the verifier, but another candidate scored higher")
    )
    assert found["cache.candidates"].items[2].endswith(": something new")
    assert found["cache.entry"].value == "#12"
    assert found["admit.decision"].value == "none needed: answered from the cache"


def test_a_row_logged_before_candidates_were_kept_still_reads() -> None:
    old = {
        "hit": None,
        "entry": None,
        "similarity": None,
        "verifier": None,
        "candidates": 0,
        "servable": True,
    }
    found = facts(row({"cache": old, "examples": [3, 9]}))
    assert (found["cache.candidates"].value, found["cache.candidates"].items) == ("0", ())
    assert (found["cache.examples"].value, found["cache.examples"].items) == ("#3, #9", ())


def test_the_examples_prepended_with_their_relevance_and_utility() -> None:
    shown = [
        {"entry": 3, "similarity": 0.8123, "utility": 0.9},
        {"entry": 9, "similarity": 0.7, "utility": 0.25},
    ]
    found = facts(row({"cache": NEAR_MISS, "examples": [3, 9], "examples_shown": shown}))
    assert found["cache.examples"].value == "#3, #9"
    assert found["cache.examples"].items == (
        "#3: relevance (similarity) 0.8123, utility 0.90",
        "#9: relevance (similarity) 0.7000, utility 0.25",
    )


def test_the_router_score_against_its_threshold_and_the_knob_that_set_it() -> None:
    route = {
        "tier": "small",
        "score": 0.712,
        "reasons": ["P(small good enough) 0.712", "P 0.712 >= threshold 0.640"],
        "predicted_tokens": {"p50": 35, "p90": 80},
        "router": "r3",
        "length_model": "heuristic",
        "knob": {"name": "router.strong_share", "value": 0.3},
    }
    found = facts(row({"route": route}))
    assert found["route.score"].value == "0.712 against threshold 0.640"
    assert found["route.knob"].value == (
        "router.strong_share = 0.30 (the share of requests sent to the large tier)"
    )
    assert found["route.length"].value == "35 (p90 80) vs 40"
    uncalibrated = {**route, "knob": {"name": "calibrated", "value": None}, "reasons": []}
    found = facts(row({"route": uncalibrated}))
    assert found["route.knob"].value == "no knob set: the router's own calibrated threshold (none, so 0.5)"
    assert found["route.score"].value == "0.712"
    by_value = facts(row({"route": {**route, "knob": {"name": "router.quality_value_usd", "value": 0.02}}}))
    assert (
        by_value["route.knob"].value == "router.quality_value_usd = 0.020 (a good answer's worth, in dollars)"
    )
    assert "route.knob" not in facts(row({"route": {**route, "knob": None, "score": None}}))


def test_admission_says_what_it_saw_and_every_attempt_in_order() -> None:
    decisions = {
        "priority": {"class": "gold", "rank": 0, "ttft_slo_ms": 1000},
        "admission": {
            "backend": "small",
            "in_flight": 3,
            "max_concurrent": 4,
            "waiting": 1,
            "ttft_ms": 850.4,
            "ttft_slo_ms": 1000.0,
        },
        "admit": {"backend": "large", "queue_ms": 12.0, "predicted_tokens": 180},
        "fallback": {"from": "small", "to": "large", "error": "http_500"},
        "attempts": [
            {
                "backend": "small",
                "role": "first",
                "ms": 8.2,
                "queued_ms": 12.0,
                "outcome": "failed",
                "status": 500,
                "error": "http_500: The backend 'small' failed (500).",
            },
            {"backend": "large", "role": "fallback", "ms": 130.5, "outcome": "answered"},
        ],
    }
    found_row = row(decisions, backend="large", fallback_from="small", route="large")
    found = facts(found_row)
    assert found["admission.state"].value == (
        "small: 3 of 4 slots in use, 1 queued; first token predicted in 850 ms (objective 1000 ms)"
    )
    assert found["admit.decision"].value == "queued 12 ms on large"
    assert found["admit.length"].label == "Output tokens as sized for large, vs actual"
    assert found["admit.length"].value == f"180 vs {found_row.completion_tokens}"
    attempts = found["attempts"]
    assert attempts.value == "2 attempts"
    assert attempts.items == (
        "1. small (first): failed after 8.2 ms (queued 12 ms), status 500: "
        "http_500: The backend 'small' failed (500).",
        "2. large (fallback): answered in 130.5 ms",
    )
    assert found["admit.fallback"].value == "small failed (http_500); large answered"


def test_a_refused_attempt_and_a_broken_stream() -> None:
    decisions: dict[str, Any] = {
        "admission": {"backend": "small", "in_flight": 2, "max_concurrent": 2, "waiting": 0},
        "attempts": [
            {"backend": "small", "role": "spill", "ms": 0.0, "outcome": "refused", "error": "at capacity"},
            {
                "backend": "large",
                "role": "fallback",
                "ms": 20.0,
                "outcome": "cut",
                "status": 502,
                "error": "x",
            },
        ],
    }
    found = facts(row(decisions))
    assert found["admission.state"].value == "small: 2 of 2 slots in use, 0 queued"
    assert found["attempts"].items == (
        "1. small (spill): refused by admission: at capacity",
        "2. large (fallback): its stream broke, status 502: x",
    )
    one = facts(row({"attempts": decisions["attempts"][:1]}))
    assert one["attempts"].value == "1 attempt" and "admission.state" not in one


def test_the_outcome_in_tokens_cost_latency_overhead_and_the_trace_id() -> None:
    found = facts(row({}))
    assert found["request.tenant"].value == "acme"
    assert found["outcome.tokens"].value == "12 / 40"
    assert found["outcome.cost"].value == "$0.000120"
    assert found["outcome.latency"].value == "210.4 ms"
    assert found["outcome.overhead"].value == "3.21 ms (queued 0.0 ms)"
    assert found["outcome.request_id"].value == "req-0123456789abcdef01234567"
    assert "attempts" not in found and "admission.state" not in found


def test_bodies_are_shown_where_kept_and_otherwise_it_says_which_setting_keeps_them() -> None:
    none = facts(row({}))
    assert none["bodies.none"].value == BODIES_OFF
    assert "request_log.store_bodies: true" in BODIES_OFF and "bodies.prompt" not in none
    kept = facts(row({}, RequestBodies(prompt="user: mail <email>", answer="")))
    assert kept["bodies.prompt"].value == "user: mail <email>"
    assert kept["bodies.answer"].value == "(none)"
    assert "bodies.none" not in kept


def test_a_shared_answer_says_it_was_an_identical_request_in_flight() -> None:
    shared = {"hit": "exact", "entry": None, "similarity": 1.0, "verifier": 1.0, "candidates": 0}
    said = facts(row({"cache": {**shared, "shared": True}}, route="cache", backend=None))
    in_flight = "an exact hit: the answer of the same request, in flight when this arrived"
    assert said["cache.hit"].value == in_flight
    earlier = facts(row({"cache": shared}, route="cache", backend=None))
    assert earlier["cache.hit"].value == "an exact hit: the same request was answered before"
