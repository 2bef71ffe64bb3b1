"""Run ASGI apps on loopback ports in background threads, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from icgate.gateway.api.server import build_server

REPO = Path(__file__).resolve().parent.parent


def code_label(root: Path) -> str:
    """What code a benchmark ran: `commit <short sha>`, with ` plus uncommitted changes` when tracked files
    differ from it; "unknown" outside a git checkout. Untracked files (a worktree's links to the venvs
    and models) are not changes to the code."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return f"commit {head.stdout.strip()}" + (" plus uncommitted changes" if dirty.stdout.strip() else "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a daemon thread; `stop()` shuts it down cleanly."""

    def __init__(self, app: Any, port: int | None = None, ready_path: str = "/healthz") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A gateway app gets its policy's server limits and clean shutdown, as under `icgate serve`.
        self.server: uvicorn.Server = build_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ready_path = ready_path

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} exited during start-up")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server on port {self.port} did not start in {timeout_s}s")

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """The code at git revision `rev`, checked out into a temporary worktree of this repository (removed
    on exit), for a benchmark that runs it beside the working tree."""
    with tempfile.TemporaryDirectory(prefix="icgate-before-") as tmp:
        where = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "-f", "--detach", str(where), rev],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            yield where
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(where)], cwd=REPO, capture_output=True
            )


def cli_module(tree: Path) -> str:
    """The gateway's command line in `tree`: under `icgate` since the package was named, else the old path."""
    return "icgate.gateway.cli.main" if (tree / "icgate").is_dir() else "gateway.cli"


def gateway_engine(data_dir: Path) -> Any:
    """An engine on the SQLite database `icgate serve --data-dir` keeps (read while the gateway runs)."""
    from icgate.gateway.store.db import make_engine

    return make_engine(f"sqlite:///{data_dir / 'icgate.db'}")


def cache_entries(engine: Any) -> int:
    """Answers the gateway's cache holds (with `cache.store: false`, always 0)."""
    import sqlalchemy as sa

    from icgate.gateway.store import tables

    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tables.CacheEntryRow)).scalar() or 0)
