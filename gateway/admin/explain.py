"""One request's decisions in plain words, from its request-log row: what the explainer page shows.

Plain data in, plain data out (no web framework), so that it is tested as such: a `Fact` is one line
of the explanation, grouped by the stage that decided it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from icgate.gateway.store.request_log import LogRow


@dataclass(frozen=True)
class Fact:
    label: str
    value: str
    key: str = ""  # a stable name for tests and scripts (`cache.similarity`, ...)


@dataclass
class Stage:
    title: str
    facts: list[Fact] = field(default_factory=list)

    def add(self, key: str, label: str, value: object) -> None:
        self.facts.append(Fact(label, str(value), key))


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def explain(row: LogRow, verifier_threshold: float | None = None) -> list[Stage]:
    d = row.decisions or {}
    stages = [_caller(row, d)]
    cache = d.get("cache")
    if cache is not None:
        stages.append(_cache(cache, d.get("examples"), verifier_threshold))
    if d.get("route"):
        stages.append(_route(d["route"], row))
    stages.append(_admission(row, d))
    stages.append(_outcome(row))
    return stages


def _caller(row: LogRow, d: dict[str, Any]) -> Stage:
    stage = Stage("Request")
    stage.add(
        "request.tenant", "Tenant", row.tenant or (d.get("authenticate") or {}).get("tenant", "anonymous")
    )
    stage.add("request.model", "Model asked for", row.model_requested)
    routed = (d.get("target") or {}).get("routed")
    stage.add(
        "request.target", "Target", "routed: icgate chooses the tier" if routed else "a backend by name"
    )
    stage.add("request.endpoint", "Endpoint", f"{row.endpoint}{' (streamed)' if row.stream else ''}")
    stage.add("request.time", "Arrived", row.created_at.isoformat(sep=" ", timespec="seconds"))
    return stage


def _cache(cache: dict[str, Any], examples: list[int] | None, threshold: float | None) -> Stage:
    stage = Stage("Cache")
    hit = cache.get("hit")
    if hit == "exact":
        stage.add("cache.hit", "Answer", "an exact hit: the same request was answered before")
    elif hit == "semantic":
        stage.add(
            "cache.hit", "Answer", "a semantic hit: a near-duplicate's answer, which the verifier accepted"
        )
    elif cache.get("skipped"):
        stage.add("cache.hit", "Answer", f"not from the cache: the cache was skipped ({cache['skipped']})")
    elif not cache.get("servable", True):
        stage.add("cache.hit", "Answer", "not from the cache: this request may not be answered from it")
    else:
        stage.add("cache.hit", "Answer", "not from the cache: no stored answer was close enough")
    stage.add("cache.similarity", "Best similarity", _num(cache.get("similarity"), 4))
    stage.add("cache.candidates", "Candidates retrieved", cache.get("candidates", 0))
    score = cache.get("verifier")
    if score is not None:
        against = f" against threshold {_num(threshold)}" if threshold is not None else ""
        stage.add("cache.verifier", "Verifier score", f"{_num(score)}{against}")
    if hit is not None and cache.get("entry") is not None:
        stage.add("cache.entry", "Entry served", f"#{cache['entry']}")
    if examples is not None:
        shown = ", ".join(f"#{i}" for i in examples) if examples else "none"
        stage.add("cache.examples", "Examples prepended", shown)
    return stage


def _route(route: dict[str, Any], row: LogRow) -> Stage:
    stage = Stage("Route")
    stage.add("route.tier", "Tier chosen", route.get("tier"))
    if route.get("score") is not None:
        stage.add("route.score", "Router score (P small is good enough)", _num(route["score"]))
    for i, reason in enumerate(route.get("reasons") or []):
        stage.add(f"route.reason.{i}", "Because" if i == 0 else "", reason)
    predicted = route.get("predicted_tokens") or {}
    if predicted:
        stage.add(
            "route.length",
            "Output tokens, predicted vs actual",
            f"{predicted.get('p50')} (p90 {predicted.get('p90')}) vs {row.completion_tokens}",
        )
    stage.add("route.models", "Models", f"router {route.get('router')}, length {route.get('length_model')}")
    return stage


def _admission(row: LogRow, d: dict[str, Any]) -> Stage:
    stage = Stage("Admission and backends")
    admit = d.get("admit") or {}
    priority = d.get("priority") or {}
    if priority:
        stage.add("admit.class", "Priority class", priority.get("class") or "default")
    if "refused" in admit:
        stage.add("admit.decision", "Decision", f"refused: {admit['refused']}")
    elif "unavailable" in admit:
        stage.add("admit.decision", "Decision", f"unavailable: {', '.join(admit['unavailable'])}")
    elif admit:
        queued = admit.get("queue_ms") or 0
        how = f"queued {queued:.0f} ms" if queued else "admitted at once"
        stage.add("admit.decision", "Decision", f"{how} on {admit.get('backend')}")
    elif row.route == "cache":
        stage.add("admit.decision", "Decision", "none needed: answered from the cache")
    if d.get("spill"):
        stage.add("admit.spill", "Spilled", f"from tier {d['spill'].get('from')} to {d['spill'].get('to')}")
    if d.get("fallback"):
        fb = d["fallback"]
        stage.add(
            "admit.fallback",
            "Fallback",
            f"{fb.get('from')} failed ({fb.get('error')}); {fb.get('to')} answered",
        )
    if d.get("fallback_refused"):
        fr = d["fallback_refused"]
        stage.add("admit.fallback_refused", "Fallback refused", f"{fr.get('to')}: {fr.get('reason')}")
    stage.add(
        "admit.backend", "Answered by", row.backend or ("the cache" if row.route == "cache" else "none")
    )
    return stage


def _outcome(row: LogRow) -> Stage:
    stage = Stage("Outcome")
    status = f"{row.status_code}" + (f" ({row.error_type})" if row.error_type else "")
    stage.add("outcome.status", "Status", status)
    stage.add("outcome.tokens", "Tokens in / out", f"{row.prompt_tokens} / {row.completion_tokens}")
    stage.add("outcome.cost", "Cost", f"${row.cost_usd:.6f}")
    stage.add("outcome.latency", "Latency", f"{row.latency_ms:.1f} ms")
    stage.add(
        "outcome.overhead", "Gateway overhead", f"{row.overhead_ms:.2f} ms (queued {row.queue_ms:.1f} ms)"
    )
    stage.add("outcome.request_id", "Request id (also the trace's)", row.request_id)
    return stage
