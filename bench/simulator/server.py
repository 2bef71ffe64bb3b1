"""The simulator's HTTP face: OpenAI chat completions and vLLM-style /metrics over an `Engine`.

Token counting is by whitespace-separated words, so a benchmark that sends N
words means N prompt tokens, and the answer is exactly `max_tokens` words, so a
recorded trace replays with its own prompt and output lengths.

With a `LengthBook` (`--lengths FILE`), a conversation found in it is charged its
recorded prompt tokens and answered with its recorded length (cut at `max_tokens`
if the client sent a smaller one, as a model would be), learned out of band: the
gateway in front sees only the messages. Anything not found is served as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.harness import ServerThread
from bench.simulator.engine import Engine, EngineConfig, RequestTooLarge, Sequence
from bench.simulator.lengths import LengthBook

TOKEN = "tok"


def count_prompt_tokens(messages: list[Any]) -> int:
    """Words across all message contents, whether a string or a list of text parts."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
    return total


def _error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


class _EngineCollector(Collector):
    """Reads the engine at scrape time, under the metric names vLLM exports (plus the lookup's own)."""

    def __init__(self, engine: Engine, model_name: str, lookups: dict[str, int]) -> None:
        self.engine = engine
        self.model_name = model_name
        self.lookups = lookups

    def collect(self) -> Iterable[Metric]:
        engine, labels = self.engine, [self.model_name]
        gauges = [
            ("vllm:num_requests_running", "Requests in the running batch.", engine.num_running),
            (
                "vllm:num_requests_waiting",
                "Requests waiting for a slot or KV space.",
                engine.num_waiting,
            ),
            ("vllm:gpu_cache_usage_perc", "KV cache usage, 1 means full.", engine.kv_usage),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 1 means full (vLLM V1 name).", engine.kv_usage),
        ]
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        counters = [
            ("vllm:prompt_tokens", "Prefilled prompt tokens.", engine.prompt_tokens_total),
            ("vllm:generation_tokens", "Generated tokens.", engine.generation_tokens_total),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(labels, value)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success", "Finished requests.", labels=["model_name", "finished_reason"]
        )
        success.add_metric([*labels, "length"], engine.requests_served)
        yield success
        lookups = CounterMetricFamily(
            "sim_length_lookups",
            "Chat requests by whether their conversation was in the out-of-band length file.",
            labels=["model_name", "result"],
        )
        for result in ("hit", "miss"):
            lookups.add_metric([*labels, result], self.lookups[result])
        yield lookups


class Simulator:
    """One simulated backend: an engine plus the Starlette app that serves it.

    Streams send the first token as soon as it exists, then coalesce tokens into
    one chunk at most every `stream_interval_ms`, so a client still measures
    TTFT and TPOT faithfully while the process does not write a chunk per token.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_name: str = "sim",
        stream_interval_ms: float = 50.0,
        lengths: LengthBook | None = None,
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.stream_interval_s = stream_interval_ms / 1000.0
        self.engine = Engine(config)
        self.lengths = lengths
        # Only counted with a length book: "miss" then means a prompt that arrived unknown or changed.
        self.lookups = {"hit": 0, "miss": 0}
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self.engine, model_name, self.lookups))
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/healthz", self.health),
                Route("/metrics", self.metrics),
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            await self.engine.stop()

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def models(self, request: Request) -> Response:
        model = {"id": self.model_name, "object": "model", "owned_by": "simulator", "created": 0}
        return JSONResponse({"object": "list", "data": [model]})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("request body is not valid JSON")
        if not isinstance(body, dict):
            return _error("request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error("'messages' must be a non-empty list", param="messages")
        limit = body.get("max_tokens")
        if limit is None:
            limit = body.get("max_completion_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            return _error("max_tokens must be a positive integer", param="max_tokens")
        self.engine.start()  # a no-op under a lifespan-aware server
        try:
            seq = self._submit(messages, limit)
        except RequestTooLarge as exc:
            return _error(str(exc), param="max_tokens")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(request, seq, rid, created, include_usage), media_type="text/event-stream"
            )
        watcher = asyncio.create_task(self._abort_on_disconnect(request, seq))
        try:
            await seq.wait_done()
        finally:
            watcher.cancel()
            self.engine.abort(seq)  # no-op unless this handler was cancelled
        if seq.aborted:
            return JSONResponse(
                {
                    "error": {
                        "message": "request aborted",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _words(0, seq.generated)},
                        "finish_reason": seq.finish_reason,
                    }
                ],
                "usage": _usage(seq),
            }
        )

    def _submit(self, messages: list[Any], limit: int | None) -> Sequence:
        """Into the engine with the recorded lengths when the conversation is known, else counted words."""
        known = self.lengths.lookup(messages) if self.lengths is not None else None
        if self.lengths is not None:
            self.lookups["hit" if known else "miss"] += 1
        if known is None:
            return self.engine.submit(count_prompt_tokens(messages), limit)
        output = known.output_tokens if limit is None else min(known.output_tokens, limit)
        natural = output == known.output_tokens
        return self.engine.submit(known.prompt_tokens, output, natural_end=natural)

    async def _abort_on_disconnect(self, request: Request, seq: Sequence) -> None:
        """Free the slot and KV of a request whose client went away (the body is already read)."""
        while not seq.done:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.engine.abort(seq)
                return

    async def _stream(
        self, request: Request, seq: Sequence, rid: str, created: int, include_usage: bool
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._abort_on_disconnect(request, seq))

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        try:
            sent, last_sent = 0, loop.time()
            await seq.wait_progress(0)
            while True:
                if seq.aborted:
                    return
                now_generated, finish = seq.generated, (seq.finish_reason if seq.done else None)
                if now_generated > sent or finish is not None:
                    delta: dict[str, Any] = {"content": _words(sent, now_generated)}
                    if sent == 0:
                        delta["role"] = "assistant"
                    yield chunk(delta, finish)
                    sent = now_generated
                    last_sent = loop.time()
                if finish is not None:
                    break
                # Hold further tokens until the interval has passed, unless the sequence ends first.
                remaining = last_sent + self.stream_interval_s - loop.time()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await seq.wait_done()
                await seq.wait_progress(sent)
            if include_usage:
                usage = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": _usage(seq),
                }
                yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.engine.abort(seq)  # no-op once finished; frees the slot if the client left


def _words(start: int, end: int) -> str:
    """Tokens start..end of the answer as text, each but the very first preceded by a space."""
    if end <= start:
        return ""
    text = " ".join([TOKEN] * (end - start))
    return text if start == 0 else " " + text


def _usage(seq: Sequence) -> dict[str, int]:
    return {
        "prompt_tokens": seq.prompt_tokens,
        "completion_tokens": seq.generated,
        "total_tokens": seq.prompt_tokens + seq.generated,
    }


@contextlib.contextmanager
def running_simulator(
    simulator: Simulator | EngineConfig, port: int = 0, model_name: str = "sim"
) -> Iterator[str]:
    """Serve a simulator on 127.0.0.1 in a background thread; yields its base URL.

    Pass a `Simulator` to keep access to its engine counters; port 0 picks a free port.
    """
    sim = simulator if isinstance(simulator, Simulator) else Simulator(simulator, model_name=model_name)
    with ServerThread(sim.app, port=port or None) as server:
        yield server.url
