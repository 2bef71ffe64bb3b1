"""Training, calibrating and evaluating the learned routers, offline (`icgate router ...`, the benchmarks).

What `ClassifierRouter` learns is chosen for the routing metric, not for accuracy: each training prompt is
labelled "only the large model was right" (+1, routing it large gains quality), "only the small model was
right" (-1, routing it large loses) or "both/neither" (0, the tier makes no difference). A multinomial
logistic regression estimates the three probabilities and the score is the small tier's win rate. It
orders requests exactly by the expected quality gained by calling the large model, which is what APGR
rewards; plain P(small right) also ranks up prompts that both models fail (no gain from the large tier).
Prompts of different kinds (grade-school maths vs multiple-choice exams) get separate experts, chosen by a
gate that recognises the kind from the same inputs; one model over everything let the larger source's
feature weights swamp the smaller one's (see bench/results/router.md).

A training prompt is scored with exactly the features the gateway builds for a one-message chat request
with that text (`features_for_prompt`), so a router is trained on the numbers it is served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from icgate.routers.base import RouteDecision, RouteFeatures, Vectors
from icgate.routers.data import LabelledPrompt, label_summary, split_rows
from icgate.routers.evaluation import RouterMetrics, calibrate_threshold, evaluate_scores
from icgate.routers.learned import (
    ClassifierRouter,
    Floats,
    LearnedRouter,
    Linear,
    NearestNeighbourRouter,
    Softmax,
    Target,
    side_features,
    unit_rows,
)
from icgate.text import bucket_of, conversation_depth, estimate_prompt_tokens, last_user_text, normalise

Encode = Callable[[list[str]], Vectors]
Kind = Literal["classifier", "knn"]

GATE_C = 10.0  # the kinds of prompt are far apart in embedding space: a sharp gate


@dataclass(frozen=True)
class FitOptions:
    """How a router is fitted; stored in its metadata as `options` (a dict of these fields)."""

    target: Target = "win"
    use_text: bool = True
    per_group: bool = True  # one expert per group of rows (with a gate), else one model
    min_group_rows: int = 300  # smaller groups share a "pooled" expert
    c: float = 0.1  # inverse L2 strength of the experts' logistic regressions
    k: int = 50  # neighbours of the kNN baseline


class Scorer(Protocol):
    """Anything that scores a batch of requests as the learned routers do (the baselines too)."""

    def score_batch(
        self,
        embeddings: Vectors,
        texts: Sequence[str | None] | None,
        prompt_tokens: Sequence[int] | None,
        depths: Sequence[int] | None,
        extras: Sequence[Mapping[str, float]] | None,
        /,
    ) -> Floats: ...


# --------------------------------------------------------------------------------------------------------
# Offline rows as the gateway sees requests
# --------------------------------------------------------------------------------------------------------


def features_for_prompt(prompt: str, embedding: Vectors | None) -> RouteFeatures:
    """The `RouteFeatures` the gateway builds for a one-message chat request whose user turn is `prompt`
    (before the cache stage adds example signals): what every training and evaluation row is scored on."""
    messages = [{"role": "user", "content": prompt}]
    return RouteFeatures(
        prompt_tokens=estimate_prompt_tokens({"messages": messages}, "chat"),
        conversation_depth=conversation_depth(messages),
        embedding=embedding,
        text=last_user_text(messages),
    )


def _batch(
    rows: Sequence[LabelledPrompt],
) -> tuple[list[str | None], list[int], list[int], list[Mapping[str, float]]]:
    """The non-embedding `score_batch` arguments of offline rows (see `features_for_prompt`)."""
    features = [features_for_prompt(r.prompt, None) for r in rows]
    return (
        [f.text for f in features],
        [f.prompt_tokens for f in features],
        [f.conversation_depth for f in features],
        [f.extra for f in features],
    )


def score_rows(router: Scorer, rows: Sequence[LabelledPrompt], encode: Encode) -> Floats:
    """Scores of offline rows, with the features the gateway would pass for each prompt."""
    return router.score_batch(encode([r.prompt for r in rows]), *_batch(rows))


class RandomRouter:
    """Evaluation baseline: a uniform random score (seeded). Its expected APGR is 0.5."""

    kind = "random"

    def __init__(
        self, seed: int = 0, threshold: float = 0.5, *, small_tier: str = "small", large_tier: str = "large"
    ) -> None:
        self.seed = seed
        self.threshold = threshold
        self.small_tier = small_tier
        self.large_tier = large_tier
        self._rng = np.random.default_rng(seed)

    def score_batch(self, embeddings: npt.ArrayLike, *_features: object) -> Floats:
        """Scores for a batch: the same batch size and seed give the same scores."""
        return np.random.default_rng(self.seed).random(int(np.asarray(embeddings).shape[0]))

    def route(self, features: RouteFeatures) -> RouteDecision:  # noqa: ARG002 - the Router interface
        score = float(self._rng.random())
        small = score >= self.threshold
        return RouteDecision(
            tier=self.small_tier if small else self.large_tier,
            score=score,
            reasons=(f"random score {score:.3f} {'>=' if small else '<'} threshold {self.threshold:.3f}",),
        )


# --------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------


def fit_softmax(z: Floats, y: npt.NDArray[Any], c: float, weights: Floats | None = None) -> Softmax:
    """A (multinomial) logistic regression, kept as arrays only."""
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y)
    if classes.size < 2:  # nothing to learn: the one class seen, always
        return Softmax(classes, np.zeros((1, z.shape[1])), np.zeros(1))
    model = LogisticRegression(C=c, max_iter=3000).fit(z, y, sample_weight=weights)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps only the logit of classes_[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return Softmax(model.classes_, coef, intercept)


def fit_linear(
    emb: Floats, side: Floats, y: npt.NDArray[Any], c: float, weights: Floats | None = None
) -> Linear:
    """`fit_softmax` on [embedding, side features standardised by their training mean and spread]."""
    mean = side.mean(axis=0)
    std = side.std(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)
    return Linear(mean, scale, fit_softmax(np.hstack([emb, (side - mean) / scale]), y, c, weights))


def _labels(rows: Sequence[LabelledPrompt], target: Target) -> npt.NDArray[np.int_]:
    if target == "win":
        return np.array([int(bool(r.strong_ok)) - int(r.weak_ok) for r in rows])
    return np.array([int(r.weak_ok) for r in rows])


def _groups(rows: Sequence[LabelledPrompt], per_group: bool, min_group_rows: int) -> npt.NDArray[Any]:
    """Each row's expert: its group, "pooled" for groups too small for their own, "all" without experts."""
    groups = np.array([r.group or "default" for r in rows], dtype=object)
    if not per_group:
        groups[:] = "all"
        return groups
    names, counts = np.unique(groups, return_counts=True)
    small = set(names[counts < min_group_rows].tolist())
    if small:  # too few rows for their own expert: pool them
        groups = np.array(["pooled" if g in small else g for g in groups], dtype=object)
    return groups


