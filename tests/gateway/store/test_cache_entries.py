"""`CacheEntries` on plain data: hand-made unit vectors, a fake verifier and clock, in-memory SQLite."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, cast

import numpy as np
import pytest
import sqlalchemy as sa
from threadpoolctl import threadpool_info

from icgate.cache.onnx_models import default_threads
from icgate.cache.verify import MAX_TEXT_CHARS, HitVerifier
from icgate.gateway.records import Tenant
from icgate.gateway.store import tables
from icgate.gateway.store.cache_entries import CacheEntries, NewEntry, Usage, VerifierBusyError
from icgate.gateway.store.db import make_engine, upgrade
from tests.gateway.pipeline.fakes import (
    DIM,
    FakeClock,
    FakeVerifier,
    NewEntries,
    axis,
    chat_ctx,
    entry_for,
    make_policy,
    remember,
    toward,
)

ALICE, BOB = Tenant(id=3, name="alice"), Tenant(id=4, name="bob")


# --- retrieve ----------------------------------------------------------------------------------------


async def test_retrieve_stays_in_the_tenants_namespace(new_entries: NewEntries) -> None:
    entries = new_entries()
    same = axis(0)
    remember(
        entries,
        entry_for(entries, chat_ctx("q", ALICE), 1, same),
        entry_for(entries, chat_ctx("q", BOB), 2, same),
        entry_for(entries, chat_ctx("q"), 3, same),
        entry_for(entries, chat_ctx("q2", ALICE), 4, toward(0, 0.6)),
    )
    alice = await entries.retrieve("tenant:3", same, 8)
    assert [(c.entry.id, round(c.similarity, 4)) for c in alice] == [(1, 1.0), (4, 0.6)]  # best first
    assert [c.entry.id for c in await entries.retrieve("tenant:4", same, 8)] == [2]
    assert [c.entry.id for c in await entries.retrieve("anonymous", same, 8)] == [3]
    assert await entries.retrieve("tenant:99", same, 8) == []
    assert [c.entry.id for c in await entries.retrieve("tenant:3", same, 1)] == [1]


async def test_retrieve_never_returns_an_entry_of_another_namespace_or_a_forgotten_one(
    new_entries: NewEntries,
) -> None:
    entries = new_entries()
    bobs = entry_for(entries, chat_ctx("q", BOB), 1, axis(0))
    entries.store.add(bobs)
    # The index says tenant 3 holds ids 1 (the store says it is Bob's) and 2 (no longer in the store).
    entries.index.add("tenant:3", np.array([1, 2], dtype=np.int64), np.stack([axis(0), axis(0)]))
    assert await entries.retrieve("tenant:3", axis(0), 8) == []


# --- allowed: tier floor and expiry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_tier", "min_tier", "allowed"),
    [
        ("small", None, True),
        ("large", None, True),
        ("medium", None, True),
        ("large", "small", True),
        ("small", "small", True),
        ("small", "large", False),
        ("medium", "small", False),  # a tier the policy no longer lists ranks below every listed one
    ],
)
def test_allowed_by_tier_rank(
    new_entries: NewEntries, entry_tier: str, min_tier: str | None, allowed: bool
) -> None:
    entries = new_entries()
    entry = entry_for(entries, chat_ctx("q"), 1, axis(0), tier=entry_tier)
    assert entries.allowed(entry, min_tier) is allowed


def test_allowed_until_the_entry_expires(new_entries: NewEntries) -> None:
    clock = FakeClock()
    entries = new_entries(clock=clock)
    expiring = entry_for(entries, chat_ctx("q"), 1, axis(0), expires_at=clock.now + 10)
    forever = entry_for(entries, chat_ctx("q"), 2, axis(0), expires_at=None)
    assert entries.allowed(expiring, None) and entries.allowed(expiring, "small")
    clock.advance(9.99)
    assert entries.allowed(expiring, None)
    clock.advance(0.01)
    assert not entries.allowed(expiring, None) and not entries.allowed(expiring, "small")
    clock.advance(1e9)
    assert entries.allowed(forever, "large")


def test_exact_is_per_namespace(new_entries: NewEntries) -> None:
    entries = new_entries()
    alices = entry_for(entries, chat_ctx("q", ALICE), 1, axis(0))
    remember(entries, alices)
    assert entries.exact("tenant:3", alices.exact_key) is alices
    assert entries.exact("tenant:4", alices.exact_key) is None


@pytest.mark.parametrize(("configured", "expected"), [(100, 100), (MAX_TEXT_CHARS * 2, MAX_TEXT_CHARS)])
def test_semantic_max_chars_never_above_what_the_verifier_reads(
    new_entries: NewEntries, configured: int, expected: int
) -> None:
    entries = new_entries(make_policy(cache={"semantic_max_chars": configured}))
    assert entries.semantic_max_chars == expected


# --- verify --------------------------------------------------------------------------------------------


async def test_verify_scores_every_pair_on_the_verifiers_own_threads(new_entries: NewEntries) -> None:
    verifier = FakeVerifier(scores={"a": 0.2, "b": 0.9, "c": 0.5})
    entries = new_entries(verifier=verifier)
    candidates = [entry_for(entries, chat_ctx(t), i, axis(i)) for i, t in enumerate("abc", start=1)]
    scores = await entries.verify("the request", axis(0), candidates)
    assert scores.tolist() == [0.2, 0.9, 0.5]
    assert verifier.requests == [["the request"] * 3] and verifier.calls == [["a", "b", "c"]]
    assert verifier.shapes == [((3, 8), (3, 8))]
    await entries.verify("again", axis(0), candidates[:1])
    assert len(verifier.threads) == 2 and entries.verify_threads == default_threads()
    assert all(t.startswith("icgate-verify") for t in verifier.threads)
    assert threading.current_thread().name not in verifier.threads


class OpenMPReportingVerifier(FakeVerifier):
    """Notes the OpenMP thread count its scoring thread would give scikit-learn's trees."""

    def __init__(self) -> None:
        super().__init__()
        self.openmp_threads: set[int] = set()

    def score_batch(self, texts_a: Any, texts_b: Any, vecs_a: Any, vecs_b: Any) -> Any:
        self.openmp_threads |= _openmp_threads()
        return super().score_batch(texts_a, texts_b, vecs_a, vecs_b)


