"""Training and evaluating the output-length predictor: offline (`icgate length ...`, the benchmark) and
in the gateway's per-backend refit (`fit_logged`).

Training data: Arena-Hard prompts with the true length of one model's answers (`load_length_rows`), split
by the bucket of the question id (buckets 0-7 train, 8-9 held out), or the gateway's own route samples
(`refit_from_records`), or one backend's logged answers, truncated ones as lower bounds (`fit_logged`,
`impute_truncated`). What is fitted is a `lengths.predict.LengthPredictor`: plain arrays, read at request
time without this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from icgate.lengths.predict import (
    EMBEDDING_DIM,
    FEATURE_NAMES,
    FORMAT_VERSION,
    Floats,
    LengthModel,
    LengthPredictor,
    Vectors,
    load_length_model,
    prompt_features,
    requested_tokens,
)
from icgate.text import HELD_OUT_BUCKETS, TRAIN_BUCKETS, bucket_of, estimate_prompt_tokens

Encode = Callable[[list[str]], Vectors]

DEFAULT_MODEL = "gpt-4-0314"
MIN_TRAINING_ROWS = 20


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthRow:
    """One prompt and the true length of one model's answer to it."""

    question_id: str
    prompt: str
    tokens: int
    embedding: Vectors | None = field(default=None, compare=False, repr=False)

    @property
    def estimated_prompt_tokens(self) -> int:
        """The `prompt_tokens` feature exactly as the gateway serves it for a one-message chat request
        (never a tokenizer's count: the predictor must be trained on what it is served)."""
        return estimate_prompt_tokens({"messages": [{"role": "user", "content": self.prompt}]}, "chat")


def question_bucket(row: LengthRow) -> int:
    """The bucket of the question id (of the prompt, as written, when there is none): a split that never
    depends on file order, and keeps every answer to one question on one side."""
    return bucket_of(row.question_id or row.prompt)


def split_rows(rows: Sequence[LengthRow]) -> tuple[list[LengthRow], list[LengthRow]]:
    """(training rows: buckets 0-7, held-out rows: buckets 8-9) by `question_bucket`."""
    train = [r for r in rows if question_bucket(r) in TRAIN_BUCKETS]
    return train, [r for r in rows if question_bucket(r) in HELD_OUT_BUCKETS]


def load_length_rows(path: str | Path, model: str = DEFAULT_MODEL) -> list[LengthRow]:
    """Rows of an Arena-Hard-style JSONL file: `{question_id, prompt, answers: {model: {tokens, ...}}}`.

    ValueError names the file and line of a malformed row, and lists the models present when `model` is
    not among them.
    """
    path = Path(path)
    rows: list[LengthRow] = []
    seen_models: set[str] = set()
    missing_at: int | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            answers = record.get("answers")
            if not isinstance(answers, dict):
                raise ValueError(f"{where}: 'answers' must be an object of model -> answer")
            seen_models.update(str(k) for k in answers)
            answer = answers.get(model)
            if answer is None:
                missing_at = missing_at or number
                continue
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ValueError(
                    f"{where}: answers[{model!r}].tokens must be a non-negative integer, got {tokens!r}"
                )
            qid = record.get("question_id", "")
            rows.append(
                LengthRow(question_id=str(qid) if qid is not None else "", prompt=prompt, tokens=tokens)
            )
    if not rows:
        if not seen_models:
            raise ValueError(f"{path}: no rows")
        raise ValueError(
            f"{path}: no answers of model {model!r}; models present: {', '.join(sorted(seen_models))}"
        )
    if missing_at is not None:
        raise ValueError(
            f"{path}:{missing_at}: no answer of model {model!r}; models on that line: "
            f"{', '.join(sorted(seen_models))}"
        )
    return rows


def embed_rows(rows: Sequence[LengthRow], encode: Encode) -> list[LengthRow]:
    """`rows` with their prompt embeddings filled in by `encode` (the gateway's: the packaged MiniLM)."""
    todo = [r.prompt for r in rows if r.embedding is None]
    if not todo:
        return list(rows)
    vectors = iter(np.asarray(encode(todo), dtype=np.float32))
    return [r if r.embedding is not None else replace(r, embedding=next(vectors)) for r in rows]


@dataclass(frozen=True)
class LengthRecord:
    """One request from the gateway's log: what was asked and how long the answer was."""

    text: str
    completion_tokens: int
    embedding: Vectors | None = None


# --------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------