def _fit(rows: Sequence[LabelledPrompt], emb: Floats, kind: Kind, options: FitOptions) -> LearnedRouter:
    if kind == "knn":
        return NearestNeighbourRouter(emb, np.array([r.weak_ok for r in rows]), k=options.k)
    if kind != "classifier":
        raise ValueError(f"unknown router kind {kind!r} (classifier or knn)")
    emb = unit_rows(emb)
    groups = _groups(rows, options.per_group, options.min_group_rows)
    y = _labels(rows, options.target)
    texts, prompt_tokens, depths, _ = _batch(rows)
    side = side_features(len(rows), texts, prompt_tokens, depths, None, use_text=options.use_text)
    experts = {}
    for name in sorted(set(groups.tolist())):
        mask = groups == name
        experts[str(name)] = fit_linear(emb[mask], side[mask], y[mask], options.c)
    gate = None
    if len(experts) > 1:  # balanced: a small group must not be drowned by a large one's prior
        labels = groups.astype(str)
        names, counts = np.unique(labels, return_counts=True)
        weight = {n: len(labels) / (len(names) * m) for n, m in zip(names, counts, strict=True)}
        gate = fit_linear(emb, side, labels, GATE_C, np.array([weight[g] for g in labels]))
    return ClassifierRouter(experts, gate, target=options.target, use_text=options.use_text)


def _fold_of(rows: Sequence[LabelledPrompt], folds: int) -> npt.NDArray[np.int_]:
    """A deterministic fold per prompt (sha1 of the prompt with a salt, independent of the held-out
    buckets)."""
    return np.array([bucket_of("fold\x1f" + r.prompt, folds) for r in rows])


