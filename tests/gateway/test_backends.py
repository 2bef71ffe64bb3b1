"""Wire-format helpers of the backend client: parameters, prompt rendering, chunk conversion, errors."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import backends
from gateway.backends import (
    OPENAI_PARAMS,
    BackendError,
    PromptRenderer,
    _backend_error,
    completion_chunk_to_chat,
    completion_to_chat,
    split_params,
    tidy_completion_chunk,
)
from gateway.config import DEFAULT_POLICY, BackendConfig, load_policy


@pytest.fixture(scope="module")
def large() -> BackendConfig:
    backend = load_policy(DEFAULT_POLICY).backend("large")
    assert backend is not None and backend.mode == "completion"
    return backend


BACKEND = BackendConfig.model_validate({"name": "b1", "model": "openai/m"})


# --- split_params -----------------------------------------------------------------------------------


def test_split_params_separates_known_from_pass_through() -> None:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "p",
        "stream": True,
        "temperature": 0.2,
        "max_tokens": 16,
        "stop": ["\n"],
        "stream_options": {"include_usage": True},
        "top_k": 40,
        "repetition_penalty": 1.1,
    }
    known, extra = split_params(body)
    assert known == {
        "temperature": 0.2,
        "max_tokens": 16,
        "stop": ["\n"],
        "stream_options": {"include_usage": True},
    }
    assert extra == {"top_k": 40, "repetition_penalty": 1.1}
    assert set(known) <= OPENAI_PARAMS
    assert not set(extra) & OPENAI_PARAMS


def test_split_params_of_a_bare_body() -> None:
    assert split_params({"model": "auto", "messages": []}) == ({}, {})


# --- PromptRenderer with the shipped template ---------------------------------------------------------


def conversation(prompt: str) -> str:
    """The rendered prompt after the template's own few-shot examples."""
    return prompt.split("A: Eight.\n\n", 1)[1]


def test_default_large_template_renders_a_conversation(large: BackendConfig) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    prompt = PromptRenderer().render(large.prompt_template, messages)
    assert prompt.startswith(
        "Answer each question briefly and correctly.\n\nQ: What is the capital of Italy?"
    )
    assert conversation(prompt) == "Answer briefly.\n\nQ: What is 2+2?\nA: 4\n\nQ: And 3+3?\nA:"


def test_template_takes_the_text_of_content_parts(large: BackendConfig) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this."},
            ],
        },
    ]
    prompt = PromptRenderer().render(large.prompt_template, messages)
    assert conversation(prompt) == "Q: Describe this.\nA:"


def test_template_treats_missing_role_as_user_and_missing_content_as_empty(large: BackendConfig) -> None:
    prompt = PromptRenderer().render(large.prompt_template, [{"content": "hi"}, {"role": "assistant"}])
    assert conversation(prompt) == "Q: hi\nA: \n\nA:"


def test_default_template_of_a_backend() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        PromptRenderer().render(BACKEND.prompt_template, messages) == "User: hi\nAssistant: hello\nAssistant:"
    )


def test_renderer_is_sandboxed() -> None:
    from jinja2.exceptions import SecurityError

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        PromptRenderer().render(evil, [])


# --- completion <-> chat -----------------------------------------------------------------------------


def test_completion_to_chat() -> None:
    resp = {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "gemma",
        "choices": [
            {"index": 0, "text": "  Paris.\n", "finish_reason": "length"},
            {"text": None},
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    chat = completion_to_chat(resp)
    assert chat["object"] == "chat.completion"
    assert chat["id"] == "cmpl-1" and chat["usage"] == resp["usage"] and chat["model"] == "gemma"
    assert chat["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "length"},
        {"index": 1, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"},
    ]


def test_completion_chunks_to_chat_role_first_only_and_leading_space_stripped() -> None:
    chunks = [
        {
            "id": "c",
            "object": "text_completion",
            "choices": [{"index": 0, "text": " Paris", "finish_reason": None}],
        },
        {
            "id": "c",
            "object": "text_completion",
            "choices": [{"index": 0, "text": " is", "finish_reason": None}],
        },
        {
            "id": "c",
            "object": "text_completion",
            "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
        },
    ]
    converted = [completion_chunk_to_chat(c, first=i == 0) for i, c in enumerate(chunks)]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "c" for c in converted)
    deltas = [c["choices"][0]["delta"] for c in converted]
    assert deltas == [{"content": "Paris", "role": "assistant"}, {"content": " is"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in converted] == [None, None, "stop"]


def test_completion_chunk_usage_kept_only_when_real() -> None:
    zero = {
        "choices": [{"text": "a"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    real = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert "usage" not in completion_chunk_to_chat(zero, first=False)
    assert completion_chunk_to_chat(real, first=False)["usage"]["total_tokens"] == 5
    assert "usage" not in tidy_completion_chunk(zero)
    assert tidy_completion_chunk(real)["usage"] == real["usage"]


def test_tidy_completion_chunk_always_carries_text() -> None:
    chunk: dict[str, Any] = {
        "object": "text_completion",
        "choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "text": "kept"}],
    }
    tidy = tidy_completion_chunk(chunk)
    assert tidy["choices"] == [
        {"text": "", "index": 0, "finish_reason": "stop"},
        {"text": "kept", "index": 1},
    ]
    assert tidy["object"] == "text_completion"
    assert "text" not in chunk["choices"][0]  # the input is not modified


# --- error classification -----------------------------------------------------------------------------


class HTTPFailure(Exception):
    def __init__(self, status_code: Any, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def test_litellm_timeout_is_a_retryable_504() -> None:
    exc = backends.litellm.Timeout("read timed out", model="m", llm_provider="openai")
    err = _backend_error(BACKEND, exc)
    assert isinstance(err, BackendError)
    assert (err.backend, err.status_code, err.retryable, err.kind) == ("b1", 504, True, "timeout")
    assert "timed out" in str(err)


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_server_side_failures_are_retryable(status: int) -> None:
    err = _backend_error(BACKEND, HTTPFailure(status, "internal trouble"))
    assert err.retryable is True
    assert err.status_code == 502
    assert "internal trouble" in str(err) and "b1" in str(err)


def test_litellm_server_error_is_retryable() -> None:
    exc = backends.litellm.InternalServerError("kaput", llm_provider="openai", model="m")
    err = _backend_error(BACKEND, exc)
    assert err.retryable is True and err.status_code == 502


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retryable_and_keep_their_status(status: int) -> None:
    err = _backend_error(BACKEND, HTTPFailure(status, "bad field"))
    assert (err.status_code, err.retryable, err.kind) == (status, False, f"http_{status}")
    assert str(err) == "bad field"


def test_exception_without_a_status_is_a_retryable_502() -> None:
    err = _backend_error(BACKEND, ConnectionError("connection refused"))
    assert (err.status_code, err.retryable, err.kind) == (502, True, "http_502")
    assert "connection refused" in str(err)


def test_error_messages_are_truncated() -> None:
    long = "x" * 5000
    server = _backend_error(BACKEND, HTTPFailure(500, long))
    client = _backend_error(BACKEND, HTTPFailure(400, long))
    assert str(server).count("x") == 300
    assert len(str(client)) == 1000
