"""The one place that writes `ctx.decisions`, the explanation of a request.

Stages hand each other typed outcomes; these functions turn each outcome into the record that the
response headers, the request log, the metrics and the traces all read, so they tell the same story.
Nothing downstream reads a decision back out of `ctx.decisions` to act on it.
"""

from __future__ import annotations

from typing import Any

from icgate.gateway.backends.admission import AdmissionRefused, Ask, Placement
from icgate.gateway.backends.client import BackendError
from icgate.gateway.config import BackendConfig, PriorityClass
from icgate.gateway.pipeline.augment import Augmented
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.route import RouteOutcome
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext

NEAREST_SHOWN = 5  # the candidates the log keeps per request, the most similar first
ERROR_MAX_CHARS = 200  # of an attempt's error message (the client-facing one, never the backend's detail)


def tenant(ctx: RequestContext) -> None:
    ctx.decisions["authenticate"] = {"tenant": ctx.tenant.name}


def target(ctx: RequestContext, chosen: Target) -> None:
    ctx.decisions["target"] = {"routed": chosen.routed}


def cache(ctx: RequestContext, lookup: CacheLookup) -> None:
    hit = lookup.hit
    ctx.decisions["cache"] = {
        "hit": hit.kind if hit else None,
        "entry": hit.entry.id if hit and hit.entry.id else None,  # 0: an answer not yet written
        "similarity": hit.similarity if hit else lookup.best_similarity,
        "verifier": hit.verifier_score if hit else None,
        "candidates": len(lookup.candidates),
        "servable": lookup.servable,
    }
    if lookup.skipped:
        ctx.decisions["cache"]["skipped"] = lookup.skipped
    if lookup.shared:
        ctx.decisions["cache"]["shared"] = True  # the answer of an identical request it waited for
    if lookup.candidates:
        ctx.decisions["cache"]["nearest"] = nearest(lookup)
        if lookup.prefilter is not None:
            ctx.decisions["cache"]["prefilter"] = lookup.prefilter
        if lookup.threshold is not None:
            ctx.decisions["cache"]["threshold"] = lookup.threshold


def nearest(lookup: CacheLookup) -> list[dict[str, Any]]:
    """The most similar candidates, each with its similarity, the verifier's score if it ran on it, and
    why it was or was not served (a code the console puts in words): from what the lookup kept."""
    served = lookup.hit.entry.id if lookup.hit is not None else None
    threshold = lookup.threshold
    out = []
    for c in lookup.candidates[:NEAREST_SHOWN]:
        entry = c.entry.id
        item: dict[str, Any] = {"entry": entry, "similarity": round(c.similarity, 4)}
        score = lookup.scores.get(entry)
        if score is not None:
            item["verifier"] = round(score, 4)
        if entry == served:
            item["why"] = "served"
        elif score is not None:
            item["why"] = "below_threshold" if threshold is not None and score < threshold else "outscored"
        else:
            item["why"] = lookup.passed_over.get(entry) or _untried(lookup)
        out.append(item)
    return out


def _untried(lookup: CacheLookup) -> str:
    """Why the verifier saw no candidate at all."""
    if lookup.hit is not None and lookup.hit.kind == "exact":
        return "exact_hit"
    if not (lookup.semantic and lookup.servable):
        return "semantic_off" if lookup.servable else "not_servable"
    return lookup.no_semantic or lookup.skipped or "not_tried"


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
    if outcome.knob is not None:
        ctx.decisions["route"]["knob"] = {"name": outcome.knob[0], "value": outcome.knob[1]}
    if outcome.priced:
        ctx.decisions["route"]["priced_tokens"] = dict(outcome.priced)


def priority(ctx: RequestContext, name: str | None, cls: PriorityClass) -> None:
    ctx.decisions["priority"] = {"class": name, "rank": cls.rank, "ttft_slo_ms": cls.ttft_slo_ms}


def admitted(
    ctx: RequestContext,
    backend: BackendConfig,
    predicted_wait_s: float | None = None,
    predicted_tokens: int | None = None,
) -> None:
    """Where it was admitted, how long it queued, and how long admission predicted it would (its error
    is the queue's: docs/admission.md); and the answer's length as admission sized it for that backend,
    which is that backend's own predictor's where it has one (`decisions.route` has the shared one)."""
    ctx.decisions["admit"] = {"backend": backend.name, "queue_ms": round(ctx.queue_s * 1000, 2)}
    if predicted_wait_s is not None:
        ctx.decisions["admit"]["predicted_wait_ms"] = round(predicted_wait_s * 1000, 2)
    if predicted_tokens is not None:
        ctx.decisions["admit"]["predicted_tokens"] = predicted_tokens


