"""The cost-aware decision: threshold knob, value-of-quality knob, and the example lift."""

from __future__ import annotations

import pytest

from icgate.routers.decide import DecisionKnob, ExampleSignal, TierPrice, decide, lifted

SMALL = TierPrice("small", 0.0, 0.0)
LARGE = TierPrice("large", 0.01, 0.03)  # $ per 1k tokens


def test_threshold_knob_picks_small_at_or_above_it() -> None:
    knob = DecisionKnob(threshold=0.6)
    assert decide(0.6, SMALL, LARGE, 100, 200, knob).tier == "small"
    below = decide(0.59, SMALL, LARGE, 100, 200, knob)
    assert below.tier == "large" and below.score == pytest.approx(0.59)
    assert any("threshold 0.600" in r for r in below.reasons)


def test_value_knob_weighs_expected_quality_loss_against_extra_cost() -> None:
    # large costs (100*0.01 + 200*0.03)/1000 = $0.007 more; with P=0.9 the expected loss is 0.1 x value
    knob = DecisionKnob(quality_value_usd=0.05)  # loss $0.005 < $0.007: small is worth it
    assert decide(0.9, SMALL, LARGE, 100, 200, knob).tier == "small"
    knob = DecisionKnob(quality_value_usd=0.10)  # loss $0.010 > $0.007: pay for large
    assert decide(0.9, SMALL, LARGE, 100, 200, knob).tier == "large"
    # a longer predicted answer makes large dearer, so the same request goes small
    assert decide(0.9, SMALL, LARGE, 100, 400, knob).tier == "small"


def test_value_knob_prices_each_tier_at_its_own_predicted_length() -> None:
    # P=0.9, a good answer worth $0.10: the expected loss is $0.010. At 200 tokens on both tiers large
    # costs $0.007 more (large); if large is predicted to answer with 400, it costs $0.013 more (small).
    knob = DecisionKnob(quality_value_usd=0.10)
    assert decide(0.9, SMALL, LARGE, 100, 200, knob, large_tokens=200).tier == "large"
    verbose = decide(0.9, SMALL, LARGE, 100, 200, knob, large_tokens=400)
    assert verbose.tier == "small"
    assert any("200 output tokens on small, 400 on large" in r and "$0.013000" in r for r in verbose.reasons)
    # A small tier that is not free is priced at its own length too: $0.001/1k out x 1000 tokens.
    chatty_small = TierPrice("small", 0.0, 0.001)
    # extra = 0.013 - 0.001 = $0.012 > loss $0.010 -> small; with the small tier at 200 tokens, 0.0128
    assert decide(0.9, chatty_small, LARGE, 100, 1000, knob, large_tokens=400).tier == "small"
    knob = DecisionKnob(quality_value_usd=0.125)  # loss $0.0125: between the two extra costs
    assert decide(0.9, chatty_small, LARGE, 100, 1000, knob, large_tokens=400).tier == "large"
    assert decide(0.9, chatty_small, LARGE, 100, 200, knob, large_tokens=400).tier == "small"


def test_a_close_useful_example_lifts_the_small_tiers_chances() -> None:
    knob = DecisionKnob(threshold=0.7, example_lift=0.5, example_min_similarity=0.75)
    assert decide(0.6, SMALL, LARGE, 10, 10, knob).tier == "large"
    helped = decide(0.6, SMALL, LARGE, 10, 10, knob, ExampleSignal(similarity=0.95, utility=1.0))
    assert helped.tier == "small" and helped.score == pytest.approx(0.6 + 0.4 * 0.5 * 0.8)
    assert any("lifted" in r for r in helped.reasons)
    # a far or useless example does nothing
    assert lifted(0.6, ExampleSignal(0.70, 1.0), knob) == (0.6, 0.0)
    assert lifted(0.6, ExampleSignal(0.99, 0.0), knob) == (0.6, 0.0)
