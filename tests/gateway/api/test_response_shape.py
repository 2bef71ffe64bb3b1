"""Answers leave in OpenAI's shape on every path: backend via litellm or direct HTTP, completion-mode
backends, the text-completion endpoint, cache hits and their replayed streams.

Checked on the raw JSON (null fields must be present, not merely defaulted by the SDK) and against the
openai SDK's own pydantic types, strictly, with no field outside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, settle_cache, standin_policy

StartGateway = Callable[[Policy], RunningGateway]
LITELLM_ONLY = ("provider_specific_fields", "function_call", "moderation", "citations", "_hidden_params")


def post(gw: RunningGateway, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    resp = httpx.post(gw.url + path, json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def events(
    gw: RunningGateway, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> list[dict[str, Any]]:
    """The stream's JSON events, [DONE] excluded."""
    with httpx.stream("POST", gw.url + path, json={**body, "stream": True}, timeout=30) as resp:
        assert resp.status_code == 200
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def extras(model: BaseModel, where: str = "") -> list[str]:
    """Every field, at any depth, that the SDK's types do not declare."""
    found = [f"{where}.{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for n, item in enumerate(items):
            if isinstance(item, BaseModel):
                found += extras(item, f"{where}.{name}[{n}]")
    return found


def strictly(cls: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    model = cls.model_validate(data, strict=True)
    assert extras(model) == [], extras(model)
    assert not any(key in json.dumps(data) for key in LITELLM_ONLY)
    return model


def chat_body(text: str = "shape me", **extra: Any) -> dict[str, Any]:
    return {"model": "small", "messages": [{"role": "user", "content": text}], **extra}


def check_completion(data: dict[str, Any]) -> None:
    strictly(ChatCompletion, data)
    choice = data["choices"][0]
    assert "logprobs" in choice and choice["logprobs"] is None
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert choice["finish_reason"] == "stop"
    assert data["object"] == "chat.completion" and "system_fingerprint" in data


def check_stream(chunks: list[dict[str, Any]], usage: bool = True) -> None:
    with_choices = [c for c in chunks if c["choices"]]
    for chunk in chunks:
        strictly(ChatCompletionChunk, chunk)
        assert chunk["object"] == "chat.completion.chunk"
    for chunk in with_choices:
        assert "finish_reason" in chunk["choices"][0] and "logprobs" in chunk["choices"][0]
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert len({c["model"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        assert not any("usage" in c for c in chunks[:-1])
    else:
        assert not any(c.get("usage") for c in chunks)


def test_chat_completion_and_its_stream(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    whole = post(gw, chat_body()).json()
    check_completion(whole)
    chunks = events(gw, chat_body(stream_options={"include_usage": True}))
    check_stream(chunks)
    assert chunks[0]["model"] == whole["model"] == "small-model"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        == (whole["choices"][0]["message"]["content"])
    )
    check_stream(events(gw, chat_body()), usage=False)


def test_completion_mode_backend_answers_chat_in_openais_shape(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(_completion_mode(standins, transport))
    whole = post(gw, chat_body()).json()
    check_completion(whole)
    chunks = events(gw, chat_body(stream_options={"include_usage": True}))
    check_stream(chunks)
    assert chunks[0]["model"] == whole["model"]


def _completion_mode(standins: Standins, transport: str) -> Policy:
    policy = standin_policy(standins, transport)
    policy.backends[0].mode = "completion"
    return policy


def test_text_completions_endpoint(standins: Standins, start_gateway: StartGateway, transport: str) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    body = {"model": "small", "prompt": "a b c"}
    whole = post(gw, body, "/v1/completions").json()
    strictly(Completion, whole)
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["logprobs"] is None and whole["choices"][0]["finish_reason"] == "stop"
    chunks = events(gw, {**body, "stream_options": {"include_usage": True}}, "/v1/completions")
    for chunk in chunks:
        # The SDK types a streamed text chunk as a Completion, whose finish_reason may not be null: OpenAI
        # sends null until the end all the same. Validate the rest.
        patched = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        strictly(Completion, {**chunk, "choices": patched})
    with_choices = [c for c in chunks if c["choices"]]
    assert all("finish_reason" in c["choices"][0] and "logprobs" in c["choices"][0] for c in with_choices)
    assert [c["choices"][0]["finish_reason"] for c in with_choices][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert {c["model"] for c in chunks} == {whole["model"]}


def test_cache_hit_and_its_replayed_stream(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport, cache={"enabled": True, "sync_interval_s": 0.2}))
    body = chat_body("What is the tallest mountain on Earth?", temperature=0)
    first = post(gw, body)
    assert first.headers["x-icgate-route"] == "small"
    settle_cache(gw.gateway)
    hit = post(gw, body)
    assert hit.headers["x-icgate-route"] == "cache"
    check_completion(hit.json())
    assert hit.json()["model"] == first.json()["model"]
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=30) as resp:  # fmt: skip
        assert resp.headers["x-icgate-route"] == "cache"
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines[:-1]]
    check_stream(chunks)
    assert chunks[0]["model"] == first.json()["model"]
