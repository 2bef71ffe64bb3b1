"""Stage 4, cache lookup: exact key, then an identical request in flight, then embed and retrieve, then a
verified semantic hit.

One embedding per request is made here and reused downstream (the route stage's features, the
examples, the stored entry), so the outcome, `CacheLookup`, travels on to those stages. A hit is
answered right here (`hit_response`, `replay_as_stream`): no backend, no admission.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from icgate.cache.embed import (
    EmbedderBusyError,
    UnembeddableTextError,
    context_fingerprint,
    conversation_text,
)
from icgate.cache.exact import cacheability, exact_key, fits_output_limit, output_constraints_key
from icgate.gateway.backends.client import openai_response, served_model
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext, namespace_for
from icgate.gateway.store.cache_entries import CacheEntries, Candidate, Hit, VerifierBusyError
from icgate.gateway.store.in_flight import Lead
from icgate.gateway.telemetry import Tracing
from icgate.text import last_user_text

Vector = npt.NDArray[np.float32]
VERIFIED_CANDIDATES = 3  # the most similar candidates the verifier scores per request
EMBEDDER_BUSY = "embedder-busy"  # why a request went without its embedding (`CacheLookup.skipped`)
VERIFIER_BUSY = "verifier-busy"  # why it went without a semantic hit though it had candidates

# Why a retrieved candidate never reached the verifier (`CacheLookup.passed_over`), and why no candidate
# did (`CacheLookup.no_semantic`): short codes for the request log, put in words by the console.
BELOW_PREFILTER = "prefilter"  # similarity under the verifier's cosine prefilter
OTHER_CONTEXT = "context"  # a different conversation context or output constraints
TOO_LONG = "too_long"  # longer than `cache.semantic_max_chars`
OUTPUT_LIMIT = "output_limit"  # its answer is longer than the request's max_tokens allows
NOT_ALLOWED = "not_allowed"  # expired, or of a lower tier than the named backend's
NOT_TOP = "not_top"  # usable, but not among the VERIFIED_CANDIDATES most similar


class Embed(Protocol):
    """The request embedding (`MicroBatcher.embed`); `scope` is the tenant's cache namespace, so that
    neither its memo nor a shared in-flight encode answers one tenant faster for another's text."""

    def __call__(self, text: str, scope: str = "") -> Awaitable[Vector]: ...


@dataclass
class CacheLookup:
    """What the cache stage learned about one request: the route stage, the examples and the insert
    reuse its embedding and candidates."""

    namespace: str
    exact_key: str
    servable: bool
    storable: bool
    embed_text: str
    prompt_text: str
    fingerprint: str
    exact: bool
    semantic: bool
    examples: bool
    store: bool
    # The vector is wanted only by the stored entry (a named request with exact hits only): it is made
    # after the response (`CacheEntries.insert_later`), not on the request's path.
    embed_after: bool = False
    vector: Vector | None = None
    candidates: list[Candidate] = field(default_factory=list)
    hit: Hit | None = None
    # Set when part of the cache was skipped rather than queued for: EMBEDDER_BUSY (no embedding, so no
    # semantic hit, no examples, nothing stored, and the router takes its default tier) or VERIFIER_BUSY
    # (no semantic hit; the rest as usual).
    skipped: str | None = None
    # Identical requests in flight (`cache.coalesce`): `lead` while this one leads them (settled by the
    # insert of its answer, or by the pipeline when there is none); `shared` when it was served the
    # answer of one it waited for.
    lead: Lead | None = None
    shared: bool = False
    # What the semantic step judged, kept for the explanation (no work of its own): each candidate that
    # the verifier did not see, with why (the codes above), and the prefilter they were held to; the
    # verifier's score for each one it saw, and its threshold; why no candidate was tried (TOO_LONG).
    passed_over: dict[int, str] = field(default_factory=dict)
    prefilter: float | None = None
    scores: dict[int, float] = field(default_factory=dict)
    threshold: float | None = None
    no_semantic: str | None = None

    @property
    def best_similarity(self) -> float | None:
        return self.candidates[0].similarity if self.candidates else None


async def embed_request(embed: Embed, text: str, scope: str) -> Vector:
    """`embed`, with a text the embedder cannot read reported to its sender as a bad request (400)."""
    try:
        return await embed(text, scope=scope)
    except UnembeddableTextError as exc:
        raise GatewayError(400, f"Invalid message content: {exc}", param="messages") from None


