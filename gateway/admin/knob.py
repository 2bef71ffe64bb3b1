"""The router knob's projection: logged routed requests decided again under another threshold or strong share.

Plain data in, plain data out (no web framework), tested as such. Each replayed request is decided again by
`routers.decide.decide`, the function the route stage calls, with the knob changed and everything else as
logged: the router's score, the example that lifted it, the prompt estimate and the predicted length. So
the example lift and `quality_value_usd` act in the projection exactly as they act in the gateway.

What the numbers mean (docs/admin.md says the same):

- **large share**: the share of the replayed requests the knob sends to the large tier;
- **cost**: each request's own prompt and completion tokens, as logged, at the first backend's prices of
  the tier it would go to (`gateway.pipeline.route.price`): an answer is assumed as long on either tier;
- **expected quality**: the mean, over the requests, of the router's P(the small answer is good enough)
  (after the example lift, as decided) for a request sent to small, and 1 for one sent to large. It is the
  share of requests expected to be answered as well as the large tier would, by the router's own estimate
  on this traffic. Held-out labels are better grounded, but they are measured on benchmark prompts and
  only at a few shares; this is defined for every request replayed and for any knob.
- A **strong share** s becomes a threshold on the replayed requests' own scores (`calibrate_threshold`, as
  `icgate router calibrate --strong-share` does), so that about s of this traffic goes large. The policy's
  `strong_share` maps through the training scores instead, which need not match live traffic; applying a
  strong share from the knob therefore sets the threshold it stands for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np

from icgate.gateway.config import Policy, RouterConfig
from icgate.gateway.pipeline.route import price, threshold_for
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store.request_log import ScoredRoute
from icgate.routers.base import RouteDecision
from icgate.routers.decide import DecisionKnob, ExampleSignal, TierPrice, decide, lifted
from icgate.routers.evaluation import calibrate_threshold

DEFAULT_REQUESTS = 1000
MAX_REQUESTS = 10_000
CURVE_POINTS = 21

# The reasons `decide` writes: the raw score first, then the lift when an example lifted it.
_RAW = re.compile(r"^P\(small good enough\) (-?[0-9.]+)")
_LIFT = re.compile(r"^example similarity (-?[0-9.]+), utility (-?[0-9.]+): P lifted to")


@dataclass(frozen=True)
class Replayed:
    """One logged routed request, as the decision needs it again."""

    request_id: str
    p_small: float  # the router's score, before the example lift
    example: ExampleSignal | None  # the best example, when it lifted the score
    prompt_estimate: int  # the prompt tokens the router saw (an estimate)
    predicted_tokens: int  # the predicted output tokens (p50), the shared prediction
    prompt_tokens: int  # what the answer was billed for
    completion_tokens: int
    tier: str  # the tier decided, as logged
    score: float  # the score it was decided on (after the lift), as logged
    cost_usd: float  # what it cost, as logged
    router: str | None  # the router version that scored it
    # Each tier's own predicted output tokens, as the decision priced them (logged since per-tier pricing;
    # a tier not named here is priced at `predicted_tokens`).
    priced: Mapping[str, int] = field(default_factory=dict)


def replayable(rows: Sequence[ScoredRoute]) -> list[Replayed]:
    """The rows whose decision can be made again. Without a lift the logged score is the raw one, exact;
    with one, the raw score and the example are read back from the reasons (3 and 2 decimals)."""
    out = []
    for row in rows:
        route = row.decision
        score, tier = route.get("score"), route.get("tier")
        if not isinstance(score, int | float) or not isinstance(tier, str):
            continue
        reasons = [r for r in route.get("reasons") or [] if isinstance(r, str)]
        raw, example = float(score), None
        lift = next((m for m in map(_LIFT.match, reasons) if m), None)
        if lift is not None:
            first = _RAW.match(reasons[0]) if reasons else None
            if first is None:
                continue
            raw = float(first.group(1))
            example = ExampleSignal(float(lift.group(1)), float(lift.group(2)))
        predicted = route.get("predicted_tokens") or {}
        priced = route.get("priced_tokens") or {}
        out.append(
            Replayed(
                request_id=row.request_id,
                p_small=raw,
                example=example,
                prompt_estimate=int(route.get("prompt_tokens_est") or row.prompt_tokens),
                predicted_tokens=int(predicted.get("p50") or 0),
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                tier=tier,
                score=float(score),
                cost_usd=row.cost_usd if math.isfinite(row.cost_usd) else 0.0,
                router=route.get("router"),
                priced={k: v for k, v in priced.items() if isinstance(k, str) and isinstance(v, int)},
            )
        )
    return out


@dataclass(frozen=True)
class Setting:
    """A position of the knob: at most one of these; none, the router artifact's own threshold."""

    threshold: float | None = None
    strong_share: float | None = None
    quality_value_usd: float | None = None

    @staticmethod
    def of(config: RouterConfig) -> Setting:
        return Setting(config.threshold, config.strong_share, config.quality_value_usd)

    def describe(self) -> str:
        if self.threshold is not None:
            return f"threshold {self.threshold:.4f}"
        if self.strong_share is not None:
            return f"strong share {self.strong_share:.3f}"
        if self.quality_value_usd is not None:
            return f"quality value ${self.quality_value_usd:g}"
        return "the router's own threshold"