def placed(ctx: RequestContext, placement: Placement, ask: Ask) -> None:
    """What admission saw of the backend it chose, at the decision (nothing computed for it)."""
    seen: dict[str, Any] = {
        "backend": placement.backend.name,
        "in_flight": placement.in_flight,
        "max_concurrent": placement.backend.max_concurrent,
        "waiting": placement.waiting,
    }
    if placement.ttft_s is not None:
        seen["ttft_ms"] = round(placement.ttft_s * 1000, 1)
    if placement.wait_s is not None:
        seen["wait_ms"] = round(placement.wait_s * 1000, 1)
    if ask.ttft_slo_s is not None:
        seen["ttft_slo_ms"] = round(ask.ttft_slo_s * 1000, 1)
    ctx.decisions["admission"] = seen


def attempt(
    ctx: RequestContext,
    backend: BackendConfig,
    role: str,
    seconds: float,
    queued_s: float = 0.0,
    error: BackendError | None = None,
    refused: str | None = None,
) -> None:
    """One backend attempt, appended in order: who, first/spill/fallback, how long, and how it ended."""
    item: dict[str, Any] = {"backend": backend.name, "role": role, "ms": round(seconds * 1000, 1)}
    if queued_s:
        item["queued_ms"] = round(queued_s * 1000, 1)
    if error is not None:
        item["outcome"] = "failed"
        item["status"] = error.status_code
        item["error"] = f"{error.kind}: {str(error)[:ERROR_MAX_CHARS]}"
    elif refused is not None:
        item["outcome"] = "refused"
        item["error"] = refused[:ERROR_MAX_CHARS]
    else:
        item["outcome"] = "answered"
    ctx.decisions.setdefault("attempts", []).append(item)


def stream_cut(ctx: RequestContext, error: BackendError) -> None:
    """The answering attempt's stream broke after its first chunk: that attempt failed after all."""
    attempts = ctx.decisions.get("attempts")
    if attempts:
        attempts[-1].update(
            outcome="cut", status=error.status_code, error=f"{error.kind}: {str(error)[:ERROR_MAX_CHARS]}"
        )


def refused(ctx: RequestContext, refusal: AdmissionRefused | str) -> None:
    """Why it was refused; for admission's refusal, also when (`at`: arrival, or after waiting in the
    queue, which `x-icgate-refused` tells the client), the wait it predicted and the time it waited."""
    if isinstance(refusal, str):
        ctx.decisions["admit"] = {"refused": refusal}
        return
    ctx.decisions["admit"] = {
        "refused": refusal.reason,
        "at": refusal.stage,
        "waited_ms": round(refusal.waited_s * 1000, 2),
    }
    if refusal.predicted_wait_s is not None:
        ctx.decisions["admit"]["predicted_wait_ms"] = round(refusal.predicted_wait_s * 1000, 2)


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


def examples(ctx: RequestContext, augmented: Augmented) -> None:
    """The entries prepended (ids, as readers of `examples` expect), and each one's relevance and utility."""
    ctx.decisions["examples"] = augmented.examples
    if augmented.chosen:
        ctx.decisions["examples_shown"] = [
            {"entry": e.entry_id, "similarity": round(e.similarity, 4), "utility": round(e.utility, 3)}
            for e in augmented.chosen
        ]
    else:
        ctx.decisions.pop("examples_shown", None)  # an earlier attempt's, which did not answer


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
    if cached.get("shared"):
        headers["x-icgate-cache-shared"] = "true"
    if cached.get("similarity") is not None:
        headers["x-icgate-similarity"] = f"{cached['similarity']:.4f}"
    if "examples" in ctx.decisions:
        headers["x-icgate-examples"] = str(len(ctx.decisions["examples"]))
    routed = ctx.decisions.get("route") or {}
    if routed.get("score") is not None:
        headers["x-icgate-router-score"] = f"{routed['score']:.4f}"
    sized = (ctx.decisions.get("admit") or {}).get("predicted_tokens")
    if sized is None and routed.get("predicted_tokens"):
        sized = routed["predicted_tokens"]["p50"]
    if sized is not None:  # the serving backend's size once admitted, else the shared prediction
        headers["x-icgate-predicted-tokens"] = str(sized)
    return headers
