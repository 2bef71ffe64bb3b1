"""Output-length prediction at request time: how many tokens a request's answer will take, as a median
(p50) and a p90.

Why: admission control and routing need an estimate of the work a request will cause before any token is
generated. The learned predictor is a ridge regression on the prompt's MiniLM embedding (computed once per
request upstream) plus a few cheap prompt features; its scores are mapped to tokens by a linear calibration
in log space, and p50/p90 come from the quantiles of out-of-fold residuals, so p90 coverage is measured,
not assumed. Everything is stored as plain numpy arrays: a prediction is a few dot products (microseconds;
no scikit-learn call per request) and the artifact holds no pickled estimator.

`OutputLengthHeuristic` is the untrained fallback behind the same interface. Fitting, the training data
and evaluation live in `lengths.training`; nothing here imports it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from icgate.files import write_atomically

Floats = npt.NDArray[np.float64]
# An embedding (or a batch of them) as the embedder returns it: float32 in the gateway, any float offline.
Vectors = npt.NDArray[np.floating[Any]]

ARTIFACT_KIND = "icgate-length-predictor"
FORMAT_VERSION = 1
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "length.joblib"
EMBEDDING_DIM = 384

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
    def predict(self, embedding: Vectors | None, prompt_tokens: int, text: str | None) -> LengthEstimate: ...


@dataclass(frozen=True)
class PromptView:
    """One request as the length models read it, its text features computed once (`prompt_view`).

    Why: the route stage asks several predictors about one request (the shipped one and each backend's
    own); the text features cost more than a predictor's dot product, so they are computed once.
    """

    embedding: Vectors | None
    prompt_tokens: int
    text: str | None
    features: Floats
    asked: float | None  # an explicit length request, in tokens (`requested_tokens`)


def prompt_view(embedding: Vectors | None, prompt_tokens: int, text: str | None) -> PromptView:
    values, asked = _features(prompt_tokens, text)
    return PromptView(embedding, prompt_tokens, text, values, asked)


def estimate_for(model: LengthModel, seen: PromptView) -> LengthEstimate:
    """`model`'s estimate for a viewed request: a learned predictor reuses the view's features."""
    if isinstance(model, LengthPredictor):
        return model.predict_view(seen)
    return model.predict(seen.embedding, seen.prompt_tokens, seen.text)


class ConstantLength:
    """Every request the same size: the `lengths.predictor: constant` baseline, against which a benchmark
    measures what the learned predictor is worth to admission."""

    def __init__(self, p50: int, p90: int) -> None:
        self.estimate = _estimate(p50, p90)

    def predict(
        self,
        embedding: Vectors | None,  # noqa: ARG002 - the LengthModel interface; nothing is read
        prompt_tokens: int,  # noqa: ARG002
        text: str | None,  # noqa: ARG002
    ) -> LengthEstimate:
        return self.estimate


def _estimate(p50: float, p90: float) -> LengthEstimate:
    lo = max(1, round(p50))
    return LengthEstimate(p50=lo, p90=max(lo, round(p90)))


def _window(text: str) -> str:
    if len(text) <= _HEAD_CHARS + _TAIL_CHARS:
        return text
    return text[:_HEAD_CHARS] + "\n" + text[-_TAIL_CHARS:]


def feature_window(text: str) -> str:
    """The part of a prompt the text features read (its head and tail): what a logged answer needs to keep
    for a later refit to compute the features it was served with (windowing it again changes nothing)."""
    return _window(text)


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


def prompt_features(prompt_tokens: int, text: str | None) -> Floats:
    """The hand-made features, in `FEATURE_NAMES` order (float64). Text None = only the prompt length."""
    return _features(prompt_tokens, text)[0]


def _features(prompt_tokens: int, text: str | None) -> tuple[Floats, float | None]:
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


class OutputLengthHeuristic:
    """The fallback when no predictor is trained: a typical chat answer length scaled by prompt cues.

    The base and the factors are round numbers, chosen to rank obvious cases (a quick calculation or a
    rewrite is short; "write an app" or "explain in detail" is long), not fitted to any data set.
    """

    def __init__(self, base_tokens: float = 300.0, p90_factor: float = 2.0) -> None:
        self.base_tokens = base_tokens
        self.p90_factor = p90_factor

    def predict(
        self,
        embedding: Vectors | None,  # noqa: ARG002 - the LengthModel interface; no embedding is read here
        prompt_tokens: int,
        text: str | None,
    ) -> LengthEstimate:
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
        self,
        embeddings: Vectors | None,  # noqa: ARG002 - as LengthPredictor.predict_batch; not read here
        prompt_tokens: Sequence[int],
        texts: Sequence[str | None],
    ) -> list[LengthEstimate]:
        return [self.predict(None, n, t) for n, t in zip(prompt_tokens, texts, strict=True)]


# --------------------------------------------------------------------------------------------------------
# The learned predictor
# --------------------------------------------------------------------------------------------------------


@dataclass
class LengthPredictor:
    """Ridge score on [embedding, scaled prompt features] -> log tokens (linear) -> p50/p90 offsets.

    Artifacts are joblib (pickle) files of plain arrays and numbers: load only artifacts you made or trust.
    """

    coef: Floats  # (EMBEDDING_DIM + len(FEATURE_NAMES),) on [embedding, standardised features * weight]
    intercept: float
    embedding_mean: Floats  # used when a request has no embedding: the embedding then adds nothing
    feature_mean: Floats
    feature_scale: Floats  # standard deviation / feature_weight, so scaling is one division
    calib_a: float  # log tokens ~ calib_a + calib_b * score
    calib_b: float
    q50: float  # quantiles of out-of-fold log residuals
    q90: float
    version: str
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # -- prediction --------------------------------------------------------------------------------------

    def _score(
        self, embedding: Vectors | None, prompt_tokens: int, text: str | None
    ) -> tuple[float, float | None]:
        values, asked = _features(prompt_tokens, text)
        return self._score_features(embedding, values), asked

    def _score_features(self, embedding: Vectors | None, values: Floats) -> float:
        emb = self.embedding_mean if embedding is None else np.asarray(embedding, dtype=np.float64).ravel()
        if emb.shape[0] != EMBEDDING_DIM:
            raise ValueError(f"expected an embedding of dimension {EMBEDDING_DIM}, got shape {emb.shape}")
        feats = (values - self.feature_mean) / self.feature_scale
        return float(emb @ self.coef[:EMBEDDING_DIM] + feats @ self.coef[EMBEDDING_DIM:] + self.intercept)

    def score(self, embedding: Vectors | None, prompt_tokens: int, text: str | None) -> float:
        """The raw ranking score (higher = longer answer)."""
        return self._score(embedding, prompt_tokens, text)[0]

    def predict(self, embedding: Vectors | None, prompt_tokens: int, text: str | None) -> LengthEstimate:
        """p50/p90 of the answer's tokens. No embedding: the prompt features alone decide.

        `prompt_tokens` is on the gateway's scale (`icgate.text.estimate_prompt_tokens`), the scale the
        training rows used (`lengths.training.LengthRow.estimated_prompt_tokens`).
        """
        score, asked = self._score(embedding, prompt_tokens, text)
        return self.from_score(score, asked)

    def predict_view(self, seen: PromptView) -> LengthEstimate:
        """`predict` for a request whose features are computed already (`prompt_view`)."""
        return self.from_score(self._score_features(seen.embedding, seen.features), seen.asked)

    def from_score(self, score: float, asked: float | None = None) -> LengthEstimate:
        """p50/p90 for a raw score, such as an out-of-fold one at training time (`asked`: a length the
        prompt itself asks for, `requested_tokens`)."""
        log_mid = self.calib_a + self.calib_b * score
        return _apply_request(_estimate(math.exp(log_mid + self.q50), math.exp(log_mid + self.q90)), asked)

    def predict_batch(
        self, embeddings: Vectors | None, prompt_tokens: Sequence[int], texts: Sequence[str | None]
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

    def save(self, path: str | Path) -> Path:
        return write_atomically(path, self.to_bytes())

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
        return OutputLengthHeuristic()
    return LengthPredictor.load(target)
