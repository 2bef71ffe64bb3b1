"""Plain-data stand-ins for the pipeline's stage tests: hand-made unit vectors, a fake embedder, verifier
and clock, and a `CacheEntries` over an in-memory SQLite database (nothing loads a model)."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest

from icgate.cache.embed import EmbedderBusyError
from icgate.cache.store import CacheEntry
from icgate.cache.verify import HitVerifier
from icgate.gateway.backends.admission import Admission
from icgate.gateway.backends.client import BackendClient
from icgate.gateway.config import BackendConfig, Policy, TelemetryConfig
from icgate.gateway.pipeline.cache_lookup import plan_lookup
from icgate.gateway.pipeline.run import Pipeline
from icgate.gateway.records import ANONYMOUS, Endpoint, RequestContext, RequestRecord, Tenant
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store import tables
from icgate.gateway.store.cache_entries import CacheEntries
from icgate.gateway.store.db import make_engine
from icgate.gateway.telemetry import Telemetry
from icgate.lengths.predict import OutputLengthHeuristic
from icgate.routers.rules import LongPromptRule

DIM = 8
Vector = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]
NewEntries = Callable[..., CacheEntries]


def axis(i: int) -> Vector:
    """The i-th unit vector: two different axes are orthogonal (cosine 0)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def toward(base: int, cosine: float, other: int = DIM - 1) -> Vector:
    """A unit vector whose cosine with `axis(base)` is `cosine` (tilted towards `axis(other)`)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[base] = cosine
    v[other] = math.sqrt(max(0.0, 1.0 - cosine * cosine))
    return v


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEmbed:
    """The `Embed` stage input: a vector per text (else `default`), every call noted as (text, scope)."""

    def __init__(
        self, vectors: dict[str, Vector] | None = None, default: Vector | None = None, busy: bool = False
    ) -> None:
        self.vectors = vectors or {}
        self.default = axis(DIM - 1) if default is None else default
        self.busy = busy  # turn every text away, as a MicroBatcher with a full queue does
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, text: str, scope: str = "") -> Vector:
        self.calls.append((text, scope))
        if self.busy:
            raise EmbedderBusyError("the embedder's queue is full")
        return self.vectors.get(text, self.default)


class FakeVerifier:
    """A hit verifier: P(same question) per candidate prompt from `scores` (else `default`)."""

    def __init__(
        self,
        cosine_threshold: float = 0.8,
        probability_threshold: float = 0.5,
        scores: dict[str, float] | None = None,
        default: float = 0.9,
    ) -> None:
        self.cosine_threshold = cosine_threshold
        self.probability_threshold = probability_threshold
        self.scores = scores or {}
        self.default = default
        self.calls: list[list[str]] = []  # the candidate prompts of each batch
        self.requests: list[list[str]] = []  # the request's text, once per pair
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.threads: list[str] = []

    def score_batch(self, texts_a: Sequence[str], texts_b: Sequence[str], vecs_a: Any, vecs_b: Any) -> Scores:
        self.calls.append(list(texts_b))
        self.requests.append(list(texts_a))
        self.shapes.append((np.shape(vecs_a), np.shape(vecs_b)))
        self.threads.append(threading.current_thread().name)
        return np.array([self.scores.get(b, self.default) for b in texts_b], dtype=np.float64)


def make_policy(cache: dict[str, Any] | None = None, **overrides: Any) -> Policy:
    raw: dict[str, Any] = {
        "backends": [
            {"name": "small", "tier": "small", "model": "openai/s", "max_concurrent": 2},
            {"name": "large", "tier": "large", "model": "openai/l", "max_concurrent": 2},
        ],
        "routed_models": ["auto"],
        "router": {"kind": "rule", "large_if_prompt_tokens_over": 50},
        "cache": cache or {},
    }
    raw.update(overrides)
    return Policy.model_validate(raw)


def make_entries(
    policy: Policy | None = None,
    verifier: FakeVerifier | None = None,
    clock: FakeClock | None = None,
) -> CacheEntries:
    """Cache entries over a fresh in-memory database with the schema created (no migrations)."""
    policy = policy or make_policy()
    engine = make_engine("sqlite://")
    tables.Base.metadata.create_all(engine)
    return CacheEntries(
        policy.cache,
        policy.tier_rank,
        policy.best_tier,
        engine,
        cast(HitVerifier, verifier or FakeVerifier()),
        DIM,
        clock=clock or FakeClock(),
    )


def chat(text: str, *, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def chat_ctx(
    text: str, tenant: Tenant = ANONYMOUS, messages: list[dict[str, Any]] | None = None, **extra: Any
) -> RequestContext:
    body = chat(text, **extra)
    if messages is not None:
        body["messages"] = [*messages, {"role": "user", "content": text}]
    return RequestContext(endpoint="chat", body=body, tenant=tenant)


def entry_for(
    entries: CacheEntries,
    ctx: RequestContext,
    entry_id: int,
    vector: Vector,
    *,
    tier: str = "large",
    completion_tokens: int = 5,
    response_text: str | None = None,
    expires_at: float | None = None,
    utility: float = 0.5,
) -> CacheEntry:
    """The entry the cache would hold had `ctx` been answered (its keys computed as the pipeline does).

    In a test that also inserts answers, give hand-made entries ids the database will not hand out
    (say 1000 and up): an insert with the same id replaces the entry in memory."""
    lookup = plan_lookup(ctx, entries)
    assert lookup is not None
    text = response_text if response_text is not None else f"answer {entry_id}"
    return CacheEntry(
        id=entry_id,
        namespace=lookup.namespace,
        exact_key=lookup.exact_key,
        context_fingerprint=lookup.fingerprint,
        embed_text=lookup.embed_text,
        prompt_text=lookup.prompt_text,
        response_text=text,
        response={
            "id": f"chatcmpl-{entry_id}",
            "object": "chat.completion",
            "created": 1,
            "model": "openai/l",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": 4,
                "completion_tokens": completion_tokens,
                "total_tokens": 4 + completion_tokens,
            },
        },
        backend=tier,
        tier=tier,
        prompt_tokens=4,
        completion_tokens=completion_tokens,
        vector=vector,
        utility=utility,
        expires_at=expires_at,
    )


def remember(entries: CacheEntries, *added: CacheEntry) -> None:
    """Into memory and the vector index, as a sync from the database does."""
    for entry in added:
        entries.store.add(entry)
        entries.index.add(entry.namespace, np.array([entry.id], dtype=np.int64), entry.vector[None, :])


@pytest.fixture
async def new_entries() -> AsyncIterator[NewEntries]:
    """`make_entries`, with every one made stopped (its thread pools and writer) after the test."""
    made: list[CacheEntries] = []

    def factory(
        policy: Policy | None = None, verifier: FakeVerifier | None = None, clock: FakeClock | None = None
    ) -> CacheEntries:
        made.append(make_entries(policy, verifier, clock))
        return made[-1]

    yield factory
    for entries in made:
        await entries.stop()


# --- a backend client and a pipeline around it ------------------------------------------------------------

HANG = "hang"  # a scripted outcome: the call never answers


def reply(backend: str, text: str | None = None, finish: str = "stop") -> dict[str, Any]:
    content = text if text is not None else f"{backend} says hi"
    return {
        "id": f"cmpl-{backend}",
        "object": "chat.completion",
        "model": backend,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


class FakeClient:
    """Stands in for `BackendClient`. `script[name]` lists what successive calls to a backend do: raise an
    exception, return a dict (complete) or yield a list of chunks (stream), or `HANG`."""

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []  # (kind, backend, body sent)

    async def _outcome(self, kind: str, backend: BackendConfig, body: dict[str, Any]) -> Any:
        self.calls.append((kind, backend.name, body))
        queue = self.script.get(backend.name)
        outcome = queue.pop(0) if queue else None
        if outcome == HANG:
            await asyncio.Event().wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def complete(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> dict[str, Any]:
        outcome = await self._outcome("complete", backend, body)
        return outcome if outcome is not None else reply(backend.name)

    async def stream(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        outcome = await self._outcome("stream", backend, body)
        chunks = outcome if outcome is not None else [{"choices": [{"index": 0, "delta": {"content": "hi"}}]}]
        return relay(chunks)

    @property
    def backends(self) -> list[str]:
        return [name for _, name, _ in self.calls]


async def relay(chunks: list[Any]) -> AsyncGenerator[dict[str, Any], None]:
    for chunk in chunks:
        await asyncio.sleep(0)
        if isinstance(chunk, BaseException):
            raise chunk
        yield chunk


class Records:
    """A request-log sink."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def submit(self, record: RequestRecord) -> bool:
        self.records.append(record)
        return True