def out_of_fold_scores(
    rows: Sequence[LabelledPrompt], emb: Floats, kind: Kind = "classifier", folds: int = 5, **options: Any
) -> Floats:
    """Each row scored by a router trained on the other folds: honest scores for calibration and CV.
    `options` are `FitOptions` fields (e.g. a trained router's `metadata["options"]`)."""
    return _out_of_fold(rows, emb, kind, folds, FitOptions(**options))


def _out_of_fold(
    rows: Sequence[LabelledPrompt], emb: Floats, kind: Kind, folds: int, options: FitOptions
) -> Floats:
    fold = _fold_of(rows, folds)
    scores = np.zeros(len(rows))
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        train = np.flatnonzero(fold != f)
        if test.size == 0 or train.size == 0:
            continue
        router = _fit([rows[i] for i in train.tolist()], emb[train], kind, options)
        test_rows = [rows[i] for i in test.tolist()]
        texts, prompt_tokens, depths, _ = _batch(test_rows)
        scores[test] = router.score_batch(emb[test], texts, prompt_tokens, depths)
    return scores


def _calibrated(
    train: Sequence[LabelledPrompt],
    emb: Floats,
    kind: Kind,
    options: FitOptions,
    min_quality: float | None,
    strong_share: float | None,
    folds: int,
) -> tuple[float, str]:
    """(threshold, how it was chosen) on out-of-fold scores of the training rows."""
    if min_quality is None and strong_share is None:
        return 0.5, "none (0.5)"
    known = [i for i, r in enumerate(train) if r.strong_ok is not None]
    oof = _out_of_fold(train, emb, kind, folds, options)
    if strong_share is not None:
        threshold = calibrate_threshold(oof, strong_share=strong_share)
        return threshold, f"strong_share {strong_share} on out-of-fold training scores"
    if len(known) >= 2:
        threshold = calibrate_threshold(oof[known], [train[i] for i in known], min_quality=min_quality)
        return threshold, f"min_quality {min_quality} x strong on out-of-fold training scores"
    return 0.5, "none (0.5)"


