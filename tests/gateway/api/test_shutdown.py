"""Shutdown past the grace period, over real HTTP: cut streams end with an error event and [DONE],
cut plain requests get a JSON 503 with their request id, and every one has its request-log row."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.harness import ServerThread, free_port
from tests.gateway.conftest import RunningGateway, Standins, two_tier_policy

REPO = Path(__file__).resolve().parents[3]


class SlowBackend:
    """An OpenAI-compatible backend that takes its time: `x_slow.wait_s` before answering (plain) or
    between the first chunk and the rest (streamed). Released at teardown so its server stops at once."""

    def __init__(self) -> None:
        self.plain_waiting = threading.Event()
        self.stream_waiting = threading.Event()
        self.release = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/healthz", self.healthz),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.release.is_set():
            await asyncio.sleep(0.02)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        wait_s = float((body.get("x_slow") or {}).get("wait_s", 60))
        if body.get("stream"):
            return StreamingResponse(self._events(wait_s), media_type="text/event-stream")
        self.plain_waiting.set()
        await self._wait(wait_s)
        return JSONResponse(
            {
                "id": "chatcmpl-slow",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "slow",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    async def _events(self, wait_s: float) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-slow",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "slow",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": "first"})
        self.stream_waiting.set()
        await self._wait(wait_s)
        yield chunk({"content": " last"}, "stop")
        yield b"data: [DONE]\n\n"


@pytest.fixture
def slow() -> Iterator[tuple[SlowBackend, str]]:
    backend = SlowBackend()
    server = ServerThread(backend.app).start()
    yield backend, server.url
    backend.release.set()
    server.stop()


def policy_raw(url: str, grace_s: float) -> dict[str, Any]:
    policy = two_tier_policy(
        url, url, ("slow", "slow"), {"client": "http"}, server={"graceful_shutdown_s": grace_s}
    )
    return policy.model_dump(mode="json", exclude_defaults=True)


def chat(stream: bool, wait_s: float = 60) -> dict[str, Any]:
    return {
        "model": "small",
        "stream": stream,
        "messages": [{"role": "user", "content": "take your time"}],
        "x_slow": {"wait_s": wait_s},
    }


class Clients:
    """One streamed and one plain request, each in a thread, both held by the backend."""

    def __init__(self, url: str, wait_s: float = 60) -> None:
        self.url = url
        self.wait_s = wait_s
        self.first_chunk = threading.Event()
        self.stream: dict[str, Any] = {}
        self.plain: dict[str, Any] = {}
        self.threads = [threading.Thread(target=self._stream), threading.Thread(target=self._plain)]

    def _stream(self) -> None:
        with httpx.stream(
            "POST", self.url + "/v1/chat/completions", json=chat(True, self.wait_s), timeout=60
        ) as r:
            self.stream["status"] = r.status_code
            self.stream["request_id"] = r.headers.get("x-icgate-request-id")
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    self.first_chunk.set()
            self.stream["events"] = events

    def _plain(self) -> None:
        r = httpx.post(self.url + "/v1/chat/completions", json=chat(False, self.wait_s), timeout=60)
        self.plain.update(status=r.status_code, headers=r.headers, body=r.json())

    def start(self, backend: SlowBackend) -> None:
        self.threads[0].start()
        assert self.first_chunk.wait(30) and backend.stream_waiting.wait(30)
        self.threads[1].start()
        assert backend.plain_waiting.wait(30)
        time.sleep(0.2)  # the plain request is now waiting on the backend inside the gateway

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()


def log_rows(database: Path) -> dict[str, tuple[int, str | None, int]]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT request_id, status_code, error_type, stream FROM request_log").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def assert_cut(clients: Clients, database: Path) -> None:
    # The stream: the first chunk, then OpenAI's error event with code "shutdown", then [DONE].
    events = clients.stream["events"]
    assert clients.stream["status"] == 200
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "first"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutdown" and error["type"] == "server_error"
    assert "shutting down" in error["message"]
    # The plain request: a JSON 503 with its request id.
    assert clients.plain["status"] == 503
    assert clients.plain["body"]["error"]["code"] == "shutdown"
    assert set(clients.plain["body"]["error"]) == {"message", "type", "param", "code"}
    plain_id = clients.plain["headers"]["x-icgate-request-id"]
    # Both logged as cut.
    rows = log_rows(database)
    assert rows[clients.stream["request_id"]] == (503, "shutdown", 1)
    assert rows[plain_id] == (503, "shutdown", 0)


def test_requests_past_the_grace_period_are_cut_cleanly(
    slow: tuple[SlowBackend, str], start_gateway: Any, tmp_path: Path
) -> None:
    backend, url = slow
    from icgate.gateway.config import Policy

    gw: RunningGateway = start_gateway(Policy.model_validate(policy_raw(url, 1)), tmp_path / "gw")
    clients = Clients(gw.url)
    clients.start(backend)
    started = time.monotonic()
    gw.stop()
    stopped_after = time.monotonic() - started
    clients.join()
    assert_cut(clients, tmp_path / "gw" / "icgate.db")
    assert stopped_after < 1 + 5  # the gateway's deadline, not uvicorn's later forced cancellation


def test_requests_within_the_grace_period_finish(
    slow: tuple[SlowBackend, str], start_gateway: Any, tmp_path: Path
) -> None:
    backend, url = slow
    from icgate.gateway.config import Policy

    gw: RunningGateway = start_gateway(Policy.model_validate(policy_raw(url, 10)), tmp_path / "gw")
    clients = Clients(gw.url, wait_s=1.0)
    clients.start(backend)
    gw.stop()
    clients.join()
    assert clients.stream["events"][-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in clients.stream["events"][:-1])
    assert clients.plain["status"] == 200
    rows = log_rows(tmp_path / "gw" / "icgate.db")
    assert rows[clients.stream["request_id"]][0] == 200
    assert rows[clients.plain["headers"]["x-icgate-request-id"]][0] == 200


@contextmanager
def icgate_serve(raw: dict[str, Any], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`icgate serve` in its own process on SQLite, ready; killed at the end if it is still running."""
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(raw))
    port = free_port()
    data_dir = tmp_path / "data"
    env = {**os.environ, "ICGATE_DATA_DIR": str(data_dir)}
    env.pop("ICGATE_DATABASE_URL", None)
    command = [sys.executable, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(policy_file)]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--no-launch"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    gateway_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(gateway_url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield proc, gateway_url, data_dir / "icgate.db"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_icgate_serve_cuts_cleanly_on_sigterm(slow: tuple[SlowBackend, str], tmp_path: Path) -> None:
    """The same through `icgate serve` in its own process, stopped the way a supervisor stops it."""
    backend, url = slow
    with icgate_serve(policy_raw(url, 1), tmp_path) as (proc, gateway_url, database):
        clients = Clients(gateway_url)
        clients.start(backend)
        proc.send_signal(signal.SIGTERM)
        clients.join()
        # uvicorn re-raises the signal it handled once it has shut down cleanly.
        assert proc.wait(30) in (0, -signal.SIGTERM)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "timeout graceful shutdown exceeded" not in output  # uvicorn never had to cancel anything
    assert "Exception in ASGI application" not in output
    assert "file-descriptor limit" in output
    assert_cut(clients, database)


