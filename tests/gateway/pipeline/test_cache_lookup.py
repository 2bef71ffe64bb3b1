"""The cache stage on plain data: hand-made vectors, a fake embedder and verifier, no model."""

from __future__ import annotations

import time
from typing import Any

import pytest

from icgate.cache.embed import UnembeddableTextError
from icgate.gateway.config import TelemetryConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.cache_lookup import (
    BELOW_PREFILTER,
    NOT_ALLOWED,
    NOT_TOP,
    OTHER_CONTEXT,
    OUTPUT_LIMIT,
    TOO_LONG,
    VERIFIED_CANDIDATES,
    CacheLookup,
    hit_response,
    look_up,
    plan_lookup,
    replay_as_stream,
)
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext, Tenant
from icgate.gateway.store.cache_entries import CacheEntries, Hit, VerifierBusyError
from icgate.gateway.telemetry import Telemetry
from tests.gateway.pipeline.fakes import (
    FakeClock,
    FakeEmbed,
    FakeVerifier,
    NewEntries,
    Vector,
    axis,
    chat_ctx,
    entry_for,
    make_policy,
    remember,
    toward,
)

TRACING = Telemetry.from_config(TelemetryConfig()).tracing
ALICE = Tenant(id=3, name="alice")
BOB = Tenant(id=4, name="bob")
REQUEST = "How tall is Mount Everest?"
STORED = "What is the height of Mount Everest?"


async def lookup_of(
    entries: CacheEntries,
    ctx: RequestContext,
    min_tier: str | None = None,
    embed: FakeEmbed | None = None,
) -> CacheLookup:
    lookup = await look_up(ctx, target_of(min_tier), entries, embed or FakeEmbed({REQUEST: axis(0)}), TRACING)
    assert lookup is not None
    return lookup


def target_of(min_tier: str | None) -> Target:
    """A routed request (no tier floor), or one addressed to the backend of that tier by name."""
    if min_tier is None:
        return Target(routed=True)
    return Target(routed=False, backend=make_policy().backend(min_tier))


def store_similar(
    entries: CacheEntries,
    entry_id: int = 1,
    cosine: float = 0.95,
    text: str = STORED,
    other: int = 7,
    **kw: Any,
) -> None:
    """An answered request `cosine`-similar to REQUEST (whose vector is axis 0)."""
    ctx: RequestContext = kw.pop("ctx", None) or chat_ctx(text)
    remember(entries, entry_for(entries, ctx, entry_id, toward(0, cosine, other), **kw))


# --- plan_lookup: what the cache may do, before any work -----------------------------------------------


def test_plan_lookup_off_for_completions_and_when_the_cache_is_disabled(new_entries: NewEntries) -> None:
    completions = RequestContext(endpoint="completions", body={"model": "auto", "prompt": "hi"})
    assert plan_lookup(completions, new_entries()) is None
    assert plan_lookup(chat_ctx("hi"), new_entries(make_policy(cache={"enabled": False}))) is None


def test_plan_lookup_applies_model_then_tenant_switches(new_entries: NewEntries) -> None:
    cache = {
        "semantic": False,
        "models": {"auto": {"examples": False}},
        "tenants": {"bob": {"enabled": False}, "alice": {"semantic": True}},
    }
    entries = new_entries(make_policy(cache=cache))
    assert plan_lookup(chat_ctx("hi", BOB), entries) is None
    anonymous = plan_lookup(chat_ctx("hi"), entries)
    assert anonymous is not None
    assert (anonymous.exact, anonymous.semantic, anonymous.examples, anonymous.store) == (
        True,
        False,
        False,
        True,
    )
    alice = plan_lookup(chat_ctx("hi", ALICE), entries)
    assert alice is not None and (alice.semantic, alice.examples) == (True, False)
    named = plan_lookup(chat_ctx("hi", model="small"), entries, named=True)  # the override is for `auto`
    assert named is not None and (named.semantic, named.examples) == (False, False)  # `named_backends`


