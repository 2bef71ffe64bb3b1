"""What a change did to the gateway's cost per request: the code at a git revision beside the working tree.

Both gateways run as `icgate serve` processes in front of one zero-latency stand-in, with the same
policy, and are loaded in interleaved rounds (as in `bench/overhead.py`, whose process and load helpers
this reuses), so drift of the shared machine hits both alike. Three paths:

- **pass-through**: `model: small`, cache off (the path of every request that names a backend);
- **full**: `model: auto`, cache on with the learned router, a new question in every request, so
  each one is embedded, looked up (exact, retrieve, verify when a candidate is close), routed,
  admitted, answered by the backend, recorded and stored;
- **named**: `model: small` with the cache on as the default policy has it (`cache.named_backends:
  exact`), a new question in every request: an exact lookup, the backend, and the answer embedded and
  stored after the response.

    .venv/bin/python bench/change_cost.py --before c325b83    # -> bench/results/change_cost.md

The revision is checked out into a temporary git worktree and run with this virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cache_entries, cli_module, free_port, gateway_engine, worktree  # noqa: E402
from bench.overhead import (  # noqa: E402
    CHAT_PATH,
    STANDIN,
    Proc,
    Round,
    load_connector,
    machine,
    pct,
    run_round,
    spawn,
    stop,
    wait_ready,
    write_policy,
)

VERSIONS = ("before", "after")
TARGETS = ("direct", *VERSIONS)
TOPICS = ("rivers", "volcanoes", "bread", "chess", "tides", "glaciers", "bees", "comets", "violins", "salt")


def payloads(path: str) -> Callable[[int], bytes]:
    """Request bodies: the same one on the pass-through path; a new question each time on the others
    (`model: small` on the named path)."""
    if path == "pass-through":
        body = json.dumps(
            {"model": "small", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
        ).encode()
        return lambda i: body
    run = dt.datetime.now().strftime("%H%M%S")
    numbers = itertools.count()  # across rounds: a question is never asked twice (the cache would answer)

    def new_question(_: int) -> bytes:
        i = next(numbers)
        topic = TOPICS[i % len(TOPICS)]
        question = f"In two sentences, what should a beginner know about {topic} (question {run}-{i})?"
        return json.dumps(
            {
                "model": "small" if path == "named" else "auto",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 32,
                "temperature": 0,
            }
        ).encode()

    return new_question


@dataclass
class Result:
    path: str
    concurrency: int
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    # Cache entries each version had written by the time it stopped (paths with the cache on).
    stored: dict[str, int] = field(default_factory=dict)
    warmup_ok: dict[str, int] = field(default_factory=dict)

    def latencies(self, target: str) -> list[float]:
        return [x for r in self.rounds[target] for x in r.latencies_ms]

    def ok(self, target: str) -> int:
        return sum(r.ok for r in self.rounds[target])

    def errors(self, target: str) -> int:
        return sum(r.n_errors for r in self.rounds[target])

    def gateway_cpu_ms(self, version: str) -> float:
        """The gateway process's own CPU per answered request."""
        return 1000.0 * sum(r.cpu_s[version] for r in self.rounds[version]) / max(1, self.ok(version))

    def added(self, version: str, q: float) -> float:
        return pct(self.latencies(version), q) - pct(self.latencies("direct"), q)


def client_said(client: str) -> str:
    if client == "default":
        return "with no `client:` in the policy (each version's own default)"
    return f"`client: {client}`"


