"""The augment stage on plain data: which retrieved pairs a backend sees as in-context examples."""

from __future__ import annotations

import copy
from typing import Any

from icgate.cache.examples import SYSTEM_BLOCK_HEADER
from icgate.gateway.config import BackendConfig
from icgate.gateway.pipeline.augment import Augmented, augment
from icgate.gateway.pipeline.cache_lookup import CacheLookup, plan_lookup
from icgate.gateway.records import RequestContext
from icgate.gateway.store.cache_entries import CacheEntries, Candidate
from tests.gateway.pipeline.fakes import (
    FakeClock,
    NewEntries,
    axis,
    chat_ctx,
    entry_for,
    make_policy,
    toward,
)

QUESTION = "What is the capital of Italy?"
SMALL = BackendConfig(name="small", tier="small", model="openai/s")
LARGE = BackendConfig(name="large", tier="large", model="openai/l")


def candidate(
    entries: CacheEntries, entry_id: int, similarity: float, question: str, answer: str, **kw: Any
) -> Candidate:
    vector = toward(0, similarity, other=entry_id)
    return Candidate(
        entry_for(entries, chat_ctx(question), entry_id, vector, response_text=answer, **kw), similarity
    )


def lookup_of(entries: CacheEntries, ctx: RequestContext, candidates: list[Candidate]) -> CacheLookup:
    lookup = plan_lookup(ctx, entries)
    assert lookup is not None
    lookup.vector, lookup.candidates = axis(0), candidates
    return lookup


def augmented(
    entries: CacheEntries,
    candidates: list[Candidate],
    backend: BackendConfig = SMALL,
    ctx: RequestContext | None = None,
    prompt_tokens: int = 10,
) -> Augmented:
    ctx = ctx or chat_ctx(QUESTION)
    return augment(ctx, lookup_of(entries, ctx, candidates), entries, backend, "small", prompt_tokens)


def france(entries: CacheEntries, **kw: Any) -> Candidate:
    return candidate(entries, 1, 0.9, "What is the capital of France?", "Paris.", **kw)


def spain(entries: CacheEntries, **kw: Any) -> Candidate:
    return candidate(entries, 2, 0.8, "What is the capital of Spain?", "Madrid.", **kw)


def test_a_small_tier_backend_gets_examples_before_the_question(new_entries: NewEntries) -> None:
    entries = new_entries()
    ctx = chat_ctx(QUESTION, messages=[{"role": "system", "content": "Be brief."}])
    original = copy.deepcopy(ctx.body)
    result = augmented(entries, [spain(entries), france(entries)], ctx=ctx)
    assert result.examples == [1, 2]  # best first
    # and as chosen, with the relevance and utility the explanation shows
    assert [(e.entry_id, e.similarity) for e in result.chosen] == [(1, 0.9), (2, 0.8)]
    assert result.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Spain?"},
        {"role": "assistant", "content": "Madrid."},
        {"role": "user", "content": "What is the capital of France?"},  # the best sits next to the question
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": QUESTION},
    ]
    assert {k: v for k, v in result.body.items() if k != "messages"} == {"model": "auto"}
    assert ctx.body == original  # the request itself is not changed


def test_other_tiers_get_the_request_unchanged(new_entries: NewEntries) -> None:
    entries = new_entries()
    ctx = chat_ctx(QUESTION)
    result = augmented(entries, [france(entries)], backend=LARGE, ctx=ctx)
    assert result.body is ctx.body and result.examples == []


def test_no_examples_without_the_cache_its_switch_candidates_or_a_chat(new_entries: NewEntries) -> None:
    entries = new_entries()
    ctx = chat_ctx(QUESTION)
    lookup = lookup_of(entries, ctx, [france(entries)])
    assert augment(ctx, None, entries, SMALL, "small", 10) == Augmented(ctx.body)
    assert augment(ctx, lookup, None, SMALL, "small", 10) == Augmented(ctx.body)
    assert augmented(entries, []).examples == []

    switched_off = new_entries(make_policy(cache={"examples": False}))
    assert augmented(switched_off, [france(switched_off)]).examples == []
    none_wanted = new_entries(make_policy(cache={"examples_k": 0}))
    assert augmented(none_wanted, [france(none_wanted)]).examples == []

    completions = RequestContext(endpoint="completions", body={"model": "auto", "prompt": QUESTION})
    assert augment(completions, lookup, entries, SMALL, "small", 10).body is completions.body


def test_examples_fit_the_backends_context_window(new_entries: NewEntries) -> None:
    entries = new_entries()
    essay = "word " * 800  # 1,000 estimated tokens
    long_pair = [candidate(entries, 1, 0.9, "Tell me about Rome.", essay)]
    # 2,048 tokens: a quarter kept for the answer, the prompt's 10, half of the rest for examples: 763
    narrow = BackendConfig(name="small", tier="small", model="m", context_window=2048)
    wide = BackendConfig(name="small", tier="small", model="m", context_window=4096)
    assert augmented(entries, long_pair, backend=narrow).examples == []
    assert augmented(entries, long_pair, backend=wide).examples == [1]
    # max_tokens takes its room from the window: (4096 - 10 - 3000) / 2 = 543 tokens left
    capped = chat_ctx(QUESTION, max_tokens=3000)
    assert augmented(entries, long_pair, backend=wide, ctx=capped).examples == []
    assert augmented(entries, long_pair, backend=wide, prompt_tokens=3000).examples == []


def test_expired_entries_are_never_shown(new_entries: NewEntries) -> None:
    clock = FakeClock()
    entries = new_entries(clock=clock)
    stale = france(entries, expires_at=clock.now + 5)
    fresh = spain(entries)
    assert augmented(entries, [stale, fresh]).examples == [1, 2]
    clock.advance(5)
    result = augmented(entries, [stale, fresh])
    assert result.examples == [2]
    assert "Paris." not in str(result.body["messages"])


def test_examples_below_the_minimum_similarity_are_left_out(new_entries: NewEntries) -> None:
    entries = new_entries(make_policy(cache={"examples_min_similarity": 0.85, "examples_k": 5}))
    assert augmented(entries, [france(entries), spain(entries)]).examples == [1]


def test_the_system_style_puts_examples_in_the_system_prompt(new_entries: NewEntries) -> None:
    entries = new_entries(make_policy(cache={"examples_style": "system"}))
    result = augmented(entries, [france(entries)])
    system, question = result.body["messages"]
    assert system["role"] == "system" and system["content"].startswith(SYSTEM_BLOCK_HEADER)
    assert "Q: What is the capital of France?\nA: Paris." in system["content"]
    assert question == {"role": "user", "content": QUESTION}
