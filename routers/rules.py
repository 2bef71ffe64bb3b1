"""The placeholder router: a rule on the prompt's length, until a learned router replaces it."""

from __future__ import annotations

from icgate.routers.base import RouteDecision, RouteFeatures


class LongPromptRule:
    """Prompts longer than `large_if_prompt_tokens_over` go to the large tier; everything else to the
    default tier. (It reads the prompt's length; predicting the answer's length is `lengths`' job.)"""

    def __init__(self, default_tier: str, large_tier: str, large_if_prompt_tokens_over: int) -> None:
        self.default_tier = default_tier
        self.large_tier = large_tier
        self.max_prompt_tokens = large_if_prompt_tokens_over

    def route(self, features: RouteFeatures) -> RouteDecision:
        if features.prompt_tokens > self.max_prompt_tokens:
            return RouteDecision(
                tier=self.large_tier,
                score=None,
                reasons=(f"prompt_tokens {features.prompt_tokens} > {self.max_prompt_tokens}",),
            )
        return RouteDecision(
            tier=self.default_tier,
            score=None,
            reasons=(f"prompt_tokens {features.prompt_tokens} <= {self.max_prompt_tokens}",),
        )
