"""Learned routers at request time: they round-trip through bytes, decide with reasons, and decide fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from icgate.routers.base import RouteFeatures
from icgate.routers.learned import (
    DEFAULT_ARTIFACT,
    EMBEDDING_DIM,
    ClassifierRouter,
    LearnedRouter,
    side_features,
)
from icgate.routers.training import features_for_prompt, score_rows, train_router
from icgate.text import estimate_tokens
from tests.routers.conftest import SyntheticData


def test_round_trip_gives_identical_scores(
    tmp_path: Path, synthetic: SyntheticData, trained: LearnedRouter
) -> None:
    data, _, fresh = synthetic
    before = score_rows(trained, fresh, data.encode)
    again = LearnedRouter.from_bytes(trained.to_bytes(), small_tier="cheap", large_tier="premium")
    loaded = LearnedRouter.load(trained.save(tmp_path / "r.joblib"))
    for router in (again, loaded):
        assert isinstance(router, ClassifierRouter)
        assert np.array_equal(score_rows(router, fresh, data.encode), before)
        assert router.threshold == trained.threshold
        assert router.version == trained.version
        assert router.metadata == trained.metadata
    assert again.route(features_for_prompt(fresh[0].prompt, data.encode([fresh[0].prompt])[0])).tier in {
        "cheap",
        "premium",
    }


def test_knn_round_trip(synthetic: SyntheticData) -> None:
    data, train, fresh = synthetic
    knn = train_router(train[:200], data.encode, kind="knn", hold_out=False, min_quality=None)
    again = LearnedRouter.from_bytes(knn.to_bytes())
    assert np.array_equal(score_rows(again, fresh, data.encode), score_rows(knn, fresh, data.encode))


def test_bad_artifacts_are_refused(tmp_path: Path) -> None:
    import io

    import joblib

    with pytest.raises(ValueError, match="not a router artifact"):
        LearnedRouter.from_bytes(b"garbage")
    buffer = io.BytesIO()
    joblib.dump({"kind": "icgate.hit_verifier", "format": 1}, buffer)
    with pytest.raises(ValueError, match="not an icgate router artifact"):
        LearnedRouter.from_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    joblib.dump({"kind": "icgate.router", "format": 99}, buffer)
    with pytest.raises(ValueError, match="format 99 is not supported"):
        LearnedRouter.from_bytes(buffer.getvalue())
    with pytest.raises(FileNotFoundError):
        LearnedRouter.load(tmp_path / "missing.joblib")


def test_route_follows_threshold_and_explains(synthetic: SyntheticData, trained: LearnedRouter) -> None:
    data, _, fresh = synthetic
    gain = next(r for r in fresh if not r.weak_ok and r.strong_ok)
    loss = next(r for r in fresh if r.weak_ok and not r.strong_ok)
    for row, tier in ((gain, "large"), (loss, "small")):
        decision = trained.route(features_for_prompt(row.prompt, data.encode([row.prompt])[0]))
        assert decision.tier == tier
        assert decision.score is not None and 0.0 <= decision.score <= 1.0
        assert (decision.score >= trained.threshold) == (tier == "small")
        assert "P(small good enough)" in decision.reasons[0]
    no_text = trained.route(RouteFeatures(10, 1, embedding=data.encode([gain.prompt])[0]))
    assert no_text.tier == "large"
    assert any("no prompt text" in r for r in no_text.reasons)
    no_embedding = trained.route(RouteFeatures(10, 1, text="hello"))
    assert no_embedding.tier == "large" and no_embedding.score is None


def test_decision_is_well_under_a_millisecond(synthetic: SyntheticData, trained: LearnedRouter) -> None:
    data, _, fresh = synthetic
    features = [features_for_prompt(r.prompt, data.encode([r.prompt])[0]) for r in fresh[:100]]
    times = []
    for f in features:
        start = time.perf_counter()
        trained.route(f)
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 1e-3


def test_missing_prompt_tokens_are_estimated_from_the_text() -> None:
    text = "How many apples are left after Janet eats three of the twelve?"
    given = side_features(1, [text], [estimate_tokens(text)], [1], [{}])
    assert np.array_equal(side_features(1, [text], None, [1], [{}]), given)


def test_shipped_artifact_loads_and_met_its_target() -> None:
    if not DEFAULT_ARTIFACT.is_file():
        pytest.skip(f"no shipped router artifact at {DEFAULT_ARTIFACT}: run bench/router_quality.py")
    assert DEFAULT_ARTIFACT.stat().st_size < 5 * 1024 * 1024
    router = LearnedRouter.load(DEFAULT_ARTIFACT)
    assert isinstance(router, ClassifierRouter)
    held = router.metadata["held_out"]
    assert held["gsm8k_mixtral_gpt4"]["apgr"] >= 0.65 and held["mmlu_mixtral_gpt4"]["apgr"] >= 0.65
    vector = np.random.default_rng(0).normal(size=EMBEDDING_DIM)
    decision = router.route(features_for_prompt("Janet has 3 apples and buys 5 more. How many?", vector))
    assert decision.tier in {"small", "large"} and decision.score is not None


def test_request_time_code_loads_without_the_training_code() -> None:
    """The gateway imports `routers.learned`: it must not drag in training, scikit-learn or scipy."""
    loaded = (
        "import sys, icgate.routers.learned, icgate.routers.rules, icgate.routers.decide\n"
        "print('\\n'.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True)
    forbidden = (
        "icgate.routers.training",
        "icgate.routers.data",
        "icgate.routers.evaluation",
        "sklearn",
        "scipy",
    )
    assert not [m for m in out.stdout.split() if m.startswith(forbidden)]
