"""Output-length prediction: how many tokens a request's answer will take, as a median (p50) and a p90.

Why: admission control and routing need an estimate of the work a request will cause before any token is
generated. The learned predictor is a ridge regression on the prompt's MiniLM embedding (computed once per
request upstream) plus a few cheap prompt features; its scores are mapped to tokens by a linear calibration
in log space, and p50/p90 come from the quantiles of out-of-fold residuals, so p90 coverage is measured,
not assumed. Everything is stored as plain numpy arrays: a prediction is a few dot products (microseconds;
no scikit-learn call per request) and the artifact holds no pickled estimator.

Training data: Arena-Hard prompts with the true length of one model's answers (`load_length_rows`), split
by sha1 of the question id (buckets 0-7 train, 8-9 held out), or the gateway's own request log
(`refit_from_records`). `PromptLengthHeuristic` is the untrained fallback behind the same interface.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from routers.base import write_artifact

Encode = Callable[[list[str]], np.ndarray]

ARTIFACT_KIND = "icgate-length-predictor"
FORMAT_VERSION = 1
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "length.joblib"
DEFAULT_MODEL = "gpt-4-0314"
TRAIN_BUCKETS = frozenset(range(8))
HELD_OUT_BUCKETS = frozenset({8, 9})
EMBEDDING_DIM = 384
MIN_TRAINING_ROWS = 20

# Regexes only ever see the head and tail of a prompt: the instruction is almost always there, and it keeps
# a prediction's cost bounded whatever was pasted in the middle.
_HEAD_CHARS = 1200
_TAIL_CHARS = 600


# Cues are word sets (looked up in the prompt's set of words) plus phrases (substring tests): one pass of
# one simple regex per prompt, where a regex alternation per cue took over 1 ms on a long prompt.
def _words(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


_CODE_LANGS = _words(
    "python javascript typescript java c++ c# rust golang php ruby scala kotlin swift sql bash "
    "powershell haskell scheme lisp vba matlab html css react vue django flask nodejs node.js "
    "gdscript xaml latex regex pandas numpy pytorch tensorflow"
)
_WRITE_VERBS = frozenset(
    ["write", "create", "build", "make", "develop", "generate", "design", "draft", "compose"]
)


@dataclass(frozen=True)
class _Cue:
    words: frozenset[str] = frozenset()
    phrases: tuple[str, ...] = ()

    def found(self, words: set[str], lowered: str) -> bool:
        return not self.words.isdisjoint(words) or any(p in lowered for p in self.phrases)


_CUES: Mapping[str, _Cue] = MappingProxyType(
    {
        "write": _Cue(),  # an imperative write/create/... at a sentence's start: see `prompt_features`
        "explain": _Cue(frozenset({"explain", "describe", "why"}), ("tell me", "what is", "what are")),
        "list": _Cue(
            frozenset({"list", "enumerate", "outline", "steps", "categories"}),
            ("step by step", "step-by-step"),
        ),
        "compare": _Cue(
            frozenset({"compare", "comparison", "versus", "vs", "difference", "differences"}),
            ("pros and cons",),
        ),
        "howto": _Cue(phrases=("how do ", "how can ", "how to ", "how would ", "how should ")),
        "asks_code": _Cue(
            _words(
                "implement implementation code program script function class app application plugin engine "
                "server api"
            )
            | _CODE_LANGS
        ),
        "long": _Cue(
            _words(
                "detailed comprehensive thorough essay article blog story report paper specification guide "
                "tutorial full complete example examples"
            ),
            ("in-depth", "in depth", "literature review"),
        ),
        "short": _Cue(
            frozenset(
                {"brief", "briefly", "short", "concise", "concisely", "only", "just", "summary", "summarize"}
            ),
            ("one word", "one sentence", "one line", "yes or no"),
        ),
        "fix": _Cue(
            frozenset({"fix", "error", "bug", "wrong", "issue", "traceback", "exception"}),
            ("doesn't work", "not working"),
        ),
        "rewrite": _Cue(
            frozenset(
                {"translate", "rewrite", "rephrase", "reformulate", "convert", "proofread", "paraphrase"}
            )
        ),
        "math": _Cue(
            frozenset({"calculate", "compute", "solve", "probability", "equation"}),
            ("how many", "how much", "how long"),
        ),
    }
)
_WORD = re.compile(r"[a-z0-9+#]+(?:[.'-][a-z0-9+#]+)*")
_SENTENCE = re.compile(r"[.!?\n]\s*")
# A line that looks like code: a code character, an indented line, or a keyword at its start. Anchored
# at line starts, so findall counts each line at most once.
_CODE_LINE = re.compile(
    r"^[^\n]*[;{}=<>]|^(?:  |\t)+\S|"
    r"^[ \t]*(?:def|import|from|class|return|if|for|while|#include|let|const|var|fn|public)\b",
    re.M,
)
# An explicit length request: "in 100 words", "a 300-word essay", "at most 3 sentences", "30 to 50 tokens".
_LENGTH_REQUEST = re.compile(r"(\d[\d,]*)[\s-]*(words?|tokens?|sentences?|paragraphs?)\b")
_LENGTH_UNITS = ("word", "token", "sentence", "paragraph")
_TOKENS_PER_UNIT = MappingProxyType({"word": 1.35, "token": 1.0, "sentence": 25.0, "paragraph": 110.0})
_MAX_REQUESTED_TOKENS = 8000.0

FEATURE_NAMES: tuple[str, ...] = (
    "log_prompt_tokens",
    "questions",
    "code_in_prompt",
    *_CUES,
    "log_requested_tokens",
)


# --------------------------------------------------------------------------------------------------------
# Estimates and the interface
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthEstimate:
    """Predicted completion tokens: the median and the 90th percentile (p90 >= p50 >= 1)."""

    p50: int
    p90: int


class LengthModel(Protocol):
    def predict(
        self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None
    ) -> LengthEstimate: ...


def _estimate(p50: float, p90: float) -> LengthEstimate:
    lo = max(1, round(p50))
    return LengthEstimate(p50=lo, p90=max(lo, round(p90)))


def _window(text: str) -> str:
    if len(text) <= _HEAD_CHARS + _TAIL_CHARS:
        return text
    return text[:_HEAD_CHARS] + "\n" + text[-_TAIL_CHARS:]


def requested_tokens(text: str | None) -> float | None:
    """Tokens the prompt explicitly asks for ("in 100 words" -> 135), or None when it names no length.

    Why a rule: such requests are rare in any training set, so no model learns them, yet they are the
    strongest length signal a prompt can carry. Counts beyond `_MAX_REQUESTED_TOKENS` are read as not a
    request (e.g. "a vocabulary of 20,000 words").
    """
    if not text:
        return None
    lowered = _window(text).lower()
    if not any(unit in lowered for unit in _LENGTH_UNITS):
        return None
    found: float | None = None
    for match in _LENGTH_REQUEST.finditer(lowered):
        digits = match.group(1).replace(",", "")
        tokens = float(digits) * _TOKENS_PER_UNIT[match.group(2).rstrip("s")] if digits else 0.0
        if 0 < tokens <= _MAX_REQUESTED_TOKENS:
            found = max(found or 0.0, tokens)
    return found


def prompt_features(prompt_tokens: int, text: str | None) -> np.ndarray:
    """The hand-made features, in `FEATURE_NAMES` order (float64). Text None = only the prompt length."""
    return _features(prompt_tokens, text)[0]


def _features(prompt_tokens: int, text: str | None) -> tuple[np.ndarray, float | None]:
    """The features and the explicit length request (computed once: both need it)."""
    values = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
    values[0] = math.log1p(max(0, prompt_tokens))
    if not text:
        return values, None
    window = _window(text)
    lowered = window.lower()
    words = set(_WORD.findall(lowered))
    values[1] = min(window.count("?"), 5)
    values[2] = len(_CODE_LINE.findall(window)) / (window.count("\n") + 1)
    starts = {
        (head[7:] if head.startswith("please ") else head).split(" ", 1)[0]
        for head in _SENTENCE.split(lowered)
    }
    cues = dict.fromkeys(_CUES, False)
    cues["write"] = not _WRITE_VERBS.isdisjoint(starts)
    for name, cue in _CUES.items():
        if name != "write":
            cues[name] = cue.found(words, lowered)
    values[3 : 3 + len(_CUES)] = [float(v) for v in cues.values()]
    asked = requested_tokens(text)
    values[-1] = math.log1p(asked) if asked else 0.0
    return values, asked


def _apply_request(estimate: LengthEstimate, asked: float | None) -> LengthEstimate:
    """An explicit length request overrides the model: p50 is what was asked for, p90 half as much again."""
    if asked is None:
        return estimate
    return _estimate(asked, asked * 1.5)


class PromptLengthHeuristic:
    """The fallback when no predictor is trained: a typical chat answer length scaled by prompt cues.

    The base and the factors are round numbers, chosen to rank obvious cases (a quick calculation or a
    rewrite is short; "write an app" or "explain in detail" is long), not fitted to any data set.
    """

    def __init__(self, base_tokens: float = 300.0, p90_factor: float = 2.0) -> None:
        self.base_tokens = base_tokens
        self.p90_factor = p90_factor

    def predict(self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        values, asked = _features(prompt_tokens, text)
        f = dict(zip(FEATURE_NAMES, values, strict=True))
        p50 = self.base_tokens
        if f["rewrite"]:
            # A rewrite or translation is about as long as what it rewrites.
            p50 = min(max(30.0, 1.1 * prompt_tokens), 4 * self.base_tokens)
        else:
            if f["write"] and f["asks_code"]:
                p50 *= 1.6
            elif f["write"] or f["asks_code"]:
                p50 *= 1.2
            if f["long"] or f["list"] or f["compare"] or f["explain"]:
                p50 *= 1.3
            if f["short"]:
                p50 *= 0.5
            if f["math"] or f["fix"]:
                p50 *= 0.8
        return _apply_request(_estimate(p50, p50 * self.p90_factor), asked)

    def predict_batch(
        self, embeddings: np.ndarray | None, prompt_tokens: Sequence[int], texts: Sequence[str | None]
    ) -> list[LengthEstimate]:
        return [self.predict(None, n, t) for n, t in zip(prompt_tokens, texts, strict=True)]


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthRow:
    """One prompt and the true length of one model's answer to it."""

    question_id: str
    prompt: str
    tokens: int
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    prompt_tokens: int | None = None

    @property
    def estimated_prompt_tokens(self) -> int:
        """The gateway's own estimate (four characters a token) when the true count is unknown."""
        return self.prompt_tokens if self.prompt_tokens is not None else max(1, len(self.prompt) // 4)


def length_bucket(row: LengthRow, buckets: int = 10) -> int:
    """sha1 of the question id (of the prompt when there is none) mod `buckets`: a split that never
    depends on file order. Buckets 0-7 train, 8-9 are held out."""
    key = row.question_id or row.prompt
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % buckets


def split_rows(rows: Sequence[LengthRow]) -> tuple[list[LengthRow], list[LengthRow]]:
    """(training rows, held-out rows) by `length_bucket`."""
    train = [r for r in rows if length_bucket(r) in TRAIN_BUCKETS]
    return train, [r for r in rows if length_bucket(r) in HELD_OUT_BUCKETS]


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


def embed_rows(rows: Sequence[LengthRow], encode: Encode | None = None) -> list[LengthRow]:
    """`rows` with their prompt embeddings filled in (default: the packaged MiniLM, memoised on disk)."""
    todo = [r.prompt for r in rows if r.embedding is None]
    if not todo:
        return list(rows)
    if encode is None:
        from cache.verify import default_encoder

        encode = default_encoder()
    vectors = iter(np.asarray(encode(todo), dtype=np.float32))
    return [r if r.embedding is not None else replace(r, embedding=next(vectors)) for r in rows]


@dataclass(frozen=True)
class LengthRecord:
    """One request from the gateway's log: what was asked and how long the answer was."""

    text: str
    completion_tokens: int
    embedding: np.ndarray | None = None
    prompt_tokens: int | None = None


# --------------------------------------------------------------------------------------------------------
# The learned predictor
# --------------------------------------------------------------------------------------------------------


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept, in closed form (dual when rows < columns)."""
    mean_x = x.mean(axis=0)
    mean_y = float(y.mean())
    xc = x - mean_x
    yc = y - mean_y
    if xc.shape[0] < xc.shape[1]:
        coef = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(xc.shape[0]), yc)
    else:
        coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ yc)
    return coef, mean_y - float(mean_x @ coef)


def _ecdf_target(tokens: np.ndarray) -> np.ndarray:
    """Each length's rank as a share in (0, 1): the regression target. Ranks, not log tokens, because the
    metric is rank agreement and a few 4,000-token answers should not pull the fit."""
    from scipy.stats import rankdata

    ranks = rankdata(tokens, method="average") - 1.0  # ties share their average rank
    return (ranks + 0.5) / len(tokens)


@dataclass
class LengthPredictor:
    """Ridge score on [embedding, scaled prompt features] -> log tokens (linear) -> p50/p90 offsets.

    Artifacts are joblib (pickle) files of plain arrays and numbers: load only artifacts you made or trust.
    """

    coef: np.ndarray  # (EMBEDDING_DIM + len(FEATURE_NAMES),) on [embedding, standardised features * weight]
    intercept: float
    embedding_mean: np.ndarray  # used when a request has no embedding: the embedding then adds nothing
    feature_mean: np.ndarray
    feature_scale: np.ndarray  # standard deviation / feature_weight, so scaling is one division
    calib_a: float  # log tokens ~ calib_a + calib_b * score
    calib_b: float
    q50: float  # quantiles of out-of-fold log residuals
    q90: float
    version: str
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # -- prediction --------------------------------------------------------------------------------------

    def _score(
        self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None
    ) -> tuple[float, float | None]:
        emb = self.embedding_mean if embedding is None else np.asarray(embedding, dtype=np.float64).ravel()
        if emb.shape[0] != EMBEDDING_DIM:
            raise ValueError(f"expected an embedding of dimension {EMBEDDING_DIM}, got shape {emb.shape}")
        values, asked = _features(prompt_tokens, text)
        feats = (values - self.feature_mean) / self.feature_scale
        score = float(emb @ self.coef[:EMBEDDING_DIM] + feats @ self.coef[EMBEDDING_DIM:] + self.intercept)
        return score, asked

    def score(self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None) -> float:
        """The raw ranking score (higher = longer answer)."""
        return self._score(embedding, prompt_tokens, text)[0]

    def predict(self, embedding: np.ndarray | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        """p50/p90 of the answer's tokens. No embedding: the prompt features alone decide.

        `prompt_tokens` is on the gateway's scale (`estimate_prompt_tokens`: four characters a token), the
        scale the training rows used (`LengthRow.estimated_prompt_tokens`).
        """
        score, asked = self._score(embedding, prompt_tokens, text)
        log_mid = self.calib_a + self.calib_b * score
        return _apply_request(_estimate(math.exp(log_mid + self.q50), math.exp(log_mid + self.q90)), asked)

    def predict_batch(
        self, embeddings: np.ndarray | None, prompt_tokens: Sequence[int], texts: Sequence[str | None]
    ) -> list[LengthEstimate]:
        """`predict` for many requests; `embeddings` (n, 384) or None for none."""
        n = len(prompt_tokens)
        if embeddings is None:
            emb = np.tile(self.embedding_mean, (n, 1))
        else:
            emb = np.asarray(embeddings, dtype=np.float64)
            if emb.shape != (n, EMBEDDING_DIM):
                raise ValueError(f"expected embeddings of shape ({n}, {EMBEDDING_DIM}), got {emb.shape}")
        if n == 0:
            return []
        computed = [_features(p, t) for p, t in zip(prompt_tokens, texts, strict=True)]
        feats = (np.stack([values for values, _ in computed]) - self.feature_mean) / self.feature_scale
        scores = emb @ self.coef[:EMBEDDING_DIM] + feats @ self.coef[EMBEDDING_DIM:] + self.intercept
        log_mid = self.calib_a + self.calib_b * scores
        return [
            _apply_request(_estimate(math.exp(m + self.q50), math.exp(m + self.q90)), asked)
            for m, (_, asked) in zip(log_mid.tolist(), computed, strict=True)
        ]

    # -- fitting -----------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        prompt_tokens: Sequence[int],
        texts: Sequence[str | None],
        tokens: Sequence[int],
        *,
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
        """
        emb = np.asarray(embeddings, dtype=np.float64)
        y_tokens = np.asarray(tokens, dtype=np.float64)
        n = len(y_tokens)
        if n < MIN_TRAINING_ROWS:
            raise ValueError(f"need at least {MIN_TRAINING_ROWS} rows to fit a length predictor, got {n}")
        if emb.shape != (n, EMBEDDING_DIM):
            raise ValueError(f"expected embeddings of shape ({n}, {EMBEDDING_DIM}), got {emb.shape}")
        if len(prompt_tokens) != n or len(texts) != n:
            raise ValueError("embeddings, prompt_tokens, texts and tokens must have the same length")
        raw = np.stack([prompt_features(p, t) for p, t in zip(prompt_tokens, texts, strict=True)])
        feature_mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        # A constant feature gets scale 1 (it is zero after centring anyway).
        weight = feature_weight / math.sqrt(len(FEATURE_NAMES)) if feature_weight > 0 else 0.0
        feature_scale = np.where(std > 0, std, 1.0) / weight if weight > 0 else np.full_like(std, np.inf)
        x = np.hstack([emb, (raw - feature_mean) / feature_scale])
        target = _ecdf_target(y_tokens)
        log_tokens = np.log(np.maximum(y_tokens, 1.0))

        oof = np.empty(n)
        order = np.random.default_rng(seed).permutation(n)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            c, b = _ridge(x[train], _ecdf_target(y_tokens[train]), alpha)
            oof[test] = x[test] @ c + b
        coef, intercept = _ridge(x, target, alpha)
        # Calibrate on out-of-fold scores: their spread is what unseen prompts will show.
        calib_b, calib_a = np.polyfit(oof, log_tokens, 1) if np.ptp(oof) > 0 else (0.0, log_tokens.mean())
        residuals = log_tokens - (calib_a + calib_b * oof)
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
            **dict(summary or {}),
        }
        digest = hashlib.sha1(np.ascontiguousarray(coef).tobytes()).hexdigest()[:10]
        return cls(
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

    @classmethod
    def fit_rows(cls, rows: Sequence[LengthRow], **kwargs: Any) -> LengthPredictor:
        """Fit on rows that carry embeddings (see `embed_rows`). The summary keeps a short digest of
        every training prompt, so an evaluation can leave out what the predictor has seen."""
        if any(r.embedding is None for r in rows):
            raise ValueError("every row needs an embedding: call embed_rows first")
        summary = {
            **dict(kwargs.pop("summary", None) or {}),
            "trained_prompts": sorted({prompt_digest(r.prompt) for r in rows}),
        }
        return cls.fit(
            np.stack([np.asarray(r.embedding) for r in rows]) if rows else np.zeros((0, EMBEDDING_DIM)),
            [r.estimated_prompt_tokens for r in rows],
            [r.prompt for r in rows],
            [r.tokens for r in rows],
            summary=summary,
            **kwargs,
        )

    # -- persistence -------------------------------------------------------------------------------------

    def _payload(self) -> dict[str, Any]:
        return {
            "kind": ARTIFACT_KIND,
            "format": FORMAT_VERSION,
            "version": self.version,
            "features": list(FEATURE_NAMES),
            "dim": EMBEDDING_DIM,
            "coef": np.asarray(self.coef, dtype=np.float64),
            "intercept": self.intercept,
            "embedding_mean": np.asarray(self.embedding_mean, dtype=np.float64),
            "feature_mean": np.asarray(self.feature_mean, dtype=np.float64),
            "feature_scale": np.asarray(self.feature_scale, dtype=np.float64),
            "calib_a": self.calib_a,
            "calib_b": self.calib_b,
            "q50": self.q50,
            "q90": self.q90,
            "summary": self.summary,
            "metrics": self.metrics,
        }

    def to_bytes(self) -> bytes:
        import joblib

        buffer = io.BytesIO()
        joblib.dump(self._payload(), buffer, compress=3)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> LengthPredictor:
        import joblib

        try:
            payload = joblib.load(io.BytesIO(data))
        except Exception as exc:  # joblib raises many types on garbage
            raise ValueError(f"{source}: not a joblib artifact ({type(exc).__name__})") from None
        if not isinstance(payload, dict) or payload.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"{source}: not an icgate length-predictor artifact")
        fmt = payload.get("format")
        if not isinstance(fmt, int) or not 1 <= fmt <= FORMAT_VERSION:
            raise ValueError(
                f"{source}: length-predictor format {fmt!r} is not supported (supports 1..{FORMAT_VERSION}); "
                "upgrade icgate or retrain"
            )
        if payload.get("features") != list(FEATURE_NAMES) or payload.get("dim") != EMBEDDING_DIM:
            raise ValueError(f"{source}: artifact was built with other features; retrain")
        return cls(
            coef=np.asarray(payload["coef"], dtype=np.float64),
            intercept=float(payload["intercept"]),
            embedding_mean=np.asarray(payload["embedding_mean"], dtype=np.float64),
            feature_mean=np.asarray(payload["feature_mean"], dtype=np.float64),
            feature_scale=np.asarray(payload["feature_scale"], dtype=np.float64),
            calib_a=float(payload["calib_a"]),
            calib_b=float(payload["calib_b"]),
            q50=float(payload["q50"]),
            q90=float(payload["q90"]),
            version=str(payload["version"]),
            summary=dict(payload.get("summary") or {}),
            metrics=dict(payload.get("metrics") or {}),
        )

    def save(self, path: str | Path = DEFAULT_ARTIFACT) -> Path:
        return write_artifact(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path = DEFAULT_ARTIFACT) -> LengthPredictor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"length predictor artifact not found: {path}")
        return cls.from_bytes(path.read_bytes(), str(path))


