"""A small OpenAI-compatible stand-in backend for tests and the overhead benchmark.

It answers instantly (or after `delay_s`) with a deterministic echo, streams
word by word, and obeys an `x_standin` object in the request body
(`{"fail": 500, "delay_ms": 50}`), which also proves unknown fields reach it.
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
        body = await request.json()
        if len(self.received) < self.keep:
            self.received.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        control = body.get("x_standin") or {}
        delay = self.delay_s + float(control.get("delay_ms", 0)) / 1000.0
        if delay:
            await asyncio.sleep(delay)
        fail = int(control.get("fail", 0))
        if self.fail_next > 0:
            self.fail_next -= 1
            fail = 500
        if fail:
            err = {"error": {"message": f"stand-in failure {fail}", "type": "server_error", "code": None}}
            return body, JSONResponse(err, status_code=fail)
        return body, None

    async def chat(self, request: Request) -> Response:
        body, failure = await self._prepare(request)
        if failure is not None:
            return failure
        last = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {})
        content = last.get("content")
        text = self._answer(content if isinstance(content, str) else json.dumps(content), body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
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

    def _respond(self, body: dict[str, Any], text: str, prompt_tokens: int, chat: bool) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_tokens + len(text.split()),
        }
        finish = (
            "length" if body.get("max_tokens") and len(text.split()) >= int(body["max_tokens"]) else "stop"
        )
        if not body.get("stream"):
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
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
        return StreamingResponse(
            self._stream(rid, created, text, finish, usage if include_usage else None, chat),
            media_type="text/event-stream",
        )

    async def _stream(
        self, rid: str, created: int, text: str, finish: str, usage: dict[str, int] | None, chat: bool
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        words = text.split()
        for i, word in enumerate(words):
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