def rule_models(policy: Policy) -> RouteModels:
    r = policy.router
    return RouteModels(
        LongPromptRule(r.default_tier, r.large_tier, r.large_if_prompt_tokens_over), OutputLengthHeuristic()
    )


@dataclass
class Harness:
    """`Pipeline.run` in-process: the fake client, real admission, optional cache entries and embedder."""

    policy: Policy
    client: FakeClient
    pipeline: Pipeline
    admission: Admission
    telemetry: Telemetry
    log: Records

    def in_flight(self) -> dict[str, int]:
        return {name: state.in_flight for name, state in self.admission.states.items()}

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.telemetry.metrics.registry.get_sample_value(name, labels or {})


def harness(
    policy: Policy | None = None,
    client: FakeClient | None = None,
    *,
    models: RouteModels | None = None,
    **parts: Any,
) -> Harness:
    """`parts`: Pipeline's keyword parts (entries, embed, limiter, authenticator, samples)."""
    policy = policy or make_policy()
    client = client or FakeClient()
    admission = parts.pop("admission", None) or Admission(
        policy.backends, policy.admission, policy.circuit_breaker
    )
    telemetry = Telemetry.from_config(TelemetryConfig())
    log = Records()
    pipeline = Pipeline(
        policy,
        cast(BackendClient, client),
        admission,
        telemetry,
        models or rule_models(policy),
        sink=log,
        **parts,
    )
    return Harness(policy, client, pipeline, admission, telemetry, log)
