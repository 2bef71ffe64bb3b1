"""Wire-format helpers of the backend client: parameters, prompt rendering, chunk conversion, errors."""

from __future__ import annotations

from typing import Any

import pytest

from icgate.gateway.backends import client as backends
from icgate.gateway.backends.client import (
    OPENAI_PARAMS,
    BackendError,
    PromptRenderer,
    _backend_error,
    clean_reason,
    completion_chunk_to_chat,
    completion_to_chat,
    openai_chunks,
    openai_response,
    split_params,
    tidy_completion_chunk,
)
from icgate.gateway.config import DEFAULT_POLICY, BackendConfig, load_policy


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
    # Text parts joined by newlines, as everywhere (icgate.text.message_text; vLLM joins them so too).
    assert conversation(prompt) == "Q: Describe \nthis.\nA:"


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
    message = {"role": "assistant", "refusal": None}
    assert chat["choices"] == [
        {
            "index": 0,
            "message": {**message, "content": "Paris."},
            "logprobs": None,
            "finish_reason": "length",
        },
        {"index": 1, "message": {**message, "content": ""}, "logprobs": None, "finish_reason": "stop"},
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


def litellm_error(cls: Any, message: str, **extra: Any) -> Exception:
    return cls(message, llm_provider="openai", model="m", **extra)


def test_litellm_timeout_is_a_retryable_504() -> None:
    exc = backends.litellm.Timeout("read timed out", model="m", llm_provider="openai")
    err = _backend_error(BACKEND, exc)
    assert isinstance(err, BackendError)
    assert (err.backend, err.status_code, err.retryable, err.kind) == ("b1", 504, True, "timeout")
    assert not err.client_fault
    assert "timed out" in str(err)


@pytest.mark.parametrize("status", [500, 502, 503, 409, 402])
def test_server_side_failures_are_retryable_502s_without_the_backends_words(status: int) -> None:
    err = _backend_error(BACKEND, HTTPFailure(status, "internal trouble at 10.0.0.7"))
    assert (err.status_code, err.retryable, err.client_fault) == (502, True, False)
    assert str(err) == f"The backend 'b1' failed ({status})."
    assert "internal trouble" in err.detail  # for the log


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        ("InternalServerError", {}),
        ("ServiceUnavailableError", {}),
        ("BadGatewayError", {}),
        ("APIConnectionError", {}),
    ],
)
def test_litellm_server_and_connection_errors_are_retryable(cls: str, extra: dict[str, Any]) -> None:
    err = _backend_error(BACKEND, litellm_error(getattr(backends.litellm, cls), "kaput", **extra))
    assert (err.status_code, err.retryable, err.client_fault) == (502, True, False)
    assert "litellm" not in str(err)


@pytest.mark.parametrize(
    ("cls", "status"),
    [("BadRequestError", 400), ("NotFoundError", 404), ("UnprocessableEntityError", 422)],
)
def test_litellm_client_errors_are_the_clients_with_a_clean_message(cls: str, status: int) -> None:
    raw = (
        f"OpenAIException - Error code: {status} - {{'error': {{'message': 'The model `x` does not exist', "
        f"'type': 'invalid_request_error', 'param': None, 'code': None}}}}"
    )
    extra: dict[str, Any] = {}
    if cls == "UnprocessableEntityError":
        import httpx

        extra["response"] = httpx.Response(422, request=httpx.Request("POST", "http://x"))
    err = _backend_error(BACKEND, litellm_error(getattr(backends.litellm, cls), raw, **extra))
    assert (err.status_code, err.retryable, err.client_fault) == (status, False, True)
    assert str(err) == f"The backend 'b1' rejected the request ({status}): The model `x` does not exist"
    assert "litellm." in err.detail or "OpenAIException" in err.detail


def test_context_window_exceeded_is_a_400_with_openais_code() -> None:
    exc = litellm_error(
        backends.litellm.ContextWindowExceededError, "This model's maximum context length is 2048"
    )
    err = _backend_error(BACKEND, exc)
    assert (err.status_code, err.code, err.client_fault, err.retryable) == (
        400,
        "context_length_exceeded",
        True,
        False,
    )


