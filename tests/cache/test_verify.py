"""The semantic-hit verifier at request time: pair features, rules, scoring, artifacts (real MiniLM)."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest

from icgate.cache.embed import SentenceTransformerEmbedder
from icgate.cache.verify import (
    DEFAULT_ARTIFACT,
    MAX_TEXT_CHARS,
    SCALAR_FEATURES,
    SEQUENCE_MATCH_BUDGET,
    HitVerifier,
    apply_rules,
    pair_features,
    sequence_match_ratio,
)
from tests.cache.synthetic import synthetic_pairs, unit

FEATURE = {name: i for i, name in enumerate(SCALAR_FEATURES)}


# ---- features -------------------------------------------------------------------------------------------


def test_features_detect_differing_numbers_and_negation() -> None:
    v1, v2 = unit(1), unit(2)
    f = pair_features("How can I lose 10 kg in 2 months?", "How can I lose 5 kg in 2 months?", v1, v2)
    assert f.shape == (len(SCALAR_FEATURES) + 2 * 384,) and f.dtype == np.float32
    assert f[FEATURE["numbers_differ"]] == 1.0 and f[FEATURE["numbers_only_one_side"]] == 2.0
    assert f[FEATURE["negation_mismatch"]] == 0.0
    g = pair_features("Why is coffee bad for you?", "Why isn't coffee bad for you?", v1, v2)
    assert g[FEATURE["negation_mismatch"]] == 1.0 and g[FEATURE["numbers_differ"]] == 0.0
    h = pair_features(
        "What should I never say in an interview?", "What should I say in an interview?", v1, v2
    )
    assert h[FEATURE["negation_mismatch"]] == 1.0


def test_features_entities_question_words_and_embedding_parts() -> None:
    v1, v2 = unit(3), unit(4)
    f = pair_features("Who is the CEO of Apple?", "Why is the CEO of Google rich?", v1, v2)
    assert f[FEATURE["entities_only_one_side"]] == 2.0
    assert f[FEATURE["question_word_mismatch"]] == 1.0 and f[FEATURE["first_word_equal"]] == 0.0
    assert f[FEATURE["cosine"]] == pytest.approx(float(v1 @ v2), abs=1e-6)
    k = len(SCALAR_FEATURES)
    np.testing.assert_allclose(f[k : k + 384], v1 * v2)
    np.testing.assert_allclose(f[k + 384 :], np.abs(v1 - v2))
    same = pair_features("How do I learn Python?", "How do I learn Python?", v1, v1)
    assert same[FEATURE["token_jaccard"]] == 1.0 and same[FEATURE["cosine"]] == pytest.approx(1.0)
    swapped = pair_features("Why is the CEO of Google rich?", "Who is the CEO of Apple?", v2, v1)
    np.testing.assert_array_equal(f, swapped)


# ---- scoring and the artifact ------------------------------------------------------------------------


def test_rules_match_twins_and_refuse_negations_and_other_numbers() -> None:
    texts_a = [
        "How do I reset my password?",
        "Is it safe to run 5 km a day?",
        "Is it safe to run 10 km a day?",
        "What's the best phone under 10,000?",
        "Why can't I sleep?",
        "How can I lose weight?",
        "How can I lose 5 kg in a month?",
    ]
    texts_b = [
        "how do I reset my password",
        "Is it not safe to run 5 km a day?",
        "Is it safe to run 5 km a day?",
        "What is the best phone under 10000?",
        "Why am I unable to sleep?",
        "How do I lose weight fast?",
        "How can I lose weight quickly?",
    ]
    scores = apply_rules(texts_a, texts_b, np.full(7, 0.9))
    # twins match; a flipped negation or other numbers with the same words never do; the rest is learnt
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.9, 0.9, 0.9, 0.9]


def test_score_is_zero_below_the_cosine_prefilter(calibrated: HitVerifier) -> None:
    v1 = unit(5)
    v2 = -v1  # cosine -1
    assert calibrated.score("How do I cook rice?", "How do I cook rice?", v1, v2) == 0.0
    assert not calibrated.accept("How do I cook rice?", "How do I cook rice?", v1, v2)


def test_save_load_round_trip_gives_identical_scores(
    calibrated: HitVerifier, embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    path = calibrated.save(tmp_path / "v.joblib")
    loaded = HitVerifier.load(path)
    assert (loaded.version, loaded.cosine_threshold, loaded.probability_threshold) == (
        calibrated.version,
        calibrated.cosine_threshold,
        calibrated.probability_threshold,
    )
    pairs = synthetic_pairs()[:30]
    va, vb = embedder.encode([p.text_a for p in pairs]), embedder.encode([p.text_b for p in pairs])
    for p, a, b in zip(pairs, va, vb, strict=True):
        assert loaded.score(p.text_a, p.text_b, a, b) == calibrated.score(p.text_a, p.text_b, a, b)


def test_newer_or_foreign_format_is_refused(calibrated: HitVerifier, tmp_path: Path) -> None:
    path = calibrated.save(tmp_path / "v.joblib")
    payload = joblib.load(path)
    payload["format"] = 99
    joblib.dump(payload, tmp_path / "newer.joblib")
    with pytest.raises(ValueError, match="format 99 is not supported"):
        HitVerifier.load(tmp_path / "newer.joblib")
    joblib.dump({"something": "else"}, tmp_path / "foreign.joblib")
    with pytest.raises(ValueError, match="not an icgate hit-verifier"):
        HitVerifier.load(tmp_path / "foreign.joblib")


# ---- the shipped artifact -------------------------------------------------------------------------------


def test_shipped_artifact_accepts_paraphrase_and_rejects_hard_negative(
    embedder: SentenceTransformerEmbedder,
) -> None:
    verifier = HitVerifier.load(DEFAULT_ARTIFACT)
    assert DEFAULT_ARTIFACT.stat().st_size < 25_000_000
    assert verifier.cross_encoder is not None and verifier.cross_encoder.tuned_layers == 6
    assert verifier.metrics["precision"] >= 0.95
    texts = ["How do I reset my password?", "How can I reset my password?", "How do I reset my router?"]
    query, paraphrase, other = embedder.encode(texts)
    assert verifier.accept(texts[0], texts[1], query, paraphrase)
    assert not verifier.accept(texts[0], texts[2], query, other)
    negated = ["Is it safe to run 5 km a day?", "Is it not safe to run 5 km a day?"]
    assert not verifier.accept(negated[0], negated[1], *embedder.encode(negated))
    assert verifier.score(texts[0], texts[2], query, other) < verifier.score(
        texts[0], texts[1], query, paraphrase
    )


# ---- bounded cost on hostile texts ---------------------------------------------------------------------


def test_parsing_reads_at_most_max_text_chars_and_is_linear() -> None:
    from icgate.cache.verify import _parse

    huge = _parse("Paris is the Capital of France, said Marie. " * 25_000)  # ~1.1 MB
    assert huge.truncated and len(huge.normalised) <= MAX_TEXT_CHARS
    assert len(huge.trigrams) <= MAX_TEXT_CHARS and "marie" in huge.entities
    # a Quora-length question is read whole, exactly as before the cap
    short = _parse("Is Paris the capital of France?")
    assert not short.truncated and short.normalised == "is paris the capital of france"
    assert "france" in short.entities and short.trigrams >= {"is ", "par", "nce"}


def test_twins_are_only_texts_read_whole() -> None:
    head = "please summarise this report " * 400  # 11,600 characters: past MAX_TEXT_CHARS
    scores = apply_rules([head + "for Alice", head], [head + "for Bob", head], np.full(2, 0.5))
    # the same first MAX_TEXT_CHARS characters are no proof of the same request; equal texts still are
    assert scores.tolist() == [0.5, 1.0]


def test_sequence_ratio_is_difflibs_within_budget_and_bounded_beyond(monkeypatch: pytest.MonkeyPatch) -> None:
    import difflib

    a, b = "how do i reset my password", "how can i reset my password"
    assert sequence_match_ratio(a, b) == difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    calls: list[int] = []
    original = difflib.SequenceMatcher.find_longest_match

    def counting(self: difflib.SequenceMatcher[str], *args: int) -> difflib.Match:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(difflib.SequenceMatcher, "find_longest_match", counting)
    # few distinct characters make difflib cubic: "a a a ..." against "b b b ..." recurses once per space
    x, y = "a " * 100, "b " * 100
    exact = sequence_match_ratio(x, y, budget=10**9)
    assert exact == 0.5 and len(calls) > 100
    calls.clear()
    # 8,000 characters like that would take difflib hours; the first scan alone is over budget
    assert sequence_match_ratio("a " * 4_000, "b " * 4_000) == 0.0 and calls == []
    calls.clear()
    assert sequence_match_ratio("a " * 200, "b " * 200) == 0.0  # starts, then runs out of budget
    assert 0 < len(calls) <= SEQUENCE_MATCH_BUDGET // (200 * 200)


class _CountingModel:
    """A classifier that says "same" and counts the rows it was asked about."""

    def __init__(self) -> None:
        self.rows = 0

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self.rows += len(features)
        return np.tile([0.0, 1.0], (len(features), 1))


def test_the_verifier_refuses_texts_it_cannot_read_whole() -> None:
    model = _CountingModel()
    verifier = HitVerifier(cosine_threshold=0.5, probability_threshold=0.5, model=model, version="test")
    long_a = "tell me about this document " * 400  # 11,200 characters
    long_b = long_a.replace("document", "documents", 1)
    short = "How do I reset my password?"
    other = "How can I change my password?"
    vectors = np.stack([unit(1)] * 4)
    scores = verifier.score_batch(
        [long_a, short, short, short], [long_b, short + " ", long_a, other], vectors, vectors
    )
    assert scores.tolist() == [0.0, 1.0, 0.0, 1.0]
    # only the readable pair the rules leave open was featurised: the twins are settled before the model
    assert model.rows == 1


def test_pairs_the_rules_settle_never_reach_the_classifier() -> None:
    model = _CountingModel()  # says "same" to every pair it is asked about
    verifier = HitVerifier(cosine_threshold=0.5, probability_threshold=0.5, model=model, version="test")
    texts_a = ["Is it safe to run 5 km a day?", "Is it safe to run 5 km a day?", "How do I bake bread?"]
    texts_b = ["Is it safe to run 10 km a day?", "is it safe to run 5 km a day", "How do I make bread?"]
    vectors = np.stack([unit(1)] * 3)
    scores = verifier.score_batch(texts_a, texts_b, vectors, vectors)
    assert scores.tolist() == [0.0, 1.0, 1.0]  # other numbers: never; twins: always; the rest: the model's
    assert model.rows == 1
    assert apply_rules(texts_a, texts_b, np.full(3, 0.5)).tolist() == [0.0, 1.0, 0.5]
