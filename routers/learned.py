"""Learned cost/quality routers: send a request to the small tier when its answer is likely good enough.

`ClassifierRouter` (the one icgate ships) reads the request's MiniLM embedding, a few surface features of
its text (length, numbers, fractions, answer choices) and scalar signals (prompt tokens, conversation
depth, the retrieved examples' best similarity and utility, zero when absent). What it learns is chosen for
the routing metric, not for accuracy: each training prompt is labelled "only the large model was right"
(+1, routing it large gains quality), "only the small model was right" (-1, routing it large loses) or
"both/neither" (0, the tier makes no difference). A multinomial logistic regression estimates the three
probabilities and the score is the small tier's win rate against the large one, ties counted half:

    score = P(small right, large wrong) + P(tie) / 2 = (1 + P(-1) - P(+1)) / 2

It orders requests exactly by the expected quality gained by calling the large model, which is what APGR
rewards; plain P(small right) also ranks up prompts that both models fail (no gain from the large tier).
Prompts of different kinds (grade-school maths vs multiple-choice exams) get separate experts, chosen by a
gate that recognises the kind from the same inputs; one model over everything let the larger source's
feature weights swamp the smaller one's (see bench/results/router.md).

`NearestNeighbourRouter` (the kNN baseline) and `RandomRouter` (evaluation only) share the interface.
A router decides the small tier when `score >= threshold`. Artifacts are versioned joblib payloads of plain
arrays (no scikit-learn objects), so `to_bytes()` can live in a database row and scoring is a few numpy
operations (~0.1 ms a decision given the embedding). Artifacts are pickles: load only ones you made or trust.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from routers.base import RouteDecision, RouteFeatures, write_artifact
from routers.data import LabelledPrompt, label_summary, split_rows
from routers.evaluation import RouterMetrics, calibrate_threshold, evaluate_scores

Encode = Callable[[list[str]], np.ndarray]

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
GATE_C = 10.0  # the kinds of prompt are far apart in embedding space: a sharp gate
GATE_FLOOR = 0.1  # experts with less gate weight than this sit out (see `_sharpen`)

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


def estimate_prompt_tokens(text: str) -> int:
    """As the gateway estimates it (`gateway.pipeline.estimate_prompt_tokens`): four characters a token."""
    return max(1, len(text) // 4)


def features_for_prompt(prompt: str, embedding: np.ndarray | None) -> RouteFeatures:
    """The features the gateway would pass for a single-turn request with this prompt (offline rows)."""
    return RouteFeatures(
        prompt_tokens=estimate_prompt_tokens(prompt), conversation_depth=1, embedding=embedding, text=prompt
    )


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
) -> np.ndarray:
    """The non-embedding inputs, one row per request: `TEXT_FEATURES` (if `use_text`; NaN for a request
    without text, which the model fills with its training mean) then `SCALAR_FEATURES`."""
    rows = []
    for i in range(n):
        text = texts[i] if texts is not None else None
        tokens = prompt_tokens[i] if prompt_tokens is not None else estimate_prompt_tokens(text or "")
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


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"expected {EMBEDDING_DIM}-d embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


# --------------------------------------------------------------------------------------------------------
# Linear softmax models stored as arrays
# --------------------------------------------------------------------------------------------------------


class _Softmax:
    """A fitted multinomial/binary logistic model as plain arrays: P(class | z) = softmax(W z + b)."""

    def __init__(self, classes: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> None:
        self.classes = np.asarray(classes)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)

    @classmethod
    def fit(cls, z: np.ndarray, y: np.ndarray, c: float, weights: np.ndarray | None = None) -> _Softmax:
        from sklearn.linear_model import LogisticRegression

        classes = np.unique(y)
        if classes.size < 2:  # nothing to learn: the one class seen, always
            return cls(classes, np.zeros((1, z.shape[1])), np.zeros(1))
        model = LogisticRegression(C=c, max_iter=3000).fit(z, y, sample_weight=weights)
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps only the logit of classes_[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        return cls(model.classes_, coef, intercept)

    def proba(self, z: np.ndarray) -> np.ndarray:
        logits = z @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def column(self, p: np.ndarray, label: object) -> np.ndarray:
        hit = np.flatnonzero(self.classes == label)
        return p[:, hit[0]] if hit.size else np.zeros(p.shape[0])

    def state(self) -> dict[str, Any]:
        return {"classes": self.classes, "weights": self.weights, "bias": self.bias}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Softmax:
        return cls(state["classes"], state["weights"], state["bias"])


def _sharpen(p: np.ndarray) -> np.ndarray:
    """Gate weights below `GATE_FLOOR` dropped (the best one kept), the rest renormalised: an expert scores
    far outside its training kind erratically, and even a 1% share of that noise costs APGR."""
    keep = (p >= GATE_FLOOR) | (p == p.max(axis=1, keepdims=True))
    w = np.where(keep, p, 0.0)
    return w / w.sum(axis=1, keepdims=True)


class _Linear:
    """A `_Softmax` over [embedding, standardised side features]; NaN side values take the training mean."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, model: _Softmax) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.model = model

    @classmethod
    def fit(
        cls, emb: np.ndarray, side: np.ndarray, y: np.ndarray, c: float, weights: np.ndarray | None = None
    ) -> _Linear:
        mean = side.mean(axis=0)
        std = side.std(axis=0)
        scale = np.where(std > 1e-12, std, 1.0)
        return cls(mean, scale, _Softmax.fit(np.hstack([emb, (side - mean) / scale]), y, c, weights))

    def proba(self, emb: np.ndarray, side: np.ndarray) -> np.ndarray:
        z = (np.where(np.isnan(side), self.mean, side) - self.mean) / self.scale
        return self.model.proba(np.hstack([emb, z]))

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "scale": self.scale, "model": self.model.state()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Linear:
        return cls(state["mean"], state["scale"], _Softmax.from_state(state["model"]))


