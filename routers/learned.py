"""Learned cost/quality routers at request time: load an artifact, score a request, decide its tier.

`ClassifierRouter` (the one icgate ships) reads the request's MiniLM embedding, a few surface features of
its text (length, numbers, fractions, answer choices) and scalar signals (prompt tokens, conversation
depth, the retrieved examples' best similarity and utility, zero when absent). Its score is the small
tier's win rate against the large one, ties counted half:

    score = P(small right, large wrong) + P(tie) / 2 = (1 + P(-1) - P(+1)) / 2

from per-kind linear experts chosen by a gate (how they are fitted, and why: `routers.training`).
`NearestNeighbourRouter` (the kNN baseline) shares the interface. A router decides the small tier when
`score >= threshold`. Artifacts are versioned joblib payloads of plain arrays (no scikit-learn objects), so
`to_bytes()` can live in a database row and scoring is a few numpy operations (~0.1 ms a decision given
the embedding). Artifacts are pickles: load only ones you made or trust.

Nothing here trains: this module imports no scikit-learn and nothing of `routers.training`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from icgate.files import write_atomically
from icgate.routers.base import RouteDecision, RouteFeatures, Vectors
from icgate.text import estimate_tokens

Floats = npt.NDArray[np.float64]

ARTIFACT_KIND = "icgate.router"
FORMAT_VERSION = 1
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "router.joblib"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384

# Surface features of the prompt text (see `text_features`), then request-level scalars.
TEXT_FEATURES = (
    "log_chars",
    "log_numbers",
    "log_periods",
    "has_percent",
    "has_fraction",
    "has_decimal",
    "log_max_number",
    "has_choices",
    "newlines_per_10",
)
EXTRA_FEATURES = ("example_similarity", "example_utility")  # from `RouteFeatures.extra`; 0 when absent
SCALAR_FEATURES = ("log_prompt_tokens", "conversation_depth", *EXTRA_FEATURES)
TEXT_SCAN_CHARS = 8000  # surface features read at most this much text: bounded cost per decision
GATE_FLOOR = 0.1  # experts with less gate weight than this sit out (see `_sharpen`)

# What a classifier's experts learnt to predict: "win" = the small tier's win rate against the large one,
# "weak_ok" = P(the small tier is right) (for rows without the large tier's verdict).
Target = Literal["win", "weak_ok"]

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_PERCENT = re.compile(r"%|percent")
_FRACTION = re.compile(r"\d+/\d+|half|third|quarter")
_CHOICES = re.compile(r"\n[A-D]\. ")


def text_features(text: str) -> list[float]:
    """The `TEXT_FEATURES` of one prompt. Longer prompts with more quantities and fractions are the
    grade-school problems the small model fails; answer-choice layout tells exam questions apart."""
    scan = text[:TEXT_SCAN_CHARS]
    numbers = _NUMBER.findall(scan)
    largest = 0.0
    for number in numbers:
        try:
            largest = max(largest, float(number.replace(",", "")))
        except ValueError:  # "1.2.3"
            continue
    return [
        math.log1p(len(text)),
        math.log1p(len(numbers)),
        math.log1p(scan.count(".") + 1),
        float(_PERCENT.search(scan) is not None),
        float(_FRACTION.search(scan) is not None),
        float(any("." in n for n in numbers)),
        math.log1p(min(largest, 1e300)),
        float(_CHOICES.search(scan) is not None),
        scan.count("\n") / 10,
    ]


def _scalar_row(prompt_tokens: int, depth: int, extra: Mapping[str, float]) -> list[float]:
    return [
        math.log1p(max(prompt_tokens, 0)),
        float(depth),
        *(float(extra.get(name, 0.0) or 0.0) for name in EXTRA_FEATURES),
    ]


def side_features(
    n: int,
    texts: Sequence[str | None] | None,
    prompt_tokens: Sequence[int] | None,
    depths: Sequence[int] | None,
    extras: Sequence[Mapping[str, float]] | None,
    *,
    use_text: bool = True,
) -> Floats:
    """The non-embedding inputs, one row per request: `TEXT_FEATURES` (if `use_text`; NaN for a request
    without text, which the model fills with its training mean) then `SCALAR_FEATURES`."""
    rows = []
    for i in range(n):
        text = texts[i] if texts is not None else None
        tokens = prompt_tokens[i] if prompt_tokens is not None else estimate_tokens(text or "")
        scalars = _scalar_row(
            tokens, depths[i] if depths is not None else 1, extras[i] if extras is not None else {}
        )
        if not use_text:
            rows.append(scalars)
        elif text is None:
            rows.append([math.nan] * len(TEXT_FEATURES) + scalars)
        else:
            rows.append(text_features(text) + scalars)
    return np.asarray(rows, dtype=np.float64).reshape(n, -1)


def unit_rows(embeddings: npt.ArrayLike) -> Floats:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"expected {EMBEDDING_DIM}-d embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit: Floats = x / np.where(norms > 0, norms, 1.0)
    return unit


# --------------------------------------------------------------------------------------------------------
# Linear softmax models stored as arrays (fitted by `routers.training.fit_linear`)
# --------------------------------------------------------------------------------------------------------


class Softmax:
    """A fitted multinomial/binary logistic model as plain arrays: P(class | z) = softmax(W z + b)."""

    def __init__(self, classes: npt.ArrayLike, weights: npt.ArrayLike, bias: npt.ArrayLike) -> None:
        self.classes: npt.NDArray[Any] = np.asarray(classes)  # labels: ints for experts, names for the gate
        self.weights: Floats = np.asarray(weights, dtype=np.float64)
        self.bias: Floats = np.asarray(bias, dtype=np.float64)

    def proba(self, z: Floats) -> Floats:
        logits = z @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        p: Floats = e / e.sum(axis=1, keepdims=True)
        return p

    def column(self, p: Floats, label: object) -> Floats:
        hit = np.flatnonzero(self.classes == label)
        return p[:, hit[0]] if hit.size else np.zeros(p.shape[0])

    def state(self) -> dict[str, Any]:
        return {"classes": self.classes, "weights": self.weights, "bias": self.bias}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Softmax:
        return cls(state["classes"], state["weights"], state["bias"])


def _sharpen(p: Floats) -> Floats:
    """Gate weights below `GATE_FLOOR` dropped (the best one kept), the rest renormalised: an expert scores
    far outside its training kind erratically, and even a 1% share of that noise costs APGR."""
    keep = (p >= GATE_FLOOR) | (p == p.max(axis=1, keepdims=True))
    w = np.where(keep, p, 0.0)
    sharp: Floats = w / w.sum(axis=1, keepdims=True)
    return sharp


class Linear:
    """A `Softmax` over [embedding, standardised side features]; NaN side values take the training mean."""

    def __init__(self, mean: npt.ArrayLike, scale: npt.ArrayLike, model: Softmax) -> None:
        self.mean: Floats = np.asarray(mean, dtype=np.float64)
        self.scale: Floats = np.asarray(scale, dtype=np.float64)
        self.model = model

    def proba(self, emb: Floats, side: Floats) -> Floats:
        z = (np.where(np.isnan(side), self.mean, side) - self.mean) / self.scale
        return self.model.proba(np.hstack([emb, z]))

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "scale": self.scale, "model": self.model.state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Linear:
        return cls(state["mean"], state["scale"], Softmax.from_state(state["model"]))


def _score_from(model: Linear, p: Floats, target: Target) -> tuple[Floats, Floats]:
    """(score = P(small good enough), P(large needed) = P(only the large model is right))."""
    if target == "win":
        gain, loss = model.model.column(p, 1), model.model.column(p, -1)
        return (1.0 + loss - gain) / 2.0, gain
    weak = model.model.column(p, 1)
    return weak, 1.0 - weak


# --------------------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------------------


class LearnedRouter:
    """What the learned routers share: thresholding, tiers, metadata and the versioned artifact."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        small_tier: str = "small",
        large_tier: str = "large",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.threshold = float(threshold)
        self.small_tier = small_tier
        self.large_tier = large_tier
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))

    # -- scoring ----------------------------------------------------------------------------------------

    def score_batch(
        self,
        embeddings: Vectors,
        texts: Sequence[str | None] | None = None,
        prompt_tokens: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        extras: Sequence[Mapping[str, float]] | None = None,
    ) -> Floats:
        """P(the small tier's answer is good enough) for each row; higher = small more likely fine."""
        raise NotImplementedError

    def route(self, features: RouteFeatures) -> RouteDecision:
        if features.embedding is None:
            return RouteDecision(
                tier=self.large_tier, score=None, reasons=(f"no embedding: {self.kind} router cannot score",)
            )
        score = float(self.score_batch(*one_row(features))[0])
        small = score >= self.threshold
        head = (
            f"P(small good enough) {score:.3f} {'>=' if small else '<'} threshold {self.threshold:.3f}"
            f" (router {self.version})"
        )
        return RouteDecision(tier=self.small_tier if small else self.large_tier, score=score, reasons=(head,))

    # -- artifact ---------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_state(
        cls, state: Mapping[str, Any], threshold: float, metadata: dict[str, Any]
    ) -> LearnedRouter:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The versioned artifact (joblib, compressed): model arrays, threshold, feature spec, metadata."""
        import joblib

        payload = {
            "kind": ARTIFACT_KIND,
            "format": FORMAT_VERSION,
            "router": self.kind,
            "version": self.version,
            "threshold": self.threshold,
            "features": feature_spec(),
            "metadata": self.metadata,
            "state": self._state(),
        }
        buffer = io.BytesIO()
        joblib.dump(payload, buffer, compress=3)
        return buffer.getvalue()

    @staticmethod
    def from_bytes(data: bytes, *, small_tier: str = "small", large_tier: str = "large") -> LearnedRouter:
        import joblib

        try:
            payload = joblib.load(io.BytesIO(data))
        except Exception as exc:
            raise ValueError(f"not a router artifact ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict) or payload.get("kind") != ARTIFACT_KIND:
            raise ValueError("not an icgate router artifact")
        fmt = payload.get("format")
        if not isinstance(fmt, int) or not 1 <= fmt <= FORMAT_VERSION:
            raise ValueError(
                f"router artifact format {fmt!r} is not supported (supports 1..{FORMAT_VERSION}); "
                "retrain with `icgate router train`"
            )
        if payload.get("features") != feature_spec():
            raise ValueError("router artifact was built with other features; retrain")
        kinds: dict[str, type[LearnedRouter]] = {
            ClassifierRouter.kind: ClassifierRouter,
            NearestNeighbourRouter.kind: NearestNeighbourRouter,
        }
        router_cls = kinds.get(str(payload.get("router")))
        if router_cls is None:
            raise ValueError(f"unknown router kind {payload.get('router')!r}")
        router = router_cls._from_state(
            payload["state"], float(payload["threshold"]), dict(payload.get("metadata") or {})
        )
        router.small_tier, router.large_tier = small_tier, large_tier
        return router

    def save(self, path: str | Path) -> Path:
        return write_atomically(path, self.to_bytes())

    @staticmethod
    def load(
        path: str | Path = DEFAULT_ARTIFACT, *, small_tier: str = "small", large_tier: str = "large"
    ) -> LearnedRouter:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"router artifact not found: {path}")
        try:
            return LearnedRouter.from_bytes(path.read_bytes(), small_tier=small_tier, large_tier=large_tier)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def one_row(
    features: RouteFeatures,
) -> tuple[Vectors, list[str | None], list[int], list[int], list[Mapping[str, float]]]:
    """One request's features as the batch arguments of `score_batch`."""
    assert features.embedding is not None
    return (
        np.asarray(features.embedding)[None],
        [features.text],
        [features.prompt_tokens],
        [features.conversation_depth],
        [features.extra],
    )