def _ecdf_target(tokens: Floats) -> Floats:
    """Each length's rank as a share in (0, 1): the regression target. Ranks, not log tokens, because the
    metric is rank agreement and a few 4,000-token answers should not pull the fit."""
    from scipy.stats import rankdata

    ranks = np.asarray(rankdata(tokens, method="average"), dtype=np.float64) - 1.0  # ties: their mean rank
    return (ranks + 0.5) / len(tokens)


def _fold_sets(n: int, folds: int, seed: int, groups: Sequence[str] | None) -> list[npt.NDArray[np.intp]]:
    """Each fold's test rows. With `groups` (e.g. the prompt text), every row of a group lands in one fold:
    the gateway's log repeats prompts, and a prompt on both sides would flatter the out-of-fold scores the
    calibration and p90 come from."""
    if groups is None:
        order = np.random.default_rng(seed).permutation(n)
        return [order[k::folds] for k in range(folds)]
    keys = np.array([bucket_of(f"{seed}:{g}", folds) for g in groups])
    return [np.flatnonzero(keys == k) for k in range(folds)]


class _RidgeFolds:
    """Ridge fits on every fold's training rows, and on all rows, for any number of targets.

    Why: the imputation of truncated answers refits the same rows against new targets several times; the
    Gram matrices and their Cholesky factors depend only on the rows, so they are computed once, and a
    refit is then one X^T y and one triangular solve per fold.
    """

    def __init__(self, x: Floats, alpha: float, fold_sets: Sequence[npt.NDArray[np.intp]]) -> None:
        from scipy.linalg import cho_factor

        self.x = x
        self.tests = [t for t in fold_sets if len(t)]
        n = len(x)
        gram = x.T @ x
        total = x.sum(axis=0)
        self.trains: list[npt.NDArray[np.intp]] = []
        self.factors: list[Any] = []
        self.means: list[Floats] = []
        every = np.arange(n)
        for test in [*self.tests, np.zeros(0, dtype=np.intp)]:
            part = x[test]
            rows = n - len(test)
            mean = (total - part.sum(axis=0)) / rows
            centred = gram - part.T @ part - rows * np.outer(mean, mean)
            self.factors.append(cho_factor(centred + alpha * np.eye(x.shape[1])))
            self.means.append(mean)
            self.trains.append(np.setdiff1d(every, test))

    def _fit(self, k: int, y: Floats) -> tuple[Floats, float]:
        from scipy.linalg import cho_solve

        train, mean = self.trains[k], self.means[k]
        mean_y = float(y.mean())
        xty = self.x[train].T @ y - len(train) * mean * mean_y
        coef: Floats = cho_solve(self.factors[k], xty)
        return coef, mean_y - float(mean @ coef)

    def out_of_fold(self, y_tokens: Floats) -> Floats:
        """Each row's score from the fit on the folds it is not in (rank-share target of `y_tokens`)."""
        oof = np.empty(len(y_tokens))
        for k, test in enumerate(self.tests):
            coef, intercept = self._fit(k, _ecdf_target(y_tokens[self.trains[k]]))
            oof[test] = self.x[test] @ coef + intercept
        return oof

    def full(self, y_tokens: Floats) -> tuple[Floats, float]:
        return self._fit(len(self.tests), _ecdf_target(y_tokens))


def _calibration(oof: Floats, log_tokens: Floats) -> tuple[float, float]:
    """(a, b) of log tokens ~ a + b * score, by least squares."""
    if np.ptp(oof) <= 0:
        return float(log_tokens.mean()), 0.0
    b, a = np.polyfit(oof, log_tokens, 1)
    return float(a), float(b)


def _kaplan_meier(values: Floats, observed: npt.NDArray[np.bool_]) -> tuple[Floats, Floats]:
    """The Kaplan-Meier estimate of a distribution from values some of which are lower bounds
    (`observed` False): the sorted values and each one's probability mass (zero at a bound). Mass left
    beyond the largest value sits on it."""
    order = np.lexsort((~observed, values))  # ascending; at a tie, the observed point first
    r, seen = values[order], observed[order]
    n = len(r)
    if n == 0:
        return r, np.zeros(0)
    at_risk = (n - np.arange(n)).astype(np.float64)
    survival = np.cumprod(np.where(seen, 1.0 - 1.0 / at_risk, 1.0))
    mass: Floats = np.concatenate([[1.0], survival[:-1]]) - survival
    mass[-1] += survival[-1]
    return r, mass


