"""The in-process middleware against the same pipeline over HTTP, and against no gateway at all.

Three targets, each driven by the official `openai.AsyncOpenAI` client in a process of its own, all in front
of the same stand-in backend (bench/standin_backend.py, a separate process that answers at once):

- `direct`: the client talks to the stand-in;
- `inprocess`: the client is wrapped by `icgate.Gateway` (`async with`), which runs in the client's process;
- `http`: the client talks to `icgate serve` (a separate process) on loopback.

Both gateways get the same policy. Two scenarios, each with its own gateways:

- `proxy`: the gateway as a proxy (cache off, requests name the backend `small`): what the hop costs
  beside authentication, admission and the request log;
- `full`: the default policy (int8 embedder, semantic cache with its verifier, learned router), requests
  routed (`model: auto`) with distinct real Quora questions (../shared/data/cache/qqp_pairs.jsonl.gz); each
  gateway first answers `--warm` other questions so that retrieval has entries to find.

Rounds interleave the three targets, rotating their order, at concurrency 1 and 16. Per target: client-side
latency p50/p99, the added p50/p99 (minus `direct`'s), and CPU per request: the client process's own CPU
(`time.process_time`, every thread, so an in-process gateway's embedder counts) plus, for `http`, the
gateway process's (/proc). Added CPU is that minus `direct`'s. The issue's target: the in-process path adds
at least 3x less CPU per request than the HTTP path.

Also, at concurrency 1: streams whose backend pauses `--chunk-gap-ms` before each word; the gaps between
chunks as the client sees them show whether a path delivers chunks as they come or buffers them.

Run:  .venv/bin/python bench/middleware.py                    (about 6 minutes on 2 cores)
      .venv/bin/python bench/middleware.py --quick --out /tmp/middleware.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fullpath import QQP, load_questions  # noqa: E402
from bench.harness import free_port  # noqa: E402
from bench.overhead import Proc, cpu_seconds, machine, pct, spawn, stop, wait_ready, write_policy  # noqa: E402

TARGETS = ("direct", "inprocess", "http")
MODELS = {"proxy": "small", "full": "auto"}
FULL = {"levels": [1, 16], "rounds": 4, "requests_per_round": 200, "warm": 500}
QUICK = {"levels": [1, 16], "rounds": 2, "requests_per_round": 60, "warm": 100}
STREAMS = 20  # streamed requests per target, at concurrency 1


# --- the client worker: one process per target -----------------------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    """Reads one JSON command per line on stdin, answers one JSON line on stdout."""
    import httpx
    import openai

    import icgate

    async with contextlib.AsyncExitStack() as stack:
        if args.worker == "inprocess":
            gw = await stack.enter_async_context(
                icgate.Gateway(args.policy, args.data_dir, launch_local=False)
            )
            client = gw.wrap(openai.AsyncOpenAI(api_key="unused", max_retries=0))
        else:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            http = httpx.AsyncClient(limits=limits)
            client = openai.AsyncOpenAI(
                api_key="unused", base_url=args.url + "/v1", max_retries=0, http_client=http
            )
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            runner = run_streams if command.get("stream") else run_load
            print(json.dumps(await runner(client, command)), flush=True)


async def run_load(client: Any, command: dict[str, Any]) -> dict[str, Any]:
    questions: list[str] = command["questions"]
    latencies: list[float] = []
    routes: dict[str, int] = {}
    errors: dict[str, int] = {}
    queue = iter(questions)

    async def one(question: str) -> None:
        started = time.perf_counter()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=command["model"], messages=[{"role": "user", "content": question}]
            )
            raw.parse()
        except Exception as exc:  # counted, shown in the report
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        latencies.append((time.perf_counter() - started) * 1000)
        route = raw.headers.get("x-icgate-cache-skipped") or raw.headers.get("x-icgate-route") or "-"
        routes[route] = routes.get(route, 0) + 1

    async def loop() -> None:
        for question in queue:
            await one(question)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(command["concurrency"])))
    return {
        "latencies": latencies,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "routes": routes,
        "errors": errors,
    }


async def run_streams(client: Any, command: dict[str, Any]) -> dict[str, Any]:
    """Streams one at a time; the gaps between chunks as they reach the caller."""
    gaps: list[float] = []
    firsts: list[float] = []
    for question in command["questions"]:
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model=command["model"],
            messages=[{"role": "user", "content": question}],
            stream=True,
            extra_body={"x_standin": {"chunk_gap_ms": command["gap_ms"]}},
        )
        last = None
        async for chunk in stream:
            now = time.perf_counter()
            if not chunk.choices or not chunk.choices[0].delta.content:
                continue
            if last is None:
                firsts.append((now - started) * 1000)
            else:
                gaps.append((now - last) * 1000)
            last = now
    return {"gaps": gaps, "firsts": firsts}


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    popen: subprocess.Popen[str]
    serving_pid: int | None = None  # `http`: the gateway process, whose CPU counts too

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(command) + "\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited with {self.popen.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


def start_worker(name: str, workdir: Path, extra: list[str]) -> Worker:
    log = (workdir / f"worker-{name}.log").open("w")
    popen = subprocess.Popen(
        [sys.executable, str(Path(__file__)), "--worker", name, *extra],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    worker = Worker(name, popen)
    assert popen.stdout is not None
    ready = popen.stdout.readline()
    if not ready:
        raise RuntimeError(f"worker {name} failed to start: see {log.name}")
    return worker


def policy_file(workdir: Path, scenario: str, standin_url: str) -> Path:
    """overhead.write_policy's two backends on the stand-in; `full` restores the default cache and router."""
    path = workdir / f"policy-{scenario}.yaml"
    if scenario == "proxy":
        write_policy(path, standin_url, "")
        return path
    write_policy(
        path, standin_url, "", router={"kind": "learned", "default_tier": "small", "large_tier": "large"}
    )
    policy = yaml.safe_load(path.read_text())
    for section in ("cache", "embedding"):  # back to the defaults: the full path
        policy.pop(section)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def data_dir(workdir: Path, name: str) -> Path:
    """A fresh data directory whose exported models are the checkout's (`make install` prepared them)."""
    path = workdir / f"data-{name}"
    path.mkdir()
    prepared = ROOT / "data" / "models"
    if prepared.is_dir():
        (path / "models").symlink_to(prepared)
    return path