def _score_from(model: _Linear, p: np.ndarray, target: Target) -> tuple[np.ndarray, np.ndarray]:
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
        embeddings: np.ndarray,
        texts: Sequence[str | None] | None = None,
        prompt_tokens: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        extras: Sequence[Mapping[str, float]] | None = None,
    ) -> np.ndarray:
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

    def score_rows(self, rows: Sequence[LabelledPrompt], encode: Encode) -> np.ndarray:
        """Scores of offline rows, with the features the gateway would pass for each prompt."""
        prompts = [r.prompt for r in rows]
        return self.score_batch(
            encode(prompts), prompts, [estimate_prompt_tokens(p) for p in prompts], [1] * len(prompts)
        )

    # -- artifact ---------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], threshold: float, metadata: dict[str, Any]) -> Any:
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
        router: LearnedRouter = router_cls._from_state(
            payload["state"], float(payload["threshold"]), dict(payload.get("metadata") or {})
        )
        router.small_tier, router.large_tier = small_tier, large_tier
        return router

    def save(self, path: str | Path) -> Path:
        return write_artifact(path, self.to_bytes())

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
) -> tuple[np.ndarray, list[str | None], list[int], list[int], list[Mapping[str, float]]]:
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
        experts: Mapping[str, _Linear],
        gate: _Linear | None,
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
        embeddings: np.ndarray,
        texts: Sequence[str | None] | None,
        prompt_tokens: Sequence[int] | None,
        depths: Sequence[int] | None,
        extras: Sequence[Mapping[str, float]] | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
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
        embeddings: np.ndarray,
        texts: Sequence[str | None] | None = None,
        prompt_tokens: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        extras: Sequence[Mapping[str, float]] | None = None,
    ) -> np.ndarray:
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
            {name: _Linear.from_state(s) for name, s in state["experts"].items()},
            None if gate is None else _Linear.from_state(gate),
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
        embeddings: np.ndarray,
        weak_ok: np.ndarray,
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
        self.weak_ok = np.asarray(weak_ok, dtype=np.float64)
        if self.weak_ok.shape != (self._matrix.shape[0],) or self.weak_ok.size == 0:
            raise ValueError("need one weak_ok label per training embedding (and at least one)")
        self.k = max(1, min(int(k), self.weak_ok.size))
        self.temperature = float(temperature)

    def score_batch(
        self,
        embeddings: np.ndarray,
        texts: Sequence[str | None] | None = None,
        prompt_tokens: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        extras: Sequence[Mapping[str, float]] | None = None,
    ) -> np.ndarray:
        sims = unit_rows(embeddings).astype(np.float32) @ self._matrix.T
        k = self.k
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims)
        near = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        weights = np.exp((near - near.max(axis=1, keepdims=True)) / self.temperature)
        return (weights * self.weak_ok[top]).sum(axis=1) / weights.sum(axis=1)

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

    def score_batch(self, embeddings: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """Scores for a batch: the same batch size and seed give the same scores."""
        return np.asarray(np.random.default_rng(self.seed).random(int(np.asarray(embeddings).shape[0])))

    def score_rows(self, rows: Sequence[LabelledPrompt], encode: Encode | None = None) -> np.ndarray:
        return np.asarray(np.random.default_rng(self.seed).random(len(rows)))

    def route(self, features: RouteFeatures) -> RouteDecision:
        score = float(self._rng.random())
        small = score >= self.threshold
        return RouteDecision(
            tier=self.small_tier if small else self.large_tier,
            score=score,
            reasons=(f"random score {score:.3f} {'>=' if small else '<'} threshold {self.threshold:.3f}",),
        )


# --------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------

Kind = Literal["classifier", "knn"]


def _labels(rows: Sequence[LabelledPrompt], target: Target) -> np.ndarray:
    if target == "win":
        return np.array([int(bool(r.strong_ok)) - int(r.weak_ok) for r in rows])
    return np.array([int(r.weak_ok) for r in rows])


def _fit(
    rows: Sequence[LabelledPrompt],
    emb: np.ndarray,
    kind: Kind,
    *,
    target: Target,
    use_text: bool,
    per_group: bool,
    min_group_rows: int,
    c: float,
    k: int,
) -> LearnedRouter:
    if kind == "knn":
        return NearestNeighbourRouter(emb, np.array([r.weak_ok for r in rows]), k=k)
    if kind != "classifier":
        raise ValueError(f"unknown router kind {kind!r} (classifier or knn)")
    emb = unit_rows(emb)
    groups = np.array([r.group or "default" for r in rows], dtype=object)
    if per_group:
        names, counts = np.unique(groups, return_counts=True)
        small = set(names[counts < min_group_rows].tolist())
        if small:  # too few rows for their own expert: pool them
            groups = np.array(["pooled" if g in small else g for g in groups], dtype=object)
    else:
        groups[:] = "all"
    y = _labels(rows, target)
    side = side_features(
        len(rows),
        [r.prompt for r in rows],
        [estimate_prompt_tokens(r.prompt) for r in rows],
        [1] * len(rows),
        None,
        use_text=use_text,
    )
    experts = {}
    for name in sorted(set(groups.tolist())):
        mask = groups == name
        experts[str(name)] = _Linear.fit(emb[mask], side[mask], y[mask], c)
    gate = None
    if len(experts) > 1:  # balanced: a small group must not be drowned by a large one's prior
        labels = groups.astype(str)
        names, counts = np.unique(labels, return_counts=True)
        weight = {n: len(labels) / (len(names) * c) for n, c in zip(names, counts, strict=True)}
        gate = _Linear.fit(emb, side, labels, GATE_C, np.array([weight[g] for g in labels]))
    return ClassifierRouter(experts, gate, target=target, use_text=use_text)


def _fold_of(rows: Sequence[LabelledPrompt], folds: int) -> np.ndarray:
    """A deterministic fold per prompt (sha1 with a salt, independent of the held-out buckets)."""
    return np.array(
        [
            int.from_bytes(hashlib.sha1(b"fold\x1f" + r.prompt.encode()).digest()[:8], "big") % folds
            for r in rows
        ]
    )


def out_of_fold_scores(
    rows: Sequence[LabelledPrompt], emb: np.ndarray, kind: Kind = "classifier", folds: int = 5, **options: Any
) -> np.ndarray:
    """Each row scored by a router trained on the other folds: honest scores for calibration and CV."""
    fold = _fold_of(rows, folds)
    scores = np.zeros(len(rows))
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        train = np.flatnonzero(fold != f)
        if test.size == 0 or train.size == 0:
            continue
        router = _fit([rows[i] for i in train.tolist()], emb[train], kind, **options)
        test_rows = [rows[i] for i in test.tolist()]
        scores[test] = router.score_batch(
            emb[test],
            [r.prompt for r in test_rows],
            [estimate_prompt_tokens(r.prompt) for r in test_rows],
            [1] * len(test_rows),
        )
    return scores


def train_router(
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
    options: dict[str, Any] = {
        "target": chosen,
        "use_text": use_text,
        "per_group": per_group,
        "min_group_rows": min_group_rows,
        "c": c,
        "k": k,
    }
    emb = unit_rows(encode([r.prompt for r in train]))
    router = _fit(train, emb, kind, **options)

    threshold, calibration = 0.5, "none (0.5)"
    if min_quality is not None and strong_share is not None:
        raise ValueError("give min_quality or strong_share, not both")
    if min_quality is not None or strong_share is not None:
        known = [i for i, r in enumerate(train) if r.strong_ok is not None]
        oof = out_of_fold_scores(train, emb, kind, calibration_folds, **options)
        if strong_share is not None:
            threshold = calibrate_threshold(oof, strong_share=strong_share)
            calibration = f"strong_share {strong_share} on out-of-fold training scores"
        elif len(known) >= 2:
            threshold = calibrate_threshold(oof[known], [train[i] for i in known], min_quality=min_quality)
            calibration = f"min_quality {min_quality} x strong on out-of-fold training scores"
    router.threshold = threshold

    stamp = dt.datetime.now(dt.UTC)
    digest = hashlib.sha1("\x1e".join(f"{r.group}\x1f{r.prompt}" for r in train).encode()).hexdigest()[:8]
    router.metadata = {
        "version": f"{kind}-{stamp:%Y%m%dT%H%M%S}-{digest}",
        "created_at": stamp.isoformat(),
        "options": options,
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
        router.threshold = calibrate_threshold(router.score_rows(rows, encode), strong_share=strong_share)
        how = f"strong_share {strong_share}"
    else:
        known = [r for r in rows if r.strong_ok is not None]
        router.threshold = calibrate_threshold(
            router.score_rows(known, encode), known, min_quality=min_quality
        )
        how = f"min_quality {min_quality} x strong"
    router.metadata["calibration"] = f"{how} on {len(rows)} calibration rows"
    return router.threshold


def evaluate_router(router: Any, rows: Sequence[LabelledPrompt], encode: Encode) -> RouterMetrics:
    """APGR, CPT(50%), CPT(80%) and the curve of `router` on the rows with both labels."""
    known = [r for r in rows if r.strong_ok is not None]
    if not known:
        raise ValueError("no rows with a strong-model label to evaluate on")
    return evaluate_scores(router.score_rows(known, encode), known)


def evaluate_by_group(router: Any, rows: Sequence[LabelledPrompt], encode: Encode) -> dict[str, Any]:
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
    """64 bits of sha1 of the case- and whitespace-normalised prompt (as `routers.data.prompt_bucket`)."""
    return int.from_bytes(hashlib.sha1(" ".join(prompt.lower().split()).encode()).digest()[:8], "big")


def remember_training(router: LearnedRouter, train_rows: Sequence[LabelledPrompt], encode: Encode) -> None:
    """Keep in the artifact what an evaluation must leave out (hashes of the training prompts) and the
    training scores' quantiles (the gateway maps a policy's `strong_share` to a threshold with them)."""
    router.metadata["trained_prompt_hashes"] = np.unique(
        np.array([prompt_hash(r.prompt) for r in train_rows], dtype=np.uint64)
    )
    scores = router.score_rows(train_rows, encode)
    router.metadata["score_quantiles"] = np.quantile(scores, np.linspace(0, 1, 201)).tolist()


def unseen_rows(router: LearnedRouter, rows: Sequence[LabelledPrompt]) -> list[LabelledPrompt]:
    """The rows whose prompt the router was not trained on (all of them if it kept no record)."""
    seen = router.metadata.get("trained_prompt_hashes")
    if seen is None or not len(seen):
        return list(rows)
    hashes = np.array([prompt_hash(r.prompt) for r in rows], dtype=np.uint64)
    keep = ~np.isin(hashes, np.asarray(seen, dtype=np.uint64))
    return [r for r, k in zip(rows, keep, strict=True) if k]