def km_quantiles(values: Floats, observed: npt.NDArray[np.bool_], shares: Sequence[float]) -> list[float]:
    """Quantiles of the Kaplan-Meier estimate (see `_kaplan_meier`)."""
    r, mass = _kaplan_meier(values, observed)
    cumulative = np.cumsum(mass)
    return [float(r[min(int(np.searchsorted(cumulative, q - 1e-12)), len(r) - 1)]) for q in shares]


def km_conditional_median(residuals: Floats, observed: npt.NDArray[np.bool_], bounds: Floats) -> Floats:
    """For each bound e, the median of the residual distribution above e (>= e), under the Kaplan-Meier
    estimate of that distribution from `residuals` (`observed` False: a censored residual, a lower bound).

    Why Kaplan-Meier and not the observed residuals alone: long answers are the ones cut short, so the
    observed residuals under-represent the upper tail; KM hands each censored residual's mass on to the
    residuals above it. Mass left beyond the largest residual sits on it. A bound above every residual
    imputes the bound itself (nothing is known beyond it).
    """
    r, mass = _kaplan_meier(residuals, observed)
    n = len(r)
    if n == 0:
        return np.asarray(bounds, dtype=np.float64).copy()
    bounds = np.asarray(bounds, dtype=np.float64)
    cumulative = np.cumsum(mass)
    start = np.searchsorted(r, bounds, side="left")
    before = np.where(start > 0, cumulative[np.maximum(start - 1, 0)], 0.0)
    above = cumulative[-1] - before
    k = np.minimum(np.searchsorted(cumulative, before + 0.5 * above - 1e-12, side="left"), n - 1)
    known = (start < n) & (above > 1e-12)
    return np.where(known, np.maximum(r[k], bounds), bounds)


def _from_siblings(
    y_tokens: Floats, truncated: npt.NDArray[np.bool_], groups: Sequence[str]
) -> tuple[npt.NDArray[np.intp], Floats]:
    """Truncated rows whose group (the same prompt) has finished answers at or above their bound, and the
    median of those answers: the prompt's own lengths, where the log holds them."""
    finished: dict[str, list[float]] = {}
    for i in np.flatnonzero(~truncated).tolist():
        finished.setdefault(groups[i], []).append(float(y_tokens[i]))
    sorted_lengths = {g: np.sort(np.asarray(v)) for g, v in finished.items()}
    rows, values = [], []
    for i in np.flatnonzero(truncated).tolist():
        lengths = sorted_lengths.get(groups[i])
        if lengths is None:
            continue
        above = lengths[np.searchsorted(lengths, y_tokens[i], side="left") :]
        if len(above):
            rows.append(i)
            values.append(float(np.median(above)))
    return np.asarray(rows, dtype=np.intp), np.asarray(values, dtype=np.float64)


def impute_truncated(
    ridge: _RidgeFolds,
    y_tokens: Floats,
    truncated: npt.NDArray[np.bool_],
    groups: Sequence[str] | None = None,
    rounds: int = 3,
) -> Floats:
    """Lengths with every truncated answer's bound replaced by its conditional median length above the
    bound: from the same prompt's finished answers above it when the log holds some (`groups`), else from
    the model (Buckley-James imputation, with medians): fit, read the residual distribution with
    Kaplan-Meier, impute, fit again.

    A truncated answer (finish_reason "length", or max_tokens reached) says only "at least this long".
    Used as a label, it teaches that long prompts get short answers; dropped, it removes the long answers
    preferentially; both bias the predictor short. The first round calibrates on finished answers only.
    The model's imputation regresses towards the mean as a weak predictor does (long prompts imputed
    short, short ones long), so a prompt's own answers come first.
    """
    work = y_tokens.copy()
    if not truncated.any() or truncated.all():
        return work
    to_model = truncated.copy()
    if groups is not None:
        rows, values = _from_siblings(y_tokens, truncated, groups)
        work[rows] = values
        to_model[rows] = False
    if not to_model.any():
        return work
    log_bound = np.log(np.maximum(y_tokens, 1.0))
    finished = ~truncated
    for round_ in range(rounds):
        oof = ridge.out_of_fold(work)
        fit_on = finished if round_ == 0 else np.ones_like(finished)
        a, b = _calibration(oof[fit_on], np.log(np.maximum(work[fit_on], 1.0)))
        middle = a + b * oof
        residuals = log_bound - middle
        above = km_conditional_median(residuals, finished, residuals[to_model])
        work[to_model] = np.maximum(np.exp(middle[to_model] + above), y_tokens[to_model])
    return work


