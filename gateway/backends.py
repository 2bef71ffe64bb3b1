"""Calling backends through litellm, in OpenAI's wire format both ways.

Every backend is an OpenAI-compatible endpoint (vLLM, llama.cpp, OpenAI,
Anthropic, ...). A backend in `completion` mode is a base model without a chat
template: chat requests are rendered to a prompt with its Jinja2 template, sent
to the text-completion route, and the answer is turned back into chat format.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator
from typing import Any, Literal, Protocol

import aiohttp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.config import BackendConfig
from gateway.context import Endpoint

# litellm reads these at import time: never fetch the cost map, never reach a hub.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import litellm

# Parameters litellm maps itself; everything else is passed through untouched in `extra_body`.
OPENAI_PARAMS = frozenset(
    {
        "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens", "presence_penalty",
        "frequency_penalty", "logit_bias", "user", "response_format", "seed", "tools", "tool_choice",
        "logprobs", "top_logprobs", "parallel_tool_calls", "stream_options", "echo", "best_of", "suffix",
        "metadata", "modalities", "audio", "prediction", "reasoning_effort", "store", "service_tier",
    }
)  # fmt: skip
# Fields litellm adds to its objects that are not part of OpenAI's schema.
_LITELLM_ONLY = ("provider_specific_fields",)
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class BackendError(Exception):
    """A backend failed. `retryable` says whether another backend might succeed."""

    def __init__(self, backend: str, status_code: int, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.backend = backend
        self.status_code = status_code
        self.retryable = retryable
        self.kind = "timeout" if status_code in (408, 504) else f"http_{status_code}"


def _backend_error(backend: BackendConfig, exc: Exception) -> BackendError:
    if isinstance(exc, litellm.Timeout):
        return BackendError(backend.name, 504, f"backend {backend.name} timed out", retryable=True)
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = 502
    message = str(getattr(exc, "message", "") or exc)
    if status in _RETRYABLE_STATUS or status >= 500:
        # The raw message may carry internals of the backend; keep it short.
        return BackendError(backend.name, 502, f"backend {backend.name} failed: {message[:300]}", True)
    return BackendError(backend.name, status, message[:1000], retryable=False)


def _clean(obj: Any) -> Any:
    """Drop litellm-only fields and nulls so the wire format is plain OpenAI."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in _LITELLM_ONLY and v is not None}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def split_params(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters litellm understands, unknown fields to pass through in extra_body)."""
    skip = {"model", "messages", "prompt", "stream"}
    known = {k: v for k, v in body.items() if k in OPENAI_PARAMS}
    extra = {k: v for k, v in body.items() if k not in OPENAI_PARAMS and k not in skip}
    return known, extra


class PromptRenderer:
    """Renders chat messages into a completion prompt with a backend's Jinja2 template."""

    def __init__(self) -> None:
        self._env = ImmutableSandboxedEnvironment(trim_blocks=False, autoescape=False)
        self._cache: dict[str, Any] = {}

    def render(self, template: str, messages: list[dict[str, Any]]) -> str:
        compiled = self._cache.get(template)
        if compiled is None:
            compiled = self._cache[template] = self._env.from_string(template)
        plain = [{"role": m.get("role", "user"), "content": message_text(m.get("content"))} for m in messages]
        return str(compiled.render(messages=plain))


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


Route = Literal["chat", "text"]


def _text_model(model: str) -> str:
    """litellm's text-completion route for OpenAI-compatible servers."""
    return "text-completion-openai/" + model.removeprefix("openai/") if model.startswith("openai/") else model


def served_model(model: str) -> str:
    """The name an OpenAI-compatible server knows: the litellm model string without `openai/`."""
    return model.removeprefix("openai/")


