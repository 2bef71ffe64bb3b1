"""The FastAPI app: OpenAI's endpoints, health, readiness and metrics.

Handlers only translate HTTP to a pipeline call and back; every decision is
made in `gateway.pipeline`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.bounds import RequestLimits, check_request_bounds
from gateway.api.drain import CUT_MARGIN_S, Drain, shutdown_error
from gateway.api.openapi import install_schema
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FeedbackRequest,
    may_hold_surrogates,
    unpaired_surrogate_at,
)
from gateway.cache_service import namespace_for
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError, error_body
from gateway.pipeline import StreamRelay
from gateway.service import Gateway

log = logging.getLogger("icgate.api")


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # a start that fails half-way still stops what it started
            await gateway.start()
            yield
            # Requests cut at the shutdown deadline record themselves first: then the log is flushed.
            await drain.settle(CUT_MARGIN_S)
        finally:
            await gateway.stop()

    drain = Drain()
    app = FastAPI(title="icgate", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    # Read by `gateway.api.server.build_server`: the protocol's limits and the shutdown deadline.
    app.state.server_config = gateway.policy.server
    app.state.drain = drain
    app.add_middleware(StampArrival)
    app.add_middleware(RequestLimits, config=gateway.policy.server)
    install_error_handlers(app)
    install_schema(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, gw: GatewayDep) -> Response:
        return await run_pipeline(gw, "chat", body.model_dump(exclude_unset=True), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, gw: GatewayDep) -> Response:
        fields = body.model_dump(exclude_unset=True)
        if fields.get("prompt") is None:
            # OpenAI's documented default: generate from the start of a document.
            fields["prompt"] = ""
        return await run_pipeline(gw, "completions", fields, request)

    @app.get("/v1/models")
    async def models(request: Request, gw: GatewayDep) -> dict[str, Any]:
        await gw.pipeline.check_caller(bearer_token(request))
        created = int(time.time())
        names = [
            *gw.policy.routed_models,
            *(b.name for b in gw.policy.backends),
            gw.policy.embedding.served_name,
        ]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "icgate"} for n in names],
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request, gw: GatewayDep) -> dict[str, Any]:
        await gw.pipeline.check_caller(bearer_token(request))
        if body.model != gw.policy.embedding.served_name:
            raise GatewayError(
                404,
                f"The model '{body.model}' does not exist. Embeddings are served by "
                f"'{gw.policy.embedding.served_name}'.",
                param="model",
                code="model_not_found",
            )
        await reject_invalid_text(request, body)
        texts = await embedding_texts(gw, body.input)
        vectors, tokens = await gw.embeddings.embed(texts)
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise GatewayError(400, f"dimensions must be at most {vectors.shape[1]}", param="dimensions")
            vectors = vectors[:, : body.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return {
            "object": "list",
            "model": body.model,
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": encode_vector(v, body.encoding_format or "float"),
                }
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request, gw: GatewayDep) -> dict[str, Any]:
        """Moves the utility of the cache entries that served, helped or came from a request, and labels
        the request's route sample (router training data)."""
        tenant = await gw.pipeline.check_caller(bearer_token(request))
        labelled = await gw.label_route_sample(body.request_id, tenant, body.score)
        touched = None
        if gw.cache is not None:
            touched = await gw.cache.feedback(body.request_id, body.score, namespace_for(tenant), gw.usage_of)
        if touched is None and not labelled:
            raise GatewayError(404, f"No request '{body.request_id}' is known.", param="request_id")
        return {
            "object": "feedback",
            "request_id": body.request_id,
            "entries_updated": touched or 0,
            "route_sample_labelled": labelled,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(gw: GatewayDep) -> Response:
        """Ready once started and while at least one backend's circuit lets calls through: with every
        backend failing, a load balancer should send traffic to another replica (docs/backends.md)."""
        if not gw.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        backends = gw.admission.circuits()
        if not gw.admission.serving():
            return JSONResponse({"status": "unavailable", "backends": backends}, status_code=503)
        return JSONResponse({"status": "ready", "backends": backends})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(gw: GatewayDep) -> Response:
        body, content_type = gw.telemetry.metrics.render()
        return Response(content=body, media_type=content_type)

    return app


class StampArrival:
    """Notes when a request reached the gateway, before its body is read and validated,
    so that `x-icgate-overhead-ms` counts that work too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["icgate_arrived"] = time.perf_counter()
        await self.app(scope, receive, send)


async def reject_invalid_text(request: Request, body: dict[str, Any] | BaseModel) -> None:
    """A string that is not valid Unicode is the sender's mistake (400), found before any work. The
    walk of the parsed body runs only when a scan of the raw one (cached: nothing is read again) finds
    a surrogate could be in it."""
    if not may_hold_surrogates(await request.body()):
        return
    fields = body if isinstance(body, dict) else body.model_dump(exclude_unset=True)
    where = unpaired_surrogate_at(fields)
    if where is not None:
        raise GatewayError(
            400,
            f"Invalid '{where}': the string holds an unpaired UTF-16 surrogate, which is not valid Unicode.",
            param=where,
            code="invalid_unicode",
        )


async def embedding_texts(gw: Gateway, value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """The texts to embed: strings as given; token ids are read with the served model's own tokenizer."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and isinstance(value[0], int):
        items = [value]
    else:
        items = list(value)
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(await gw.embeddings.decode(item))
        except ValueError as exc:
            raise GatewayError(400, f"Invalid 'input': {exc}", param="input") from None
    if any(not t for t in texts):
        raise GatewayError(400, "input must not contain empty strings", param="input")
    return texts


async def run_pipeline(gw: Gateway, endpoint: Endpoint, body: dict[str, Any], request: Request) -> Response:
    arrived = getattr(request.state, "icgate_arrived", None) or time.perf_counter()
    check_request_bounds(body, gw.policy.server)
    await reject_invalid_text(request, body)
    ctx = RequestContext(endpoint=endpoint, body=body, arrived=arrived)
    drain: Drain = request.app.state.drain
    if drain.expired:  # a late request on a kept-alive connection, past the shutdown deadline
        drain.mark_cut(ctx)
        gw.pipeline.record(ctx)
        return shutdown_response(ctx)
    drain.begin(ctx)
    handed_over = False
    try:
        drain.waiting(ctx)
        try:
            result = await gw.pipeline.run(ctx, bearer_token(request))
        finally:
            drain.done_waiting()
        if result.chunks is None:
            return JSONResponse(result.response, headers=result.headers())
        handed_over = True
        return RelayedStream(result.chunks, result.headers(), ctx, drain)
    except GatewayError as exc:
        headers = {**exc.headers, "x-icgate-request-id": ctx.request_id}
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)
    except asyncio.CancelledError:
        if not drain.absorb_cut():
            raise
        return shutdown_response(ctx)  # the pipeline has recorded it as cut
    finally:
        if not handed_over:
            drain.end(ctx)


