"""`icgate serve --workers N`: N gateway processes on one port, supervised as one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from bench.harness import free_port
from icgate.gateway.cli.main import main
from tests.gateway.conftest import Standins

ROOT = Path(__file__).resolve().parents[3]


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def workers(standins: Standins, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    policy = {
        "backends": [
            {
                "name": "small",
                "tier": "small",
                "model": "openai/small-model",
                "api_base": standins.small_url + "/v1",
            }
        ],
        "auth": {"required": False},
        "cache": {"enabled": False},
        "router": {"kind": "rule"},
        "embedding": {"preload": False},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    port = free_port()
    cli = [sys.executable, "-m", "icgate.gateway.cli.main", "serve", "--policy", str(path)]
    cli += ["--data-dir", str(tmp_path / "data"), "--port", str(port), "--workers", "2", "--no-launch"]
    proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    # both workers ready: readiness asked on new connections, which either worker may take
    while not (len(children(proc.pid)) == 2 and all(ready(url) for _ in range(8))):
        assert proc.poll() is None, "the workers' parent exited while starting"
        assert time.monotonic() < deadline, "the workers did not become ready"
        time.sleep(0.5)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_workers_answer_on_one_port_and_stop_together_on_sigterm(
    workers: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = workers
    pids = children(proc.pid)
    assert len(pids) == 2
    for i in range(8):  # a new connection each time: the kernel hands them to either worker
        with httpx.Client() as client:
            reply = client.post(
                url + "/v1/chat/completions",
                json={"model": "small", "messages": [{"role": "user", "content": f"question {i}"}]},
            )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # drained, exited and reaped


def test_when_one_worker_dies_the_others_are_stopped_and_the_parent_fails(
    workers: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, _ = workers
    first, second = children(proc.pid)
    os.kill(first, signal.SIGKILL)
    assert proc.wait(60) != 0  # the orchestrator sees one failure and restarts the whole
    assert not Path(f"/proc/{second}").exists()  # the other worker was stopped and reaped


def test_workers_refuse_a_policy_that_launches_local_servers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "2"]) == 2  # the default policy launches two llama.cpp servers
    assert "--no-launch" in capsys.readouterr().err


def test_workers_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--workers", "0", "--no-launch"])
    assert exit_.value.code == 2 and "must be 1 or more" in capsys.readouterr().err
