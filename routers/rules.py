"""The placeholder router: a rule on prompt length, until a learned router replaces it."""

from __future__ import annotations

from routers.base import RouteDecision, RouteFeatures


class PromptLengthRule:
    """Long prompts go to the large tier; everything else to the default tier."""

    def __init__(self, default_tier: str, large_tier: str, large_if_prompt_tokens_over: int) -> None:
        self.default_tier = default_tier
        self.large_tier = large_tier
        self.threshold = large_if_prompt_tokens_over

    def route(self, features: RouteFeatures) -> RouteDecision:
        if features.prompt_tokens > self.threshold:
            return RouteDecision(
                tier=self.large_tier,
                score=None,
                reasons=(f"prompt_tokens {features.prompt_tokens} > {self.threshold}",),
            )
        return RouteDecision(
            tier=self.default_tier,
            score=None,
            reasons=(f"prompt_tokens {features.prompt_tokens} <= {self.threshold}",),
        )