def load_length_model(path: str | Path | None = None) -> LengthModel:
    """The trained predictor at `path` (default: the shipped artifact); the heuristic when there is none."""
    target = Path(path) if path is not None else DEFAULT_ARTIFACT
    if not target.is_file():
        return PromptLengthHeuristic()
    return LengthPredictor.load(target)


# --------------------------------------------------------------------------------------------------------
# Training entry points and evaluation
# --------------------------------------------------------------------------------------------------------


def _kendall(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return float(tau) if tau == tau else 0.0  # NaN (constant input) -> 0


def evaluate_length(
    predictor: LengthModel, rows: Sequence[LengthRow], encode: Encode | None = None
) -> dict[str, Any]:
    """Kendall's tau between predicted p50 and true tokens, MAE of p50 in tokens, p90 coverage, n.

    Rows without embeddings are embedded with `encode` (default: the packaged MiniLM) first.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    if isinstance(predictor, LengthPredictor):
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
    model: str = DEFAULT_MODEL,
    out_path: str | Path | None = DEFAULT_ARTIFACT,
    encode: Encode | None = None,
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
    predictor = LengthPredictor.fit_rows(
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
    predictor: LengthModel = (
        artifact
        if isinstance(artifact, LengthPredictor | PromptLengthHeuristic)
        else load_length_model(artifact)  # type: ignore[arg-type]
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
    text, embedding, completion_tokens, *rest = record
    return LengthRecord(
        text=str(text),
        completion_tokens=int(completion_tokens),
        embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
        prompt_tokens=int(rest[0]) if rest and rest[0] is not None else None,
    )


def refit_from_records(
    records: Iterable[LengthRecord | tuple[Any, ...]],
    encode: Encode | None = None,
    *,
    extra_rows: Sequence[LengthRow] = (),
    **fit_kwargs: Any,
) -> LengthPredictor:
    """Refit from the gateway's request log: records of (prompt text, embedding or None, completion tokens
    [, prompt tokens]). Records without an embedding are embedded with `encode` when given and dropped
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
        row = LengthRow("", rec.text, rec.completion_tokens, rec.embedding, rec.prompt_tokens)
        (kept if rec.embedding is not None else need_vectors).append(row)
    if need_vectors and encode is not None:
        kept.extend(embed_rows(need_vectors, encode))
    else:
        dropped += len(need_vectors)
    rows = [*kept, *extra_rows]
    return LengthPredictor.fit_rows(
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
