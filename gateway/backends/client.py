"""Calling backends through litellm, in OpenAI's wire format both ways.

Every backend is an OpenAI-compatible endpoint (vLLM, llama.cpp, OpenAI,
Anthropic, ...). A backend in `completion` mode is a base model without a chat
template: chat requests are rendered to a prompt with its Jinja2 template, sent
to the text-completion route, and the answer is turned back into chat format.

Whatever the path, answers leave in OpenAI's shape (`openai_response`,
`openai_chunks`): its fields, nulls included, and none of litellm's own.
Failures become `BackendError`s that say whose fault they were (see
docs/backends.md for the mapping).
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal, Protocol

import aiohttp
import openai
from jinja2.sandbox import ImmutableSandboxedEnvironment

from icgate.gateway.config import BackendConfig
from icgate.gateway.records import Endpoint
from icgate.text import estimate_prompt_tokens, message_text

# litellm reads these at import time: never fetch the cost map, never reach a hub.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import litellm
import litellm.exceptions as litellm_errors

# Parameters litellm maps itself; everything else is passed through untouched in `extra_body`.
OPENAI_PARAMS = frozenset(
    {
        "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens", "presence_penalty",
        "frequency_penalty", "logit_bias", "user", "response_format", "seed", "tools", "tool_choice",
        "logprobs", "top_logprobs", "parallel_tool_calls", "stream_options", "echo", "best_of", "suffix",
        "metadata", "modalities", "audio", "prediction", "reasoning_effort", "store", "service_tier",
    }
)  # fmt: skip
# Statuses that mean the request itself was wrong: the client's to fix, another backend would refuse too.
_CLIENT_FAULT_STATUS = frozenset({400, 404, 413, 415, 422})
# The backend refused the gateway's own key: the gateway is misconfigured, not the client.
_AUTH_STATUS = frozenset({401, 403})
_CONTEXT_WINDOW = re.compile(
    r"context.length|context window|maximum context|too many tokens|prompt is too long", re.IGNORECASE
)


class BackendError(Exception):
    """A backend call failed; the message is fit for the client, `detail` is for the log only.

    `retryable`: another backend might succeed. `client_fault`: the request itself was rejected, so
    the client gets a 4xx, nothing is retried and the backend's health (its circuit) is not blamed.
    """

    def __init__(
        self,
        backend: str,
        status_code: int,
        message: str,
        retryable: bool,
        *,
        client_fault: bool | None = None,
        code: str | None = None,
        kind: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.backend = backend
        self.status_code = status_code
        self.retryable = retryable
        self.client_fault = (
            (not retryable and 400 <= status_code < 500) if client_fault is None else client_fault
        )
        self.code = code
        self.kind = kind or ("timeout" if status_code in (408, 504) else f"http_{status_code}")
        self.detail = detail or message


def clean_reason(text: str, limit: int = 300) -> str:
    """A backend's or litellm's error text without litellm's class names, provider labels and
    wrapping: `litellm.NotFoundError: NotFoundError: OpenAIException - Error code: 404 - {'error':
    {'message': 'no such model'}}` becomes `no such model`."""
    text = text.split("LiteLLM Retried:")[0].split("Received Model Group=")[0].strip()
    brace = text.find("{")
    if brace != -1:
        body = _parse_error_body(text[brace:])
        if body:
            text = body
    text = re.sub(r"\blitellm\.\w+:?\s*", "", text)
    text = re.sub(r"\bOpenAIException\b", "", text)
    text = re.sub(r"\b\w*(?:Error|Exception)\s*(?::|\s-)\s*", "", text)
    text = re.sub(r"Error code:\s*\d+\s*-?", "", text)
    text = " ".join(text.split()).strip(" -:")
    return text[:limit] or "no reason given"


def _parse_error_body(raw: str) -> str | None:
    """The message of an OpenAI-style error body, given as JSON or as a Python literal (litellm)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            body = parse(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        if isinstance(body, dict):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, dict) else inner
            if message is None and isinstance(body.get("detail"), str):
                message = body["detail"]
            if message is not None:
                return str(message)
    return None


def _redact(text: str, backend: BackendConfig) -> str:
    """Log text without the backend's key, should a library have echoed it."""
    key = backend.api_key()
    return text.replace(key, "<redacted>") if key else text


