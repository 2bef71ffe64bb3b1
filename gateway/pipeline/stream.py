"""A backend's (or the cache's) stream relayed to the client; when it ends, the record stage runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack
from typing import Any

from icgate.gateway.backends.admission import Admission
from icgate.gateway.backends.client import BackendError
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.call import backend_failure
from icgate.gateway.records import RequestContext
from icgate.gateway.telemetry import Metrics

log = logging.getLogger("icgate.pipeline")
Chunk = dict[str, Any]


def token_usage(response: Chunk) -> tuple[int, int]:
    """(prompt, completion) tokens of an answer or a usage chunk; zeros when it has none."""
    usage = response.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class StreamRelay:
    """Relays a stream to the client, then releases the backend slot and records.

    A class rather than a generator: `aclose()` must release the slot even when the
    consumer never started iterating (a client that disconnects before the first
    byte), which a generator's `finally` cannot promise. Closing twice is harmless.
    """

    def __init__(
        self,
        ctx: RequestContext,
        opened: tuple[Chunk, AsyncGenerator[Chunk, None]],
        exits: AsyncExitStack,
        admission: Admission,
        metrics: Metrics,
        finish: Callable[[RequestContext], None],
    ) -> None:
        self._ctx = ctx
        self._first: Chunk | None = opened[0] or None
        self._rest = opened[1]
        self._exits = exits
        self._admission = admission
        self._metrics = metrics
        self._finish = finish
        self._closed = False

    def __aiter__(self) -> StreamRelay:
        return self

    async def __anext__(self) -> Chunk:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            chunk = await self._next_from_backend()
        self._note(chunk)
        return chunk

    async def _next_from_backend(self) -> Chunk:
        """The next chunk; a backend that sends nothing for its `timeout_s` has failed (and counts so)."""
        backend = self._ctx.backend
        try:
            async with asyncio.timeout(backend.timeout_s if backend is not None else None):
                return await anext(self._rest)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except (BackendError, TimeoutError) as exc:
            name = backend.name if backend is not None else "none"
            err = (
                exc
                if isinstance(exc, BackendError)
                else BackendError(name, 504, f"The backend '{name}' stopped sending.", True)
            )
            log.warning(
                "request %s: stream from %s failed (%s): %s", self._ctx.request_id, name, err.kind, err.detail
            )
            # What the client would have got before the first byte: a rate limit stays a rate limit (the
            # client may retry later), a timeout is a 504, anything else a 502. No fallback: bytes went out.
            failure = backend_failure(err)
            self._ctx.status_code, self._ctx.error_type = failure.status_code, failure.code
            explain.stream_cut(self._ctx, err)
            self._metrics.backend_error(err.backend, err.kind)
            if backend is not None and not err.client_fault:
                self._admission.backend_failed(backend)
            await self.aclose()
            raise failure from None
        except GatewayError:
            await self.aclose()
            raise
        except Exception as exc:
            # A bug of the gateway's on a backend's odd stream: the client still gets an error event and a
            # clean end of stream (never a connection cut mid-body), the log the traceback, the slot back.
            log.exception("request %s: relaying the stream failed", self._ctx.request_id)
            self._ctx.status_code, self._ctx.error_type = 500, type(exc).__name__
            await self.aclose()
            raise GatewayError(
                500, "The gateway had an internal error; it has been logged.", type="server_error"
            ) from None

    def _note(self, chunk: Chunk) -> None:
        """Usage and the answer's text, for the request log and the cache insert."""
        ctx = self._ctx
        if chunk.get("usage"):
            ctx.prompt_tokens, ctx.completion_tokens = token_usage(chunk)
            ctx.usage_reported = True
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                text = (choice.get("delta") or {}).get("content") or ""
                ctx.output_parts.append(text)
                ctx.output_chars += len(text)
                self._ctx.finish_reason = choice.get("finish_reason") or self._ctx.finish_reason

    def _bill_what_was_sent(self) -> None:
        """A stream cut before its usage chunk (backend failure, client gone) is billed for what it
        delivered: one token per content chunk, as OpenAI-compatible servers stream them."""
        ctx = self._ctx
        if ctx.completion_tokens == 0:
            ctx.completion_tokens = sum(1 for part in ctx.output_parts if part)
        if ctx.prompt_tokens == 0 and ctx.completion_tokens:
            ctx.prompt_tokens = ctx.prompt_estimate

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._rest.aclose()
        finally:
            self._bill_what_was_sent()
            await self._exits.aclose()
            self._finish(self._ctx)
