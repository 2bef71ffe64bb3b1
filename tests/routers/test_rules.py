"""The placeholder long-prompt rule."""

from __future__ import annotations

import pytest

from icgate.routers.base import RouteFeatures
from icgate.routers.rules import LongPromptRule


@pytest.mark.parametrize(
    ("prompt_tokens", "tier"),
    [(0, "small"), (1, "small"), (99, "small"), (100, "small"), (101, "large"), (10_000, "large")],
)
def test_prompt_length_boundaries(prompt_tokens: int, tier: str) -> None:
    rule = LongPromptRule(default_tier="small", large_tier="large", large_if_prompt_tokens_over=100)
    decision = rule.route(RouteFeatures(prompt_tokens=prompt_tokens, conversation_depth=1))
    assert decision.tier == tier
    assert decision.score is None
    assert decision.reasons == (f"prompt_tokens {prompt_tokens} {'>' if tier == 'large' else '<='} 100",)


def test_zero_threshold_sends_every_nonempty_prompt_to_large() -> None:
    rule = LongPromptRule("small", "large", 0)
    assert rule.route(RouteFeatures(prompt_tokens=0, conversation_depth=0)).tier == "small"
    assert rule.route(RouteFeatures(prompt_tokens=1, conversation_depth=0)).tier == "large"


def test_tier_names_come_from_configuration() -> None:
    rule = LongPromptRule(default_tier="cheap", large_tier="premium", large_if_prompt_tokens_over=10)
    assert rule.route(RouteFeatures(10, 3)).tier == "cheap"
    assert rule.route(RouteFeatures(11, 3)).tier == "premium"


def test_only_prompt_length_matters() -> None:
    rule = LongPromptRule("small", "large", 10)
    deep = rule.route(RouteFeatures(prompt_tokens=5, conversation_depth=50, extra={"x": 1.0}))
    assert deep.tier == "small"
