"""Identical requests in flight at once share one backend call (`cache.coalesce`), and never more than that:
a follower goes on alone whenever the leader has no answer for it."""

from __future__ import annotations

import asyncio
from typing import Any

from icgate.gateway.config import BackendConfig
from icgate.gateway.pipeline.run import PipelineResult
from icgate.gateway.records import RequestContext, Tenant
from icgate.gateway.store.cache_entries import CacheEntries
from tests.gateway.pipeline.fakes import (
    HANG,
    FakeClient,
    FakeEmbed,
    Harness,
    NewEntries,
    axis,
    chat_ctx,
    make_policy,
    reply,
)
from tests.gateway.pipeline.test_run import IDLE, QUESTION, with_cache

ALICE = Tenant(id=3, name="alice")
BOB = Tenant(id=4, name="bob")


class GatedClient(FakeClient):
    """FakeClient whose first call waits for `gate`: the other requests arrive while it is in flight."""

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        super().__init__(script)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def _outcome(self, kind: str, backend: BackendConfig, body: dict[str, Any]) -> Any:
        if not self.calls:
            self.entered.set()
            self.calls.append((kind, backend.name, body))
            await self.gate.wait()
            queue = self.script.get(backend.name)
            outcome = queue.pop(0) if queue else None
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return await super()._outcome(kind, backend, body)


async def together(
    h: Harness, client: GatedClient, first: RequestContext, *others: RequestContext, hold_s: float = 0.0
) -> list[PipelineResult | BaseException]:
    """`first` reaches the backend and waits there; `others` start meanwhile; then, `hold_s` later, the
    gate opens. Each runs as its context's tenant (as an in-process client wrapped for one tenant would)."""
    leader = asyncio.create_task(h.pipeline.run(first, tenant=first.tenant))
    await client.entered.wait()
    followers = [asyncio.create_task(h.pipeline.run(ctx, tenant=ctx.tenant)) for ctx in others]
    for _ in range(20):  # let the others reach the cache stage and wait there
        await asyncio.sleep(0)
    await asyncio.sleep(hold_s)
    client.gate.set()
    return list(await asyncio.gather(leader, *followers, return_exceptions=True))


async def settled(entries: CacheEntries) -> None:
    await entries.flush()
    assert len(entries.in_flight) == 0  # no leader is left registered


async def test_identical_requests_in_flight_share_one_backend_call(new_entries: NewEntries) -> None:
    client = GatedClient()
    h, entries, embed = await with_cache(new_entries, client=client)
    first, second, third = chat_ctx(QUESTION), chat_ctx(QUESTION), chat_ctx(QUESTION, stream=True)
    results = await together(h, client, first, second, third, hold_s=0.2)

    assert client.backends == ["small"]  # one call for all three
    assert embed.calls == [(QUESTION, "anonymous")]  # the followers were not embedded either
    assert first.route == "small" and "shared" not in first.decisions["cache"]
    for ctx in (second, third):
        assert ctx.route == "cache" and ctx.backend is None
        assert ctx.decisions["cache"]["hit"] == "exact" and ctx.decisions["cache"]["shared"] is True
        assert ctx.decisions["cache"]["entry"] is None  # the answer was not written yet
        assert (ctx.prompt_tokens, ctx.completion_tokens) == (7, 3)  # billed as the hit it is
        assert ctx.backend_s >= 0.2  # the wait for the leader's backend call is not the gateway's own work
    lead, shared, streamed = results
    assert isinstance(lead, PipelineResult) and isinstance(shared, PipelineResult)
    assert isinstance(streamed, PipelineResult)
    assert shared.response is not None and lead.response is not None
    assert shared.response["choices"][0]["message"]["content"] == "small says hi"
    assert shared.response["id"] == f"chatcmpl-{second.request_id}"
    assert shared.headers()["x-icgate-cache-shared"] == "true"
    assert float(shared.headers()["x-icgate-backend-ms"]) >= 200.0
    assert "x-icgate-cache-shared" not in lead.headers()
    assert streamed.chunks is not None
    text = "".join(
        [c["choices"][0]["delta"].get("content", "") async for c in streamed.chunks if c["choices"]]
    )
    assert text == "small says hi"
    await settled(entries)
    assert sorted(r.route for r in h.log.records) == ["cache", "cache", "small"]
    assert len(entries.store.entries) == 1 and h.in_flight() == IDLE


