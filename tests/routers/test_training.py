"""Training, calibrating and evaluating routers: they learn a separable signal, record how, and are
trained on the features the gateway serves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icgate.routers.base import RouteFeatures
from icgate.routers.data import LabelledPrompt, split_rows
from icgate.routers.evaluation import evaluate_scores
from icgate.routers.learned import EMBEDDING_DIM, ClassifierRouter, LearnedRouter, NearestNeighbourRouter
from icgate.routers.training import (
    RandomRouter,
    _fold_of,
    evaluate_router,
    features_for_prompt,
    out_of_fold_scores,
    prompt_hash,
    recalibrate,
    score_rows,
    train_router,
)
from icgate.text import estimate_prompt_tokens, estimate_tokens
from tests.routers.conftest import Synthetic, SyntheticData


def test_classifier_beats_random_on_separable_data(synthetic: SyntheticData, trained: LearnedRouter) -> None:
    data, _, fresh = synthetic
    learned = evaluate_router(trained, fresh, data.encode)
    random = evaluate_router(RandomRouter(seed=0), fresh, data.encode)
    assert learned.apgr > 0.9
    assert learned.apgr > random.apgr + 0.3
    assert learned.cpt50 < random.cpt50
    held = trained.metadata["held_out"]["g"]
    assert held["apgr"] > 0.9 and held["n"] > 80  # buckets 8-9 of the training rows


def test_knn_baseline_learns_too(synthetic: SyntheticData) -> None:
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


def test_strong_share_calibration(synthetic: SyntheticData) -> None:
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


def test_rows_without_strong_label_learn_weak_ok(synthetic: SyntheticData) -> None:
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

    def encode(texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)

    assert np.array_equal(score_rows(a, rows, encode), score_rows(b, rows, encode))
    assert evaluate_scores(score_rows(a, rows, encode), rows).n == 50


def test_recalibrate_on_new_rows(synthetic: SyntheticData, trained: LearnedRouter) -> None:
    data, _, fresh = synthetic
    router = LearnedRouter.from_bytes(trained.to_bytes())
    threshold = recalibrate(router, fresh, data.encode, strong_share=0.25)
    assert router.threshold == threshold
    assert int(np.sum(score_rows(router, fresh, data.encode) < threshold)) == 75
    assert router.metadata["calibration"] == "strong_share 0.25 on 300 calibration rows"
    recalibrate(router, fresh, data.encode, min_quality=0.9)
    scores = score_rows(router, fresh, data.encode)
    strong = scores < router.threshold
    quality = np.mean([r.strong_ok if s else r.weak_ok for r, s in zip(fresh, strong, strict=True)])
    assert quality >= 0.9 * np.mean([r.strong_ok for r in fresh])


# --- training and serving agree --------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Hi", "What is 12 * 7?", "A robe takes 2 bolts.\nHow many?\n" * 40, ""])
def test_a_training_prompt_gets_the_features_of_a_one_message_chat_request(prompt: str) -> None:
    vector = np.ones(EMBEDDING_DIM, dtype=np.float32)
    body = {"messages": [{"role": "user", "content": prompt}]}
    features = features_for_prompt(prompt, vector)
    assert features.prompt_tokens == estimate_prompt_tokens(body, "chat") == estimate_tokens(prompt)
    assert features.conversation_depth == 1
    assert features.text == prompt and features.extra == {}
    assert features.embedding is vector


def test_offline_scores_are_the_scores_route_gives(synthetic: SyntheticData, trained: LearnedRouter) -> None:
    """What calibration and evaluation score is what the gateway's request would be scored."""
    data, _, fresh = synthetic
    rows = fresh[:20]
    offline = score_rows(trained, rows, data.encode)
    served = [trained.route(features_for_prompt(r.prompt, data.encode([r.prompt])[0])).score for r in rows]
    assert served == pytest.approx(offline.tolist(), abs=1e-12)


# Computed by the code before it used `icgate.text` (the folds decide the calibrated threshold, the hashes
# which rows an evaluation skips): they must not move.
@pytest.mark.parametrize(
    ("prompt", "fold", "digest"),
    [
        ("How many  eggs?", 4, 13141160813992461975),
        ("how many eggs?", 0, 13141160813992461975),
        ("Janet has 16 eggs.", 3, 10442059464180782420),
        ("  Ünïcode prompt\twith TABS\n", 2, 9489702828866441849),
        ("Find the index.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:", 4, 15128922349862991839),
    ],
)
def test_folds_and_prompt_hashes_are_pinned(prompt: str, fold: int, digest: int) -> None:
    assert _fold_of([LabelledPrompt(prompt, True, True)], 5).tolist() == [fold]
    assert prompt_hash(prompt) == digest
