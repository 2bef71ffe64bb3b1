"""Learned routers: they learn a separable signal, round-trip through bytes, and decide fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from routers import RouteFeatures
from routers.data import LabelledPrompt, split_rows
from routers.evaluation import evaluate_scores
from routers.learned import (
    DEFAULT_ARTIFACT,
    EMBEDDING_DIM,
    ClassifierRouter,
    LearnedRouter,
    NearestNeighbourRouter,
    RandomRouter,
    evaluate_router,
    features_for_prompt,
    out_of_fold_scores,
    recalibrate,
    train_router,
)

# (weak_ok, strong_ok) per kind of synthetic prompt: only the strong model right, both right, only weak,
# and a second kind of "only strong right" so the strong model is the better one overall.
KINDS = [(False, True), (True, True), (True, False), (False, True)]


class Synthetic:
    """Prompts whose embedding sits near one centre per (group, kind); `encode` looks them up."""

    def __init__(self, seed: int = 0, groups: tuple[str, ...] = ("g",)) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = {
            (g, k): self._unit(self.rng.normal(size=EMBEDDING_DIM)) for g in groups for k in range(len(KINDS))
        }
        self.vectors: dict[str, np.ndarray] = {}
        self.groups = groups

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    def rows(self, n: int, start: int = 0, flip: float = 0.1) -> list[LabelledPrompt]:
        out = []
        for i in range(start, start + n):
            group = self.groups[i % len(self.groups)]
            kind = (i // len(self.groups)) % len(KINDS)
            prompt = f"{group} question {i}: how many apples are left?"
            noise = self.rng.normal(size=EMBEDDING_DIM) * 0.05
            self.vectors[prompt] = self._unit(self.centres[(group, kind)] + noise)
            weak, strong = KINDS[kind]
            if self.rng.random() < flip:  # label noise: the signal is strong, not perfect
                weak = not weak
            out.append(LabelledPrompt(prompt, weak, strong, group))
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


@pytest.fixture(scope="module")
def synthetic() -> tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]]:
    data = Synthetic(seed=0)
    return data, data.rows(600), data.rows(300, start=10_000)


@pytest.fixture(scope="module")
def trained(synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]]) -> LearnedRouter:
    data, train, _ = synthetic
    return train_router(train, data.encode, sources=["synthetic"])


def test_classifier_beats_random_on_separable_data(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]], trained: LearnedRouter
) -> None:
    data, _, fresh = synthetic
    learned = evaluate_router(trained, fresh, data.encode)
    random = evaluate_router(RandomRouter(seed=0), fresh, data.encode)
    assert learned.apgr > 0.9
    assert learned.apgr > random.apgr + 0.3
    assert learned.cpt50 < random.cpt50
    held = trained.metadata["held_out"]["g"]
    assert held["apgr"] > 0.9 and held["n"] > 80  # buckets 8-9 of the training rows


def test_knn_baseline_learns_too(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]],
) -> None:
    data, train, fresh = synthetic
    knn = train_router(train, data.encode, kind="knn", min_quality=None)
    assert isinstance(knn, NearestNeighbourRouter)
    # It votes on P(weak right): it separates "only weak right" from "only strong right" rows.
    assert evaluate_router(knn, fresh, data.encode).apgr > 0.7


def test_metadata_records_training(trained: LearnedRouter) -> None:
    meta = trained.metadata
    assert meta["version"].startswith("classifier-")
    assert meta["training"]["sources"] == ["synthetic"]
    assert meta["training"]["buckets"].startswith("0-7")
    assert 400 < meta["training"]["n"] < 540
    assert meta["options"]["target"] == "win"
    assert "min_quality 0.95" in meta["calibration"]
    assert json.loads(json.dumps(meta)) == meta  # storable as JSON next to the artifact bytes


def test_round_trip_gives_identical_scores(
    tmp_path: Path,
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]],
    trained: LearnedRouter,
) -> None:
    data, _, fresh = synthetic
    before = trained.score_rows(fresh, data.encode)
    again = LearnedRouter.from_bytes(trained.to_bytes(), small_tier="cheap", large_tier="premium")
    loaded = LearnedRouter.load(trained.save(tmp_path / "r.joblib"))
    for router in (again, loaded):
        assert isinstance(router, ClassifierRouter)
        assert np.array_equal(router.score_rows(fresh, data.encode), before)
        assert router.threshold == trained.threshold
        assert router.version == trained.version
        assert router.metadata == trained.metadata
    assert again.route(features_for_prompt(fresh[0].prompt, data.encode([fresh[0].prompt])[0])).tier in {
        "cheap",
        "premium",
    }


def test_knn_round_trip(synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]]) -> None:
    data, train, fresh = synthetic
    knn = train_router(train[:200], data.encode, kind="knn", hold_out=False, min_quality=None)
    again = LearnedRouter.from_bytes(knn.to_bytes())
    assert np.array_equal(again.score_rows(fresh, data.encode), knn.score_rows(fresh, data.encode))


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


def test_route_follows_threshold_and_explains(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]], trained: LearnedRouter
) -> None:
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


def test_decision_is_well_under_a_millisecond(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]], trained: LearnedRouter
) -> None:
    data, _, fresh = synthetic
    features = [features_for_prompt(r.prompt, data.encode([r.prompt])[0]) for r in fresh[:100]]
    times = []
    for f in features:
        start = time.perf_counter()
        trained.route(f)
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 1e-3


def test_strong_share_calibration(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]],
) -> None:
    data, train, _ = synthetic
    router = train_router(train, data.encode, min_quality=None, strong_share=0.3)
    assert "strong_share 0.3" in router.metadata["calibration"]
    # The threshold sends 30% of the out-of-fold scores of the training rows (buckets 0-7) strong.
    rows = split_rows(train)[0]
    oof = out_of_fold_scores(rows, data.encode([r.prompt for r in rows]), **router.metadata["options"])
    assert int(np.sum(oof < router.threshold)) == round(0.3 * len(rows))
    with pytest.raises(ValueError, match="not both"):
        train_router(train, data.encode, min_quality=0.9, strong_share=0.3)


def test_gate_picks_the_expert_for_each_kind_of_prompt() -> None:
    data = Synthetic(seed=1, groups=("maths", "exams"))
    train = data.rows(1400, flip=0.05)
    fresh = data.rows(300, start=50_000, flip=0.0)
    router = train_router(train, data.encode, min_quality=None)
    assert isinstance(router, ClassifierRouter) and set(router.experts) == {"maths", "exams"}
    decision = router.route(features_for_prompt(fresh[0].prompt, data.encode([fresh[0].prompt])[0]))
    assert f"looks like {fresh[0].group}" in decision.reasons[-1]
    for group in ("maths", "exams"):
        subset = [r for r in fresh if r.group == group]
        assert evaluate_router(router, subset, data.encode).apgr > 0.9


def test_rows_without_strong_label_learn_weak_ok(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]],
) -> None:
    data, train, fresh = synthetic
    partial = [LabelledPrompt(r.prompt, r.weak_ok, None, r.group) for r in train]
    router = train_router(partial, data.encode, min_quality=None)
    assert router.metadata["options"]["target"] == "weak_ok"
    assert evaluate_router(router, fresh, data.encode).apgr > 0.7
    with pytest.raises(ValueError, match="target 'win' needs"):
        train_router(partial, data.encode, target="win")
    with pytest.raises(ValueError, match="no rows with a strong-model label"):
        evaluate_router(router, partial, data.encode)


def test_random_router_is_seeded() -> None:
    a, b = RandomRouter(seed=3), RandomRouter(seed=3)
    features = RouteFeatures(5, 1)
    assert [a.route(features).score for _ in range(5)] == [b.route(features).score for _ in range(5)]
    rows = [LabelledPrompt(str(i), i % 2 == 0, True) for i in range(50)]
    assert np.array_equal(a.score_rows(rows), b.score_rows(rows))
    assert evaluate_scores(a.score_rows(rows), rows).n == 50


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


def test_recalibrate_on_new_rows(
    synthetic: tuple[Synthetic, list[LabelledPrompt], list[LabelledPrompt]], trained: LearnedRouter
) -> None:
    data, _, fresh = synthetic
    router = LearnedRouter.from_bytes(trained.to_bytes())
    threshold = recalibrate(router, fresh, data.encode, strong_share=0.25)
    assert router.threshold == threshold
    assert int(np.sum(router.score_rows(fresh, data.encode) < threshold)) == 75
    assert router.metadata["calibration"] == "strong_share 0.25 on 300 calibration rows"
    recalibrate(router, fresh, data.encode, min_quality=0.9)
    scores = router.score_rows(fresh, data.encode)
    strong = scores < router.threshold
    quality = np.mean([r.strong_ok if s else r.weak_ok for r, s in zip(fresh, strong, strict=True)])
    assert quality >= 0.9 * np.mean([r.strong_ok for r in fresh])