def train_router(  # noqa: PLR0913 - every option is a documented training knob
    rows: Sequence[LabelledPrompt],
    encode: Encode,
    kind: Kind = "classifier",
    *,
    hold_out: bool = True,
    target: Target | None = None,
    use_text: bool = True,
    per_group: bool = True,
    min_group_rows: int = 300,
    c: float = 0.1,
    k: int = 50,
    min_quality: float | None = 0.95,
    strong_share: float | None = None,
    calibration_folds: int = 5,
    sources: Sequence[str] = (),
) -> LearnedRouter:
    """Train a router on labelled rows and record what it was trained on and how it scored.

    With `hold_out` (default) it trains on buckets 0-7 (`routers.data.split_rows`) and stores APGR/CPT on
    buckets 8-9, per group, in `metadata["held_out"]`; without, it trains on every row. `target` "win"
    (default when every row has a strong label) learns the small tier's win rate; "weak_ok" learns P(small
    right) and is the only choice for rows without a strong label. The threshold is calibrated on
    out-of-fold scores of the training rows, for `min_quality` (fraction of the strong model's quality,
    default 0.95) or `strong_share` (give that instead; pass both None to keep 0.5). `sources` names the
    data files for the record.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no training rows")
    train, held = split_rows(rows) if hold_out else (rows, [])
    if not train:
        raise ValueError("no rows in the training buckets (0-7)")
    all_known = all(r.strong_ok is not None for r in train)
    chosen: Target = target or ("win" if all_known else "weak_ok")
    if chosen == "win" and not all_known:
        raise ValueError("target 'win' needs a strong-model label on every training row; use 'weak_ok'")
    options = FitOptions(chosen, use_text, per_group, min_group_rows, c, k)
    emb = unit_rows(encode([r.prompt for r in train]))
    router = _fit(train, emb, kind, options)
    if min_quality is not None and strong_share is not None:  # before the costly out-of-fold fits
        raise ValueError("give min_quality or strong_share, not both")
    router.threshold, calibration = _calibrated(
        train, emb, kind, options, min_quality, strong_share, calibration_folds
    )

    stamp = dt.datetime.now(dt.UTC)
    digest = hashlib.sha1("\x1e".join(f"{r.group}\x1f{r.prompt}" for r in train).encode()).hexdigest()[:8]
    router.metadata = {
        "version": f"{kind}-{stamp:%Y%m%dT%H%M%S}-{digest}",
        "created_at": stamp.isoformat(),
        "options": asdict(options),
        "calibration": calibration,
        "training": {
            "sources": list(sources),
            "buckets": "0-7 of 10 (sha1 of the prompt)" if hold_out else "all",
            **label_summary(train),
        },
    }
    if held:
        router.metadata["held_out"] = evaluate_by_group(router, held, encode)
    return router


# --------------------------------------------------------------------------------------------------------
# Calibration and evaluation
# --------------------------------------------------------------------------------------------------------


def recalibrate(
    router: LearnedRouter,
    rows: Sequence[LabelledPrompt],
    encode: Encode,
    *,
    strong_share: float | None = None,
    min_quality: float | None = None,
) -> float:
    """Set `router.threshold` from calibration rows (see `calibrate_threshold`) and record how in its
    metadata. Use rows the router was not trained on (e.g. held-out buckets or recent traffic)."""
    if strong_share is not None:
        router.threshold = calibrate_threshold(score_rows(router, rows, encode), strong_share=strong_share)
        how = f"strong_share {strong_share}"
    else:
        known = [r for r in rows if r.strong_ok is not None]
        router.threshold = calibrate_threshold(
            score_rows(router, known, encode), known, min_quality=min_quality
        )
        how = f"min_quality {min_quality} x strong"
    router.metadata["calibration"] = f"{how} on {len(rows)} calibration rows"
    return router.threshold


def evaluate_router(router: Scorer, rows: Sequence[LabelledPrompt], encode: Encode) -> RouterMetrics:
    """APGR, CPT(50%), CPT(80%) and the curve of `router` on the rows with both labels."""
    known = [r for r in rows if r.strong_ok is not None]
    if not known:
        raise ValueError("no rows with a strong-model label to evaluate on")
    return evaluate_scores(score_rows(router, known, encode), known)


def evaluate_by_group(router: Scorer, rows: Sequence[LabelledPrompt], encode: Encode) -> dict[str, Any]:
    """`evaluate_router` per group (plus "all"), as plain dicts without the curve (for metadata)."""
    out: dict[str, Any] = {}
    groups = sorted({r.group for r in rows})
    for name in [*groups, "all"] if len(groups) > 1 else groups:
        subset = [r for r in rows if name == "all" or r.group == name]
        try:
            metrics = evaluate_router(router, subset, encode).as_dict()
        except ValueError as exc:  # e.g. equal weak and strong quality on a tiny group
            out[name] = {"error": str(exc), "n": len(subset)}
            continue
        metrics.pop("curve")
        out[name] = metrics
    return out


# --------------------------------------------------------------------------------------------------------
# What a trained router remembers of its training rows
# --------------------------------------------------------------------------------------------------------


def prompt_hash(prompt: str) -> int:
    """64 bits of sha1 of the normalised prompt (the key `routers.data.prompt_bucket` buckets)."""
    return int.from_bytes(hashlib.sha1(normalise(prompt).encode()).digest()[:8], "big")


def remember_training(router: LearnedRouter, train_rows: Sequence[LabelledPrompt], encode: Encode) -> None:
    """Keep in the artifact what an evaluation must leave out (hashes of the training prompts) and the
    training scores' quantiles (the gateway maps a policy's `strong_share` to a threshold with them)."""
    router.metadata["trained_prompt_hashes"] = np.unique(
        np.array([prompt_hash(r.prompt) for r in train_rows], dtype=np.uint64)
    )
    scores = score_rows(router, train_rows, encode)
    router.metadata["score_quantiles"] = np.quantile(scores, np.linspace(0, 1, 201)).tolist()


def unseen_rows(router: LearnedRouter, rows: Sequence[LabelledPrompt]) -> list[LabelledPrompt]:
    """The rows whose prompt the router was not trained on (all of them if it kept no record)."""
    seen = router.metadata.get("trained_prompt_hashes")
    if seen is None or not len(seen):
        return list(rows)
    hashes = np.array([prompt_hash(r.prompt) for r in rows], dtype=np.uint64)
    keep = ~np.isin(hashes, np.asarray(seen, dtype=np.uint64))
    return [r for r, k in zip(rows, keep, strict=True) if k]