def test_plan_lookup_named_backends_exact_by_default_full_on_request(new_entries: NewEntries) -> None:
    """A request naming a backend gets exact hits only and an unchanged prompt, its vector made after the
    response; `named_backends: full` or the backend's own switches give it the routed path."""
    ctx = chat_ctx("hi", model="small")
    default = plan_lookup(ctx, new_entries(), named=True)
    assert default is not None
    assert (default.exact, default.semantic, default.examples, default.store) == (True, False, False, True)
    assert default.embed_after is True
    routed = plan_lookup(chat_ctx("hi"), new_entries())
    assert routed is not None and (routed.semantic, routed.examples, routed.embed_after) == (
        True,
        True,
        False,
    )
    for cache in ({"named_backends": "full"}, {"models": {"small": {"semantic": True}}}):
        full = plan_lookup(ctx, new_entries(make_policy(cache=cache)), named=True)
        assert full is not None and (full.semantic, full.embed_after) == (True, False)


@pytest.mark.parametrize(
    ("extra", "reusable"),
    [
        ({}, True),
        ({"temperature": 0}, True),
        ({"temperature": 0.7}, False),
        ({"n": 2}, False),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, False),
        ({"logprobs": True}, False),
    ],
)
def test_plan_lookup_reuses_only_deterministic_text_requests(
    new_entries: NewEntries, extra: dict[str, Any], reusable: bool
) -> None:
    lookup = plan_lookup(chat_ctx("What is 2+2?", **extra), new_entries())
    assert lookup is not None
    assert (lookup.servable, lookup.storable) == (reusable, reusable)


def test_plan_lookup_reuses_sampled_requests_when_the_policy_allows(new_entries: NewEntries) -> None:
    lookup = plan_lookup(
        chat_ctx("hi", temperature=0.7), new_entries(make_policy(cache={"allow_sampled": True}))
    )
    assert lookup is not None and lookup.servable and lookup.storable


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_plan_lookup_text_less_request_is_neither_served_nor_stored(
    new_entries: NewEntries, text: str
) -> None:
    lookup = plan_lookup(chat_ctx(text), new_entries())
    assert lookup is not None and not lookup.servable and not lookup.storable


def test_plan_lookup_namespace_per_tenant_and_fingerprint_per_context(new_entries: NewEntries) -> None:
    entries = new_entries()

    def planned(ctx: RequestContext) -> CacheLookup:
        lookup = plan_lookup(ctx, entries)
        assert lookup is not None
        return lookup

    plain = planned(chat_ctx(REQUEST))
    assert plain.namespace == "anonymous" and planned(chat_ctx(REQUEST, ALICE)).namespace == "tenant:3"
    assert (plain.prompt_text, plain.embed_text) == (REQUEST, REQUEST)
    french = planned(chat_ctx(REQUEST, messages=[{"role": "system", "content": "Answer in French."}]))
    json_out = planned(chat_ctx(REQUEST, response_format={"type": "json_object"}))
    capped = planned(chat_ctx(REQUEST, max_tokens=9))
    assert len({plain.fingerprint, french.fingerprint, json_out.fingerprint}) == 3
    assert capped.fingerprint == plain.fingerprint  # output limits are checked on the answer instead
    assert capped.exact_key != plain.exact_key


# --- exact hits ------------------------------------------------------------------------------------------


async def test_exact_hit_is_answered_without_embedding(new_entries: NewEntries) -> None:
    entries, embed = new_entries(), FakeEmbed()
    remember(entries, entry_for(entries, chat_ctx("What is 2+2?"), 7, axis(0)))
    lookup = await lookup_of(entries, chat_ctx("  What  is 2+2?\n"), embed=embed)  # whitespace differs
    assert lookup.hit is not None
    assert (lookup.hit.kind, lookup.hit.entry.id, lookup.hit.similarity, lookup.hit.verifier_score) == (
        "exact",
        7,
        1.0,
        1.0,
    )
    assert embed.calls == []
    assert lookup.vector is None and lookup.candidates == []


