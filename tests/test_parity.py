"""Training and serving must agree: a model trained on one feature and served another is wrong without
ever failing. Each test builds a request the way the gateway serves it and the row the training code
would make of the same prompt, and compares what the model sees."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from icgate.gateway.config import BackendConfig
from icgate.gateway.pipeline.record import Trail, route_sample_of
from icgate.gateway.pipeline.route import route, route_features, with_cache_view
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext
from icgate.gateway.route_models import RouteModels
from icgate.lengths.predict import LengthEstimate
from icgate.lengths.training import LengthRow
from icgate.routers.base import RouteDecision, RouteFeatures
from icgate.routers.training import features_for_prompt
from icgate.text import prompt_text

PROMPTS = [
    "What is 2+3?",
    "  Write an essay about rivers,\nwith   three examples.  ",
    "Übersetze bitte: «le chat est noir» 🐈",
    "x" * 4_001,
    "a",
]


def chat(prompt: str | list[dict[str, Any]]) -> RequestContext:
    return RequestContext(
        endpoint="chat", body={"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    )


def served_features(ctx: RequestContext, vector: np.ndarray | None) -> RouteFeatures:
    """What the route stage hands the router for a request the cache found nothing for."""
    return with_cache_view(route_features(ctx), vector, None, prompt_text(ctx.body, ctx.endpoint))


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_router_is_trained_on_the_features_it_is_served(prompt: str) -> None:
    vector = unit(len(prompt))
    trained = features_for_prompt(prompt, vector)
    served = served_features(chat(prompt), vector)
    assert (trained.prompt_tokens, trained.conversation_depth, trained.text, trained.extra) == (
        served.prompt_tokens,
        served.conversation_depth,
        served.text,
        served.extra,
    )
    assert trained.embedding is served.embedding


def test_content_parts_are_read_as_training_reads_the_joined_text() -> None:
    parts = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": "x"}}]
    parts.append({"type": "text", "text": "this picture."})
    served = served_features(chat(parts), None)
    trained = features_for_prompt("Describe\nthis picture.", None)
    assert (served.prompt_tokens, served.text) == (trained.prompt_tokens, trained.text)


class Recording:
    """A length model that remembers the prompt-token feature and text it is asked about."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None]] = []

    def predict(self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        self.seen.append((prompt_tokens, text))
        return LengthEstimate(p50=100, p90=200)


class Small:
    def route(self, features: RouteFeatures) -> RouteDecision:
        return RouteDecision("small", None, ("rule",))


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_length_predictor_is_trained_on_the_features_it_is_served(prompt: str) -> None:
    from icgate.gateway.config import Policy

    length = Recording()
    policy = Policy.model_validate(
        {
            "backends": [
                {"name": "s", "tier": "small", "model": "openai/s"},
                {"name": "l", "tier": "large", "model": "openai/l"},
            ]
        }
    )
    await route(
        chat(prompt), Target(routed=True), None, RouteModels(router=Small(), length=length), policy, None
    )
    row = LengthRow("q", prompt, tokens=10)
    assert length.seen == [(row.estimated_prompt_tokens, row.prompt)]


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_a_route_sample_retrains_the_router_on_what_was_served(prompt: str) -> None:
    """Retraining from the gateway's own route samples (`icgate router train --from-log`) reads the
    sample's prompt text: its features must be those the request was routed on."""
    ctx = chat(prompt)
    ctx.backend = BackendConfig(name="s", tier="small", model="openai/s")
    ctx.route = "small"
    sample = route_sample_of(ctx, Trail(target=Target(routed=True)))
    assert sample is not None
    retrained = features_for_prompt(sample.prompt_text, None)
    served = served_features(ctx, None)
    assert (retrained.prompt_tokens, retrained.conversation_depth, retrained.text) == (
        served.prompt_tokens,
        served.conversation_depth,
        served.text,
    )