async def test_a_failed_leader_leaves_its_followers_to_go_alone(new_entries: NewEntries) -> None:
    client = GatedClient({"small": [RuntimeError("bug")]})  # the leader's call fails, once
    h, entries, _ = await with_cache(new_entries, client=client)
    first, second = chat_ctx(QUESTION), chat_ctx(QUESTION)
    lead, follower = await together(h, client, first, second)

    assert isinstance(lead, RuntimeError) and first.status_code == 500
    assert isinstance(follower, PipelineResult) and follower.response is not None
    assert follower.response["choices"][0]["message"]["content"] == "small says hi"
    assert second.route == "small" and "shared" not in second.decisions["cache"]
    assert client.backends == ["small", "small"]  # the follower made its own call, and it answered
    await settled(entries)


async def test_an_answer_that_is_not_stored_is_not_shared(new_entries: NewEntries) -> None:
    client = GatedClient({"small": [reply("small", finish="length")]})  # truncated: never cached
    h, entries, _ = await with_cache(new_entries, client=client)
    first, second = chat_ctx(QUESTION), chat_ctx(QUESTION)
    await together(h, client, first, second)

    assert client.backends == ["small", "small"]
    assert (first.route, second.route) == ("small", "small")
    await settled(entries)


async def test_only_identical_requests_of_one_tenant_share(new_entries: NewEntries) -> None:
    client = GatedClient()
    h, entries, _ = await with_cache(
        new_entries, client=client, embed=FakeEmbed({QUESTION: axis(0), "Another question?": axis(1)})
    )
    first = chat_ctx(QUESTION, ALICE)
    others = (
        chat_ctx(QUESTION, BOB),
        chat_ctx(QUESTION, ALICE, temperature=0.5),
        chat_ctx("Another question?"),
    )
    await together(h, client, first, *others)

    assert len(client.calls) == 4  # another tenant, a sampled request, another question: each its own call
    assert all("shared" not in ctx.decisions["cache"] for ctx in others)
    await settled(entries)


async def test_a_stream_never_leads(new_entries: NewEntries) -> None:
    client = GatedClient({"small": [[{"choices": [{"index": 0, "delta": {"content": "hi"}}]}]]})
    h, entries, _ = await with_cache(new_entries, client=client)
    first, second = chat_ctx(QUESTION, stream=True), chat_ctx(QUESTION)
    results = await together(h, client, first, second)
    assert isinstance(results[0], PipelineResult) and results[0].chunks is not None
    [_ async for _ in results[0].chunks]

    assert client.backends == ["small", "small"]  # its answer is stored only when the stream ends
    await settled(entries)


async def test_coalescing_can_be_turned_off(new_entries: NewEntries) -> None:
    client = GatedClient()
    h, entries, _ = await with_cache(new_entries, make_policy({"coalesce": False}), client=client)
    await together(h, client, chat_ctx(QUESTION), chat_ctx(QUESTION))
    assert client.backends == ["small", "small"]
    await settled(entries)


async def test_a_follower_waits_at_most_coalesce_wait_s(new_entries: NewEntries) -> None:
    client = FakeClient({"small": [HANG]})  # the leader's backend never answers
    h, entries, _ = await with_cache(new_entries, make_policy({"coalesce_wait_s": 0.05}), client=client)
    leader = asyncio.create_task(h.pipeline.run(chat_ctx(QUESTION)))
    while not client.calls:
        await asyncio.sleep(0)
    second = chat_ctx(QUESTION)
    result = await asyncio.wait_for(h.pipeline.run(second), 5.0)

    assert result.response is not None and second.route == "small"  # went alone after 50 ms
    assert client.backends == ["small", "small"]
    leader.cancel()  # the client of the leader leaves: nothing stays registered
    await asyncio.gather(leader, return_exceptions=True)
    await settled(entries)
