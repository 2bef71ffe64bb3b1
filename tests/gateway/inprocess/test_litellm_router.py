"""LiteLLM users' two paths: LiteLLM (library Router, and the proxy) in front of icgate over HTTP, and
icgate inside LiteLLM in-process (`attach` on a Router, or a wrapped client handed to litellm)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import litellm
import litellm.exceptions as litellm_errors
import openai
import pytest
import sqlalchemy as sa
from litellm.router import Router

import icgate
from bench.litellm_proxy import Deployment, LiteLLMProxy, ensure_proxy_venv, write_config
from icgate.gateway.config import Policy
from icgate.gateway.inprocess.litellm_router import IcgateRouting, attach, detach
from icgate.gateway.store import tables
from icgate.gateway.wiring import EmbeddingService
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Summarise this: " + "the tide comes in and goes out " * 60}]


def headers_of(response: Any) -> dict[str, str]:
    return dict(response._hidden_params["additional_headers"])


# --- LiteLLM in front of icgate, over HTTP ------------------------------------------------------------


async def test_a_litellm_router_in_front_of_icgate_sees_its_headers(
    standins: Standins, start_gateway: Callable[[Policy], RunningGateway]
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    router = Router(
        model_list=[
            {
                "model_name": "icgate",
                "litellm_params": {"model": "openai/auto", "api_base": gw.url + "/v1", "api_key": "unused"},
            }
        ]
    )
    response = await router.acompletion(model="icgate", messages=QUESTION)
    assert response.choices[0].message.content == "small-model says: What is the capital of France?"
    assert headers_of(response)["llm_provider-x-icgate-route"] == "small"
    stream = await router.acompletion(model="icgate", messages=QUESTION, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]).startswith("small-model says")
    assert stream._hidden_params["additional_headers"]["llm_provider-x-icgate-backend"] == "small"


@pytest.fixture(scope="session")
def litellm_proxy_exe() -> Path:
    """LiteLLM's proxy (`litellm[proxy]`, the same version) in its own venv, installed once (~40 s)."""
    return ensure_proxy_venv()


def test_the_litellm_proxy_in_front_of_icgate_passes_its_headers_on(
    standins: Standins,
    start_gateway: Callable[[Policy], RunningGateway],
    litellm_proxy_exe: Path,
    tmp_path: Path,
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    config = write_config(
        tmp_path / "litellm.yaml", [Deployment("auto", gw.url + "/v1", "icgate")], "simple-shuffle"
    )
    with LiteLLMProxy(config, exe=litellm_proxy_exe) as proxy:
        client = openai.OpenAI(api_key=proxy.master_key, base_url=proxy.base_url + "/v1", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="sim", messages=QUESTION)
        assert raw.headers["llm_provider-x-icgate-route"] == "small"
        assert raw.parse().choices[0].message.content == "small-model says: What is the capital of France?"
        with client.chat.completions.with_streaming_response.create(
            model="sim", messages=QUESTION, stream=True
        ) as streamed:
            assert streamed.headers["llm_provider-x-icgate-backend"] == "small"
            assert "small-model" in streamed.read().decode()


# --- icgate inside LiteLLM, in-process ----------------------------------------------------------------


async def test_litellm_with_a_wrapped_client_runs_the_whole_pipeline(
    standins: Standins, tmp_path: Path
) -> None:
    async with icgate.Gateway(standin_policy(standins, "http"), tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"))
        response = await litellm.acompletion(model="openai/auto", messages=LONG, client=client)
        assert headers_of(response)["llm_provider-x-icgate-route"] == "large"  # the rule router: long prompt
        assert len(standins.large.received) == 1


def routed_router(standins: Standins) -> Router:
    """A group `auto` whose deployments are the policy's backends by name (`model_info.id`)."""
    return Router(
        model_list=[
            {
                "model_name": "auto",
                "litellm_params": {"model": f"openai/{name}-model", "api_base": url + "/v1", "api_key": "x"},
                "model_info": {"id": name},
            }
            for name, url in (("small", standins.small_url), ("large", standins.large_url))
        ],
        num_retries=0,
    )


@pytest.fixture
def attached() -> Iterator[list[IcgateRouting]]:
    """Every `attach` of a test is detached after it: LiteLLM's callback list is process-wide."""
    made: list[IcgateRouting] = []
    yield made
    for routing in made:
        detach(routing)


def logged(gw: icgate.Gateway) -> list[tuple[Any, ...]]:
    engine = gw.core.engine
    assert engine is not None
    table = tables.RequestLog
    query = sa.select(table.route, table.backend, table.status_code, table.error_type, table.decisions)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query.order_by(table.id))]


