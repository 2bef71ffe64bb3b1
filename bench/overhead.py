"""What the gateway adds on the pass-through path, per backend client kind, against a stand-in backend.

Backends have a policy field `client: litellm | http`. This benchmark measures, in ONE run and side by side,
(a) the stand-in directly, (b) a gateway whose backends use `client: litellm` and (c) a gateway whose backends
use `client: http`: latency added, requests/s and the gateway's CPU per request. It does so in two scenarios,
each with its own set of processes: a zero-latency stand-in (the gateway's cost in isolation; concurrency 1,
16, 64) and a stand-in that answers after a realistic delay (`--backend-delay-ms`, default 100 ms; concurrency
16 and 64), where, as with a real backend, many connections are busy at once.

The machine is small and shared, so absolute numbers drift from minute to minute. This benchmark therefore
measures *ratios side by side*: for every concurrency level it runs rounds of load against each of the three
targets, one target at a time, rotating through all orders of the three so drift hits all alike. The stand-in
and both gateways run as separate processes (as deployed; each gateway with its own policy file and data
directory, both in front of the same stand-in) and the load generator runs here, so no gateway shares a GIL
with it; all of them still share the machine's cores. Only one gateway is under load at a time; the other
idles (its idle CPU is measured and reported).

Run:  .venv/bin/python bench/overhead.py            (about 5-6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import pstats
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import code_label as git_code_label  # noqa: E402
from bench.harness import free_port  # noqa: E402

HOST = "127.0.0.1"  # all traffic stays on loopback
CHAT_PATH = "/v1/chat/completions"
BODY = {
    "model": "small",  # a backend name: the pass-through path, no routing decision
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("litellm", "http")  # the gateway variants: the backends' `client` policy field
TARGETS = ("direct", *KINDS)
STANDIN = "standin"


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process, from /proc: a noise-robust cost measure."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process holds open."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


@dataclass
class TcpSnapshot:
    """TCP connections to the stand-in: who holds them open, and how many closed ones linger."""

    established: dict[str, set[int]]  # per gateway: inodes of its ESTABLISHED sockets to the stand-in
    time_wait: int  # TIME_WAIT sockets on the stand-in's port (either side): traces of closed connections


def tcp_snapshot(standin_port: int, pids: dict[str, int]) -> TcpSnapshot:
    established: dict[int, bool] = {}
    time_wait = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            local_port, remote_port = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
            if cols[3] == "06" and standin_port in (local_port, remote_port):
                time_wait += 1
            elif cols[3] == "01" and remote_port == standin_port:
                established[int(cols[9])] = True
    owned = {name: socket_inodes(pid) & established.keys() for name, pid in pids.items()}
    return TcpSnapshot(owned, time_wait)


# --- processes ------------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def spawn(
    name: str, args: list[str], port: int, workdir: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Proc:
    """`python ARGS` in `cwd` (another checkout runs its own code: the working directory comes first on
    the import path), logging to `workdir/NAME.log`."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor; a file never fills up like a pipe
        popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, popen, log_path, f"http://{HOST}:{port}")