async def measure(
    path: str, concurrency: int, before_tree: Path, workdir: Path, args: argparse.Namespace
) -> Result:
    result = Result(path, concurrency)
    procs: list[Proc] = []
    try:
        sport = free_port()
        standin = spawn(
            f"{STANDIN}-{path}", ["-m", "bench.standin_backend", "--port", str(sport)], sport, workdir
        )
        procs.append(standin)
        gateways: dict[str, Proc] = {}
        for version in VERSIONS:
            port = free_port()
            policy = workdir / f"policy-{path}-{version}.yaml"
            cached = path != "pass-through"  # the cache and its models: on for the full and named paths
            write_policy(
                policy,
                standin.url,
                "" if args.client == "default" else args.client,
                embedding={"preload": cached},
                cache={"enabled": cached},
                router={"kind": "learned" if cached else "rule"},
            )
            cwd = before_tree if version == "before" else ROOT
            cli = [
                "-m",
                cli_module(cwd),
                "serve",
                "--policy",
                str(policy),
                "--port",
                str(port),
                "--data-dir",
                str(workdir / f"data-{path}-{version}-c{concurrency}"),
                "--no-launch",
            ]
            gateways[version] = spawn(f"gateway-{path}-{version}-c{concurrency}", cli, port, workdir, cwd=cwd)
            procs.append(gateways[version])
        await wait_ready(standin, "/healthz", 60)
        await asyncio.gather(*(wait_ready(gw, "/readyz", 240) for gw in gateways.values()))
        pids = {STANDIN: standin.popen.pid, **{v: gw.popen.pid for v, gw in gateways.items()}}
        urls = {"direct": standin.url + CHAT_PATH, **{v: gw.url + CHAT_PATH for v, gw in gateways.items()}}
        make = payloads(path)
        timeout = aiohttp.ClientTimeout(total=60)
        async with contextlib.AsyncExitStack() as stack:
            sessions = {
                t: await stack.enter_async_context(
                    aiohttp.ClientSession(connector=load_connector(concurrency), timeout=timeout)
                )
                for t in TARGETS
            }
            for t in TARGETS:  # warm-up
                warm = await run_round(
                    sessions[t], urls[t], t, max(60, 4 * concurrency), concurrency, 30, pids, payloads=make
                )
                result.warmup_ok[t] = warm.ok
            orders = [TARGETS, TARGETS[::-1], ("before", "direct", "after"), ("after", "direct", "before")]
            per_round = args.full_requests if path == "full" else args.requests
            for i in range(args.rounds):
                for t in orders[i % len(orders)]:
                    r = await run_round(
                        sessions[t], urls[t], t, per_round, concurrency, 60, pids, payloads=make
                    )
                    result.rounds[t].append(r)
                    cpu = f" cpu {1000 * r.cpu_s[t] / max(1, r.ok):.2f} ms/req" if t in VERSIONS else ""
                    print(
                        f"  {path:<12} c={concurrency:<3} round {i + 1}/{args.rounds} {t:<6} {r.ok:4d} ok "
                        f"{r.n_errors:3d} err p50 {pct(r.latencies_ms, 50):7.2f} "
                        f"p99 {pct(r.latencies_ms, 99):7.2f}{cpu}",
                        flush=True,
                    )
    finally:
        for proc in reversed(procs):
            stop(proc)
    if path != "pass-through":
        for version in VERSIONS:
            result.stored[version] = stored_answers(workdir / f"data-{path}-{version}-c{concurrency}")
    return result


def stored_answers(data_dir: Path) -> int:
    """Cache entries in a stopped gateway's database (it writes what is pending before it exits)."""
    if not (data_dir / "icgate.db").exists():
        return 0
    engine = gateway_engine(data_dir)
    try:
        return cache_entries(engine)
    finally:
        engine.dispose()


def _stored(r: Result) -> str:
    """Answers stored over answered requests (warm-up included), before -> after."""
    if not r.stored:
        return "-"
    answered = {v: r.ok(v) + r.warmup_ok.get(v, 0) for v in VERSIONS}
    return " -> ".join(f"{r.stored[v]} / {answered[v]}" for v in VERSIONS)


def report(results: list[Result], rev: str, args: argparse.Namespace, took_s: float) -> str:
    info = machine(None)
    lines = [
        f"# What the change since `{rev}` did to the gateway's cost per request",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} (run took {took_s:.0f} s)",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- command: `.venv/bin/python bench/change_cost.py --before {rev} --paths {' '.join(args.paths)} "
        f"--rounds {args.rounds} "
        f"--requests {args.requests} --full-requests {args.full_requests} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --client {args.client}`",
        "- method: `bench/change_cost.py`'s docstring. *before* is the gateway at that revision, *after* the "
        f"working tree; both {client_said(args.client)} in front of one zero-latency stand-in, loaded in "
        "interleaved rounds. "
        "CPU is the gateway process's own (from /proc), per answered request. *Added* is the gateway's "
        "latency percentile minus the stand-in's own (direct).",
        "",
        "| path | concurrency | CPU ms/req before | after | after / before | added p50 ms before -> after "
        "| added p99 ms before -> after | p99 ms before -> after | errors before / after "
        "| answers stored / answered, before -> after |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cb, ca = r.gateway_cpu_ms("before"), r.gateway_cpu_ms("after")
        lines.append(
            f"| {r.path} | {r.concurrency} | {cb:.2f} | {ca:.2f} | **{ca / cb:.2f}x** | "
            f"{r.added('before', 50):.2f} -> {r.added('after', 50):.2f} | "
            f"{r.added('before', 99):.2f} -> {r.added('after', 99):.2f} | "
            f"{pct(r.latencies('before'), 99):.2f} -> {pct(r.latencies('after'), 99):.2f} | "
            f"{r.errors('before')} / {r.errors('after')} | {_stored(r)} |"
        )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    started = dt.datetime.now()
    results = []
    with worktree(args.before) as tree, tempfile.TemporaryDirectory(prefix="icgate-cost-") as tmp:
        for path in args.paths:
            for concurrency in args.concurrency:
                results.append(await measure(path, concurrency, tree, Path(tmp), args))
    text = report(results, args.before, args, (dt.datetime.now() - started).total_seconds())
    args.out.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="the git revision to compare the working tree with")
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["pass-through", "full"],
        choices=["pass-through", "full", "named"],
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument(
        "--client",
        default="http",
        choices=["http", "litellm", "default"],
        help="the backends' client in both policies; `default`: none named, each version's own default",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--requests", type=int, default=1000, help="pass-through and named requests per round and target"
    )
    parser.add_argument(
        "--full-requests", type=int, default=100, help="full-path requests per round and target"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "change_cost.md")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
