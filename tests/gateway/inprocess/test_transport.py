"""The in-process transport's plain parts: the body checks it shares with the HTTP API, keys, paths."""

from __future__ import annotations

import json

import httpx
import pytest

from icgate.gateway.api.schemas import ChatCompletionRequest, CompletionRequest
from icgate.gateway.config import ServerConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.inprocess.transport import PipelineTransport, bearer_token, read_body, read_timeout

SERVER = ServerConfig()


def chat(body: object) -> dict[str, object]:
    return read_body(json.dumps(body).encode(), "chat", ChatCompletionRequest, SERVER)


def refusal(raw: bytes, server: ServerConfig = SERVER) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        read_body(raw, "chat", ChatCompletionRequest, server)
    return caught.value


def test_a_valid_body_keeps_unknown_fields_and_drops_nothing_it_was_given() -> None:
    fields = chat({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "guided_json": {"a": 1}})
    assert fields == {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "guided_json": {"a": 1},
    }


def test_a_null_prompt_gets_openais_default() -> None:
    fields = read_body(b'{"model": "auto", "prompt": null}', "completions", CompletionRequest, SERVER)
    assert fields["prompt"] == ""


def test_bad_bodies_get_the_http_apis_400s() -> None:
    assert refusal(b"{not json").message == "We could not parse the JSON body of your request."
    missing = refusal(b'{"model": "auto"}')
    assert (missing.status_code, missing.param) == (400, "messages")
    assert missing.message == "Missing required parameter: 'messages'."
    wrong = refusal(b'{"model": "auto", "messages": [], "stream": "yes"}')
    assert (wrong.status_code, wrong.param) == (400, "stream")


def test_an_unpaired_surrogate_is_refused_by_path() -> None:
    error = refusal(b'{"model": "auto", "messages": [{"role": "user", "content": "a\\ud800"}]}')
    assert (error.status_code, error.code, error.param) == (400, "invalid_unicode", "messages.0.content")


def test_size_and_bounds_are_the_servers() -> None:
    small = ServerConfig(max_body_bytes=1024)
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    too_large = refusal(body, small)
    assert (too_large.status_code, too_large.code) == (413, "request_too_large")
    many = {"model": "auto", "messages": [{"role": "user", "content": "x"}] * (SERVER.max_messages + 1)}
    assert refusal(json.dumps(many).encode()).status_code == 400


def test_the_key_is_read_as_the_sdk_sends_it() -> None:
    assert bearer_token(httpx.Headers({"authorization": "Bearer sk-1"})) == "sk-1"
    assert bearer_token(httpx.Headers({"x-api-key": "sk-2"})) == "sk-2"
    assert bearer_token(httpx.Headers({"authorization": "Basic abc"})) is None
    assert bearer_token(httpx.Headers({})) is None


def test_paths_are_read_below_the_clients_base_url() -> None:
    transport = PipelineTransport(gateway=None, base_path="/openai/v1/")  # type: ignore[arg-type]
    assert transport.relative("/openai/v1/chat/completions") == "chat/completions"
    assert transport.relative("/openai/v1/models") == "models"
    assert transport.relative("/elsewhere/completions") == "elsewhere/completions"


def test_the_sdks_read_timeout_bounds_the_call() -> None:
    request = httpx.Request("POST", "http://x/v1/chat/completions", extensions={"timeout": {"read": 2.5}})
    assert read_timeout(request) == 2.5
    assert read_timeout(httpx.Request("POST", "http://x/")) is None