async def wait_ready(proc: Proc, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(proc.url + path, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready after {timeout_s}s:\n{proc.tail()}")


def stop(proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
    """`sig` (uvicorn shuts down cleanly, the gateway flushes its log), then SIGKILL if it hangs."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(sig)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(10)


def write_policy(path: Path, standin_url: str, client: str, **sections: Any) -> None:
    """Two backends on the stand-in, the pass-through path; `sections` replace top-level policy sections."""
    backends = [
        {
            "name": name,
            "tier": name,
            "model": "openai/standin",
            "api_base": standin_url + "/v1",
            **({"client": client} if client else {}),  # none named: the gateway's default
            "max_concurrent": 256,  # far above the load: admission never queues
            "timeout_s": 30,
        }
        for name in ("small", "large")
    ]
    policy = {
        "backends": backends,
        "routed_models": ["auto"],
        "auth": {"required": False},
        "embedding": {"preload": False},
        # The pass-through path: a cache would answer the repeated request itself.
        "cache": {"enabled": False},
        "telemetry": {"traces_exporter": "none"},
        **sections,
    }
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


def scenario_tag(delay_ms: float) -> str:
    """A file-name suffix per scenario: each has its own stand-in, gateways, policies and data."""
    return f"-delay{delay_ms:g}ms" if delay_ms else ""


@contextlib.contextmanager
def servers(
    workdir: Path, kinds: Sequence[str] = KINDS, profiled: bool = False, delay_ms: float = 0.0
) -> Iterator[tuple[Proc, dict[str, Proc]]]:
    """The stand-in and one gateway per client kind in front of it, as subprocesses; always stopped on exit.

    The stand-in answers every request after `delay_ms`. Each gateway has its own policy file and data
    directory (its own SQLite request log). With `profiled`, each gateway runs under `serve_profiled` and
    writes `gateway-<kind><tag>.prof` into `workdir`.
    """
    procs: list[Proc] = []
    suffix = scenario_tag(delay_ms) + ("-profiled" if profiled else "")
    try:
        sport = free_port()
        standin_args = ["-m", "bench.standin_backend", "--port", str(sport), "--delay-ms", f"{delay_ms:g}"]
        standin = spawn(STANDIN + suffix, standin_args, sport, workdir)
        procs.append(standin)
        gateways: dict[str, Proc] = {}
        for kind in kinds:
            gport = free_port()
            policy = workdir / f"policy-{kind}{suffix}.yaml"
            write_policy(policy, standin.url, kind)
            cli = ["serve", "--policy", str(policy), "--port", str(gport)]
            cli += ["--data-dir", str(workdir / f"data-{kind}{suffix}"), "--no-launch"]
            if profiled:
                prof = str(profile_path(workdir, kind, delay_ms))
                args = [str(Path(__file__).resolve()), PROFILED_FLAG, prof, *cli]
            else:
                args = ["-m", "icgate.gateway.cli.main", *cli]
            gateways[kind] = spawn(f"gateway-{kind}{suffix}", args, gport, workdir)
            procs.append(gateways[kind])
        yield standin, gateways
    finally:
        for proc in reversed(procs):
            stop(proc)


async def wait_all_ready(standin: Proc, gateways: dict[str, Proc]) -> None:
    await wait_ready(standin, "/healthz", 60)
    await asyncio.gather(*(wait_ready(gw, "/readyz", 240) for gw in gateways.values()))


PROFILED_FLAG = "--serve-profiled"


def profile_path(workdir: Path, kind: str, delay_ms: float) -> Path:
    return workdir / f"gateway-{kind}{scenario_tag(delay_ms)}.prof"


def serve_profiled(out: str, cli_args: list[str]) -> int:
    """`icgate serve` with a cProfile of its event-loop thread switched on by SIGUSR1, dumped by SIGUSR2.

    Profiling only the measured window keeps imports and start-up out of the per-request numbers.
    """
    import cProfile

    from icgate.gateway.cli.main import main as cli_main

    prof = cProfile.Profile()

    def dump(*_: object) -> None:
        prof.disable()
        prof.dump_stats(out)

    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
    signal.signal(signal.SIGUSR2, dump)
    return cli_main(cli_args)


# --- load -----------------------------------------------------------------------------------------------


@dataclass
class Round:
    target: str  # "direct" | "litellm" | "http"
    latencies_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)  # the gateway's x-icgate-overhead-ms
    errors: Counter[str] = field(default_factory=Counter)  # "HTTP 502", "ClientOSError", ...
    error_samples: dict[str, str] = field(default_factory=dict)  # the first body/message per error kind
    served: Counter[str] = field(default_factory=Counter)  # per `x-icgate-backend`: "small", or a fallback
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU per process ("standin", "litellm", "http")
    client_cpu_s: float = 0.0  # CPU of this load generator
    conns: dict[str, int] = field(default_factory=dict)  # per gateway: connections to the stand-in after
    new_conns: dict[str, int] = field(default_factory=dict)  # per gateway: of those, opened in this round
    time_wait_delta: int = 0  # change of TIME_WAIT sockets on the stand-in's port over the round

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else math.nan


async def run_round(
    session: aiohttp.ClientSession,
    url: str,
    target: str,
    n: int,
    concurrency: int,
    max_s: float,
    cpu_pids: dict[str, int],
    standin_port: int | None = None,
    payloads: Callable[[int], bytes] | None = None,
) -> Round:
    """Closed loop: `concurrency` workers send back-to-back requests until `n` are done or `max_s` passed.

    With `standin_port`, the gateways' TCP connections to the stand-in are counted before and after.
    `payloads(i)` gives the i-th request body (default: `BODY` every time).
    """
    result = Round(target)
    fixed = json.dumps(BODY).encode()
    headers = {"content-type": "application/json"}
    issued = 0
    deadline = time.perf_counter() + max_s

    def error(kind: str, sample: str) -> None:
        result.errors[kind] += 1
        result.error_samples.setdefault(kind, sample[:300])

    async def worker() -> None:
        nonlocal issued
        while issued < n and time.perf_counter() < deadline:
            issued += 1
            payload = payloads(issued) if payloads is not None else fixed
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers=headers) as resp:
                    body = await resp.read()
                    status = resp.status
                    overhead = resp.headers.get("x-icgate-overhead-ms")
                    served = resp.headers.get("x-icgate-backend")
            except (aiohttp.ClientError, TimeoutError) as exc:
                error(type(exc).__name__, str(exc))
                continue
            if status != 200:
                error(f"HTTP {status}", body.decode(errors="replace"))
                continue
            result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            if overhead is not None:
                result.overhead_ms.append(float(overhead))
            if served is not None:
                result.served[served] += 1

    gateway_pids = {name: pid for name, pid in cpu_pids.items() if name != STANDIN}
    tcp0 = tcp_snapshot(standin_port, gateway_pids) if standin_port else None
    cpu0 = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
    client0 = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - client0
    result.cpu_s = {name: cpu_seconds(pid) - cpu0[name] for name, pid in cpu_pids.items()}
    if standin_port and tcp0 is not None:
        tcp1 = tcp_snapshot(standin_port, gateway_pids)
        result.conns = {name: len(inodes) for name, inodes in tcp1.established.items()}
        result.new_conns = {
            name: len(inodes - tcp0.established[name]) for name, inodes in tcp1.established.items()
        }
        result.time_wait_delta = tcp1.time_wait - tcp0.time_wait
    return result


def serving(target: str) -> tuple[str, ...]:
    """The processes that serve a target's requests."""
    return (STANDIN,) if target == "direct" else (target, STANDIN)


@dataclass
class Level:
    concurrency: int
    delay_ms: float  # the stand-in's delay per request (0: zero-latency)
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    orders: list[tuple[str, ...]] = field(default_factory=list)  # the order of the targets in each round

    @property
    def label(self) -> str:
        return f"c={self.concurrency}, " + (
            f"{self.delay_ms:g} ms backend" if self.delay_ms else "zero-latency backend"
        )

    @property
    def bound_rps(self) -> float:
        """The most req/s a closed loop of `concurrency` workers gets from a backend with this delay."""
        return self.concurrency / (self.delay_ms / 1000.0) if self.delay_ms else math.inf

    def pooled(self, target: str, attr: str) -> list[float]:
        return [x for r in self.rounds[target] for x in getattr(r, attr)]

    def ok(self, target: str) -> int:
        return sum(r.ok for r in self.rounds[target])

    def errors(self, target: str) -> Counter[str]:
        return sum((r.errors for r in self.rounds[target]), Counter())

    def served(self, target: str) -> Counter[str]:
        return sum((r.served for r in self.rounds[target]), Counter())

    def rps(self, target: str) -> float:
        return self.ok(target) / sum(r.wall_s for r in self.rounds[target])

    def added(self, kind: str, q: float) -> float:
        """Gateway-path percentile minus direct-path percentile."""
        return pct(self.pooled(kind, "latencies_ms"), q) - pct(self.pooled("direct", "latencies_ms"), q)

    def round_ratios(self, num: str, den: str) -> list[float]:
        """req/s ratio per round: `num` and `den` rounds of the same round index ran back to back."""
        return [a.rps / b.rps for a, b in zip(self.rounds[num], self.rounds[den], strict=True)]

    def cpu_ms_per_req(self, target: str, procs: Sequence[str]) -> float:
        rounds = self.rounds[target]
        return 1000.0 * sum(r.cpu_s[p] for r in rounds for p in procs) / max(1, self.ok(target))

    def client_cpu_ms_per_req(self, target: str) -> float:
        return 1000.0 * sum(r.client_cpu_s for r in self.rounds[target]) / max(1, self.ok(target))

    def gateway_cpu_ms(self, kind: str) -> float:
        """(gateway + stand-in CPU in its rounds) minus (stand-in CPU in direct rounds), per request."""
        return self.cpu_ms_per_req(kind, serving(kind)) - self.cpu_ms_per_req("direct", serving("direct"))

    def idle_cpu(self, target: str, proc: str) -> str:
        """CPU of a process that does not serve `target`, over the wall time of `target`'s rounds."""
        rounds = self.rounds[target]
        return (
            f"{1000.0 * sum(r.cpu_s[proc] for r in rounds):.0f} ms in {sum(r.wall_s for r in rounds):.1f} s"
        )


def load_connector(concurrency: int) -> aiohttp.TCPConnector:
    """The load generator's pool per target. Its keep-alive stays below uvicorn's 5 s: a connection the server
    closes just as it is reused fails the POST ("Can not write request body"; aiohttp retries no POST), which
    happened when a target idled about 5 s while the others were loaded."""
    return aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=2.0)


ORDERS = list(itertools.permutations(TARGETS))  # 6 orders: each target is first, second, last twice


async def measure_level(
    standin: Proc,
    gateways: dict[str, Proc],
    concurrency: int,
    delay_ms: float,
    requests: int,
    rounds: int,
    max_round_s: float,
) -> Level:
    """Warm all paths, then run rounds of all three targets one after the other, rotating the order."""
    level = Level(concurrency, delay_ms)
    timeout = aiohttp.ClientTimeout(total=60)
    pids = {STANDIN: standin.popen.pid, **{kind: gw.popen.pid for kind, gw in gateways.items()}}
    urls = {"direct": standin.url + CHAT_PATH, **{k: gw.url + CHAT_PATH for k, gw in gateways.items()}}
    sport = int(standin.url.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as stack:
        sessions = {
            target: await stack.enter_async_context(
                aiohttp.ClientSession(connector=load_connector(concurrency), timeout=timeout)
            )
            for target in TARGETS
        }
        warm = max(100, 4 * concurrency)
        for target in TARGETS:
            await run_round(sessions[target], urls[target], target, warm, concurrency, max_round_s, pids)
        for i in range(rounds):
            level.orders.append(ORDERS[i % len(ORDERS)])
            for target in ORDERS[i % len(ORDERS)]:
                r = await run_round(
                    sessions[target], urls[target], target, requests, concurrency, max_round_s, pids, sport
                )
                level.rounds[target].append(r)
                own = (
                    f"  cpu {1000 * r.cpu_s[target] / max(1, r.ok):5.2f} ms/req  conns {r.conns[target]:3d} "
                    f"(+{r.new_conns[target]})  time-wait {r.time_wait_delta:+d}"
                    if target in KINDS
                    else ""
                )
                print(
                    f"  d={delay_ms:<4g} c={concurrency:<3} round {i + 1}/{rounds} {target:<7} {r.ok:5d} ok "
                    f"{r.n_errors:3d} err {r.rps:8.1f} req/s  p50 {pct(r.latencies_ms, 50):7.2f} ms  "
                    f"p99 {pct(r.latencies_ms, 99):7.2f} ms{own}",
                    flush=True,
                )
    return level


async def probe(standin: Proc, gateways: dict[str, Proc]) -> dict[str, dict[str, Any]]:
    """One request per target before measuring: status, answer, fields and gateway headers, to compare."""
    out: dict[str, dict[str, Any]] = {}
    urls = {"direct": standin.url + CHAT_PATH, **{k: gw.url + CHAT_PATH for k, gw in gateways.items()}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for target, url in urls.items():
            async with session.post(url, json=BODY) as resp:
                text = await resp.text()
                info: dict[str, Any] = {
                    "status": resp.status,
                    "backend": resp.headers.get("x-icgate-backend"),
                }
            try:
                body = json.loads(text)
                info["keys"] = sorted(body)
                info["content"] = body["choices"][0]["message"]["content"]
                info["usage"] = body.get("usage")
            except (ValueError, KeyError, IndexError, TypeError):
                info["keys"], info["content"], info["usage"] = [], text[:200], None
            out[target] = info
    return out


async def profile_gateways(
    workdir: Path, requests: int, concurrency: int, delay_ms: float
) -> dict[str, Path]:
    """Separate gateway runs under cProfile, one kind at a time: where their CPU goes per request."""
    outs: dict[str, Path] = {}
    with servers(workdir, profiled=True, delay_ms=delay_ms) as (standin, gateways):
        await wait_all_ready(standin, gateways)
        for kind, gateway in gateways.items():
            out = profile_path(workdir, kind, delay_ms)
            pids = {kind: gateway.popen.pid}
            async with aiohttp.ClientSession(connector=load_connector(concurrency)) as session:
                url = gateway.url + CHAT_PATH
                await run_round(session, url, kind, 100, concurrency, 120, pids)
                gateway.popen.send_signal(signal.SIGUSR1)
                await asyncio.sleep(0.2)
                r = await run_round(session, url, kind, requests, concurrency, 300, pids)
                gateway.popen.send_signal(signal.SIGUSR2)
                print(
                    f"  profiled {kind} (c={concurrency}, backend delay {delay_ms:g} ms): {r.ok} ok, "
                    f"{r.n_errors} errors, {r.rps:.1f} req/s under cProfile",
                    flush=True,
                )
                for _ in range(100):
                    if out.exists():
                        break
                    await asyncio.sleep(0.1)
            if not out.exists():
                raise RuntimeError(f"cProfile wrote no profile for {kind}:\n{gateway.tail()}")
            outs[kind] = out
    return outs


# The functions whose cumulative time says where a pass-through request's CPU goes.
PROFILE_KEYS = [
    ("uvicorn request cycle (everything below)", "httptools_impl.py", "run_asgi"),
    ("FastAPI app: routing, body validation, handler, response", "routing.py", "app"),
    ("gateway `Pipeline.run`", "pipeline/run.py", "run"),
    ("gateway `Transport.send` (the backend call, incl. the client library)", "backends/client.py", "send"),
    ("- litellm `acompletion`", "utils.py", "wrapper_async"),
    (
        "- - of which the openai SDK request inside litellm",
        "openai.py",
        "make_openai_chat_completion_request",
    ),
    ("- - of which litellm's response cost calculation", "litellm_logging.py", "response_cost_calculator"),
    ("- - of which httpx `AsyncClient.send` (the openai SDK's HTTP client)", "httpx/_client.py", "send"),
    (
        "- gateway `openai_response`: litellm's answer in OpenAI's shape",
        "backends/client.py",
        "openai_response",
    ),
    ("- gateway `HttpTransport._post` (body, headers, send, response head)", "backends/client.py", "_post"),
    (
        "- aiohttp `ClientSession._request` (`http`: the client; `litellm`: under httpx)",
        "aiohttp/client.py",
        "_request",
    ),
    ("- aiohttp `ClientResponse.read` (response body)", "aiohttp/client_reqrep.py", "read"),
    ("logging handlers (every log record: access log, app logs)", "__init__.py", "callHandlers"),
]
BACKEND_CALL = ("backends/client.py", "send")


@dataclass
class Profile:
    """One gateway's cProfile: report lines, and ms per request in the request cycle and the backend call."""

    lines: list[str]
    cycle_ms: float  # uvicorn's request cycle (everything the event loop does for a request)
    call_ms: float  # `Transport.send`: the backend call the header books as backend time


def profile_summary(path: Path, requests: int) -> Profile:
    """Per-request cumulative times of the key functions, and the top functions by own time."""
    table = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]

    def cumulative(filename: str, func: str) -> float | None:
        found = [v[3] for k, v in table.items() if k[0].endswith(filename) and k[2] == func]
        return max(found) if found else None

    lines = [
        "| function (cumulative, incl. callees) | ms per request | file:function |",
        "| --- | ---: | --- |",
    ]
    for label, filename, func in PROFILE_KEYS:
        value = cumulative(filename, func)
        if value is not None:
            lines.append(f"| {label} | {1000 * value / requests:.2f} | `{filename}:{func}` |")
    total, call = cumulative("httptools_impl.py", "run_asgi"), cumulative(*BACKEND_CALL)
    if total and call:
        lines += [
            "",
            f"The backend call (`Transport.send`, client library included) is "
            f"**{100 * call / total:.0f}%** of the request cycle's time in the event-loop thread; "
            "everything else (uvicorn, FastAPI, the pipeline, logging) is "
            f"{1000 * (total - call) / requests:.2f} ms per request under the profiler.",
        ]
    top = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    lines += ["", "Top functions by own time (tottime) in the gateway's event-loop thread:", ""]
    lines += ["| own ms per request | calls per request | function |", "| ---: | ---: | --- |"]
    for (filename, lineno, func), (_cc, nc, tt, _ct, _callers) in top:
        short = "/".join(Path(filename).parts[-2:])
        lines.append(f"| {1000 * tt / requests:.3f} | {nc / requests:.1f} | `{short}:{lineno} {func}` |")
    return Profile(lines, 1000 * (total or math.nan) / requests, 1000 * (call or math.nan) / requests)


@dataclass
class LogCounts:
    """What a gateway's log holds: access-log lines, litellm per-call lines, warnings and errors."""

    requests: int = 0
    litellm_records: int = 0
    problems: int = 0  # WARNING and ERROR records (a failed backend call logs one)
    first_problem: str = ""

    def add(self, log_path: Path) -> None:
        text = log_path.read_text(errors="replace")
        self.requests += text.count('"POST /v1/chat/completions HTTP/1.1"')
        self.litellm_records += text.count("LiteLLM completion() model=")
        problems = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
        self.problems += len(problems)
        self.first_problem = self.first_problem or (problems[0][:300] if problems else "")


# --- report ---------------------------------------------------------------------------------------------


def machine(code_label: str | None = None) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    code = code_label or git_code_label(ROOT)  # the caller's description, else the checkout's
    from importlib.metadata import PackageNotFoundError, version

    libs = []
    for name in ("litellm", "openai", "httpx", "aiohttp", "uvicorn", "uvloop", "fastapi"):
        with contextlib.suppress(PackageNotFoundError):
            libs.append(f"{name} {version(name)}")
    return {
        "libs": ", ".join(libs),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "code": code,
        "platform": platform.platform(),
        "loadavg_before": load,
    }


def f2(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def spread(values: list[float], digits: int = 3) -> str:
    """median (min - max)"""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f} - {max(values):.{digits}f})"


def error_text(errors: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in errors.most_common()) if errors else "0"


def scenario_name(delay_ms: float) -> str:
    return f"stand-in with {delay_ms:g} ms delay" if delay_ms else "zero-latency stand-in"


def level_table(level: Level) -> list[str]:
    def row(label: str, fn: Any, direct: str = "") -> str:
        cells = [direct or fn("direct"), *(fn(kind) for kind in KINDS)]
        return f"| {label} | " + " | ".join(cells) + " |"

    lat = {t: level.pooled(t, "latencies_ms") for t in TARGETS}
    rows = [
        row("end-to-end p50 ms", lambda t: f2(pct(lat[t], 50))),
        row("end-to-end p99 ms", lambda t: f2(pct(lat[t], 99))),
        row("**added p50 ms** (gateway p50 - direct p50)", lambda k: f"**{f2(level.added(k, 50))}**", "-"),
        row("**added p99 ms** (gateway p99 - direct p99)", lambda k: f"**{f2(level.added(k, 99))}**", "-"),
        row(
            "self-reported `x-icgate-overhead-ms` p50 / p99",
            lambda k: (
                f"{f2(pct(level.pooled(k, 'overhead_ms'), 50))} / "
                f"{f2(pct(level.pooled(k, 'overhead_ms'), 99))}"
            ),
            "-",
        ),
        row("req/s (pooled)", lambda t: f"{level.rps(t):.1f}"),
    ]
    if level.delay_ms:
        rows.append(
            row(
                f"share of the closed-loop bound c / delay = {level.bound_rps:.0f} req/s",
                lambda t: f"{level.rps(t) / level.bound_rps:.2f}",
            )
        )
    rows += [
        row(
            "**req/s ratio to direct** (pooled)",
            lambda k: f"**{level.rps(k) / level.rps('direct'):.3f}**",
            "-",
        ),
        row(
            "per-round ratio to direct, median (min - max)",
            lambda k: spread(level.round_ratios(k, "direct")),
            "-",
        ),
        row("**gateway CPU ms per request**", lambda k: f"**{level.gateway_cpu_ms(k):.2f}**", "-"),
        row(
            "server CPU ms per request (stand-in + the gateway serving)",
            lambda t: f"{level.cpu_ms_per_req(t, serving(t)):.2f}",
        ),
        row("stand-in CPU ms per request", lambda t: f"{level.cpu_ms_per_req(t, (STANDIN,)):.2f}"),
        row(
            "CPU of the gateways idle meanwhile (10 ms ticks)",
            lambda t: "; ".join(f"{k}: {level.idle_cpu(t, k)}" for k in KINDS if k != t),
        ),
        row("load-generator CPU ms per request", lambda t: f"{level.client_cpu_ms_per_req(t):.2f}"),
        row("requests measured (ok)", lambda t: str(level.ok(t))),
        row("errors", lambda t: error_text(level.errors(t))),
        row(
            "served by (`x-icgate-backend`; `large` = fallback after a failed call)",
            lambda k: ", ".join(f"{b}: {n}" for b, n in level.served(k).most_common()) or "-",
            "-",
        ),
    ]
    head = ["| metric | direct | " + " | ".join(f"gateway, `client: {k}`" for k in KINDS) + " |"]
    head.append("| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " |")
    title = f"### {scenario_name(level.delay_ms).capitalize()}, concurrency {level.concurrency}"
    return [title, "", *head, *rows, ""]


def summary_table(levels: list[Level]) -> list[str]:
    out = [
        "| backend delay ms | concurrency | client | added p50 ms | added p99 ms "
        "| self-reported p50 / p99 ms | req/s direct | req/s gateway | ratio to direct "
        "| gateway CPU ms/req | errors |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        rd = lv.rps("direct")
        for kind in KINDS:
            ov = lv.pooled(kind, "overhead_ms")
            out.append(
                f"| {lv.delay_ms:g} | {lv.concurrency} | {kind} | {f2(lv.added(kind, 50))} "
                f"| {f2(lv.added(kind, 99))} | {f2(pct(ov, 50))} / {f2(pct(ov, 99))} | {rd:.1f} "
                f"| {lv.rps(kind):.1f} | {lv.rps(kind) / rd:.3f} | {lv.gateway_cpu_ms(kind):.2f} "
                f"| {error_text(lv.errors(kind))} |"
            )
    return out


def speedup_table(levels: list[Level]) -> list[str]:
    out = [
        "| backend delay ms | concurrency | req/s http / litellm (pooled) | per round, median (min - max) "
        "| CPU ms/req litellm / http | added p50 ms litellm -> http | added p99 ms litellm -> http |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        cpu_l, cpu_h = lv.gateway_cpu_ms("litellm"), lv.gateway_cpu_ms("http")
        out.append(
            f"| {lv.delay_ms:g} | {lv.concurrency} | **{lv.rps('http') / lv.rps('litellm'):.2f}x** "
            f"| {spread(lv.round_ratios('http', 'litellm'), 2)} "
            f"| **{cpu_l / cpu_h if cpu_h > 0 else math.nan:.2f}x** ({cpu_l:.2f} / {cpu_h:.2f}) "
            f"| {f2(lv.added('litellm', 50))} -> {f2(lv.added('http', 50))} "
            f"| {f2(lv.added('litellm', 99))} -> {f2(lv.added('http', 99))} |"
        )
    return out


def rounds_table(levels: list[Level]) -> list[str]:
    """One row per round: the noise, outliers and the gateways' connections to the stand-in."""
    out = [
        "| delay ms | c | round | order | req/s direct / litellm / http | p99 ms litellm / http "
        "| own CPU ms/req litellm / http | stand-in CPU ms/req direct / litellm / http "
        "| conns to stand-in (new) litellm / http | TIME_WAIT change litellm / http |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        for i, order in enumerate(lv.orders):
            r = {t: lv.rounds[t][i] for t in TARGETS}

            def own(t: str, proc: str, r: dict[str, Round] = r) -> str:
                return f"{1000 * r[t].cpu_s[proc] / max(1, r[t].ok):.2f}"

            out.append(
                f"| {lv.delay_ms:g} | {lv.concurrency} | {i + 1} | {', '.join(order)} "
                f"| {' / '.join(f'{r[t].rps:.0f}' for t in TARGETS)} "
                f"| {' / '.join(f2(pct(r[k].latencies_ms, 99)) for k in KINDS)} "
                f"| {' / '.join(own(k, k) for k in KINDS)} "
                f"| {' / '.join(own(t, STANDIN) for t in TARGETS)} "
                f"| {' / '.join(f'{r[k].conns.get(k, 0)} ({r[k].new_conns.get(k, 0)})' for k in KINDS)} "
                f"| {' / '.join(f'{r[k].time_wait_delta:+d}' for k in KINDS)} |"
            )
    return out


def probe_table(probes: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "| target | status | `x-icgate-backend` | answer | usage | top-level fields |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for target, p in probes.items():
        usage = json.dumps(p["usage"]) if p["usage"] is not None else "-"
        out.append(
            f"| {target} | {p['status']} | {p['backend'] or '-'} | {p['content']!r} | `{usage}` "
            f"| {', '.join(p['keys'])} |"
        )
    return out


# The httpx-based `client: http` measured before it was replaced (fixed numbers from that run, not this one).
HISTORY_RUN = "2026-11-24T01:04:31+00:00, httpx 0.28.1 / httpcore 1.0.9, same machine and method"


def history(levels: list[Level]) -> list[str]:
    """Why `client: http` is on aiohttp: the httpx numbers of an earlier run, next to this run's."""
    lines = [
        "## History: why `client: http` no longer uses httpx",
        "",
        "`HttpTransport` first used one pooled httpx `AsyncClient`. The run that showed its problem "
        f"({HISTORY_RUN}; these figures are from that run, not this one):",
        "",
        "- Zero-latency stand-in, c=64: in the one of 6 rounds where the http gateway had to rebuild "
        "its pool (64 new connections) it spent 11.28 ms CPU/request at 93 req/s (p99 2117 ms), "
        "against 3.53 ms and 288 req/s (medians) in the other rounds; pooled, its p99 added latency "
        "was 1480.56 ms against litellm's 671.05 ms. Its cProfile (c=16) was topped by httpcore's pool "
        "bookkeeping: `is_idle` 704 calls per request, a `poll()` on idle sockets 42 times per request.",
        "- A side experiment with a 100 ms backend delay at c=64 (many connections busy at once): the httpx "
        "gateway did 50-62 req/s at 17-21 ms CPU/request, worse than litellm's 103-107 req/s at 9 ms.",
        "- Cause: httpcore's connection pool re-examines all its connections whenever it assigns requests to "
        "connections, which grows quadratically with the connections it holds (a fix was proposed in "
        "encode/httpcore PR #1035; not in httpcore 1.0.9). `HttpTransport` was therefore rewritten on one "
        "pooled aiohttp `ClientSession` (`TCPConnector(limit=0, keepalive_timeout=4)`), whose connector "
        "takes the next idle connection from a per-host queue.",
    ]
    same = [lv for lv in levels if lv.delay_ms == 100 and lv.concurrency == 64]
    if same:
        lv = same[0]
        lines.append(
            "- The same 100 ms / c=64 case in this run, with aiohttp: `http` "
            f"{lv.rps('http'):.1f} req/s at {lv.gateway_cpu_ms('http'):.2f} ms CPU/request, `litellm` "
            f"{lv.rps('litellm'):.1f} req/s at {lv.gateway_cpu_ms('litellm'):.2f} ms "
            f"({error_text(lv.errors('http'))} errors on `http`)."
        )
    return [*lines, ""]


def write_report(
    out: Path,
    args: argparse.Namespace,
    info: dict[str, str],
    levels: list[Level],
    started: dt.datetime,
    elapsed_s: float,
    probes: dict[float, dict[str, dict[str, Any]]],
    profiles: dict[tuple[float, int, str], Profile],
    log_counts: dict[str, LogCounts],
) -> None:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT)
    command = shlex.join([str(exe), *sys.argv])
    delays = sorted({lv.delay_ms for lv in levels})
    scenario_text = "; ".join(
        f"{scenario_name(d)} at concurrency "
        + ", ".join(str(lv.concurrency) for lv in levels if lv.delay_ms == d)
        for d in delays
    )
    lines = [
        "# Gateway overhead on the pass-through path: `client: litellm` vs `client: http`",
        "",
        f"- date: {started.isoformat(timespec='seconds')} (run took {elapsed_s:.0f} s)",
        f"- machine: {info['nproc']} CPUs, {info['cpu']}; {info['platform']}; load average (1, 5, 15 min) "
        f"before the run {info['loadavg_before']}, after it {info['loadavg_after']} (shared, noisy machine: "
        "other jobs ran on the same cores)",
        f"- python: {info['python']}; {info['libs']}",
        f"- code: {info['code']}",
        f"- command: `{command}`",
        f"- scenarios: {scenario_text}",
        "",
        "## Method",
        "",
        "- A stand-in backend (`bench/standin_backend.py`, Starlette under uvicorn) and **two "
        "gateways** (`icgate serve --no-launch`, as deployed: uvicorn with "
        "uvloop/httptools, its default INFO logging (no access log: `server.access_log` is off by "
        "default), SQLite request log) run as "
        "**separate processes**. Each gateway has "
        "its own policy file and data directory; both policies have the same two backends on the one "
        "stand-in (`openai/standin`), `max_concurrent: 256` (admission never queues), "
        "`embedding.preload: false`, `cache.enabled: false` (the pass-through path: the benchmark "
        "repeats one request, which the cache would answer itself), auth not required, traces "
        "exporter none, and differ only in the "
        "backends' `client`: `litellm` (litellm's `acompletion`) or `http` (the gateway's `HttpTransport`: "
        "the payload forwarded as is over one pooled aiohttp `ClientSession`, "
        "`TCPConnector(limit=0, keepalive_timeout=4)`).",
        "- **Two scenarios**, each with its own fresh set of the three processes: (1) a **zero-latency** "
        "stand-in, which isolates the gateway's own cost; (2) the stand-in started with `--delay-ms "
        f"{args.backend_delay_ms:g}`, which answers every request after {args.backend_delay_ms:g} ms like a "
        "real (fast) backend, so that at high concurrency many connections are busy at once: the "
        "production-relevant case. In (2) the direct target has the same delay, so *added* latency is "
        "still what the gateway adds; a closed loop of c workers can get at most c / delay req/s.",
        f'- Request: non-streaming chat completion, `model: "small"` (a backend name: the pass-through '
        f"path, no routing decision), body `{json.dumps(BODY)}`.",
        "- Load generator: this process, aiohttp, closed loop: `concurrency` workers each send the next "
        "request as soon as the previous answer is read; one connection pool per target, sized to the "
        "concurrency, keeping connections alive for up to 2 s (below uvicorn's 5 s: reusing a connection "
        "the server is just closing fails the POST).",
        f"- For each concurrency: a warm-up of max(100, 4 x concurrency) requests on each target, then "
        f"{args.rounds} rounds of {args.requests_per_round} requests on each of the three targets (stand-in "
        "directly, litellm gateway, http gateway), **interleaved**: a round runs the three targets one after "
        "the other, and successive rounds rotate through all six orders, so each target goes first, second "
        "and last equally often and drift of the shared machine hits all alike. Only one target is under "
        "load at a time; the other gateway idles meanwhile (its idle CPU is in the per-concurrency tables). "
        f"A round also stops after {args.max_round_s:.0f} s. Percentiles are over all requests of all rounds "
        "of one target; req/s is requests over summed round wall time. Per-round ratios compare rounds of "
        "the same index (run back to back) and show how noisy the pairs were. (The defaults, 300 requests "
        "per round and 500 profiled requests, were cut from 400 and 800 when the delayed-backend scenario "
        "was added, to keep the whole default run near 6 minutes.)",
        "- *Added ms* = gateway-path percentile minus direct-path percentile (a difference of percentiles, "
        "not a percentile of differences). *Self-reported* = the gateway's `x-icgate-overhead-ms` header: "
        "wall time inside the pipeline minus the time spent in the backend call (and in admission queues). "
        "The backend call is `await transport.send(...)`, so **everything the client library does counts as "
        "backend time**: with `client: litellm` that is litellm's request building, its HTTP client (the "
        "openai SDK on httpx), parsing into pydantic objects, cost calculation and `model_dump`; with "
        "`client: http` it is building the body, aiohttp sending it and reading the answer, and "
        "`json.loads`. Neither includes uvicorn/FastAPI work outside the pipeline (request parsing "
        "and validation, response serialisation and writing). The notes check the header against the "
        "measured added latency and CPU.",
        "- CPU ms per request is read from `/proc/<pid>/stat` (10 ms ticks, summed over a round): the least "
        "noise-sensitive measure of a gateway's own cost. *Gateway CPU ms/req* = (that gateway + stand-in "
        "CPU in its rounds) minus (stand-in CPU in direct rounds), per request.",
        f"- All processes share {info['nproc']} cores: a gateway competes for CPU with the stand-in and with "
        "the load generator (and a little with the idle gateway), so req/s via a gateway is a lower bound "
        "on what it does alone, and direct req/s at high concurrency is partly limited by the load "
        "generator itself.",
        "",
        "## Summary",
        "",
        *summary_table(levels),
        "",
        "Speed-up of `client: http` over `client: litellm` (same run, interleaved rounds):",
        "",
        *speedup_table(levels),
        "",
    ]
    lines += notes(levels, log_counts, probes, profiles)
    lines += history(levels)
    lines += ["## Per concurrency", ""]
    for level in levels:
        lines += level_table(level)
    lines += [
        "## Response check",
        "",
        "One request per target before each scenario's measurement (the gateways should return the "
        "stand-in's answer unchanged in OpenAI form):",
        "",
    ]
    for delay, p in probes.items():
        lines += [f"{scenario_name(delay).capitalize()}:", "", *probe_table(p), ""]
    lines += [
        "## Rounds",
        "",
        "Every measured round (the three targets of a round ran back to back in the order given). *Own CPU* "
        "is the gateway process alone; *conns* are its ESTABLISHED connections to the stand-in after the "
        "round (in brackets: how many of them were opened during the round); *TIME_WAIT change* is the "
        "change, over that target's round, of closed connections on the stand-in's port lingering in "
        "TIME_WAIT: a sign of connection churn, but not attributable to one process (either side, and "
        "the closing side may be the stand-in timing out the idle pool of another gateway).",
        "",
        *rounds_table(levels),
        "",
    ]
    if profiles:
        lines += [
            "## Where the gateways' time goes (cProfile)",
            "",
            f"Separate gateway processes (one per client kind and scenario, as above) under cProfile, each "
            f"loaded alone for {args.profile_requests} requests, profiling only "
            "the event-loop thread and only during those requests (after 100 warm-up; SIGUSR1/SIGUSR2 "
            "switch it on/off). cProfile inflates absolute times (roughly 2x) and, measuring wall time, "
            "charges moments when the shared cores were busy elsewhere to whatever function was running; "
            "the shares are what matter. Time a coroutine spends suspended (waiting for the backend) is not "
            "counted. Work handed to threads (litellm's success logging) is not in these profiles (but is in "
            "the CPU ms per request above).",
            "",
        ]
        for (delay, conc, kind), prof in profiles.items():
            lines += [f"### `client: {kind}`, {scenario_name(delay)}, c={conc}", "", *prof.lines, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


def header_p50(lv: Level, kind: str) -> float:
    return pct(lv.pooled(kind, "overhead_ms"), 50)


def notes(
    levels: list[Level],
    log_counts: dict[str, LogCounts],
    probes: dict[float, dict[str, dict[str, Any]]],
    profiles: dict[tuple[float, int, str], Profile],
) -> list[str]:
    """Observations computed from this run's numbers, so they stay true when the report is regenerated."""
    lines = ["## Notes", ""]
    for lv in levels:
        parts = []
        for kind in KINDS:
            cpu = lv.gateway_cpu_ms(kind)
            parts.append(
                f"`{kind}` {lv.rps(kind):.1f} req/s, {cpu:.2f} ms CPU/request (~{1000 / max(cpu, 1e-9):.0f} "
                f"req/s per core at best), added p50 / p99 {f2(lv.added(kind, 50))} / "
                f"{f2(lv.added(kind, 99))} ms, self-reported p50 {f2(header_p50(lv, kind))} ms"
            )
        lines.append(f"- {lv.label}: " + "; ".join(parts) + ".")
    lines += comparison_notes(levels)
    lines += delay_notes(levels)
    lines += header_notes(levels, profiles)
    if any(not lv.delay_ms for lv in levels):
        lines.append(
            "- Zero-latency scenario: the direct path is cheap (the stand-in is a bare Starlette "
            "handler), so at high concurrency the direct req/s is limited by the load generator and the "
            "stand-in sharing the cores: its ratios to direct are conservative (low) figures, the CPU ms "
            "per request is the robust one."
        )
    for kind in KINDS:
        logs = log_counts.get(kind, LogCounts())
        if logs.requests:
            extra = (
                f"{logs.litellm_records / logs.requests:.1f} litellm `completion()` INFO messages per request"
                if logs.litellm_records
                else "no per-call litellm lines"
            )
            problems = (
                f"**{logs.problems} WARNING/ERROR lines** (first: `{logs.first_problem}`)"
                if logs.problems
                else "no WARNING or ERROR line (no failed backend call)"
            )
            lines.append(
                f"- The `{kind}` gateways' logs (all scenarios) hold one uvicorn access-log line per "
                f"request ({logs.requests} requests), {extra}, and {problems}."
            )
        fallbacks = sum(n for lv in levels for b, n in lv.served(kind).items() if b != "small")
        if fallbacks:
            lines.append(f"- **The `{kind}` gateway answered {fallbacks} requests from a fallback backend.**")
    lines += reconnect_notes(levels)
    for delay, p in probes.items():
        answers = {t: (info["status"], info["content"]) for t, info in p.items()}
        if len(set(answers.values())) == 1 and all(s == 200 for s, _ in answers.values()):
            lines.append(
                f"- Response check ({scenario_name(delay)}): all three targets returned the same answer with "
                "status 200."
            )
        else:
            lines.append(f"- **Response check ({scenario_name(delay)}): the targets differ**: {answers}.")
        keys = {t: set(info["keys"]) for t, info in p.items()}
        for kind in KINDS:
            added, dropped = keys[kind] - keys["direct"], keys["direct"] - keys[kind]
            if added or dropped:
                lines.append(
                    f"- The `{kind}` gateway's response fields differ from the stand-in's: added "
                    f"{sorted(added) or 'none'}, dropped {sorted(dropped) or 'none'}."
                )
    for lv in levels:
        for target in TARGETS:
            total = lv.errors(target)
            if total:
                samples: dict[str, str] = {}
                for r in lv.rounds[target]:
                    for kind, sample in r.error_samples.items():
                        samples.setdefault(kind, sample)
                lines.append(
                    f"- **Errors on `{target}` ({lv.label})**: {error_text(total)}; first of each: "
                    + "; ".join(f"{k}: `{v}`" for k, v in samples.items())
                )
    if not any(lv.errors(t) for lv in levels for t in TARGETS):
        lines.append("- No request failed on any target in any round.")
    return [*lines, ""]


def comparison_notes(levels: list[Level]) -> list[str]:
    """Is `client: http` better than `client: litellm` everywhere? Every level where it is not, in bold."""
    worse = []
    for lv in levels:
        checks = [  # (what, http, litellm, higher is better, format)
            ("req/s", lv.rps("http"), lv.rps("litellm"), True, "{:.1f}"),
            (
                "gateway CPU ms/request",
                lv.gateway_cpu_ms("http"),
                lv.gateway_cpu_ms("litellm"),
                False,
                "{:.2f}",
            ),
            ("added p50 ms", lv.added("http", 50), lv.added("litellm", 50), False, "{:.2f}"),
            ("added p99 ms", lv.added("http", 99), lv.added("litellm", 99), False, "{:.2f}"),
        ]
        for what, h, li, higher_better, fmt in checks:
            if (h < li) if higher_better else (h > li):
                rounds = ""
                if what == "req/s":
                    rounds = (
                        f"; per-round ratio http / litellm {spread(lv.round_ratios('http', 'litellm'), 2)}"
                    )
                worse.append(f"{lv.label}: {what} http {fmt.format(h)} vs litellm {fmt.format(li)}{rounds}")
        if lv.errors("http"):
            worse.append(f"{lv.label}: {error_text(lv.errors('http'))} errors on http")
    rps = [lv.rps("http") / lv.rps("litellm") for lv in levels]
    cpu = [lv.gateway_cpu_ms("litellm") / lv.gateway_cpu_ms("http") for lv in levels]
    span = (
        f"req/s http / litellm {min(rps):.2f}x - {max(rps):.2f}x, CPU per request litellm / http "
        f"{min(cpu):.2f}x - {max(cpu):.2f}x"
    )
    if not worse:
        return [
            "- **`client: http` (aiohttp) is ahead of `client: litellm` at every level of every scenario** "
            f"on req/s, gateway CPU per request, added p50 and added p99, with no errors ({span})."
        ]
    return [
        f"- Across all levels: {span}. **Where `client: http` is not ahead of `client: litellm`:** "
        + "; ".join(worse)
        + "."
    ]


def delay_notes(levels: list[Level]) -> list[str]:
    """With a backend delay: how close each target gets to c / delay, and what the gateways spend on it."""
    lines = []
    for lv in levels:
        if not lv.delay_ms:
            continue
        parts = []
        for kind in KINDS:
            busy = lv.rps(kind) * lv.gateway_cpu_ms(kind) / 1000.0
            parts.append(
                f"`{kind}` {100 * lv.rps(kind) / lv.bound_rps:.0f}% of it, using {busy:.2f} core-seconds per "
                f"second (req/s x CPU/request; its CPU per request caps one event loop at "
                f"~{1000 / lv.gateway_cpu_ms(kind):.0f} req/s on a free core)"
            )
        lines.append(
            f"- {lv.label}: the bound is c / delay = {lv.bound_rps:.0f} req/s; direct reaches "
            f"{100 * lv.rps('direct') / lv.bound_rps:.0f}% of it, " + "; ".join(parts) + "."
        )
    return lines


def header_notes(levels: list[Level], profiles: dict[tuple[float, int, str], Profile]) -> list[str]:
    """Does x-icgate-overhead-ms tell what the gateway costs? Per client: header vs CPU and added latency."""
    lines = []
    for kind in KINDS:
        cells = []
        shares = []
        for lv in levels:
            head, cpu, added = header_p50(lv, kind), lv.gateway_cpu_ms(kind), lv.added(kind, 50)
            shares.append(head / cpu)
            cells.append(f"{lv.label} {f2(head)} / {cpu:.2f} / {f2(added)}")
        verdict = (
            "**it under-reports at every level**"
            if max(shares) < 0.5
            else "it is close to the CPU cost everywhere"
            if min(shares) >= 0.7
            else "it under-reports at some levels"
        )
        low = min(levels, key=lambda lv: (lv.delay_ms, lv.concurrency))
        missed = low.added(kind, 50) - header_p50(low, kind)
        prof = [
            f"{100 * p.call_ms / p.cycle_ms:.0f}% of the event loop's request cycle ({p.call_ms:.2f} of "
            f"{p.cycle_ms:.2f} ms/request under cProfile, {scenario_name(d)}, c={c})"
            for (d, c, k), p in profiles.items()
            if k == kind
        ]
        lines.append(
            f"- **Header check, `client: {kind}`** (self-reported p50 / gateway CPU ms per request / added "
            f"p50, ms): "
            + "; ".join(cells)
            + f". The header shows {100 * min(shares):.0f}%"
            + (f" - {100 * max(shares):.0f}%" if round(100 * max(shares)) != round(100 * min(shares)) else "")
            + f" of the CPU the gateway spends per request: {verdict}. At "
            f"{low.label} (no queueing) it misses {missed:.2f} ms of the {f2(low.added(kind, 50))} ms added "
            "p50."
            + (
                " The backend call it books as backend time (`Transport.send`, client library included) is "
                + "; ".join(prof)
                + ", and uvicorn/FastAPI work outside the pipeline is not counted either."
                if prof
                else ""
            )
        )
    top = max(levels, key=lambda lv: (lv.concurrency, lv.delay_ms))
    lines.append(
        f"- Under load the header is no latency measure for either client: at {top.label} "
        + "; ".join(
            f"`{k}` self-reports p50 {f2(header_p50(top, k))} ms against {f2(top.added(k, 50))} ms added"
            for k in KINDS
        )
        + ". A request whose backend call is pending while the event loop is busy with other requests "
        "books that wait as backend time."
    )
    return lines


def reconnect_notes(levels: list[Level]) -> list[str]:
    """Rounds in which a gateway had to rebuild its connection pool to the stand-in, against the others."""
    lines = []
    for lv in levels:
        for kind in KINDS:
            rounds = lv.rounds[kind]
            threshold = max(4, lv.concurrency // 8)
            churn = [r for r in rounds if r.new_conns.get(kind, 0) >= threshold]
            calm = [r for r in rounds if r not in churn]
            if not churn or not calm:
                continue

            def cpu(rs: list[Round], kind: str = kind) -> float:
                return statistics.median(1000 * r.cpu_s[kind] / max(1, r.ok) for r in rs)

            lines.append(
                f"- {lv.label}, `{kind}`: {len(churn)} of {len(rounds)} rounds opened at least "
                f"{threshold} new connections to the stand-in (median "
                f"{statistics.median(r.new_conns[kind] for r in churn):.0f}): in those the gateway's own CPU "
                f"was {cpu(churn):.2f} ms/request and {statistics.median(r.rps for r in churn):.0f} req/s "
                f"(p99 up to {max(pct(r.latencies_ms, 99) for r in churn):.0f} ms), in the other rounds "
                f"{cpu(calm):.2f} ms/request and {statistics.median(r.rps for r in calm):.0f} req/s "
                "(medians)."
            )
    if lines:
        lines.append(
            "- Why pools get rebuilt: the stand-in (uvicorn, default `timeout_keep_alive` 5 s, like any "
            "uvicorn-served backend) closes keep-alive connections idle for 5 s, and a gateway idles while "
            "the other targets are loaded. The next round starts with a burst of `concurrency` requests and "
            "fewer reusable connections, so the pool opens new ones (the *Rounds* table counts those still "
            "open at the end; the TIME_WAIT column hints at more opened and closed within the round). "
            "Pooled figures mix both kinds of round; the per-round medians are the steadier comparison."
        )
    return lines


# --- main -----------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    info = machine(args.code_label)
    levels: list[Level] = []
    probes: dict[float, dict[str, dict[str, Any]]] = {}
    profiles: dict[tuple[float, int, str], Profile] = {}
    log_counts: dict[str, LogCounts] = {kind: LogCounts() for kind in KINDS}
    scenarios: list[tuple[float, list[int]]] = [(0.0, args.concurrency)]
    if args.backend_delay_ms > 0 and args.delay_concurrency:
        scenarios.append((args.backend_delay_ms, args.delay_concurrency))
    with tempfile.TemporaryDirectory(prefix="icgate-overhead-") as tmp:
        workdir = Path(tmp)
        for delay_ms, concurrencies in scenarios:
            with servers(workdir, delay_ms=delay_ms) as (standin, gateways):
                await wait_all_ready(standin, gateways)
                print(
                    f"{scenario_name(delay_ms)}: stand-in {standin.url} (pid {standin.popen.pid}), "
                    + ", ".join(f"{k} gateway {g.url} (pid {g.popen.pid})" for k, g in gateways.items())
                    + f" ready after {time.monotonic() - t0:.1f}s",
                    flush=True,
                )
                probes[delay_ms] = await probe(standin, gateways)
                for target, p in probes[delay_ms].items():
                    print(f"  probe {target:<7} {p['status']} {p['content']!r}", flush=True)
                for concurrency in concurrencies:
                    levels.append(
                        await measure_level(
                            standin,
                            gateways,
                            concurrency,
                            delay_ms,
                            args.requests_per_round,
                            args.rounds,
                            args.max_round_s,
                        )
                    )
                    for proc in (standin, *gateways.values()):
                        if proc.popen.poll() is not None:
                            raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
            for kind, gw in gateways.items():
                log_counts[kind].add(gw.log_path)
        if args.profile_requests > 0:
            runs = [(0.0, args.profile_concurrency)]
            if args.backend_delay_ms > 0 and args.profile_delay_concurrency > 0:
                runs.append((args.backend_delay_ms, args.profile_delay_concurrency))
            for delay_ms, conc in runs:
                print(
                    f"profiling separate gateway runs under cProfile ({scenario_name(delay_ms)}) ...",
                    flush=True,
                )
                profs = await profile_gateways(workdir, args.profile_requests, conc, delay_ms)
                for kind, path in profs.items():
                    profiles[(delay_ms, conc, kind)] = profile_summary(path, args.profile_requests)
    elapsed = time.monotonic() - t0
    info["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_report(args.out, args, info, levels, started, elapsed, probes, profiles, log_counts)
    print("\n".join(summary_table(levels)))
    print()
    print("\n".join(speedup_table(levels)))
    print(f"report: {args.out} ({elapsed:.0f} s)")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests-per-round", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per target (direct, litellm, http)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16, 64], help="zero-latency scenario"
    )
    parser.add_argument(
        "--backend-delay-ms",
        type=float,
        default=100.0,
        help="the second scenario's stand-in delay per request; 0 skips that scenario",
    )
    parser.add_argument(
        "--delay-concurrency", type=int, nargs="*", default=[16, 64], help="delayed-backend scenario"
    )
    parser.add_argument("--max-round-s", type=float, default=30.0, help="a round stops after this long")
    parser.add_argument("--profile-requests", type=int, default=500, help="0 skips the cProfile runs")
    parser.add_argument("--profile-concurrency", type=int, default=16, help="zero-latency cProfile run")
    parser.add_argument(
        "--profile-delay-concurrency", type=int, default=64, help="delayed-backend cProfile run; 0 skips it"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.md")
    parser.add_argument("--code-label", help="describe the code measured (default: git commit of the repo)")
    args = parser.parse_args(argv)
    concurrencies = [*args.concurrency, *args.delay_concurrency]
    if args.requests_per_round < 1 or args.rounds < 1 or min(concurrencies) < 1 or args.backend_delay_ms < 0:
        parser.error(
            "--requests-per-round, --rounds and --concurrency must be positive, the delay not negative"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PROFILED_FLAG]:  # internal: the profiled gateway subprocess
        return serve_profiled(argv[1], argv[2:])
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
