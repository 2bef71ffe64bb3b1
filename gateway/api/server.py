"""The HTTP server under the app: uvicorn's httptools protocol with limits, and a shutdown that cuts cleanly.

uvicorn alone accepts a 16 MiB header, lets a client send its headers a byte a second forever (its
keep-alive timer runs only after a response, and any byte cancels it), and keeps accepting idle
sockets until the process runs out of file descriptors, at which point legitimate requests get empty
replies. `limit_concurrency` does not help: it is checked only once a request's headers are in, counts
connections and tasks together, and answers in plain text while the socket stays open. So the
protocol below enforces, per connection and before any app code runs:

- `server.max_header_bytes`: a request head over it gets 431 (bytes are counted as they arrive, so
  the parser never buffers more than the limit plus one read);
- `server.max_body_bytes`, for a declared `Content-Length` (chunked bodies are counted by the app's
  `RequestLimits` middleware): 413;
- `server.header_timeout_s`: from a request's first byte to the end of its headers, else 408;
- `server.body_timeout_s`: from the end of a request's headers to the end of its body, else 408;
- `server.idle_timeout_s`: a connection with no request in progress (new, or kept alive) is closed;
- `server.max_connections`: a connection beyond it is answered 503 at once and closed.
- shutdown: while requests are still in flight (at most `server.graceful_shutdown_s`), a new request
  gets 503 with `Retry-After`, then the listening socket closes.

Every refusal carries an OpenAI-style JSON error. See docs/server-limits.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from icgate.gateway.api.bounds import body_too_large
from icgate.gateway.api.drain import CUT_MARGIN_S, RETRY_AFTER_S, Drain, refused_error
from icgate.gateway.config import ServerConfig
from icgate.gateway.errors import error_body

log = logging.getLogger("icgate.server")

# After a refusal the connection half-closes and discards input this long, so the client reads the
# answer instead of a reset (closing with unread input makes the kernel send RST).
LINGER_S = 2.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (common practice for servers); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open
            log.warning("could not raise the file-descriptor limit to %d: %s", target, exc)
    return soft, hard


def connection_cap(config: ServerConfig) -> int:
    """The effective connection cap: the configured one, never more than the descriptors left over."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    available = soft - config.reserved_fds if soft != resource.RLIM_INFINITY else 1 << 20
    available = max(16, available)
    return min(config.max_connections, available) if config.max_connections else available