async def look_up(
    ctx: RequestContext,
    target: Target,
    entries: CacheEntries,
    embed: Embed,
    tracing: Tracing,
    may_lead: bool = False,
) -> CacheLookup | None:
    """The stage: None when the cache is off for this request, else the lookup (with `.hit` if any).
    `may_lead`: the caller settles `lookup.lead` however the request ends (`Pipeline.run` does)."""
    lookup = plan_lookup(ctx, entries, named=not target.routed)
    if lookup is None:
        return None
    min_tier = target.min_tier
    with tracing.stage_span("exact_cache"):
        lookup.hit = look_up_exact(lookup, entries, min_tier)
    if lookup.hit is None and entries.config.coalesce and lookup.exact and lookup.servable:
        with tracing.stage_span("in_flight"):
            started = time.perf_counter()
            lookup.hit = await share_in_flight(lookup, entries, min_tier, may_lead and not ctx.stream)
            if lookup.lead is None:  # it waited for another request's backend call: not the gateway's work
                ctx.backend_s += time.perf_counter() - started
    if lookup.hit is None:
        try:
            with tracing.stage_span("embed_retrieve"):
                await embed_and_retrieve(lookup, entries, embed)
            with tracing.stage_span("semantic_hit"):
                lookup.hit = await look_up_semantic(lookup, entries, min_tier, ctx.body)
        except BaseException:
            release(lookup)
            raise
    return lookup


async def share_in_flight(
    lookup: CacheLookup, entries: CacheEntries, min_tier: str | None, may_lead: bool
) -> Hit | None:
    """An identical request already in flight: wait for its answer and take it as an exact hit. Else
    this one leads (`lookup.lead`) when it may: a streamed request (its answer is stored when the stream
    ends) and a named one (embedded after its response) only follow."""
    key, wait_s = (lookup.namespace, lookup.exact_key), entries.config.coalesce_wait_s
    if may_lead and lookup.storable and not lookup.embed_after:
        lookup.lead = entries.in_flight.lead(key, wait_s)
        if lookup.lead is not None:
            return None
    entry = await entries.in_flight.follow(key, wait_s)
    if entry is None or not entries.allowed(entry, min_tier):
        return None
    lookup.shared = True
    return Hit(entry, 1.0, "exact", 1.0)


def release(lookup: CacheLookup | None) -> None:
    """The requests waiting for this one go on alone: it has no answer for them (a hit, an error, an
    answer not stored). Does nothing once the answer was handed to the insert (`store_answer`)."""
    if lookup is not None and lookup.lead is not None:
        lookup.lead.share(None)
        lookup.lead = None


def plan_lookup(ctx: RequestContext, entries: CacheEntries, named: bool = False) -> CacheLookup | None:
    """What the cache may do for this request (policy switches, sampling, tools), before any work.
    `named`: addressed to a backend by name, so no router needs the embedding."""
    if ctx.endpoint != "chat":
        return None
    switches = entries.config.switches(ctx.tenant.name, ctx.model, named=named)
    if not switches.enabled:
        return None
    messages = ctx.body["messages"]
    allowed = cacheability(ctx.body, entries.config.allow_sampled)
    embed_text = conversation_text(messages)
    # No text, nothing to match on: an empty string would be "similar" to every other empty string.
    readable = bool(embed_text.strip())
    return CacheLookup(
        namespace=namespace_for(ctx.tenant),
        exact_key=exact_key(ctx.endpoint, ctx.body),
        servable=allowed.servable and readable,
        storable=allowed.storable and readable,
        embed_text=embed_text,
        prompt_text=last_user_text(messages),
        fingerprint=semantic_scope(messages, ctx.body),
        exact=bool(switches.exact),
        semantic=bool(switches.semantic),
        examples=bool(switches.examples),
        store=bool(switches.store),
        embed_after=named and not (switches.semantic or switches.examples),
    )


