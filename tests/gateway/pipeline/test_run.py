"""`Pipeline.run` in-process with the cache on: fake client, embedder and verifier, in-memory database."""

from __future__ import annotations

from typing import Any

import pytest

from icgate.gateway.config import Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.quotas import TenantLimiter
from icgate.gateway.records import Tenant
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store.cache_entries import CacheEntries
from icgate.lengths.predict import OutputLengthHeuristic
from icgate.routers.base import RouteDecision, RouteFeatures
from icgate.text import estimate_prompt_tokens
from tests.gateway.pipeline.fakes import (
    FakeClient,
    FakeEmbed,
    FakeVerifier,
    Harness,
    NewEntries,
    axis,
    chat_ctx,
    entry_for,
    harness,
    make_policy,
    remember,
    toward,
)

QUESTION = "What is the capital of Italy?"
REWORDED = "Which city is the capital of Italy?"
IDLE = {"small": 0, "large": 0}


async def with_cache(
    new_entries: NewEntries,
    policy: Policy | None = None,
    verifier: FakeVerifier | None = None,
    embed: FakeEmbed | None = None,
    **parts: Any,
) -> tuple[Harness, CacheEntries, FakeEmbed]:
    policy = policy or make_policy()
    entries = new_entries(policy, verifier)
    await entries.start()
    embed = embed or FakeEmbed({QUESTION: axis(0), REWORDED: toward(0, 0.95)})
    entries.embed_later = embed  # as the gateway wires it: a named request's answer is embedded on insert
    return harness(policy, entries=entries, embed=embed, **parts), entries, embed


async def answer_once(h: Harness, entries: CacheEntries, **body: Any) -> None:
    """A miss the small backend answers; its answer is then in the cache."""
    ctx = chat_ctx(QUESTION, **body)
    await h.pipeline.run(ctx)
    await entries.flush()
    assert ctx.route == "small" and len(entries.store.entries) == 1


async def test_a_repeated_request_is_answered_from_the_cache(new_entries: NewEntries) -> None:
    h, entries, embed = await with_cache(new_entries)
    await answer_once(h, entries)
    ctx = chat_ctx(QUESTION)
    result = await h.pipeline.run(ctx)

    assert h.client.backends == ["small"]  # the second never reached a backend
    assert result.response is not None
    assert result.response["id"] == f"chatcmpl-{ctx.request_id}"
    assert result.response["choices"][0]["message"]["content"] == "small says hi"
    assert (ctx.route, ctx.backend, ctx.prompt_tokens, ctx.completion_tokens) == ("cache", None, 7, 3)
    assert ctx.decisions["cache"]["hit"] == "exact" and "route" not in ctx.decisions
    assert result.headers()["x-icgate-route"] == "cache"
    assert [r.route for r in h.log.records] == ["small", "cache"]
    assert embed.calls == [(QUESTION, "anonymous")]  # only the miss was embedded
    [entry] = entries.store.entries.values()
    assert entry.hits == 1
    assert h.in_flight() == IDLE and h.metric("icgate_inflight_requests") == 0


async def test_a_cache_hit_streams_as_a_replay(new_entries: NewEntries) -> None:
    h, entries, _ = await with_cache(new_entries)
    await answer_once(h, entries)
    ctx = chat_ctx(QUESTION, stream=True)
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None and len(h.log.records) == 1  # recorded once the stream ends
    chunks = [chunk async for chunk in result.chunks]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == "small says hi"
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    [_, record] = h.log.records
    assert (record.route, record.stream, record.backend) == ("cache", True, None)
    assert h.client.backends == ["small"]


