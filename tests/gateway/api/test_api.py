"""The OpenAI-compatible API over real HTTP, with the official client, against stand-in backends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from icgate.gateway.config import Policy
from icgate.gateway.store import keys
from icgate.gateway.store.db import make_engine
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[[Policy], RunningGateway]


def client(gw: RunningGateway, key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def test_chat_routed_auto_goes_to_small_and_explains_itself(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello gateway"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "small-model says: hello gateway"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert raw.headers["x-icgate-route"] == "small"
    assert raw.headers["x-icgate-backend"] == "small"
    assert raw.headers["x-icgate-request-id"].startswith("req-")
    assert float(raw.headers["x-icgate-overhead-ms"]) >= 0
    assert len(standins.small.received) == 1 and not standins.large.received


def test_long_prompt_routes_to_large_and_named_backend_is_pass_through(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    long = "word " * 400  # ~500 estimated tokens > 200 in the policy
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": long}], max_tokens=3
    )
    assert raw.headers["x-icgate-route"] == "large"
    assert raw.parse().choices[0].message.content == "large-model says: word"
    raw = client(gw).chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "short"}]
    )
    assert raw.headers["x-icgate-backend"] == "large"
    assert raw.parse().choices[0].message.content == "large-model says: short"


def test_streaming_with_usage(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    stream = client(gw).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "small-model says: one two three"
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 5
    assert standins.small.received[0]["body"]["stream_options"] == {"include_usage": True}


def test_stream_sse_framing_and_headers(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    body = {"model": "small", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-icgate-route"] == "small"
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_endpoint(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    completion = client(gw).completions.create(model="small", prompt="complete me", max_tokens=3)
    assert completion.choices[0].text == "small-model says: complete"
    assert standins.small.received[0]["path"] == "/v1/completions"
    stream = client(gw).completions.create(model="small", prompt="a b", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "small-model says: a b"


def test_models_lists_routed_names_backends_and_embedder(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    ids = [m.id for m in client(gw).models.list()]
    assert ids == ["auto", "small", "large", "all-MiniLM-L6-v2"]


def test_unknown_fields_pass_through(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    client(gw).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "x", "name": "alice"}],
        seed=7,
        extra_body={"top_k": 5, "repetition_penalty": 1.1, "guided_json": {"type": "object"}},
    )
    sent = standins.small.received[0]["body"]
    assert sent["top_k"] == 5 and sent["repetition_penalty"] == 1.1
    assert sent["guided_json"] == {"type": "object"}
    assert sent["seed"] == 7
    assert sent["messages"][0]["name"] == "alice"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "auto"}, 400, "messages"),
        ({"model": "auto", "messages": []}, 400, "messages"),
        ({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        (
            {"model": "auto", "messages": [{"role": "user", "content": "x"}], "temperature": 7},
            400,
            "temperature",
        ),
        (
            {"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ({"model": "auto", "messages": "hello"}, 400, "messages"),
        ({"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_input_gets_openai_error(
    standins: Standins,
    start_gateway: StartGateway,
    transport: str,
    body: dict[str, object],
    status: int,
    param: str,
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in resp.text
    assert not standins.small.received and not standins.large.received


def test_malformed_json_and_unknown_path(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = httpx.post(
        gw.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.get(gw.url + "/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()


def test_openai_client_raises_typed_errors(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_backend_failure_falls_back_once_and_says_so(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    standins.small.fail_next = 1
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "rescue me"}]
    )
    assert raw.parse().choices[0].message.content == "large-model says: rescue me"
    assert raw.headers["x-icgate-fallback-from"] == "small"
    assert raw.headers["x-icgate-backend"] == "large"
    assert raw.headers["x-icgate-route"] == "large"
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'icgate_fallbacks_total{from_backend="small",to_backend="large"} 1.0' in metrics


def test_stream_falls_back_before_first_chunk(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    standins.small.fail_next = 1
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "stream rescue"}], stream=True
    )
    assert raw.headers["x-icgate-fallback-from"] == "small"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "large-model says: stream rescue"


def test_both_backends_failing_is_a_clean_502(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    standins.small.fail_next = 1
    standins.large.fail_next = 1
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "backend_error"
    assert len(standins.small.received) == 1 and len(standins.large.received) == 1


def test_backend_timeout_falls_back(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    policy = standin_policy(standins, transport)
    policy.backends[0].timeout_s = 0.3
    gw = start_gateway(policy)
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "slow"}],
        extra_body={"x_standin": {"delay_ms": 0}},
    )
    assert raw.headers.get("x-icgate-fallback-from") is None
    standins.small.delay_s = 2.0
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "slow"}]
    )
    assert raw.headers["x-icgate-fallback-from"] == "small"
    assert raw.parse().choices[0].message.content == "large-model says: slow"
    assert 'kind="timeout"' in httpx.get(gw.url + "/metrics").text


def test_client_error_from_backend_is_not_retried(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "x"}], "x_standin": {"fail": 400}},
    )
    assert resp.status_code == 400
    assert "error" in resp.json()
    assert not standins.large.received


async def test_concurrency_limit_queues_then_refuses_with_retry_after(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    policy = standin_policy(standins, transport, admission={"max_queue_wait_s": 0.3})
    policy.backends[0].max_concurrent = 1
    gw = start_gateway(policy)
    standins.small.delay_s = 1.0
    body = {"model": "small", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        first, second = await asyncio.gather(
            http.post("/v1/chat/completions", json=body),
            http.post("/v1/chat/completions", json=body),
        )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 429]
    refused = first if first.status_code == 429 else second
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert len(standins.small.received) == 1


def test_auth_required(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport, auth={"required": True}))
    assert gw.gateway.engine is not None
    created = keys.create_key(gw.gateway.engine, "team-a")
    messages = [{"role": "user", "content": "x"}]
    for bad in ("", "icg-wrong"):
        resp = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "auto", "messages": messages},
            headers={"authorization": f"Bearer {bad}"} if bad else {},
        )
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(gw, "icg-wrong").models.list()
    assert client(gw, created.key).chat.completions.create(model="auto", messages=messages).choices
    assert not any(created.key in json.dumps(r) for r in standins.small.received)


def test_request_log_row_matches_headers(
    standins: Standins, start_gateway: StartGateway, transport: str, empty_db_url: str
) -> None:
    """On SQLite and PostgreSQL: the gateway migrates on start and the log row lands."""
    gw = start_gateway(standin_policy(standins, transport, database={"url": empty_db_url}))
    raw = client(gw).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "log me"}]
    )
    request_id = raw.headers["x-icgate-request-id"]
    gw.stop()  # a clean shutdown flushes the write-behind queue
    engine = make_engine(gw.gateway.database_url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT route, backend, status_code, completion_tokens, overhead_ms FROM request_log "
                "WHERE request_id = :r"
            ),
            {"r": request_id},
        ).one()
    engine.dispose()
    assert row.route == "small" and row.backend == "small" and row.status_code == 200
    assert row.completion_tokens == 4
    assert row.overhead_ms == pytest.approx(float(raw.headers["x-icgate-overhead-ms"]), abs=0.5)


def test_metrics_and_health(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    client(gw).chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gw.url + "/readyz").status_code == 200
    text = httpx.get(gw.url + "/metrics").text
    assert 'icgate_requests_total{backend="small",route="small",status="200"} 1.0' in text
    assert "icgate_overhead_seconds_bucket" in text


def test_litellm_as_a_client(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    import litellm

    gw = start_gateway(standin_policy(standins, transport))
    resp = litellm.completion(
        model="openai/auto",
        api_base=gw.url + "/v1",
        api_key="sk-x",
        messages=[{"role": "user", "content": "hey"}],
    )
    assert resp.choices[0].message.content == "small-model says: hey"


def test_completion_mode_backend_renders_chat_as_prompt(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    policy = standin_policy(standins, transport)
    large = policy.backends[1]
    large.mode = "completion"
    large.prompt_template = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}A:"
    large.stop = ["\nQ:"]
    gw = start_gateway(policy)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]
    completion = client(gw).chat.completions.create(model="large", messages=messages)
    sent = standins.large.received[-1]
    assert sent["path"] == "/v1/completions"
    assert sent["body"]["prompt"] == "system=be brief;user=why;A:"
    assert sent["body"]["stop"] == ["\nQ:"]
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "large-model says: system=be brief;user=why;A:"
    stream = client(gw).chat.completions.create(model="large", messages=messages, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "large-model says: system=be brief;user=why;A:"


def test_the_serving_process_freezes_its_start_up_heap(standins: Standins, tmp_path: Path) -> None:
    """`icgate serve` builds its app with `freeze_heap`: once started, what start-up made is out of the
    collector's sight (full collections no longer scan it); an app built without it leaves the heap."""
    import gc

    from bench.harness import ServerThread
    from icgate.gateway.api.app import create_app
    from icgate.gateway.wiring import Gateway

    policy = standin_policy(standins, cache={"enabled": False}, router={"kind": "rule"})
    gc.unfreeze()
    try:
        with ServerThread(create_app(Gateway(policy, tmp_path / "plain")), ready_path="/readyz"):
            assert gc.get_freeze_count() == 0
        with ServerThread(
            create_app(Gateway(policy, tmp_path / "served"), freeze_heap=True), ready_path="/readyz"
        ):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()  # this test process hosts many gateways: leave its collector as it was
