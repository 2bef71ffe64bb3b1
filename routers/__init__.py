"""Routing decisions: which tier should answer a request.

A plain library: features in, a decision with its reasons out. The contract
follows RouteLLM's: a router scores a request; thresholds and the tiers it
chooses between are configuration, so routers stay comparable.
"""

from routers.base import RouteDecision, RouteFeatures, Router
from routers.rules import PromptLengthRule

__all__ = ["PromptLengthRule", "RouteDecision", "RouteFeatures", "Router"]
