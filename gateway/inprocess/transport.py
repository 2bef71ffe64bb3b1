"""httpx transports that hand an OpenAI client's requests to the pipeline in this process.

The openai SDK builds an HTTP request and reads an HTTP response. Between the two, a request here gets
what the HTTP API gives it (the same schemas and bounds, the same pipeline, the same error format and
server-sent events) without a socket, an HTTP parser or the ASGI app: chat and text completions take
this short path. Every other endpoint (models, embeddings, feedback, health) goes through the gateway's
own FastAPI app in memory, so it answers exactly as over HTTP.

The pipeline runs on the loop its gateway started on. A client on another loop or thread (a sync
`openai.OpenAI`, or an async client in another thread) reaches it through a `LoopBridge`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from icgate.gateway.api.bounds import body_too_large
from icgate.gateway.api.errors import invalid_request
from icgate.gateway.api.schemas import ChatCompletionRequest, CompletionRequest, accept_completion
from icgate.gateway.config import ServerConfig
from icgate.gateway.errors import GatewayError, error_body
from icgate.gateway.pipeline.authenticate import presented_key
from icgate.gateway.pipeline.stream import StreamRelay
from icgate.gateway.records import Endpoint, RequestContext, Tenant
from icgate.gateway.wiring import Gateway

log = logging.getLogger("icgate.inprocess")

T = TypeVar("T")

# The two endpoints that run the pipeline, by their path below the client's base URL.
PIPELINE_PATHS: dict[str, tuple[Endpoint, type[BaseModel]]] = {
    "chat/completions": ("chat", ChatCompletionRequest),
    "completions": ("completions", CompletionRequest),
}
JSON = "application/json"
DONE = b"data: [DONE]\n\n"

TenantSource = Callable[[], Awaitable[Tenant | None]]


def read_body(
    raw: bytes, endpoint: Endpoint, schema: type[BaseModel], server: ServerConfig
) -> dict[str, Any]:
    """The checks the HTTP API makes before the pipeline, on the raw body: size, schema, bounds, Unicode."""
    if len(raw) > server.max_body_bytes:
        error = body_too_large(server.max_body_bytes)["error"]
        raise GatewayError(413, error["message"], code=error["code"])
    try:
        # Parsed as the HTTP API parses (`json.loads`, which lets an unpaired surrogate through to the
        # Unicode check), then validated by the same schema.
        parsed = json.loads(raw)
    except ValueError:
        raise GatewayError(400, "We could not parse the JSON body of your request.") from None
    try:
        fields = schema.model_validate(parsed).model_dump(exclude_unset=True)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    return accept_completion(endpoint, fields, raw, server)


def bearer_token(headers: httpx.Headers) -> str | None:
    return presented_key(headers.get("authorization"), headers.get("x-api-key"))


def json_response(status: int, body: Any, headers: dict[str, str], request: httpx.Request) -> httpx.Response:
    content = json.dumps(body, separators=(",", ":")).encode()
    return httpx.Response(status, headers={**headers, "content-type": JSON}, content=content, request=request)


def error_response(exc: GatewayError, request: httpx.Request, request_id: str | None) -> httpx.Response:
    headers = dict(exc.headers)
    if request_id is not None:
        headers["x-icgate-request-id"] = request_id
    return json_response(exc.status_code, exc.body(), headers, request)


def read_timeout(request: httpx.Request) -> float | None:
    """The SDK's read timeout for this call: the wait for the answer, and for each chunk of a stream."""
    timeout = request.extensions.get("timeout") or {}
    value = timeout.get("read")
    return float(value) if value is not None else None


