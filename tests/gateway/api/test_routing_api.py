"""The learned router on the HTTP API: explained decisions, the policy's knob, and hot swaps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from icgate.gateway.config import Policy
from icgate.gateway.store import artifacts
from icgate.routers.base import RouteFeatures
from icgate.routers.learned import DEFAULT_ARTIFACT, LearnedRouter
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[[Policy], RunningGateway]

EASY = "What is the capital of France?"
HARD = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def learned_policy(standins: Standins, **router: Any) -> Policy:
    return standin_policy(
        standins,
        "http",
        router={"kind": "learned", "reload_interval_s": 0.2, **router},
        embedding={"preload": True},
    )


def ask(gw: RunningGateway, content: str) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


@pytest.fixture(scope="module")
def shipped() -> LearnedRouter:
    return LearnedRouter.load(DEFAULT_ARTIFACT)


def direct_score(gw: RunningGateway, router: LearnedRouter, text: str) -> float:
    vector = gw.gateway.embeddings._embedder.encode([text])[0]  # type: ignore[union-attr]
    features = RouteFeatures(prompt_tokens=len(text) // 4, conversation_depth=1, embedding=vector, text=text)
    score = router.route(features).score
    assert score is not None
    return score


def test_auto_is_routed_by_the_trained_router_with_its_score_and_reasons(
    standins: Standins, start_gateway: StartGateway, shipped: LearnedRouter
) -> None:
    gw = start_gateway(learned_policy(standins))
    easy, hard = ask(gw, EASY), ask(gw, HARD)
    for resp, text in ((easy, EASY), (hard, HARD)):
        score = float(resp.headers["x-icgate-router-score"])
        assert score == pytest.approx(direct_score(gw, shipped, text), abs=1e-3)
        expected = "small" if score >= shipped.threshold else "large"
        assert resp.headers["x-icgate-route"] == expected == resp.headers["x-icgate-backend"]
        assert int(resp.headers["x-icgate-predicted-tokens"]) >= 1
    assert float(easy.headers["x-icgate-router-score"]) > float(hard.headers["x-icgate-router-score"])


@pytest.mark.parametrize(("knob", "tier"), [({"threshold": 0.0}, "small"), ({"threshold": 1.0}, "large")])
def test_the_policy_knob_moves_the_decision(
    standins: Standins, start_gateway: StartGateway, knob: dict[str, float], tier: str
) -> None:
    gw = start_gateway(learned_policy(standins, **knob))
    assert {ask(gw, EASY).headers["x-icgate-route"], ask(gw, HARD).headers["x-icgate-route"]} == {tier}


def test_strong_share_maps_to_a_threshold_on_the_training_scores(
    standins: Standins, start_gateway: StartGateway, shipped: LearnedRouter
) -> None:
    gw = start_gateway(learned_policy(standins, strong_share=0.3))
    models = gw.gateway.pipeline.models
    quantiles = np.asarray(shipped.metadata["score_quantiles"])
    from icgate.gateway.pipeline.route import threshold_for

    assert threshold_for(gw.gateway.policy.router, models) == pytest.approx(np.quantile(quantiles, 0.3))


def test_a_published_router_is_swapped_in_without_a_restart(
    standins: Standins, start_gateway: StartGateway, shipped: LearnedRouter
) -> None:
    gw = start_gateway(learned_policy(standins))
    before = ask(gw, EASY)
    stricter = LearnedRouter.from_bytes(shipped.to_bytes())
    stricter.threshold = 1.0  # everything to the large tier
    stricter.metadata["version"] = "test-strict"
    assert gw.gateway.engine is not None
    artifacts.publish(gw.gateway.engine, "router", "test-strict", stricter.to_bytes(), {}, {})
    deadline = time.monotonic() + 10
    while gw.gateway.pipeline.models.router_version != "test-strict" and time.monotonic() < deadline:
        time.sleep(0.05)
    after = ask(gw, EASY)
    assert before.headers["x-icgate-route"] == "small" and after.headers["x-icgate-route"] == "large"
    assert float(after.headers["x-icgate-router-score"]) == pytest.approx(
        float(before.headers["x-icgate-router-score"])
    )


def test_a_broken_publication_keeps_the_router_in_force(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(learned_policy(standins))
    version = gw.gateway.pipeline.models.router_version
    assert gw.gateway.engine is not None
    artifacts.publish(gw.gateway.engine, "router", "garbage", b"not a router", {}, {})
    time.sleep(0.6)
    assert gw.gateway.pipeline.models.router_version == version
    assert ask(gw, EASY).status_code == 200


def test_value_of_quality_knob_weighs_the_large_tiers_price(
    standins: Standins, start_gateway: StartGateway
) -> None:
    policy = learned_policy(standins, quality_value_usd=0.001)
    raw = policy.model_dump()
    raw["backends"][1].update(cost_per_1k_input=10.0, cost_per_1k_output=30.0)  # a very dear large tier
    gw = start_gateway(Policy.model_validate(raw))
    resp = ask(gw, HARD)
    assert resp.headers["x-icgate-route"] == "small"  # no answer is worth that much more


def test_a_broken_published_router_at_start_falls_back_to_the_shipped_one(
    standins: Standins, start_gateway: Callable[..., RunningGateway], shipped: LearnedRouter, tmp_path: Any
) -> None:
    from icgate.gateway.store import db

    data_dir = tmp_path / "broken"
    policy = learned_policy(standins)
    url = policy.database_url(data_dir)
    data_dir.mkdir()
    db.upgrade(url)
    engine = db.make_engine(url)
    artifacts.publish(engine, "router", "garbage", b"not a router", {}, {})
    engine.dispose()
    gw = start_gateway(policy, data_dir)
    assert gw.gateway.pipeline.models.router_version == shipped.version
    assert ask(gw, EASY).status_code == 200