def feature_spec() -> dict[str, Any]:
    """What a router artifact expects as input; loading refuses an artifact built for other features."""
    return {
        "embedding": {"model": EMBEDDING_MODEL, "dim": EMBEDDING_DIM, "normalised": True},
        "text": list(TEXT_FEATURES),
        "scalars": list(SCALAR_FEATURES),
        "text_scan_chars": TEXT_SCAN_CHARS,
    }


class ClassifierRouter(LearnedRouter):
    """Per-kind linear experts on [embedding, text features, scalars], chosen by a gate on the same inputs."""

    kind = "classifier"

    def __init__(
        self,
        experts: Mapping[str, Linear],
        gate: Linear | None,
        *,
        target: Target = "win",
        use_text: bool = True,
        threshold: float = 0.5,
        small_tier: str = "small",
        large_tier: str = "large",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threshold, small_tier=small_tier, large_tier=large_tier, metadata=metadata)
        if not experts:
            raise ValueError("a classifier router needs at least one expert")
        if gate is None and len(experts) != 1:
            raise ValueError("several experts need a gate")
        self.experts = dict(experts)
        self.gate = gate
        self.target: Target = target
        self.use_text = use_text

    def _parts(
        self,
        embeddings: Vectors,
        texts: Sequence[str | None] | None,
        prompt_tokens: Sequence[int] | None,
        depths: Sequence[int] | None,
        extras: Sequence[Mapping[str, float]] | None,
    ) -> tuple[Floats, Floats, Floats, list[str]]:
        """(score, P(large needed), gate probabilities (n, groups), group names)."""
        emb = unit_rows(embeddings)
        names = list(self.experts)
        side = side_features(emb.shape[0], texts, prompt_tokens, depths, extras, use_text=self.use_text)
        gate = np.ones((emb.shape[0], 1))
        if self.gate is not None:
            names = [str(c) for c in self.gate.model.classes]
            gate = _sharpen(self.gate.proba(emb, side))
        score = np.zeros(emb.shape[0])
        need = np.zeros(emb.shape[0])
        for j, name in enumerate(names):
            if not gate[:, j].any():
                continue
            expert = self.experts[name]
            s, g = _score_from(expert, expert.proba(emb, side), self.target)
            score += gate[:, j] * s
            need += gate[:, j] * g
        return score, need, gate, names

    def score_batch(
        self,
        embeddings: Vectors,
        texts: Sequence[str | None] | None = None,
        prompt_tokens: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        extras: Sequence[Mapping[str, float]] | None = None,
    ) -> Floats:
        return self._parts(embeddings, texts, prompt_tokens, depths, extras)[0]

    def route(self, features: RouteFeatures) -> RouteDecision:
        if features.embedding is None:
            return super().route(features)
        score_a, need_a, gate, names = self._parts(*one_row(features))
        score, need = float(score_a[0]), float(need_a[0])
        small = score >= self.threshold
        reasons = [
            f"P(small good enough) {score:.3f} {'>=' if small else '<'} threshold {self.threshold:.3f}"
            f" (router {self.version})",
            f"P(only the large tier gets it right) {need:.3f}",
        ]
        if len(names) > 1:
            j = int(np.argmax(gate[0]))
            reasons.append(f"looks like {names[j]} (p={gate[0, j]:.2f})")
        if self.use_text and features.text is None:
            reasons.append("no prompt text: text features at their training means")
        return RouteDecision(
            tier=self.small_tier if small else self.large_tier, score=score, reasons=tuple(reasons)
        )

    def _state(self) -> dict[str, Any]:
        return {
            "experts": {name: e.state() for name, e in self.experts.items()},
            "gate": None if self.gate is None else self.gate.state(),
            "target": self.target,
            "use_text": self.use_text,
        }

    @classmethod
    def _from_state(
        cls, state: Mapping[str, Any], threshold: float, metadata: dict[str, Any]
    ) -> ClassifierRouter:
        gate = state.get("gate")
        return cls(
            {name: Linear.from_state(s) for name, s in state["experts"].items()},
            None if gate is None else Linear.from_state(gate),
            target=state["target"],
            use_text=bool(state["use_text"]),
            threshold=threshold,
            metadata=metadata,
        )


