"""Chat and text completions: the only routes that run the whole pipeline, and the only ones that stream.

The caller's key goes into the pipeline as it came: authentication is a pipeline stage there, shared
with in-process callers. What stays here is HTTP: bounds and Unicode checks before any work, the SSE
framing of a stream, and the shutdown drain, which may cut a request while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from icgate.gateway.api.deps import BearerToken, GatewayDep
from icgate.gateway.api.drain import Drain, shutdown_error
from icgate.gateway.api.schemas import ChatCompletionRequest, CompletionRequest, accept_completion
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline import StreamRelay
from icgate.gateway.records import Endpoint, RequestContext
from icgate.gateway.wiring import Gateway

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, gw: GatewayDep, token: BearerToken
) -> Response:
    return await run_pipeline(gw, "chat", body.model_dump(exclude_unset=True), request, token)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, gw: GatewayDep, token: BearerToken
) -> Response:
    return await run_pipeline(gw, "completions", body.model_dump(exclude_unset=True), request, token)


async def run_pipeline(
    gw: Gateway, endpoint: Endpoint, body: dict[str, Any], request: Request, token: str | None
) -> Response:
    arrived = getattr(request.state, "icgate_arrived", None) or time.perf_counter()
    body = accept_completion(endpoint, body, await request.body(), gw.policy.server)
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
            result = await gw.pipeline.run(ctx, token)
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