async def test_exact_hit_stays_in_the_tenants_namespace(new_entries: NewEntries) -> None:
    entries = new_entries(verifier=FakeVerifier(default=1.0))
    remember(entries, entry_for(entries, chat_ctx(REQUEST, ALICE), 1, axis(0)))
    assert (await lookup_of(entries, chat_ctx(REQUEST, ALICE))).hit is not None
    for other in (BOB, chat_ctx(REQUEST).tenant):
        lookup = await lookup_of(entries, chat_ctx(REQUEST, other))
        assert lookup.hit is None and lookup.candidates == []  # not even a semantic candidate


async def test_exact_hit_needs_its_switch(new_entries: NewEntries) -> None:
    entries = new_entries(make_policy(cache={"exact": False, "semantic": False}))
    remember(entries, entry_for(entries, chat_ctx(REQUEST), 1, axis(0)))
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None and [c.entry.id for c in lookup.candidates] == [1]


async def test_a_sampled_request_is_never_served_even_with_its_own_key(new_entries: NewEntries) -> None:
    entries = new_entries(verifier=FakeVerifier(default=1.0))
    sampled = chat_ctx(REQUEST, temperature=0.7)
    remember(entries, entry_for(entries, sampled, 1, axis(0)))
    assert (await lookup_of(entries, chat_ctx(REQUEST, temperature=0.7))).hit is None


async def test_an_expired_entry_serves_no_hit(new_entries: NewEntries) -> None:
    clock = FakeClock()
    entries = new_entries(clock=clock, verifier=FakeVerifier(default=1.0))
    remember(entries, entry_for(entries, chat_ctx(REQUEST), 1, axis(0), expires_at=clock.now + 10))
    store_similar(entries, 2, expires_at=clock.now + 10)
    assert (await lookup_of(entries, chat_ctx(REQUEST))).hit is not None
    assert (await lookup_of(entries, chat_ctx("How tall is Mount Everest? "))).hit is not None
    clock.advance(10)
    expired = await lookup_of(entries, chat_ctx(REQUEST))
    assert expired.hit is None and len(expired.candidates) == 2  # still retrieved, never served


TIER_FLOOR = [
    ("large", None, True),
    ("small", None, True),
    ("large", "small", True),
    ("large", "large", True),
    ("small", "small", True),
    ("small", "large", False),
]


@pytest.mark.parametrize(("entry_tier", "min_tier", "served"), TIER_FLOOR)
async def test_exact_hit_for_a_named_backend_only_from_its_tier_or_better(
    new_entries: NewEntries, entry_tier: str, min_tier: str | None, served: bool
) -> None:
    entries = new_entries(make_policy(cache={"semantic": False}))
    remember(entries, entry_for(entries, chat_ctx(REQUEST), 1, axis(0), tier=entry_tier))
    lookup = await lookup_of(entries, chat_ctx(REQUEST), min_tier)
    assert (lookup.hit is not None) is served


@pytest.mark.parametrize(("entry_tier", "min_tier", "served"), TIER_FLOOR)
async def test_semantic_hit_for_a_named_backend_only_from_its_tier_or_better(
    new_entries: NewEntries, entry_tier: str, min_tier: str | None, served: bool
) -> None:
    verifier = FakeVerifier(default=1.0)
    entries = new_entries(make_policy(cache={"named_backends": "full"}), verifier=verifier)
    store_similar(entries, tier=entry_tier)
    lookup = await lookup_of(entries, chat_ctx(REQUEST), min_tier)
    assert (lookup.hit is not None) is served
    assert len(verifier.calls) == int(served)  # a too-low tier never reaches the verifier
    assert lookup.passed_over == ({} if served else {1: NOT_ALLOWED})  # and the explanation says why


# --- semantic hits ---------------------------------------------------------------------------------------