def fit_predictor(  # noqa: PLR0913 - the data, then every fitting knob by keyword
    embeddings: Vectors,
    prompt_tokens: Sequence[int],
    texts: Sequence[str | None],
    tokens: Sequence[int],
    *,
    truncated: Sequence[bool] | None = None,
    groups: Sequence[str] | None = None,
    alpha: float = 3.0,
    feature_weight: float = 0.15,
    folds: int = 5,
    seed: int = 0,
    summary: Mapping[str, Any] | None = None,
) -> LengthPredictor:
    """Fit on (embedding, prompt tokens, text) -> true completion tokens.

    `alpha` and `feature_weight` (the features' share of the penalty budget) were chosen by repeated
    10-fold CV on Arena-Hard's training buckets (see bench/length_quality.py); the features barely
    moved tau there, so their weight is small. Calibration and the p50/p90 offsets come from `folds`
    out-of-fold predictions, so they describe unseen prompts, not the training fit.

    `truncated` marks answers cut short (their tokens are a lower bound: `impute_truncated`); `groups`
    keeps rows of one group (one prompt) in one fold.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    observed = np.asarray(tokens, dtype=np.float64)
    n = len(observed)
    if n < MIN_TRAINING_ROWS:
        raise ValueError(f"need at least {MIN_TRAINING_ROWS} rows to fit a length predictor, got {n}")
    if emb.shape != (n, EMBEDDING_DIM):
        raise ValueError(f"expected embeddings of shape ({n}, {EMBEDDING_DIM}), got {emb.shape}")
    if len(prompt_tokens) != n or len(texts) != n:
        raise ValueError("embeddings, prompt_tokens, texts and tokens must have the same length")
    cut = np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool)
    if cut.shape != (n,) or (groups is not None and len(groups) != n):
        raise ValueError("truncated and groups must have one entry per row")
    raw = np.stack([prompt_features(p, t) for p, t in zip(prompt_tokens, texts, strict=True)])
    feature_mean = raw.mean(axis=0)
    std = raw.std(axis=0)
    # A constant feature gets scale 1 (it is zero after centring anyway).
    weight = feature_weight / math.sqrt(len(FEATURE_NAMES)) if feature_weight > 0 else 0.0
    feature_scale = np.where(std > 0, std, 1.0) / weight if weight > 0 else np.full_like(std, np.inf)
    x = np.hstack([emb, (raw - feature_mean) / feature_scale])
    ridge = _RidgeFolds(x, alpha, _fold_sets(n, folds, seed, groups))
    y_tokens = impute_truncated(ridge, observed, cut, groups)
    log_tokens = np.log(np.maximum(y_tokens, 1.0))

    oof = ridge.out_of_fold(y_tokens)
    coef, intercept = ridge.full(y_tokens)
    # Calibrate on out-of-fold scores: their spread is what unseen prompts will show.
    calib_a, calib_b = _calibration(oof, log_tokens)
    residuals = log_tokens - (calib_a + calib_b * oof)
    if cut.any():
        # p50/p90 offsets from the truncated answers' bounds as bounds: imputed medians would narrow the
        # spread, and with it the p90.
        bounded = np.log(np.maximum(observed, 1.0)) - (calib_a + calib_b * oof)
        q50, q90 = km_quantiles(bounded, ~cut, [0.5, 0.9])
    else:
        q50, q90 = np.quantile(residuals, [0.5, 0.9])
    info = {
        "rows": n,
        "alpha": alpha,
        "feature_weight": feature_weight,
        "features": list(FEATURE_NAMES),
        "target": "rank share of completion tokens",
        "tokens_p50": float(np.median(y_tokens)),
        "tokens_p90": float(np.quantile(y_tokens, 0.9)),
        "oof_kendall_tau": _kendall(oof, y_tokens),
        **({"truncated": int(cut.sum())} if cut.any() else {}),
        **dict(summary or {}),
    }
    digest = hashlib.sha1(np.ascontiguousarray(coef).tobytes()).hexdigest()[:10]
    predictor = LengthPredictor(
        coef=coef,
        intercept=float(intercept),
        embedding_mean=emb.mean(axis=0),
        feature_mean=feature_mean,
        feature_scale=feature_scale,
        calib_a=float(calib_a),
        calib_b=float(calib_b),
        q50=float(q50),
        q90=float(max(q90, q50)),
        version=f"v{FORMAT_VERSION}-{dt.datetime.now(dt.UTC):%Y%m%d}-{digest}",
        summary=info,
    )
    if (~cut).any():
        # What the predictor's p50 misses by on answers it was not fitted on (the finished ones: a cut
        # answer's length is only a bound): the refit's gate against the shared predictor.
        oof_p50 = np.array(
            [predictor.from_score(float(s), requested_tokens(t)).p50 for s, t in zip(oof, texts, strict=True)]
        )
        predictor.summary["oof_mae_tokens"] = float(np.mean(np.abs(oof_p50 - observed)[~cut]))
    return predictor


def fit_rows(rows: Sequence[LengthRow], **kwargs: Any) -> LengthPredictor:
    """`fit_predictor` on rows that carry embeddings (see `embed_rows`). The summary keeps a short digest
    of every training prompt, so an evaluation can leave out what the predictor has seen."""
    if any(r.embedding is None for r in rows):
        raise ValueError("every row needs an embedding: call embed_rows first")
    summary = {
        **dict(kwargs.pop("summary", None) or {}),
        "trained_prompts": sorted({prompt_digest(r.prompt) for r in rows}),
    }
    return fit_predictor(
        np.stack([np.asarray(r.embedding) for r in rows]) if rows else np.zeros((0, EMBEDDING_DIM)),
        [r.estimated_prompt_tokens for r in rows],
        [r.prompt for r in rows],
        [r.tokens for r in rows],
        summary=summary,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------
# Training entry points and evaluation
# --------------------------------------------------------------------------------------------------------


def _kendall(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if tau == tau else 0.0  # NaN (constant input) -> 0


def evaluate_length(
    predictor: LengthModel, rows: Sequence[LengthRow], encode: Encode | None = None
) -> dict[str, Any]:
    """Kendall's tau between predicted p50 and true tokens, MAE of p50 in tokens, p90 coverage, n.

    A learned predictor needs embeddings: rows without one are embedded with `encode` first.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    if isinstance(predictor, LengthPredictor) and any(r.embedding is None for r in rows):
        if encode is None:
            raise ValueError("rows without embeddings: a learned predictor needs an encoder to evaluate")
        rows = embed_rows(rows, encode)
    estimates = [predictor.predict(r.embedding, r.estimated_prompt_tokens, r.prompt) for r in rows]
    p50 = np.array([e.p50 for e in estimates], dtype=np.float64)
    p90 = np.array([e.p90 for e in estimates], dtype=np.float64)
    truth = np.array([r.tokens for r in rows], dtype=np.float64)
    return {
        "kendall_tau": round(_kendall(p50, truth), 4),
        "mae": round(float(np.abs(p50 - truth).mean()), 1),
        "p90_coverage": round(float((truth <= p90).mean()), 4),
        "n": len(rows),
    }


