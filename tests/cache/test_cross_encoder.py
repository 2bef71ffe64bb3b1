"""The verifier's cross-encoder at scoring time: symmetric, stored as only what was tuned, bounded input."""

from __future__ import annotations

import numpy as np
import pytest

from icgate.cache.cross_encoder import MAX_CHARS, MAX_LENGTH, PairCrossEncoder, pair_logits


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
    with pytest.raises(ValueError, match="tuned_layers"):
        PairCrossEncoder(tuned_layers=3, layers=2)  # a 2-layer reader has no third layer to tune
    with pytest.raises(ValueError, match="layers must be"):
        PairCrossEncoder(tuned_layers=1, layers=7)


def test_a_shallower_reader_keeps_the_bottom_layers_and_round_trips() -> None:
    """`layers=2` drops the top four packaged layers; its artifact records the depth, so the gateway
    rebuilds the same 2-layer network (not a 6-layer one with two layers replaced)."""
    full = PairCrossEncoder(tuned_layers=1)
    shallow = PairCrossEncoder(tuned_layers=2, layers=2)
    assert len(shallow.model.bert.encoder.layer) == 2 and shallow.layers == 2
    kept = dict(shallow.model.named_parameters())
    for name, weight in full.model.named_parameters():  # the two kept layers are the packaged bottom two
        if name.startswith(("bert.encoder.layer.0.", "bert.encoder.layer.1.")):
            assert np.array_equal(kept[name].detach().numpy(), weight.detach().numpy())
    assert not any(n.startswith("bert.encoder.layer.2.") for n in kept)
    state = shallow.state()
    assert state["layers"] == 2
    assert {n.split(".")[3] for n in state["weights"] if n.startswith("bert.encoder.layer.")} == {"0", "1"}
    restored = PairCrossEncoder.from_state(state)
    assert restored.layers == 2
    a, b = ["How do I cook rice?", "What is love?"], ["How can I cook rice?", "What is hate?"]
    np.testing.assert_allclose(restored.logits(a, b), shallow.logits(a, b), atol=0.05)
    assert not np.allclose(full.logits(a, b), shallow.logits(a, b), atol=1e-3)  # a different network
    old = dict(state)
    old.pop("layers")  # an artifact from before depth was recorded: all six layers
    with pytest.raises(ValueError, match="do not match"):
        PairCrossEncoder.from_state(old)


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


def test_many_pairs_are_read_in_order_of_length_and_come_back_in_theirs() -> None:
    """Past one batch, pairs go to the model sorted by length (a batch is padded to its longest pair),
    and each logit lands at its own pair's index."""
    rng = np.random.default_rng(0)
    texts_a = ["w " * int(n) for n in rng.integers(1, 60, size=150)]
    texts_b = ["v " * int(n) for n in rng.integers(1, 60, size=150)]
    batches: list[list[int]] = []

    def run(first: list[str], second: list[str]) -> np.ndarray:
        batches.append([len(a) + len(b) for a, b in zip(first, second, strict=True)])
        return np.array([len(a) - 0.5 * len(b) for a, b in zip(first, second, strict=True)], dtype=float)

    logits = pair_logits(run, texts_a, texts_b, both_orders=False, batch_size=64)
    expected = [len(a) - 0.5 * len(b) for a, b in zip(texts_a, texts_b, strict=True)]
    np.testing.assert_array_equal(logits, expected)
    assert [len(b) for b in batches] == [64, 64, 22]
    assert all(max(batches[i]) <= min(batches[i + 1]) for i in range(2))  # sorted across batches
    both = pair_logits(run, texts_a, texts_b, both_orders=True, batch_size=64)
    np.testing.assert_allclose(
        both, [(e + len(b) - 0.5 * len(a)) / 2 for e, a, b in zip(expected, texts_a, texts_b, strict=True)]
    )
    batches.clear()
    pair_logits(run, texts_a[:3], texts_b[:3], both_orders=False)  # one batch: as given
    assert batches == [[len(a) + len(b) for a, b in zip(texts_a[:3], texts_b[:3], strict=True)]]
