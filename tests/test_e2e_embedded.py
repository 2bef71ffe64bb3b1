"""End to end: `icgate serve` on the real embedded default, as a new user runs it.

Starts the gateway as a subprocess with `policies/default.yaml` (moved to free
ports), which launches both llama.cpp servers from their PyPI-packaged GGUF
files, and gets real answers through it: a streamed one from the small model
with the openai client, and one from Gemma through the completion-mode route;
`icgate cache replay` regenerates a small-model answer with the real large model.
Then stops the gateway and checks that it took its model servers with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from bench.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@dataclass
class Served:
    url: str
    backend_ports: list[int]
    process: subprocess.Popen[bytes]
    log: Path
    policy: Path
    data_dir: Path


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("e2e")
    raw = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    ports = []
    for backend in raw["backends"]:
        port = free_port()
        ports.append(port)
        backend["api_base"] = f"http://127.0.0.1:{port}/v1"
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(raw))
    port = free_port()
    log = tmp / "icgate.gateway.log"
    env = {k: v for k, v in os.environ.items() if k != "ICGATE_DATABASE_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(policy),
         "--port", str(port),
         "--data-dir", str(tmp / "data")],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"icgate serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"icgate serve not ready after 300 s:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield Served(url, ports, process, log, policy, tmp / "data")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_streamed_answer_from_the_local_small_model(served: Served) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=32,
        temperature=0,
    )
    assert raw.headers["x-icgate-route"] == "small"
    assert raw.headers["x-icgate-backend"] == "small"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and 0 < usage[-1].completion_tokens <= 32


def test_large_model_answers_through_completion_mode(served: Served) -> None:
    resp = httpx.post(
        served.url + "/v1/chat/completions",
        json={
            "model": "large",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-icgate-backend"] == "large"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_curl_streams_sse(served: Served) -> None:
    body = (
        '{"model": "small", "stream": true, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}'
    )
    out = subprocess.run(
        [
            "curl",
            "-sN",
            served.url + "/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in out.stdout.decode().splitlines() if line]
    assert lines[0].startswith("data: {")
    assert lines[-1] == "data: [DONE]"


def cache_rows(data_dir: Path, like: str) -> list[tuple[int, str, str, object]]:
    with sqlite3.connect(data_dir / "icgate.db") as conn:
        return conn.execute(
            "SELECT id, tier, response_text, deleted_at FROM cache_entries"
            " WHERE prompt_text LIKE ? ORDER BY id",
            (f"%{like}%",),
        ).fetchall()


def test_cache_replay_regenerates_a_small_answer_with_the_real_large_model(served: Served) -> None:
    question = "What is the capital of Italy?"
    resp = httpx.post(
        served.url + "/v1/chat/completions",
        json={"model": "small", "messages": [{"role": "user", "content": question}], "temperature": 0},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 30  # the pair is stored off the hot path
    while not cache_rows(served.data_dir, "capital of Italy") and time.monotonic() < deadline:
        time.sleep(0.2)
    [(old_id, tier, _, deleted)] = cache_rows(served.data_dir, "capital of Italy")
    assert (tier, deleted) == ("small", None)

    out = subprocess.run(
        [sys.executable, "-m", "icgate.gateway.cli.main", "cache", "replay", "--budget", "1", "--policy",
         str(served.policy), "--data-dir", str(served.data_dir), "--gateway", served.url],
        cwd=ROOT, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    summary = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert summary["replayed"] >= 1 and summary["failed"] == 0
    rows = cache_rows(served.data_dir, "capital of Italy")
    assert [r[0] for r in rows if r[3] is not None] == [old_id]  # the small answer is tombstoned ...
    [(_, tier, text, _)] = [r for r in rows if r[3] is None]  # ... and the large model answered in its place
    assert tier == "large" and "Rome" in text


def test_shutdown_stops_the_model_servers(served: Served) -> None:
    assert all(port_open(p) for p in served.backend_ports)
    served.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM.
    assert served.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in served.log.read_text()
    deadline = time.monotonic() + 15
    while any(port_open(p) for p in served.backend_ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(port_open(p) for p in served.backend_ports)
    assert "Traceback" not in served.log.read_text()
