"""The verifier's cross-encoder: symmetric, learns from labels, stored as only what was tuned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache.cross_encoder import (
    MAX_CHARS,
    MAX_LENGTH,
    PairCrossEncoder,
    TrainingConfig,
    length_bucketed_batches,
)
from cache.embed import SentenceTransformerEmbedder
from cache.verify import (
    CROSS_ENCODER_FEATURE,
    SCALAR_FEATURES,
    HitVerifier,
    calibrate,
    feature_names,
)
from tests.cache.test_verify import synthetic_pairs

TINY = TrainingConfig(tuned_layers=1, steps=30, batch_size=16, learning_rate=1e-3, seed=0)


@pytest.fixture(scope="module")
def tuned() -> PairCrossEncoder:
    pairs = synthetic_pairs()
    return PairCrossEncoder(tuned_layers=1).fit(
        [p.text_a for p in pairs], [p.text_b for p in pairs], [p.duplicate for p in pairs], TINY
    )


def test_scores_do_not_depend_on_the_order_of_the_pair(tuned: PairCrossEncoder) -> None:
    a = ["How do I reset my password?", "Is it safe to run 5 km a day?"]
    b = ["How can I reset my router?", "Is it not safe to run 5 km a day?"]
    np.testing.assert_allclose(tuned.logits(a, b), tuned.logits(b, a), rtol=0, atol=1e-5)
    assert abs(tuned.logits(a, b)[0] - tuned.logits(a, b)[1]) > 1e-3  # and they do depend on the texts


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


def test_state_holds_only_the_tuned_layers_and_round_trips(tuned: PairCrossEncoder) -> None:
    state = tuned.state()
    names = set(state["weights"])
    assert names and all(
        n.startswith(("bert.encoder.layer.5.", "bert.pooler.", "classifier.")) for n in names
    )
    assert not any("embeddings" in n for n in names)  # the packaged weights are never copied
    assert all(w.dtype == np.float16 for w in state["weights"].values())
    restored = PairCrossEncoder.from_state(state)
    a, b = ["How do I cook rice?", "What is love?"], ["How can I cook rice?", "What is hate?"]
    np.testing.assert_allclose(restored.logits(a, b), tuned.logits(a, b), atol=0.05)
    state["weights"].pop(next(iter(state["weights"])))
    with pytest.raises(ValueError, match="do not match"):
        PairCrossEncoder.from_state(state)


def test_tuned_layers_must_exist() -> None:
    with pytest.raises(ValueError, match="tuned_layers"):
        PairCrossEncoder(tuned_layers=7)


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
        cross_encoder=TINY,
        cross_encoder_pairs=ce_pairs,
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


def test_long_texts_are_cut_before_the_tokenizer_reads_them(
    tuned: PairCrossEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer reads a whole text before truncating it (a 1 MB text took seconds and gigabytes);
    the cut at MAX_CHARS keeps every piece the model sees, so the encoding is unchanged."""
    question = "Why is the sky blue on a clear summer day? " * 40  # 1,720 characters, past MAX_CHARS
    short = "Why is the sky blue?"
    huge = question + "and some filler words " * 50_000  # ~1.1 MB
    expected = tuned.tokenizer([question], [short], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    seen: list[int] = []
    tokenizer = tuned.tokenizer

    def spy(texts_a: list[str], texts_b: list[str], **kwargs: object) -> object:
        seen.extend(len(t) for t in [*texts_a, *texts_b])
        return tokenizer(texts_a, texts_b, **kwargs)

    monkeypatch.setattr(tuned, "tokenizer", spy)
    encoded = tuned._encode([huge], [short])
    assert encoded["input_ids"].tolist() == expected
    assert max(seen) <= MAX_CHARS
    assert np.isfinite(tuned.logits([huge, short], [short, huge])).all()