async def test_a_reworded_request_is_a_verified_semantic_hit(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(cosine_threshold=0.8, default=0.9)
    h, entries, _ = await with_cache(new_entries, verifier=verifier)
    await answer_once(h, entries)
    ctx = chat_ctx(REWORDED)
    result = await h.pipeline.run(ctx)
    assert ctx.route == "cache" and ctx.decisions["cache"]["hit"] == "semantic"
    assert result.headers()["x-icgate-similarity"] == "0.9500"
    assert verifier.calls == [[QUESTION]]
    assert h.client.backends == ["small"]


async def test_a_named_backend_is_not_served_a_lower_tiers_answer(new_entries: NewEntries) -> None:
    h, entries, _ = await with_cache(new_entries)
    await answer_once(h, entries)
    named = chat_ctx(QUESTION, model="large")
    await h.pipeline.run(named)
    assert (named.route, h.client.backends) == ("large", ["small", "large"])
    await entries.flush()
    # The better tier's answer replaced the small one's (embedded after the response, as a named request's
    # is): now routed requests get it.
    [entry] = entries.store.entries.values()
    assert entry.tier == "large" and entry.vector.tolist() == axis(0).tolist()
    again = chat_ctx(QUESTION, model="large")
    result = await h.pipeline.run(again)
    assert again.route == "cache" and result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "large says hi"


async def test_a_named_request_goes_through_unchanged_and_is_embedded_only_after_it(
    new_entries: NewEntries,
) -> None:
    """The default `cache.named_backends: exact`: no embedding, semantic hit or examples on the request's
    path; the answer is stored (embedded afterwards), and an identical request is an exact hit."""
    h, entries, embed = await with_cache(
        new_entries, verifier=FakeVerifier(cosine_threshold=0.8, default=1.0)
    )
    await answer_once(h, entries)  # a near-duplicate a routed request would be served
    embed.calls.clear()
    named = chat_ctx(REWORDED, model="small")
    await h.pipeline.run(named)
    assert named.route == "small" and embed.calls == []
    assert h.client.calls[-1][2]["messages"] == [{"role": "user", "content": REWORDED}]  # no examples
    await entries.flush()
    assert embed.calls == [(REWORDED, "anonymous")]
    again = chat_ctx(REWORDED, model="small")
    await h.pipeline.run(again)
    assert again.route == "cache" and again.decisions["cache"]["hit"] == "exact"


async def test_a_small_tier_request_gets_examples_and_counts_them(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(default=0.1)  # similar, but not the same question: no hit
    h, entries, _ = await with_cache(new_entries, verifier=verifier)
    related = entry_for(
        entries, chat_ctx("What is the capital of France?"), 1000, toward(0, 0.9), response_text="Paris."
    )
    remember(entries, related)
    ctx = chat_ctx(QUESTION)
    result = await h.pipeline.run(ctx)
    [(_, backend, body)] = h.client.calls
    assert backend == "small"
    assert body["messages"] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": QUESTION},
    ]
    assert ctx.decisions["examples"] == [1000] and result.headers()["x-icgate-examples"] == "1"
    assert related.helped == 1


async def test_a_large_tier_request_gets_no_examples(new_entries: NewEntries) -> None:
    long_question = "Explain " + "in detail " * 40 + "the capital of Italy."
    embed = FakeEmbed({long_question: axis(0)})  # close to the stored pair: a candidate example
    h, entries, _ = await with_cache(new_entries, verifier=FakeVerifier(default=0.1), embed=embed)
    remember(entries, entry_for(entries, chat_ctx("What is the capital of France?"), 1000, toward(0, 0.9)))
    ctx = chat_ctx(long_question)
    await h.pipeline.run(ctx)
    [(_, backend, body)] = h.client.calls
    assert backend == "large" and body is ctx.body
    assert ctx.decisions["examples"] == []


class Scorer:
    def __init__(self, score: float) -> None:
        self.score = score
        self.seen: list[RouteFeatures] = []

    def route(self, features: RouteFeatures) -> RouteDecision:
        self.seen.append(features)
        return RouteDecision("ignored", self.score, ())


async def test_the_router_gets_the_cache_stages_embedding_once(new_entries: NewEntries) -> None:
    scorer = Scorer(0.9)
    models = RouteModels(scorer, OutputLengthHeuristic(), threshold=0.5, router_needs_embedding=True)
    h, _, embed = await with_cache(new_entries, models=models)
    ctx = chat_ctx(QUESTION)
    await h.pipeline.run(ctx)
    assert embed.calls == [(QUESTION, "anonymous")]
    [seen] = scorer.seen
    assert seen.embedding is not None and seen.embedding.tolist() == axis(0).tolist()
    assert ctx.decisions["route"]["score"] == 0.9 and ctx.route == "small"


async def test_swap_models_takes_effect_on_the_next_request() -> None:
    h = harness()
    scorer = Scorer(0.0)
    swapped = RouteModels(scorer, OutputLengthHeuristic(), threshold=0.5, router_version="v2")
    h.pipeline.swap_models(swapped)
    assert h.pipeline.models is swapped
    ctx = chat_ctx(QUESTION)
    await h.pipeline.run(ctx)
    assert ctx.route == "large" and ctx.decisions["route"]["router"] == "v2"


async def test_a_tenant_over_its_rate_limit_is_refused_before_any_work() -> None:
    policy = make_policy(admission={"tenants": {"*": {"requests_per_min": 1}}})
    h = harness(policy, limiter=TenantLimiter(policy.admission))
    await h.pipeline.run(chat_ctx(QUESTION))
    ctx = chat_ctx(QUESTION)
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(ctx)
    assert (info.value.status_code, info.value.code) == (429, "rate_limit_exceeded")
    assert h.client.backends == ["small"]
    assert [r.status_code for r in h.log.records] == [200, 429]
    assert "route" not in ctx.decisions
    assert h.metric("icgate_admission_total", {"backend": "none", "outcome": "limited"}) == 1


async def test_an_unexpected_error_is_a_recorded_500_and_gives_the_slot_back() -> None:
    h = harness(client=FakeClient({"small": [RuntimeError("bug")]}))
    ctx = chat_ctx(QUESTION)
    with pytest.raises(RuntimeError):
        await h.pipeline.run(ctx)
    assert (ctx.status_code, ctx.error_type) == (500, "RuntimeError")
    assert [r.status_code for r in h.log.records] == [500]
    assert h.in_flight() == IDLE and h.metric("icgate_inflight_requests") == 0


async def test_a_stream_cut_before_its_usage_is_billed_for_what_was_sent() -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("one", " two", " three")]
    h = harness(client=FakeClient({"small": [chunks]}))
    ctx = chat_ctx(QUESTION, stream=True)
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None
    await anext(result.chunks)
    await anext(result.chunks)
    await result.chunks.aclose()  # the client left
    await result.chunks.aclose()  # and the server closes it again: harmless
    assert ctx.completion_tokens == 2  # one token per content chunk delivered
    assert ctx.prompt_tokens == estimate_prompt_tokens(ctx.body, "chat")
    assert h.in_flight() == IDLE and len(h.log.records) == 1


class Keys:
    def __init__(self, keys: dict[str, Tenant]) -> None:
        self.keys = keys

    async def authenticate(self, plaintext: str) -> Tenant | None:
        return self.keys.get(plaintext)


async def test_check_caller_authenticates_alone() -> None:
    alice = Tenant(id=3, name="alice")
    h = harness(make_policy(auth={"required": True}), authenticator=Keys({"icg-good": alice}))
    assert await h.pipeline.check_caller("icg-good") == alice
    with pytest.raises(GatewayError) as info:
        await h.pipeline.check_caller("icg-bad")
    assert info.value.status_code == 401
    assert h.log.records == [] and h.client.calls == []
