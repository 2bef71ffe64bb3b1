"""RouteLLM's router metrics: quality against the share of calls sent to the strong model.

Convention: a router's score is P(the small/weak model's answer is good enough), as in `RouteDecision`.
At strong-call share s the router sends the lowest-scoring s*n rows to the strong model and the rest to
the weak one; quality(s) = mean over rows of (strong_ok if routed strong else weak_ok).

PGR(s) = (quality(s) - quality(0)) / (quality(1) - quality(0)): the fraction of the weak-to-strong quality
gap recovered. APGR is the area under PGR over s in [0, 1]. RouteLLM evaluates ~10 thresholds and
integrates with the trapezoid rule; here the curve has a point at every cut between distinct scores (the
limit of their grid), and rows with tied scores are treated as routed in random order, whose expectation is
the straight segment across the tie. So a router that gives every row the same score (or a random router,
in expectation) has APGR exactly 0.5, and the oracle reaches the maximum the labels allow.

CPT(x) ("call-performance threshold") = the smallest share s with PGR(s) >= x on that piecewise-linear
curve (RouteLLM interpolates the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.typing import ArrayLike

from icgate.routers.data import LabelledPrompt

Labels = Sequence[LabelledPrompt] | tuple[ArrayLike, ArrayLike]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CurvePoint:
    strong_share: float
    quality: float
    pgr: float


@dataclass(frozen=True)
class RouterMetrics:
    """APGR, CPT(50%), CPT(80%) and the curve they come from; `n` rows with both labels known."""

    apgr: float
    cpt50: float
    cpt80: float
    n: int
    weak_quality: float
    strong_quality: float
    curve: tuple[CurvePoint, ...] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON/joblib friendly); the curve as [share, quality, pgr] triples."""
        return {
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "n": self.n,
            "weak_quality": self.weak_quality,
            "strong_quality": self.strong_quality,
            "curve": [[p.strong_share, p.quality, p.pgr] for p in self.curve],
        }


def label_arrays(labels: Labels) -> tuple[Floats, Floats]:
    """(weak_ok, strong_ok) as float arrays from rows or from a pair of arrays."""
    if isinstance(labels, tuple) and len(labels) == 2 and not isinstance(labels[0], LabelledPrompt):
        weak = np.asarray(labels[0], dtype=float)
        strong = np.asarray(labels[1], dtype=float)
    else:
        rows = list(labels)
        if any(r.strong_ok is None for r in rows):
            raise ValueError("rows without a strong-model label cannot be scored; filter them first")
        weak = np.array([r.weak_ok for r in rows], dtype=float)
        strong = np.array([bool(r.strong_ok) for r in rows], dtype=float)
    if weak.shape != strong.shape or weak.ndim != 1:
        raise ValueError(
            f"weak and strong labels must be 1-d and equal length, got {weak.shape}, {strong.shape}"
        )
    return weak, strong


def quality_curve(scores: ArrayLike, labels: Labels) -> tuple[Floats, Floats]:
    """(strong shares, qualities) at share 0, at every cut between distinct scores, and at share 1."""
    s = np.asarray(scores, dtype=float)
    weak, strong = label_arrays(labels)
    if s.shape != weak.shape:
        raise ValueError(f"{s.shape[0] if s.ndim else 0} scores for {weak.shape[0]} rows")
    n = s.shape[0]
    if n == 0:
        raise ValueError("no rows")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    order = np.argsort(s, kind="stable")  # lowest P(weak good enough) goes strong first
    gain = np.concatenate([[0.0], np.cumsum(strong[order] - weak[order])])
    sorted_s = s[order]
    # Only cut between distinct scores: inside a tie the routing order is arbitrary.
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_s)) + 1, [n]])
    return cuts / n, (weak.sum() + gain[cuts]) / n


def _first_crossing(shares: Floats, values: Floats, target: float) -> float:
    """Smallest share where the piecewise-linear curve reaches `target` (1.0 if it never does)."""
    if values[0] >= target:
        return float(shares[0])
    for i in range(1, len(values)):
        if values[i] >= target:
            v0, v1 = values[i - 1], values[i]
            return float(shares[i - 1] + (target - v0) / (v1 - v0) * (shares[i] - shares[i - 1]))
    return 1.0


def evaluate_scores(scores: ArrayLike, labels: Labels) -> RouterMetrics:
    """APGR, CPT(50%), CPT(80%) of `scores` (higher = weak model more likely good enough) on `labels`.

    Raises ValueError when the strong and weak models have the same quality on these rows (PGR undefined).
    """
    shares, quality = quality_curve(scores, labels)
    q_weak, q_strong = float(quality[0]), float(quality[-1])
    if np.isclose(q_strong, q_weak):
        raise ValueError(f"strong and weak quality are equal ({q_weak:.4f}) on these rows: PGR is undefined")
    pgr = (quality - q_weak) / (q_strong - q_weak)
    apgr = float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(shares)))
    return RouterMetrics(
        apgr=apgr,
        cpt50=_first_crossing(shares, pgr, 0.5),
        cpt80=_first_crossing(shares, pgr, 0.8),
        n=int(np.asarray(scores).shape[0]),
        weak_quality=q_weak,
        strong_quality=q_strong,
        curve=tuple(
            CurvePoint(float(a), float(b), float(c)) for a, b, c in zip(shares, quality, pgr, strict=True)
        ),
    )


def random_apgr(labels: Labels, seed: int = 0, repeats: int = 20) -> float:
    """Mean APGR of uniformly random scores: a check that the metric puts chance at ~0.5."""
    weak, _ = label_arrays(labels)
    rng = np.random.default_rng(seed)
    return float(np.mean([evaluate_scores(rng.random(weak.shape[0]), labels).apgr for _ in range(repeats)]))


def oracle_scores(labels: Labels) -> Floats:
    """The best possible scores: rows only the strong model gets right go strong first, then ties,
    then rows only the weak model gets right."""
    weak, strong = label_arrays(labels)
    return weak - strong


def calibrate_threshold(
    scores: ArrayLike,
    labels: Labels | None = None,
    *,
    strong_share: float | None = None,
    min_quality: float | None = None,
) -> float:
    """The threshold t for "small tier when score >= t", chosen on calibration rows.

    - `strong_share`: about that fraction of the rows scores below t (exactly round(share*n) when scores
      are distinct); t sits midway between neighbouring scores so it generalises.
    - `min_quality` (needs `labels`): the fewest strong calls whose quality is at least `min_quality`
      times the strong model's quality on these rows (e.g. 0.95 = "95% of GPT-4's quality").
    """
    s = np.sort(np.asarray(scores, dtype=float))
    n = s.shape[0]
    if n == 0:
        raise ValueError("no scores to calibrate on")
    if (strong_share is None) == (min_quality is None):
        raise ValueError("give exactly one of strong_share or min_quality")
    if strong_share is not None:
        if not 0.0 <= strong_share <= 1.0:
            raise ValueError(f"strong_share must be in [0, 1], got {strong_share}")
        k = round(strong_share * n)
    else:
        assert min_quality is not None
        if labels is None:
            raise ValueError("min_quality needs labels")
        if min_quality < 0.0:
            raise ValueError(f"min_quality must be >= 0, got {min_quality}")
        shares, quality = quality_curve(scores, labels)
        target = min_quality * quality[-1] - 1e-12
        reached = np.flatnonzero(quality >= target)
        k = round(float(shares[reached[0]]) * n) if reached.size else n
    if k <= 0:
        return float(np.nextafter(s[0], -np.inf))
    if k >= n:
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2) if s[k - 1] < s[k] else float(s[k])
