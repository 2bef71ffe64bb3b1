"""The record stage on plain data: what is stored, counted, sampled and charged after an answer."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from icgate.cache.store import CacheEntry
from icgate.gateway.config import AdmissionConfig, Policy, TelemetryConfig
from icgate.gateway.pipeline.cache_lookup import CacheLookup, plan_lookup
from icgate.gateway.pipeline.quotas import TenantLimiter
from icgate.gateway.pipeline.record import (
    BODY_MAX_CHARS,
    ROUTE_SAMPLE_MAX_CHARS,
    TRUNCATED,
    Recorder,
    Trail,
    route_sample_of,
    sampled,
    store_answer,
)
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext, RequestRecord, Tenant
from icgate.gateway.store.cache_entries import CacheEntries, Hit, Usage
from icgate.gateway.store.route_samples import RouteSample
from icgate.gateway.telemetry import Telemetry
from tests.gateway.pipeline.fakes import (
    FakeClock,
    FakeEmbed,
    NewEntries,
    axis,
    chat_ctx,
    entry_for,
    make_policy,
    remember,
)

QUESTION = "What is the capital of Italy?"
POLICY = make_policy()
SMALL = POLICY.backend("small")
ALICE = Tenant(id=3, name="alice")


def answered(ctx: RequestContext, text: str = "Rome.", finish: str | None = "stop") -> dict[str, Any]:
    """A backend's answer, as the small backend gave it to `ctx`."""
    ctx.route, ctx.backend, ctx.status_code = "small", SMALL, 200
    ctx.prompt_tokens, ctx.completion_tokens = 8, 2
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "s",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
    }


def lookup_for(entries: CacheEntries, ctx: RequestContext) -> CacheLookup:
    lookup = plan_lookup(ctx, entries)
    assert lookup is not None
    lookup.vector = axis(0)
    return lookup


async def started(entries: CacheEntries) -> CacheEntries:
    await entries.start()  # its writer runs: `flush` can wait for the insert
    return entries


async def stored_after(
    entries: CacheEntries,
    ctx: RequestContext,
    response: dict[str, Any] | None,
    lookup: CacheLookup | None = None,
) -> CacheEntry | None:
    lookup = lookup or lookup_for(entries, ctx)
    store_answer(ctx, Trail(Target(routed=True), lookup), entries, response)
    await entries.flush()
    return entries.exact(lookup.namespace, lookup.exact_key)


# --- store_answer ------------------------------------------------------------------------------------


async def test_a_finished_backend_answer_is_stored(new_entries: NewEntries) -> None:
    entries = await started(new_entries())
    ctx = chat_ctx(QUESTION)
    response = answered(ctx)
    entry = await stored_after(entries, ctx, response)
    assert entry is not None
    assert (entry.prompt_text, entry.response_text, entry.tier, entry.backend) == (
        QUESTION,
        "Rome.",
        "small",
        "small",
    )
    assert (entry.prompt_tokens, entry.completion_tokens) == (8, 2)
    assert entry.response == response and entry.vector.tolist() == axis(0).tolist()
    # ... and a later identical request finds it
    assert entries.exact("anonymous", lookup_for(entries, chat_ctx(QUESTION)).exact_key) is entry


