"""The route stage: features from what the cache found, a length prediction, a scored and priced decision.

The learned parts (router and length predictor) live in `Models`, one immutable record that the model
watchers replace whole when a newer artifact is published, so a request never sees a router from one
version and a threshold from another.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from gateway import model_store
from gateway.backends import message_text
from gateway.cache_service import CacheLookup
from gateway.config import BackendConfig, Policy, RouterConfig
from gateway.model_store import StoredModel
from routers.base import RouteDecision, RouteFeatures, Router
from routers.decide import DecisionKnob, ExampleSignal, TierPrice, decide
from routers.learned import DEFAULT_ARTIFACT, LearnedRouter
from routers.length import (
    LengthEstimate,
    LengthModel,
    LengthPredictor,
    PromptLengthHeuristic,
    load_length_model,
)
from routers.rules import PromptLengthRule

SHIPPED_ROUTER = DEFAULT_ARTIFACT
log = logging.getLogger("icgate.routing")


@dataclass(frozen=True)
class Models:
    router: Router
    length: LengthModel
    # The router's calibrated threshold and its calibration scores (for `strong_share`), when learned.
    threshold: float | None = None
    calibration_scores: np.ndarray | None = None
    router_version: str = "rule"
    length_version: str = "heuristic"
    # model_artifacts rows in force (None: a file, not a published row)
    router_row: int | None = None
    length_row: int | None = None
    router_needs_embedding: bool = False


@dataclass(frozen=True)
class LoadedRouter:
    router: Router
    threshold: float | None
    calibration_scores: np.ndarray | None
    version: str


def load_router(blob: bytes) -> LoadedRouter:
    """A trained router artifact; its score quantiles (kept at training) map `strong_share` to a threshold."""
    trained = LearnedRouter.from_bytes(blob)
    quantiles = trained.metadata.get("score_quantiles")
    scores = None if quantiles is None else np.asarray(quantiles, dtype=np.float64)
    return LoadedRouter(trained, trained.threshold, scores, trained.version)


def load_router_file(path: str | Path) -> LoadedRouter:
    return load_router(Path(path).read_bytes())


def load_length(blob: bytes) -> LengthModel:
    return LengthPredictor.from_bytes(blob, source="model_artifacts")


def with_router(models: Models, loaded: LoadedRouter, stored: StoredModel | None, policy: Policy) -> Models:
    router = loaded.router
    if isinstance(router, LearnedRouter):  # the tiers it chooses between are the policy's
        router.small_tier, router.large_tier = policy.router.default_tier, policy.router.large_tier
    return replace(
        models,
        router=router,
        router_needs_embedding=True,
        threshold=loaded.threshold,
        calibration_scores=loaded.calibration_scores,
        router_version=loaded.version,
        router_row=None if stored is None else stored.id,
    )


def with_length(models: Models, loaded: LengthModel, stored: StoredModel | None) -> Models:
    return replace(
        models,
        length=loaded,
        length_version=getattr(loaded, "version", "heuristic"),
        length_row=None if stored is None else stored.id,
    )


def initial_models(policy: Policy, engine: sa.Engine) -> Models:
    """What the gateway starts with: published rows win over the policy's file and the shipped artifacts."""
    config = policy.router
    rule = PromptLengthRule(config.default_tier, config.large_tier, config.large_if_prompt_tokens_over)
    models = Models(router=rule, length=PromptLengthHeuristic())
    length_row = model_store.newest(engine, "length")
    try:
        models = with_length(models, load_length(length_row.artifact), length_row) if length_row else models
    except ValueError:
        log.exception("published length predictor (row %s) did not load; using the shipped one", length_row)
    if models.length_row is None:
        models = with_length(models, load_length_model(), None)
    if config.kind == "rule":
        return models
    if config.artifact is not None:  # a file the operator named: failing to load it is fatal
        return with_router(models, load_router_file(config.artifact), None, policy)
    router_row = model_store.newest(engine, "router")
    if router_row is not None:
        try:
            return with_router(models, load_router(router_row.artifact), router_row, policy)
        except ValueError:
            log.exception("published router (row %d) did not load; using the shipped one", router_row.id)
    return with_router(models, load_router_file(SHIPPED_ROUTER), None, policy)


def threshold_for(config: RouterConfig, models: Models) -> float | None:
    """The knob as a threshold on P(small good enough); None when `quality_value_usd` decides."""
    if config.quality_value_usd is not None:
        return None
    if config.threshold is not None:
        return config.threshold
    if config.strong_share is not None and models.calibration_scores is not None:
        # share s of requests to large = the s-quantile of the scores: below it, large
        return float(np.quantile(models.calibration_scores, config.strong_share))
    return models.threshold


def last_user_text(body: dict[str, Any], endpoint: str = "chat") -> str:
    if endpoint != "chat":
        return str(body.get("prompt", ""))
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    return message_text(users[-1].get("content")) if users else ""


def best_example(lookup: CacheLookup | None) -> ExampleSignal | None:
    """The closest retrieved pair (the one the small tier would see first), if any."""
    if lookup is None or not lookup.candidates:
        return None
    best = max(lookup.candidates, key=lambda c: c.similarity)
    return ExampleSignal(similarity=best.similarity, utility=min(1.0, max(0.0, best.entry.utility)))


def with_cache_view(
    features: RouteFeatures, vector: np.ndarray | None, example: ExampleSignal | None, text: str
) -> RouteFeatures:
    """The request's features plus what the cache stage found: the embedding and the best example."""
    extra = dict(features.extra)
    if example is not None:
        extra.update(example_similarity=example.similarity, example_utility=example.utility)
    return replace(features, embedding=vector, extra=extra, text=text)


def predict_length(
    models: Models, features: RouteFeatures, text: str, max_tokens: int | None
) -> LengthEstimate:
    """The predicted output length, capped by the request's own `max_tokens`."""
    estimate = models.length.predict(features.embedding, features.prompt_tokens, text)
    if max_tokens:
        return LengthEstimate(p50=min(estimate.p50, max_tokens), p90=min(estimate.p90, max_tokens))
    return estimate


def sampled(share: float) -> bool:
    """Keep this routed request as a route sample? (`router.sample_share` of them are kept.)"""
    return share >= 1.0 or random.random() < share


def price(policy: Policy, tier: str) -> TierPrice:
    backends: list[BackendConfig] = policy.tier(tier)
    if not backends:
        return TierPrice(tier, 0.0, 0.0)
    first = backends[0]
    return TierPrice(tier, first.cost_per_1k_input, first.cost_per_1k_output)


def choose_tier(
    policy: Policy,
    models: Models,
    features: RouteFeatures,
    predicted: LengthEstimate,
    example: ExampleSignal | None,
) -> RouteDecision:
    """The routed decision: the rule as configured, or the learned score through the policy's knob."""
    config = policy.router
    scored = models.router.route(features)
    if scored.score is None:  # a rule: its decision stands
        return scored
    p_small = float(scored.score)
    knob = DecisionKnob(
        threshold=threshold_for(config, models),
        quality_value_usd=config.quality_value_usd,
        example_lift=config.example_lift,
        example_min_similarity=config.example_min_similarity,
    )
    return decide(
        p_small,
        price(policy, config.default_tier),
        price(policy, config.large_tier),
        features.prompt_tokens,
        predicted.p50,
        knob,
        example,
    )
