"""Replicas benchmark: 1, 2 and 4 icgate replicas in front of the same two simulated backends, with and
without shared state (Redis), under the Azure conversation trace at 1.5x the backends' capacity.

    .venv/bin/python bench/replicas.py                       # conv at 1.5x; 1, 2, 4 replicas
    .venv/bin/python bench/replicas.py --replicas 1,2 --duration-s 20

The machinery is the load benchmark's (bench/load.py): the same simulators, capacity measurement,
policy (admission on, the TTFT and TPOT objectives) and open-loop replay. What differs: each run starts N
`icgate serve` processes, and the client spreads the arrivals over them round-robin, as a load balancer
would. Each backend's `max_concurrent` is what one gateway needs to hold the objectives. Without shared
state each replica enforces it on its own, so N replicas let N times as many calls reach a backend; with
shared state (`shared_state.redis_url`) they take slots from one count. Each replica keeps its own SQLite
request log (the cache is off in this policy, so nothing else is shared). A request is good when it
completes with TTFT and TPOT within the objectives; goodput is good requests over the window.
Writes bench/results/replicas.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(REPO))

from bench import load  # noqa: E402
from bench.harness import free_port  # noqa: E402

REDIS_URL = os.environ.get("ICGATE_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Setting:
    replicas: int
    shared: bool

    @property
    def label(self) -> str:
        if self.replicas == 1:
            return "1 replica"
        return f"{self.replicas} replicas, {'shared state (Redis)' if self.shared else 'each counts alone'}"


def policy_for(
    setup: load.TraceSetup, sims: dict[load.Tier, load.Sim], shared: bool, args: argparse.Namespace
) -> dict[str, Any]:
    policy = load.icgate_policy(setup, sims, True, args)
    if shared:
        policy["shared_state"] = {
            "redis_url": REDIS_URL,
            "key_prefix": f"icgate-bench-{uuid.uuid4().hex[:8]}",
        }
    return policy


@contextlib.contextmanager
def serve_replicas(
    setting: Setting,
    setup: load.TraceSetup,
    sims: dict[load.Tier, load.Sim],
    work: Path,
    args: argparse.Namespace,
) -> Iterator[list[load.Managed]]:
    tag = f"r{setting.replicas}-{'shared' if setting.shared else 'alone'}-{uuid.uuid4().hex[:4]}"
    policy = work / f"{tag}.yaml"
    policy.write_text(yaml.safe_dump(policy_for(setup, sims, setting.shared, args), sort_keys=False))
    with contextlib.ExitStack() as stack:
        replicas = []
        for i in range(setting.replicas):
            port = free_port()
            cmd = [str(load.ICGATE), "serve", "--policy", str(policy), "--data-dir", str(work / f"{tag}-{i}")]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-launch"]
            base = f"http://127.0.0.1:{port}"
            replicas.append(
                stack.enter_context(load.Managed("icgate", cmd, base + "/readyz", work / f"{tag}-{i}.log"))
            )
        yield replicas


def url_of(replica: load.Managed) -> str:
    return replica.ready_url.removesuffix("/readyz")


async def peak_running(sims: dict[load.Tier, load.Sim], stop: asyncio.Event) -> dict[str, int]:
    """The most requests each simulator ran at once, sampled every 50 ms from its /metrics."""
    peaks: dict[str, int] = dict.fromkeys(sims, 0)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while not stop.is_set():
            for tier, sim in sims.items():
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(sim.url + "/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("vllm:num_requests_running"):
                            peaks[tier] = max(peaks[tier], int(float(line.rsplit(" ", 1)[1])))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    return peaks


async def measured_replay(
    endpoints: Sequence[load.Endpoint],
    arrivals: Sequence[load.Arrival],
    sims: dict[load.Tier, load.Sim],
    args: argparse.Namespace,
) -> tuple[list[load.Outcome], dict[str, int]]:
    stop = asyncio.Event()
    sampler = asyncio.create_task(peak_running(sims, stop))
    try:
        outcomes = await load.replay(endpoints, arrivals, args.duration_s, args.straggle_s)
    finally:
        stop.set()
    return outcomes, await sampler


def run_setting(
    setting: Setting,
    setup: load.TraceSetup,
    sims: dict[load.Tier, load.Sim],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    arrivals = load.schedule(setup.trace, args.load * setup.total_capacity, args.duration_s)
    started = time.monotonic()
    with serve_replicas(setting, setup, sims, work, args) as replicas:
        endpoints = [load.Endpoint(url_of(r) + "/v1/chat/completions", "auto") for r in replicas]
        for endpoint in endpoints:
            asyncio.run(load.warm_up(endpoint))
        load.wait_idle(list(sims.values()))
        outcomes, peaks = asyncio.run(measured_replay(endpoints, arrivals, sims, args))
    drain_s = load.wait_idle(list(sims.values()))
    key = f"{setting.replicas}-{'shared' if setting.shared else 'alone'}"
    summary = load.summarize(
        outcomes, setup.trace.name, args.load, key, args.duration_s, setup.threshold, args
    )
    load.dump_outcomes(work / f"{key}.jsonl", outcomes)
    return {
        **summary,
        "per_replica": per_replica(outcomes, setting.replicas, args),
        "replicas": setting.replicas,
        "shared": setting.shared,
        "label": setting.label,
        "peak_running": peaks,
        "drain_s": drain_s,
        "wall_s": time.monotonic() - started,
    }


def per_replica(outcomes: Sequence[load.Outcome], n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fairness across replicas: arrival i went to replica i mod n; each replica's share of good answers,
    of refusals, and its TTFT percentiles. With one fair line these match across replicas."""
    slo = args.ttft_slo_ms / 1000
    out = []
    for r in range(n):
        mine = [o for i, o in enumerate(outcomes) if i % n == r]
        done = [o for o in mine if o.completed]
        ttfts = sorted(o.ttft_s for o in done if o.ttft_s is not None)
        good = [o for o in done if (o.ttft_s or 0) <= slo and (o.tpot_s or 0) <= args.tpot_slo_ms / 1000]
        out.append(
            {
                "sent": len(mine),
                "good_share": len(good) / len(mine) if mine else 0.0,
                "refused_share": sum(o.status == 429 for o in mine) / len(mine) if mine else 0.0,
                "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
                "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            }
        )
    return out


def settings_of(text: str) -> list[Setting]:
    out = []
    for n in (int(x) for x in text.split(",") if x.strip()):
        out.append(Setting(n, False))
        if n > 1:
            out.append(Setting(n, True))
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def report(
    results: list[dict[str, Any]], setup: load.TraceSetup, args: argparse.Namespace, took_s: float
) -> str:
    one = next((r for r in results if r["replicas"] == 1), None)
    limits = {t: p.max_concurrent for t, p in setup.plans.items()}
    lines = [
        "# Replicas: 1, 2 and 4 gateways in front of the same backends, with and without shared state",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')} (run took {took_s / 60:.1f} min)",
        f"- machine: {os.cpu_count()} CPUs; {platform.platform()}; load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared, noisy machine: every replica, both "
        "simulators and the client share these cores)",
        f"- code: {load._commit()}",
        f"- command: `.venv/bin/python bench/replicas.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- trace `{setup.trace.name}` at {args.load:g}x the backends' measured capacity "
        f"(C = {setup.total_capacity:.2f} req/s), a {args.duration_s:g} s window, round-robin over "
        "the replicas",
        f"- objectives: TTFT <= {args.ttft_slo_ms:.0f} ms, TPOT <= {args.tpot_slo_ms:.0f} ms; "
        f"`max_concurrent` per backend {limits} (what one gateway needs to hold them)",
        "",
        "| replicas | goodput req/s | good share | p50 TTFT ms | p99 TTFT ms | refused (429) "
        "| late first token | failed | most running at once (small / large) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = r["good"] / r["sent"] if r["sent"] else 0.0
        peaks = r["peak_running"]
        lines.append(
            f"| {r['label']} | {r['goodput_rps']:.2f} | {share:.0%} | {_ms(r['ttft_p50_s'])} "
            f"| {_ms(r['ttft_p99_s'])} "
            f"| {r['refused']} | {r['miss_ttft']} | {r['failed'] + r['timed_out']} "
            f"| {peaks.get('small', 0)} / {peaks.get('large', 0)} |"
        )
    lines += [
        "",
        "## Fairness across replicas",
        "",
        "Arrival i went to replica i mod N. With one fair line across replicas, each replica's requests fare "
        "alike: the same share of good answers and of refusals, the same TTFT.",
        "",
        "| setting | replica | good share | refused share | p50 TTFT ms | p99 TTFT ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["replicas"] == 1:
            continue
        for i, one_replica in enumerate(r["per_replica"]):
            good, refused = one_replica["good_share"], one_replica["refused_share"]
            lines.append(
                f"| {r['label']} | {i} | {good:.0%} | {refused:.0%} "
                f"| {_ms(one_replica['ttft_p50_s'])} | {_ms(one_replica['ttft_p99_s'])} |"
            )
    lines += ["", "## Against one replica, in the same run", ""]
    if one is not None:
        for r in results:
            if r is one:
                continue
            ratio = r["goodput_rps"] / one["goodput_rps"] if one["goodput_rps"] else float("nan")
            p99 = r["ttft_p99_s"] and one["ttft_p99_s"] and r["ttft_p99_s"] / one["ttft_p99_s"]
            lines.append(
                f"- {r['label']}: goodput {ratio:.2f}x one replica's, p99 TTFT "
                f"{'-' if not p99 else f'{p99:.2f}x'}"
            )
    lines += [
        "",
        "The target: with shared state, 4 replicas hold the same backend objectives as 1 (goodput and p99 "
        "TTFT within noise of one replica's). Without it, each replica admits up to `max_concurrent` on its "
        "own, so the backends run more at once than they can serve in time (the last column), and first "
        "tokens come late.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = load.build_parser()
    p.description = __doc__
    p.set_defaults(duration_s=30.0, straggle_s=20.0, out=REPO / "bench" / "results" / "replicas.md")
    p.add_argument("--trace", default="conv")
    p.add_argument("--load", type=float, default=1.5)
    p.add_argument("--replicas", default="1,2,4", help="replica counts; each above 1 runs alone and shared")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="icgate-replicas-") as tmp:
        work = Path(tmp)
        sims = {t: load.start_sim(t, work) for t in load.TIERS}
        try:
            setup = load.prepare_trace(load.load_trace(args.trace, load.kv_limit()), args.load, sims, args)
            print(f"C = {setup.total_capacity:.2f} req/s; plans {setup.plans}", flush=True)
            results = []
            for setting in settings_of(args.replicas):
                result = run_setting(setting, setup, sims, work, args)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
        finally:
            for sim in sims.values():
                sim.process.stop()
        args.out.write_text(report(results, setup, args, time.monotonic() - started))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))  # every number, per run
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
