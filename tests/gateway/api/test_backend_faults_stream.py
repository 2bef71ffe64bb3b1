"""Backends that die, answer garbage or slow down, provoked for real on loopback, through both transports.

A backend port nothing listens on, a stand-in process SIGKILLed between requests and in the middle of a
stream, a raw-socket server that closes (or resets) its connection after a few chunks, writes a malformed
`data:` line, an error event, or ends a stream without `[DONE]`; a stand-in that becomes slow. Each test
asserts what the client read, what the request log holds, and that nothing leaked: no admission slot, no
socket of the gateway to the faulty backend, no asyncio task on the gateway's loop, no busy loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from bench.harness import free_port
from icgate.gateway.backends.client import HttpTransport
from icgate.gateway.config import Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.store.request_log import LogRow, get_request
from tests.gateway.conftest import RunningGateway, Standins, two_tier_policy

StartGateway = Callable[[Policy], RunningGateway]
T = TypeVar("T")
REPO = Path(__file__).resolve().parents[3]
PROMPT = "one two three four five six seven eight"
ANSWER = f"faulty says: {PROMPT}".split()  # what FaultyBackend streams, a word a chunk
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "08": "CLOSE_WAIT"}


# --- a backend that misbehaves on purpose ------------------------------------------------------------------


@dataclass
class Fault:
    """What FaultyBackend does with the next requests.

    Streamed: `chunks` good chunks (a word each), a `finish_reason` chunk if `finish`, the raw SSE `line` if
    any, then `end`: `done` (`data: [DONE]`, then the HTTP body's end), `eof` (the body's end, no `[DONE]`),
    `close` (the socket closed with the chunked body unfinished), `reset` (a TCP reset), `hold` (nothing
    more, the socket kept open until the gateway hangs up). Not streamed: `body` as a 200 JSON answer.
    """

    chunks: int = 3
    finish: bool = False
    line: bytes | None = None
    end: str = "done"
    body: bytes | None = None


class FaultyBackend:
    """An OpenAI-compatible server on a raw asyncio socket (one request per connection, `connection:
    close`), in a thread of its own; a framework would not let a test cut or reset a connection mid-body."""

    def __init__(self) -> None:
        self.fault = Fault()
        self.received: list[dict[str, Any]] = []
        self.open = 0  # connections open now, as the server sees them
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyBackend:
        self._thread.start()
        started = asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(started, self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length))
            self.received.append(body)
            await self._answer(body, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self.open -= 1

    async def _answer(
        self, body: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        fault = self.fault
        if not body.get("stream"):
            payload = fault.body if fault.body is not None else json.dumps(_whole_answer()).encode()
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(
                payload
            )
            writer.write(head + b"connection: close\r\n\r\n" + payload)
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )

        async def send(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.02)  # one event at a time, as a model streams

        for i in range(fault.chunks):
            await send(_event(_chunk({"content": ("" if i == 0 else " ") + ANSWER[i % len(ANSWER)]}, None)))
        if fault.finish:
            await send(_event(_chunk({}, "stop")))
        if fault.line is not None:
            await send(fault.line)
        if fault.end == "done":
            await send(b"data: [DONE]\n\n")
        if fault.end in ("done", "eof"):
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        elif fault.end == "reset":
            await asyncio.sleep(0.3)  # let the gateway read what was sent: a reset drops unread data
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault.end == "hold":
            async with asyncio.timeout(30):  # until the gateway hangs up (it must)
                while await reader.read(1024):
                    pass


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "cmpl-f",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _whole_answer() -> dict[str, Any]:
    message = {"role": "assistant", "content": " ".join(ANSWER)}
    return {
        "id": "cmpl-f",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18},
    }


@pytest.fixture
def faulty() -> Iterator[FaultyBackend]:
    backend = FaultyBackend().start()
    yield backend
    backend.stop()


class StandinProcess:
    """bench/standin_backend.py in a process of its own, which a test can SIGKILL and start again."""

    def __init__(self, name: str = "small-model") -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StandinProcess:
        cmd = [sys.executable, "-m", "bench.standin_backend", "--port", str(self.port), "--name", self.name]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the stand-in process exited"
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("the stand-in process did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def standin_process() -> Iterator[StandinProcess]:
    process = StandinProcess()
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()


# --- requests, and what the gateway kept ------------------------------------------------------------------


def chat_body(model: str = "auto", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}], **extra}


@dataclass
class Streamed:
    status: int
    headers: httpx.Headers
    events: list[str] = field(default_factory=list)  # every `data:` payload, `[DONE]` included

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]" and "error" not in json.loads(e)]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [json.loads(e)["error"] for e in self.events if e != "[DONE]" and "error" in json.loads(e)]
        assert len(errors) <= 1
        return errors[0] if errors else None

    @property
    def request_id(self) -> str:
        return self.headers["x-icgate-request-id"]


def stream(
    gw: RunningGateway, body: dict[str, Any], on_chunk: Callable[[int], None] | None = None
) -> Streamed:
    """A streamed request read to its end; `on_chunk(n)` runs after the n-th event (to kill a backend)."""
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        out = Streamed(r.status_code, r.headers)
        if r.status_code != 200:
            out.events.append(r.read().decode())
            return out
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.events.append(line[6:])
                if on_chunk is not None:
                    on_chunk(len(out.events))
            else:
                assert line == "" or line.startswith(":"), line  # nothing but well-formed SSE
    return out


def post(gw: RunningGateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)


def on_loop(gw: RunningGateway, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the gateway's own event loop (its server thread's)."""
    writer = gw.gateway.log_writer
    assert writer is not None and writer._task is not None
    return asyncio.run_coroutine_threadsafe(coro, writer._task.get_loop()).result(30)


