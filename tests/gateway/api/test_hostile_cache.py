"""Hostile input against the cache, over HTTP: huge near-duplicates, text the embedder cannot read, and
one tenant timing another's embeddings (issue 11, items 1, 4 and 12).

Real parts: the packaged MiniLM embedder, the shipped hit verifier (with its cross-encoder), faiss,
SQLite; stand-in backends. Spies wrap the verifier and the embedder to count what they were handed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from icgate.cache.embed import EMBED_MAX_CHARS, Embedder
from icgate.gateway.config import EmbeddingConfig, Policy
from icgate.gateway.store import keys
from icgate.gateway.wiring import Gateway
from tests.gateway.api.test_cache_api import ask, cache_policy, settle
from tests.gateway.conftest import RunningGateway, Standins

StartGateway = Callable[[Policy], RunningGateway]


class VerifierSpy:
    """Wraps the gateway's `verifier.score_batch`: records the length of every text it is handed."""

    def __init__(self, gateway: Gateway) -> None:
        assert gateway.cache_entries is not None
        self.verifier = gateway.cache_entries.verifier
        self.original = self.verifier.score_batch
        self.calls = 0
        self.longest = 0
        self.verifier.score_batch = self  # type: ignore[method-assign,assignment]

    def __call__(self, texts_a: Sequence[str], texts_b: Sequence[str], *vectors: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.longest = max(self.longest, *(len(t) for t in [*texts_a, *texts_b]))
        return self.original(texts_a, texts_b, *vectors)


class EmbedderSpy:
    """Stands in front of the batcher's embedder: records batches; fails a batch holding `poison` (as a
    tokenizer fails on text it cannot read); can hold its first batch until released."""

    def __init__(self, inner: Embedder, poison: str | None = None, hold_first: bool = False) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.poison = poison
        self.batches: list[list[str]] = []
        self.failed: list[list[str]] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.release.wait(30)
        if self.poison is not None and any(self.poison in text for text in texts):
            self.failed.append(list(texts))
            raise UnicodeEncodeError("utf-8", self.poison, 0, 1, "the tokenizer cannot read this")
        return self.inner.encode(texts)

    @property
    def longest(self) -> int:
        return max((len(t) for batch in self.batches for t in batch), default=0)


def spy_on_embedder(gateway: Gateway, **options: Any) -> EmbedderSpy:
    assert gateway.batcher is not None
    spy = EmbedderSpy(gateway.batcher.embedder, **options)
    gateway.batcher.embedder = spy
    return spy


def long_prompt(size: int, word: str) -> str:
    """About `size` characters of a document, then a question; `word` is the one word that differs."""
    filler = "The committee reviewed the quarterly figures and noted steady growth in every region. "
    return filler * (size // len(filler)) + f"Which region grew the most in {word}?"


def raw_post(gw: RunningGateway, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", "authorization": "Bearer sk-x"},
        timeout=timeout,
    )


def test_huge_near_duplicates_never_reach_the_verifier_and_short_ones_still_hit(
    standins: Standins, start_gateway: StartGateway
) -> None:
    # stored even at 1 MB (the stand-in echoes the prompt), so that the verifier has huge candidates
    gw = start_gateway(cache_policy(standins, max_entry_chars=3_000_000))
    assert gw.gateway.cache_entries is not None
    limit = gw.gateway.cache_entries.config.semantic_max_chars
    verifier, embedder = VerifierSpy(gw.gateway), spy_on_embedder(gw.gateway)
    # two ~20 KB prompts and two ~1 MB prompts, each pair differing in one word
    for size in (20_000, 1_000_000):
        first = ask(gw, long_prompt(size, "March"))
        settle(gw)
        second = ask(gw, long_prompt(size, "April"))
        assert second.headers["x-icgate-route"] != "cache"  # a different request, never a semantic hit
        answers = [r.json()["choices"][0]["message"]["content"] for r in (first, second)]
        assert answers[0] != answers[1]
    settle(gw)
    # above semantic_max_chars the exact cache still answers
    assert ask(gw, long_prompt(20_000, "March")).headers["x-icgate-route"] == "cache"
    assert verifier.calls == 0  # no semantic hit was even attempted for the long prompts
    # an unrelated short near-duplicate from anyone is still verified and served
    ask(gw, "How do I reset my password?")
    settle(gw)
    assert ask(gw, "How can I reset my password?").headers["x-icgate-route"] == "cache"
    assert verifier.calls >= 1 and verifier.longest <= limit
    # and the embedder was never handed more than what it reads
    assert embedder.batches and embedder.longest <= EMBED_MAX_CHARS


def test_the_policy_sets_the_longest_prompt_a_semantic_hit_is_tried_for(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(cache_policy(standins, semantic_max_chars=20))
    verifier = VerifierSpy(gw.gateway)
    ask(gw, "How do I reset my password?")  # 27 characters
    settle(gw)
    assert ask(gw, "How can I reset my password?").headers["x-icgate-route"] == "small"
    assert verifier.calls == 0
    assert ask(gw, "How do I reset my password?").headers["x-icgate-route"] == "cache"  # exact: still on


def test_text_the_embedder_cannot_read_fails_only_its_own_request(
    standins: Standins, start_gateway: StartGateway
) -> None:
    """30 normal requests with 3 lone surrogates (legal JSON, invalid Unicode) and 3 texts the tokenizer
    fails on, all at once and held so that they share micro-batches: every normal request gets 200,
    every bad one 400, none 500. (No bound on the embedder's queue here: the held batch would make
    late arrivals skip the embedder, and a skipped poisoned text never reaches it.)"""
    policy = cache_policy(standins)
    gw = start_gateway(
        policy.model_copy(update={"embedding": EmbeddingConfig(preload=False, max_queue_ms=None)})
    )
    assert gw.gateway.batcher is not None
    spy = spy_on_embedder(gw.gateway, poison="POISON", hold_first=True)

    def body(content: str) -> bytes:
        return json.dumps(
            {"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": content}]}
        ).encode()

    normal = [body(f"What is the population of city number {i}?") for i in range(30)]
    # the JSON escape \ud800 is valid JSON; it decodes to a lone surrogate, which no UTF-8 encoder takes
    surrogates = [body("bad text").replace(b"bad text", b"bad \\ud800 text %d" % i) for i in range(3)]
    poisoned = [body(f"a POISON question number {i}") for i in range(3)]
    requests = [*normal, *surrogates, *poisoned]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(raw_post, gw, b) for b in requests]
        deadline = time.monotonic() + 30
        while gw.gateway.batcher.pending < 25 and time.monotonic() < deadline:
            time.sleep(0.02)  # let the requests queue behind the held first batch
        spy.release.set()
        responses = [f.result() for f in futures]
    statuses = [r.status_code for r in responses]
    assert statuses[:30] == [200] * 30, [r.text for r in responses[:30] if r.status_code != 200][:3]
    assert statuses[30:] == [400] * 6, [r.text for r in responses[30:]]
    for response in responses[30:]:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
    # the poisoned texts really did share batches with normal ones, which still got their vectors
    assert any(len(batch) > 1 for batch in spy.failed)
    assert gw.gateway.batcher.stats.refused >= 3


def test_one_tenants_embedding_never_answers_anothers(
    standins: Standins, start_gateway: StartGateway
) -> None:
    """The memo and in-flight encodes are per tenant: a tenant's request is not faster because another
    tenant asked the same text first (which would tell it what the other asked)."""
    policy = cache_policy(standins)
    policy.auth.required = True
    gw = start_gateway(policy)
    assert gw.gateway.engine is not None and gw.gateway.batcher is not None
    stats = gw.gateway.batcher.stats
    alice, bob = (keys.create_key(gw.gateway.engine, name).key for name in ("alice", "bob"))
    question = "What is the longest river in South America?"
    before = stats.encoded
    ask(gw, question, key=alice)
    assert stats.encoded == before + 1
    ask(gw, question, key=bob)
    assert stats.encoded == before + 2 and stats.memo_hits == 0  # encoded afresh for bob
    # within one tenant the memo still serves: another max_tokens is no exact hit, so the same text is
    # embedded again, from alice's memo
    ask(gw, question, key=alice, max_tokens=1000)
    assert stats.encoded == before + 2 and stats.memo_hits == 1
