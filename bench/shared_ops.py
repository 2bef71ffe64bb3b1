"""How many requests one Redis serves: slot take-and-give-back pairs per second through
`gateway.backends.shared.SharedSlots`, from several client processes at once (as several replicas would
send them), against the Redis on 127.0.0.1:6379.

    .venv/bin/python bench/shared_ops.py                      # 1, 2 and 4 processes, 64 tasks each
    .venv/bin/python bench/shared_ops.py --processes 4 --seconds 10

Each pair is what a request costs Redis for its backend slot: one Lua script to take it, one to give it
back (with a publish). Redis's own CPU over the window is read from `INFO cpu`, so the report says how
much of one Redis core a pair costs, apart from the clients (which share this machine's two cores).
Writes bench/results/shared_ops.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from redis import Redis  # noqa: E402

from icgate.gateway.backends.shared import SharedSlots  # noqa: E402

REDIS_URL = os.environ.get("ICGATE_REDIS_URL", "redis://127.0.0.1:6379/0")


async def pairs(prefix: str, tasks: int, seconds: float) -> int:
    slots = SharedSlots.from_url(REDIS_URL, prefix)
    done = 0
    stop = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            owner = slots.new_owner()
            if await slots.try_acquire(f"b{i % 4}", 1_000_000, owner, 0.0):
                await slots.release(f"b{i % 4}", owner)
                done += 1

    await asyncio.gather(*(worker(i) for i in range(tasks)))
    await slots.client.aclose()
    return done


def child(prefix: str, tasks: int, seconds: float, out: multiprocessing.Queue[int]) -> None:
    out.put(asyncio.run(pairs(prefix, tasks, seconds)))


def redis_cpu_s(client: Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run(processes: int, tasks: int, seconds: float) -> dict[str, float]:
    prefix = f"icgate-bench-{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(REDIS_URL)
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=child, args=(prefix, tasks, seconds, queue)) for _ in range(processes)
    ]
    cpu0 = redis_cpu_s(client)
    t0 = time.monotonic()
    for proc in procs:
        proc.start()
    total = sum(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    wall = time.monotonic() - t0
    cpu = redis_cpu_s(client) - cpu0
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()
    return {
        "processes": processes,
        "pairs": total,
        "pairs_s": total / seconds,
        "redis_cpu_s": cpu,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shared_ops.md")
    args = p.parse_args(argv)
    results = []
    for n in (int(x) for x in args.processes.split(",")):
        results.append(run(n, args.tasks, args.seconds))
        print(json.dumps(results[-1]), flush=True)
    version = Redis.from_url(REDIS_URL).info("server")["redis_version"]
    lines = [
        "# Shared state: slot take-and-give-back pairs per second through one Redis",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs; {platform.platform()}; load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the clients and Redis share these cores)",
        f"- Redis {version} on 127.0.0.1; command: "
        f"`.venv/bin/python bench/shared_ops.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- each client process runs {args.tasks} tasks for {args.seconds:g} s, each task taking a slot and "
        "giving it back in a loop (two Lua scripts and a publish: what a request costs Redis)",
        "",
        "| client processes | pairs/s | Redis CPU s over the run | Redis CPU per pair (us) "
        "| pairs/s per Redis core |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_pair = r["redis_cpu_s"] / r["pairs"] * 1e6 if r["pairs"] else float("nan")
        lines.append(
            f"| {r['processes']:.0f} | {r['pairs_s']:,.0f} | {r['redis_cpu_s']:.2f} | {per_pair:.1f} "
            f"| {1e6 / per_pair:,.0f} |"
        )
    lines += [
        "",
        "*pairs/s* is bounded by the clients here (Python, on the same two cores as Redis); "
        "*pairs/s per Redis core* is what Redis's own CPU per pair allows: the ceiling one Redis puts on "
        "requests a second across all replicas (before rate-limit and budget calls, which cost about as "
        "much again).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
