"""The verifier's cross-encoder at scoring time: symmetric, stored as only what was tuned, bounded input."""

from __future__ import annotations

import numpy as np
import pytest

from icgate.cache.cross_encoder import MAX_CHARS, MAX_LENGTH, PairCrossEncoder


def test_scores_do_not_depend_on_the_order_of_the_pair(tuned: PairCrossEncoder) -> None:
    a = ["How do I reset my password?", "Is it safe to run 5 km a day?"]
    b = ["How can I reset my router?", "Is it not safe to run 5 km a day?"]
    np.testing.assert_allclose(tuned.logits(a, b), tuned.logits(b, a), rtol=0, atol=1e-5)
    assert abs(tuned.logits(a, b)[0] - tuned.logits(a, b)[1]) > 1e-3  # and they do depend on the texts


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
    encoded = tuned.encode_pairs([huge], [short])
    assert encoded["input_ids"].tolist() == expected
    assert max(seen) <= MAX_CHARS
    assert np.isfinite(tuned.logits([huge, short], [short, huge])).all()
