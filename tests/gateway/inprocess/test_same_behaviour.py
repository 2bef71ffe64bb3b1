"""One scenario, played over HTTP and in-process: the decisions must be identical.

The scenario touches every decision the pipeline makes for a caller: a routed request and its router
score, an exact hit, a semantic hit, tenant isolation, examples prepended for the small tier, a fallback
after a backend error, a rate-limit refusal, a stream, and the request-log rows all of them leave. Real
parts: the packaged MiniLM, the shipped verifier and router, SQLite; stand-in backends on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa

import icgate
from icgate.gateway.config import Policy
from icgate.gateway.store import keys, tables
from icgate.gateway.store.request_log import LogFilter, list_requests
from icgate.gateway.wiring import EmbeddingService
from icgate.gateway.wiring import Gateway as Core
from tests.gateway.conftest import RunningGateway, Standins, settle_cache, standin_policy

# The headers that carry decisions (not timings, not ids).
DECISION_HEADERS = (
    "x-icgate-route",
    "x-icgate-backend",
    "x-icgate-fallback-from",
    "x-icgate-cache-skipped",
    "x-icgate-similarity",
    "x-icgate-examples",
    "x-icgate-router-score",
    "x-icgate-predicted-tokens",
)
# Request-log decisions that differ from run to run by nature: times, ids of rows and requests.
VOLATILE = {"entry", "examples", "ms", "wait_ms", "embed_ms", "verify_ms", "lookup_ms", "request_id"}


def scenario_policy(standins: Standins) -> Policy:
    return standin_policy(
        standins,
        "http",
        auth={"required": True},
        router={"kind": "learned"},
        cache={
            "enabled": True,
            "sync_interval_s": 0.2,
            # requests naming `small` get examples (and no semantic hits), so one step can show them
            "models": {"small": {"examples": True, "semantic": False}},
        },
        admission={"tenants": {"metered": {"requests_per_min": 1}}},
    )


class Channel:
    """How the scenario reaches a gateway: an `openai.OpenAI` client per key, and the gateway's parts."""

    def __init__(self, core: Core, client_for: Callable[[str], openai.OpenAI]) -> None:
        self.core = core
        self.client_for = client_for

    def settle(self) -> None:
        settle_cache(self.core)


def observe(raw: Any) -> dict[str, Any]:
    seen = {name: raw.headers.get(name) for name in DECISION_HEADERS}
    seen["status"] = raw.status_code
    return seen


def play(channel: Channel, standins: Standins) -> dict[str, Any]:
    """The scenario; returns what a caller, the backends and the request log saw."""
    engine = channel.core.engine
    assert engine is not None
    alice, bob, metered = (keys.create_key(engine, name).key for name in ("alice", "bob", "metered"))
    seen: list[dict[str, Any]] = []

    def ask(key: str, text: str, model: str = "auto", **extra: Any) -> str:
        client = channel.client_for(key)
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}], temperature=0, **extra
        )
        seen.append(observe(raw))
        return str(raw.parse().choices[0].message.content)

    question, paraphrase = "How do I reset my password?", "How can I reset my password?"
    ask(alice, question)  # routed: the learned router's score
    channel.settle()
    ask(alice, question)  # exact hit
    ask(alice, paraphrase)  # semantic hit
    ask(bob, paraphrase)  # another tenant: no hit from alice's entries
    ask(alice, "What is the capital of France?", model="large")
    channel.settle()
    ask(alice, "What is the capital city of France?", model="small")  # an example prepended
    standins.small.fail_next = 1
    ask(alice, "Name three prime numbers.", model="small")  # small fails: the fallback serves
    ask(metered, "What is 2 + 2?")
    with pytest.raises(openai.RateLimitError) as limited:
        ask(metered, "What is 3 + 3?")
    seen.append({"status": 429, "retry-after": limited.value.response.headers["retry-after"] is not None})
    stream = channel.client_for(alice).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Tell me about tides."}], stream=True
    )
    seen.append(observe(stream))
    streamed = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert channel.core.log_writer is not None
    time.sleep(0.2)
    flush(channel.core)
    return {
        "responses": seen,
        "streamed": streamed,
        "small received": [r["body"]["messages"] for r in standins.small.received],
        "large received": [r["body"]["messages"] for r in standins.large.received],
        "log": logged(engine),
    }


def flush(core: Core) -> None:
    """The request log is written behind the responses: wait for it (from the test's thread)."""
    assert core.engine is not None and core.log_writer is not None
    deadline = time.monotonic() + 10
    with core.engine.connect() as conn:
        while time.monotonic() < deadline:
            count = conn.execute(sa.select(sa.func.count()).select_from(tables.RequestLog)).scalar_one()
            if count >= 10:
                return
            time.sleep(0.05)


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def logged(engine: sa.Engine) -> list[dict[str, Any]]:
    """The request log in order, as the console reads it, minus what differs between runs by nature."""
    keep = (
        "tenant",
        "endpoint",
        "model_requested",
        "route",
        "backend",
        "fallback_from",
        "stream",
        "status_code",
        "error_type",
        "prompt_tokens",
        "completion_tokens",
        "decisions",
    )
    rows = reversed(list_requests(engine, LogFilter(), limit=1000))
    return [strip({name: getattr(row, name) for name in keep}) for row in rows]


@contextmanager
def over_http(
    policy: Policy, start_gateway: Callable[..., RunningGateway], data_dir: Path
) -> Iterator[Channel]:
    running = start_gateway(policy, data_dir)

    def client_for(key: str) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=running.url + "/v1", max_retries=0)

    yield Channel(running.gateway, client_for)


@contextmanager
def in_process(policy: Policy, embeddings: EmbeddingService, data_dir: Path) -> Iterator[Channel]:
    with icgate.Gateway(policy, data_dir, launch_local=False, embeddings=embeddings) as gw:
        yield Channel(gw.core, lambda key: gw.wrap(openai.OpenAI(api_key=key, max_retries=0)))


def test_http_and_in_process_decide_the_same(
    standins: Standins,
    start_gateway: Callable[..., RunningGateway],
    shared_embeddings: EmbeddingService,
    tmp_path: Path,
) -> None:
    policy = scenario_policy(standins)
    with over_http(policy, start_gateway, tmp_path / "http") as channel:
        http = play(channel, standins)
    standins.reset()
    with in_process(policy, shared_embeddings, tmp_path / "inprocess") as channel:
        inprocess = play(channel, standins)
    # The scenario did what it claims, so that equality below is not the equality of two failures.
    routes = [r.get("x-icgate-route") for r in http["responses"]]
    assert routes == ["small", "cache", "cache", "small", "large", "small", "large", "small", None, "small"]
    assert http["responses"][0]["x-icgate-router-score"] is not None
    assert http["responses"][1]["x-icgate-similarity"] == "1.0000"  # exact
    assert 0.9 < float(http["responses"][2]["x-icgate-similarity"]) < 1  # semantic
    assert http["responses"][3]["x-icgate-similarity"] is None  # bob never scores against alice's entry
    assert http["responses"][5]["x-icgate-examples"] == "1"
    assert http["small received"][2][0]["content"] == "What is the capital of France?"  # the example
    assert http["responses"][6]["x-icgate-fallback-from"] == "small"
    assert http["responses"][8] == {"status": 429, "retry-after": True}
    assert http["streamed"] == "small-model says: Tell me about tides."
    assert [row["status_code"] for row in http["log"]].count(429) == 1
    assert [row["tenant"] for row in http["log"]][:4] == ["alice", "alice", "alice", "bob"]
    # ... and in-process decided the same, step by step, down to the request log.
    assert inprocess == http
