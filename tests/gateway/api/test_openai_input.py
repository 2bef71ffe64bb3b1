"""What OpenAI accepts, the gateway accepts; what it refuses, the gateway refuses the same way.

Each test provokes, over real HTTP, a defect found from outside (issue 11, items 4, 6 and 12):
inputs that used to pass validation and then fail with a 500, valid inputs that were refused,
and lax coercions OpenAI does not do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.harness import ServerThread
from icgate.gateway.config import Policy
from icgate.gateway.store.db import make_engine
from tests.gateway.conftest import RunningGateway, Standins, standin_policy, two_tier_policy

StartGateway = Callable[[Policy], RunningGateway]
USER = [{"role": "user", "content": "hello"}]


def post(gw: RunningGateway, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        gw.url + path, content=content, headers={"content-type": "application/json"}, timeout=30
    )


def assert_openai_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "Traceback" not in resp.text


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", '
            b'"text": "\\udfff"}]}]}',
            "messages.0.content.0.text",
        ),
        ("/v1/completions", b'{"model": "small", "prompt": "x \\ud83d"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], '
            b'"guided_choice": ["\\ud800"]}',
            "guided_choice.0",
        ),
        ("/v1/embeddings", b'{"model": "all-MiniLM-L6-v2", "input": ["ok", "\\ud800"]}', "input.1"),
        # raw UTF-8 bytes of a surrogate: json.loads of bytes lets them through
        ("/v1/completions", b'{"model": "small", "prompt": "x \xed\xa0\x80"}', "prompt"),
        # a large body takes another way in (parsed in a worker thread first)
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "'
            + b"long " * 80_000
            + b'\\udc00"}]}',
            "messages.0.content",
        ),
    ],
)
def test_unpaired_surrogates_are_the_senders_400(
    standins: Standins, start_gateway: StartGateway, path: str, raw: bytes, param: str
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    assert_openai_error(post(gw, path, raw), 400, param)
    assert not standins.small.received and not standins.large.received
    # A correctly paired surrogate (an emoji written as JSON escapes) is fine.
    ok = post(
        gw,
        "/v1/chat/completions",
        b'{"model": "auto", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}',
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": 5}], "messages.0.content.0"),
        ([{"type": "text"}], "messages.0.content.0"),
        ([{"text": "no type"}], "messages.0.content.0.type"),
        ([7], "messages.0.content.0"),
    ],
)
def test_malformed_content_parts_are_400_not_500(
    standins: Standins, start_gateway: StartGateway, content: Any, param: str
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    resp = post(gw, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert not standins.small.received


@pytest.mark.parametrize("messages", [5, "text", [1, 2], [{"role": "user"}], None])
def test_completions_with_a_pass_through_messages_field(
    standins: Standins, start_gateway: StartGateway, transport: str, messages: Any
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = post(gw, "/v1/completions", {"model": "small", "prompt": "once upon", "messages": messages})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"]


def test_stream_null_and_prompt_null_are_accepted(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = post(gw, "/v1/chat/completions", {"model": "auto", "messages": USER, "stream": None})
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"
    resp = post(gw, "/v1/completions", {"model": "small", "prompt": None, "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "text_completion"


def test_empty_prompt_array_is_a_clean_400(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    for prompt, param in (([], "prompt"), ([[]], "prompt.0")):
        assert_openai_error(post(gw, "/v1/completions", {"model": "small", "prompt": prompt}), 400, param)
    assert not standins.small.received


def test_n_up_to_openais_limit_passes_through(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = post(gw, "/v1/chat/completions", {"model": "auto", "messages": USER, "n": 20})
    assert resp.status_code == 200, resp.text
    assert standins.small.received[-1]["body"]["n"] == 20
    assert_openai_error(
        post(gw, "/v1/chat/completions", {"model": "auto", "messages": USER, "n": 129}), 400, "n"
    )


def test_an_integer_may_be_spelled_with_a_zero_fraction(
    standins: Standins, start_gateway: StartGateway
) -> None:
    """JSON has one number type, and the published schema says `integer`: 2.0 is 2 (schemathesis sends
    such values as valid cases), passed on as an integer."""
    gw = start_gateway(standin_policy(standins, "http"))
    body = {"model": "small", "messages": USER, "n": 2.0, "max_completion_tokens": 7.0}
    resp = post(gw, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    sent = standins.small.received[-1]["body"]
    assert (sent["n"], sent["max_completion_tokens"]) == (2, 7)
    assert isinstance(sent["n"], int) and isinstance(sent["max_completion_tokens"], int)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("stream", 1),
        ("seed", False),
        ("seed", "7"),
        ("max_tokens", "5"),
        ("max_tokens", 2.5),
        ("n", True),
        ("model", 5),
        ("stop", 3),
    ],
)
def test_no_lax_coercion_where_openai_is_strict(
    standins: Standins, start_gateway: StartGateway, field: str, value: Any
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    body = {"model": "auto", "messages": USER, field: value}
    resp = post(gw, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].split(".")[0] == field
    assert not standins.small.received


def test_embeddings_take_token_ids_of_the_served_model(
    standins: Standins, start_gateway: StartGateway
) -> None:
    gw = start_gateway(standin_policy(standins, "http"))
    model = "all-MiniLM-L6-v2"
    # 7592 2088 is "hello world" in the served model's (BERT uncased) vocabulary.
    by_ids = post(gw, "/v1/embeddings", {"model": model, "input": [7592, 2088]})
    assert by_ids.status_code == 200, by_ids.text
    by_text = post(gw, "/v1/embeddings", {"model": model, "input": "hello world"}).json()
    assert by_ids.json()["data"][0]["embedding"] == pytest.approx(by_text["data"][0]["embedding"], abs=1e-5)
    many = post(gw, "/v1/embeddings", {"model": model, "input": [[7592, 2088], [2088]]})
    assert many.status_code == 200 and [d["index"] for d in many.json()["data"]] == [0, 1]
    assert_openai_error(post(gw, "/v1/embeddings", {"model": model, "input": [10**9]}), 400, "input")
    assert_openai_error(post(gw, "/v1/embeddings", {"model": model, "input": []}), 400, "input")


class CutStream:
    """A backend that streams three words, then drops the connection mid-answer."""

    def __init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/healthz", self.healthz),
            ]
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def chat(self, request: Request) -> Response:
        await request.body()

        async def chunks() -> AsyncIterator[bytes]:
            for i, word in enumerate(("one", " two", " three")):
                delta = {"content": word, **({"role": "assistant"} if i == 0 else {})}
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "cut",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            raise RuntimeError("the backend died mid-stream")

        return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def cut_stream() -> Iterator[str]:
    with ServerThread(CutStream().app) as server:
        yield server.url


def test_a_stream_cut_mid_way_is_billed_for_what_was_sent(
    standins: Standins, start_gateway: StartGateway, transport: str, cut_stream: str
) -> None:
    """The backend dies after three chunks: the log row counts the chunks the client received."""
    policy = two_tier_policy(cut_stream, standins.large_url, ("cut", "large-model"), {"client": transport})
    gw = start_gateway(policy)
    body = {"model": "small", "stream": True, "messages": [{"role": "user", "content": "count to four"}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        request_id = resp.headers["x-icgate-request-id"]
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    delivered = [json.loads(e[6:]) for e in events if e != "data: [DONE]"]
    content = [c for c in delivered if c.get("choices") and c["choices"][0]["delta"].get("content")]
    assert len(content) == 3
    assert "error" in delivered[-1] and events[-1] == "data: [DONE]"
    gw.stop()
    engine = make_engine(gw.gateway.database_url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT status_code, prompt_tokens, completion_tokens FROM request_log WHERE request_id = :r"
            ),
            {"r": request_id},
        ).one()
    engine.dispose()
    assert row.status_code == 502
    assert row.completion_tokens == 3
    assert row.prompt_tokens > 0
