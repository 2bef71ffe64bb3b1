"""LiteLLM's proxy server as a baseline for the load benchmark.

The proxy (`litellm[proxy]`, pinned to the same litellm version as the project) lives in its own
venv, `bench/.litellm-venv`, so its pinned dependencies never touch the project venv.

    exe = ensure_proxy_venv()                      # creates + pip-installs once (~60 s, stamp file)
    write_config(cfg, [Deployment("sim-small", "http://127.0.0.1:8201/v1"),
                       Deployment("sim-large", "http://127.0.0.1:8202/v1")], "least-busy")
    with LiteLLMProxy(cfg, exe=exe) as proxy:      # ready in ~7 s
        proxy.warm_up()                            # first requests pay for lazy imports
        httpx.post(proxy.base_url + "/v1/chat/completions", headers=proxy.headers,
                   json={"model": "sim", ...})
        proxy.cpu_seconds()                        # user+sys CPU of the proxy process tree

Findings for litellm 1.106.2 (from the installed source; see `write_config` and `proxy_env`):
* The proxy refuses to start without a master key (auth/master_key_boot_check.py) unless
  general_settings.dangerously_permit_weak_or_unset_master_key is true. We use a fixed MASTER_KEY.
* The cost map is fetched from GitHub at import time unless LITELLM_LOCAL_MODEL_COST_MAP=True
  (litellm/litellm_core_utils/get_model_cost_map.py; 5 s timeout, 3 attempts in a background
  thread). LITELLM_OFFLINE_MODE, which newer docs describe, does not exist in 1.106.2, and
  `--telemetry` is a no-op. With the variable set, strace shows no connect() but to loopback
  during start-up and requests.
* least-busy needs nothing extra: the Router registers its LeastBusyLoggingHandler as an input
  callback (+1 in the pre-API-call hook) and a success/failure callback (-1), counting in-flight
  requests per deployment in the router's in-process cache, so it works with one worker and no
  Redis. But ties go to the first deployment in model_list order (min() over the list, no random
  tie-break), and the +1 lands only after the routing decision and several awaits: a burst of 20
  concurrent requests all went to the first deployment, and so do sequential requests. It does
  steer to the idle deployment once load has built up (85% vs 58% for shuffle with one backend
  300 ms slower; 10/10 sequential requests avoided a deployment holding one long request).
* The proxy adds no concurrency limit or queue of its own by default: uvicorn's
  limit_concurrency is unset, admission control (general_settings.max_in_flight_requests_per_worker)
  and global_max_parallel_requests are off, no per-deployment semaphore unless
  rpm/tpm/max_parallel_requests are set. The only cap is the upstream aiohttp connector
  (AIOHTTP_CONNECTOR_LIMIT=1000 total, AIOHTTP_CONNECTOR_LIMIT_PER_HOST=500 per host:port).
* One worker costs ~10-14 ms of CPU per request on this machine and saturates at ~70-90 req/s.

`python bench/litellm_proxy.py --selftest` checks all of this end to end on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import venv
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import yaml

LITELLM_VERSION = "1.106.2"
PROXY_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".litellm-venv"
STANDIN = BENCH_DIR / "standin_backend.py"

# 1.106.2 refuses to start without a master key (litellm/proxy/auth/master_key_boot_check.py) unless
# general_settings.dangerously_permit_weak_or_unset_master_key is true. A fixed key (anything but the
# publicly known sk-1234) is how the proxy is really run; clients send it as a Bearer token.
MASTER_KEY = "sk-icgate-bench-0d6f3c1e9a7b4852"

Strategy = Literal["simple-shuffle", "least-busy"]
STRATEGIES: tuple[Strategy, ...] = ("simple-shuffle", "least-busy")


# --------------------------------------------------------------------------- venv


def ensure_proxy_venv(path: Path = DEFAULT_VENV, *, quiet: bool = True) -> Path:
    """Create `path` as a venv with litellm[proxy] installed (once); return its `litellm` executable.

    A stamp file naming the requirement marks a finished install, so an interrupted install is
    redone, and a version bump reinstalls. pip's output goes to `path/install.log`.
    """
    path = Path(path).resolve()
    exe = path / "bin" / "litellm"
    stamp = path / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == PROXY_REQUIREMENT:
        return exe
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benches racing to install wait for each other
        if exe.exists() and stamp.exists() and stamp.read_text().strip() == PROXY_REQUIREMENT:
            return exe
        started = time.monotonic()
        if not (path / "bin" / "python").exists():
            venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
        log = path / "install.log"
        if not quiet:
            print(f"installing {PROXY_REQUIREMENT} into {path} (log: {log}) ...", file=sys.stderr)
        with open(log, "a") as out:
            proc = subprocess.run(
                [
                    str(path / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    PROXY_REQUIREMENT,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0 or not exe.exists():
            raise RuntimeError(f"pip install {PROXY_REQUIREMENT} failed (exit {proc.returncode}); see {log}")
        stamp.write_text(PROXY_REQUIREMENT + "\n")
        if not quiet:
            print(f"installed in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return exe


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Deployment:
    """One backend: `name` is the model it serves (sent as `openai/<name>`), `api_base` ends in /v1."""

    name: str
    api_base: str
    id: str | None = None  # model_info.id; shows up in the proxy's x-litellm-model-id header


def _deployment(d: Deployment | tuple[str, str]) -> Deployment:
    return d if isinstance(d, Deployment) else Deployment(*d)


def build_config(
    deployments: Sequence[Deployment | tuple[str, str]],
    strategy: Strategy,
    *,
    model_name: str = "sim",
    timeout_s: float = 600.0,
    master_key: str | None = MASTER_KEY,
    router_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The proxy config as a dict (see `write_config`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    model_list = []
    for i, raw in enumerate(deployments):
        d = _deployment(raw)
        model_list.append(
            {
                "model_name": model_name,
                "litellm_params": {
                    "model": f"openai/{d.name}",
                    "api_base": d.api_base,
                    "api_key": "none",
                },
                "model_info": {"id": d.id or f"{d.name}-{i}"},
            }
        )
    router_settings: dict[str, Any] = {
        "routing_strategy": strategy,
        "num_retries": 0,  # Router default is openai.DEFAULT_MAX_RETRIES (2); the SDK's own is forced to 0
        "timeout": timeout_s,
        "stream_timeout": timeout_s,
    }
    router_settings.update(router_overrides or {})
    config: dict[str, Any] = {
        "model_list": model_list,
        "router_settings": router_settings,
        "litellm_settings": {
            "request_timeout": timeout_s,  # default 6000 s
            "num_retries": 0,
            "set_verbose": False,
            # no success_callback / failure_callback / callbacks: none are on by default, and
            # setting `callbacks: []` is pointless (least-busy registers its own after this).
        },
        # No database_url (and DATABASE_URL is stripped from the env): no spend logs, no prisma.
        "general_settings": (
            {"master_key": master_key}
            if master_key
            else {"dangerously_permit_weak_or_unset_master_key": True}  # no auth at all
        ),
    }
    return config


def write_config(
    path: Path,
    deployments: Sequence[Deployment | tuple[str, str]],
    strategy: Strategy,
    *,
    model_name: str = "sim",
    timeout_s: float = 600.0,
    master_key: str | None = MASTER_KEY,
    router_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write the proxy's YAML config: one `model_name` group over `deployments`.

    Keys (litellm 1.106.2, checked in litellm/proxy/proxy_server.py `load_config`):
    * model_list[].litellm_params {model: openai/<name>, api_base, api_key} - the OpenAI-compatible
      provider; model_info.id pins the deployment id (else a hash) for the x-litellm-model-id header.
    * router_settings are passed to `litellm.Router(**...)` (unknown keys are warned about and
      dropped): routing_strategy, num_retries: 0, timeout / stream_timeout (seconds).
      Cooldowns (allowed_fails, cooldown_time, disable_cooldowns) keep LiteLLM's defaults;
      pass `router_overrides={"disable_cooldowns": True}` to turn them off.
    * litellm_settings are set as `litellm.<key>`: request_timeout, num_retries, set_verbose.
    * general_settings: no database_url; master_key (default MASTER_KEY; requests must send it as
      `Authorization: Bearer ...`), or with master_key=None no auth, via
      dangerously_permit_weak_or_unset_master_key (without either the proxy refuses to start).
    """
    config = build_config(
        deployments,
        strategy,
        model_name=model_name,
        timeout_s=timeout_s,
        master_key=master_key,
        router_overrides=router_overrides,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- process


# Env vars that would make the proxy use a database, Redis or a .env file, or route loopback
# traffic through an HTTP proxy.
_STRIPPED_ENV = (
    "DATABASE_URL",
    "DIRECT_URL",
    "DATABASE_HOST",
    "DATABASE_USERNAME",
    "DATABASE_PASSWORD",
    "DATABASE_NAME",
    "DATABASE_SCHEMA",
    "LITELLM_MASTER_KEY",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_URL",
    "REDIS_PASSWORD",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "NUM_WORKERS",
    "PORT",
    "HOST",
)


def proxy_env(base: Mapping[str, str] | None = None, log_level: str | None = None) -> dict[str, str]:
    """Environment for the proxy: offline, no telemetry, no DB/Redis, no .env loading."""
    env = {k: v for k, v in (base if base is not None else os.environ).items() if k not in _STRIPPED_ENV}
    env.update(
        {
            # The one start-up fetch: the model cost map from raw.githubusercontent.com (5 s timeout,
            # then retried in a background thread). This makes litellm use the bundled copy.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # Other catalogs fetched on demand (not at start, not on the OpenAI chat path).
            "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
            "LITELLM_LOCAL_BLOG_POSTS": "True",
            "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
            "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
            "LITELLM_TELEMETRY": "False",  # the --telemetry flag is a no-op in 1.106.2; harmless
            "LITELLM_MODE": "PRODUCTION",  # DEV (default) loads a .env from the working directory
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if log_level:
        # Also sets uvicorn's log level: WARNING/ERROR drop its per-request access log lines.
        env["LITELLM_LOG"] = log_level
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_pids(pid: int) -> list[int]:
    """`pid` and its live descendants (`icgate serve --workers N` forks N)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return pids


def process_cpu_seconds(pid: int, include_children: bool = True) -> float:
    """user+system CPU seconds of `pid` (and its live descendants), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree_pids(pid) if include_children else [pid]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group we created for `proc`, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


class LiteLLMProxy:
    """`litellm --config cfg --port P --host 127.0.0.1 --num_workers 1` for the length of a `with`.

    It runs in its own process group (killed whole on exit), with `proxy_env()`, its working
    directory set to the config's folder, and stdout+stderr in `log_path`. `__enter__` returns
    once GET /health/liveliness answers 200: uvicorn only accepts connections after the proxy's
    lifespan start-up (config load, Router built) has finished, so the proxy is ready then.
    """

    def __init__(
        self,
        config: Path,
        port: int | None = None,
        *,
        exe: Path | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        startup_timeout_s: float = 180.0,
        log_level: str | None = None,
        master_key: str | None = MASTER_KEY,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = Path(config).resolve()
        self.port = port or free_port()
        self.host = host
        self.exe = Path(exe) if exe else DEFAULT_VENV / "bin" / "litellm"
        self.log_path = Path(log_path) if log_path else self.config.with_suffix(".log")
        self.startup_timeout_s = startup_timeout_s
        self.log_level = log_level
        self.master_key = master_key  # must match the config's general_settings.master_key
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends to be let in."""
        return {"Authorization": f"Bearer {self.master_key}"} if self.master_key else {}

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("proxy not started")
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def warm_up(self, model: str = "sim", n: int = 20) -> None:
        """Send `n` small requests (half streamed). The first requests pay for lazy imports
        (openai resources, handlers: ~20% of a cold profile), so measure only after this."""
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0, trust_env=False) as c:
            for i in range(n):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "warm up"}],
                    "stream": i % 2 == 1,
                }
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.read()
                    r.raise_for_status()

    def start(self) -> LiteLLMProxy:
        if not self.exe.exists():
            raise FileNotFoundError(f"{self.exe} missing: call ensure_proxy_venv() first")
        cmd = [
            str(self.exe),
            "--config",
            str(self.config),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--num_workers",
            "1",
            *self.extra_args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.config.parent,
                env=proxy_env(self.env, self.log_level),
                start_new_session=True,
            )
        try:
            _wait_http(f"{self.base_url}/health/liveliness", self.proc, self.startup_timeout_s, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)

    def __enter__(self) -> LiteLLMProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Standin:
    """One `bench/standin_backend.py` subprocess (for the self-test)."""

    def __init__(
        self, name: str, port: int | None = None, delay_ms: float = 0.0, log_dir: Path | None = None
    ):
        self.name = name
        self.port = port or free_port()
        self.delay_ms = delay_ms
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"standin-{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Standin:
        cmd = [sys.executable, str(STANDIN), "--port", str(self.port), "--name", self.name]
        cmd += ["--delay-ms", str(self.delay_ms)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            _wait_http(f"http://127.0.0.1:{self.port}/healthz", self.proc, 30.0, self.log_path)
        except BaseException:
            _kill_group(self.proc)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


# --------------------------------------------------------------------------- self-test


@dataclass
class Outcome:
    backend: str  # the stand-in's name, read from its answer text ("<name> says: ...")
    status: int
    stream: bool
    seconds: float
    headers: dict[str, str]


def _client(proxy: LiteLLMProxy) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(
        base_url=proxy.base_url, headers=proxy.headers, timeout=60.0, trust_env=False, limits=limits
    )


async def _chat(
    client: httpx.AsyncClient, stream: bool, extra: Mapping[str, Any] | None = None, model: str = "sim"
) -> Outcome:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there proxy"}],
        "stream": stream,
        **(extra or {}),
    }
    url = "/v1/chat/completions"
    t0 = time.monotonic()
    if not stream:
        r = await client.post(url, json=body)
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
        return Outcome(text.split(" ")[0], r.status_code, False, time.monotonic() - t0, dict(r.headers))
    parts: list[str] = []
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    parts.append((choice.get("delta") or {}).get("content") or "")
        status, headers = r.status_code, dict(r.headers)
    return Outcome("".join(parts).split(" ")[0], status, True, time.monotonic() - t0, headers)


async def _burst(
    proxy: LiteLLMProxy, n: int, stream: bool, extra: Mapping[str, Any] | None = None
) -> list[Outcome]:
    """`n` requests at once."""
    async with _client(proxy) as client:
        return list(await asyncio.gather(*(_chat(client, stream, extra) for _ in range(n))))


async def _closed_loop(proxy: LiteLLMProxy, workers: int, duration_s: float) -> list[Outcome]:
    """`workers` clients sending back-to-back requests for `duration_s`; odd ones stream."""
    out: list[Outcome] = []
    deadline = time.monotonic() + duration_s
    async with _client(proxy) as client:

        async def worker(i: int) -> None:
            while time.monotonic() < deadline:
                out.append(await _chat(client, i % 2 == 1))

        await asyncio.gather(*(worker(i) for i in range(workers)))
    return out


async def _pinned(proxy: LiteLLMProxy, hold_ms: int, n: int) -> tuple[Outcome, list[Outcome]]:
    """One request held `hold_ms` by its backend; meanwhile `n` sequential short ones."""
    async with _client(proxy) as client:
        long = asyncio.create_task(_chat(client, False, {"x_standin": {"delay_ms": hold_ms}}))
        await asyncio.sleep(0.3)
        seq = [await _chat(client, i % 2 == 1) for i in range(n)]
        return await long, seq


async def _sequential(proxy: LiteLLMProxy, n: int) -> list[Outcome]:
    async with _client(proxy) as client:
        return [await _chat(client, i % 2 == 1) for i in range(n)]


def _counts(outcomes: Iterable[Outcome]) -> Counter[str]:
    return Counter(o.backend if o.status == 200 else f"HTTP {o.status}" for o in outcomes)


def _cpu_phase(proxy: LiteLLMProxy, label: str, workers: int = 8, duration_s: float = 6.0) -> float:
    cpu0, w0 = proxy.cpu_seconds(), time.monotonic()
    loop = asyncio.run(_closed_loop(proxy, workers, duration_s))
    cpu, wall = proxy.cpu_seconds() - cpu0, time.monotonic() - w0
    ok = sum(o.status == 200 for o in loop)
    lat = sorted(o.seconds for o in loop)
    per_req_ms = cpu / max(1, len(loop)) * 1000
    print(
        f"  {label}: {workers} clients x {duration_s:.0f} s (half streamed): {ok}/{len(loop)} ok, "
        f"{len(loop) / wall:.0f} req/s, p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
        f"proxy CPU {cpu:.2f} s = {per_req_ms:.1f} ms/request, split {dict(_counts(loop))}"
    )
    return per_req_ms


def selftest(keep_dir: Path | None = None) -> int:
    """Two stand-ins, the proxy per strategy: spread, streaming, least-busy preference, CPU/request."""
    t0 = time.monotonic()
    exe = ensure_proxy_venv(quiet=False)
    print(f"proxy venv ready in {time.monotonic() - t0:.1f} s: {exe}")
    work = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="litellm-proxy-selftest-"))
    work.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("  ok   " if ok else "  FAIL ") + what)
        if not ok:
            failures.append(what)

    # 1. Both fast: every request answered, plain and streamed; both backends used; CPU/request.
    fast_a, fast_b = Standin("sim-small", log_dir=work), Standin("sim-large", log_dir=work)
    with fast_a, fast_b:
        deps = [Deployment("sim-small", fast_a.api_base), Deployment("sim-large", fast_b.api_base)]
        for strategy in STRATEGIES:
            cfg = write_config(work / f"{strategy}.yaml", deps, strategy)
            with LiteLLMProxy(cfg, exe=exe) as proxy:
                print(f"\n[{strategy}] proxy pid {proxy.pid} ready in {proxy.startup_s:.1f} s")
                plain = asyncio.run(_burst(proxy, 20, stream=False))
                streamed = asyncio.run(_burst(proxy, 20, stream=True))
                c_plain, c_stream = _counts(plain), _counts(streamed)
                print(f"  20 concurrent plain {dict(c_plain)}; 20 concurrent streamed {dict(c_stream)}")
                print(f"  x-litellm-model-id header: {plain[0].headers.get('x-litellm-model-id')}")
                total = c_plain + c_stream
                check(sum(total.values()) == 40 and not any(k.startswith("HTTP") for k in total), "40/40 200")
                if strategy == "simple-shuffle":
                    check(set(total) == {"sim-small", "sim-large"}, "simple-shuffle: both backends used")
                else:
                    # Known: a burst all sees in-flight counts of 0 (the +1 happens in the pre-API-call
                    # callback, after the routing decision and several awaits) and ties go to the first
                    # deployment; sequential requests likewise all go to the first.
                    seq = asyncio.run(_sequential(proxy, 10))
                    print(f"  10 sequential {dict(_counts(seq))} (ties go to the first deployment)")
                held = asyncio.run(_burst(proxy, 1, False, {"x_standin": {"delay_ms": 400}}))[0]
                check(held.seconds >= 0.4, f"x_standin body field reaches the backend ({held.seconds:.2f} s)")
                _cpu_phase(proxy, "CPU")
        cfg = write_config(work / "noauth.yaml", deps, "simple-shuffle", master_key=None)
        with LiteLLMProxy(cfg, exe=exe, master_key=None) as proxy:
            print(f"\n[simple-shuffle, no master key] ready in {proxy.startup_s:.1f} s")
            proxy.warm_up()
            _cpu_phase(proxy, "CPU")

    # 2. One slow backend: least-busy should send most traffic to the idle one, shuffle ~half.
    slow, fast = Standin("sim-small", delay_ms=300, log_dir=work), Standin("sim-large", log_dir=work)
    share: dict[str, float] = {}
    with slow, fast:
        deps = [Deployment("sim-small", slow.api_base), Deployment("sim-large", fast.api_base)]
        for strategy in STRATEGIES:
            cfg = write_config(work / f"{strategy}-slow.yaml", deps, strategy)
            with LiteLLMProxy(cfg, exe=exe) as proxy:
                loop = asyncio.run(_closed_loop(proxy, workers=4, duration_s=4.0))
                c = _counts(loop)
                share[strategy] = c["sim-large"] / max(1, sum(c.values()))
                print(f"\n[{strategy}] sim-small +300 ms vs sim-large, 4 clients x 4 s: {dict(c)}")
                if strategy == "least-busy":
                    long, seq = asyncio.run(_pinned(proxy, 2000, 10))
                    print(
                        f"  one 2 s request on {long.backend}; 10 sequential meanwhile: {dict(_counts(seq))}"
                    )
                    check(
                        all(o.backend != long.backend for o in seq),
                        "least-busy: sequential requests avoid the deployment with one in flight",
                    )
    print(f"\nshare to the idle backend: {', '.join(f'{k} {v:.0%}' for k, v in share.items())}")
    check(
        share["least-busy"] > min(0.75, share["simple-shuffle"] + 0.2),
        "least-busy sends clearly more to the idle backend than simple-shuffle",
    )
    check(0.3 < share["simple-shuffle"] < 0.7, "simple-shuffle splits roughly evenly")
    print(f"\nconfigs and logs in {work}")
    print("SELFTEST " + ("PASSED" if not failures else f"FAILED: {failures}"))
    return 0 if not failures else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--install", action="store_true", help="create/refresh bench/.litellm-venv only")
    parser.add_argument("--selftest", action="store_true", help="end-to-end check on loopback stand-ins")
    parser.add_argument("--keep-dir", type=Path, help="where the self-test writes configs and logs")
    args = parser.parse_args(argv)
    if args.selftest:
        return selftest(args.keep_dir)
    if args.install:
        print(ensure_proxy_venv(quiet=False))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
