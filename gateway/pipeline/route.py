"""Stage 5, route: which tier answers, and how long the answer will be.

Features come from the request and from what the cache stage found (its embedding, the best example);
the length predictor sizes the answer, and each backend with a predictor of its own sizes it again as
that backend would answer (admission reads the size of the backend it places the request on); a rule or
the learned router decides, priced through the policy's knob. The learned parts are one immutable
`RouteModels` record (`gateway.route_models`) that is swapped whole when a newer artifact is published, so
a request never sees a router from one version and a threshold from another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from icgate.cache.embed import EmbedderBusyError
from icgate.gateway.config import LengthsConfig, Policy, RouterConfig
from icgate.gateway.pipeline.cache_lookup import EMBEDDER_BUSY, CacheLookup, Embed, embed_request
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext, namespace_for
from icgate.gateway.route_models import RouteModels
from icgate.lengths.predict import ConstantLength, LengthEstimate, estimate_for, prompt_view
from icgate.routers.base import RouteDecision, RouteFeatures
from icgate.routers.decide import DecisionKnob, ExampleSignal, TierPrice, decide
from icgate.text import conversation_depth, prompt_text

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class RouteOutcome:
    """The route stage's decision and the sizes admission needs."""

    decision: RouteDecision
    prompt_tokens: int  # the estimate the router saw (icgate.text.estimate_prompt_tokens)
    predicted: LengthEstimate
    router_version: str | None  # None for a request addressed to one backend
    length_version: str
    # The policy setting that turned a learned score into the tier, and its value (`knob_of`); None when a
    # rule or the request's target decided.
    knob: tuple[str, float | None] | None = None
    # The length as each backend with its own predictor would answer (capped like `predicted`); a backend
    # not named here is sized by `predicted`.
    per_backend: Mapping[str, LengthEstimate] = field(default_factory=lambda: MappingProxyType({}))
    # The output tokens (p50) a learned decision priced each tier at (`priced_tokens`); empty otherwise.
    priced: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def tier(self) -> str:
        return self.decision.tier

    def predicted_for(self, backend: str) -> LengthEstimate:
        """The answer's predicted length on `backend`."""
        return self.per_backend.get(backend, self.predicted)


@dataclass(frozen=True)
class Lengths:
    """The predicted output: the shared predictor's, each backend's own, and what made them."""

    predicted: LengthEstimate
    per_backend: Mapping[str, LengthEstimate]
    version: str


async def route(
    ctx: RequestContext,
    target: Target,
    lookup: CacheLookup | None,
    models: RouteModels,
    policy: Policy,
    embed: Embed | None,
) -> RouteOutcome:
    """Features (with the cache's embedding and best example), predicted length, then the decision."""
    needs_vector = target.routed and models.router_needs_embedding
    vector = lookup.vector if lookup is not None else None
    busy = lookup is not None and lookup.skipped == EMBEDDER_BUSY
    text = prompt_text(ctx.body, ctx.endpoint)
    if vector is None and needs_vector and embed is not None and text and not busy:
        # the cache was off for this request: embed for the router (in the tenant's memo scope)
        try:
            vector = await embed_request(embed, text, namespace_for(ctx.tenant))
        except EmbedderBusyError:
            busy = True
    example = best_example(lookup)
    features = with_cache_view(route_features(ctx), vector, example, text)
    lengths = predict_lengths(
        models,
        policy.lengths,
        features,
        text,
        ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens"),
    )
    predicted = lengths.predicted
    priced: Mapping[str, int] = MappingProxyType({})
    if target.backend is not None:
        reason = f"addressed as {target.backend.name}"
        decision = RouteDecision(tier=target.backend.tier, score=None, reasons=(reason,))
    elif needs_vector and vector is None:
        why = "embedder busy" if busy else "embedder off"
        reason = f"no request embedding ({why}): default tier"
        decision = RouteDecision(policy.router.default_tier, None, (reason,))
    else:
        priced = priced_tokens(policy, predicted, lengths.per_backend)
        decision = choose_tier(policy, models, features, priced, example)
    scored = decision.score is not None
    return RouteOutcome(
        decision=decision,
        prompt_tokens=features.prompt_tokens,
        predicted=predicted,
        router_version=models.router_version if target.routed else None,
        length_version=lengths.version,
        knob=knob_of(policy.router, models) if scored else None,
        per_backend=lengths.per_backend,
        priced=priced if scored else MappingProxyType({}),
    )


def route_features(ctx: RequestContext) -> RouteFeatures:
    """The features a router is trained on, computed as training computes them (see the parity test)."""
    messages = ctx.body["messages"] if ctx.endpoint == "chat" else []
    return RouteFeatures(
        prompt_tokens=ctx.prompt_estimate,
        conversation_depth=conversation_depth(messages),
    )


