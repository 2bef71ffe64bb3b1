"""The router knob's projection as plain data: logged decisions made again by the gateway's own `decide`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from icgate.gateway.admin import knob
from icgate.gateway.admin.knob import Replayed, Setting, Tiers
from icgate.gateway.config import Policy
from icgate.gateway.pipeline.route import price
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store.request_log import ScoredRoute
from icgate.lengths.predict import OutputLengthHeuristic
from icgate.routers.decide import DecisionKnob, ExampleSignal, decide
from icgate.routers.rules import LongPromptRule

SMALL, LARGE = (0.1, 0.2), (3.0, 6.0)  # $ per 1k input, output tokens


def policy(**router: Any) -> Policy:
    def backend(name: str, prices: tuple[float, float]) -> dict[str, Any]:
        return {
            "name": name,
            "tier": name,
            "model": f"openai/{name}",
            "api_base": "http://127.0.0.1:9/v1",
            "cost_per_1k_input": prices[0],
            "cost_per_1k_output": prices[1],
        }

    return Policy.model_validate(
        {
            "backends": [backend("small", SMALL), backend("large", LARGE)],
            "routed_models": ["auto"],
            "router": {"kind": "learned", **router},
        }
    )


def models(threshold: float = 0.5) -> RouteModels:
    """The models in force: only the threshold and the calibration scores matter to the knob."""
    return RouteModels(
        router=LongPromptRule("small", "large", 1500),
        length=OutputLengthHeuristic(),
        threshold=threshold,
        calibration_scores=np.linspace(0.0, 1.0, 201),
        router_version="test-router",
    )


def logged(
    scores: list[float],
    the_policy: Policy,
    the_models: RouteModels,
    examples: dict[int, ExampleSignal] | None = None,
) -> list[ScoredRoute]:
    """Request-log rows as the gateway writes them: each decided by `decide` under the knob in force."""
    current = knob.current_knob(the_policy.router, the_models)
    tiers = Tiers.of(the_policy)
    rows = []
    for i, p in enumerate(scores):
        prompt, predicted, completion = 40 + 7 * i, 100 + 3 * i, 90 + 5 * i
        example = (examples or {}).get(i)
        decision = decide(p, tiers.small, tiers.large, prompt, predicted, current, example)
        paid = tiers.small if decision.tier == "small" else tiers.large
        route = {
            "tier": decision.tier,
            "score": decision.score,
            "reasons": list(decision.reasons),
            "prompt_tokens_est": prompt,
            "predicted_tokens": {"p50": predicted, "p90": 2 * predicted},
            "router": "test-router",
        }
        rows.append(
            ScoredRoute(
                id=1000 - i,
                request_id=f"req-{i}",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
                status_code=200,
                prompt_tokens=prompt + 3,
                completion_tokens=completion,
                cost_usd=paid.cost(prompt + 3, completion),
                decision=route,
            )
        )
    return rows


SCORES = [round(float(x), 3) for x in np.random.default_rng(7).uniform(0.05, 0.98, 200)]


def test_replayable_reads_the_score_and_the_example_back() -> None:
    p, m = policy(), models()
    lift = {0: ExampleSignal(0.912, 0.8)}
    rows = logged([0.412, 0.7], p, m, lift)
    rows.append(
        ScoredRoute(1, "req-rule", rows[0].created_at, 200, 5, 5, 0.0, {"tier": "small", "score": None})
    )
    replayed = knob.replayable(rows)
    assert [r.request_id for r in replayed] == ["req-0", "req-1"]  # the unscored row is not replayable
    lifted, plain = replayed
    assert lifted.p_small == 0.412 and lifted.score > 0.412  # the raw score, not the lifted one
    assert lifted.example == ExampleSignal(0.912, 0.8)
    assert plain.p_small == 0.7 and plain.example is None
    assert (plain.prompt_estimate, plain.predicted_tokens) == (47, 103)


def test_a_higher_threshold_sends_more_to_large_at_more_cost_and_more_quality() -> None:
    p, m = policy(), models()
    rows = knob.replayable(logged(SCORES, p, m))
    got = [knob.compare(rows, Setting(threshold=t), p, m).candidate.outcome for t in (0.2, 0.4, 0.6, 0.8)]
    shares = [o.large_share for o in got]
    assert shares == sorted(shares) and shares[0] < shares[-1]
    costs = [o.cost_usd for o in got]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    qualities = [o.expected_quality for o in got]
    assert qualities == sorted(qualities) and qualities[0] < qualities[-1] <= 1.0
    # threshold 0 sends nothing large (quality = the mean score), 1 everything but a perfect score
    none = knob.compare(rows, Setting(threshold=0.0), p, m).candidate.outcome
    assert none.large == 0 and none.expected_quality == pytest.approx(float(np.mean(SCORES)))


def test_the_cost_prices_each_requests_own_tokens_at_its_tiers_first_backend() -> None:
    p, m = policy(), models()
    rows = knob.replayable(logged(SCORES[:10], p, m))
    everything_large = knob.compare(rows, Setting(strong_share=1.0), p, m).candidate.outcome
    large = price(p, "large")
    assert everything_large.large == 10
    assert everything_large.cost_usd == pytest.approx(
        sum(large.cost(r.prompt_tokens, r.completion_tokens) for r in rows)
    )
    assert everything_large.expected_quality == 1.0


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_a_strong_share_sends_that_share_of_the_replayed_requests_large(share: float) -> None:
    p, m = policy(), models()
    distinct = sorted(set(SCORES))
    rows = knob.replayable(logged(distinct, p, m))
    projected = knob.compare(rows, Setting(strong_share=share), p, m).candidate
    assert projected.outcome.large == round(share * len(rows))
    assert projected.threshold is not None and 0.0 <= projected.threshold <= 1.0


def test_with_nothing_changed_the_projection_is_what_was_logged() -> None:
    """Same knob, same lift, same prices: every request decided as it was (the example lift and all)."""
    p, m = policy(example_lift=0.6), models(threshold=0.55)
    lifts = {i: ExampleSignal(0.8 + (i % 5) / 50, (i % 4) / 4 + 0.1) for i in range(0, len(SCORES), 3)}
    rows = knob.replayable(logged(SCORES, p, m, lifts))
    assert any(r.example is not None for r in rows)
    decisions = knob.replay(rows, knob.current_knob(p.router, m), Tiers.of(p))
    assert [d.tier for d in decisions] == [r.tier for r in rows]
    comparison = knob.compare(rows, None, p, m)
    assert comparison.candidate == comparison.current
    now, then = comparison.current.outcome, comparison.logged
    assert (now.requests, now.large) == (then.requests, then.large)
    assert now.cost_usd == pytest.approx(then.cost_usd)
    assert now.expected_quality == pytest.approx(then.expected_quality, abs=1e-3)


@pytest.mark.parametrize(
    ("router", "threshold"),
    [
        ({"quality_value_usd": 0.002}, None),
        ({"strong_share": 0.3}, float(np.quantile(np.linspace(0.0, 1.0, 201), 0.3))),
        ({"threshold": 0.35}, 0.35),
        ({}, 0.6),
    ],
    ids=["quality_value", "strong_share", "threshold", "artifact"],
)
def test_the_knob_in_force_is_read_as_the_route_stage_reads_it(
    router: dict[str, Any], threshold: float | None
) -> None:
    p, m = policy(**router), models(threshold=0.6)
    rows = knob.replayable(logged(SCORES, p, m))
    comparison = knob.compare(rows, None, p, m)
    assert comparison.current.outcome.large == comparison.logged.large
    assert comparison.current.setting == Setting.of(p.router)
    assert comparison.current.threshold == (None if threshold is None else pytest.approx(threshold))


def test_moving_from_a_quality_value_to_a_threshold_decides_by_the_threshold_alone() -> None:
    p, m = policy(quality_value_usd=1e-9), models()  # a good answer is worth nothing: all small
    rows = knob.replayable(logged(SCORES, p, m))
    comparison = knob.compare(rows, Setting(threshold=0.5), p, m)
    assert comparison.current.outcome.large == 0
    assert comparison.candidate.outcome.large == sum(s < 0.5 for s in SCORES)


def test_a_strong_share_without_requests_cannot_be_mapped() -> None:
    p, m = policy(), models()
    with pytest.raises(ValueError, match="no logged routed requests"):
        knob.compare([], Setting(strong_share=0.2), p, m)
    empty = knob.compare([], Setting(threshold=0.2), p, m).candidate.outcome
    assert (empty.requests, empty.large_share, empty.cost_usd) == (0, 0.0, 0.0)


def test_the_curve_runs_from_all_small_to_all_large() -> None:
    p, m = policy(), models()
    rows = knob.replayable(logged(sorted(set(SCORES)), p, m))
    points = knob.curve(rows, p.router, Tiers.of(p))
    shares = [pt.strong_share for pt in points]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and shares == sorted(shares)
    assert points[0].quality == pytest.approx(float(np.mean(sorted(set(SCORES)))))
    assert points[-1].quality == 1.0
    costs = [pt.cost_usd or 0.0 for pt in points]
    assert costs == sorted(costs)
    assert knob.curve([], p.router, Tiers.of(p)) == []


def test_each_point_of_the_curve_is_what_the_knob_projects_at_its_threshold() -> None:
    p, m = policy(example_lift=0.5), models()
    lifts = {i: ExampleSignal(0.9, 0.7) for i in range(0, len(SCORES), 4)}
    rows = knob.replayable(logged(SCORES, p, m, lifts))  # ties and lifted scores included
    for point in knob.curve(rows, p.router, Tiers.of(p)):
        assert point.threshold is not None
        projected = knob.compare(rows, Setting(threshold=point.threshold), p, m).candidate.outcome
        assert point.strong_share == pytest.approx(projected.large_share)
        assert point.quality == pytest.approx(projected.expected_quality)
        assert point.cost_usd == pytest.approx(projected.cost_usd)


def test_held_out_points_are_only_what_training_kept() -> None:
    held = {
        "gsm8k": {
            "apgr": 0.7,
            "cpt50": 0.2,
            "cpt80": 0.5,
            "n": 10,
            "weak_quality": 0.5,
            "strong_quality": 0.9,
        },
        "all": {"apgr": 0.6, "cpt50": 0.3, "cpt80": 0.6, "n": 20, "weak_quality": 0.6, "strong_quality": 0.8},
    }
    group, points = knob.held_out_points(held)
    assert group == "all"
    assert [(p.strong_share, round(p.quality, 4)) for p in points] == [
        (0.0, 0.75),
        (0.3, round(0.7 / 0.8, 4)),
        (0.6, round(0.76 / 0.8, 4)),
        (1.0, 1.0),
    ]
    assert knob.held_out_points({}) == ("", [])
    assert knob.held_out_points({"x": {"error": "equal quality", "n": 3}})[1] == []
    stored = {"all": {**held["all"], "curve": [[0.0, 0.6, 0.0], [0.5, 0.7, 0.5], [1.0, 0.8, 1.0]]}}
    assert [p.quality for p in knob.held_out_points(stored)[1]] == pytest.approx([0.75, 0.875, 1.0])


def test_the_chart_draws_the_curve_the_points_and_the_marks() -> None:
    projected = [knob.CurvePoint(0.0, 0.8, 1.0), knob.CurvePoint(1.0, 1.0, 3.0)]
    measured = [knob.CurvePoint(0.5, 0.9)]
    marks = {"current": knob.CurvePoint(0.2, 0.85), "candidate": knob.CurvePoint(0.6, 0.95)}
    frame = knob.frame_for(projected, measured)
    svg = knob.curve_chart(projected, measured, marks, frame)
    assert svg.startswith('<svg id="curve-chart"') and svg.endswith("</svg>")
    assert 'id="curve-projected"' in svg and 'class="held-out"' in svg
    assert 'id="mark-current"' in svg and 'id="mark-candidate"' in svg
    assert frame.y(1.0) < frame.y(frame.floor) and frame.x(0.0) < frame.x(1.0)


def test_a_setting_describes_itself() -> None:
    assert Setting(threshold=0.42).describe() == "threshold 0.4200"
    assert Setting(strong_share=0.3).describe() == "strong share 0.300"
    assert Setting(quality_value_usd=0.01).describe() == "quality value $0.01"
    assert Setting().describe() == "the router's own threshold"


def test_replayed_rows_without_a_readable_lift_are_left_out() -> None:
    row = ScoredRoute(
        1,
        "req-x",
        datetime(2026, 1, 1, tzinfo=UTC),
        200,
        10,
        10,
        0.0,
        {
            "tier": "small",
            "score": 0.9,
            "reasons": ["odd", "example similarity 0.9, utility 1.0: P lifted to 0.9"],
        },
    )
    assert knob.replayable([row]) == []


def test_the_knob_keeps_the_policys_example_lift() -> None:
    """The knob changes only the threshold: the lift is the policy's, as the route stage builds it."""
    p = policy(example_lift=0.3, example_min_similarity=0.6)
    assert knob.knob(p.router, 0.4) == DecisionKnob(0.4, None, 0.3, 0.6)
    rows: list[Replayed] = []
    assert knob.lifted_scores(rows, knob.knob(p.router, None)) == []


def test_a_row_priced_per_tier_is_decided_again_at_those_lengths() -> None:
    """A row logged with each tier's own length is replayed at those lengths, as the gateway decided it;
    a row without them (older logs) at the shared prediction. P 0.9, prompt 40: at 100 tokens on both,
    large costs $0.696 more; at 300 on large, $1.896 more. A good answer worth $10 loses $1.00."""
    p, m = policy(), models()
    row = logged([0.9], p, m)[0]
    shared = knob.replayable([row])[0]
    row.decision["predicted_tokens"] = {"p50": 100, "p90": 200}
    row.decision["priced_tokens"] = {"small": 100, "large": 300}
    own = knob.replayable([row])[0]
    assert own.priced == {"small": 100, "large": 300} and shared.priced == {}
    value = knob.knob(p.router, None, 10.0)
    tiers = Tiers.of(p)
    assert knob.replay([own], value, tiers)[0].tier == "small"
    assert knob.replay([shared], value, tiers)[0].tier == "large"