def _openmp_threads() -> set[int]:
    import sklearn.ensemble  # noqa: F401 - its gradient boosting loads the OpenMP runtime

    return {int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "openmp"}


async def test_the_verifiers_thread_scores_with_one_openmp_thread_and_leaves_others_alone(
    new_entries: NewEntries,
) -> None:
    verifier = OpenMPReportingVerifier()
    entries = new_entries(verifier=verifier)
    candidate = entry_for(entries, chat_ctx("a"), 1, axis(1))
    await entries.verify("the request", axis(0), [candidate])
    assert verifier.openmp_threads == {1}
    if (os.cpu_count() or 1) > 1:  # elsewhere the count stays the runtime's default, one per core
        assert _openmp_threads() != {1}


class GatedVerifier(FakeVerifier):
    """Scores only once the test opens the gate, taking `pair_s` seconds per pair; counts the calls
    scoring at once."""

    def __init__(self, pair_s: float) -> None:
        super().__init__()
        self.pair_s = pair_s
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.inside = 0

    def score_batch(self, texts_a: Any, texts_b: Any, vecs_a: Any, vecs_b: Any) -> Any:
        with self.lock:
            self.inside += 1
        try:
            self.gate.wait(10)
            time.sleep(self.pair_s * len(texts_b))
            return super().score_batch(texts_a, texts_b, vecs_a, vecs_b)
        finally:
            with self.lock:
                self.inside -= 1


async def test_a_request_that_would_wait_too_long_for_the_verifier_is_turned_away(
    new_entries: NewEntries,
) -> None:
    """Measured at 20 ms a pair, three pairs ahead are 60 ms: over a 30 ms bound the next request is told
    at once (nothing queued); once the queue drains it is scored again. Without a bound, it waits."""
    verifier = GatedVerifier(pair_s=0.02)
    one_thread = {"verify_max_queue_ms": 30, "verify_threads": 1}
    entries = new_entries(make_policy(cache=one_thread), verifier=verifier)
    candidates = [entry_for(entries, chat_ctx(t), i, axis(i)) for i, t in enumerate("abc", start=1)]
    await entries.verify("measure", axis(0), candidates)  # learns the cost of a pair
    verifier.gate.clear()
    ahead = asyncio.create_task(entries.verify("ahead", axis(0), candidates))
    await asyncio.sleep(0.01)
    with pytest.raises(VerifierBusyError):
        await entries.verify("behind", axis(0), candidates[:1])
    verifier.gate.set()
    await ahead
    assert [c[0] for c in verifier.calls] == ["a", "a"]  # "behind" never reached the verifier
    assert (await entries.verify("after", axis(0), candidates[:1])).tolist() == [0.9]

    patient = new_entries(make_policy(cache={"verify_max_queue_ms": None}), verifier=GatedVerifier(0.02))
    await patient.verify("measure", axis(0), candidates)
    waiting = [asyncio.create_task(patient.verify(str(i), axis(0), candidates)) for i in range(3)]
    assert [len(scores) for scores in await asyncio.gather(*waiting)] == [3, 3, 3]


