"""Routing decisions: which tier should answer a request.

A plain library: features in, a decision with its reasons out. The contract
follows RouteLLM's: a router scores a request; thresholds and the tiers it
chooses between are configuration, so routers stay comparable.
"""

from routers.base import RouteDecision, RouteFeatures, Router
from routers.data import LabelledPrompt, load_routing_csv, rows_from_records, split_rows
from routers.evaluation import RouterMetrics, calibrate_threshold, evaluate_scores
from routers.learned import (
    ClassifierRouter,
    LearnedRouter,
    NearestNeighbourRouter,
    RandomRouter,
    evaluate_router,
    recalibrate,
    train_router,
)
from routers.rules import PromptLengthRule

__all__ = [
    "ClassifierRouter",
    "LabelledPrompt",
    "LearnedRouter",
    "NearestNeighbourRouter",
    "PromptLengthRule",
    "RandomRouter",
    "RouteDecision",
    "RouteFeatures",
    "Router",
    "RouterMetrics",
    "calibrate_threshold",
    "evaluate_router",
    "evaluate_scores",
    "load_routing_csv",
    "recalibrate",
    "rows_from_records",
    "split_rows",
    "train_router",
]
