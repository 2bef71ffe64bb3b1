"""`icgate.Gateway` as a user meets it: the contract of issue 14, the SDK's own types, errors,
streams, timeouts and cancellation, through real stand-in backends on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa

import icgate
from icgate.gateway.config import Policy
from icgate.gateway.store import keys, tables
from tests.gateway.conftest import Standins, standin_policy

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def policy_for(standins: Standins, **overrides: Any) -> Policy:
    return standin_policy(standins, "http", **overrides)


def in_flight(gw: icgate.Gateway) -> int:
    return sum(int(s["in_flight"] or 0) for s in gw.core.admission.snapshot().values())


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_the_async_contract(standins: Standins, tmp_path: Path) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"))
        assert type(client) is openai.AsyncOpenAI
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
        assert raw.headers["x-icgate-route"] == "small"
        assert raw.headers["x-icgate-backend"] == "small"
        completion = raw.parse()
        assert isinstance(completion, openai.types.chat.ChatCompletion)
        assert completion.choices[0].message.content == "small-model says: What is the capital of France?"
        # the request went through the pipeline to the backend, not to api.openai.com
        assert len(standins.small.received) == 1
        assert standins.small.received[0]["body"]["model"] == "small-model"


def test_the_sync_contract_keeps_the_clients_settings(standins: Standins, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy_for(standins).model_dump_json())  # a policy file, as a user passes one
    with icgate.Gateway(policy=str(policy_file), data_dir=tmp_path / "d2", launch_local=False) as gw:
        original = openai.OpenAI(
            api_key="unused", max_retries=5, timeout=7.0, default_headers={"x-team": "a"}
        )
        client = gw.wrap(original)
        assert type(client) is openai.OpenAI
        assert (client.api_key, client.max_retries, client.timeout) == ("unused", 5, 7.0)
        assert client.default_headers["x-team"] == "a"
        raw = client.chat.completions.with_raw_response.create(model="large", messages=QUESTION)
        assert raw.headers["x-icgate-backend"] == "large"
        assert raw.parse().choices[0].message.content == "large-model says: What is the capital of France?"
        # every other endpoint is the HTTP API's own
        assert "auto" in [m.id for m in client.models.list().data]
        completion = client.completions.create(model="small", prompt="Say hi")
        assert completion.choices[0].text == "small-model says: Say hi"


async def test_a_stream_arrives_chunk_by_chunk_not_buffered(standins: Standins, tmp_path: Path) -> None:
    """The backend sends its first chunk and then stalls for a minute: the first chunk must reach the
    caller while the backend still holds the rest (a buffering transport would wait out the minute)."""
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"))
        stall = {"x_standin": {"stall_after_first_s": 60}}
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=QUESTION, stream=True, extra_body=stall
        )
        assert raw.headers["x-icgate-route"] == "small"
        stream = raw.parse()
        first = await asyncio.wait_for(anext(stream.__aiter__()), timeout=20)
        assert first.choices[0].delta.content == "small-model"
        assert in_flight(gw) == 1
        await stream.close()  # the caller stops reading: the relay closes and the slot is given back
        await eventually(lambda: in_flight(gw) == 0)


async def test_a_whole_stream_says_what_the_answer_says(standins: Standins, tmp_path: Path) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"))
        stream = await client.chat.completions.create(model="auto", messages=QUESTION, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "small-model says: What is the capital of France?"


def test_a_sync_stream_is_relayed_from_the_gateways_loop(standins: Standins, tmp_path: Path) -> None:
    with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.OpenAI(api_key="unused"))
        stream = client.chat.completions.create(model="auto", messages=QUESTION, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "small-model says: What is the capital of France?"
        stalled = client.chat.completions.create(
            model="auto",
            messages=QUESTION,
            stream=True,
            extra_body={"x_standin": {"stall_after_first_s": 60}},
        )
        assert next(iter(stalled)).choices[0].delta.content == "small-model"
        stalled.close()
        deadline = time.monotonic() + 5
        while in_flight(gw) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert in_flight(gw) == 0


async def test_errors_are_the_sdks_own_classes(standins: Standins, tmp_path: Path) -> None:
    policy = policy_for(
        standins,
        auth={"required": True},
        admission={"tenants": {"metered": {"requests_per_min": 1}}},
    )
    async with icgate.Gateway(policy=policy, data_dir=tmp_path, launch_local=False) as gw:
        assert gw.core.engine is not None
        free, metered = (keys.create_key(gw.core.engine, name).key for name in ("free", "metered"))
        with pytest.raises(openai.AuthenticationError) as denied:
            await gw.wrap(openai.AsyncOpenAI(api_key="sk-wrong")).chat.completions.create(
                model="auto", messages=QUESTION
            )
        assert denied.value.code == "invalid_api_key"
        client = gw.wrap(openai.AsyncOpenAI(api_key=free, max_retries=0))
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=QUESTION)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="auto", messages=QUESTION, temperature="hot")  # type: ignore[arg-type]
        assert bad.value.param == "temperature"
        client = gw.wrap(openai.AsyncOpenAI(api_key=metered, max_retries=0))
        await client.chat.completions.create(model="auto", messages=QUESTION)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="auto", messages=QUESTION)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.response.headers["x-icgate-request-id"].startswith("req-")


async def test_a_cancelled_call_gives_its_backend_slot_back(standins: Standins, tmp_path: Path) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused", max_retries=0))
        call = asyncio.create_task(
            client.chat.completions.create(
                model="auto", messages=QUESTION, extra_body={"x_standin": {"hang_s": 60}}
            )
        )
        await eventually(lambda: in_flight(gw) == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: in_flight(gw) == 0)


async def test_the_sdks_timeout_ends_the_call_and_frees_the_slot(standins: Standins, tmp_path: Path) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused", max_retries=0, timeout=0.5))
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="auto", messages=QUESTION, extra_body={"x_standin": {"hang_s": 60}}
            )
        await eventually(lambda: in_flight(gw) == 0)


async def test_a_wrapped_tenant_is_the_tenant_of_record(standins: Standins, tmp_path: Path) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.AsyncOpenAI(api_key="unused"), tenant="acme")
        raw = await client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
        request_id = raw.headers["x-icgate-request-id"]
        engine = gw.core.engine
        assert engine is not None and gw.core.log_writer is not None
        await gw.core.log_writer.flush()
        with engine.connect() as conn:
            tenant_id = conn.execute(
                sa.select(tables.RequestLog.tenant_id).where(tables.RequestLog.request_id == request_id)
            ).scalar_one()
            name = conn.execute(
                sa.select(tables.TenantRow.name).where(tables.TenantRow.id == tenant_id)
            ).scalar_one()
        assert name == "acme"


async def test_a_sync_client_on_the_gateways_own_loop_is_refused_not_deadlocked(
    standins: Standins, tmp_path: Path
) -> None:
    async with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.OpenAI(api_key="unused", max_retries=0))
        with pytest.raises(openai.APIConnectionError) as refused:
            client.chat.completions.create(model="auto", messages=QUESTION)
        assert "own event loop" in str(refused.value.__cause__)
        # from a worker thread the same client works
        answer = await asyncio.to_thread(client.chat.completions.create, model="auto", messages=QUESTION)
        assert answer.choices[0].message.content == "small-model says: What is the capital of France?"


def test_wrap_needs_an_open_gateway_and_an_openai_client(standins: Standins, tmp_path: Path) -> None:
    gw = icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False)
    with pytest.raises(RuntimeError, match="open the gateway first"):
        gw.wrap(openai.OpenAI(api_key="unused"))
    with gw, pytest.raises(TypeError, match=r"openai\.OpenAI or openai\.AsyncOpenAI"):
        gw.wrap(object())  # type: ignore[type-var]


def test_closing_flushes_the_request_log(standins: Standins, tmp_path: Path) -> None:
    with icgate.Gateway(policy=policy_for(standins), data_dir=tmp_path, launch_local=False) as gw:
        client = gw.wrap(openai.OpenAI(api_key="unused"))
        ids = [
            client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION).headers[
                "x-icgate-request-id"
            ]
            for _ in range(3)
        ]
        url = gw.core.database_url
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        logged = conn.execute(sa.select(tables.RequestLog.request_id)).scalars().all()
    engine.dispose()
    assert sorted(logged) == sorted(ids)
