"""A small OpenAI-compatible stand-in backend for tests and the overhead benchmark.

It answers instantly (or after `delay_s`) with a deterministic echo, streams
word by word, and obeys an `x_standin` object in the request body, which also
proves unknown fields reach it:

- `{"fail": 500}`: answer with that HTTP status (and `"fail_message": "..."` as the error message);
- `{"delay_ms": 50}`: wait before answering;
- `{"hang_s": 30}`: send nothing (not even headers) for that long, or until the caller hangs up;
- `{"stall_after_first_s": 30}`: stream the first chunk, then nothing for that long;
- `{"chunk_gap_ms": 20}`: stream with that pause before every word after the first;
- `{"only": "small-model", ...}`: the rest applies only on the stand-in of that name (fallback tests).

With `tools` in a chat request it calls a tool, as OpenAI does: the one `tool_choice` names, else
the first (every tool when `parallel_tool_calls` is true), with arguments built from the tool's JSON
schema; a conversation ending in a `tool` message gets a text answer quoting the tool's result.
Every request body it receives is kept in `received` for assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class StandinBackend:
    def __init__(self, name: str = "standin", delay_s: float = 0.0, keep: int = 1000) -> None:
        self.name = name
        self.delay_s = delay_s
        self.keep = keep
        self.received: list[dict[str, Any]] = []
        self.fail_next: int = 0  # answer the next N requests with HTTP 500
        # Requests being answered now, and the most at once (a streamed answer counts until it starts).
        self.in_flight = 0
        self.peak_in_flight = 0
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ]
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "x"}]}
        )

    async def _prepare(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._prepare_counted(request)
        finally:
            self.in_flight -= 1

    async def _prepare_counted(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.json()
        if len(self.received) < self.keep:
            self.received.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        control = self._control(body)
        delay = self.delay_s + float(control.get("delay_ms", 0)) / 1000.0
        if delay:
            await self._hang(request, delay)
        if control.get("hang_s"):
            await self._hang(request, float(control["hang_s"]))
        fail = int(control.get("fail", 0))
        if self.fail_next > 0:
            self.fail_next -= 1
            fail = 500
        if fail:
            message = str(control.get("fail_message") or f"stand-in failure {fail}")
            kind = "server_error" if fail >= 500 else "invalid_request_error"
            err = {"error": {"message": message, "type": kind, "param": None, "code": None}}
            return body, JSONResponse(err, status_code=fail)
        return body, None

    def _control(self, body: dict[str, Any]) -> dict[str, Any]:
        control = body.get("x_standin") or {}
        return {} if control.get("only", self.name) != self.name else dict(control)

    @staticmethod
    async def _hang(request: Request, seconds: float) -> None:
        """Send nothing for `seconds`, but stop as soon as the caller hangs up (so a test ends quickly)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.05)

    async def chat(self, request: Request) -> Response:
        body, failure = await self._prepare(request)
        if failure is not None:
            return failure
        messages = body.get("messages", [])
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        calls = tool_calls_for(body)
        if calls:
            return self._respond(body, "", prompt_tokens, chat=True, tool_calls=calls)
        if messages and messages[-1].get("role") == "tool":
            # The second half of a round trip: answer from the tool's result.
            text = self._answer(
                f"tool {messages[-1].get('tool_call_id')} said {messages[-1].get('content')}", body
            )
            return self._respond(body, text, prompt_tokens, chat=True)
        last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        content = last.get("content")
        text = self._answer(content if isinstance(content, str) else json.dumps(content), body)
        return self._respond(body, text, prompt_tokens, chat=True)

    async def completions(self, request: Request) -> Response:
        body, failure = await self._prepare(request)
        if failure is not None:
            return failure
        prompt = body.get("prompt", "")
        prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        return self._respond(body, self._answer(prompt, body), len(prompt.split()), chat=False)

    def _answer(self, prompt: str, body: dict[str, Any]) -> str:
        words = f"{self.name} says: {prompt}".split()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        return " ".join(words[: int(limit)] if limit else words)

    def _respond(
        self,
        body: dict[str, Any],
        text: str,
        prompt_tokens: int,
        chat: bool,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        completion_tokens = len(text.split()) + sum(
            len(c["function"]["arguments"]) // 4 + 1 for c in tool_calls or ()
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        finish = (
            "length" if body.get("max_tokens") and len(text.split()) >= int(body["max_tokens"]) else "stop"
        )
        if tool_calls:
            finish = "tool_calls"
        stall_s = float(self._control(body).get("stall_after_first_s") or 0)
        if not body.get("stream"):
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if tool_calls:
                    message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
                choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.name,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage_or_none = usage if include_usage else None
        if tool_calls:
            chunks = self._stream_tool_calls(rid, created, tool_calls, usage_or_none, stall_s)
        else:
            gap_s = float(self._control(body).get("chunk_gap_ms") or 0) / 1000.0
            chunks = self._stream(rid, created, text, finish, usage_or_none, chat, stall_s, gap_s)
        return StreamingResponse(chunks, media_type="text/event-stream")

    async def _stream_tool_calls(
        self,
        rid: str,
        created: int,
        calls: list[dict[str, Any]],
        usage: dict[str, int] | None,
        stall_s: float = 0.0,
    ) -> AsyncIterator[bytes]:
        """Tool calls the way OpenAI streams them: id and name first, then the arguments in pieces."""
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name}
        for n, call in enumerate(calls):
            head: dict[str, Any] = {
                "index": n,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            delta: dict[str, Any] = {"tool_calls": [head]}
            if n == 0:
                delta = {"role": "assistant", "content": None, **delta}
            yield self._sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            if n == 0 and stall_s:
                await asyncio.sleep(stall_s)
            args = call["function"]["arguments"]
            for start in range(0, len(args), 8):
                piece = {"index": n, "function": {"arguments": args[start : start + 8]}}
                yield self._sse(
                    {
                        **base,
                        "choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}],
                    }
                )
        yield self._sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        if usage is not None:
            yield self._sse({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    async def _stream(
        self,
        rid: str,
        created: int,
        text: str,
        finish: str,
        usage: dict[str, int] | None,
        chat: bool,
        stall_s: float = 0.0,
        gap_s: float = 0.0,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        words = text.split()
        for i, word in enumerate(words):
            if i == 1 and stall_s:
                await asyncio.sleep(stall_s)
            if i > 0 and gap_s:
                await asyncio.sleep(gap_s)
            piece = word if i == 0 else " " + word
            if chat:
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            yield self._sse(
                {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
            )
        last: dict[str, Any] = (
            {"index": 0, "delta": {}, "finish_reason": finish}
            if chat
            else {"index": 0, "text": "", "finish_reason": finish, "logprobs": None}
        )
        yield self._sse({"id": rid, "object": obj, "created": created, "model": self.name, "choices": [last]})
        if usage is not None:
            yield self._sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.name,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _sse(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"


def tool_calls_for(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool calls a chat request gets: none without tools, with `tool_choice: none`, or after a tool's
    result; the named tool; every tool with `parallel_tool_calls: true`; else the first."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice", "auto")
    messages = body.get("messages") or []
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"].get("name") == name][:1]
    elif body.get("parallel_tool_calls") is True:
        chosen = tools
    else:
        chosen = tools[:1]
    last: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = str(last["content"]) if isinstance(last.get("content"), str) else ""
    return [
        {
            "id": f"call_{n}_{t['function']['name']}",
            "type": "function",
            "function": {"name": t["function"]["name"], "arguments": json.dumps(arguments_for(t, text))},
        }
        for n, t in enumerate(chosen)
    ]


def arguments_for(tool: dict[str, Any], text: str) -> dict[str, Any]:
    """Deterministic arguments from the tool's JSON schema: strings get the user's text."""
    samples: dict[str, Any] = {"string": text, "integer": 1, "number": 1.5, "boolean": True, "array": []}
    properties = ((tool["function"].get("parameters") or {}).get("properties") or {}).items()
    return {
        name: samples.get(str(spec.get("type")), {}) for name, spec in properties if isinstance(spec, dict)
    }


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--name", default="standin")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    backend = StandinBackend(args.name, delay_s=args.delay_ms / 1000.0)
    uvicorn.run(backend.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
