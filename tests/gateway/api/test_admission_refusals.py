"""A 429 says when it came, through a real gateway: `x-icgate-refused: arrival` or `queued`, the same in the
request log, with the wait admission predicted and the wait there was (docs/admission.md).

The backend is a vLLM-like simulator at a steady 20 ms a token; the policy's constant length predictor
(capped by `max_tokens`) makes admission's view of each answer exact or, where a test says so, short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bench.simulator.engine import EngineConfig
from bench.simulator.server import Simulator, running_simulator
from icgate.gateway.config import Policy
from icgate.gateway.store.request_log import LogRow, get_request
from tests.gateway.api.test_admission_api import STEADY, chat, post
from tests.gateway.conftest import RunningGateway, two_tier_policy

StartGateway = Callable[[Policy], RunningGateway]


@pytest.fixture
def sim_url() -> Iterator[str]:
    sim = Simulator(EngineConfig.small(**STEADY), model_name="sim-small")
    with running_simulator(sim) as url:
        yield url


def policy(sim_url: str, predicted_tokens: int) -> Policy:
    common: dict[str, Any] = {"client": "http", "expected_ttft_ms": 30, "expected_tpot_ms": 20}
    return two_tier_policy(
        sim_url,
        sim_url,
        ("sim-small", "sim-small"),
        common,
        {"max_concurrent": 1},
        admission={"ttft_slo_ms": 1500, "spill": False},
        lengths={"predictor": "constant", "constant_tokens": predicted_tokens, "constant_p90_factor": 1.0},
    )


async def logged(gw: RunningGateway, request_id: str) -> LogRow:
    """The request's row, once the write-behind queue has written it."""
    assert gw.gateway.engine is not None
    for _ in range(200):
        row = get_request(gw.gateway.engine, request_id)
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no request log row for {request_id}")


async def test_a_request_that_cannot_start_in_time_is_refused_at_arrival_and_says_so(
    sim_url: str, start_gateway: StartGateway
) -> None:
    gw = start_gateway(policy(sim_url, predicted_tokens=10_000))  # every answer predicted at its max_tokens
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        holder = asyncio.create_task(post(http, chat("small", 150, stream=True)))  # 3 s of decoding
        await asyncio.sleep(0.3)
        refused = await post(http, chat("small", 10))
        assert (await holder).status == 200
    assert refused.status == 429 and refused.body is not None
    assert refused.body["error"]["code"] == "backend_at_capacity"
    assert refused.headers["x-icgate-refused"] == "arrival"
    row = await logged(gw, refused.headers["x-icgate-request-id"])
    admit = row.decisions["admit"]
    assert (row.status_code, admit["at"], admit["waited_ms"]) == (429, "arrival", 0.0)
    assert admit["predicted_wait_ms"] > 1500  # the rest of the holder's 150 tokens


async def test_a_request_told_it_could_wait_and_then_refused_says_it_queued(
    sim_url: str, start_gateway: StartGateway
) -> None:
    gw = start_gateway(policy(sim_url, predicted_tokens=20))  # the holder looks 0.4 s long; it runs 3 s
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        holder = asyncio.create_task(post(http, chat("small", 150, stream=True)))
        await asyncio.sleep(0.2)
        refused = await post(http, chat("small", 10))
        assert (await holder).status == 200
    assert refused.status == 429 and refused.body is not None
    assert refused.body["error"]["code"] == "backend_at_capacity"
    assert refused.headers["x-icgate-refused"] == "queued"
    row = await logged(gw, refused.headers["x-icgate-request-id"])
    admit = row.decisions["admit"]
    assert (row.status_code, admit["at"]) == (429, "queued")
    assert admit["predicted_wait_ms"] < 1000 < admit["waited_ms"]  # gave up at its deadline, ~1.4 s
    assert row.queue_ms == pytest.approx(admit["waited_ms"], abs=1)  # queueing, not the gateway's overhead
