"""Where the gateway's time goes under load: CPU and run-queue wait per thread, and the machine's idle share.

`bench/fullpath.py` says how fast the full path is; this says why. It starts the stand-in and one
`icgate serve` with the same policy as fullpath.py's `icgate` (plus `--policy-override`), fills the cache
with the same warm-up, then sends new Quora questions at one concurrency in closed-loop rounds. For each
round it reads, from /proc, every gateway thread's time on a core and time runnable but waiting for one
(`/proc/<pid>/task/<tid>/schedstat`), and the machine's idle share (`/proc/stat`). Threads are named by
`py-spy dump` (a dev dependency; without it, or without the right to attach, they are listed by id):
the event loop is `MainThread`, the embedder `icgate-embed_0`, the verifier `icgate-verify_N`, vector
searches `icgate-search_N`; `asyncio_N` are the default executor (database writes, scrubbing).

    .venv/bin/python bench/fullpath_threads.py   # -> bench/results/fullpath_threads.md (~2 minutes)

A thread's "waits" is time it could have run and did not get a core: with two cores shared by the
event loop, the model threads, the client and the stand-in, that, not the GIL, is most of a request's
queueing at 16 clients (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fullpath import (  # noqa: E402
    QQP,
    WORKLOADS,
    Feed,
    Pool,
    load_questions,
    parse_override,
    proc_target,
    run_round,
    spawn_gateway,
    warm_up,
)
from bench.harness import free_port  # noqa: E402
from bench.overhead import load_connector, machine, pct, spawn, stop, wait_ready  # noqa: E402

Times = dict[int, tuple[float, float]]  # tid -> (seconds on a core, seconds waiting for one)


def thread_times(pid: int) -> Times:
    out: Times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run_ns, wait_ns, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[int(tid)] = (run_ns / 1e9, wait_ns / 1e9)
    return out


def idle_and_total() -> tuple[int, int]:
    """Idle (with iowait) and all jiffies of the whole machine, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from `py-spy dump` (empty if it is missing or may not attach)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_dump(dump.stdout)


def parse_dump(text: str) -> dict[int, str]:
    """`Thread 27046 (idle): "MainThread"` lines of a `py-spy dump`, as {27046: "MainThread"}."""
    return {int(t): name for t, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', text, re.M)}


def group(name: str | None) -> str:
    if name is None:
        return "native threads (onnxruntime, OpenMP, ...)"
    if re.fullmatch(r"(asyncio|uvloop)_\d+", name):
        return "default executor (database writes, scrubbing)"
    return name


async def measure(args: argparse.Namespace, workdir: Path) -> tuple[str, list[str], dict[str, list[float]]]:
    """The gateway's command, a table row per round, and each thread group's (cores, waits)."""
    pool = Pool(load_questions(QQP, args.seed))
    sport = free_port()
    standin = spawn("standin", ["-m", "bench.standin_backend", "--port", str(sport)], sport, workdir)
    gw, _, command = spawn_gateway("icgate", workdir, standin, [args.policy_override], "")
    rows: list[str] = []
    per_thread: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    wall_total = 0.0
    try:
        await wait_ready(standin, "/healthz", 60)
        await wait_ready(gw, "/readyz", 300)
        target = proc_target(gw, True)
        await warm_up([target], pool.take_many(args.warm))
        names = thread_names(gw.popen.pid)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
            connector=load_connector(args.concurrency), timeout=timeout
        ) as session:
            for i in range(args.rounds):
                feed = Feed(WORKLOADS[0], pool.take, target.history, f"threads-{i}")
                before, (idle0, all0) = thread_times(gw.popen.pid), idle_and_total()
                r = await run_round(session, target, feed, 10**9, args.concurrency, args.round_s)
                after, (idle1, all1) = thread_times(gw.popen.pid), idle_and_total()
                wall_total += r.wall_s
                for tid, (on, waited) in after.items():
                    on0, waited0 = before.get(tid, (0.0, 0.0))
                    sums = per_thread[group(names.get(tid))]
                    sums[0] += on - on0
                    sums[1] += waited - waited0
                rows.append(
                    f"| {i + 1} | {r.ok} | {r.rps:.1f} | {pct(r.latencies_ms, 50):.1f} | "
                    f"{pct(r.latencies_ms, 99):.1f} | {r.cpu_s / r.wall_s:.2f} | "
                    f"{(idle1 - idle0) / max(1, all1 - all0):.2f} | {r.skipped} |"
                )
                print(rows[-1], flush=True)
    finally:
        stop(gw)
        stop(standin)
    return command, rows, {k: [v[0] / wall_total, v[1] / wall_total] for k, v in per_thread.items()}


def report(
    args: argparse.Namespace,
    info: dict[str, str],
    command: str,
    rows: list[str],
    threads: dict[str, list[float]],
    took_s: float,
) -> str:
    lines = [
        "# Where the gateway's time goes under load, per thread",
        "",
        f"Generated by `bench/fullpath_threads.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in "
        f"{took_s:.0f} s.",
        "",
        f"- Command: `python bench/fullpath_threads.py --concurrency {args.concurrency} "
        f"--rounds {args.rounds} --round-s {args.round_s:g} --warm {args.warm}`",
        f"- Gateway: `{command}` (fullpath.py's `icgate` policy); new Quora questions, closed loop",
        *(f"- {k}: {v}" for k, v in info.items()),
        "- loadavg_after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "- Method: the module's docstring.",
        "",
        f"## Rounds at concurrency {args.concurrency}",
        "",
        "| round | answered | req/s | p50 ms | p99 ms | gateway cores (all threads) | machine idle share "
        "| skipped the embedder or verifier |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "## Per thread, over all rounds",
        "",
        "Cores: seconds on a core per second of wall time. Waits: seconds runnable but without a core, "
        "per second.",
        "",
        "| thread | cores | waits |",
        "| --- | ---: | ---: |",
    ]
    for name, (on, waited) in sorted(threads.items(), key=lambda kv: -kv[1][0]):
        if on >= 0.005 or waited >= 0.005:
            lines.append(f"| {name} | {on:.2f} | {waited:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=10.0, help="seconds of load per round")
    parser.add_argument("--warm", type=int, default=2000, help="questions in the cache before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-override", type=str, default="{}", help="JSON merged into the policy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fullpath_threads.md")
    args = parser.parse_args(argv)
    args.policy_override = parse_override(args.policy_override)
    t0, info = time.monotonic(), machine(None)
    with tempfile.TemporaryDirectory(prefix="icgate-threads-") as tmp:
        command, rows, threads = asyncio.run(measure(args, Path(tmp)))
    args.out.write_text(report(args, info, command, rows, threads, time.monotonic() - t0))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