async def test_a_streamed_answer_is_stored_as_the_completion_a_hit_replays(new_entries: NewEntries) -> None:
    entries = await started(new_entries())
    ctx = chat_ctx(QUESTION, stream=True)
    answered(ctx)
    ctx.output_parts, ctx.finish_reason = ["Ro", "me", "."], "stop"
    entry = await stored_after(entries, ctx, None)
    assert entry is not None and entry.response_text == "Rome."
    assert entry.response["object"] == "chat.completion" and entry.response["model"] == "s"
    assert entry.response["choices"][0]["message"] == {"role": "assistant", "content": "Rome."}
    assert entry.response["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


def failed(ctx: RequestContext, response: dict[str, Any]) -> None:
    ctx.status_code = 502


def from_cache(ctx: RequestContext, response: dict[str, Any]) -> None:
    ctx.route = "cache"


def no_backend(ctx: RequestContext, response: dict[str, Any]) -> None:
    ctx.backend = None


def truncated(ctx: RequestContext, response: dict[str, Any]) -> None:
    response["choices"][0]["finish_reason"] = "length"


def empty(ctx: RequestContext, response: dict[str, Any]) -> None:
    response["choices"][0]["message"]["content"] = "  "


def tool_call(ctx: RequestContext, response: dict[str, Any]) -> None:
    response["choices"][0]["message"]["tool_calls"] = [{"id": "t", "type": "function"}]


def two_choices(ctx: RequestContext, response: dict[str, Any]) -> None:
    response["choices"].append({**response["choices"][0], "index": 1})


@pytest.mark.parametrize("spoil", [failed, from_cache, no_backend, truncated, empty, tool_call, two_choices])
async def test_only_a_good_single_backend_answer_is_stored(new_entries: NewEntries, spoil: Any) -> None:
    entries = await started(new_entries())
    ctx = chat_ctx(QUESTION)
    response = answered(ctx)
    spoil(ctx, response)
    assert await stored_after(entries, ctx, response) is None
    assert entries.store.entries == {}


async def test_nothing_is_stored_when_the_lookup_forbids_it(new_entries: NewEntries) -> None:
    entries = await started(new_entries(make_policy(cache={"store": False})))
    ctx = chat_ctx(QUESTION)
    assert await stored_after(entries, ctx, answered(ctx)) is None

    entries = await started(new_entries())
    sampled_ctx = chat_ctx(QUESTION, temperature=0.9)  # not storable
    assert await stored_after(entries, sampled_ctx, answered(sampled_ctx)) is None
    unembedded = chat_ctx(QUESTION)
    lookup = lookup_for(entries, unembedded)
    lookup.vector = None
    assert await stored_after(entries, unembedded, answered(unembedded), lookup) is None
    assert entries.store.entries == {}


async def test_a_named_answer_is_embedded_after_the_response_and_stored(new_entries: NewEntries) -> None:
    """A request naming a backend was not embedded on its path (exact hits only): the insert embeds it,
    in the tenant's scope, and a busy embedder means nothing is stored rather than a wait."""
    entries = await started(new_entries())
    embed = FakeEmbed({QUESTION: axis(2)})
    entries.embed_later = embed
    ctx = chat_ctx(QUESTION, ALICE, model="small")
    lookup = plan_lookup(ctx, entries, named=True)
    assert lookup is not None and lookup.embed_after and lookup.vector is None
    entry = await stored_after(entries, ctx, answered(ctx), lookup)
    assert entry is not None and entry.vector.tolist() == axis(2).tolist()
    assert embed.calls == [(QUESTION, "tenant:3")]
    assert [c.entry.id for c in await entries.retrieve("tenant:3", axis(2), 1)] == [entry.id]

    busy = await started(new_entries())
    busy.embed_later = FakeEmbed(busy=True)
    ctx = chat_ctx(QUESTION, model="small")
    lookup = plan_lookup(ctx, busy, named=True)
    assert lookup is not None
    assert await stored_after(busy, ctx, answered(ctx), lookup) is None
    assert busy.store.entries == {}


class HeldEmbed(FakeEmbed):
    """An embedder that answers only once released, so the background share stays taken."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def __call__(self, text: str, scope: str = "") -> Any:
        self.calls.append((text, scope))
        await self.release.wait()
        return axis(len(self.calls))


class Drops:
    def __init__(self) -> None:
        self.dropped: list[tuple[str, int]] = []

    def storage_dropped(self, what: str, count: int) -> None:
        self.dropped.append((what, count))

    def storage_error(self, what: str, kind: str) -> None:
        pass


async def test_named_answers_wait_for_the_background_share_and_past_its_backlog_are_counted_not_stored(
    new_entries: NewEntries,
) -> None:
    """Embedding named answers runs one at a time within `store_embed_share`: with one embedding held and
    one answer waiting (`store_embed_backlog: 1`), a third is not stored and is counted; the other two land
    in the order they came once the embedder answers."""
    entries = await started(new_entries(make_policy(cache={"store_embed_backlog": 1})))
    embed = HeldEmbed()
    entries.embed_later = embed
    drops = Drops()
    entries._events = drops
    questions = [f"Question number {i}: what is the capital of country {i}?" for i in range(3)]
    for question in questions:
        ctx = chat_ctx(question, ALICE, model="small")
        lookup = plan_lookup(ctx, entries, named=True)
        assert lookup is not None and lookup.embed_after
        store_answer(ctx, Trail(Target(routed=False), lookup), entries, answered(ctx))
    for _ in range(5):
        await asyncio.sleep(0)
    assert [text for text, _ in embed.calls] == questions[:1]  # one at a time
    assert entries.background.waiting == 1
    assert drops.dropped == [("cache_store_budget", 1)]
    embed.release.set()
    await entries.flush()
    assert [text for text, _ in embed.calls] == questions[:2]
    assert sorted(e.prompt_text for e in entries.store.entries.values()) == sorted(questions[:2])
    assert drops.dropped == [("cache_store_budget", 1)]


async def test_an_exchange_over_max_entry_chars_is_answered_not_stored(new_entries: NewEntries) -> None:
    limit = len(QUESTION) + len("Rome.")
    entries = await started(new_entries(make_policy(cache={"max_entry_chars": limit})))
    ctx = chat_ctx(QUESTION)
    assert await stored_after(entries, ctx, answered(ctx, "Rome!!")) is None
    assert await stored_after(entries, ctx, answered(ctx, "Rome.")) is not None


async def test_usage_counts_what_served_and_what_helped(new_entries: NewEntries) -> None:
    clock = FakeClock()
    entries = new_entries(clock=clock)
    served = entry_for(entries, chat_ctx("What is the capital of France?"), 1, axis(1))
    helped = entry_for(entries, chat_ctx("What is the capital of Spain?"), 2, axis(2))
    remember(entries, served, helped)
    clock.advance(60)

    hit_ctx = chat_ctx("What is the capital of France?")
    hit_lookup = lookup_for(entries, hit_ctx)
    hit_lookup.hit = Hit(served, 1.0, "exact", 1.0)
    hit_ctx.route = "cache"
    store_answer(hit_ctx, Trail(Target(routed=True), hit_lookup), entries, served.response)

    ctx = chat_ctx(QUESTION)
    lookup = lookup_for(entries, ctx)
    lookup.store = False  # a tenant whose answers are not kept still gets examples
    store_answer(ctx, Trail(Target(routed=True), lookup, [2]), entries, answered(ctx))

    assert (served.hits, served.helped, helped.hits, helped.helped) == (1, 0, 0, 1)
    assert served.last_used_at == helped.last_used_at == clock.now

    # What served or helped each request is remembered, so its feedback reaches those entries.
    async def unknown(request_id: str) -> Usage | None:
        return None

    assert await entries.feedback(hit_ctx.request_id, -1.0, "anonymous", unknown) == 1
    assert await entries.feedback(ctx.request_id, 1.0, "anonymous", unknown) == 1
    assert served.utility < 0.5 < helped.utility
    assert await entries.feedback(ctx.request_id, 1.0, "tenant:3", unknown) is None  # not its tenant's


# --- route samples -----------------------------------------------------------------------------------


def test_a_routed_chat_answer_becomes_a_scrubbed_route_sample() -> None:
    ctx = chat_ctx("Mail me at jane.doe@example.com: what is 2+2?", ALICE)
    answered(ctx)
    ctx.finish_reason = "stop"
    sample = route_sample_of(ctx, Trail(Target(routed=True)))
    assert sample is not None
    assert "jane.doe@example.com" not in sample.prompt_text and sample.prompt_text.endswith("what is 2+2?")
    assert replace(sample, prompt_text="") == RouteSample(
        request_id=ctx.request_id,
        tenant_id=3,
        prompt_text="",
        tier="small",
        backend="small",
        prompt_tokens=8,
        completion_tokens=2,
        finish_reason="stop",
    )


async def test_a_route_sample_takes_the_cache_stages_prompt_text_bounded(new_entries: NewEntries) -> None:
    entries = new_entries()
    ctx = chat_ctx("y" * (ROUTE_SAMPLE_MAX_CHARS + 500))
    answered(ctx)
    lookup = lookup_for(entries, ctx)
    lookup.prompt_text = "z" * (ROUTE_SAMPLE_MAX_CHARS + 500)
    sample = route_sample_of(ctx, Trail(Target(routed=True), lookup))
    assert sample is not None and sample.prompt_text == "z" * ROUTE_SAMPLE_MAX_CHARS


def named(ctx: RequestContext) -> Trail:
    return Trail(Target(routed=False, backend=SMALL))


def cut_early(ctx: RequestContext) -> Trail:
    return Trail()


def served_from_cache(ctx: RequestContext) -> Trail:
    ctx.route = "cache"
    return Trail(Target(routed=True))


def refused(ctx: RequestContext) -> Trail:
    ctx.status_code = 429
    return Trail(Target(routed=True))


def unanswered(ctx: RequestContext) -> Trail:
    ctx.backend = None
    return Trail(Target(routed=True))


def a_completion(ctx: RequestContext) -> Trail:
    ctx.endpoint = "completions"
    return Trail(Target(routed=True))


def blank(ctx: RequestContext) -> Trail:
    ctx.body["messages"][-1]["content"] = "   "
    return Trail(Target(routed=True))


@pytest.mark.parametrize(
    "case", [named, cut_early, served_from_cache, refused, unanswered, a_completion, blank]
)
def test_no_route_sample_unless_routed_chat_answered_by_a_backend(case: Any) -> None:
    ctx = chat_ctx(QUESTION)
    answered(ctx)
    assert route_sample_of(ctx, case(ctx)) is None


def test_sampled_keeps_its_share() -> None:
    assert all(sampled(1.0) for _ in range(100))
    assert not any(sampled(0.0) for _ in range(100))


# --- Recorder ----------------------------------------------------------------------------------------


class ListSink:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.items: list[Any] = []

    def submit(self, item: Any) -> bool:
        self.items.append(item)
        return self.accept


def metric(telemetry: Telemetry, name: str, labels: dict[str, str] | None = None) -> float | None:
    return telemetry.metrics.registry.get_sample_value(name, labels or {})


def recorder_of(policy: Policy = POLICY, **kw: Any) -> tuple[Recorder, Telemetry]:
    telemetry = Telemetry.from_config(TelemetryConfig())
    return Recorder(policy, telemetry, **kw), telemetry


def test_recorder_counts_records_the_log_drops() -> None:
    sink = ListSink(accept=False)
    recorder, telemetry = recorder_of(sink=sink)
    ctx = chat_ctx(QUESTION)
    answered(ctx)
    recorder.record(ctx, Trail(Target(routed=True)))
    [record] = sink.items
    assert isinstance(record, RequestRecord) and record.request_id == ctx.request_id
    assert metric(telemetry, "icgate_request_log_dropped_total") == 1
    assert (
        metric(telemetry, "icgate_requests_total", {"route": "small", "backend": "small", "status": "200"})
        == 1
    )

    kept, telemetry = recorder_of(sink=ListSink(accept=True))
    kept.record(ctx, Trail(Target(routed=True)))
    assert metric(telemetry, "icgate_request_log_dropped_total") == 0


@pytest.mark.parametrize(("share", "kept"), [(1.0, 1), (0.0, 0)])
def test_recorder_keeps_route_samples_by_share(share: float, kept: int) -> None:
    samples = ListSink()
    recorder, _ = recorder_of(make_policy(router={"kind": "rule", "sample_share": share}), samples=samples)
    ctx = chat_ctx(QUESTION)
    answered(ctx)
    recorder.record(ctx, Trail(Target(routed=True)))
    recorder.record(chat_ctx(QUESTION), Trail(Target(routed=True)))  # never answered: no sample
    assert len(samples.items) == kept


async def test_recorder_charges_a_tracked_tenant_for_an_answered_request() -> None:
    config = AdmissionConfig(tenants={"alice": {"budget_usd": 10.0}})
    limiter = TenantLimiter(config)
    policy = make_policy(
        backends=[{"name": "small", "tier": "small", "model": "m", "cost_per_1k_output": 1.0}],
        tiers=["small"],
    )
    recorder, _ = recorder_of(policy, limiter=limiter)
    limits = config.tenants["alice"]

    ctx = chat_ctx(QUESTION, ALICE)
    ctx.backend, ctx.completion_tokens = policy.backend("small"), 500
    recorder.record(ctx, Trail(Target(routed=True)))
    for untracked in (chat_ctx(QUESTION), chat_ctx(QUESTION, ALICE)):  # anonymous; alice unanswered
        if untracked.tenant.name == "anonymous":
            untracked.backend, untracked.completion_tokens = policy.backend("small"), 500
        recorder.record(untracked, Trail(Target(routed=True)))
    await asyncio.sleep(0)  # the charge runs off the request's path, on the next loop turn
    assert limiter.spent("alice", limits) == pytest.approx(0.5)


async def test_recorder_stores_through_the_cache_entries(new_entries: NewEntries) -> None:
    entries = await started(new_entries())
    recorder, _ = recorder_of(entries=entries)
    ctx = chat_ctx(QUESTION)
    response = answered(ctx)
    recorder.record(ctx, Trail(Target(routed=True), lookup_for(entries, ctx)), response)
    recorder.record(chat_ctx("unseen"), Trail(Target(routed=True)))  # no lookup: nothing to store
    await entries.flush()
    assert [e.response_text for e in entries.store.entries.values()] == ["Rome."]


# --- request bodies (request_log.store_bodies) ------------------------------------------------------------

STORING = make_policy(request_log={"store_bodies": True})


def test_bodies_are_kept_only_when_the_policy_says_so_and_then_scrubbed() -> None:
    sink = ListSink()
    off, _ = recorder_of(sink=sink)
    ctx = chat_ctx("Mail me at ann@example.com: what is the capital of Italy?")
    response = answered(ctx, "Rome. Write to bob@example.org.")
    off.record(ctx, Trail(Target(routed=True)), response)
    on, _ = recorder_of(STORING, sink=sink)
    system = [{"role": "system", "content": "Be brief."}]
    ctx = chat_ctx("Mail me at ann@example.com: what is the capital of Italy?", messages=system)
    on.record(ctx, Trail(Target(routed=True)), answered(ctx, "Rome. Write to bob@example.org."))
    assert sink.items[0].bodies is None  # the default: nothing of the text
    bodies = sink.items[1].bodies
    assert bodies is not None
    assert "ann@example.com" not in bodies.prompt and "bob@example.org" not in bodies.answer
    assert bodies.prompt.startswith("system: Be brief.\nuser: Mail me at ") and bodies.prompt.endswith(
        "Italy?"
    )
    assert bodies.answer.startswith("Rome. Write to ") and bodies.answer != "Rome. Write to bob@example.org."


async def test_a_streamed_answer_is_kept_from_its_assembled_text_once(
    new_entries: NewEntries, monkeypatch: pytest.MonkeyPatch
) -> None:
    import icgate.gateway.pipeline.record as record_stage

    entries = await started(new_entries())
    sink = ListSink()
    recorder, _ = recorder_of(STORING, sink=sink, entries=entries)
    ctx = chat_ctx(QUESTION, stream=True)
    answered(ctx)
    ctx.output_parts, ctx.finish_reason = ["Ro", "me", "."], "stop"
    reads: list[str] = []
    real = record_stage.answer_of

    def counted(ctx: RequestContext, response: dict[str, Any] | None) -> tuple[str, str | None]:
        reads.append(ctx.request_id)
        return real(ctx, response)

    monkeypatch.setattr(record_stage, "answer_of", counted)
    recorder.record(ctx, Trail(Target(routed=True), lookup_for(entries, ctx)))
    await entries.flush()
    [record] = sink.items
    assert record.bodies is not None and record.bodies.answer == "Rome."
    assert [e.response_text for e in entries.store.entries.values()] == ["Rome."]
    assert reads == [ctx.request_id]  # assembled once, for the body and the cache alike


def test_bodies_are_cut_at_their_limit_before_the_scrub() -> None:
    sink = ListSink()
    recorder, _ = recorder_of(STORING, sink=sink)
    turns = [{"role": "user", "content": "a" * 5_000}, {"role": "assistant", "content": "b" * 5_000}]
    ctx = chat_ctx("never read", messages=turns * 100)
    recorder.record(ctx, Trail(), answered(ctx, "c" * (BODY_MAX_CHARS + 1)))
    completion = RequestContext(endpoint="completions", body={"model": "auto", "prompt": ["x", "y"]})
    recorder.record(completion, Trail())
    long, listed = (r.bodies for r in sink.items)
    assert long is not None and listed is not None
    assert (
        long.prompt == ("user: " + "a" * 5_000 + "\nassistant: " + "b" * 5_000)[:BODY_MAX_CHARS] + TRUNCATED
    )
    assert long.answer == "c" * BODY_MAX_CHARS + TRUNCATED
    assert (listed.prompt, listed.answer) == ("['x', 'y']", "")
