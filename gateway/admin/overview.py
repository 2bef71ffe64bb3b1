"""The overview's numbers and charts, from request-log totals: plain data in, plain data (and SVG) out.

Savings are counted against sending every answered request to the best tier, at its first backend's
prices, with each request's own tokens: an exact or semantic hit saved all of that; a small-tier answer
saved the difference between the two tiers' prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from icgate.gateway.config import BackendConfig
from icgate.gateway.store.request_log import Bucket, MechanismTotals, Overview

MECHANISMS = {
    "exact": "Exact cache hits",
    "semantic": "Semantic cache hits",
    "examples": "Small tier with examples",
    "small": "Small tier (the router's choice)",
}
COLOURS = {"cache": "#2e7d32", "small": "#1565c0", "large": "#ef6c00", "error": "#c62828", "none": "#9e9e9e"}
RANGES = {"1h": 3600, "24h": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}


@dataclass(frozen=True)
class Saving:
    mechanism: str
    label: str
    requests: int
    saved_usd: float


@dataclass(frozen=True)
class Summary:
    requests: int
    per_second: float
    hit_rate: float
    p50_ms: float
    p99_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    errors: int
    refusals: int
    fallbacks: int
    savings: list[Saving]
    saved_usd: float
    as_best_tier_usd: float


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (q in 0..100); NaN without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def price(backend: BackendConfig | None, prompt_tokens: int, completion_tokens: int) -> float:
    return backend.cost_usd(prompt_tokens, completion_tokens) if backend is not None else 0.0


def savings(mechanisms: list[MechanismTotals], best: BackendConfig | None) -> tuple[list[Saving], float]:
    """Money saved by each mechanism against the best tier, and what all answered would have cost there."""
    found = {m.mechanism: m for m in mechanisms}
    out = []
    for name, label in MECHANISMS.items():
        m = found.get(name)
        if m is None:
            out.append(Saving(name, label, 0, 0.0))
            continue
        out.append(
            Saving(
                name,
                label,
                m.requests,
                price(best, m.prompt_tokens, m.completion_tokens) - m.cost_usd,
            )
        )
    as_best = sum(price(best, m.prompt_tokens, m.completion_tokens) for m in mechanisms)
    return out, as_best


def summarize(data: Overview, best: BackendConfig | None) -> Summary:
    answered = sum(m.requests for m in data.mechanisms)
    hits = sum(m.requests for m in data.mechanisms if m.mechanism in ("exact", "semantic"))
    total = sum(data.statuses.values())
    seconds = max(1.0, (data.until - data.since).total_seconds())
    saved, as_best = savings(data.mechanisms, best)
    return Summary(
        requests=total,
        per_second=total / seconds,
        hit_rate=hits / answered if answered else 0.0,
        p50_ms=percentile(data.latency_ms, 50),
        p99_ms=percentile(data.latency_ms, 99),
        overhead_p50_ms=percentile(data.overhead_ms, 50),
        overhead_p99_ms=percentile(data.overhead_ms, 99),
        errors=sum(n for s, n in data.statuses.items() if s >= 500),
        refusals=data.statuses.get(429, 0),
        fallbacks=data.fallbacks,
        savings=saved,
        saved_usd=sum(s.saved_usd for s in saved),
        as_best_tier_usd=as_best,
    )


def route_chart(buckets: list[Bucket], width: int = 960, height: int = 220) -> str:
    """Requests per time bucket, stacked by route, as an SVG (escaped: route names come from the log)."""
    routes = sorted({r for b in buckets for r in b.routes}, key=lambda r: (r not in COLOURS, r))
    top = max((sum(b.routes.values()) for b in buckets), default=0) or 1
    bar = width / max(1, len(buckets))
    box = f"0 0 {width} {height + 40}"
    parts = [f'<svg id="route-chart" viewBox="{box}" role="img" aria-label="requests by route">']
    for i, b in enumerate(buckets):
        y = float(height)
        for route in routes:
            n = b.routes.get(route, 0)
            if not n:
                continue
            h = height * n / top
            y -= h
            colour = COLOURS.get(route, "#7b1fa2")
            label = f"{escape(route)}: {n} at {b.start:%Y-%m-%d %H:%M}"
            parts.append(
                f'<rect x="{i * bar + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                f'fill="{colour}" data-route="{escape(route)}" data-count="{n}"><title>{label}</title></rect>'
            )
    for j, route in enumerate(routes):
        colour = COLOURS.get(route, "#7b1fa2")
        parts.append(f'<rect x="{j * 110}" y="{height + 16}" width="12" height="12" fill="{colour}"></rect>')
        parts.append(f'<text x="{j * 110 + 16}" y="{height + 27}" font-size="13">{escape(route)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def savings_chart(items: list[Saving], width: int = 960) -> str:
    """Money saved per mechanism, as horizontal bars."""
    top = max((s.saved_usd for s in items), default=0.0) or 1.0
    row = 30
    parts = [
        f'<svg id="savings-chart" viewBox="0 0 {width} {row * len(items)}" role="img" aria-label="savings">'
    ]
    for i, s in enumerate(items):
        w = max(0.0, (width - 420) * s.saved_usd / top)
        parts.append(f'<text x="0" y="{i * row + 19}" font-size="13">{escape(s.label)}</text>')
        parts.append(
            f'<rect x="260" y="{i * row + 6}" width="{w:.1f}" height="18" fill="#2e7d32" '
            f'data-mechanism="{s.mechanism}" data-saved="{s.saved_usd:.6f}"></rect>'
        )
        parts.append(f'<text x="{266 + w:.1f}" y="{i * row + 19}" font-size="13">${s.saved_usd:.4f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def window(now: datetime, name: str) -> tuple[datetime, datetime, str]:
    """The time range a picker name stands for (unknown names: the last 24 hours)."""
    key = name if name in RANGES else "24h"
    return now - timedelta(seconds=RANGES[key]), now, key
