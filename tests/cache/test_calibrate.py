"""Calibrating the hit verifier: loaders, the bucket split, fitting, the embedding memo (real MiniLM)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from icgate.cache.calibrate import (
    LabelledPair,
    cached_encode,
    choose_operating_point,
    evaluate,
    evaluate_cosine_rule,
    fit_classifier,
    load_pairs,
    out_of_fold_probabilities,
    pair_bucket,
)
from icgate.cache.embed import SentenceTransformerEmbedder
from icgate.cache.verify import SCALAR_FEATURES, HitVerifier
from tests.cache.synthetic import synthetic_pairs, unit

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


# Buckets computed before `pair_bucket` moved onto icgate.text's `normalise` and `bucket_of`: the split of
# every pair (which calibrate, which are held out) must never move.
KNOWN_BUCKETS = [
    ("How do I cook rice?", "How to cook rice?", 0),
    ("What is AI?", "Who is Alan Turing?", 9),
    ("How do I reset my password?", "How do I reset my router?", 4),
    ("Is it safe to run 5 km a day?", "Is it not safe to run 5 km a day?", 2),
    ("How can I be a good geologist?", "What should I do to be a great geologist?", 6),
    ("Why can't I sleep?", "Why am I unable to sleep?", 9),
    ("Ünïcode  Straße?", "  ÜNÏCODE straße? ", 8),
    ("Hi?", "Hello?", 4),
    ("What's the best phone under 10,000?", "What is the best phone under 10000?", 8),
    ("Who is the CEO of Apple?", "Why is the CEO of Google rich?", 7),
]


@pytest.mark.parametrize(("text_a", "text_b", "bucket"), KNOWN_BUCKETS)
def test_known_pairs_keep_their_buckets(text_a: str, text_b: str, bucket: int) -> None:
    assert pair_bucket(LabelledPair(text_a, text_b, True)) == bucket
    assert pair_bucket(LabelledPair(text_b, text_a, False)) == bucket


# ---- calibration on real sentences ------------------------------------------------------------------------


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
    return fit_classifier(features, labels, seed=0).predict_proba(features)[:, 1]


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


def test_the_prefilter_is_the_highest_cosine_within_the_recall_tolerance() -> None:
    # 100 duplicates, 100 non-duplicates; the classifier separates them perfectly, and every duplicate
    # but two has cosine >= 0.8: the two below it are all the recall a lower prefilter would add.
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    cosines = np.r_[np.full(98, 0.9), [0.6, 0.6], rng.uniform(0.5, 0.95, 100)]
    probs = np.r_[np.full(100, 0.9), np.full(100, 0.1)]
    strict = choose_operating_point(cosines, probs, labels, 0.95, min_hits=10, recall_tolerance=0.0)
    assert strict.cosine_threshold <= 0.6 and strict.recall == 1.0
    cheap = choose_operating_point(cosines, probs, labels, 0.95, min_hits=10, recall_tolerance=0.02)
    assert cheap.cosine_threshold == 0.9 and cheap.recall == pytest.approx(0.98)
    assert cheap.precision == 1.0