def status_error(
    backend: BackendConfig, status: int, reason: str, detail: str, context_window: bool = False
) -> BackendError:
    """What a backend's HTTP status means for the client, the fallback and the circuit breaker. The
    backend's key is redacted from its reason too: a 4xx reason is relayed to the client."""
    name = backend.name
    detail = _redact(detail, backend)
    reason = _redact(reason, backend)
    if status in (408, 504):
        return BackendError(name, 504, f"The backend '{name}' timed out.", True, detail=detail)
    if status in _AUTH_STATUS:
        message = f"The backend '{name}' failed: backend authentication failed."
        return BackendError(name, 502, message, True, kind="auth", detail=detail)
    if status == 429:
        message = f"The backend '{name}' is rate limiting requests; retry later."
        return BackendError(name, 429, message, True, client_fault=False, detail=detail)
    if status in _CLIENT_FAULT_STATUS:
        too_long = context_window or (status == 400 and bool(_CONTEXT_WINDOW.search(reason)))
        message = f"The backend '{name}' rejected the request ({status}): {clean_reason(reason)}"
        if too_long:
            return BackendError(name, 400, message, False, code="context_length_exceeded", detail=detail)
        return BackendError(name, status, message, False, detail=detail)
    # 5xx, and 4xx that are about the gateway's account or route (402, 405, 409, ...): the backend's.
    return BackendError(name, 502, f"The backend '{name}' failed ({status}).", True, detail=detail)