@pytest.mark.parametrize("cls", ["AuthenticationError", "PermissionDeniedError"])
def test_backend_refusing_the_gateways_key_is_a_retryable_server_error(cls: str) -> None:
    import httpx

    extra: dict[str, Any] = {}
    if cls == "PermissionDeniedError":
        extra["response"] = httpx.Response(403, request=httpx.Request("POST", "http://x"))
    err = _backend_error(BACKEND, litellm_error(getattr(backends.litellm, cls), "Incorrect API key", **extra))
    assert (err.status_code, err.retryable, err.client_fault, err.kind) == (502, True, False, "auth")
    assert "backend authentication failed" in str(err)


def test_rate_limit_is_retryable_and_stays_a_429() -> None:
    import httpx

    response = httpx.Response(429, request=httpx.Request("POST", "http://x"))
    err = _backend_error(
        BACKEND, litellm_error(backends.litellm.RateLimitError, "slow down", response=response)
    )
    assert (err.status_code, err.retryable, err.client_fault) == (429, True, False)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_not_retryable_and_keep_their_status(status: int) -> None:
    err = _backend_error(BACKEND, HTTPFailure(status, "bad field"))
    assert (err.status_code, err.retryable, err.kind, err.client_fault) == (
        status,
        False,
        f"http_{status}",
        True,
    )
    assert str(err) == f"The backend 'b1' rejected the request ({status}): bad field"


def test_exception_without_a_status_is_a_retryable_502() -> None:
    err = _backend_error(BACKEND, ConnectionError("connection refused"))
    assert (err.status_code, err.retryable, err.kind) == (502, True, "http_502")
    assert "connection refused" in err.detail and "connection refused" not in str(err)


def test_client_error_reasons_are_truncated() -> None:
    err = _backend_error(BACKEND, HTTPFailure(400, "x" * 5000))
    assert str(err).count("x") == 300


def test_the_backends_key_never_reaches_the_log_detail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B1_KEY", "sk-secret-123")
    backend = BackendConfig.model_validate({"name": "b1", "model": "openai/m", "api_key_env": "B1_KEY"})
    err = _backend_error(backend, HTTPFailure(500, "bad key sk-secret-123 used"))
    assert "sk-secret-123" not in err.detail and "sk-secret-123" not in str(err)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "litellm.NotFoundError: NotFoundError: OpenAIException - Error code: 404 - "
            "{'error': {'message': 'no such model', 'type': 'x'}}",
            "no such model",
        ),
        ('{"error": {"message": "max_tokens is too large"}}', "max_tokens is too large"),
        ('{"detail": "Not Found"}', "Not Found"),
        ("litellm.BadRequestError: OpenAIException - stand-in failure 400", "stand-in failure 400"),
        ("", "no reason given"),
    ],
)
def test_clean_reason(raw: str, clean: str) -> None:
    assert clean_reason(raw) == clean


# --- OpenAI's shape ---------------------------------------------------------------------------------------


def test_litellm_response_gets_openais_fields_and_loses_litellms() -> None:
    raw = {
        "id": "c1",
        "created": 5,
        "model": "openai/m",
        "object": "chat.completion",
        "system_fingerprint": None,
        "choices": [
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {
                    "content": "hi",
                    "role": "assistant",
                    "tool_calls": None,
                    "function_call": None,
                    "provider_specific_fields": {"refusal": None},
                },
                "provider_specific_fields": {},
            }
        ],
        "usage": {
            "completion_tokens": 1,
            "prompt_tokens": 2,
            "total_tokens": 3,
            "prompt_tokens_details": None,
        },
        "moderation": None,
        "service_tier": None,
    }
    out = openai_response(raw, "m")
    assert out == {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }


def test_direct_backends_extra_fields_pass_through() -> None:
    raw = {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "stop_reason": 7}],
        "prompt_logprobs": None,
        "kv_transfer_params": {"a": 1},
    }
    out = openai_response(raw, "m", strict=False)
    assert out["choices"][0]["stop_reason"] == 7 and out["kv_transfer_params"] == {"a": 1}
    assert "prompt_logprobs" not in out
    assert out["choices"][0]["logprobs"] is None and out["choices"][0]["finish_reason"] is None