class NearestNeighbourRouter(LearnedRouter):
    """Baseline: the similarity-weighted share of the k nearest training prompts the small model got right."""

    kind = "knn"

    def __init__(
        self,
        embeddings: npt.ArrayLike,
        weak_ok: npt.ArrayLike,
        *,
        k: int = 50,
        temperature: float = 0.05,
        threshold: float = 0.5,
        small_tier: str = "small",
        large_tier: str = "large",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threshold, small_tier=small_tier, large_tier=large_tier, metadata=metadata)
        self.embeddings = np.asarray(embeddings, dtype=np.float16)  # half the memory; ranks barely move
        self._matrix = unit_rows(self.embeddings).astype(np.float32)
        self.weak_ok: Floats = np.asarray(weak_ok, dtype=np.float64)
        if self.weak_ok.shape != (self._matrix.shape[0],) or self.weak_ok.size == 0:
            raise ValueError("need one weak_ok label per training embedding (and at least one)")
        self.k = max(1, min(int(k), self.weak_ok.size))
        self.temperature = float(temperature)

    def score_batch(
        self,
        embeddings: Vectors,
        texts: Sequence[str | None] | None = None,  # noqa: ARG002 - the shared signature; kNN reads only the embedding
        prompt_tokens: Sequence[int] | None = None,  # noqa: ARG002
        depths: Sequence[int] | None = None,  # noqa: ARG002
        extras: Sequence[Mapping[str, float]] | None = None,  # noqa: ARG002
    ) -> Floats:
        sims = unit_rows(embeddings).astype(np.float32) @ self._matrix.T
        k = self.k
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims)
        near = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        weights = np.exp((near - near.max(axis=1, keepdims=True)) / self.temperature)
        scores: Floats = (weights * self.weak_ok[top]).sum(axis=1) / weights.sum(axis=1)
        return scores

    def _state(self) -> dict[str, Any]:
        return {
            "embeddings": self.embeddings,
            "weak_ok": self.weak_ok.astype(bool),
            "k": self.k,
            "temperature": self.temperature,
        }

    @classmethod
    def _from_state(
        cls, state: Mapping[str, Any], threshold: float, metadata: dict[str, Any]
    ) -> NearestNeighbourRouter:
        return cls(
            state["embeddings"],
            state["weak_ok"],
            k=int(state["k"]),
            temperature=float(state["temperature"]),
            threshold=threshold,
            metadata=metadata,
        )