def best_example(lookup: CacheLookup | None) -> ExampleSignal | None:
    """The closest retrieved pair (the one the small tier would see first), if any."""
    if lookup is None or not lookup.candidates:
        return None
    best = max(lookup.candidates, key=lambda c: c.similarity)
    return ExampleSignal(similarity=best.similarity, utility=min(1.0, max(0.0, best.entry.utility)))


def with_cache_view(
    features: RouteFeatures, vector: Vector | None, example: ExampleSignal | None, text: str
) -> RouteFeatures:
    """The request's features plus what the cache stage found: the embedding and the best example."""
    extra = dict(features.extra)
    if example is not None:
        extra.update(example_similarity=example.similarity, example_utility=example.utility)
    return replace(features, embedding=vector, extra=extra, text=text)


def predict_length(
    models: RouteModels, features: RouteFeatures, text: str, max_tokens: int | None
) -> LengthEstimate:
    """The predicted output length, capped by the request's own `max_tokens`."""
    estimate = models.length.predict(features.embedding, features.prompt_tokens, text)
    return capped(estimate, max_tokens)


def capped(estimate: LengthEstimate, max_tokens: int | None) -> LengthEstimate:
    if max_tokens:
        return LengthEstimate(p50=min(estimate.p50, max_tokens), p90=min(estimate.p90, max_tokens))
    return estimate


def predict_lengths(
    models: RouteModels,
    config: LengthsConfig,
    features: RouteFeatures,
    text: str,
    max_tokens: int | None,
) -> Lengths:
    """The shared prediction and each backend's own (the text features read once), capped by
    `max_tokens`; with `lengths.predictor: constant`, the constant for every request and backend."""
    if config.predictor == "constant":
        constant = ConstantLength(
            config.constant_tokens, round(config.constant_tokens * config.constant_p90_factor)
        )
        return Lengths(capped(constant.estimate, max_tokens), MappingProxyType({}), "constant")
    seen = prompt_view(features.embedding, features.prompt_tokens, text)
    own = {
        name: capped(estimate_for(backend.model, seen), max_tokens)
        for name, backend in models.backend_lengths.items()
    }
    shared = capped(estimate_for(models.length, seen), max_tokens)
    return Lengths(shared, MappingProxyType(own), models.length_version)


def threshold_for(config: RouterConfig, models: RouteModels) -> float | None:
    """The knob as a threshold on P(small good enough); None when `quality_value_usd` decides."""
    if config.quality_value_usd is not None:
        return None
    if config.threshold is not None:
        return config.threshold
    if config.strong_share is not None and models.calibration_scores is not None:
        # share s of requests to large = the s-quantile of the scores: below it, large
        return float(np.quantile(models.calibration_scores, config.strong_share))
    return models.threshold


def knob_of(config: RouterConfig, models: RouteModels) -> tuple[str, float | None]:
    """Which setting decided a learned route, and its value, read as `threshold_for` reads them."""
    if config.quality_value_usd is not None:
        return "router.quality_value_usd", config.quality_value_usd
    if config.threshold is not None:
        return "router.threshold", config.threshold
    if config.strong_share is not None and models.calibration_scores is not None:
        return "router.strong_share", config.strong_share
    return "calibrated", models.threshold


def priced_tokens(
    policy: Policy, predicted: LengthEstimate, per_backend: Mapping[str, LengthEstimate]
) -> Mapping[str, int]:
    """The output tokens (p50) each tier is priced at: as the backend whose price `price` takes (the
    tier's first) is predicted to answer, by its own predictor where it has one, else `predicted`."""
    tiers = (policy.router.default_tier, policy.router.large_tier)
    out = {}
    for tier in tiers:
        backends = policy.tier(tier)
        own = per_backend.get(backends[0].name) if backends else None
        out[tier] = (own or predicted).p50
    return MappingProxyType(out)


def price(policy: Policy, tier: str) -> TierPrice:
    backends = policy.tier(tier)
    if not backends:
        return TierPrice(tier, 0.0, 0.0)
    first = backends[0]
    return TierPrice(tier, first.cost_per_1k_input, first.cost_per_1k_output)


def choose_tier(
    policy: Policy,
    models: RouteModels,
    features: RouteFeatures,
    priced: Mapping[str, int],
    example: ExampleSignal | None,
) -> RouteDecision:
    """The routed decision: the rule as configured, or the learned score through the policy's knob; the
    cost knob prices each tier at its own predicted output tokens, `priced` (`priced_tokens`)."""
    config = policy.router
    scored = models.router.route(features)
    if scored.score is None:  # a rule: its decision stands
        return scored
    knob = DecisionKnob(
        threshold=threshold_for(config, models),
        quality_value_usd=config.quality_value_usd,
        example_lift=config.example_lift,
        example_min_similarity=config.example_min_similarity,
    )
    return decide(
        float(scored.score),
        price(policy, config.default_tier),
        price(policy, config.large_tier),
        features.prompt_tokens,
        priced[config.default_tier],
        knob,
        example,
        large_tokens=priced[config.large_tier],
    )
