"""Shutdown past the grace period: in-flight requests are cut by the gateway, with a proper answer.

uvicorn's own answer to a drain that outlasts `timeout_graceful_shutdown` is to cancel every task:
a stream just stops (no error event, no `[DONE]`, logged as 200) and a plain request gets a text 500
without a request id or a log row. So the gateway keeps its own, shorter deadline (`GatewayServer`
arms `expire()` at `server.graceful_shutdown_s`; uvicorn's deadline is later by `CUT_MARGIN_S`): at
expiry every request still waiting on the pipeline or a backend is cancelled *by the drain*, and the
handlers turn that cancellation into a JSON 503 or an SSE error event plus `[DONE]`, with a log row
saying `503` / `shutdown`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from icgate.gateway.errors import error_body
from icgate.gateway.records import RequestContext

log = logging.getLogger("icgate.shutdown")

# How much later than the gateway's deadline uvicorn's own forced cancellation comes: time for the cut
# requests to send their last bytes and write their log rows.
CUT_MARGIN_S = 5.0
SHUTDOWN_CODE = "shutdown"
SHUTDOWN_MESSAGE = (
    "The gateway is shutting down and could not finish this request within its shutdown grace period; "
    "retry it."
)
REFUSED_MESSAGE = "The gateway is shutting down and takes no new requests; retry it."
RETRY_AFTER_S = 1


def shutdown_error() -> dict[str, Any]:
    return error_body(SHUTDOWN_MESSAGE, "server_error", None, SHUTDOWN_CODE)


def refused_error() -> dict[str, Any]:
    """What a request that arrives during the drain gets, with a 503 and `Retry-After`."""
    return error_body(REFUSED_MESSAGE, "server_error", None, SHUTDOWN_CODE)


class Drain:
    """Which requests may be cut at the deadline, and how many have yet to be recorded.

    A request registers its task only around its waits (the pipeline, a stream's next chunk), so a
    cut never lands in the middle of writing a response. All methods run on the event loop.
    """

    def __init__(self) -> None:
        self.refusing = False  # draining: new requests get a 503 from the HTTP server
        self.expired = False
        self._waiting: dict[asyncio.Task[Any], RequestContext] = {}
        self._cut: set[asyncio.Task[Any]] = set()
        self._open: dict[int, RequestContext] = {}  # requests begun and not yet recorded, by id()

    # --- the request side ---------------------------------------------------------------------

    def begin(self, ctx: RequestContext) -> None:
        self._open[id(ctx)] = ctx

    def end(self, ctx: RequestContext) -> None:
        self._open.pop(id(ctx), None)

    def waiting(self, ctx: RequestContext) -> None:
        """The current task may be cut from now on (until `done_waiting`)."""
        task = asyncio.current_task()
        if task is not None:
            self._waiting[task] = ctx

    def done_waiting(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._waiting.pop(task, None)

    def absorb_cut(self) -> bool:
        """In an `except CancelledError`: True (and the cancellation withdrawn) if the drain cut this
        task, so the handler answers instead; False for any other cancellation, which must propagate."""
        task = asyncio.current_task()
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

    @staticmethod
    def mark_cut(ctx: RequestContext) -> None:
        """What the request log says about a request the shutdown cut. Plain fields only: a request
        already recorded may have its `decisions` being serialised by the log writer's thread."""
        ctx.status_code, ctx.error_type = 503, SHUTDOWN_CODE

    # --- the server side ----------------------------------------------------------------------

    async def refuse_new_until_quiet(self, timeout_s: float) -> None:
        """Answer new requests with 503 and `Retry-After` (the server reads `refusing`) while the ones in
        flight finish, for at most `timeout_s`. Only then does the server close its listening socket:
        a client that arrives meanwhile gets an answer it can act on (retry elsewhere) rather than a
        refused or reset connection."""
        self.refusing = True
        if self._open:
            log.info(
                "shutting down: %d request(s) in flight; new requests get 503 until they finish",
                len(self._open),
            )
        deadline = time.monotonic() + timeout_s
        while self._open and time.monotonic() < deadline and not self.expired:
            await asyncio.sleep(0.01)

    def expire(self) -> None:
        """The grace period is over: cut every request that is still waiting. One that is busy writing
        (a stream between chunks) cuts itself at its next wait; every one is logged as cut."""
        self.expired = True
        if self._open:
            log.warning("shutdown grace period over: cutting %d request(s) still in flight", len(self._open))
        for ctx in self._open.values():
            self.mark_cut(ctx)
        for task in self._waiting:
            if task.cancel(msg="icgate: shutdown grace period over"):
                self._cut.add(task)
        self._waiting.clear()

    async def settle(self, timeout_s: float) -> None:
        """Wait (bounded) until every begun request is recorded: the request log is flushed after this."""
        deadline = time.monotonic() + timeout_s
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._open:
            log.warning("%d request(s) still unrecorded at shutdown", len(self._open))
