"""Admission through the HTTP API, under real concurrent load on loopback.

The backends are vLLM-like simulators (bench/simulator): real HTTP servers whose timing follows
continuous batching and which count the requests they run. Here they decode at a fixed 20 ms per
token whatever the batch, so a request of `max_tokens: 40` holds its slot for about 0.8 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bench.simulator.engine import EngineConfig
from bench.simulator.server import Simulator, running_simulator
from icgate.gateway.config import Policy
from icgate.gateway.store import keys
from tests.gateway.conftest import RunningGateway, two_tier_policy

StartGateway = Callable[[Policy], RunningGateway]
STEADY = {
    "decode_ms_base": 20.0,
    "decode_ms_per_seq": 0.0,
    "prefill_ms_per_token": 0.0,
    "prefill_ms_base": 5.0,
}


@dataclass
class Sims:
    small: Simulator
    large: Simulator
    small_url: str
    large_url: str


@pytest.fixture
def sims() -> Iterator[Sims]:
    small = Simulator(EngineConfig.small(**STEADY), model_name="sim-small")
    large = Simulator(EngineConfig.large(**STEADY), model_name="sim-large")
    with running_simulator(small) as small_url, running_simulator(large) as large_url:
        yield Sims(small, large, small_url, large_url)


def sim_policy(sims: Sims, small: dict[str, Any] | None = None, **overrides: Any) -> Policy:
    """Two simulated tiers; the gateway's priors match their steady 20 ms per token."""
    common = {"client": "http", "expected_ttft_ms": 30, "expected_tpot_ms": 20}
    return two_tier_policy(
        sims.small_url, sims.large_url, ("sim-small", "sim-large"), common, small, **overrides
    )


