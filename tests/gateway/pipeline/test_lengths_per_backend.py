"""Each backend sized by its own length predictor, on plain data: the route stage's per-backend estimates,
the admit stage's ask, and admission choosing with the size of the backend it weighs."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import numpy as np

from icgate.gateway.backends.admission import Admission, Ask
from icgate.gateway.config import AdmissionConfig, BackendConfig, Policy, PriorityClass
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.admit import ask_for
from icgate.gateway.pipeline.route import RouteOutcome, predict_lengths, route
from icgate.gateway.pipeline.target import Target
from icgate.gateway.route_models import BackendLength, RouteModels, rule_models, with_backend_length
from icgate.lengths.predict import LengthEstimate, Vectors
from icgate.routers.base import RouteDecision, RouteFeatures
from tests.gateway.pipeline.fakes import chat_ctx, make_policy


class Scaled:
    """A length model: `scale` tokens per prompt token (so its estimates are easy to tell apart)."""

    def __init__(self, scale: float, version: str = "scaled") -> None:
        self.scale = scale
        self.version = version
        self.summary = {"rows": 5000}

    def predict(self, embedding: Vectors | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        p50 = round(self.scale * prompt_tokens)
        return LengthEstimate(p50, 2 * p50)


def two_backends(**lengths: Any) -> Policy:
    return make_policy(
        backends=[
            {"name": "terse", "tier": "small", "model": "openai/t"},
            {"name": "chatty", "tier": "small", "model": "openai/c"},
            {"name": "large", "tier": "large", "model": "openai/l"},
        ],
        lengths=lengths,
    )


def models_with_own(policy: Policy) -> RouteModels:
    models = rule_models(policy)
    models = with_backend_length(models, "terse", Scaled(1.0, "t1"), None, policy)
    return with_backend_length(models, "chatty", Scaled(10.0, "c1"), None, policy)


def test_each_backend_with_its_own_predictor_gets_its_own_estimate_capped_by_max_tokens() -> None:
    policy = two_backends()
    models = models_with_own(policy)
    feats = RouteFeatures(prompt_tokens=40, conversation_depth=1)
    lengths = predict_lengths(models, policy.lengths, feats, "Tell me about tides.", None)
    assert dict(lengths.per_backend) == {"terse": LengthEstimate(40, 80), "chatty": LengthEstimate(400, 800)}
    assert "large" not in lengths.per_backend  # no predictor of its own: the shared estimate sizes it
    capped = predict_lengths(models, policy.lengths, feats, "Tell me about tides.", 100)
    assert dict(capped.per_backend) == {"terse": LengthEstimate(40, 80), "chatty": LengthEstimate(100, 100)}
    assert capped.predicted.p90 <= 100


def test_the_constant_predictor_sizes_every_request_and_backend_alike() -> None:
    policy = two_backends(predictor="constant", constant_tokens=250, constant_p90_factor=3.0)
    models = models_with_own(policy)
    for prompt_tokens, text in ((5, "hi"), (900, "Write a detailed essay on tides.")):
        lengths = predict_lengths(models, policy.lengths, RouteFeatures(prompt_tokens, 1), text, None)
        assert (lengths.predicted, dict(lengths.per_backend), lengths.version) == (
            LengthEstimate(250, 750),
            {},
            "constant",
        )
    capped = predict_lengths(models, policy.lengths, RouteFeatures(5, 1), "hi", 100)
    assert capped.predicted == LengthEstimate(100, 100)


def test_a_backends_predictor_is_used_only_once_fitted_on_min_rows_answers() -> None:
    policy = two_backends(min_rows=6000, max_rows=6000)
    models = with_backend_length(rule_models(policy), "terse", Scaled(1.0), None, policy)  # 5,000 answers
    assert dict(models.backend_lengths) == {}
    lower = two_backends(min_rows=5000)
    models = with_backend_length(rule_models(lower), "terse", Scaled(1.0), None, lower)
    assert list(models.backend_lengths) == ["terse"] and models.backend_lengths["terse"].answers == 5000


async def test_route_outcome_carries_each_backends_estimate() -> None:
    policy = two_backends()
    ctx = chat_ctx("x" * 160)  # 40 estimated prompt tokens
    outcome = await route(ctx, Target(routed=True), None, models_with_own(policy), policy, None)
    assert outcome.predicted_for("terse") == LengthEstimate(40, 80)
    assert outcome.predicted_for("chatty") == LengthEstimate(400, 800)
    assert outcome.predicted_for("large") == outcome.predicted  # the shared estimate


class Even:
    """A learned-router stand-in: P(small good enough) = 0.7 for every request."""

    def route(self, features: RouteFeatures) -> RouteDecision:
        return RouteDecision("ignored", 0.7, ())


async def test_the_cost_knob_prices_each_tier_at_its_own_backends_length_and_the_log_says_so() -> None:
    """The small tier's backend (`terse`) is predicted to answer 40 tokens, the large one 80, the shared
    predictor 60. P(small good enough) 0.7 and a good answer worth $0.35: the expected loss is $0.105.
    Priced at the shared 60 tokens, large costs (40 + 60) x $1/1k = $0.10 more, under the loss: large.
    Priced at its own 80, it costs $0.12 more, over the loss: small."""
    policy = make_policy(
        backends=[
            {"name": "terse", "tier": "small", "model": "openai/t"},
            {"name": "large", "tier": "large", "model": "openai/l"}
            | {"cost_per_1k_input": 1.0, "cost_per_1k_output": 1.0},
        ],
        router={"kind": "learned", "quality_value_usd": 0.35},
    )
    models = with_backend_length(rule_models(policy), "terse", Scaled(1.0, "t1"), None, policy)
    models = with_backend_length(models, "large", Scaled(2.0, "l1"), None, policy)
    models = replace(models, router=Even(), length=Scaled(1.5, "shared"))
    ctx = chat_ctx("x" * 160)  # 40 estimated prompt tokens
    outcome = await route(ctx, Target(routed=True), None, models, policy, None)
    assert outcome.tier == "small"
    assert dict(outcome.priced) == {"small": 40, "large": 80}
    explain.route(ctx, outcome)
    assert ctx.decisions["route"]["priced_tokens"] == {"small": 40, "large": 80}
    assert ctx.decisions["route"]["predicted_tokens"] == {"p50": 60, "p90": 120}  # the shared one, as before
    # A rule decides without prices: nothing is recorded as priced.
    ruled = await route(
        chat_ctx("x" * 160), Target(routed=True), None, models_with_own(two_backends()), two_backends(), None
    )
    assert dict(ruled.priced) == {}


def outcome_with(per_backend: dict[str, LengthEstimate]) -> RouteOutcome:
    return RouteOutcome(
        RouteDecision("small", None, ()),
        prompt_tokens=10,
        predicted=LengthEstimate(300, 600),
        router_version="rule",
        length_version="shared",
        per_backend=MappingProxyType(per_backend),
    )


def test_the_ask_is_sized_for_the_backend_admission_weighs() -> None:
    routed = outcome_with({"terse": LengthEstimate(50, 90), "chatty": LengthEstimate(900, 2000)})
    ask = ask_for(chat_ctx("hi"), routed, PriorityClass())
    assert (ask.on("terse").output_tokens, ask.on("terse").output_p90) == (50, 90)
    assert (ask.on("chatty").output_tokens, ask.on("chatty").output_p90) == (900, 2000)
    assert (ask.on("large").output_tokens, ask.on("large").output_p90) == (300, 600)
    assert ask.on("terse").tokens == 60 and ask.on("terse").arrived == ask.arrived


def small_backend(name: str) -> BackendConfig:
    limits = {"max_concurrent": 4, "max_tokens_in_flight": 1000}
    return BackendConfig.model_validate({"name": name, "tier": "small", "model": f"openai/{name}", **limits})


async def test_admission_places_by_the_size_each_backend_would_produce() -> None:
    """Both backends have 100 tokens in flight of 1,000. The shared estimate (300) fits both, and the
    first would take it; sized per backend, the request would need 1,210 tokens on `chatty` and 110 on
    `terse`: only `terse` has room, and it holds the request at that size."""
    chatty, terse = small_backend("chatty"), small_backend("terse")
    admission = Admission([chatty, terse], AdmissionConfig())
    async with AsyncExitStack() as busy:
        for b in (chatty, terse):
            await busy.enter_async_context(admission.hold(b, Ask(prompt_tokens=50, output_tokens=50)))
        shared = Ask(prompt_tokens=10, output_tokens=300)
        assert admission.place(shared, [chatty, terse]) == (chatty, False)
        sized = Ask(10, 300, outputs_by_backend={"chatty": (1200, 2400), "terse": (100, 200)})
        assert admission.place(sized, [chatty, terse]) == (terse, False)
        async with admission.hold(terse, sized) as job:
            assert (job.ask.output_tokens, job.ask.output_p90) == (100, 200)
            assert admission.states["terse"].tokens_in_flight(admission.clock()) == 100 + 110


def test_a_backend_length_record_names_what_is_in_force() -> None:
    own = BackendLength(Scaled(2.0), "v1-x", answers=1234, row=7)
    assert (own.version, own.answers, own.row) == ("v1-x", 1234, 7)
    assert own.model.predict(np.zeros(384), 3, None) == LengthEstimate(6, 12)