def test_usage_riding_a_chunk_with_a_choice_is_split_off() -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "choices": [{"index": 0, "delta": {"content": None, "role": None}, "finish_reason": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    [only] = openai_chunks(chunk, "m")
    assert only["choices"] == [] and only["usage"]["total_tokens"] == 3
    final = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    first, usage = openai_chunks(final, "m")
    assert first["choices"][0]["finish_reason"] == "stop" and "usage" not in first
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert openai_chunks(final, "m", include_usage=False) == [first]


def test_streamed_tool_call_pieces_keep_only_what_they_carry() -> None:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "role": None,
                    "content": None,
                    "tool_calls": [
                        {"index": 0, "id": None, "type": None, "function": {"name": None, "arguments": "{}"}}
                    ],
                },
            }
        ],
    }
    [out] = openai_chunks(chunk, "m")
    assert out["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert out["choices"][0]["finish_reason"] is None and out["choices"][0]["logprobs"] is None


# --- the client follows the wire format; usage a stream was asked for -------------------------------


@pytest.mark.parametrize(
    ("backend", "client", "api_base"),
    [
        ({"model": "openai/m", "api_base": "http://127.0.0.1:8101/v1"}, "http", "http://127.0.0.1:8101/v1"),
        ({"model": "openai/gpt-4o-mini"}, "http", "https://api.openai.com/v1"),
        ({"model": "anthropic/claude-3-5-haiku-latest"}, "litellm", None),
        ({"model": "openai/m", "api_base": "http://h/v1", "client": "litellm"}, "litellm", "http://h/v1"),
    ],
)
def test_auto_client_follows_the_wire_format(
    backend: dict[str, Any], client: str, api_base: str | None
) -> None:
    chosen = BackendConfig.model_validate({"name": "b", **backend})
    assert (chosen.client, chosen.api_base) == (client, api_base)


def test_an_explicit_http_client_still_needs_an_api_base() -> None:
    with pytest.raises(ValueError, match="api_base"):
        BackendConfig.model_validate({"name": "b", "model": "anthropic/x", "client": "http"})


class ScriptedTransport:
    """Streams the chunks it is given, as an OpenAI-compatible server would."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks

    async def open_stream(self, backend: BackendConfig, route: str, payload: dict[str, Any]) -> Any:
        async def gen() -> Any:
            for chunk in self.chunks:
                yield chunk

        return gen()

    async def aclose(self) -> None:
        return None


def delta_chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def streamed(chunks: list[dict[str, Any]], include_usage: bool) -> list[dict[str, Any]]:
    client = backends.BackendClient()
    client.transports["http"] = ScriptedTransport(chunks)  # type: ignore[assignment]
    body: dict[str, Any] = {"model": "b1", "messages": [{"role": "user", "content": "x" * 40}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    backend = BackendConfig.model_validate({"name": "b1", "model": "openai/m", "api_base": "http://h/v1"})
    return [c async for c in await client.stream(backend, "chat", body)]


async def test_a_stream_asked_for_usage_gets_an_estimate_when_the_backend_sends_none() -> None:
    out = await streamed([delta_chunk("Par"), delta_chunk("is"), delta_chunk(None, "stop")], True)
    assert [c["choices"] for c in out[-1:]] == [[]]
    # 40 characters of prompt at four a token; one token per chunk of text.
    assert out[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    assert sum(1 for c in out if c.get("usage")) == 1


async def test_a_backends_own_usage_is_passed_on_not_estimated() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    own = {**delta_chunk(None), "choices": [], "usage": usage}
    out = await streamed([delta_chunk("Paris"), delta_chunk(None, "stop"), own], True)
    assert [c["usage"] for c in out if c.get("usage")] == [usage]


async def test_no_usage_chunk_unless_asked() -> None:
    out = await streamed([delta_chunk("Paris"), delta_chunk(None, "stop")], False)
    assert not any(c.get("usage") for c in out)