async def test_two_verifier_threads_score_two_requests_at_once_and_halve_the_predicted_wait(
    new_entries: NewEntries,
) -> None:
    """At 50 ms a pair, three pairs ahead are a 75 ms wait for two threads: under a 100 ms bound the
    next request goes in, and is scored beside the one ahead. Six pairs ahead (150 ms for two threads)
    turn the next away; with one thread, three pairs ahead already do (150 ms)."""
    verifier = GatedVerifier(pair_s=0.05)
    two_threads = {"verify_max_queue_ms": 100, "verify_threads": 2}
    entries = new_entries(make_policy(cache=two_threads), verifier=verifier)
    candidates = [entry_for(entries, chat_ctx(t), i, axis(i)) for i, t in enumerate("abc", start=1)]
    await entries.verify("measure", axis(0), candidates)
    verifier.gate.clear()
    first = asyncio.create_task(entries.verify("first", axis(0), candidates))
    await asyncio.sleep(0.01)
    assert entries.expected_verify_wait_s() == pytest.approx(0.075, rel=0.3)
    second = asyncio.create_task(entries.verify("second", axis(0), candidates))
    deadline = time.monotonic() + 5
    while verifier.inside < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert verifier.inside == 2  # both requests are being scored at once
    with pytest.raises(VerifierBusyError):  # six pairs ahead: 150 ms for two threads
        await entries.verify("third", axis(0), candidates[:1])
    verifier.gate.set()
    assert [len(s) for s in await asyncio.gather(first, second)] == [3, 3]

    alone = GatedVerifier(pair_s=0.05)
    one_thread = {"verify_max_queue_ms": 100, "verify_threads": 1}
    single = new_entries(make_policy(cache=one_thread), verifier=alone)
    await single.verify("measure", axis(0), candidates)
    alone.gate.clear()
    ahead = asyncio.create_task(single.verify("ahead", axis(0), candidates))
    await asyncio.sleep(0.01)
    with pytest.raises(VerifierBusyError):  # three pairs ahead: 150 ms for one thread
        await single.verify("behind", axis(0), candidates[:1])
    alone.gate.set()
    await ahead


# --- inserts, on the in-memory database --------------------------------------------------------------


def new_entry(text: str, tier: str, answer: str = "Rome.", **kw: Any) -> NewEntry:
    return NewEntry(
        namespace="anonymous",
        exact_key=f"key:{text}",
        context_fingerprint="",
        embed_text=text,
        prompt_text=text,
        response_text=answer,
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]},
        backend=tier,
        tier=tier,
        prompt_tokens=3,
        completion_tokens=2,
        vector=kw.pop("vector", axis(0)),
    )


async def inserted(entries: CacheEntries, *new: NewEntry) -> None:
    for i, item in enumerate(new):
        entries.insert_later(f"req-{i}", item)
        await entries.flush()


async def test_insert_scrubs_personal_data_and_expires_by_the_clock(new_entries: NewEntries) -> None:
    clock = FakeClock()
    entries = new_entries(make_policy(cache={"ttl_s": 60}), clock=clock)
    await entries.start()
    await inserted(entries, new_entry("Write to bob@example.com", "large", "Mail bob@example.com."))
    [entry] = entries.store.entries.values()
    assert "bob@example.com" not in entry.prompt_text + entry.response_text
    assert entry.response["choices"][0]["message"]["content"] == entry.response_text
    assert (entry.created_at, entry.expires_at) == (clock.now, clock.now + 60)
    assert entry.utility > 0.5  # the best tier's answer starts worth more
    assert [c.entry.id for c in await entries.retrieve("anonymous", axis(0), 8)] == [entry.id]
    clock.advance(60)
    assert await entries.expire_and_evict() == 1
    assert entries.store.entries == {} and await entries.retrieve("anonymous", axis(0), 8) == []