class Load:
    """Clients sending short requests back to back on kept-alive connections until told to stop; every
    outcome kept: (status, headers, body) or the transport error's name."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.outcomes: list[tuple[int, dict[str, str], dict[str, Any]] | str] = []
        self.times: list[float] = []  # when each outcome came back (monotonic)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                body = {
                    "model": "small",
                    "messages": [{"role": "user", "content": f"client {client} asks {n}"}],
                }
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    outcome: Any = (r.status_code, dict(r.headers), r.json())
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                    time.sleep(0.05)
                with self._lock:
                    self.outcomes.append(outcome)
                    self.times.append(time.monotonic())

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive()

    def answered(self) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        return [o for o in self.outcomes if not isinstance(o, str)]


def test_sigterm_under_load_refuses_new_requests_with_503_and_loses_no_answered_one(
    slow: tuple[SlowBackend, str], standins: Standins, tmp_path: Path
) -> None:
    """Clients keep sending while two slow requests hold the drain open: each new request gets a JSON 503
    with Retry-After, the slow ones finish, and every request a client saw answered has its log row."""
    backend, slow_url = slow
    raw = two_tier_policy(
        standins.small_url,
        slow_url,
        ("small-model", "slow"),
        {"client": "http"},
        server={"graceful_shutdown_s": 10},
    ).model_dump(mode="json", exclude_defaults=True)
    with icgate_serve(raw, tmp_path) as (proc, gateway_url, database):
        load = Load(gateway_url, clients=4)
        load.start()
        held: dict[str, Any] = {}

        def hold() -> None:  # answered by the slow backend 2 s after it arrives
            body = {**chat(False, wait_s=2.0), "model": "large"}
            r = httpx.post(gateway_url + "/v1/chat/completions", json=body, timeout=60)
            held.update(status=r.status_code, request_id=r.headers.get("x-icgate-request-id"))

        holder = threading.Thread(target=hold)
        holder.start()
        assert backend.plain_waiting.wait(30)
        while len(load.answered()) < 20:  # traffic flows before the signal
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        holder.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        load.join()
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "Exception in ASGI application" not in output
    assert held["status"] == 200  # in flight at the signal, well within the grace period

    answered = load.answered()
    refused = [(h, b) for status, h, b in answered if status == 503]
    served = [h["x-icgate-request-id"] for status, h, _ in answered if status == 200]
    assert {status for status, _, _ in answered} <= {200, 503}
    assert refused, "the slow request kept the gateway draining while clients sent: some must be refused"
    for headers, body in refused:
        assert headers["retry-after"] == "1"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "shutdown" and "no new requests" in body["error"]["message"]
    # Transport errors only once the socket closed: connections refused, or a kept-alive connection
    # closed by the server between two requests (the request never reached the gateway).
    assert {o for o in load.outcomes if isinstance(o, str)} <= {
        "ConnectError",
        "RemoteProtocolError",
        "ReadError",
    }
    rows = log_rows(database)
    assert rows[held["request_id"]][0] == 200
    assert all(rows[request_id][0] == 200 for request_id in served), "an answered request lost its row"
    assert sum(1 for status, _, _ in rows.values() if status == 200) == len(served) + 1


def test_sigkill_loses_at_most_the_unflushed_tail_of_the_log(standins: Standins, tmp_path: Path) -> None:
    """No shutdown at all: rows are written every `request_log.flush_interval_s` (0.5 s here), so what a
    kill can lose is what was answered in the last moments before it. Every answer older than a few
    flush intervals must have its row. The margin is 20 intervals: on a loaded 2-core machine a write
    can lag well behind its interval, and the test must not depend on the machine being quiet."""
    raw = two_tier_policy(
        standins.small_url, standins.large_url, ("small-model", "large-model"), {"client": "http"}
    ).model_dump(mode="json", exclude_defaults=True)
    raw["request_log"] = {"flush_interval_s": 0.5}
    with icgate_serve(raw, tmp_path) as (proc, gateway_url, database):
        load = Load(gateway_url, clients=2)
        load.start()
        while len(load.answered()) < 50:
            time.sleep(0.05)
        time.sleep(12.0)  # the 50 are now more than 10 s old at the kill, and more keep coming
        proc.kill()
        killed_at = time.monotonic()
        proc.wait(30)
        load.join()
    rows = log_rows(database)
    old_enough = [
        headers["x-icgate-request-id"]
        for outcome, at in zip(load.outcomes, load.times, strict=True)
        if not isinstance(outcome, str) and at < killed_at - 10.0
        for status, headers, _ in [outcome]
        if status == 200
    ]
    assert len(old_enough) >= 50
    assert [request_id for request_id in old_enough if request_id not in rows] == []