class Transport(Protocol):
    """Moves one OpenAI-format payload to a backend and back; maps failures to BackendError."""

    async def send(self, backend: BackendConfig, route: Route, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def open_stream(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def aclose(self) -> None: ...


class LitellmTransport:
    """Any provider litellm reaches (OpenAI, Anthropic, Bedrock, vLLM, llama.cpp, ...)."""

    def __init__(self) -> None:
        litellm.suppress_debug_info = True

    def _args(self, backend: BackendConfig, payload: dict[str, Any], stream: bool) -> dict[str, Any]:
        known, extra = split_params(payload)
        if not stream:
            known.pop("stream_options", None)
        args: dict[str, Any] = {
            **known,
            "api_base": backend.api_base,
            "api_key": backend.api_key() or "no-key",
            "timeout": backend.timeout_s,
            "max_retries": 0,  # the pipeline decides about retries and fallbacks
            "stream": stream,
        }
        if extra:
            args["extra_body"] = extra
        return args

    async def _call(self, backend: BackendConfig, route: Route, payload: dict[str, Any], stream: bool) -> Any:
        args = self._args(backend, payload, stream)
        try:
            if route == "chat":
                return await litellm.acompletion(model=backend.model, messages=payload["messages"], **args)
            return await litellm.atext_completion(
                model=_text_model(backend.model), prompt=payload["prompt"], **args
            )
        except Exception as exc:
            raise _backend_error(backend, exc) from exc

    async def send(self, backend: BackendConfig, route: Route, payload: dict[str, Any]) -> dict[str, Any]:
        resp = await self._call(backend, route, payload, stream=False)
        return dict(_clean(resp.model_dump()))

    async def open_stream(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        stream = await self._call(backend, route, payload, stream=True)
        return self._relay(backend, stream)

    async def _relay(self, backend: BackendConfig, stream: Any) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for chunk in stream:
                yield dict(_clean(chunk.model_dump()))
        except Exception as exc:
            raise _backend_error(backend, exc) from exc
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def aclose(self) -> None:
        """Close litellm's cached HTTP sessions (process-wide: one gateway per process in production)."""
        from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

        await close_litellm_async_clients()


class HttpTransport:
    """OpenAI-compatible servers (vLLM, llama.cpp, OpenAI) over one pooled aiohttp session.

    The payload goes out as it came in, with only `model` renamed: nothing to
    translate, so none of litellm's per-call work (see bench/results/overhead.md).
    aiohttp rather than httpx: httpcore's pool rescans every idle connection per
    request, which costs more than litellm itself at high concurrency.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Created lazily: a session belongs to the running event loop.
            # Keep-alive shorter than uvicorn's 5 s (vLLM, llama.cpp): never reuse a connection
            # the server is about to close, which would fail a POST that cannot be retried.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    async def _post(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any], stream: bool
    ) -> aiohttp.ClientResponse:
        path = "/chat/completions" if route == "chat" else "/completions"
        body = {**payload, "model": served_model(backend.model), "stream": stream}
        if not stream:
            body.pop("stream_options", None)
        headers = {"content-type": "application/json"}
        key = backend.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        # A stream may run long; what must not stall is each read.
        timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=backend.timeout_s, sock_read=backend.timeout_s)
            if stream
            else aiohttp.ClientTimeout(total=backend.timeout_s)
        )
        url = (backend.api_base or "").rstrip("/") + path
        try:
            resp = await self._session_for_loop().post(
                url, data=json.dumps(body).encode(), headers=headers, timeout=timeout
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(backend, exc) from exc
        if resp.status >= 400:
            try:
                text = (await resp.read()).decode(errors="replace")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _transport_error(backend, exc) from exc
            finally:
                resp.release()
            raise _status_error(backend, resp.status, text)
        return resp

    async def send(self, backend: BackendConfig, route: Route, payload: dict[str, Any]) -> dict[str, Any]:
        resp = await self._post(backend, route, payload, stream=False)
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(backend, exc) from exc
        finally:
            resp.release()
        try:
            return dict(json.loads(raw))
        except ValueError as exc:
            raise BackendError(backend.name, 502, f"backend {backend.name} sent invalid JSON", True) from exc

    async def open_stream(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        resp = await self._post(backend, route, payload, stream=True)
        return self._events(backend, resp)

    async def _events(
        self, backend: BackendConfig, resp: aiohttp.ClientResponse
    ) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event and "choices" not in event:
                    raise BackendError(backend.name, 502, f"backend {backend.name}: {event['error']}", False)
                yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(backend, exc) from exc
        except ValueError as exc:
            raise BackendError(backend.name, 502, f"backend {backend.name} sent invalid JSON", False) from exc
        finally:
            resp.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _transport_error(backend: BackendConfig, exc: BaseException) -> BackendError:
    if isinstance(exc, TimeoutError):
        return BackendError(backend.name, 504, f"backend {backend.name} timed out", retryable=True)
    return BackendError(backend.name, 502, f"backend {backend.name} unreachable: {type(exc).__name__}", True)


def _status_error(backend: BackendConfig, status: int, text: str) -> BackendError:
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = text
    if status in _RETRYABLE_STATUS or status >= 500:
        return BackendError(backend.name, 502, f"backend {backend.name} failed: {message[:300]}", True)
    return BackendError(backend.name, status, message[:1000], retryable=False)


class BackendClient:
    """Sends one request to one backend; returns OpenAI-format dicts (or a stream of them).

    Chooses the transport per backend (`client: litellm | http`) and, for
    completion-mode backends, renders chat into a prompt and the answer back.
    """

    def __init__(self) -> None:
        self.renderer = PromptRenderer()
        self.transports: dict[str, Transport] = {"litellm": LitellmTransport(), "http": HttpTransport()}

    async def aclose(self) -> None:
        for transport in self.transports.values():
            await transport.aclose()

    def _prepare(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> tuple[Route, dict[str, Any]]:
        payload = {k: v for k, v in body.items() if k != "stream"}
        if backend.stop and "stop" not in payload:
            payload["stop"] = backend.stop
        if endpoint == "chat" and backend.mode == "chat":
            return "chat", payload
        if endpoint == "chat":
            payload.pop("messages", None)
            payload["prompt"] = self.renderer.render(backend.prompt_template, body["messages"])
        return "text", payload

    async def complete(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> dict[str, Any]:
        route, payload = self._prepare(backend, endpoint, body)
        out = await self.transports[backend.client].send(backend, route, payload)
        return completion_to_chat(out) if endpoint == "chat" and route == "text" else out

    async def stream(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chunks in OpenAI format. Errors before the first chunk raise BackendError."""
        route, payload = self._prepare(backend, endpoint, body)
        chunks = await self.transports[backend.client].open_stream(backend, route, payload)
        return self._convert(chunks, to_chat=endpoint == "chat" and route == "text")

    async def _convert(
        self, chunks: AsyncGenerator[dict[str, Any], None], to_chat: bool
    ) -> AsyncGenerator[dict[str, Any], None]:
        started_text = False
        first = True
        try:
            async for data in chunks:
                if to_chat:
                    data = completion_chunk_to_chat(data, first, strip_leading=not started_text)
                    started_text = started_text or any(c["delta"].get("content") for c in data["choices"])
                elif data.get("object") == "text_completion":
                    data = tidy_completion_chunk(data)
                first = False
                yield data
        finally:
            await chunks.aclose()


def completion_to_chat(resp: dict[str, Any]) -> dict[str, Any]:
    """A text-completion response in chat-completion form."""
    choices = [
        {
            "index": c.get("index", i),
            "message": {"role": "assistant", "content": (c.get("text") or "").strip()},
            "finish_reason": c.get("finish_reason") or "stop",
        }
        for i, c in enumerate(resp.get("choices", []))
    ]
    return {**resp, "object": "chat.completion", "choices": choices}


def _drop_empty_usage(chunk: dict[str, Any]) -> dict[str, Any]:
    # litellm fills zero usage into every text chunk; only a real count is worth sending.
    if "usage" in chunk and not (chunk.get("usage") or {}).get("total_tokens"):
        chunk = {k: v for k, v in chunk.items() if k != "usage"}
    return chunk


def tidy_completion_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's text-completion chunks always carry `text`, even the last one."""
    choices = [{"text": "", **c} for c in chunk.get("choices", [])]
    return _drop_empty_usage({**chunk, "choices": choices})


def completion_chunk_to_chat(
    chunk: dict[str, Any], first: bool, strip_leading: bool | None = None
) -> dict[str, Any]:
    """A text-completion chunk in chat form; the answer's leading space is dropped, as unstreamed."""
    strip = first if strip_leading is None else strip_leading
    choices = []
    for i, c in enumerate(chunk.get("choices", [])):
        delta: dict[str, Any] = {}
        text = c.get("text") or ""
        if strip:
            text = text.lstrip()
        if text:
            delta["content"] = text
        if first:
            delta["role"] = "assistant"
        choices.append({"index": c.get("index", i), "delta": delta, "finish_reason": c.get("finish_reason")})
    return _drop_empty_usage({**chunk, "object": "chat.completion.chunk", "choices": choices})