async def test_a_better_tiers_answer_replaces_a_worse_one_never_the_reverse(new_entries: NewEntries) -> None:
    entries = new_entries()
    await entries.start()
    await inserted(entries, new_entry("q", "small", "small answer"))
    await inserted(entries, new_entry("q", "small", "another small answer"))
    assert [e.response_text for e in entries.store.entries.values()] == ["small answer"]
    await inserted(entries, new_entry("q", "large", "large answer"))
    await inserted(entries, new_entry("q", "small", "late small answer"))
    assert [e.response_text for e in entries.store.entries.values()] == ["large answer"]
    assert entries.exact("anonymous", "key:q") is not None


# --- sync: replicas sharing one database -----------------------------------------------------------------


async def test_a_replica_syncs_what_another_wrote_and_tombstones_it_deletes(new_entries: NewEntries) -> None:
    policy = make_policy(cache={"sync_interval_s": 3600})  # syncs only when the test says
    first = new_entries(policy)
    await first.start()
    second = CacheEntries(
        policy.cache, policy.tier_rank, policy.best_tier, first.engine, cast(HitVerifier, FakeVerifier()), DIM
    )
    await second.start()
    try:
        await inserted(first, new_entry("q1", "small"), new_entry("q2", "large"))
        assert await second.sync() == 2
        assert sorted(e.prompt_text for e in second.store.entries.values()) == ["q1", "q2"]
        await inserted(second, new_entry("q3", "small", vector=axis(1)))
        assert await second.sync() == 0  # its own entry, and those it holds, are not read back
        assert await first.sync() == 1
        [q3] = [e for e in first.store.entries.values() if e.prompt_text == "q3"]
        assert [c.entry.id for c in await first.retrieve("anonymous", axis(1), 1)] == [q3.id]
        await first.delete([q3.id])
        await second.sync()
        assert "q3" not in [e.prompt_text for e in second.store.entries.values()]
    finally:
        await second.stop()


async def test_feedback_memory_keeps_the_newest_requests_and_older_ones_go_to_the_log(
    new_entries: NewEntries,
) -> None:
    entries = new_entries(make_policy(cache={"feedback_memory": 2}))
    for n in range(3):
        entries.note_usage(f"req-{n}", Usage(namespace="t:1", served=[n]))
    from_log: list[str] = []

    async def lookup(request_id: str) -> Usage | None:
        from_log.append(request_id)
        return None

    assert await entries.feedback("req-0", 1.0, "t:1", lookup) is None  # forgotten here: asked of the log
    assert from_log == ["req-0"]
    await entries.feedback("req-2", 1.0, "t:1", lookup)
    assert from_log == ["req-0"]  # remembered: no need to ask


async def test_a_batch_of_inserts_gives_each_entry_its_own_row_and_counters_land_per_entry(
    empty_db_url: str,
) -> None:
    """On SQLite and PostgreSQL: entries written in one batch get the ids of their own rows, and
    updates of different columns in one batch reach the right entries."""
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    policy = make_policy()
    entries = CacheEntries(
        policy.cache, policy.tier_rank, policy.best_tier, engine, cast(HitVerifier, FakeVerifier()), DIM
    )
    await entries.start()
    try:
        texts = [f"question {n}" for n in range(6)]
        for i, text in enumerate(texts):  # queued together: the writer takes them as one batch
            entries.insert_later(f"req-{i}", new_entry(text, "small", f"answer {i}", vector=axis(i % DIM)))
        await entries.flush()
        table = tables.CacheEntryRow
        with engine.connect() as conn:
            query = sa.select(table.id, table.prompt_text, table.response_text)
            rows = {r.id: r for r in conn.execute(query)}
        stored = {e.prompt_text: e for e in entries.store.entries.values()}
        assert sorted(stored) == sorted(texts)
        for i, text in enumerate(texts):
            row = rows[stored[text].id]
            assert (row.prompt_text, row.response_text) == (text, f"answer {i}")
        first, second = stored[texts[0]].id, stored[texts[1]].id
        entries.note_usage("req-served", Usage(namespace="anonymous", served=[first]))
        entries.note_usage("req-helped", Usage(namespace="anonymous", helped=[second]))
        assert await entries.feedback("req-helped", -1.0, "anonymous", _unknown) == 1
        await entries.flush()
        with engine.connect() as conn:
            got = {
                r.id: (r.hits, r.helped, r.feedback_count)
                for r in conn.execute(sa.select(table.id, table.hits, table.helped, table.feedback_count))
            }
        assert got[first] == (1, 0, 0) and got[second] == (0, 1, 1)
        assert all(got[e.id] == (0, 0, 0) for t, e in stored.items() if t not in texts[:2])
    finally:
        await entries.stop()
        engine.dispose()


async def _unknown(request_id: str) -> Usage | None:
    return None