def train_arena(
    path: str | Path,
    encode: Encode,
    model: str = DEFAULT_MODEL,
    out_path: str | Path | None = None,
    *,
    all_buckets: bool = False,
    **fit_kwargs: Any,
) -> LengthPredictor:
    """Fit on an Arena-Hard-style file's training buckets (0-7) for `model`'s answers, record held-out
    (8-9) metrics in the artifact, and save it to `out_path` (None: do not save).

    `all_buckets` trains on everything (the held-out metrics are then omitted: they would not be honest).
    """
    path = Path(path)
    rows = embed_rows(load_length_rows(path, model), encode)
    train, held = split_rows(rows)
    chosen = rows if all_buckets else train
    predictor = fit_rows(
        chosen,
        summary={
            "data": path.name,
            "model": model,
            "buckets": "all" if all_buckets else "0-7 of 10 (sha1 of question_id)",
            "embedding": "all-MiniLM-L6-v2",
        },
        **fit_kwargs,
    )
    if not all_buckets and held:
        predictor.metrics = {"held_out": evaluate_length(predictor, held), "held_out_buckets": "8-9"}
    if out_path is not None:
        predictor.save(out_path)
    return predictor


def prompt_digest(prompt: str) -> str:
    """A short fingerprint of a training prompt, kept in the artifact so evaluations can skip it."""
    return hashlib.sha1(prompt.strip().encode()).hexdigest()[:12]


