"""The semantic-hit verifier: loaders, pair features, calibration, artifacts (real MiniLM embedder)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import joblib
import numpy as np
import pytest

from cache.embed import SentenceTransformerEmbedder
from cache.verify import (
    DEFAULT_ARTIFACT,
    MAX_TEXT_CHARS,
    SCALAR_FEATURES,
    SEQUENCE_MATCH_BUDGET,
    HitVerifier,
    LabelledPair,
    apply_rules,
    cached_encode,
    calibrate,
    evaluate,
    evaluate_cosine_rule,
    load_pairs,
    out_of_fold_probabilities,
    pair_bucket,
    pair_features,
    sequence_match_ratio,
)

FEATURE = {name: i for i, name in enumerate(SCALAR_FEATURES)}


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


# ---- loaders --------------------------------------------------------------------------------------------


def test_load_jsonl_gz_text_layout(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    rows = [
        {"id": 0, "text_a": "How do I cook rice?", "text_b": "How to cook rice?", "duplicate": 1},
        {"id": 1, "text_a": "What is AI?", "text_b": "Who is Alan Turing?", "duplicate": "false"},
        {"id": 2, "text_a": "a?", "text_b": "b?", "duplicate": True},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert load_pairs(path) == [
        LabelledPair("How do I cook rice?", "How to cook rice?", True),
        LabelledPair("What is AI?", "Who is Alan Turing?", False),
        LabelledPair("a?", "b?", True),
    ]


def test_load_quora_csv_layout(tmp_path: Path) -> None:
    path = tmp_path / "quora.csv"
    path.write_text(
        "id,qid1,qid2,question1,question2,is_duplicate\n"
        '0,1,2,"What is the step by step guide to invest in share market in india?",'
        '"What is the step by step guide to invest in share market?",0\n'
        '1,3,4,"How can I be a good geologist?","What should I do to be a great geologist?",1\n',
        encoding="utf-8",
    )
    pairs = load_pairs(path)
    assert [p.duplicate for p in pairs] == [False, True]
    assert pairs[1].text_a == "How can I be a good geologist?"


def test_load_text_layout_csv_and_tar_gz(tmp_path: Path) -> None:
    content = b'text_a,text_b,duplicate\n"Is tea good?","Is tea healthy?",true\n'
    (tmp_path / "p.csv").write_bytes(content)
    assert load_pairs(tmp_path / "p.csv") == [LabelledPair("Is tea good?", "Is tea healthy?", True)]
    archive = io.BytesIO()  # the upstream GPTCache file is a tar.gz despite its .json.gz name
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("pairs.csv")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    (tmp_path / "p.json.gz").write_bytes(archive.getvalue())
    assert load_pairs(tmp_path / "p.json.gz") == [LabelledPair("Is tea good?", "Is tea healthy?", True)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text_a": "x", "text_b": "y", "duplicate": 1}\n{"text_a": "x", "duplicate": 1}\n', "line 2"),
        ('{"text_a": "x", "text_b": "y", "duplicate": 2}\n', "duplicate label"),
        ('{"text_a": "x", "text_b": "y", "duplicate": 1}\nnot json\n', "line 2: invalid JSON"),
        ("question1,question2,label\nx,y,1\n", "missing column"),
        ("a,b,c\nx,y,1\n", "expected columns"),
        ("text_a,text_b,duplicate\nx,,1\n", "empty text_b"),
    ],
)
def test_bad_input_names_file_and_row(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as excinfo:
        load_pairs(path)
    assert "bad.jsonl" in str(excinfo.value)


def test_blank_rows_can_be_skipped(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("question1,question2,is_duplicate\nx,,0\nHi?,Hello?,1\n", encoding="utf-8")
    assert load_pairs(path, skip_blank_text=True) == [LabelledPair("Hi?", "Hello?", True)]


def test_shared_qqp_file_loads() -> None:
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"shared data not present: {path}")
    pairs = load_pairs(path)
    assert len(pairs) > 70_000
    assert 0.3 < sum(p.duplicate for p in pairs) / len(pairs) < 0.4


def test_bucket_is_deterministic_and_order_free() -> None:
    a = LabelledPair("How do I cook rice?", "How to cook rice?", True)
    b = LabelledPair("how to  cook rice?", "How do I cook rice?", False)
    assert pair_bucket(a) == pair_bucket(b)
    assert 0 <= pair_bucket(a) < 10


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


# ---- calibration on real sentences ------------------------------------------------------------------------

ACTIONS = [
    ("reset my password", "reset my router"),
    ("learn Python quickly", "learn Java quickly"),
    ("lose weight fast", "gain weight fast"),
    ("improve my English speaking", "improve my English writing"),
    ("make money online", "make friends online"),
    ("prepare for the GRE", "prepare for the GMAT"),
    ("get a job at Google", "get a job at Amazon"),
    ("cook brown rice", "cook fried rice"),
    ("change the oil in my car", "change the tires on my car"),
    ("stop snoring at night", "stop sweating at night"),
    ("delete my Facebook account", "delete my Instagram account"),
    ("become a data scientist", "become a data engineer"),
    ("increase my height after 18", "increase my weight after 18"),
    ("get rid of acne scars", "get rid of stretch marks"),
    ("invest in the stock market in India", "invest in real estate in India"),
    ("fall asleep quickly", "wake up early"),
    ("write a good resume", "write a good cover letter"),
    ("train my puppy to sit", "train my cat to sit"),
    ("speed up my laptop", "charge my laptop"),
    ("save money on groceries", "save money on rent"),
    ("learn to play guitar", "learn to play piano"),
    ("get a US visa from India", "get a UK visa from India"),
    ("start a small business", "close a small business"),
    ("recover a hacked Gmail account", "recover a deleted Gmail account"),
    ("memorize things faster", "read books faster"),
    ("become more confident", "become more creative"),
    ("remove a virus from my phone", "remove a virus from my PC"),
    ("calculate compound interest", "calculate simple interest"),
    ("grow tomatoes indoors", "grow potatoes indoors"),
    ("quit smoking", "quit drinking"),
]
TEMPLATES = [
    ("How do I {}?", "How can I {}?"),
    ("What is the best way to {}?", "What's the easiest way to {}?"),
    ("How should I {}?", "What can I do to {}?"),
]


def synthetic_pairs() -> list[LabelledPair]:
    """Paraphrases (same action, another wording) and hard negatives (same wording, a sibling action)."""
    pairs = []
    for i, (action, sibling) in enumerate(ACTIONS):
        for j, (t1, t2) in enumerate(TEMPLATES):
            pairs.append(LabelledPair(t1.format(action), t2.format(action), True))
            pairs.append(LabelledPair(t1.format(action), t1.format(sibling), False))
            pairs.append(
                LabelledPair(t2.format(action), t1.format(ACTIONS[(i + j + 1) % len(ACTIONS)][0]), False)
            )
    pairs += [
        LabelledPair(f"How can I lose {n} kg in a month?", f"How can I lose {n * 3} kg in a month?", False)
        for n in range(2, 9)
    ]
    pairs += [
        LabelledPair(f"Is it safe to run {n} km a day?", f"Is it not safe to run {n} km a day?", False)
        for n in range(2, 9)
    ]
    return pairs


@pytest.fixture(scope="module")
def calibrated(embedder: SentenceTransformerEmbedder) -> HitVerifier:
    return calibrate(synthetic_pairs(), embedder.encode, target_precision=0.9, seed=0, balance=False)


def test_calibrate_meets_its_target_out_of_fold(
    calibrated: HitVerifier, embedder: SentenceTransformerEmbedder
) -> None:
    pairs = synthetic_pairs()
    assert calibrated.metrics["precision"] >= 0.9
    assert calibrated.metrics["recall"] > 0.3
    assert calibrated.metrics["n"] == len(pairs) and "out-of-fold" in calibrated.metrics["measured_on"]
    result = evaluate(calibrated, pairs, embedder.encode)
    # the shipped classifier is refitted on every pair, so on them it does at least as well as out of fold
    assert result["precision"] >= 0.9 and result["recall"] >= calibrated.metrics["recall"] - 0.05
    assert calibrated.version.startswith("v1-")
    baseline = evaluate_cosine_rule(pairs, embedder.encode, 0.8)
    assert set(baseline) >= {"precision", "recall", "f1", "n", "accuracy", "positives"}


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


def test_out_of_fold_scores_do_not_learn_noise() -> None:
    """Labels that are pure noise: a model scored on pairs it was fitted on would separate them; scored
    out of fold it cannot, so calibration on such labels finds no safe threshold."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, len(SCALAR_FEATURES) + 8))
    labels = (rng.random(400) < 0.5).astype(np.int8)
    probs = out_of_fold_probabilities(features, labels, seed=0)
    gap = probs[labels == 1].mean() - probs[labels == 0].mean()
    assert abs(gap) < 0.05
    in_sample = in_sample_probabilities(features, labels)
    assert in_sample[labels == 1].mean() - in_sample[labels == 0].mean() > 0.1  # what leaking would do


def in_sample_probabilities(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from cache.verify import fit_classifier

    return fit_classifier(features, labels, seed=0).predict_proba(features)[:, 1]


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


def test_cached_encode_reuses_disk(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.stack([unit(len(t)) for t in texts])

    first = cached_encode(fake, tmp_path / "emb", chunk=2)(["a", "bb", "ccc", "a"])
    again = cached_encode(fake, tmp_path / "emb")(["ccc", "bb", "dddd"])
    assert calls == [["a", "bb"], ["ccc"], ["dddd"]]
    np.testing.assert_array_equal(first[2], again[0])
    np.testing.assert_array_equal(first[0], first[3])


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
    from cache.verify import _parse

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
    vectors = np.stack([unit(1)] * 3)
    scores = verifier.score_batch([long_a, short, short], [long_b, short + " ", long_a], vectors, vectors)
    assert scores.tolist() == [0.0, 1.0, 0.0]
    assert model.rows == 1  # only the readable pair was featurised
