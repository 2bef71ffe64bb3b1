"""The route stage on plain data: a scoring router and a length model that say what they are told."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from icgate.cache.store import CacheEntry
from icgate.gateway.config import Policy
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.route import (
    RouteModels,
    best_example,
    choose_tier,
    knob_of,
    predict_length,
    price,
    priced_tokens,
    route,
    threshold_for,
)
from icgate.gateway.pipeline.target import Target, resolve_target
from icgate.gateway.records import Tenant
from icgate.gateway.store.cache_entries import Candidate
from icgate.lengths.predict import LengthEstimate
from icgate.routers.base import RouteDecision, RouteFeatures, Vectors
from icgate.routers.decide import ExampleSignal
from icgate.routers.rules import LongPromptRule
from tests.gateway.pipeline.fakes import FakeEmbed, axis, chat_ctx, make_policy

ALICE = Tenant(id=3, name="alice")
PROMPT = "x" * 40  # 10 estimated prompt tokens


class Scorer:
    """A learned-router stand-in: P(small good enough) is `score`; the tier it names is ignored."""

    def __init__(self, score: float) -> None:
        self.score = score
        self.seen: list[RouteFeatures] = []

    def route(self, features: RouteFeatures) -> RouteDecision:
        self.seen.append(features)
        return RouteDecision(tier="ignored", score=self.score, reasons=("scored",))


class FixedLength:
    def __init__(self, p50: int = 190, p90: int = 400) -> None:
        self.estimate = LengthEstimate(p50, p90)
        self.seen: list[tuple[Vectors | None, int, str | None]] = []

    def predict(self, embedding: Vectors | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        self.seen.append((embedding, prompt_tokens, text))
        return self.estimate


def priced_policy(**router: Any) -> Policy:
    """The large tier costs $1 per 1k tokens in and out, the small one nothing."""
    return make_policy(
        backends=[
            {"name": "small", "tier": "small", "model": "openai/s"},
            {
                "name": "large",
                "tier": "large",
                "model": "openai/l",
                "cost_per_1k_input": 1.0,
                "cost_per_1k_output": 1.0,
            },
        ],
        router={"kind": "learned", **router},
    )


def models_of(router: Any, **kw: Any) -> RouteModels:
    return RouteModels(router=router, length=kw.pop("length", FixedLength()), **kw)


def features(prompt_tokens: int = 10) -> RouteFeatures:
    return RouteFeatures(prompt_tokens=prompt_tokens, conversation_depth=1)


def at(policy: Policy, tokens: int) -> Mapping[str, int]:
    """Both tiers priced at one predicted length (`priced_tokens` with the shared prediction alone)."""
    return priced_tokens(policy, LengthEstimate(tokens, 2 * tokens), {})


def tier_for(policy: Policy, models: RouteModels, example: ExampleSignal | None = None) -> str:
    return choose_tier(policy, models, features(), at(policy, 190), example).tier


# --- choose_tier ---------------------------------------------------------------------------------------


def test_choose_tier_a_rule_decision_stands() -> None:
    rule = LongPromptRule("small", "large", 50)
    policy = priced_policy(threshold=0.99)  # a knob never overrides a rule
    assert choose_tier(policy, models_of(rule), features(50), at(policy, 1), None).tier == "small"
    decision = choose_tier(policy, models_of(rule), features(51), at(policy, 1), None)
    assert decision.tier == "large" and decision.score is None and "51 > 50" in decision.reasons[0]


@pytest.mark.parametrize(("score", "tier"), [(0.61, "small"), (0.6, "small"), (0.59, "large")])
def test_choose_tier_threshold(score: float, tier: str) -> None:
    decision = choose_tier(
        priced_policy(threshold=0.6), models_of(Scorer(score)), features(), {"small": 1, "large": 1}, None
    )
    assert decision.tier == tier and decision.score == pytest.approx(score)


def test_choose_tier_strong_share_is_a_quantile_of_the_calibration_scores() -> None:
    calibration = np.linspace(0.0, 1.0, 101)  # the 30% quantile is 0.30
    policy = priced_policy(strong_share=0.3)
    models = models_of(Scorer(0.31), calibration_scores=calibration, threshold=0.9)
    assert threshold_for(policy.router, models) == pytest.approx(0.3)
    assert tier_for(policy, models) == "small"
    assert tier_for(policy, models_of(Scorer(0.29), calibration_scores=calibration)) == "large"
    # Without calibration scores the share cannot be mapped: the artifact's own threshold decides.
    uncalibrated = models_of(Scorer(0.31), threshold=0.9)
    assert threshold_for(policy.router, uncalibrated) == 0.9 and tier_for(policy, uncalibrated) == "large"


@pytest.mark.parametrize(
    ("router", "calibrated", "knob"),
    [
        ({"quality_value_usd": 0.02}, True, ("router.quality_value_usd", 0.02)),
        ({"threshold": 0.6}, True, ("router.threshold", 0.6)),
        ({"strong_share": 0.3}, True, ("router.strong_share", 0.3)),
        (
            {"strong_share": 0.3},
            False,
            ("calibrated", 0.9),
        ),  # a share it cannot map: the artifact's threshold
        ({}, True, ("calibrated", 0.9)),
    ],
)
def test_knob_of_names_the_setting_threshold_for_reads(
    router: dict[str, Any], calibrated: bool, knob: tuple[str, float]
) -> None:
    scores = np.linspace(0.0, 1.0, 11) if calibrated else None
    models = models_of(Scorer(0.5), calibration_scores=scores, threshold=0.9)
    assert knob_of(priced_policy(**router).router, models) == knob


def test_choose_tier_without_a_knob_uses_the_artifacts_threshold_else_one_half() -> None:
    policy = priced_policy()
    assert tier_for(policy, models_of(Scorer(0.7), threshold=0.8)) == "large"
    assert tier_for(policy, models_of(Scorer(0.7), threshold=0.6)) == "small"
    assert threshold_for(policy.router, models_of(Scorer(0.7))) is None
    assert tier_for(policy, models_of(Scorer(0.5))) == "small"
    assert tier_for(policy, models_of(Scorer(0.49))) == "large"


@pytest.mark.parametrize(("score", "tier"), [(0.9, "small"), (0.8, "small"), (0.7, "large")])
def test_choose_tier_quality_value_weighs_expected_loss_against_the_extra_cost(
    score: float, tier: str
) -> None:
    # The large tier costs (10 prompt + 190 predicted tokens) x $1/1k = $0.20 more; a good answer is worth $1.
    policy = priced_policy(quality_value_usd=1.0)
    models = models_of(Scorer(score), threshold=0.99)  # ignored: the value knob decides
    assert threshold_for(policy.router, models) is None
    decision = choose_tier(policy, models, features(), at(policy, 190), None)
    assert decision.tier == tier
    assert any("extra cost $0.200000" in reason for reason in decision.reasons)


def test_choose_tier_prices_the_large_tier_at_its_own_predicted_length() -> None:
    # Shared prediction 190: large costs (10 + 190) x $1/1k = $0.20 more, and P=0.7 loses $0.30: large.
    # The large backend's own predictor says 390: it costs $0.40 more, over the loss: small.
    policy = priced_policy(quality_value_usd=1.0)
    models = models_of(Scorer(0.7))
    shared = LengthEstimate(190, 400)
    assert choose_tier(policy, models, features(), priced_tokens(policy, shared, {}), None).tier == "large"
    own = {"large": LengthEstimate(390, 800)}
    decision = choose_tier(policy, models, features(), priced_tokens(policy, shared, own), None)
    assert decision.tier == "small"
    assert any("190 output tokens on small, 390 on large" in r for r in decision.reasons)
    assert priced_tokens(policy, shared, own) == {"small": 190, "large": 390}
    # The small backend's own prediction prices the small tier (free here, so only the reason shows it).
    both = {"small": LengthEstimate(50, 90), **own}
    assert priced_tokens(policy, shared, both) == {"small": 50, "large": 390}


def test_choose_tier_a_close_useful_example_lifts_the_small_tiers_chance() -> None:
    policy = priced_policy(threshold=0.6, example_lift=0.5, example_min_similarity=0.75)
    models = models_of(Scorer(0.4))
    assert tier_for(policy, models) == "large"
    assert tier_for(policy, models, ExampleSignal(similarity=1.0, utility=1.0)) == "small"  # 0.4 -> 0.7
    assert tier_for(policy, models, ExampleSignal(similarity=0.74, utility=1.0)) == "large"  # too far


def test_price_of_a_tier_without_backends_is_zero() -> None:
    policy = priced_policy()
    assert price(policy, "large").cost(1000, 1000) == pytest.approx(2.0)
    assert price(policy, "medium").cost(1000, 1000) == 0.0


# --- best_example, predict_length ------------------------------------------------------------------------


def candidate(entry_id: int, similarity: float, utility: float) -> Candidate:
    entry = CacheEntry(
        id=entry_id,
        namespace="anonymous",
        exact_key="k",
        context_fingerprint="",
        embed_text="q",
        prompt_text="q",
        response_text="a",
        response={},
        backend="large",
        tier="large",
        prompt_tokens=1,
        completion_tokens=1,
        vector=axis(0),
        utility=utility,
    )
    return Candidate(entry, similarity)


def lookup_with(candidates: list[Candidate], vector: Any = None) -> CacheLookup:
    return CacheLookup(
        namespace="anonymous",
        exact_key="k",
        servable=True,
        storable=True,
        embed_text=PROMPT,
        prompt_text=PROMPT,
        fingerprint="",
        exact=True,
        semantic=True,
        examples=True,
        store=True,
        vector=vector,
        candidates=candidates,
    )


def test_best_example_is_the_most_similar_candidate_with_its_utility_clamped() -> None:
    assert best_example(None) is None
    assert best_example(lookup_with([])) is None
    found = best_example(
        lookup_with([candidate(1, 0.7, 0.9), candidate(2, 0.9, 1.7), candidate(3, 0.8, 0.1)])
    )
    assert found == ExampleSignal(similarity=0.9, utility=1.0)
    assert best_example(lookup_with([candidate(1, 0.7, -0.5)])) == ExampleSignal(similarity=0.7, utility=0.0)


@pytest.mark.parametrize(
    ("max_tokens", "expected"), [(None, (190, 400)), (1000, (190, 400)), (300, (190, 300)), (100, (100, 100))]
)
def test_predict_length_is_capped_by_max_tokens(max_tokens: int | None, expected: tuple[int, int]) -> None:
    estimate = predict_length(models_of(Scorer(0.5)), features(), PROMPT, max_tokens)
    assert (estimate.p50, estimate.p90) == expected


# --- route ---------------------------------------------------------------------------------------------


async def test_route_sizes_the_answer_by_max_tokens_or_max_completion_tokens() -> None:
    policy = priced_policy(threshold=0.5)
    caps: list[dict[str, Any]] = [{"max_tokens": 120}, {"max_completion_tokens": 120}]
    for cap in caps:
        outcome = await route(
            chat_ctx(PROMPT, **cap), Target(routed=True), None, models_of(Scorer(0.9)), policy, None
        )
        assert (outcome.predicted.p50, outcome.predicted.p90) == (120, 120)
        assert (outcome.prompt_tokens, outcome.tier) == (10, "small")
        assert outcome.knob == ("router.threshold", 0.5)  # the setting that turned the score into the tier


async def test_route_reuses_the_cache_stages_embedding_and_best_example() -> None:
    scorer, embed = Scorer(0.9), FakeEmbed()
    models = models_of(scorer, router_needs_embedding=True, router_version="r7", length_version="l3")
    lookup = lookup_with([candidate(1, 0.8, 0.6)], vector=axis(2))
    outcome = await route(chat_ctx(PROMPT), Target(routed=True), lookup, models, priced_policy(), embed)
    assert embed.calls == []  # one embedding per request: the cache stage's
    [seen] = scorer.seen
    assert seen.embedding is not None and np.array_equal(seen.embedding, axis(2))
    assert seen.extra == {"example_similarity": 0.8, "example_utility": 0.6}
    assert (seen.text, seen.prompt_tokens, seen.conversation_depth) == (PROMPT, 10, 1)
    assert (outcome.router_version, outcome.length_version) == ("r7", "l3")


async def test_route_embeds_for_a_router_that_needs_it_when_the_cache_did_not() -> None:
    scorer, embed = Scorer(0.9), FakeEmbed({PROMPT: axis(3)})
    length = FixedLength()
    models = models_of(scorer, router_needs_embedding=True, length=length)
    outcome = await route(chat_ctx(PROMPT, ALICE), Target(routed=True), None, models, priced_policy(), embed)
    assert embed.calls == [(PROMPT, "tenant:3")]  # in the tenant's memo scope
    assert outcome.tier == "small" and scorer.seen[0].embedding is not None
    assert length.seen[0][0] is not None and np.array_equal(length.seen[0][0], axis(3))


async def test_route_without_an_embedder_falls_back_to_the_default_tier() -> None:
    scorer = Scorer(0.0)  # would say large
    models = models_of(scorer, router_needs_embedding=True)
    policy = priced_policy(default_tier="large")
    outcome = await route(chat_ctx(PROMPT), Target(routed=True), None, models, policy, None)
    assert outcome.tier == "large" and outcome.decision.score is None
    assert "embedder off" in outcome.decision.reasons[0] and outcome.knob is None  # no score, no knob
    assert scorer.seen == []
    assert outcome.predicted == LengthEstimate(190, 400)  # still sized for admission


async def test_route_with_a_busy_embedder_takes_the_default_tier_and_says_why() -> None:
    scorer, embed = Scorer(0.0), FakeEmbed(busy=True)
    models = models_of(scorer, router_needs_embedding=True)
    policy = priced_policy(default_tier="large")
    outcome = await route(chat_ctx(PROMPT), Target(routed=True), None, models, policy, embed)
    assert outcome.tier == "large" and "embedder busy" in outcome.decision.reasons[0]
    assert scorer.seen == []
    # the cache stage already found the embedder busy: the route stage does not ask again
    embed.calls.clear()
    skipped = replace(lookup_with([]), skipped="embedder-busy")
    outcome = await route(chat_ctx(PROMPT), Target(routed=True), skipped, models, policy, embed)
    assert embed.calls == [] and "embedder busy" in outcome.decision.reasons[0]


async def test_route_a_router_without_embeddings_needs_no_embedder() -> None:
    scorer = Scorer(0.2)
    outcome = await route(
        chat_ctx(PROMPT), Target(routed=True), None, models_of(scorer), priced_policy(), None
    )
    assert outcome.tier == "large" and scorer.seen[0].embedding is None


async def test_route_a_named_backend_keeps_its_tier_and_embeds_nothing() -> None:
    policy = priced_policy()
    scorer, embed = Scorer(1.0), FakeEmbed()
    models = models_of(scorer, router_needs_embedding=True, router_version="r7")
    outcome = await route(
        chat_ctx(PROMPT, model="large"), resolve_target("large", policy), None, models, policy, embed
    )
    assert outcome.tier == "large" and outcome.decision.score is None
    assert outcome.decision.reasons == ("addressed as large",)
    assert outcome.router_version is None  # no router decided
    assert scorer.seen == [] and embed.calls == []


async def test_route_a_completions_request_has_no_conversation_depth() -> None:
    scorer = Scorer(0.9)
    ctx = chat_ctx(PROMPT)
    ctx.endpoint, ctx.body = "completions", {"model": "auto", "prompt": PROMPT}
    await route(ctx, Target(routed=True), None, models_of(scorer), priced_policy(), None)
    assert (scorer.seen[0].conversation_depth, scorer.seen[0].prompt_tokens, scorer.seen[0].text) == (
        0,
        10,
        PROMPT,
    )