def _json_response(status: int, body: dict[str, Any], extra: bytes = b"") -> bytes:
    payload = json.dumps(body).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\ncontent-length: ",
            str(len(payload)).encode(),
            b"\r\nconnection: close\r\n",
            extra,
            b"\r\n",
            payload,
        ]
    )


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size, header and idle timeouts and a connection cap.

    Configured through class attributes (uvicorn instantiates the class itself): use `protocol_for`.
    On the hot path it adds a few attribute checks per read and one timer per connection (idle);
    the header timer is armed only for a head that does not arrive in one read, the body timer only for
    a body that does not arrive with its head.
    """

    limits: ClassVar[ServerConfig] = ServerConfig()
    max_connections: ClassVar[int] = 1 << 20
    drain: ClassVar[Drain | None] = None  # while it is `refusing`, every new request gets a 503
    # Connections refused over the cap, and when that was last logged: per server (see `protocol_for`).
    refused: ClassVar[int] = 0
    refused_logged_at: ClassVar[float] = -1e9

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # between requests, or inside a request's head
        self._head_bytes = 0  # bytes read since the current head began (an upper bound of its size)
        self._head_clock = False  # the header timeout is running
        self._body_clock = False  # the body timeout is running
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._note_refused_connection()
            self._refuse(
                503,
                error_body(
                    "The gateway has too many open connections; retry shortly.",
                    "server_error",
                    None,
                    "too_many_connections",
                ),
                b"retry-after: 1\r\n",
            )
            return
        self._arm(self.limits.idle_timeout_s, self._idle_expired)

    @classmethod
    def _note_refused_connection(cls) -> None:
        """A warning at most every 10 s: a flood of refused connections must not flood the log too."""
        cls.refused += 1
        now = time.monotonic()
        if now - cls.refused_logged_at >= 10.0:
            log.warning(
                "connection cap %d reached: %d connection(s) refused so far", cls.max_connections, cls.refused
            )
            cls.refused_logged_at = now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, delay_s: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_expired(self) -> None:
        """The body is late: 408 if nothing was answered yet (the app hears a disconnect, and whatever it
        sends is dropped), else the connection is cut."""
        self._timer = None
        self._body_clock = False
        cycle = self.cycle
        if self._reading_head or self.transport.is_closing() or cycle is None:
            return
        self._refused = True
        if cycle.response_started:
            self.transport.close()
            return
        cycle.disconnected = True
        cycle.message_event.set()
        self._answer_and_close(
            408,
            error_body(
                f"The request body did not arrive within {self.limits.body_timeout_s:g} s.",
                "invalid_request_error",
                None,
                "request_timeout",
            ),
        )

    def _head_expired(self) -> None:
        self._timer = None
        if self._reading_head and not self.transport.is_closing():
            self._refuse(
                408,
                error_body(
                    f"The request headers did not arrive within {self.limits.header_timeout_s:g} s.",
                    "invalid_request_error",
                    None,
                    "request_timeout",
                ),
            )

    # --- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: input is discarded
        if self._reading_head:
            self._head_bytes += len(data)
        # As uvicorn's, but a parse stopped by a refusal is not reported as a bad request.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._reading_head and self._head_bytes:  # a head has begun and is still incomplete
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head()  # and it is already too long
            elif not self._head_clock:
                # Started from the read that began the head. A head that arrives whole (nearly every
                # request) never pays for a timer.
                self._head_clock = True
                self._arm(self.limits.header_timeout_s, self._head_expired)
        elif not (self._reading_head or self._body_clock or self._refused or self.pipeline):
            # The head is in and its body is not (a body that came with its head completed the request
            # within this read and never pays for a timer). A pipelined request waiting behind another
            # is not read meanwhile, so its body is not timed.
            self._body_clock = True
            self._arm(self.limits.body_timeout_s, self._body_expired)

    def on_headers_complete(self) -> None:
        if (
            self._head_bytes > self.limits.max_header_bytes
            and self._head_size() > self.limits.max_header_bytes
        ):
            self._refuse_head()
            raise _Refused  # stops the parser: no request task is started
        for name, value in self.headers:  # lower-cased by uvicorn
            if name == b"content-length":
                if value.isdigit() and int(value) > self.limits.max_body_bytes:
                    # Refused here rather than by the app's middleware: no task, and the lingering
                    # close lets a client that is still uploading read the answer.
                    self._refuse(413, body_too_large(self.limits.max_body_bytes))
                    raise _Refused
                break
        if self.drain is not None and self.drain.refusing:
            self._refuse(503, refused_error(), b"retry-after: %d\r\n" % RETRY_AFTER_S)
            raise _Refused
        self._reading_head = False
        self._head_clock = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0
        if self._body_clock:
            self._body_clock = False
            self._disarm()

    def _head_size(self) -> int:
        """The head's size, once parsed (the byte count also holds whatever body came with it)."""
        return len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 16

    # --- refusing -----------------------------------------------------------------------------

    def _refuse_head(self) -> None:
        self._refuse(
            431,
            error_body(
                f"The request headers are too large: the gateway accepts at most "
                f"{self.limits.max_header_bytes} bytes of request line and headers.",
                "invalid_request_error",
                None,
                "request_header_fields_too_large",
            ),
        )

    def send_400_response(self, msg: str) -> None:
        """A request the parser cannot read gets OpenAI's error format too, not plain text."""
        log.debug("unparseable request from %s: %s", self.client, msg)
        self._refuse(400, error_body(msg, "invalid_request_error", None, "invalid_http_request"))

    def _refuse(self, status: int, body: dict[str, Any], extra: bytes = b"") -> None:
        """Answer `status` (unless a response is under way) and close, lingering so the client reads it."""
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a response is being written: there is no room for another
            return
        self._answer_and_close(status, body, extra)

    def _answer_and_close(self, status: int, body: dict[str, Any], extra: bytes = b"") -> None:
        self.transport.write(_json_response(status, body, extra))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the client sees the end; its own close ends the connection
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


def protocol_for(
    config: ServerConfig, max_connections: int, drain: Drain | None = None
) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to one server's limits and drain (uvicorn builds protocol instances itself)."""

    class Protocol(LimitedHttpToolsProtocol):
        limits = config

    Protocol.max_connections = max_connections
    Protocol.drain = drain
    return Protocol


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with the gateway's own shutdown deadline before uvicorn's forced cancellation."""

    def __init__(self, config: uvicorn.Config, drain: Drain | None = None, grace_s: float = 30.0) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        deadline = None
        if self.drain is not None:
            deadline = asyncio.get_running_loop().call_later(self.grace_s, self.drain.expire)
            # Listening on while requests are in flight, answering new ones 503 (the protocol reads
            # `drain.refusing`); then uvicorn's own shutdown closes the sockets and waits for the rest.
            await self.drain.refuse_new_until_quiet(self.grace_s)
        try:
            await super().shutdown(sockets)
        finally:
            if deadline is not None:
                deadline.cancel()


def build_server(app: Any, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app`. A gateway app (from `create_app`) gets the policy's `server:` limits,
    the limited protocol and the clean shutdown; any other app a plain uvicorn server."""
    state = getattr(app, "state", None)
    limits: ServerConfig | None = getattr(state, "server_config", None)
    drain: Drain | None = getattr(state, "drain", None)
    if limits is None:
        return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    cap = connection_cap(limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=limits.access_log,
        lifespan="on",
        root_path=limits.root_path,
        http=protocol_for(limits, cap, drain),
        timeout_keep_alive=limits.idle_timeout_s,  # type: ignore[arg-type]  # uvicorn takes any number
        timeout_graceful_shutdown=limits.graceful_shutdown_s + CUT_MARGIN_S,  # type: ignore[arg-type]
    )
    log.info(
        "server limits: %d connections, body %d B, headers %d B, header timeout %gs, idle %gs, grace %gs",
        cap,
        limits.max_body_bytes,
        limits.max_header_bytes,
        limits.header_timeout_s,
        limits.idle_timeout_s,
        limits.graceful_shutdown_s,
    )
    return GatewayServer(config, drain, limits.graceful_shutdown_s)