def shutdown_response(ctx: RequestContext) -> JSONResponse:
    return JSONResponse(shutdown_error(), status_code=503, headers={"x-icgate-request-id": ctx.request_id})


class RelayedStream(StreamingResponse):
    """SSE response that closes its relay however the response ends, even before the first byte."""

    def __init__(
        self, relay: StreamRelay, headers: dict[str, str], ctx: RequestContext, drain: Drain
    ) -> None:
        super().__init__(sse(relay, ctx, drain), media_type="text/event-stream", headers=headers)
        self.relay = relay
        self.ctx = ctx
        self.drain = drain

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.relay.aclose()
            finally:
                self.drain.end(self.ctx)


async def sse(
    chunks: AsyncIterator[dict[str, Any]], ctx: RequestContext, drain: Drain
) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's framing. A mid-stream failure ends with an error event, and so
    does a shutdown past its grace period (the wait for the next chunk is what the drain cuts)."""
    error: dict[str, Any] | None = None
    while True:
        if drain.expired:
            drain.mark_cut(ctx)
            error = shutdown_error()
            break
        drain.waiting(ctx)
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except GatewayError as exc:
            error = exc.body()
            break
        except asyncio.CancelledError:
            if not drain.absorb_cut():
                raise
            error = shutdown_error()
            break
        finally:
            drain.done_waiting()
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    if error is not None:
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


_UNION_TAG = re.compile(r"[\[(]|^(str|int|float|bool|list|dict|none)$")


def field_path(loc: Any) -> list[str]:
    """The request field a validation error is about: its location without `body` and without the
    union members pydantic names on the way (`str`, `list[ContentPart]`, ...)."""
    return [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p))]


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's format; nothing leaks a traceback."""

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # A union (`content: str | list[part]`) fails once per member: the deepest error is the telling one.
        first = max(errors, key=lambda e: len(field_path(e.get("loc", ())))) if errors else {}
        param = ".".join(field_path(first.get("loc", ()))) or None
        if first.get("type") == "json_invalid":
            message = "We could not parse the JSON body of your request."
            param = None
        elif first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail) if exc.status_code != 404 else f"Unknown path: {request.url.path}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            error_body("The gateway had an internal error; it has been logged.", "server_error"),
            status_code=500,
        )
