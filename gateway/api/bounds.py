"""What one request may cost: its body size before parsing, its messages, parts and text after.

A 100 MB chat body once took 14 GB of RAM and a 10 MB one stalled the event loop for seconds for
every client, so size is refused before anything is parsed: a declared `Content-Length` over
`server.max_body_bytes` at once, a chunked body as soon as the bytes read pass it. Headers are
bounded in the HTTP protocol itself (`gateway.api.server`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from icgate.gateway.config import ServerConfig
from icgate.gateway.errors import GatewayError, error_body

Scope = dict[str, Any]
Message = dict[str, Any]


# Bodies of the bounded endpoints larger than this are parsed and bounded in a worker thread before
# the app sees them: validating a body of many tiny messages costs ~10 us a message on the event loop
# (250,000 of them fit in 8 MiB: seconds for every client), while the JSON parse alone off the loop
# costs that request ~7 ms per MiB. Below it, at most ~8,000 messages fit (tens of ms).
PRECHECK_BYTES = 256 * 1024
BOUNDED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class _BodyTooLarge(Exception):
    """Raised into the app from `receive` once a streamed body passes the limit."""


def _refusal(status: int, body: dict[str, Any]) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            # The rest of the body is never read: the connection cannot be reused.
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": payload, "more_body": False}


async def _send_error(send: Any, status: int, body: dict[str, Any]) -> None:
    start, end = _refusal(status, body)
    await send(start)
    await send(end)


def body_too_large(limit: int) -> dict[str, Any]:
    return error_body(
        f"The request body is too large: the gateway accepts at most {limit} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def _parse_and_bound(raw: bytes, config: ServerConfig) -> None:
    """In a worker thread: the bounds of a large body, before the app validates it on the loop.
    A body that is not a JSON object is left to the app, which explains what is wrong with it."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return
    except RecursionError:  # nested deeper than Python's recursion limit: far past any bound
        raise _too_deep(config.max_json_depth, None) from None
    if isinstance(parsed, dict):
        check_request_bounds(parsed, config)


class RequestLimits:
    """ASGI middleware: 413 with an OpenAI-style body for request bodies over `max_body_bytes`, and
    the request bounds of large chat/completions bodies checked off the event loop.

    A declared length is checked up front. With `Content-Length` within the limit the server already
    guarantees no more bytes arrive, so a small body costs a header scan and nothing else; only chunked
    bodies pay for a counting `receive` (and a `send` that silences whatever the app answers once its
    read failed).
    """

    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.max_body_bytes = config.max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared: bytes | None = None
        streamed = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                streamed = True
        if declared is not None and not streamed:
            try:
                length = int(declared)
            except ValueError:
                length = 0  # the HTTP parser has already refused a malformed length
            if length > limit:
                await _send_error(send, 413, body_too_large(limit))
            elif length > PRECHECK_BYTES and scope["path"] in BOUNDED_PATHS:
                await self._prechecked(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if not streamed:
            await self.app(scope, receive, send)  # no body at all
        elif scope["path"] in BOUNDED_PATHS:
            await self._prechecked(scope, receive, send)
        else:
            await self._counted(scope, receive, send, limit)

    async def _prechecked(self, scope: Scope, receive: Any, send: Any) -> None:
        """Read the whole body (within the limit), bound it in a worker thread, then replay it to the app."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message: Message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_error(send, 413, body_too_large(self.max_body_bytes))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            await asyncio.to_thread(_parse_and_bound, raw, self.config)
        except GatewayError as exc:
            await _send_error(send, exc.status_code, exc.body())
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            message: Message = await receive()  # after the body: only a disconnect is left to hear
            return message

        await self.app(scope, replay, send)

    async def _counted(self, scope: Scope, receive: Any, send: Any, limit: int) -> None:
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's reaction to the failed read; the 413 below answers instead
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_error(send, 413, body_too_large(limit))


def _too_large(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="request_too_large")


def _too_deep(limit: int, param: str | None) -> GatewayError:
    return _too_large(f"The request nests JSON too deeply: at most {limit} levels are accepted.", param)


def too_deep_field(body: dict[str, Any], limit: int) -> str | None:
    """The top-level field of `body` whose value nests past `limit` levels (the body is level 1), if any.
    Iterative, so that no depth can exhaust the stack here; it visits each container once."""
    for name, value in body.items():
        if not isinstance(value, dict | list):
            continue
        stack: list[tuple[Any, int]] = [(value, 2)]
        while stack:
            node, depth = stack.pop()
            if depth > limit:
                return str(name)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


def check_json_depth(body: dict[str, Any], config: ServerConfig) -> None:
    """Refuse (400, `request_too_large`) a parsed body nested deeper than `server.max_json_depth`."""
    field = too_deep_field(body, config.max_json_depth)
    if field is not None:
        raise _too_deep(config.max_json_depth, field)


def _text_chars(content: Any, param: str, config: ServerConfig) -> int:
    """Characters of text in one message's content (or one prompt); bounds its parts on the way."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    if len(content) > config.max_content_parts:
        raise _too_large(
            f"Too many content parts: '{param}' has {len(content)}, at most "
            f"{config.max_content_parts} are accepted.",
            param,
        )
    chars = 0
    for part in content:
        if isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
        elif isinstance(part, str):
            chars += len(part)
        else:
            chars += 1  # a token id
    return chars


def check_request_bounds(body: dict[str, Any], config: ServerConfig) -> None:
    """Refuse (400, `request_too_large`) a parsed chat or completions request that would cost too much:
    JSON nested too deeply, too many messages or prompts, too many parts in one message, or too much
    text in all."""
    check_json_depth(body, config)
    chars = 0
    param = "messages"
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > config.max_messages:
            raise _too_large(
                f"Too many messages: {len(messages)}, at most {config.max_messages} are accepted.",
                "messages",
            )
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                chars += _text_chars(message.get("content"), f"messages.{i}.content", config)
    prompt = body.get("prompt")
    if prompt is not None:
        param = "prompt"
        if isinstance(prompt, list):
            # A list of prompts (texts or token-id lists) is bounded like messages; a list of token ids
            # is one prompt. Each text counts its characters, each token id one.
            if prompt and isinstance(prompt[0], str | list) and len(prompt) > config.max_messages:
                raise _too_large(
                    f"Too many prompts: {len(prompt)}, at most {config.max_messages} are accepted.",
                    "prompt",
                )
            chars += sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
        elif isinstance(prompt, str):
            chars += len(prompt)
    if chars > config.max_text_chars:
        raise _too_large(
            f"The request has too much text: {chars} characters, at most {config.max_text_chars} "
            "are accepted.",
            param,
        )