async def test_semantic_hit_same_context_and_the_verifier_agrees(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(scores={STORED: 0.93})
    entries, embed = new_entries(verifier=verifier), FakeEmbed({REQUEST: axis(0)})
    store_similar(entries, 4, cosine=0.95)
    lookup = await lookup_of(entries, chat_ctx(REQUEST, BOB), embed=embed)
    assert lookup.hit is None  # another tenant's namespace: nothing there
    lookup = await lookup_of(entries, chat_ctx(REQUEST), embed=embed)
    hit = lookup.hit
    assert hit is not None and (hit.kind, hit.entry.id) == ("semantic", 4)
    assert hit.similarity == pytest.approx(0.95, abs=1e-5)
    assert hit.verifier_score == pytest.approx(0.93)
    assert lookup.best_similarity == pytest.approx(0.95, abs=1e-5)
    assert verifier.calls == [[STORED]] and verifier.requests == [[REQUEST]]
    assert embed.calls == [(REQUEST, "tenant:4"), (REQUEST, "anonymous")]  # embedded in the tenant's scope


async def test_no_semantic_hit_when_the_verifier_disagrees(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(probability_threshold=0.5, scores={STORED: 0.49})
    entries = new_entries(verifier=verifier)
    store_similar(entries)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None
    assert [c.entry.id for c in lookup.candidates] == [1] and verifier.calls == [[STORED]]
    # kept for the explanation: the score it got, and the threshold it was held to
    assert lookup.scores == {1: pytest.approx(0.49)}
    assert (lookup.threshold, lookup.passed_over) == (0.5, {})


async def test_no_semantic_hit_below_the_cosine_prefilter(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(cosine_threshold=0.8, default=1.0)
    entries = new_entries(verifier=verifier)
    store_similar(entries, cosine=0.79)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None and verifier.calls == []
    assert (lookup.passed_over, lookup.prefilter, lookup.scores) == ({1: BELOW_PREFILTER}, 0.8, {})


@pytest.mark.parametrize(
    "stored_context",
    [
        {"messages": [{"role": "system", "content": "Answer in French."}]},
        {"response_format": {"type": "json_object"}},
        {"stop": ["\n"]},
    ],
)
async def test_no_semantic_hit_across_contexts_or_output_constraints(
    new_entries: NewEntries, stored_context: dict[str, Any]
) -> None:
    verifier = FakeVerifier(default=1.0)
    entries = new_entries(verifier=verifier)
    store_similar(entries, cosine=0.99, ctx=chat_ctx(STORED, **stored_context))
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None and verifier.calls == []
    assert len(lookup.candidates) == 1  # similar, and still an example candidate
    assert lookup.passed_over == {1: OTHER_CONTEXT}


async def test_semantic_hit_in_the_same_conversation_context(new_entries: NewEntries) -> None:
    system = [{"role": "system", "content": "Answer in French."}]
    entries = new_entries(verifier=FakeVerifier(default=1.0))
    store_similar(entries, ctx=chat_ctx(STORED, messages=system))
    ctx = chat_ctx(REQUEST, messages=system)
    lookup = plan_lookup(ctx, entries)
    assert lookup is not None
    hit = (await lookup_of(entries, ctx, embed=FakeEmbed({lookup.embed_text: axis(0)}))).hit
    assert hit is not None and hit.kind == "semantic"


@pytest.mark.parametrize(
    ("limit", "served"),
    [
        ({}, True),
        ({"max_tokens": 5}, True),
        ({"max_tokens": 4}, False),
        ({"max_completion_tokens": 4}, False),
    ],
)
async def test_semantic_hit_only_for_an_answer_the_request_would_have_let_finish(
    new_entries: NewEntries, limit: dict[str, Any], served: bool
) -> None:
    entries = new_entries(verifier=FakeVerifier(default=1.0))
    store_similar(entries, completion_tokens=5)
    lookup = await lookup_of(entries, chat_ctx(REQUEST, **limit))
    assert (lookup.hit is not None) is served
    assert lookup.passed_over == ({} if served else {1: OUTPUT_LIMIT})


async def test_semantic_hit_length_caps(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(default=1.0)
    entries = new_entries(make_policy(cache={"semantic_max_chars": 40}), verifier=verifier)
    assert entries.semantic_max_chars == 40
    long_stored = "What is the height of Mount Everest in metres, please?"
    assert len(STORED) <= 40 < len(long_stored)
    store_similar(entries, 1, cosine=0.99, text=long_stored, other=1)
    store_similar(entries, 2, cosine=0.90, text=STORED, other=2)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is not None and lookup.hit.entry.id == 2  # the longer, closer one is never verified
    assert verifier.calls == [[STORED]]
    assert (lookup.passed_over, lookup.scores, lookup.no_semantic) == ({1: TOO_LONG}, {2: 1.0}, None)

    long_request = "How tall is Mount Everest, the highest mountain?"
    embed = FakeEmbed({long_request: axis(0)})
    lookup = await lookup_of(entries, chat_ctx(long_request), embed=embed)
    assert lookup.hit is None and len(lookup.candidates) == 2 and len(verifier.calls) == 1
    assert lookup.no_semantic == TOO_LONG and lookup.passed_over == {}  # the request itself is too long


async def test_only_the_most_similar_candidates_are_verified(new_entries: NewEntries) -> None:
    texts = ["q1", "q2", "q3", "q4", "q5"]
    # q4 and q5 would pass, but they are not among the three most similar.
    verifier = FakeVerifier(scores={"q1": 0.6, "q2": 0.8, "q3": 0.1, "q4": 1.0, "q5": 1.0})
    entries = new_entries(verifier=verifier)
    for i, (text, cosine) in enumerate(zip(texts, [0.99, 0.97, 0.95, 0.93, 0.91], strict=True), start=1):
        store_similar(entries, i, cosine=cosine, text=text, other=i)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert VERIFIED_CANDIDATES == 3
    assert verifier.calls == [["q1", "q2", "q3"]]
    assert verifier.shapes == [((3, 8), (3, 8))]
    hit = lookup.hit
    assert hit is not None and hit.entry.id == 2 and hit.verifier_score == pytest.approx(0.8)
    assert hit.similarity == pytest.approx(0.97, abs=1e-5)
    assert lookup.scores == pytest.approx({1: 0.6, 2: 0.8, 3: 0.1})
    assert lookup.passed_over == {4: NOT_TOP, 5: NOT_TOP}


async def test_semantic_switch_off_still_retrieves_for_examples_and_store(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(default=1.0)
    entries = new_entries(make_policy(cache={"semantic": False}), verifier=verifier)
    store_similar(entries)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None and len(lookup.candidates) == 1 and verifier.calls == []
    assert lookup.vector is not None


async def test_a_busy_embedder_skips_the_semantic_cache_but_not_an_exact_hit(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(default=1.0)
    entries, embed = new_entries(verifier=verifier), FakeEmbed(busy=True)
    store_similar(entries)
    lookup = await lookup_of(entries, chat_ctx(REQUEST), embed=embed)
    assert embed.calls  # it was asked, and turned the text away
    assert lookup.skipped == "embedder-busy"
    assert lookup.hit is None and lookup.vector is None and lookup.candidates == [] and verifier.calls == []
    remember(entries, entry_for(entries, chat_ctx("What is 2+2?"), 7, axis(0)))
    exact = await lookup_of(entries, chat_ctx("What is 2+2?"), embed=embed)
    assert exact.hit is not None and exact.hit.kind == "exact" and exact.skipped is None


async def test_nothing_is_embedded_when_no_switch_needs_a_vector(new_entries: NewEntries) -> None:
    entries = new_entries(make_policy(cache={"semantic": False, "examples": False, "store": False}))
    embed = FakeEmbed()
    lookup = await lookup_of(entries, chat_ctx(REQUEST), embed=embed)
    assert embed.calls == [] and lookup.vector is None and lookup.hit is None


@pytest.mark.parametrize("text", ["", "   "])
async def test_empty_text_never_matches(new_entries: NewEntries, text: str) -> None:
    verifier = FakeVerifier(cosine_threshold=0.0, default=1.0)
    entries = new_entries(verifier=verifier)
    same = axis(0)
    # An entry under the very same exact key and vector, and another empty-text entry: neither serves.
    remember(entries, entry_for(entries, chat_ctx(text), 1, same))
    remember(entries, entry_for(entries, chat_ctx(" " * 3 if text == "" else ""), 2, same))
    lookup = await lookup_of(entries, chat_ctx(text), embed=FakeEmbed(default=same))
    assert lookup.hit is None and verifier.calls == []


async def test_unembeddable_text_is_the_senders_400(new_entries: NewEntries) -> None:
    class Refusing(FakeEmbed):
        async def __call__(self, text: str, scope: str = "") -> Vector:
            raise UnembeddableTextError("lone surrogate")

    with pytest.raises(GatewayError) as info:
        await lookup_of(new_entries(), chat_ctx(REQUEST), embed=Refusing())
    assert (info.value.status_code, info.value.param) == (400, "messages")
    assert "lone surrogate" in info.value.message


async def test_look_up_is_none_when_the_cache_is_off(new_entries: NewEntries) -> None:
    entries, embed = new_entries(make_policy(cache={"enabled": False})), FakeEmbed()
    assert await look_up(chat_ctx(REQUEST), target_of(None), entries, embed, TRACING) is None
    assert embed.calls == []


# --- answering a hit -------------------------------------------------------------------------------------


def a_hit(entries: CacheEntries, text: str = "It is 8,849 metres tall.") -> Hit:
    return Hit(entry_for(entries, chat_ctx(STORED), 1, axis(0), response_text=text), 0.97, "semantic", 0.9)


def test_hit_response_is_a_fresh_completion_for_this_request(new_entries: NewEntries) -> None:
    ctx = chat_ctx(REQUEST)
    before = int(time.time())
    response = hit_response(ctx, a_hit(new_entries()))
    assert response["id"] == f"chatcmpl-{ctx.request_id}"
    assert response["object"] == "chat.completion" and response["created"] >= before
    assert response["model"] == "l"  # the served name, not litellm's `openai/l`
    assert response["choices"][0]["message"]["content"] == "It is 8,849 metres tall."
    assert response["usage"]["completion_tokens"] == 5


async def test_replay_as_stream_sends_words_then_stop_then_usage_when_asked(new_entries: NewEntries) -> None:
    hit = a_hit(new_entries(), "It is tall.")
    for include_usage, expected_tail in ((True, 1), (False, 0)):
        ctx = chat_ctx(REQUEST, stream=True, stream_options={"include_usage": include_usage})
        response = hit_response(ctx, hit)
        chunks = [chunk async for chunk in replay_as_stream(ctx, response)]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content", "") for d in deltas) == "It is tall."
        assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
        assert {c["id"] for c in chunks} == {response["id"]}
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        usage = [c["usage"] for c in chunks if not c["choices"]]
        assert len(usage) == expected_tail
        if usage:
            assert usage[0]["completion_tokens"] == 5


async def test_a_named_request_is_not_embedded_on_its_path_but_gets_exact_hits(
    new_entries: NewEntries,
) -> None:
    verifier = FakeVerifier(default=1.0)
    entries, embed = new_entries(verifier=verifier), FakeEmbed({REQUEST: axis(0)})
    store_similar(entries, tier="large")  # a near-duplicate a routed request would be served
    named = chat_ctx(REQUEST, model="small")
    lookup = await lookup_of(entries, named, "small", embed=embed)
    assert lookup.hit is None and lookup.vector is None and lookup.embed_after
    assert embed.calls == [] and verifier.calls == []
    remember(entries, entry_for(entries, chat_ctx("What is 2+2?", model="small"), 7, axis(0)))
    exact = await lookup_of(entries, chat_ctx("What is 2+2?", model="small"), "small", embed=embed)
    assert exact.hit is not None and exact.hit.kind == "exact" and embed.calls == []


async def test_a_busy_verifier_skips_the_semantic_hit_but_keeps_the_rest(
    new_entries: NewEntries, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = new_entries(verifier=FakeVerifier(default=1.0))
    store_similar(entries)

    async def busy(*_: Any) -> Any:
        raise VerifierBusyError("3 pairs ahead of this request's")

    monkeypatch.setattr(entries, "verify", busy)
    lookup = await lookup_of(entries, chat_ctx(REQUEST))
    assert lookup.hit is None and lookup.skipped == "verifier-busy"
    assert lookup.vector is not None and [c.entry.id for c in lookup.candidates] == [1]  # examples, route
