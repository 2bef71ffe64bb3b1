"""RouteLLM's metrics on small hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from icgate.routers.data import LabelledPrompt
from icgate.routers.evaluation import (
    calibrate_threshold,
    evaluate_scores,
    oracle_scores,
    quality_curve,
    random_apgr,
)

# (weak_ok, strong_ok): two rows only the strong model gets, two ties, one only the weak model gets.
WEAK = np.array([0, 0, 1, 0, 1])
STRONG = np.array([1, 1, 1, 0, 0])


def test_perfect_router_hand_computed() -> None:
    # Oracle order: gains first (score -1), ties (0), the loss last (+1).
    m = evaluate_scores(oracle_scores((WEAK, STRONG)), (WEAK, STRONG))
    assert m.weak_quality == pytest.approx(0.4)
    assert m.strong_quality == pytest.approx(0.6)
    assert [p.strong_share for p in m.curve] == pytest.approx([0, 0.4, 0.8, 1.0])
    assert [p.quality for p in m.curve] == pytest.approx([0.4, 0.8, 0.8, 0.6])
    assert [p.pgr for p in m.curve] == pytest.approx([0, 2, 2, 1])
    # Trapezoids: 0.4 * (0 + 2) / 2 + 0.4 * (2 + 2) / 2 + 0.2 * (2 + 1) / 2
    assert m.apgr == pytest.approx(1.5)
    assert m.cpt50 == pytest.approx(0.1)  # PGR climbs 0 -> 2 over shares 0 -> 0.4
    assert m.cpt80 == pytest.approx(0.16)
    assert m.n == 5


def test_distinct_scores_hand_computed() -> None:
    weak, strong = np.array([0, 1, 0, 0]), np.array([1, 0, 1, 0])
    m = evaluate_scores([0.1, 0.2, 0.3, 0.4], (weak, strong))
    # Routed strong in score order: +1, -1, +1, 0 -> quality .25 .5 .25 .5 .5 -> PGR 0 1 0 1 1.
    assert [p.pgr for p in m.curve] == pytest.approx([0, 1, 0, 1, 1])
    assert m.apgr == pytest.approx(0.25 * (0.5 + 0.5 + 0.5 + 1.0))
    assert m.cpt50 == pytest.approx(0.125)
    assert m.cpt80 == pytest.approx(0.2)


def test_constant_scores_are_a_random_router_in_expectation() -> None:
    m = evaluate_scores(np.zeros(5), (WEAK, STRONG))
    assert len(m.curve) == 2  # one tie block: a straight line from weak to strong
    assert m.apgr == pytest.approx(0.5)
    assert m.cpt50 == pytest.approx(0.5)
    assert m.cpt80 == pytest.approx(0.8)


def test_random_router_is_about_half_and_reverse_oracle_is_worse() -> None:
    rng = np.random.default_rng(1)
    weak = rng.random(2000) < 0.6
    strong = rng.random(2000) < 0.85
    assert random_apgr((weak, strong), seed=0, repeats=10) == pytest.approx(0.5, abs=0.03)
    best = evaluate_scores(oracle_scores((weak, strong)), (weak, strong)).apgr
    worst = evaluate_scores(-oracle_scores((weak, strong)), (weak, strong)).apgr
    assert worst < 0.5 < best


def test_cpt_interpolates_late_crossings() -> None:
    # Routed strong in order: a tie (no gain), then two gains: PGR 0, 0, 0.5, 1 at shares 0, 1/3, 2/3, 1.
    m = evaluate_scores([0.9, 0.1, 0.5], (np.array([0, 1, 0]), np.array([1, 1, 1])))
    assert [p.pgr for p in m.curve] == pytest.approx([0, 0, 0.5, 1])
    assert m.cpt50 == pytest.approx(2 / 3)
    assert m.cpt80 == pytest.approx(2 / 3 + 0.6 / 3)
    assert m.apgr == pytest.approx((0 + 0.25 + 0.75) / 3)


def test_rows_as_labelled_prompts_and_errors() -> None:
    rows = [LabelledPrompt("a", False, True), LabelledPrompt("b", True, True)]
    shares, quality = quality_curve([0.0, 1.0], rows)
    assert list(shares) == [0.0, 0.5, 1.0]
    assert list(quality) == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="strong-model label"):
        evaluate_scores([0.0], [LabelledPrompt("a", True, None)])
    with pytest.raises(ValueError, match="PGR is undefined"):
        evaluate_scores([0.0, 1.0], (np.array([1, 0]), np.array([1, 0])))
    with pytest.raises(ValueError, match="scores for"):
        evaluate_scores([0.0], rows)
    with pytest.raises(ValueError, match="finite"):
        evaluate_scores([0.0, np.nan], rows)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_threshold_hits_the_requested_strong_share(share: float) -> None:
    scores = np.random.default_rng(0).random(200)
    t = calibrate_threshold(scores, strong_share=share)
    assert np.sum(scores < t) == round(share * 200)


def test_threshold_for_a_quality_target() -> None:
    weak, strong = np.array([0, 1, 0, 0]), np.array([1, 0, 1, 0])
    scores = [0.1, 0.2, 0.3, 0.4]
    # Strong quality 0.5 is first reached by sending only the 0.1 row strong: threshold between 0.1 and 0.2.
    assert calibrate_threshold(scores, (weak, strong), min_quality=1.0) == pytest.approx(0.15)
    # Weak quality (0.25) is already half of the strong model's: no strong calls.
    assert calibrate_threshold(scores, (weak, strong), min_quality=0.5) < 0.1
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_threshold(scores)
    with pytest.raises(ValueError, match="needs labels"):
        calibrate_threshold(scores, min_quality=0.9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrate_threshold(scores, strong_share=1.5)
