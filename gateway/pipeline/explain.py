"""The one place that writes `ctx.decisions`, the explanation of a request.

Stages hand each other typed outcomes; these functions turn each outcome into the record that the
response headers, the request log, the metrics and the traces all read, so they tell the same story.
Nothing downstream reads a decision back out of `ctx.decisions` to act on it.
"""

from __future__ import annotations

from icgate.gateway.config import BackendConfig, PriorityClass
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.route import RouteOutcome
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext


def tenant(ctx: RequestContext) -> None:
    ctx.decisions["authenticate"] = {"tenant": ctx.tenant.name}


def target(ctx: RequestContext, chosen: Target) -> None:
    ctx.decisions["target"] = {"routed": chosen.routed}


def cache(ctx: RequestContext, lookup: CacheLookup) -> None:
    hit = lookup.hit
    ctx.decisions["cache"] = {
        "hit": hit.kind if hit else None,
        "entry": hit.entry.id if hit else None,
        "similarity": hit.similarity if hit else lookup.best_similarity,
        "verifier": hit.verifier_score if hit else None,
        "candidates": len(lookup.candidates),
        "servable": lookup.servable,
    }
    if lookup.skipped:
        ctx.decisions["cache"]["skipped"] = lookup.skipped


def route(ctx: RequestContext, outcome: RouteOutcome) -> None:
    decision = outcome.decision
    ctx.decisions["route"] = {
        "tier": decision.tier,
        "score": decision.score,
        "reasons": list(decision.reasons),
        "prompt_tokens_est": outcome.prompt_tokens,
        "predicted_tokens": {"p50": outcome.predicted.p50, "p90": outcome.predicted.p90},
        "router": outcome.router_version,
        "length_model": outcome.length_version,
    }


def priority(ctx: RequestContext, name: str | None, cls: PriorityClass) -> None:
    ctx.decisions["priority"] = {"class": name, "rank": cls.rank, "ttft_slo_ms": cls.ttft_slo_ms}


def admitted(ctx: RequestContext, backend: BackendConfig) -> None:
    ctx.decisions["admit"] = {"backend": backend.name, "queue_ms": round(ctx.queue_s * 1000, 2)}


def refused(ctx: RequestContext, reason: str) -> None:
    ctx.decisions["admit"] = {"refused": reason}


def unavailable(ctx: RequestContext, backends: list[str]) -> None:
    ctx.decisions["admit"] = {"unavailable": backends}


def spilled(ctx: RequestContext, from_tier: str | None, to: BackendConfig) -> None:
    ctx.decisions["spill"] = {"from": from_tier, "to": to.name}


def fell_back(
    ctx: RequestContext, failed: BackendConfig, fallback: BackendConfig, kind: str, lower: bool
) -> None:
    ctx.decisions["fallback"] = {"from": failed.name, "to": fallback.name, "error": kind}
    if lower:
        ctx.decisions["fallback"]["downgraded"] = True


def fallback_refused(ctx: RequestContext, fallback: BackendConfig, reason: str) -> None:
    ctx.decisions["fallback_refused"] = {"to": fallback.name, "reason": reason}


def examples(ctx: RequestContext, used: list[int]) -> None:
    ctx.decisions["examples"] = used


def response_headers(ctx: RequestContext) -> dict[str, str]:
    """The explanation as `x-icgate-*` headers (also what the in-process middleware reports)."""
    headers = {
        "x-icgate-request-id": ctx.request_id,
        "x-icgate-route": ctx.route or "none",
        "x-icgate-backend": ctx.backend.name if ctx.backend else "none",
        "x-icgate-overhead-ms": f"{ctx.overhead_ms():.2f}",
        "x-icgate-queue-ms": f"{ctx.queue_s * 1000:.2f}",
        "x-icgate-backend-ms": f"{ctx.backend_s * 1000:.2f}",
        "x-icgate-total-ms": f"{ctx.total_ms():.2f}",
    }
    if ctx.fallback_from:
        headers["x-icgate-fallback-from"] = ctx.fallback_from
        if (ctx.decisions.get("fallback") or {}).get("downgraded"):
            headers["x-icgate-downgraded"] = "true"
    cached = ctx.decisions.get("cache") or {}
    if cached.get("skipped"):
        headers["x-icgate-cache-skipped"] = cached["skipped"]
    if cached.get("similarity") is not None:
        headers["x-icgate-similarity"] = f"{cached['similarity']:.4f}"
    if "examples" in ctx.decisions:
        headers["x-icgate-examples"] = str(len(ctx.decisions["examples"]))
    routed = ctx.decisions.get("route") or {}
    if routed.get("score") is not None:
        headers["x-icgate-router-score"] = f"{routed['score']:.4f}"
    if routed.get("predicted_tokens"):
        headers["x-icgate-predicted-tokens"] = str(routed["predicted_tokens"]["p50"])
    return headers
