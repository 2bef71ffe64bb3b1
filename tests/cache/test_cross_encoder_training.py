"""Fine-tuning the verifier's cross-encoder: batches, learning from labels, a verifier that carries one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from icgate.cache.calibrate import calibrate, train_cross_encoder
from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.cache.cross_encoder_training import fine_tune, length_bucketed_batches
from icgate.cache.embed import SentenceTransformerEmbedder
from icgate.cache.verify import CROSS_ENCODER_FEATURE, SCALAR_FEATURES, HitVerifier, feature_names
from tests.cache.synthetic import TINY, synthetic_pairs


def test_batches_cover_every_pair_once_per_epoch_in_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 80, size=1000)
    batches = length_bucketed_batches(lengths, 10, np.random.default_rng(1), pool_batches=20)
    epoch = [next(batches) for _ in range(100)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in epoch])
    random_spread = np.mean([np.ptp(lengths[rng.choice(1000, 10, replace=False)]) for _ in range(100)])
    assert spread < random_spread / 3  # padding to the longest in the batch wastes little
    assert not np.array_equal(np.concatenate(epoch), np.concatenate([next(batches) for _ in range(100)]))


def test_fine_tuning_learns_the_labels(tuned: PairCrossEncoder) -> None:
    pairs = synthetic_pairs()
    untrained = PairCrossEncoder(tuned_layers=1)
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    labels = np.array([p.duplicate for p in pairs])

    def gap(encoder: PairCrossEncoder) -> float:
        logits = encoder.logits(texts_a, texts_b)
        return float(logits[labels].mean() - logits[~labels].mean())

    assert gap(tuned) > gap(untrained) + 1.0


def test_a_student_learns_the_teachers_judgement_not_only_the_labels() -> None:
    """Distillation: with a teacher that calls every pair a duplicate (logit +6), a shallow student fine-tuned
    on the same labels scores the non-duplicates far higher than one trained on the labels alone."""
    pairs = synthetic_pairs()
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    labels = [p.duplicate for p in pairs]
    config = replace(TINY, layers=1, distill_weight=0.9)
    alone = fine_tune(PairCrossEncoder(tuned_layers=1, layers=1), texts_a, texts_b, labels, config)
    taught = fine_tune(
        PairCrossEncoder(tuned_layers=1, layers=1),
        texts_a,
        texts_b,
        labels,
        config,
        teacher_logits=np.full(len(pairs), 6.0),
    )
    negatives = ~np.array(labels)
    assert (
        taught.logits(texts_a, texts_b)[negatives].mean()
        > alone.logits(texts_a, texts_b)[negatives].mean() + 1
    )
    with pytest.raises(ValueError, match="one teacher logit per pair"):
        fine_tune(
            PairCrossEncoder(tuned_layers=1, layers=1), texts_a, texts_b, labels, config, None, np.ones(3)
        )


def test_verifier_with_a_cross_encoder_saves_and_loads(
    embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    pairs = synthetic_pairs()
    half = len(pairs) // 2
    order = np.random.default_rng(1).permutation(len(pairs))
    ce_pairs, rest = [pairs[i] for i in order[:half]], [pairs[i] for i in order[half:]]
    verifier = calibrate(
        rest,
        embedder.encode,
        target_precision=0.9,
        balance=False,
        cross_encoder=train_cross_encoder(ce_pairs, TINY),
    )
    assert verifier.cross_encoder is not None and verifier.metrics["cross_encoder"]["n_pairs"] == half
    loaded = HitVerifier.load(verifier.save(tmp_path / "v.joblib"))
    assert loaded.cross_encoder is not None
    validation = rest[: len(rest) // 2]
    va = embedder.encode([p.text_a for p in validation])
    vb = embedder.encode([p.text_b for p in validation])
    texts_a, texts_b = [p.text_a for p in validation], [p.text_b for p in validation]
    features = verifier.features(texts_a, texts_b, va, vb)
    column = feature_names(True).index(CROSS_ENCODER_FEATURE)
    assert column == len(SCALAR_FEATURES)  # right after the scalar features
    np.testing.assert_allclose(
        features[:, column], verifier.cross_encoder.logits(texts_a, texts_b), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        loaded.score_batch(texts_a, texts_b, va, vb),
        verifier.score_batch(texts_a, texts_b, va, vb),
        atol=0.02,
    )