def chat(model: str, max_tokens: int, words: int = 5, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": " ".join(["word"] * words)}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@dataclass
class Outcome:
    status: int
    headers: httpx.Headers
    body: dict[str, Any] | None
    sent: float
    first_byte: float  # response headers in hand
    ended: float


async def post(http: httpx.AsyncClient, body: dict[str, Any], key: str | None = None) -> Outcome:
    """One request; for a stream, reads it to the end."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    sent = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        first_byte = time.perf_counter()
        raw = await resp.aread()
    ended = time.perf_counter()
    streamed_ok = body.get("stream") and resp.status_code == 200
    parsed = None if streamed_ok else httpx.Response(200, content=raw).json()
    return Outcome(resp.status_code, resp.headers, parsed, sent, first_byte, ended)


async def test_contract_max_concurrent_queue_and_429_for_a_backend_addressed_by_name(
    sims: Sims, start_gateway: StartGateway
) -> None:
    # The contract as written: `max_concurrent: 2` and `admission: ttft_slo_ms: 1500`.
    gw = start_gateway(sim_policy(sims, small={"max_concurrent": 2}, admission={"ttft_slo_ms": 1500}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        outcomes = await asyncio.gather(*(post(http, chat("small", 40, stream=True)) for _ in range(10)))
    admitted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    assert len(admitted) + len(refused) == 10
    # Two at once, about 0.8 s each: two more can start within 1.5 s, the rest cannot. The objective
    # counts from arrival, so when the gateway itself took over half a second to start the first two
    # (CI runs the suite under coverage, client, gateway and simulators in one process), the next two
    # cannot make it either and refusing them at arrival is right.
    own_delay = min(o.first_byte - o.sent for o in admitted)
    statuses = [o.status for o in outcomes]
    assert (3 if own_delay < 0.6 else 2) <= len(admitted) <= 6, (statuses, own_delay)
    assert sims.small.engine.max_running_seen == 2
    assert sims.small.engine.requests_served == len(admitted)
    assert sims.large.engine.requests_served == 0  # addressed by name: never spilled
    queued = [float(o.headers["x-icgate-queue-ms"]) for o in admitted]
    assert sum(1 for q in queued if q > 300) == len(admitted) - 2  # the rest waited for a slot, and it shows
    for o in refused:
        assert int(o.headers["retry-after"]) >= 1
        assert o.body is not None
        error = o.body["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "backend_at_capacity")
        assert "1500 ms" in error["message"]
        # Refused at arrival, not after holding it until the objective had passed.
        assert o.ended - o.sent < 1.5
    snapshot = gw.gateway.admission.snapshot()["small"]
    assert snapshot["in_flight"] == 0 and snapshot["waiting"] == 0
    assert snapshot["served"] == len(admitted)
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'icgate_admission_total{{backend="small",outcome="refused"}} {len(refused)}.0' in metrics
    assert f'icgate_admission_backend_served{{backend="small"}} {len(admitted)}.0' in metrics
    assert 'icgate_admission_backend_waiting{backend="small"} 0.0' in metrics


async def test_a_streamed_request_gets_its_first_byte_only_once_admitted(
    sims: Sims, start_gateway: StartGateway
) -> None:
    gw = start_gateway(sim_policy(sims, small={"max_concurrent": 1}))
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        holder = asyncio.create_task(post(http, chat("small", 40)))
        while sims.small.engine.num_running == 0:
            await asyncio.sleep(0.01)
        streamed = await post(http, chat("small", 5, stream=True))
        held = await holder
    assert held.status == streamed.status == 200
    assert streamed.first_byte >= held.ended - 0.05  # nothing reached the client while it queued
    assert float(streamed.headers["x-icgate-queue-ms"]) > 300


async def test_routed_requests_spill_to_the_other_tier_when_theirs_cannot_meet_the_objective(
    sims: Sims, start_gateway: StartGateway
) -> None:
    policy = sim_policy(sims, small={"max_concurrent": 1}, admission={"ttft_slo_ms": 1000})
    policy.backends[1].max_concurrent = 1
    gw = start_gateway(policy)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        busy_small = asyncio.create_task(post(http, chat("small", 100)))  # ~2 s
        while sims.small.engine.num_running == 0:
            await asyncio.sleep(0.01)
        short = await post(http, chat("auto", 5))  # the rule routes short prompts to small
        by_name = await post(http, chat("small", 5))
        await busy_small
        busy_large = asyncio.create_task(post(http, chat("large", 100)))
        while sims.large.engine.num_running == 0:
            await asyncio.sleep(0.01)
        long = await post(http, chat("auto", 5, words=300))  # routed to large, which is busy
        await busy_large
        calm = await post(http, chat("auto", 5))
    assert short.status == 200
    assert (short.headers["x-icgate-route"], short.headers["x-icgate-backend"]) == ("large", "large")
    assert by_name.status == 429  # addressed by name: refused, never moved
    assert long.status == 200
    assert (long.headers["x-icgate-route"], long.headers["x-icgate-backend"]) == ("small", "small")
    assert calm.headers["x-icgate-backend"] == "small"  # nothing busy: the router's choice stands
    assert sims.large.engine.requests_served == 2 and sims.small.engine.requests_served == 3


async def test_queue_order_is_priority_class_then_shortest_predicted_output(
    sims: Sims, start_gateway: StartGateway
) -> None:
    policy = sim_policy(
        sims,
        small={"max_concurrent": 1},
        auth={"required": True},
        admission={
            "classes": {"interactive": {"rank": 0}, "batch": {"rank": 1}},
            "tenants": {"app": {"priority": "interactive"}, "nightly": {"priority": "batch"}},
            "ageing_tokens_per_s": 0,
        },
    )
    gw = start_gateway(policy)
    assert gw.gateway.engine is not None
    app_key = keys.create_key(gw.gateway.engine, "app").key
    nightly_key = keys.create_key(gw.gateway.engine, "nightly").key
    finished: list[str] = []

    async def one(http: httpx.AsyncClient, name: str, key: str, max_tokens: int) -> None:
        outcome = await post(http, chat("small", max_tokens), key)
        assert outcome.status == 200, outcome.body
        finished.append(name)

    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        holder = asyncio.create_task(one(http, "holder", app_key, 40))
        while sims.small.engine.num_running == 0:
            await asyncio.sleep(0.01)
        order = [
            ("batch-3", nightly_key, 3),
            ("app-20", app_key, 20),
            ("batch-1", nightly_key, 1),
            ("app-5", app_key, 5),
            ("app-10", app_key, 10),
        ]
        tasks = []
        for name, key, max_tokens in order:
            tasks.append(asyncio.create_task(one(http, name, key, max_tokens)))
            await asyncio.sleep(0.05)
        assert gw.gateway.admission.states["small"].waiting == 5
        await asyncio.gather(holder, *tasks)
    assert finished == ["holder", "app-5", "app-10", "app-20", "batch-1", "batch-3"]


async def test_rate_limits_and_budgets_are_enforced_per_tenant(
    sims: Sims, start_gateway: StartGateway
) -> None:
    policy = sim_policy(
        sims,
        small={"cost_per_1k_output": 100.0},  # $0.10 a token: one 20-token answer costs $2
        auth={"required": True},
        admission={
            "tenants": {
                "limited": {"requests_per_min": 3},
                "budgeted": {"budget_usd": 1.0, "budget_window": "day"},
            }
        },
    )
    gw = start_gateway(policy)
    assert gw.gateway.engine is not None
    limited = keys.create_key(gw.gateway.engine, "limited").key
    budgeted = keys.create_key(gw.gateway.engine, "budgeted").key
    free = keys.create_key(gw.gateway.engine, "free").key
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        burst = await asyncio.gather(*(post(http, chat("small", 20), limited) for _ in range(6)))
        others = await asyncio.gather(*(post(http, chat("small", 20), free) for _ in range(6)))
        first = await post(http, chat("small", 20), budgeted)
        await asyncio.sleep(0.1)  # the cost is charged as the answer is recorded
        second = await post(http, chat("small", 20), budgeted)
    assert sorted(o.status for o in burst) == [200] * 3 + [429] * 3
    for o in (o for o in burst if o.status == 429):
        assert o.body is not None and o.body["error"]["code"] == "rate_limit_exceeded"
        assert o.body["error"]["type"] == "requests"
        assert 1 <= int(o.headers["retry-after"]) <= 60
        assert o.headers["x-ratelimit-limit-requests"] == "3"
    assert [o.status for o in others] == [200] * 6
    assert first.status == 200
    assert second.status == 429
    assert second.body is not None and second.body["error"]["code"] == "insufficient_quota"
    assert sims.small.engine.requests_served == 3 + 6 + 1  # nothing refused reached the backend


async def test_backend_signals_are_polled_from_its_metrics_endpoint(
    sims: Sims, start_gateway: StartGateway
) -> None:
    policy = sim_policy(
        sims, small={"metrics_url": sims.small_url + "/metrics"}, admission={"metrics_interval_s": 0.1}
    )
    gw = start_gateway(policy)
    async with httpx.AsyncClient(base_url=sims.small_url, timeout=30) as direct:
        # Another client's load, straight at the backend: the gateway can only learn of it from /metrics.
        others = [asyncio.create_task(post(direct, chat("sim-small", 40))) for _ in range(3)]
        seen = None
        for _ in range(100):
            seen = gw.gateway.admission.snapshot()["small"]["backend_running"]
            if seen == 3:
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*others)
    assert seen == 3
    assert gw.gateway.admission.snapshot()["small"]["in_flight"] == 0


async def test_a_stream_is_as_far_along_as_its_tokens_when_the_backend_sends_several_a_chunk(
    sims: Sims, start_gateway: StartGateway
) -> None:
    """The simulator sends a chunk at most every 50 ms and decodes a token every 20 ms: two or three
    tokens a chunk, as vLLM's stream interval does. Admission counts what the stream relayed in tokens
    (its text), so the request is as far along as the backend says, not half as far."""
    gw = start_gateway(sim_policy(sims))
    state = gw.gateway.admission.states["small"]
    body = {**chat("small", 80, stream=True), "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        streaming = asyncio.create_task(post(http, body))
        while not (state.jobs and sims.small.engine.running and sims.small.engine.running[0].generated >= 40):
            await asyncio.sleep(0.005)
        job = next(iter(state.jobs))
        assert job.produced is not None
        relayed = job.produced()
        counted = state.progress(job, gw.gateway.admission.clock())[1]
        generated = sims.small.engine.running[0].generated if sims.small.engine.running else 80
        done = await streaming
    assert done.status == 200
    assert relayed.chunks < 0.7 * counted  # the chunks did carry several tokens each
    # What the gateway has relayed trails what the backend made by at most a chunk in transit.
    assert generated - 6 <= counted <= generated + 1
    assert state.chars_per_token.estimate == pytest.approx(4.0, abs=0.05)  # "tok " is four characters