def semantic_scope(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """What a semantic hit must share with the request besides meaning: the same context (every message
    but the last user turn) and the same output constraints (response_format, stop, seed, tools, ...)."""
    context = context_fingerprint(messages)
    constraints = output_constraints_key(body)
    return f"{context}|{constraints}" if constraints else context


def look_up_exact(lookup: CacheLookup, entries: CacheEntries, min_tier: str | None) -> Hit | None:
    if not (lookup.exact and lookup.servable):
        return None
    entry = entries.exact(lookup.namespace, lookup.exact_key)
    if entry is None or not entries.allowed(entry, min_tier):
        return None
    return Hit(entry, 1.0, "exact", 1.0)


async def embed_and_retrieve(lookup: CacheLookup, entries: CacheEntries, embed: Embed) -> None:
    """One embedding per request, reused by the semantic hit, the examples, the router and the insert."""
    if lookup.embed_after or not (lookup.semantic or lookup.examples or lookup.store):
        return
    try:
        lookup.vector = await embed_request(embed, lookup.embed_text, lookup.namespace)
    except EmbedderBusyError:
        lookup.skipped = EMBEDDER_BUSY  # served without the semantic cache rather than queued
        return
    lookup.candidates = await entries.retrieve(lookup.namespace, lookup.vector, entries.config.top_k)


async def look_up_semantic(
    lookup: CacheLookup, entries: CacheEntries, min_tier: str | None, body: dict[str, Any]
) -> Hit | None:
    """The most similar candidate that asks the same thing in the same context, if the verifier agrees.

    Only the `VERIFIED_CANDIDATES` most similar usable candidates are scored: the verifier may run a
    cross-encoder (milliseconds per pair) on a thread every tenant shares, so nothing longer than
    `semantic_max_chars` (the request's text or a candidate's) ever reaches it.
    """
    if not (lookup.semantic and lookup.servable) or lookup.vector is None:
        return None
    limit = entries.semantic_max_chars
    if len(lookup.prompt_text) > limit:
        lookup.no_semantic = TOO_LONG
        return None
    prefilter = lookup.prefilter = entries.verifier.cosine_threshold
    usable: list[Candidate] = []
    for c in lookup.candidates:
        why = why_passed_over(c, lookup, entries, min_tier, body, limit, prefilter)
        if why is None:
            usable.append(c)
        else:
            lookup.passed_over[c.entry.id] = why
    usable.sort(key=lambda c: -c.similarity)
    for c in usable[VERIFIED_CANDIDATES:]:
        lookup.passed_over[c.entry.id] = NOT_TOP
    del usable[VERIFIED_CANDIDATES:]
    if not usable:
        return None
    try:
        scores = await entries.verify(lookup.prompt_text, lookup.vector, [c.entry for c in usable])
    except VerifierBusyError:
        lookup.skipped = VERIFIER_BUSY
        return None
    threshold = entries.verifier.probability_threshold
    lookup.threshold = threshold
    lookup.scores = {c.entry.id: float(score) for c, score in zip(usable, scores, strict=True)}
    best = int(np.argmax(scores))
    if scores[best] < threshold:
        return None
    return Hit(usable[best].entry, usable[best].similarity, "semantic", float(scores[best]))


def why_passed_over(
    c: Candidate,
    lookup: CacheLookup,
    entries: CacheEntries,
    min_tier: str | None,
    body: dict[str, Any],
    limit: int,
    prefilter: float,
) -> str | None:
    """Why a candidate may not go to the verifier (the first reason, as a code), or None if it may."""
    if c.similarity < prefilter:
        return BELOW_PREFILTER
    if c.entry.context_fingerprint != lookup.fingerprint:
        return OTHER_CONTEXT
    if len(c.entry.prompt_text) > limit:
        return TOO_LONG
    # Only answers the request would have let finish (a 9-token answer never serves max_tokens 2).
    if not fits_output_limit(c.entry.completion_tokens, body):
        return OUTPUT_LIMIT
    if not entries.allowed(c.entry, min_tier):
        return NOT_ALLOWED
    return None


def hit_response(ctx: RequestContext, hit: Hit) -> dict[str, Any]:
    """The cached answer as a fresh chat completion for this request, in OpenAI's shape (entries
    stored by earlier versions lack OpenAI's null fields, and a streamed one carries the litellm
    model string)."""
    cached = hit.entry.response
    fresh = {
        **cached,
        "id": f"chatcmpl-{ctx.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
    }
    return openai_response(fresh, served_model(str(cached.get("model") or "icgate-cache")))


async def replay_as_stream(
    ctx: RequestContext, response: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """A cached answer as server-sent chunks, the way a backend would stream it."""
    base = {
        "id": response["id"],
        "object": "chat.completion.chunk",
        "created": response["created"],
        "model": response.get("model", "icgate-cache"),
        "system_fingerprint": response.get("system_fingerprint"),
    }
    text = ""
    choices = response.get("choices") or []
    if choices:
        text = choices[0].get("message", {}).get("content") or ""
    words = text.split(" ")
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": word if i == 0 else " " + word}
        if i == 0:
            delta["role"] = "assistant"
        yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    if (ctx.body.get("stream_options") or {}).get("include_usage") and response.get("usage"):
        yield {**base, "choices": [], "usage": response["usage"]}
