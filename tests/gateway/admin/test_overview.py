"""The overview's arithmetic and charts as plain data."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from icgate.gateway.admin.overview import percentile, route_chart, savings, savings_chart, summarize, window
from icgate.gateway.config import BackendConfig
from icgate.gateway.store.request_log import Bucket, MechanismTotals, Overview

LARGE = BackendConfig(
    name="large",
    tier="large",
    model="openai/l",
    api_base="http://x/v1",
    cost_per_1k_input=10.0,
    cost_per_1k_output=20.0,
)
NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def test_each_mechanism_saves_what_the_best_tier_would_have_cost_minus_what_it_cost() -> None:
    totals = [
        MechanismTotals("exact", 3, 300, 600, 0.0),  # hits cost nothing
        MechanismTotals("examples", 2, 2000, 100, 0.5),
        MechanismTotals("small", 1, 100, 100, 0.01),
        MechanismTotals("other", 4, 1000, 1000, 30.0),  # the best tier itself saves nothing
    ]
    saved, as_best = savings(totals, LARGE)
    by = {s.mechanism: s for s in saved}
    assert math.isclose(by["exact"].saved_usd, 0.3 * 10 + 0.6 * 20)
    assert math.isclose(by["examples"].saved_usd, 2.0 * 10 + 0.1 * 20 - 0.5)
    assert math.isclose(by["small"].saved_usd, 0.1 * 10 + 0.1 * 20 - 0.01)
    assert by["semantic"] == type(by["semantic"])("semantic", "Semantic cache hits", 0, 0.0)
    assert math.isclose(as_best, 15.0 + 22.0 + 3.0 + 30.0)


def test_the_summary_counts_hits_among_answered_requests_and_trouble_by_status() -> None:
    data = Overview(
        NOW - timedelta(hours=1),
        NOW,
        [MechanismTotals("exact", 1, 10, 10, 0.0), MechanismTotals("small", 3, 10, 10, 0.0)],
        [],
        {200: 4, 429: 2, 502: 1},
        fallbacks=1,
        latency_ms=[10.0, 20.0, 30.0, 40.0],
        overhead_ms=[1.0, 2.0, 3.0, 4.0],
    )
    summary = summarize(data, LARGE)
    assert (summary.requests, summary.refusals, summary.errors, summary.fallbacks) == (7, 2, 1, 1)
    assert summary.hit_rate == 0.25
    assert (summary.p50_ms, summary.p99_ms, summary.overhead_p50_ms) == (20.0, 40.0, 2.0)
    assert math.isclose(summary.per_second, 7 / 3600)
    assert math.isnan(percentile([], 50))


def test_charts_draw_every_count_and_escape_names_from_the_log() -> None:
    buckets = [Bucket(NOW, {"small": 3, "cache": 1}), Bucket(NOW + timedelta(hours=1), {"<b>": 2})]
    svg = route_chart(buckets)
    assert svg.count("<rect") == 3 + 3  # three bars, and a legend square per route
    assert 'data-count="3"' in svg and 'data-route="cache"' in svg
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    saved, _ = savings([MechanismTotals("exact", 1, 1000, 0, 0.0)], LARGE)
    assert 'data-saved="10.000000"' in savings_chart(saved)


def test_the_range_picker_falls_back_to_a_day() -> None:
    since, until, name = window(NOW, "7d")
    assert (until - since, name) == (timedelta(days=7), "7d")
    assert window(NOW, "forever")[2] == "24h"