@dataclass(frozen=True)
class Outcome:
    """What a knob does to the replayed requests."""

    requests: int
    large: int
    large_share: float
    cost_usd: float
    expected_quality: float


@dataclass(frozen=True)
class Projection:
    setting: Setting
    threshold: float | None  # the threshold decided on (None: `quality_value_usd` decides)
    outcome: Outcome


@dataclass(frozen=True)
class Comparison:
    """As logged, under the knob in force now, and under the candidate: side by side."""

    requests: int
    routers: dict[str, int]  # router version -> replayed requests it scored
    logged: Outcome
    current: Projection
    candidate: Projection


@dataclass(frozen=True)
class Tiers:
    small: TierPrice
    large: TierPrice

    @staticmethod
    def of(policy: Policy) -> Tiers:
        """The policy's two routed tiers at their first backends' prices, as the route stage prices them."""
        return Tiers(price(policy, policy.router.default_tier), price(policy, policy.router.large_tier))


def knob(
    config: RouterConfig, threshold: float | None, quality_value_usd: float | None = None
) -> DecisionKnob:
    """The decision's knob with the policy's example lift (as `choose_tier` builds it)."""
    return DecisionKnob(
        threshold=threshold,
        quality_value_usd=quality_value_usd,
        example_lift=config.example_lift,
        example_min_similarity=config.example_min_similarity,
    )


def current_knob(config: RouterConfig, models: RouteModels) -> DecisionKnob:
    """The knob in force: `threshold_for` maps the policy's setting as the route stage does."""
    return knob(config, threshold_for(config, models), config.quality_value_usd)


def lifted_scores(rows: Sequence[Replayed], base: DecisionKnob) -> list[float]:
    """Each request's score after the example lift: what a threshold is compared with."""
    return [lifted(r.p_small, r.example, base)[0] for r in rows]


def threshold_for_share(rows: Sequence[Replayed], share: float, base: DecisionKnob) -> float:
    """The threshold that sends about `share` of these requests to the large tier."""
    if not rows:
        raise ValueError("no logged routed requests with a router score to map a strong share to a threshold")
    return bounded(calibrate_threshold(lifted_scores(rows, base), strong_share=share))


def bounded(threshold: float) -> float:
    """Within the policy's 0..1 (the calibrated threshold steps just outside the scores at shares 0 and 1)."""
    return min(1.0, max(0.0, threshold))


def candidate_knob(
    setting: Setting, rows: Sequence[Replayed], config: RouterConfig, models: RouteModels
) -> DecisionKnob:
    if setting.threshold is not None:
        return knob(config, setting.threshold)
    if setting.strong_share is not None:
        return knob(config, threshold_for_share(rows, setting.strong_share, knob(config, None)))
    if setting.quality_value_usd is not None:
        return knob(config, None, setting.quality_value_usd)
    return knob(config, models.threshold)


def replay(rows: Sequence[Replayed], chosen: DecisionKnob, tiers: Tiers) -> list[RouteDecision]:
    """Each request decided again by the gateway's own `decide`, with `chosen` as the knob."""
    return [
        decide(
            r.p_small,
            tiers.small,
            tiers.large,
            r.prompt_estimate,
            r.priced.get(tiers.small.tier, r.predicted_tokens),
            chosen,
            r.example,
            large_tokens=r.priced.get(tiers.large.tier, r.predicted_tokens),
        )
        for r in rows
    ]


def outcome_of(rows: Sequence[Replayed], decisions: Sequence[RouteDecision], tiers: Tiers) -> Outcome:
    large = cost = quality = 0.0
    for row, decision in zip(rows, decisions, strict=True):
        to_large = decision.tier == tiers.large.tier
        large += to_large
        cost += (tiers.large if to_large else tiers.small).cost(row.prompt_tokens, row.completion_tokens)
        quality += 1.0 if to_large else float(decision.score or 0.0)
    n = len(rows)
    return Outcome(n, int(large), large / n if n else 0.0, cost, quality / n if n else 0.0)