class PipelineTransport(httpx.AsyncBaseTransport):
    """The async transport, on the gateway's loop: the short path for completions, the app for the rest."""

    def __init__(self, gateway: Gateway, base_path: str, tenant: TenantSource | None = None) -> None:
        self.gateway = gateway
        self.base_path = base_path.rstrip("/") + "/"
        self.tenant = tenant
        self._app: httpx.ASGITransport | None = None

    def relative(self, path: str) -> str:
        """A request's path below the client's base URL (`chat/completions` under `/v1/`)."""
        return path[len(self.base_path) :] if path.startswith(self.base_path) else path.lstrip("/")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        arrived = time.perf_counter()
        relative = self.relative(request.url.path)
        route = PIPELINE_PATHS.get(relative) if request.method == "POST" else None
        if route is None:
            return await self._through_app(request, relative)
        endpoint, schema = route
        ctx: RequestContext | None = None
        try:
            fields = read_body(await request.aread(), endpoint, schema, self.gateway.policy.server)
            ctx = RequestContext(endpoint=endpoint, body=fields, arrived=arrived)
            return await self._run(request, ctx)
        except GatewayError as exc:
            return error_response(exc, request, ctx.request_id if ctx else None)
        except httpx.TimeoutException:
            raise
        except Exception:  # a bug: the caller gets OpenAI's 500, the log gets the traceback
            log.exception("unexpected error on %s", request.url.path)
            body = error_body("The gateway had an internal error; it has been logged.", "server_error")
            return json_response(500, body, {}, request)

    async def _run(self, request: httpx.Request, ctx: RequestContext) -> httpx.Response:
        limit = read_timeout(request)
        tenant = await self.tenant() if self.tenant is not None else None
        try:
            async with asyncio.timeout(limit):  # on expiry the pipeline is cancelled: its slot is given back
                result = await self.gateway.pipeline.run(ctx, bearer_token(request.headers), tenant)
        except TimeoutError:
            raise httpx.ReadTimeout("icgate: no answer within the read timeout", request=request) from None
        if result.chunks is None:
            return json_response(200, result.response, result.headers(), request)
        headers = {**result.headers(), "content-type": "text/event-stream"}
        return httpx.Response(
            200, headers=headers, stream=EventStream(result.chunks, request), request=request
        )

    async def _through_app(self, request: httpx.Request, relative: str) -> httpx.Response:
        """Any other endpoint, answered by the HTTP API's own app (never a stream), read whole here."""
        if self._app is None:
            from icgate.gateway.api.app import create_app

            self._app = httpx.ASGITransport(create_app(self.gateway))
        url = request.url.copy_with(path="/v1/" + relative)
        inner = httpx.Request(request.method, url, headers=request.headers, content=await request.aread())
        response = await self._app.handle_async_request(inner)
        content = await response.aread()
        return httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )


class EventStream(httpx.AsyncByteStream):
    """A relayed stream in OpenAI's server-sent events, chunk by chunk as the backend sends them. Closing it
    (the SDK does, at the end or when the caller stops reading) closes the relay: the slot is given back."""

    def __init__(self, relay: StreamRelay, request: httpx.Request) -> None:
        self.relay = relay
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        limit = read_timeout(self.request)
        while True:
            try:
                async with asyncio.timeout(limit):
                    chunk = await anext(self.relay)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise httpx.ReadTimeout(
                    "icgate: no chunk within the read timeout", request=self.request
                ) from None
            except GatewayError as exc:  # a failure mid-stream ends with an error event, as over HTTP
                yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
                break
            yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        yield DONE

    async def aclose(self) -> None:
        await self.relay.aclose()


class LoopBridge:
    """Runs coroutines on the gateway's loop for callers on another thread or loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread_id: int | None) -> None:
        self.loop = loop
        self.thread_id = thread_id  # the loop's thread, when known: a sync call from it would deadlock

    def submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        if threading.get_ident() == self.thread_id:
            work.close()
            raise RuntimeError(
                "a sync openai client cannot call the gateway from the gateway's own event loop: "
                "wrap an openai.AsyncOpenAI there, or open the gateway with `with` (not `async with`)"
            )
        return asyncio.run_coroutine_threadsafe(work, self.loop)

    def call(self, work: Coroutine[Any, Any, T]) -> T:
        future = self.submit(work)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupted caller cancels the call: its slot is given back
            raise

    async def acall(self, work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self.submit(work))


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


class BridgedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A stream produced on the gateway's loop and read from another thread or loop, one chunk per hop."""

    def __init__(self, stream: httpx.AsyncByteStream, bridge: LoopBridge) -> None:
        self.stream = stream
        self.chunks = stream.__aiter__()
        self.bridge = bridge

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self.bridge.call(_next(self.chunks))) is not None:
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.bridge.acall(_next(self.chunks))) is not None:
            yield chunk

    def close(self) -> None:
        self.bridge.call(self.stream.aclose())

    async def aclose(self) -> None:
        await self.bridge.acall(self.stream.aclose())


def _bridged(response: httpx.Response, bridge: LoopBridge) -> httpx.Response:
    if isinstance(response.stream, EventStream):
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=BridgedStream(response.stream, bridge),
            request=response.request,
        )
    return response  # a whole body (`httpx.ByteStream`) reads the same from any thread


class SyncPipelineTransport(httpx.BaseTransport):
    """For `openai.OpenAI`: each call is run on the gateway's loop and waited for here."""

    def __init__(self, inner: PipelineTransport, bridge: LoopBridge) -> None:
        self.inner = inner
        self.bridge = bridge

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        return _bridged(self.bridge.call(self.inner.handle_async_request(request)), self.bridge)


class CrossLoopTransport(httpx.AsyncBaseTransport):
    """For an async client used on a loop other than the gateway's (another thread's `asyncio.run`)."""

    def __init__(self, inner: PipelineTransport, bridge: LoopBridge) -> None:
        self.inner = inner
        self.bridge = bridge

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.bridge.acall(self.inner.handle_async_request(request))
        return _bridged(response, self.bridge)