@dataclass
class Cell:
    scenario: str
    concurrency: int
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {t: [] for t in TARGETS})

    def latencies(self, target: str) -> list[float]:
        return [x for r in self.rounds[target] for x in r["latencies"]]

    def count(self, target: str) -> int:
        return sum(len(r["latencies"]) + sum(r["errors"].values()) for r in self.rounds[target])

    def cpu_ms(self, target: str) -> float:
        return 1000 * sum(r["cpu_s"] for r in self.rounds[target]) / max(1, self.count(target))

    def added_cpu_ms(self, target: str) -> float:
        return self.cpu_ms(target) - self.cpu_ms("direct")

    def rps(self, target: str) -> float:
        return self.count(target) / max(1e-9, sum(r["wall_s"] for r in self.rounds[target]))

    def p(self, target: str, q: float) -> float:
        return pct(self.latencies(target), q)

    def merged(self, target: str, key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rounds[target]:
            for name, n in r[key].items():
                out[name] = out.get(name, 0) + n
        return out


@contextlib.contextmanager
def scenario_processes(workdir: Path, scenario: str, standin: Proc) -> Iterator[dict[str, Worker]]:
    policy = policy_file(workdir, scenario, standin.url)
    port = free_port()
    serve = ["serve", "--policy", str(policy), "--port", str(port), "--no-launch"]
    serve += ["--data-dir", str(data_dir(workdir, f"{scenario}-http"))]
    gateway = spawn(f"icgate-{scenario}", ["-m", "icgate.gateway.cli.main", *serve], port, workdir)
    workers: dict[str, Worker] = {}
    try:
        asyncio.run(wait_ready(gateway, "/readyz", 180))
        workers["direct"] = start_worker("direct", workdir, ["--url", standin.url])
        inprocess = ["--policy", str(policy), "--data-dir", str(data_dir(workdir, f"{scenario}-inprocess"))]
        workers["inprocess"] = start_worker("inprocess", workdir, inprocess)
        workers["http"] = start_worker("http", workdir, ["--url", gateway.url])
        workers["http"].serving_pid = gateway.popen.pid
        yield workers
    finally:
        for w in workers.values():
            if w.popen.stdin:
                w.popen.stdin.close()
            w.popen.wait(60)
        stop(gateway)


def measure(worker: Worker, command: dict[str, Any]) -> dict[str, Any]:
    before = cpu_seconds(worker.serving_pid) if worker.serving_pid else 0.0
    result = worker.ask(command)
    if worker.serving_pid:
        result["cpu_s"] += cpu_seconds(worker.serving_pid) - before
    return result


def run_scenario(
    scenario: str, workers: dict[str, Worker], questions: Iterator[str], settings: dict[str, Any]
) -> tuple[list[Cell], dict[str, dict[str, Any]]]:
    model = MODELS[scenario]

    def take(n: int) -> list[str]:
        return [next(questions) for _ in range(n)]

    if scenario == "full":  # both gateways store the same warm-up answers
        warm = take(settings["warm"])
        for name in ("inprocess", "http"):
            workers[name].ask({"questions": warm, "concurrency": 4, "model": model})
    for w in workers.values():  # connections and code paths warm; not counted
        w.ask({"questions": take(20), "concurrency": 4, "model": model})
    cells = []
    for level in settings["levels"]:
        cell = Cell(scenario, level)
        for i in range(settings["rounds"]):
            order = TARGETS[i % 3 :] + TARGETS[: i % 3]
            for name in order:
                command = {
                    "questions": take(settings["requests_per_round"]),
                    "concurrency": level,
                    "model": model,
                }
                r = measure(workers[name], command)
                cell.rounds[name].append(r)
                print(
                    f"{scenario} c={level} round {i + 1} {name}: {len(r['latencies'])} ok, "
                    f"p50 {pct(r['latencies'], 50):.2f} ms, "
                    f"cpu {1000 * r['cpu_s'] / max(1, len(r['latencies'])):.2f} ms/req",
                    flush=True,
                )
        cells.append(cell)
    streams = {
        name: w.ask(
            {"stream": True, "questions": take(STREAMS), "model": model, "gap_ms": settings["gap_ms"]}
        )
        for name, w in workers.items()
    }
    return cells, streams


# --- the report -----------------------------------------------------------------------------------------


def table(cells: list[Cell]) -> list[str]:
    lines = [
        "| scenario | concurrency | target | req/s | p50 ms | p99 ms | added p50 | added p99 | CPU ms/req "
        "| added CPU ms/req | errors | routes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        for t in TARGETS:
            added = (
                f"{c.p(t, 50) - c.p('direct', 50):.2f} | {c.p(t, 99) - c.p('direct', 99):.2f} | "
                if t != "direct"
                else "- | - | "
            )
            routes = (
                ", ".join(f"{k} {v}" for k, v in sorted(c.merged(t, "routes").items()))
                if t != "direct"
                else "-"
            )
            lines.append(
                f"| {c.scenario} | {c.concurrency} | {t} | {c.rps(t):.1f} | "
                f"{c.p(t, 50):.2f} | {c.p(t, 99):.2f} | "
                + added
                + f"{c.cpu_ms(t):.2f} | {c.added_cpu_ms(t):.2f} | "
                + f"{sum(c.merged(t, 'errors').values())} | {routes} |"
            )
    return lines


def ratio_lines(cells: list[Cell]) -> list[str]:
    lines = [
        "| scenario | concurrency | added CPU, HTTP | added CPU, in-process | HTTP / in-process "
        "| target (>= 3x) |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        http, inproc = c.added_cpu_ms("http"), c.added_cpu_ms("inprocess")
        ratio = http / inproc if inproc > 0 else float("inf")
        lines.append(
            f"| {c.scenario} | {c.concurrency} | {http:.2f} ms | {inproc:.2f} ms | {ratio:.2f}x | "
            f"{'PASS' if ratio >= 3 else 'FAIL'} |"
        )
    return lines


def stream_lines(streams: dict[str, dict[str, dict[str, Any]]], gap_ms: float) -> list[str]:
    lines = [
        "| scenario | target | chunks | gap p10 ms | gap p50 ms | gap p90 ms "
        f"| first chunk p50 ms (backend pauses {gap_ms:g} ms per word) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, per_target in streams.items():
        for t in TARGETS:
            r = per_target[t]
            lines.append(
                f"| {scenario} | {t} | {len(r['gaps']) + len(r['firsts'])} | {pct(r['gaps'], 10):.1f} | "
                f"{pct(r['gaps'], 50):.1f} | {pct(r['gaps'], 90):.1f} | "
                f"{statistics.median(r['firsts']):.1f} |"
            )
    return lines


def write_report(
    path: Path, cells: list[Cell], streams: dict[str, Any], settings: dict[str, Any], argv: list[str]
) -> None:
    env = machine()
    lines = [
        "# In-process middleware vs HTTP vs no gateway",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: "
        f"`.venv/bin/python bench/middleware.py {' '.join(argv)}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        f"Settings: {json.dumps(settings)}. Each target is the official `openai.AsyncOpenAI` client in a "
        "process of its own; `direct` talks to the stand-in, `inprocess` is wrapped by `icgate.Gateway` "
        "(`async with`) "
        "in that process, `http` talks to `icgate serve` on loopback. CPU per request: the client process "
        "(every thread) plus, for `http`, the gateway process. Added: minus `direct`'s. "
        "`proxy`: cache off, `model: small` (named backend); `full`: the default policy, `model: auto`, "
        "distinct Quora questions after a warm-up.",
        "",
        "## Added CPU per request: HTTP vs in-process",
        "",
        *ratio_lines(cells),
        "",
        "## Every cell",
        "",
        *table(cells),
        "",
        "## Streams: gaps between chunks as the client sees them",
        "",
        *stream_lines(streams, settings["gap_ms"]),
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke run (about 2 minutes)")
    parser.add_argument("--scenarios", nargs="+", default=["proxy", "full"], choices=list(MODELS))
    parser.add_argument("--chunk-gap-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "middleware.md")
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker(args))
        return 0
    settings = {**(QUICK if args.quick else FULL), "gap_ms": args.chunk_gap_ms, "scenarios": args.scenarios}
    questions = iter(load_questions(QQP, args.seed))
    cells: list[Cell] = []
    streams: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="icgate-middleware-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        standin = spawn("standin", ["-m", "bench.standin_backend", "--port", str(port)], port, workdir)
        try:
            asyncio.run(wait_ready(standin, "/healthz", 30))
            for scenario in args.scenarios:
                with scenario_processes(workdir, scenario, standin) as workers:
                    found, streams[scenario] = run_scenario(scenario, workers, questions, settings)
                    cells.extend(found)
        finally:
            stop(standin)
    write_report(args.out, cells, streams, settings, sys.argv[1:] if argv is None else argv)
    print("\n".join(ratio_lines(cells)))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