def as_logged(rows: Sequence[Replayed], large_tier: str) -> Outcome:
    """The same numbers for what the gateway decided then, at what it cost then."""
    n = len(rows)
    large = sum(r.tier == large_tier for r in rows)
    quality = sum(1.0 if r.tier == large_tier else r.score for r in rows)
    cost = sum(r.cost_usd for r in rows)
    return Outcome(n, large, large / n if n else 0.0, cost, quality / n if n else 0.0)


def project(setting: Setting, chosen: DecisionKnob, rows: Sequence[Replayed], tiers: Tiers) -> Projection:
    return Projection(setting, chosen.threshold, outcome_of(rows, replay(rows, chosen, tiers), tiers))


def compare(
    rows: Sequence[Replayed], candidate: Setting | None, policy: Policy, models: RouteModels
) -> Comparison:
    """The candidate (None: the knob in force) next to the knob in force, on the same requests (ValueError:
    a strong share without requests to map it)."""
    config, tiers = policy.router, Tiers.of(policy)
    routers: dict[str, int] = {}
    for row in rows:
        routers[row.router or "unknown"] = routers.get(row.router or "unknown", 0) + 1
    current = project(Setting.of(config), current_knob(config, models), rows, tiers)
    return Comparison(
        requests=len(rows),
        routers=routers,
        logged=as_logged(rows, tiers.large.tier),
        current=current,
        candidate=current
        if candidate is None
        else project(candidate, candidate_knob(candidate, rows, config, models), rows, tiers),
    )


# --- the quality vs strong-share curve ---------------------------------------------------------------------


@dataclass(frozen=True)
class CurvePoint:
    strong_share: float
    quality: float
    cost_usd: float | None = None
    threshold: float | None = None


def curve(
    rows: Sequence[Replayed], config: RouterConfig, tiers: Tiers, points: int = CURVE_POINTS
) -> list[CurvePoint]:
    """Expected quality (and cost) at evenly spaced strong shares of the replayed requests.

    Each point is the threshold for that share, applied as `decide` applies a threshold (small when the
    lifted score is at least it) to all the requests at once: the same outcome as `compare` at that
    threshold (a test holds them equal), at a fraction of the cost of deciding each request 21 times."""
    if not rows:
        return []
    scores = np.asarray(lifted_scores(rows, knob(config, None)))
    small = np.array([tiers.small.cost(r.prompt_tokens, r.completion_tokens) for r in rows])
    large = np.array([tiers.large.cost(r.prompt_tokens, r.completion_tokens) for r in rows])
    out = []
    for share in np.linspace(0.0, 1.0, points):
        threshold = bounded(calibrate_threshold(scores, strong_share=float(share)))
        to_large = scores < threshold
        quality = float(np.where(to_large, 1.0, scores).mean())
        cost = float(np.where(to_large, large, small).sum())
        out.append(CurvePoint(float(to_large.mean()), quality, cost, threshold))
    return out


def held_out_points(held_out: dict[str, Any]) -> tuple[str, list[CurvePoint]]:
    """Measured points of the held-out quality curve, relative to the large tier's quality: the shares 0 and
    1, and the CPT(50%) and CPT(80%) shares, where the curve recovers half and 80% of the gap. Training keeps
    these numbers, not the curve (`routers.training.evaluate_by_group`), so only these are drawn. Returns
    the group they are for ("all" when there are several) and the points; none when nothing usable is kept."""
    name = "all" if "all" in held_out else next(iter(held_out), "")
    metrics = held_out.get(name)
    if not isinstance(metrics, dict):
        return name, []
    stored = metrics.get("curve")
    try:
        weak, strong = float(metrics["weak_quality"]), float(metrics["strong_quality"])
    except (KeyError, TypeError, ValueError):
        return name, []
    if strong <= 0:
        return name, []
    if isinstance(stored, list) and stored:  # a full curve, when a training run kept it
        return name, [CurvePoint(float(p[0]), float(p[1]) / strong) for p in stored]
    points = [CurvePoint(0.0, weak / strong)]
    for key, pgr in (("cpt50", 0.5), ("cpt80", 0.8)):
        if isinstance(metrics.get(key), int | float):
            points.append(CurvePoint(float(metrics[key]), (weak + pgr * (strong - weak)) / strong))
    points.append(CurvePoint(1.0, 1.0))
    return name, sorted(points, key=lambda p: p.strong_share)


