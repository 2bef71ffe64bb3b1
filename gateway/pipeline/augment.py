"""Stage 7 (per backend attempt), augment: the request as a small-tier backend gets it, with the most
useful retrieved pairs prepended as in-context examples. Other tiers get the request unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from icgate.cache.examples import Example, augment_messages, choose_examples, example_budget
from icgate.gateway.config import BackendConfig
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.records import RequestContext
from icgate.gateway.store.cache_entries import CacheEntries
from icgate.text import estimate_tokens


@dataclass(frozen=True)
class Augmented:
    body: dict[str, Any]
    examples: list[int] = field(default_factory=list)  # ids of the cache entries prepended
    chosen: Sequence[Example] = ()  # those entries as chosen (relevance, utility), for the explanation


def augment(
    ctx: RequestContext,
    lookup: CacheLookup | None,
    entries: CacheEntries | None,
    backend: BackendConfig,
    small_tier: str,
    prompt_tokens: int,
) -> Augmented:
    """The body for `backend`: with in-context examples when it is a small-tier backend."""
    if entries is None or lookup is None:
        return Augmented(ctx.body)
    if not (lookup.examples and lookup.candidates) or backend.tier != small_tier or ctx.endpoint != "chat":
        return Augmented(ctx.body)
    messages, chosen = with_examples(
        entries,
        ctx.body["messages"],
        lookup,
        backend.context_window,
        prompt_tokens,
        ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens"),
    )
    if not chosen:
        return Augmented(ctx.body)
    return Augmented({**ctx.body, "messages": messages}, [e.entry_id for e in chosen], chosen)


def with_examples(
    entries: CacheEntries,
    messages: list[dict[str, Any]],
    lookup: CacheLookup,
    context_window: int,
    prompt_tokens: int,
    max_tokens: int | None,
) -> tuple[list[dict[str, Any]], list[Example]]:
    """Messages with the most useful similar pairs prepended (within the context window's share for
    examples), and those pairs."""
    config = entries.config
    if config.examples_k == 0 or not lookup.candidates:
        return messages, []
    now = entries.clock()
    pool = [
        Example(
            entry_id=c.entry.id,
            prompt=c.entry.prompt_text,
            response=c.entry.response_text,
            similarity=c.similarity,
            utility=c.entry.utility,
            tier=c.entry.tier,
            tokens=estimate_tokens(c.entry.prompt_text) + estimate_tokens(c.entry.response_text),
            vector=c.entry.vector,
        )
        for c in lookup.candidates
        if not c.entry.expired(now)
    ]
    budget = example_budget(context_window, prompt_tokens, max_tokens, config.examples_share)
    chosen = choose_examples(pool, config.examples_k, budget, min_similarity=config.examples_min_similarity)
    if not chosen:
        return messages, []
    return augment_messages(messages, chosen, config.examples_style), chosen
