"""The pipeline's cache stages: exact lookup, embed, retrieve, semantic hit, augment, store.

Each is a small function over the request context and the cache service; the
pipeline calls them in order (see `gateway.pipeline`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Protocol

import numpy as np

from cache.embed import UnembeddableTextError, context_fingerprint, conversation_text, message_text
from cache.exact import cacheability, exact_key, fits_output_limit, output_constraints_key
from gateway.backends import openai_response, served_model
from gateway.cache_service import CacheLookup, CacheService, Hit, NewEntry, Usage, namespace_for
from gateway.config import BackendConfig
from gateway.context import RequestContext
from gateway.errors import GatewayError


class Embed(Protocol):
    """The request embedding (`MicroBatcher.embed`); `scope` is the tenant's cache namespace, so that
    neither its memo nor a shared in-flight encode answers one tenant faster for another's text."""

    def __call__(self, text: str, scope: str = "") -> Awaitable[np.ndarray]: ...


async def embed_request(embed: Embed, text: str, scope: str) -> np.ndarray:
    """`embed`, with a text the embedder cannot read reported to its sender as a bad request (400)."""
    try:
        return await embed(text, scope=scope)
    except UnembeddableTextError as exc:
        raise GatewayError(400, f"Invalid message content: {exc}", param="messages") from None


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def plan_lookup(ctx: RequestContext, cache: CacheService, min_tier: str | None) -> CacheLookup | None:
    """What the cache may do for this request (policy switches, sampling, tools), before any work."""
    if ctx.endpoint != "chat":
        return None
    switches = cache.config.switches(ctx.tenant.name, ctx.model)
    if not switches.enabled:
        return None
    messages = ctx.body["messages"]
    allowed = cacheability(ctx.body, cache.config.allow_sampled)
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
    )


def semantic_scope(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """What a semantic hit must share with the request besides meaning: the same context (every message
    but the last user turn) and the same output constraints (response_format, stop, seed, tools, ...)."""
    context = context_fingerprint(messages)
    constraints = output_constraints_key(body)
    return f"{context}|{constraints}" if constraints else context


def look_up_exact(lookup: CacheLookup, cache: CacheService, min_tier: str | None) -> Hit | None:
    if not (lookup.exact and lookup.servable):
        return None
    return cache.lookup_exact(lookup.namespace, lookup.exact_key, min_tier)


async def embed_and_retrieve(lookup: CacheLookup, cache: CacheService, embed: Embed) -> None:
    """One embedding per request, reused by the semantic hit, the examples, the router and the insert."""
    if not (lookup.semantic or lookup.examples or lookup.store):
        return
    lookup.vector = await embed_request(embed, lookup.embed_text, lookup.namespace)
    lookup.candidates = await cache.retrieve(lookup.namespace, lookup.vector, cache.config.top_k)


async def look_up_semantic(
    lookup: CacheLookup, cache: CacheService, min_tier: str | None, body: dict[str, Any]
) -> Hit | None:
    if not (lookup.semantic and lookup.servable) or lookup.vector is None:
        return None
    # Only answers the request would have let finish (a 9-token answer never serves max_tokens 2).
    fitting = [c for c in lookup.candidates if fits_output_limit(c.entry.completion_tokens, body)]
    return await cache.semantic_hit(lookup.prompt_text, lookup.fingerprint, lookup.vector, fitting, min_tier)


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


def augment(
    ctx: RequestContext, cache: CacheService, backend: BackendConfig, prompt_tokens: int, small_tier: str
) -> dict[str, Any]:
    """The body for `backend`: with in-context examples when it is a small-tier backend."""
    lookup = ctx.cache
    lookup_ok = lookup is not None and lookup.examples and lookup.candidates
    if not lookup_ok or backend.tier != small_tier or ctx.endpoint != "chat":
        if lookup is not None:
            lookup.examples_used = []
        ctx.decisions["examples"] = []
        return ctx.body
    assert lookup is not None
    messages, used = cache.examples(
        ctx.body["messages"],
        lookup.candidates,
        backend.context_window,
        prompt_tokens,
        ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens"),
    )
    lookup.examples_used = used
    ctx.decisions["examples"] = used
    return {**ctx.body, "messages": messages} if used else ctx.body


def store_answer(ctx: RequestContext, cache: CacheService, response: dict[str, Any] | None) -> None:
    """After the response: count what served or helped it, and store a good new answer."""
    lookup = ctx.cache
    if lookup is None:
        return
    usage = Usage(
        namespace=lookup.namespace,
        served=[lookup.served_by] if lookup.served_by else [],
        helped=list(lookup.examples_used),
    )
    cache.note_usage(ctx.request_id, usage)
    if ctx.status_code != 200 or ctx.route == "cache" or ctx.backend is None:
        return
    if not (lookup.store and lookup.storable) or lookup.vector is None:
        return
    text, finish = answer_of(ctx, response)
    # Never store truncated answers (finish_reason "length") or empty ones.
    if finish != "stop" or not text.strip():
        return
    # Entries live in memory on every replica: one tenant's megabyte prompts must not fill it.
    if len(lookup.prompt_text) + len(text) > cache.config.max_entry_chars:
        return
    stored = (
        response
        if response is not None
        else {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_model(ctx.backend.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": ctx.prompt_tokens,
                "completion_tokens": ctx.completion_tokens,
                "total_tokens": ctx.prompt_tokens + ctx.completion_tokens,
            },
        }
    )
    cache.insert_later(
        ctx.request_id,
        NewEntry(
            namespace=lookup.namespace,
            exact_key=lookup.exact_key,
            context_fingerprint=lookup.fingerprint,
            embed_text=lookup.embed_text,
            prompt_text=lookup.prompt_text,
            response_text=text,
            response=stored,
            backend=ctx.backend.name,
            tier=ctx.backend.tier,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            vector=lookup.vector,
        ),
    )


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