async def wait_for_rows(gw: icgate.Gateway, n: int) -> list[tuple[Any, ...]]:
    """LiteLLM reports outcomes in the background and the log is written behind: wait for `n` rows."""
    assert gw.core.log_writer is not None
    deadline = time.monotonic() + 10
    while True:
        await gw.core.log_writer.flush()
        rows = logged(gw)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_attach_lets_icgate_pick_the_deployment_answer_from_cache_and_add_examples(
    standins: Standins, shared_embeddings: EmbeddingService, tmp_path: Path, attached: list[IcgateRouting]
) -> None:
    policy = standin_policy(
        standins, "http", cache={"enabled": True, "semantic": False, "sync_interval_s": 0.2}
    )
    async with icgate.Gateway(policy, tmp_path, launch_local=False, embeddings=shared_embeddings) as gw:
        router = routed_router(standins)
        attached.append(attach(gw, router))
        first = await router.acompletion(model="auto", messages=QUESTION)
        assert first.choices[0].message.content == "small-model says: What is the capital of France?"
        long = await router.acompletion(model="auto", messages=LONG)  # icgate's rule router: the large tier
        assert long.choices[0].message.content.startswith("large-model says")
        await wait_for_rows(gw, 2)
        cache = gw.core.cache_entries
        assert cache is not None
        deadline = time.monotonic() + 10
        while cache._inserts and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # the same question again: icgate's exact hit, answered without calling any deployment
        again = await router.acompletion(model="auto", messages=QUESTION)
        assert again.choices[0].message.content == first.choices[0].message.content
        assert (len(standins.small.received), len(standins.large.received)) == (1, 1)
        # a similar question: the first answer goes with it as an example; the caller's list is untouched
        similar = [{"role": "user", "content": "What is the capital city of France?"}]
        await router.acompletion(model="auto", messages=similar)
        sent = standins.small.received[-1]["body"]["messages"]
        assert [m["content"] for m in sent] == [
            "What is the capital of France?",
            "small-model says: What is the capital of France?",
            "What is the capital city of France?",
        ]
        assert similar == [{"role": "user", "content": "What is the capital city of France?"}]
        # a stream, chosen and recorded alike
        stream = await router.acompletion(
            model="auto", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "small-model says: Hi"
        # a failing deployment: LiteLLM's own error, icgate's row says so
        standins.small.fail_next = 1
        with pytest.raises(litellm_errors.InternalServerError):
            await router.acompletion(model="auto", messages=[{"role": "user", "content": "Fail now"}])
        rows = await wait_for_rows(gw, 6)
    assert [(route, backend, status) for route, backend, status, _, _ in rows] == [
        ("small", "small", 200),
        ("large", "large", 200),
        ("cache", None, 200),
        ("small", "small", 200),
        ("small", "small", 200),
        ("small", "small", 500),
    ]
    assert rows[3][4]["examples"]  # the examples' entries are on record
    assert rows[5][3] == "InternalServerError"


async def test_icgates_refusals_are_litellms_exceptions(
    standins: Standins, tmp_path: Path, attached: list[IcgateRouting]
) -> None:
    policy = standin_policy(standins, "http", admission={"tenants": {"metered": {"requests_per_min": 1}}})
    async with icgate.Gateway(policy, tmp_path, launch_local=False) as gw:
        router = routed_router(standins)
        routing = attach(gw, router, tenant="metered")
        attached.append(routing)
        await router.acompletion(model="auto", messages=QUESTION)
        with pytest.raises(litellm_errors.RateLimitError):
            await router.acompletion(model="auto", messages=QUESTION)
        with pytest.raises(litellm_errors.BadRequestError):
            await router.acompletion(model="auto", messages=QUESTION, temperature="hot")
        assert len(standins.small.received) == 1


def test_attach_works_for_a_sync_router_on_a_sync_gateway(
    standins: Standins, tmp_path: Path, attached: list[IcgateRouting]
) -> None:
    with icgate.Gateway(standin_policy(standins, "http"), tmp_path, launch_local=False) as gw:
        router = routed_router(standins)
        routing = attach(gw, router)
        attached.append(routing)
        response = router.completion(model="auto", messages=LONG)
        assert response.choices[0].message.content.startswith("large-model says")
        assert (len(standins.small.received), len(standins.large.received)) == (0, 1)
        writer = gw.core.log_writer
        assert writer is not None
        deadline = time.monotonic() + 10
        while not logged(gw) and time.monotonic() < deadline:  # LiteLLM reports from its logging thread
            time.sleep(0.1)
            gw.bridge.call(writer.flush())
        assert [row[:3] for row in logged(gw)] == [("large", "large", 200)]
        assert not routing._pending


async def test_two_attached_routers_both_hear_of_their_outcomes(
    standins: Standins, tmp_path: Path, attached: list[IcgateRouting]
) -> None:
    """LiteLLM keeps one callback per class and public fields: each attach must still be its own."""
    async with icgate.Gateway(standin_policy(standins, "http"), tmp_path, launch_local=False) as gw:
        routers = [routed_router(standins), routed_router(standins)]
        attached.extend(attach(gw, router) for router in routers)
        for router in routers:
            await router.acompletion(model="auto", messages=QUESTION)
        rows = await wait_for_rows(gw, 2)
        assert [row[:3] for row in rows] == [("small", "small", 200)] * 2
        assert not attached[0]._pending and not attached[1]._pending


async def test_an_advised_call_counts_litellms_call_as_backend_time_not_icgates(
    standins: Standins, tmp_path: Path, attached: list[IcgateRouting]
) -> None:
    async with icgate.Gateway(standin_policy(standins, "http"), tmp_path, launch_local=False) as gw:
        router = routed_router(standins)
        attached.append(attach(gw, router))
        slow = {"x_standin": {"delay_ms": 400}}  # LiteLLM passes it on; icgate's decisions ignore it
        await router.acompletion(model="auto", messages=QUESTION, extra_body=slow)
        await wait_for_rows(gw, 1)
        engine = gw.core.engine
        assert engine is not None
        with engine.connect() as conn:
            latency, overhead = conn.execute(
                sa.select(tables.RequestLog.latency_ms, tables.RequestLog.overhead_ms)
            ).one()
    assert latency >= 400  # the row spans the whole call ...
    assert overhead < latency - 300  # ... and icgate's own share ends with its advice