def logged(gw: RunningGateway, request_id: str) -> LogRow:
    """The request's row in the request log, as the console reads it (after the write-behind flush)."""
    assert gw.gateway.engine is not None and gw.gateway.log_writer is not None
    deadline = time.monotonic() + 10
    while True:
        on_loop(gw, gw.gateway.log_writer.flush())
        row = get_request(gw.gateway.engine, request_id)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no request log row for {request_id}"
        time.sleep(0.05)


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what if isinstance(what, str) else what()}"
        time.sleep(0.05)


# --- leaks ------------------------------------------------------------------------------------------------


def gateway_tasks(gw: RunningGateway) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return on_loop(gw, count())


def sockets_to(port: int) -> list[str]:
    """The TCP states of this process's open sockets whose peer is `port` on loopback (the gateway runs in
    this process; the raw backend's own sockets have it as their local port, so they are not counted)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    states.append(TCP_STATES.get(cols[3], cols[3]))
    return states


def no_socket_to(port: int) -> bool:
    return not sockets_to(port)


def sockets_left(port: int) -> str:
    return f"sockets left to port {port}: {sockets_to(port)}"


def cpu_s() -> float:
    """User plus system CPU time of this process (the gateway's threads, the backends', the test's)."""
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class Leaks:
    """What the gateway holds now, to compare after the faults: slots, pooled connections, tasks."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.tasks = gateway_tasks(gw)

    def assert_none(self, *ports: int) -> None:
        admission = self.gw.gateway.admission

        def slots_free() -> bool:
            return all(s["in_flight"] == 0 and s["waiting"] == 0 for s in admission.snapshot().values())

        wait_until(slots_free, lambda: f"admission slots given back: {admission.snapshot()}")
        wait_until(lambda: gateway_tasks(self.gw) <= self.tasks, "the gateway's tasks back to before")
        # Every answer of these backends ends its connection: none may stay open. 30 s, not 10: in a full
        # suite on a busy 2-core machine one socket of litellm's client once took over 10 s to be closed.
        for port in ports:
            wait_until(partial(no_socket_to, port), partial(sockets_left, port), timeout_s=30.0)
        http = self.gw.gateway.client.transports["http"]
        assert isinstance(http, HttpTransport)
        session = http._session
        if session is not None:  # no connection checked out of the aiohttp pool
            assert not session.connector._acquired  # type: ignore[union-attr]


def policy(
    small_url: str, large_url: str, transport: str, small: dict[str, Any] | None = None, **overrides: Any
) -> Policy:
    """Backends `small` and `large` at these URLs; the first-chunk timeout generous (the faults here are
    not hangs), the circuit breaker out of the way unless a test sets it, the request log written at once."""
    overrides.setdefault("circuit_breaker", {"enabled": False})
    overrides.setdefault("request_log", {"flush_interval_s": 0.02})
    common = {"client": transport, "ttfb_timeout_s": 20.0, "timeout_s": 20.0}
    return two_tier_policy(small_url, large_url, ("small-model", "large-model"), common, small, **overrides)


def warmed(gw: RunningGateway) -> Leaks:
    """One good answer (litellm starts its own tasks on first use), then the baseline."""
    assert post(gw, chat_body("large")).status_code == 200
    return Leaks(gw)


# --- connection refused -----------------------------------------------------------------------------------


def test_a_port_nothing_listens_on_falls_back_then_its_circuit_opens(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    dead = free_port()
    breaker = {"failures": 2, "cooldown_s": 60}
    gw = start_gateway(
        policy(f"http://127.0.0.1:{dead}", standins.large_url, transport, circuit_breaker=breaker)
    )
    leaks = warmed(gw)
    plain = post(gw, chat_body())
    streamed = stream(gw, chat_body())
    for resp in (plain.headers, streamed.headers):
        assert (resp["x-icgate-backend"], resp["x-icgate-fallback-from"]) == ("large", "small")
    assert plain.status_code == streamed.status == 200
    assert streamed.text == f"large-model says: {PROMPT}" and streamed.events[-1] == "[DONE]"
    row = logged(gw, streamed.request_id)
    assert (row.status_code, row.backend, row.fallback_from) == (200, "large", "small")
    assert [a["backend"] for a in row.decisions["attempts"]] == ["small", "large"]
    assert row.decisions["attempts"][0]["outcome"] == "failed"
    assert "unreachable" in row.decisions["attempts"][0]["error"]
    # Two refusals opened small's circuit: the next request is not even tried there.
    assert gw.gateway.admission.circuits()["small"] == "open"
    spilled = post(gw, chat_body())
    assert spilled.status_code == 200 and "x-icgate-fallback-from" not in spilled.headers
    assert spilled.headers["x-icgate-backend"] == "large"
    assert len(standins.large.received) == 4
    leaks.assert_none(dead)


def test_with_every_backend_refusing_the_client_gets_a_clean_502(
    start_gateway: StartGateway, transport: str
) -> None:
    dead = [free_port(), free_port()]
    gw = start_gateway(policy(f"http://127.0.0.1:{dead[0]}", f"http://127.0.0.1:{dead[1]}", transport))
    tasks = Leaks(gw)
    plain = post(gw, chat_body())
    streamed = stream(gw, chat_body())  # failed before its first byte: a plain JSON error, no stream
    assert plain.status_code == streamed.status == 502
    for error in (plain.json()["error"], json.loads(streamed.events[0])["error"]):
        assert (error["type"], error["code"]) == ("server_error", "backend_error")
        assert error["message"] == "The backend 'large' is unreachable."
    row = logged(gw, plain.headers["x-icgate-request-id"])
    assert (row.status_code, row.error_type, row.fallback_from) == (502, "server_error", "small")
    tasks.assert_none(*dead)


def test_a_backend_process_killed_between_requests_is_fallen_back_from_then_probed_again(
    standins: Standins, start_gateway: StartGateway, transport: str, standin_process: StandinProcess
) -> None:
    standin_process.start()
    breaker = {"failures": 2, "cooldown_s": 2.0}
    gw = start_gateway(policy(standin_process.url, standins.large_url, transport, circuit_breaker=breaker))
    leaks = warmed(gw)
    first = post(gw, chat_body())
    assert first.status_code == 200 and first.headers["x-icgate-backend"] == "small"
    standin_process.kill()  # its kept-alive connection in the gateway's pool is now dead too
    for make in (post, stream):
        resp = make(gw, chat_body())
        headers = resp.headers
        assert (headers["x-icgate-backend"], headers["x-icgate-fallback-from"]) == ("large", "small")
    assert gw.gateway.admission.circuits()["small"] == "open"
    leaks.assert_none(standin_process.port)
    # Back on the same port, after the cool-down: one probe goes there, succeeds, the circuit closes.
    standin_process.start()
    wait_until(lambda: gw.gateway.admission.circuits()["small"] == "half_open", "the cool-down's end")
    probe = stream(gw, chat_body())
    assert probe.status == 200 and probe.headers["x-icgate-backend"] == "small"
    assert "x-icgate-fallback-from" not in probe.headers
    assert probe.text == f"small-model says: {PROMPT}"
    assert gw.gateway.admission.circuits()["small"] == "closed"


# --- dies in the middle of a stream ----------------------------------------------------------------------


def assert_cut(
    gw: RunningGateway, out: Streamed, backend: str = "small", status: int = 502, code: str = "backend_error"
) -> LogRow:
    """The client read some text, then one error event, then `[DONE]`; the log row says the stream broke,
    on which backend, and bills what was delivered; nothing fell back."""
    assert out.status == 200 and out.headers["x-icgate-backend"] == backend
    assert "x-icgate-fallback-from" not in out.headers
    assert out.chunks and out.text.strip()
    assert out.events[-1] == "[DONE]" and out.events.count("[DONE]") == 1
    assert out.error is not None and "error" in json.loads(out.events[-2])  # last, right before [DONE]
    assert out.error["code"] == code
    row = logged(gw, out.request_id)
    assert (row.status_code, row.backend, row.fallback_from, row.stream) == (status, backend, None, True)
    assert row.error_type == code
    assert [(a["backend"], a["outcome"]) for a in row.decisions["attempts"]] == [(backend, "cut")]
    assert row.completion_tokens == sum(1 for c in out.chunks if c["choices"] and c["choices"][0]["delta"])
    return row


def test_a_backend_process_killed_mid_stream_ends_the_stream_with_an_error_event(
    standins: Standins, start_gateway: StartGateway, transport: str, standin_process: StandinProcess
) -> None:
    standin_process.start()
    gw = start_gateway(policy(standin_process.url, standins.large_url, transport))
    leaks = warmed(gw)
    body = chat_body(x_standin={"chunk_gap_ms": 200})

    def kill_after_two(n: int) -> None:
        if n == 2:
            standin_process.kill()

    out = stream(gw, body, on_chunk=kill_after_two)
    assert_cut(gw, out)
    assert out.error is not None and out.error["type"] == "server_error"
    assert out.text.startswith("small-model says:") and out.text != f"small-model says: {PROMPT}"
    assert len(standins.large.received) == 1  # the warm-up only: no fallback once bytes were sent
    assert gw.gateway.admission.states["small"].errors == 1
    leaks.assert_none(standin_process.port)


def test_a_stream_cut_mid_body_ends_with_an_error_event_and_a_whole_one_does_not(
    standins: Standins, start_gateway: StartGateway, transport: str, faulty: FaultyBackend
) -> None:
    gw = start_gateway(policy(faulty.url, standins.large_url, transport))
    leaks = warmed(gw)
    # The socket closed (FIN) or reset (RST) with the chunked body unfinished; or the body ended cleanly
    # but the answer did not (no `[DONE]`, no finish_reason): what a proxy in front of a dead server sends.
    for end in ("close", "reset", "eof"):
        faulty.fault = Fault(chunks=4, end=end)
        out = stream(gw, chat_body())
        assert_cut(gw, out)
        assert " ".join(ANSWER).startswith(out.text), end
    assert gw.gateway.admission.states["small"].errors == 3
    # With a finish_reason the answer is whole, `[DONE]` or not (some servers never send it), even if the
    # connection then drops before the body's end.
    for end in ("eof", "close"):
        faulty.fault = Fault(chunks=3, finish=True, end=end)
        whole = stream(gw, chat_body())
        assert whole.status == 200 and whole.error is None and whole.events[-1] == "[DONE]", end
        assert whole.text == " ".join(ANSWER[:3])
        assert whole.chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert logged(gw, whole.request_id).status_code == 200
    assert len(standins.large.received) == 1  # the warm-up only
    leaks.assert_none(faulty.port)


# --- garbage ----------------------------------------------------------------------------------------------

GARBAGE = {
    "html": b"<html><body>502 Bad Gateway</body></html>",
    "truncated": b'{"id": "x", "choices": [',
    "number": b"42",
    "null": b"null",
    "list": b"[]",
    "no choices": b'{"id": "x", "object": "chat.completion", "created": 1}',
    "choices not a list": b'{"id": "x", "choices": "yes"}',
    "choice not an object": b'{"id": "x", "choices": ["yes"]}',
    "message not an object": b'{"id": "x", "choices": [{"index": 0, "message": "hi"}]}',
    "created not a number": b'{"id": "x", "created": "today", "choices": [{"index": 0, "message": {}}]}',
}
# litellm stamps its own `created` on an answer: nothing invalid is left for the gateway to see.
REPAIRED_BY_LITELLM = {"created not a number"}


@pytest.fixture
def faulty_large() -> Iterator[FaultyBackend]:
    backend = FaultyBackend().start()
    yield backend
    backend.stop()


def test_a_garbage_answer_falls_back_or_is_a_clean_502_never_reaching_the_client(
    start_gateway: StartGateway, transport: str, faulty: FaultyBackend, faulty_large: FaultyBackend
) -> None:
    gw = start_gateway(policy(faulty.url, faulty_large.url, transport))
    leaks = warmed(gw)
    cases = [name for name in GARBAGE if not (transport == "litellm" and name in REPAIRED_BY_LITELLM)]
    for name in cases:
        faulty.fault = Fault(body=GARBAGE[name])
        resp = post(gw, chat_body())
        assert resp.status_code == 200, (name, resp.text)
        assert (resp.headers["x-icgate-backend"], resp.headers["x-icgate-fallback-from"]) == (
            "large",
            "small",
        )
        assert resp.json()["choices"][0]["message"]["content"] == " ".join(ANSWER)
        row = logged(gw, resp.headers["x-icgate-request-id"])
        assert [a["outcome"] for a in row.decisions["attempts"]] == ["failed", "answered"], name
    assert gw.gateway.admission.states["small"].errors == len(cases)
    # `large` asked for by name: small is a lower tier, so there is nothing to fall back to.
    for name in ("html", "number", "no choices"):
        faulty_large.fault = Fault(body=GARBAGE[name])
        resp = post(gw, chat_body("large"))
        assert resp.status_code == 502, (name, resp.text)
        error = resp.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "backend_error")
        assert error["message"].startswith("The backend 'large'"), error
    leaks.assert_none(faulty.port, faulty_large.port)


BAD_LINES = {
    "broken json": b'data: {"id": "x", "choices": [{"delta": \n\n',
    "not an object": b"data: 42\n\n",
    "choices not a list": b'data: {"id": "x", "choices": 7}\n\n',
    "not utf-8": b"data: \xff\xfe\n\n",
}


def test_a_malformed_sse_line_ends_the_stream_or_falls_back_if_nothing_was_sent(
    standins: Standins, start_gateway: StartGateway, transport: str, faulty: FaultyBackend
) -> None:
    gw = start_gateway(policy(faulty.url, standins.large_url, transport))
    leaks = warmed(gw)
    for name, line in BAD_LINES.items():
        faulty.fault = Fault(chunks=3, line=line, end="done")
        assert_cut(gw, stream(gw, chat_body()))
        # The same line first: the client has nothing yet, so the fallback answers.
        faulty.fault = Fault(chunks=0, line=line, end="done")
        out = stream(gw, chat_body())
        assert out.status == 200 and out.error is None, (name, out.events)
        assert (out.headers["x-icgate-backend"], out.headers["x-icgate-fallback-from"]) == ("large", "small")
        assert out.text == f"large-model says: {PROMPT}"
    assert len(standins.large.received) == 1 + len(BAD_LINES)
    leaks.assert_none(faulty.port)


# --- 429 or 5xx in the middle of a stream -----------------------------------------------------------------

MID_STREAM_ERRORS = {
    # vLLM's shape (`code` is the HTTP status); this backend then holds the connection open.
    "429 vllm": (
        b'data: {"error": {"message": "slow down", "type": "rate_limit_error", "code": 429}}\n\n',
        "hold",
    ),
    # OpenAI's shape: an `error` event, then the end of the stream.
    "500 openai": (b'event: error\ndata: {"error": {"message": "oops", "type": "server_error"}}\n\n', "done"),
    "503 then cut": (b'data: {"error": {"message": "overloaded", "code": 503}}\n\n', "close"),
}


def test_an_error_event_mid_stream_ends_the_stream_promptly_without_a_busy_loop(
    standins: Standins, start_gateway: StartGateway, transport: str, faulty: FaultyBackend
) -> None:
    gw = start_gateway(policy(faulty.url, standins.large_url, transport))
    leaks = warmed(gw)
    for name, (line, end) in MID_STREAM_ERRORS.items():
        faulty.fault = Fault(chunks=2, line=line, end=end)
        out = stream(gw, chat_body())  # it ends (httpx would give up after 60 s)
        if name.startswith("429"):  # still a rate limit: the client may come back later
            row = assert_cut(gw, out, status=429, code="backend_rate_limited")
            assert out.error is not None and out.error["type"] == "rate_limit_error"
        else:
            row = assert_cut(gw, out)
            assert out.error is not None and out.error["type"] == "server_error"
        assert row.decisions["attempts"][0]["status"] == (429 if name.startswith("429") else 502)
        # Even the backend that held its connection open after the error has been hung up on.
        wait_until(lambda: faulty.open == 0, f"{name}: the gateway hung up on the backend")
    # An idle second after the failed streams: a gateway spinning on one (litellm #26015) would burn it.
    before = cpu_s()
    time.sleep(1.0)
    assert cpu_s() - before < 0.3, f"{cpu_s() - before:.2f} s of CPU in an idle second"
    assert len(standins.large.received) == 1  # the warm-up only: no fallback once bytes were sent
    leaks.assert_none(faulty.port)


# --- becomes slow -----------------------------------------------------------------------------------------


def test_a_backend_that_becomes_slow_loses_its_traffic_to_the_other_tier(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    # Streams, so that admission measures each backend's time to first token; both start believing 50 ms.
    common = {"client": transport, "expected_ttft_ms": 50, "ttfb_timeout_s": 20.0}
    models = ("small-model", "large-model")
    slo = {"ttft_slo_ms": 500}
    gw = start_gateway(two_tier_policy(standins.small_url, standins.large_url, models, common, admission=slo))
    leaks = warmed(gw)

    def one_round(size: int = 4) -> Counter[str]:
        outs: list[Streamed] = []
        threads = [threading.Thread(target=lambda: outs.append(stream(gw, chat_body()))) for _ in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outs) == size
        for out in outs:
            assert out.status == 200 and out.error is None, out.events
        return Counter(out.headers["x-icgate-backend"] for out in outs)

    fast = one_round()
    assert fast == Counter(small=4)  # short prompts: the rule routes them all to small, which keeps up
    standins.small.delay_s = 1.0  # small now takes a second to its first byte, twice the objective
    slow: Counter[str] = Counter()
    for _ in range(8):  # rounds until admission has seen it (two or three), bounded
        slow += one_round()
        if slow["large"] >= 4:
            break
    assert slow["large"] >= 4, slow  # the requests small could not serve in time went to large
    measured = gw.gateway.admission.snapshot()["small"]["ttft_ms"]
    assert measured is not None and measured > 500  # because admission measured it
    standins.small.delay_s = 0.0
    leaks.assert_none()


# --- a bug of the gateway's own, mid-stream ---------------------------------------------------------------


async def test_an_unexpected_error_mid_stream_still_ends_it_cleanly_and_blames_no_backend() -> None:
    # No backend fault makes the gateway fail mid-stream any more (the ones above are all mapped); a bug
    # would. The relay turns it into the error event the client reads before `[DONE]`, logs a 500, gives the
    # slot back, and leaves the backend's circuit alone.
    from tests.gateway.pipeline.fakes import FakeClient, chat_ctx, harness

    first = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
    h = harness(client=FakeClient({"small": [[first, RuntimeError("a bug")]]}))
    ctx = chat_ctx("hi", stream=True)
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None
    received = []
    with pytest.raises(GatewayError) as info:
        async for chunk in result.chunks:
            received.append(chunk)
    assert len(received) == 1
    assert (info.value.status_code, info.value.type) == (500, "server_error")
    assert "a bug" not in info.value.message
    [record] = h.log.records
    assert (record.status_code, record.error_type, record.backend) == (500, "RuntimeError", "small")
    assert h.admission.snapshot()["small"]["in_flight"] == 0
    assert h.admission.states["small"].errors == 0 and h.admission.circuits()["small"] == "closed"
