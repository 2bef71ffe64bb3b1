"""Stage 8, record: everything after the answer, off the request's critical path.

Metrics now; the request-log row, the tenant's spend, the cache's usage counts and new entry, a route
sample (the router's training data) and a length sample (the backend's length predictor's) through their
own queues. `Trail` carries the outcomes of
the earlier stages that these need, so nothing here reads them back out of `ctx.decisions`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from icgate.gateway.backends.client import served_model
from icgate.gateway.config import Policy
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.quotas import TenantLimiter
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestBodies, RequestContext, RequestRecord
from icgate.gateway.store.cache_entries import CacheEntries, NewEntry, Usage
from icgate.gateway.store.length_samples import LengthSample, usable
from icgate.gateway.store.route_samples import RouteSample
from icgate.gateway.telemetry import Telemetry
from icgate.lengths.predict import feature_window
from icgate.text import last_user_text, message_text, prompt_text, scrub_pii

ROUTE_SAMPLE_MAX_CHARS = 8_000
BODY_MAX_CHARS = 8_000  # of a stored prompt, and of a stored answer (`request_log.store_bodies`)
TRUNCATED = "\n[... cut at 8,000 characters]"


class RecordSink(Protocol):
    def submit(self, record: RequestRecord) -> bool: ...


class SampleSink(Protocol):
    def submit(self, sample: RouteSample) -> bool: ...


class LengthSink(Protocol):
    def submit(self, sample: LengthSample) -> bool: ...


@dataclass(frozen=True)
class Trail:
    """The outcomes of earlier stages that the record stage needs (none for a request cut early)."""

    target: Target | None = None
    lookup: CacheLookup | None = None
    examples: list[int] = field(default_factory=list)


class Recorder:
    """The record stage, with its sinks."""

    def __init__(
        self,
        policy: Policy,
        telemetry: Telemetry,
        sink: RecordSink | None = None,
        samples: SampleSink | None = None,
        limiter: TenantLimiter | None = None,
        entries: CacheEntries | None = None,
        lengths: LengthSink | None = None,
    ) -> None:
        self.policy = policy
        self.telemetry = telemetry
        self.sink = sink
        self.samples = samples
        self.limiter = limiter
        self.entries = entries
        self.lengths = lengths
        self._charges: set[asyncio.Task[None]] = set()

    def record(self, ctx: RequestContext, trail: Trail, response: dict[str, Any] | None = None) -> None:
        ctx.freeze_overhead()
        answer = bodies = None
        if self.policy.request_log.store_bodies:
            answer = answer_of(ctx, response)  # once: the cache's insert below reuses it
            bodies = bodies_of(ctx, answer[0])
        record = RequestRecord.from_context(ctx, bodies)
        self.telemetry.metrics.observe(record)
        if self.sink is not None and not self.sink.submit(record):
            self.telemetry.metrics.request_log_dropped()
        if self.limiter is not None and ctx.backend is not None and self.limiter.tracks(ctx.tenant.name):
            task = asyncio.get_running_loop().create_task(
                self.limiter.charge(ctx.tenant.name, ctx.completion_tokens, ctx.cost_usd())
            )
            self._charges.add(task)
            task.add_done_callback(self._charges.discard)
        if self.entries is not None and trail.lookup is not None:
            store_answer(ctx, trail, self.entries, response, answer)
        if self.samples is not None and sampled(self.policy.router.sample_share):
            sample = route_sample_of(ctx, trail)
            if sample is not None:
                self.samples.submit(sample)
        if self.lengths is not None and self.policy.lengths.learn:
            length = length_sample_of(ctx, trail, response)
            if length is not None:
                self.lengths.submit(length)


def sampled(share: float) -> bool:
    """Keep this routed request as a route sample? (`router.sample_share` of them are kept.)"""
    return share >= 1.0 or random.random() < share


def route_sample_of(ctx: RequestContext, trail: Trail) -> RouteSample | None:
    """A routed request a backend answered: the prompt (PII scrubbed), who answered, how long."""
    routed = trail.target is not None and trail.target.routed
    if not routed or ctx.backend is None or ctx.status_code != 200:
        return None
    if ctx.route == "cache" or ctx.endpoint != "chat":
        return None
    text = trail.lookup.prompt_text if trail.lookup is not None else last_user_text(ctx.body["messages"])
    if not text.strip():
        return None
    return RouteSample(
        request_id=ctx.request_id,
        tenant_id=ctx.tenant.id,
        # Training data needs the question, not a megabyte of pasted context: bounded, so the scrub
        # (on the event loop) stays cheap.
        prompt_text=scrub_pii(text[:ROUTE_SAMPLE_MAX_CHARS]),
        tier=ctx.backend.tier,
        backend=ctx.backend.name,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        finish_reason=ctx.finish_reason,
    )


def length_sample_of(
    ctx: RequestContext, trail: Trail, response: dict[str, Any] | None
) -> LengthSample | None:
    """Any answer a backend gave (routed or named, streamed or not) as its backend's length sample: what
    the route stage read (the prompt's feature window, the token estimate, the lookup's embedding), the
    tokens and how the answer ended. None for what says nothing about length: errors, cache hits, several
    choices, tool calls, a stream that ended without a reason."""
    if ctx.backend is None or ctx.status_code != 200 or ctx.route == "cache":
        return None
    finish = ctx.finish_reason
    if response is not None:
        choices = response.get("choices") or []
        finish = choices[0].get("finish_reason") if len(choices) == 1 else None
    if not usable(finish) or ctx.completion_tokens <= 0:
        return None
    text = prompt_text(ctx.body, ctx.endpoint)
    if not text.strip():
        return None
    vector = trail.lookup.vector if trail.lookup is not None else None
    cap = ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens")
    return LengthSample(
        backend=ctx.backend.name,
        # The features read only the prompt's head and tail: that window is all a refit needs (bounded,
        # so the scrub on the event loop stays cheap).
        prompt_text=scrub_pii(feature_window(text)),
        prompt_tokens=ctx.prompt_estimate,
        embedding=None if vector is None else vector.astype("float32").tobytes(),
        completion_tokens=ctx.completion_tokens,
        finish_reason=finish,
        max_tokens=int(cap) if cap else None,
    )


def bodies_of(ctx: RequestContext, answer: str) -> RequestBodies:
    """The prompt (every message, one `role: text` line each) and the answer as the request log keeps
    them: each cut at BODY_MAX_CHARS before the PII scrub, so the scrub's cost on the event loop is
    bounded."""
    return RequestBodies(prompt=scrub_pii(_bounded(prompt_of(ctx))), answer=scrub_pii(_bounded(answer)))


def prompt_of(ctx: RequestContext) -> str:
    """The request's prompt as text, read no further than BODY_MAX_CHARS (a megabyte of pasted context
    costs no more than a page)."""
    if ctx.endpoint != "chat":
        prompt = ctx.body.get("prompt", "")
        return prompt if isinstance(prompt, str) else str(prompt)[: BODY_MAX_CHARS + 1]
    lines, size = [], 0
    for message in ctx.body.get("messages") or ():
        line = f"{message.get('role', '')}: {message_text(message.get('content'))}"
        lines.append(line)
        size += len(line) + 1
        if size > BODY_MAX_CHARS:
            break
    return "\n".join(lines)


def _bounded(text: str) -> str:
    return text if len(text) <= BODY_MAX_CHARS else text[:BODY_MAX_CHARS] + TRUNCATED


def store_answer(
    ctx: RequestContext,
    trail: Trail,
    entries: CacheEntries,
    response: dict[str, Any] | None,
    answer: tuple[str, str | None] | None = None,
) -> None:
    """Count what served or helped the request, and store a good new answer (`answer`: `answer_of`'s,
    when the caller has it already)."""
    lookup = trail.lookup
    assert lookup is not None
    served = [lookup.hit.entry.id] if lookup.hit is not None else []
    entries.note_usage(
        ctx.request_id, Usage(namespace=lookup.namespace, served=served, helped=list(trail.examples))
    )
    if ctx.status_code != 200 or ctx.route == "cache" or ctx.backend is None:
        return
    if not (lookup.store and lookup.storable):
        return
    if lookup.vector is None and not lookup.embed_after:
        return  # it went without its embedding (a busy embedder): not stored
    text, finish = answer if answer is not None else answer_of(ctx, response)
    # Never store truncated answers (finish_reason "length") or empty ones.
    if finish != "stop" or not text.strip():
        return
    # Entries live in memory on every replica: one tenant's megabyte prompts must not fill it.
    if len(lookup.prompt_text) + len(text) > entries.config.max_entry_chars:
        return
    # Identical requests waiting for this one (`CacheLookup.lead`) get the entry from the insert.
    lead, lookup.lead = lookup.lead, None
    entries.insert_later(
        ctx.request_id,
        NewEntry(
            namespace=lookup.namespace,
            exact_key=lookup.exact_key,
            context_fingerprint=lookup.fingerprint,
            embed_text=lookup.embed_text,
            prompt_text=lookup.prompt_text,
            response_text=text,
            response=response if response is not None else streamed_response(ctx, text, finish),
            backend=ctx.backend.name,
            tier=ctx.backend.tier,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            vector=lookup.vector,
        ),
        lead,
    )


def streamed_response(ctx: RequestContext, text: str, finish: str) -> dict[str, Any]:
    """A streamed answer as the chat completion a cache hit will replay."""
    assert ctx.backend is not None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_model(ctx.backend.model),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "total_tokens": ctx.prompt_tokens + ctx.completion_tokens,
        },
    }


def answer_of(ctx: RequestContext, response: dict[str, Any] | None) -> tuple[str, str | None]:
    if response is None:
        return "".join(ctx.output_parts), ctx.finish_reason
    choices = response.get("choices") or []
    if len(choices) != 1:
        return "", None
    message = choices[0].get("message") or {}
    if message.get("tool_calls"):
        return "", None
    return str(message.get("content") or ""), choices[0].get("finish_reason")