def evaluate_file(
    path: str | Path,
    model: str = DEFAULT_MODEL,
    artifact: str | Path | LengthModel | None = None,
    encode: Encode | None = None,
) -> dict[str, Any]:
    """`icgate length eval`: metrics of the shipped (or given) predictor on a file's rows, leaving out the
    prompts it was trained on (on Arena-Hard itself that leaves the held-out buckets 8-9; a file it never
    saw is scored whole). `skipped_trained` says how many were left out."""
    rows = load_length_rows(path, model)
    predictor = (
        load_length_model(artifact) if artifact is None or isinstance(artifact, str | Path) else artifact
    )
    seen = set(getattr(predictor, "summary", {}).get("trained_prompts") or ())
    unseen = [r for r in rows if prompt_digest(r.prompt) not in seen]
    if not unseen:
        raise ValueError(f"{path}: every row was used to train this predictor; nothing left to evaluate")
    result = evaluate_length(predictor, unseen, encode)
    result["predictor"] = getattr(predictor, "version", "heuristic")
    result["skipped_trained"] = len(rows) - len(unseen)
    return result


def _coerce_record(record: LengthRecord | tuple[Any, ...]) -> LengthRecord:
    if isinstance(record, LengthRecord):
        return record
    text, embedding, completion_tokens, *_ = record
    return LengthRecord(
        text=str(text),
        completion_tokens=int(completion_tokens),
        embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
    )


def refit_from_records(
    records: Iterable[LengthRecord | tuple[Any, ...]],
    encode: Encode | None = None,
    *,
    extra_rows: Sequence[LengthRow] = (),
    **fit_kwargs: Any,
) -> LengthPredictor:
    """Refit from the gateway's request log: records of (prompt text, embedding or None, completion
    tokens). Records without an embedding are embedded with `encode` when given and dropped
    otherwise; records with no completion tokens are dropped (an error or a cache hit says nothing about
    length). `extra_rows` (embedded LengthRows, e.g. Arena-Hard's) are added to the log's rows.
    """
    kept: list[LengthRow] = []
    need_vectors: list[LengthRow] = []
    dropped = 0
    for raw in records:
        rec = _coerce_record(raw)
        if rec.completion_tokens <= 0 or not rec.text.strip():
            dropped += 1
            continue
        row = LengthRow("", rec.text, rec.completion_tokens, rec.embedding)
        (kept if rec.embedding is not None else need_vectors).append(row)
    if need_vectors and encode is not None:
        kept.extend(embed_rows(need_vectors, encode))
    else:
        dropped += len(need_vectors)
    rows = [*kept, *extra_rows]
    return fit_rows(
        rows,
        summary={
            "data": "request log",
            "log_rows": len(kept),
            "extra_rows": len(extra_rows),
            "dropped": dropped,
            "embedding": "all-MiniLM-L6-v2",
        },
        **fit_kwargs,
    )


# --------------------------------------------------------------------------------------------------------
# A backend's own predictor, from its answers in the gateway's log
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedAnswer:
    """One answered request, as the gateway logged it for the length refit.

    `text` and `prompt_tokens` are what the route stage read (the prompt's feature window and the
    gateway's token estimate), `embedding` the vector it used (None when it had none).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool  # a lower bound: finish_reason "length", or the request's max_tokens reached
    embedding: Vectors | None = field(default=None, compare=False, repr=False)


def fit_logged(
    answers: Sequence[LoggedAnswer], *, summary: Mapping[str, Any] | None = None, **fit_kwargs: Any
) -> LengthPredictor:
    """A predictor of one backend's answer lengths, fitted on its logged answers.

    An answer logged without an embedding is fitted at the mean embedding of those with one, which is
    where the predictor puts a request it is served without one; none with one: the prompt features
    alone. Truncated answers are lower bounds (`impute_truncated`); folds keep repeats of one prompt
    together.
    """
    rows = [a for a in answers if a.completion_tokens > 0 and a.text.strip()]
    with_vector = [np.asarray(a.embedding, dtype=np.float64) for a in rows if a.embedding is not None]
    mean = np.mean(with_vector, axis=0) if with_vector else np.zeros(EMBEDDING_DIM)
    embeddings = (
        np.stack([mean if a.embedding is None else np.asarray(a.embedding, dtype=np.float64) for a in rows])
        if rows
        else np.zeros((0, EMBEDDING_DIM))
    )
    info = {
        "data": "gateway answers",
        "answers": len(rows),
        "with_embedding": len(with_vector),
        "embedding": "all-MiniLM-L6-v2",
        **dict(summary or {}),
    }
    return fit_predictor(
        embeddings,
        [a.prompt_tokens for a in rows],
        [a.text for a in rows],
        [a.completion_tokens for a in rows],
        truncated=[a.truncated for a in rows],
        groups=[a.text for a in rows],
        summary=info,
        **fit_kwargs,
    )