def _backend_error(backend: BackendConfig, exc: Exception) -> BackendError:
    """A litellm exception as a BackendError (litellm maps every provider's errors to these classes)."""
    detail = f"{type(exc).__name__}: {exc}"
    # An error event in a stream (the openai client raises a bare APIError with the event's `error`; litellm
    # words it from the message alone): read it as the HTTP transport does, its `code` a 429 or not.
    event = next((c for c in _causes(exc) if type(c) is openai.APIError and isinstance(c.body, dict)), None)
    if event is not None:
        return _stream_error(backend, event.body)
    if isinstance(exc, litellm_errors.Timeout) or _caused_by(exc, openai.APITimeoutError):
        return status_error(backend, 504, "", detail)
    # litellm 1.106 reports a refused or reset connection as an InternalServerError (status 500,
    # "Connection error."); the openai client's APIConnectionError underneath says what it was.
    if isinstance(exc, litellm_errors.APIConnectionError) or _caused_by(exc, openai.APIConnectionError):
        # Connection refused or reset, DNS, or litellm failing before the call: never the client's fault.
        return BackendError(
            backend.name,
            502,
            f"The backend '{backend.name}' is unreachable.",
            True,
            detail=_redact(detail, backend),
        )
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = 502
    reason = str(getattr(exc, "message", "") or exc)
    context_window = isinstance(exc, litellm_errors.ContextWindowExceededError)
    return status_error(backend, status, reason, detail, context_window)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (and litellm's `original_exception`)."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        original = getattr(cause, "original_exception", None)
        cause = original if isinstance(original, BaseException) else cause.__cause__ or cause.__context__
    return chain


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(cause, kind) for cause in _causes(exc))


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
        self._text_clients: dict[str, openai.AsyncOpenAI] = {}

    def _text_client(self, backend: BackendConfig) -> openai.AsyncOpenAI | None:
        """One pooled client per OpenAI-compatible backend for litellm's text-completion route.

        Without one, litellm 1.106 builds a new AsyncOpenAI over a new aiohttp session for every text
        completion and never closes it: each failed call left a connection in an abandoned session
        ("Unclosed connector" in the log), and every call paid for a new connection. Created lazily:
        a client belongs to the running event loop; closed in `aclose`.
        """
        if not backend.model.startswith("openai/"):
            return None  # other providers' text route is litellm's chat route, whose clients it caches
        client = self._text_clients.get(backend.name)
        if client is None:
            client = self._text_clients[backend.name] = openai.AsyncOpenAI(
                api_key=backend.api_key() or "no-key",
                base_url=backend.api_base,
                timeout=backend.timeout_s,
                max_retries=0,
            )
        return client

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
        if known.get("tools"):
            # With tools, litellm 1.106 first checks for its own MCP gateway (tools of type "mcp" naming a
            # server URL, which litellm would then call and run tools on itself); that check imports
            # litellm's proxy and the `mcp` package. Installing `mcp` would make tools "work" but let a
            # client make the gateway connect to MCP servers and execute tools: a gateway only relays
            # tool calls. `_skip_mcp_handler` is litellm's own switch for this (its MCP and Responses
            # bridges set it; `filter_internal_params` strips it before the provider call).
            args["_skip_mcp_handler"] = True
        if extra:
            args["extra_body"] = extra
        return args

    async def _call(self, backend: BackendConfig, route: Route, payload: dict[str, Any], stream: bool) -> Any:
        args = self._args(backend, payload, stream)
        try:
            if route == "chat":
                return await litellm.acompletion(model=backend.model, messages=payload["messages"], **args)
            client = self._text_client(backend)
            if client is not None:
                args["client"] = client
            return await litellm.atext_completion(
                model=_text_model(backend.model), prompt=payload["prompt"], **args
            )
        except Exception as exc:
            raise _backend_error(backend, exc) from exc

    async def send(self, backend: BackendConfig, route: Route, payload: dict[str, Any]) -> dict[str, Any]:
        resp = await self._call(backend, route, payload, stream=False)
        return dict(resp.model_dump())

    async def open_stream(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        stream = await self._call(backend, route, payload, stream=True)
        return self._relay(backend, stream)

    async def _relay(self, backend: BackendConfig, stream: Any) -> AsyncGenerator[dict[str, Any], None]:
        try:
            async for chunk in stream:
                if _made_up_end(stream, chunk):
                    raise _cut_short(backend)
                yield dict(chunk.model_dump())
        except BackendError:
            raise
        except Exception as exc:
            raise _backend_error(backend, exc) from exc
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def aclose(self) -> None:
        """Close litellm's cached HTTP sessions (process-wide: one gateway per process in production)."""
        from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

        # litellm leaves this one untyped.
        close_all: Callable[[], Awaitable[None]] = close_litellm_async_clients
        clients, self._text_clients = list(self._text_clients.values()), {}
        for client in clients:
            await client.close()
        await close_all()


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
            answer = json.loads(raw)
        except ValueError as exc:
            raise BackendError(
                backend.name, 502, f"The backend '{backend.name}' sent invalid JSON.", True
            ) from exc
        if not isinstance(answer, dict):
            raise _invalid(backend, f"not a JSON object: {raw[:200]!r}")
        return answer

    async def open_stream(
        self, backend: BackendConfig, route: Route, payload: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        resp = await self._post(backend, route, payload, stream=True)
        return self._events(backend, resp)

    async def _events(
        self, backend: BackendConfig, resp: aiohttp.ClientResponse
    ) -> AsyncGenerator[dict[str, Any], None]:
        done = finished = False
        try:
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event and "choices" not in event:
                    raise _stream_error(backend, event["error"])
                finished = finished or _finishes(event)
                yield event
            if not (done or finished):
                # The body ended cleanly but the answer did not: a server that died between two events
                # behind a proxy that closed the body for it. Passed on, it would look like a short answer.
                raise _cut_short(backend)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if finished and isinstance(exc, aiohttp.ClientPayloadError):
                return  # the answer was whole; only the end of the body was lost (as litellm takes it)
            raise _transport_error(backend, exc) from exc
        except ValueError as exc:
            raise BackendError(
                backend.name, 502, f"The backend '{backend.name}' sent invalid JSON.", True
            ) from exc
        finally:
            resp.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _invalid(backend: BackendConfig, problem: str) -> BackendError:
    """An answer the gateway cannot pass on: the backend's failure (another backend may do better)."""
    message = f"The backend '{backend.name}' sent an invalid answer."
    return BackendError(backend.name, 502, message, True, detail=_redact(problem[:2000], backend))


def _cut_short(backend: BackendConfig) -> BackendError:
    message = f"The backend '{backend.name}' ended the stream before the answer was complete."
    return BackendError(backend.name, 502, message, True, detail="no [DONE] and no finish_reason")


def _finishes(event: Any) -> bool:
    """Whether a streamed event ends a choice (carries a finish_reason)."""
    choices = event.get("choices") if isinstance(event, dict) else None
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _made_up_end(stream: Any, chunk: Any) -> bool:
    """Whether litellm made this chunk's finish_reason up: its stream wrapper (1.106) ends a stream the
    backend cut short, without a finish_reason or an error, with a chunk saying "stop" of its own, and
    records what the backend really said in `received_finish_reason`/`intermittent_finish_reason`.
    Without those attributes (another wrapper, another version) nothing is taken for made up."""
    choices = getattr(chunk, "choices", None) or ()
    if not choices or getattr(choices[0], "finish_reason", None) is None:
        return False
    said = (getattr(stream, "received_finish_reason", ""), getattr(stream, "intermittent_finish_reason", ""))
    return getattr(stream, "sent_last_chunk", False) is True and said == (None, None)


def _stream_error(backend: BackendConfig, error: Any) -> BackendError:
    """An error event in the middle of a stream (vLLM: `{"error": {..., "code": 429}}`; OpenAI: an `error`
    event): a rate limit stays one, anything else is the backend failing."""
    detail = _redact(str(error)[:2000], backend)
    fields = error if isinstance(error, dict) else {"message": error}
    said = " ".join(str(fields.get(k) or "") for k in ("code", "type", "status")).lower()
    if re.search(r"\b429\b|rate.?limit|resource.?exhausted|too.?many.?requests", said):
        return status_error(backend, 429, "", detail)
    message = f"The backend '{backend.name}' failed while streaming."
    return BackendError(backend.name, 502, message, True, detail=detail)


def _shape_problem(answer: dict[str, Any], streamed: bool) -> str | None:
    """What makes an answer (or a streamed chunk) unusable, if anything: its `choices` must be a list of
    objects (a chunk may have none, a usage chunk for one), each `message`/`delta` an object."""
    choices = answer.get("choices")
    if choices is None and streamed:
        return None
    if not isinstance(choices, list):
        return f"no list of choices: {json.dumps(answer)[:300]}"
    for choice in choices:
        if not isinstance(choice, dict):
            return f"a choice is not an object: {json.dumps(choice)[:300]}"
        for key in ("message", "delta"):
            if choice.get(key) is not None and not isinstance(choice[key], dict):
                return f"a choice's {key} is not an object: {json.dumps(choice)[:300]}"
    return None


def _transport_error(backend: BackendConfig, exc: BaseException) -> BackendError:
    detail = _redact(f"{type(exc).__name__}: {exc}", backend)
    if isinstance(exc, TimeoutError):
        return BackendError(
            backend.name, 504, f"The backend '{backend.name}' timed out.", True, detail=detail
        )
    return BackendError(
        backend.name, 502, f"The backend '{backend.name}' is unreachable.", True, detail=detail
    )


def _status_error(backend: BackendConfig, status: int, text: str) -> BackendError:
    reason = _parse_error_body(text) or text
    return status_error(backend, status, reason, f"HTTP {status}: {text[:2000]}")


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
        problem = _shape_problem(out, streamed=False)
        if problem is not None:
            raise _invalid(backend, problem)
        try:
            if endpoint == "chat" and route == "text":
                out = completion_to_chat(out)
            return openai_response(out, served_model(backend.model), strict=backend.client == "litellm")
        except _GARBAGE as exc:  # a field of the wrong type: the backend's answer, not a request's fault
            raise _invalid(backend, f"{type(exc).__name__}: {exc}") from exc

    async def stream(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chunks in OpenAI format. Errors before the first chunk raise BackendError."""
        route, payload = self._prepare(backend, endpoint, body)
        chunks = await self.transports[backend.client].open_stream(backend, route, payload)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        prompt_tokens = estimate_prompt_tokens(body, endpoint) if include_usage else 0
        to_chat = endpoint == "chat" and route == "text"
        return self._convert(chunks, to_chat, backend, include_usage, prompt_tokens)

    async def _convert(
        self,
        chunks: AsyncGenerator[dict[str, Any], None],
        to_chat: bool,
        backend: BackendConfig,
        include_usage: bool,
        prompt_tokens: int,
    ) -> AsyncGenerator[dict[str, Any], None]:
        started_text = False
        first = True
        model = served_model(backend.model)
        strict = backend.client == "litellm"
        last: dict[str, Any] | None = None
        said = 0  # chunks that carried answer text
        usage_sent = False
        try:
            async for data in chunks:
                try:
                    problem = (
                        _shape_problem(data, streamed=True) if isinstance(data, dict) else "not an object"
                    )
                    if problem is None:
                        if to_chat:
                            data = completion_chunk_to_chat(data, first, strip_leading=not started_text)
                            started_text = started_text or any(
                                c["delta"].get("content") for c in data["choices"]
                            )
                        elif data.get("object") == "text_completion":
                            data = tidy_completion_chunk(data)
                        converted = openai_chunks(data, model, strict, include_usage)
                except _GARBAGE as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                if problem is not None:
                    raise _invalid(backend, f"{problem}: {json.dumps(data, default=str)[:300]}")
                first = False
                for chunk in converted:
                    if include_usage:  # what the estimate needs, should the backend send no usage
                        said += any(_chunk_text(c) for c in chunk.get("choices") or ())
                        usage_sent = usage_sent or chunk.get("usage") is not None
                        last = chunk
                    yield chunk
        finally:
            await chunks.aclose()
        if include_usage and not usage_sent and last is not None:
            # Asked for and not sent (llama.cpp's server ignores `stream_options`): an estimate, billed the
            # way a cut stream is, one token per chunk of text; the prompt at four characters a token.
            yield {**last, "choices": [], "usage": _estimated_usage(prompt_tokens, said)}


# What converting a backend's answer to OpenAI's shape raises on a field of the wrong type.
_GARBAGE = (TypeError, ValueError, AttributeError, KeyError, IndexError)


def _chunk_text(choice: dict[str, Any]) -> bool:
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


def _estimated_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def completion_to_chat(resp: dict[str, Any]) -> dict[str, Any]:
    """A text-completion response in chat-completion form."""
    choices = [
        {
            "index": c.get("index", i),
            "message": {"role": "assistant", "content": (c.get("text") or "").strip(), "refusal": None},
            "logprobs": None,
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
        choices.append(
            {
                "index": c.get("index", i),
                "delta": delta,
                "logprobs": None,
                "finish_reason": c.get("finish_reason"),
            }
        )
    return _drop_empty_usage({**chunk, "object": "chat.completion.chunk", "choices": choices})


# --- OpenAI's shape -----------------------------------------------------------------------------------
#
# OpenAI always sends `choices[].logprobs`, `message.refusal` and a chunk's `finish_reason`, null or
# not, and ends a stream's usage on a chunk of its own with `choices: []`. litellm's objects carry
# fields of litellm's own (provider_specific_fields, a null function_call, ...). Every answer is
# rebuilt here: OpenAI's fields, in OpenAI's places. `strict` (litellm) keeps nothing else; a direct
# HTTP backend's extra fields (vLLM's `stop_reason`, ...) pass through, as its whole payload does.

# Fields outside OpenAI's schema that are worth keeping: reasoning models' thoughts (vLLM, DeepSeek).
_KNOWN_EXTENSIONS = ("reasoning_content",)
_LITELLM_ONLY = frozenset({"provider_specific_fields", "_hidden_params", "_response_ms"})
_USAGE_DETAILS = {
    "prompt_tokens_details": ("audio_tokens", "cached_tokens"),
    "completion_tokens_details": (
        "accepted_prediction_tokens",
        "audio_tokens",
        "reasoning_tokens",
        "rejected_prediction_tokens",
    ),
}


def _extras(obj: dict[str, Any], known: tuple[str, ...] | frozenset[str], strict: bool) -> dict[str, Any]:
    """Fields of `obj` outside `known`: none when strict, else those not litellm's (and not null)."""
    if strict:
        return {k: obj[k] for k in _KNOWN_EXTENSIONS if obj.get(k) is not None and k not in known}
    return {k: v for k, v in obj.items() if k not in known and k not in _LITELLM_ONLY and v is not None}


def _usage(usage: Any, strict: bool) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    out: dict[str, Any] = {
        k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    for key, fields in _USAGE_DETAILS.items():
        details = usage.get(key)
        if isinstance(details, dict):
            kept = {f: details[f] for f in fields if details.get(f) is not None}
            if kept:
                out[key] = kept
    if not strict:
        out.update(
            _extras(usage, ("prompt_tokens", "completion_tokens", "total_tokens", *_USAGE_DETAILS), False)
        )
    return out


def _tool_calls(calls: Any, streamed: bool) -> list[dict[str, Any]] | None:
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for n, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        if streamed:  # deltas: only what this piece carries
            entry: dict[str, Any] = {"index": call.get("index", n)}
            for key in ("id", "type"):
                if call.get(key) is not None:
                    entry[key] = call[key]
            piece = {k: function[k] for k in ("name", "arguments") if function.get(k) is not None}
            if piece:
                entry["function"] = piece
        else:
            entry = {
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {"name": function.get("name"), "arguments": function.get("arguments") or ""},
            }
        out.append(entry)
    return out


_MESSAGE_KEYS = ("role", "content", "refusal", "tool_calls", "function_call", "audio", "annotations")


def _message(message: dict[str, Any], strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": message.get("role") or "assistant",
        "content": message.get("content"),
        "refusal": message.get("refusal"),
    }
    calls = _tool_calls(message.get("tool_calls"), streamed=False)
    if calls:
        out["tool_calls"] = calls
    for key in ("function_call", "audio"):
        if message.get(key) is not None:
            out[key] = message[key]
    if message.get("annotations"):
        out["annotations"] = message["annotations"]
    return {**out, **_extras(message, _MESSAGE_KEYS, strict)}


def _delta(delta: dict[str, Any], strict: bool) -> dict[str, Any]:
    out = {k: delta[k] for k in ("role", "content", "refusal", "function_call") if delta.get(k) is not None}
    calls = _tool_calls(delta.get("tool_calls"), streamed=True)
    if calls:
        out["tool_calls"] = calls
        if "role" in out:  # OpenAI's first tool-call chunk says so: no text
            out.setdefault("content", None)
    return {**out, **_extras(delta, _MESSAGE_KEYS, strict)}


_CHOICE_KEYS = ("index", "message", "delta", "text", "logprobs", "finish_reason")


def _choice(choice: dict[str, Any], i: int, kind: str, strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"index": choice.get("index", i)}
    if kind == "chat":
        out["message"] = _message(choice.get("message") or {}, strict)
    elif kind == "chunk":
        out["delta"] = _delta(choice.get("delta") or {}, strict)
    else:
        out["text"] = choice.get("text") or ""
    out["logprobs"] = choice.get("logprobs")
    out["finish_reason"] = choice.get("finish_reason")
    return {**out, **_extras(choice, _CHOICE_KEYS, strict)}


_TOP_KEYS = ("id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier")


def _top(obj: dict[str, Any], model: str, kind: str, strict: bool) -> dict[str, Any]:
    objects = {"chat": "chat.completion", "chunk": "chat.completion.chunk", "text": "text_completion"}
    out: dict[str, Any] = {
        "id": obj.get("id") or f"cmpl-{os.urandom(6).hex()}",
        "object": objects[kind],
        "created": int(obj.get("created") or time.time()),
        # One name for one backend, streamed or not (litellm reports the requested name in chunks).
        "model": model,
        "system_fingerprint": obj.get("system_fingerprint"),
        "choices": [_choice(c, i, kind, strict) for i, c in enumerate(obj.get("choices") or [])],
    }
    if obj.get("service_tier") is not None:
        out["service_tier"] = obj["service_tier"]
    return {**out, **_extras(obj, _TOP_KEYS, strict)}


def _kind_of(obj: dict[str, Any]) -> str:
    if obj.get("object") == "chat.completion.chunk":
        return "chunk"
    if obj.get("object") == "text_completion":
        return "text"
    return "chat"


def openai_response(resp: dict[str, Any], model: str, strict: bool = True) -> dict[str, Any]:
    """A whole chat or text completion in OpenAI's shape."""
    out = _top(resp, model, _kind_of(resp), strict)
    usage = _usage(resp.get("usage"), strict)
    if usage is not None:
        out["usage"] = usage
    return out


def openai_chunks(
    chunk: dict[str, Any], model: str, strict: bool = True, include_usage: bool = True
) -> list[dict[str, Any]]:
    """One streamed chunk in OpenAI's shape; usage rides a chunk of its own with `choices: []`
    (litellm attaches it to a chunk with a choice), and only when the client asked for it."""
    kind = "text" if chunk.get("object") == "text_completion" else "chunk"
    out = _top(chunk, model, kind, strict)
    usage = _usage(chunk.get("usage"), strict) if include_usage else None
    if usage is not None and not usage.get("total_tokens"):
        usage = None  # litellm's zero usage on ordinary chunks
    if usage is None:
        return [out]
    if not any(_says_something(c, kind) for c in out["choices"]):
        return [{**out, "choices": [], "usage": usage}]
    return [out, {**out, "choices": [], "usage": usage}]


def _says_something(choice: dict[str, Any], kind: str) -> bool:
    if choice.get("finish_reason") is not None:
        return True
    return bool(choice.get("text")) if kind == "text" else bool(choice.get("delta"))