@dataclass(frozen=True)
class ChartFrame:
    """Where the chart puts a (share, quality) point (the page's script moves the candidate's mark so)."""

    width: int = 720
    height: int = 300
    left: int = 56
    bottom: int = 40
    top: int = 12
    right: int = 24
    floor: float = 0.0  # the lowest quality on the axis

    def x(self, share: float) -> float:
        return self.left + (self.width - self.left - self.right) * min(1.0, max(0.0, share))

    def y(self, quality: float) -> float:
        span = (1.0 - self.floor) or 1.0
        inner = self.height - self.top - self.bottom
        return self.top + inner * (1.0 - (min(1.0, max(self.floor, quality)) - self.floor) / span)


def frame_for(projected: Sequence[CurvePoint], measured: Sequence[CurvePoint]) -> ChartFrame:
    lowest = min([p.quality for p in [*projected, *measured]], default=0.0)
    return ChartFrame(floor=max(0.0, math.floor(lowest * 10) / 10 - 0.1) if lowest > 0.15 else 0.0)


def curve_chart(
    projected: Sequence[CurvePoint],
    measured: Sequence[CurvePoint],
    marks: dict[str, CurvePoint],
    frame: ChartFrame,
) -> str:
    """Quality against the share sent to the large tier, as an SVG: the projection on the replayed requests
    (a line), the held-out measured points (dots), and the current and candidate settings (rings)."""
    f = frame
    parts = [
        f'<svg id="curve-chart" viewBox="0 0 {f.width} {f.height}" role="img" '
        f'aria-label="expected quality against strong share" data-left="{f.left}" data-width="{f.width}" '
        f'data-top="{f.top}" data-bottom="{f.bottom}" data-height="{f.height}" data-floor="{f.floor}" '
        f'data-right="{f.right}">'
    ]
    base_y = f.height - f.bottom
    parts.append(f'<line x1="{f.left}" y1="{base_y}" x2="{f.x(1.0)}" y2="{base_y}" stroke="#9aa4ae"/>')
    parts.append(f'<line x1="{f.left}" y1="{f.top}" x2="{f.left}" y2="{base_y}" stroke="#9aa4ae"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{f.x(tick):.1f}" y="{base_y + 16}" font-size="12" '
            f'text-anchor="middle">{tick:.0%}</text>'
        )
    step = 0.1 if 1.0 - f.floor > 0.35 else 0.05
    for k in range(round((1.0 - f.floor) / step) + 1):
        q = f.floor + k * step
        parts.append(
            f'<text x="{f.left - 6}" y="{f.y(q) + 4:.1f}" font-size="12" text-anchor="end">{q:.2f}</text>'
        )
    parts.append(
        f'<text x="{(f.left + f.width) / 2:.0f}" y="{f.height - 4}" font-size="12" text-anchor="middle">'
        "share of requests sent to the large tier</text>"
    )
    if projected:
        path = " ".join(f"{f.x(p.strong_share):.1f},{f.y(p.quality):.1f}" for p in projected)
        parts.append(
            f'<polyline id="curve-projected" points="{path}" fill="none" stroke="#1565c0" stroke-width="2"/>'
        )
        for p in projected:
            cost = f", ${p.cost_usd:.4f}" if p.cost_usd is not None else ""
            parts.append(
                f'<circle cx="{f.x(p.strong_share):.1f}" cy="{f.y(p.quality):.1f}" r="2.5" fill="#1565c0" '
                f'data-share="{p.strong_share:.4f}" data-quality="{p.quality:.4f}"><title>'
                f"{p.strong_share:.1%} large: quality {p.quality:.3f}{cost}</title></circle>"
            )
    for p in measured:
        parts.append(
            f'<rect class="held-out" x="{f.x(p.strong_share) - 4:.1f}" y="{f.y(p.quality) - 4:.1f}" '
            f'width="8" height="8" fill="#ef6c00" data-share="{p.strong_share:.4f}" '
            f'data-quality="{p.quality:.4f}"><title>held out: {p.strong_share:.1%} large, '
            f"quality {p.quality:.3f} of the large tier's</title></rect>"
        )
    colours = {"current": "#6b7785", "candidate": "#2e7d32"}
    for name, p in marks.items():
        parts.append(
            f'<circle id="mark-{escape(name)}" cx="{f.x(p.strong_share):.1f}" cy="{f.y(p.quality):.1f}" '
            f'r="7" fill="none" stroke="{colours.get(name, "#7b1fa2")}" stroke-width="3">'
            f"<title>{escape(name)}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
