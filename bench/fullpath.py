"""The gateway's FULL request path against LiteLLM's proxy, both in front of the same stand-in backend.

`bench/overhead.py` measures the pass-through path (cache off, backend named). This benchmark measures what
a routed request costs: the embedding, the exact and semantic cache lookup with its verifier, the learned
router, admission, the request log and the cache insert. In ONE run, closed-loop clients load these
targets one at a time, round by round, rotating their order each round so the drift of this small, shared
machine hits all alike:

- `standin`: the stand-in backend directly (bench/standin_backend.py, answers at once with an echo);
- `icgate`: `icgate serve` with the default policy, except that its two backends (`small`, `large`, as in
  overhead.write_policy) are the stand-in with a concurrency limit admission never reaches, the learned
  router is `{kind: learned, default_tier: small, large_tier: large}`, auth is off and no traces are
  exported. Requests ask for `model: auto`, so they are routed. `--policy-override` is merged into its
  policy; each `--variant NAME=OVERRIDE` adds one more gateway process (`icgate-NAME`) whose policy is the
  icgate one with OVERRIDE merged in as well;
- `litellm`: LiteLLM's proxy (bench/litellm_proxy.py: its own venv, one worker, no cache) in front of the
  same stand-in.

Every request is one user message holding a real Quora question (../shared/data/cache/qqp_pairs.jsonl.gz,
one question per pair, so that no paraphrase pair is split between warm-up and measurement). Workloads:

- `distinct`: every request a question never sent before in the run (cache misses, unless the semantic cache
  finds a paraphrase among earlier questions: counted, and shown);
- `repeats30`: 30% of requests repeat a question the same target answered earlier (an exact repeat; for a
  gateway, one it stored), 70% new.

Before measuring, every gateway answers `--warm` (default 2000) other questions at concurrency 4 (low enough
that the embedder's bounded queue turns none away, so all are stored), so the semantic cache holds a few
thousand entries and the verifier sees candidates; LiteLLM and the stand-in get a short warm-up too. None of
it is counted. After the levels, two more paths at concurrency 1, side by side with the stand-in:
`exact-hit` (every request repeats a question the gateway stored: an exact cache hit) and `named`
(`model: small`, new questions: no routing decision; by default exact hits only, no embedding on its path).

Per target, level and workload the report gives req/s, added p50/p99 (the target's percentile minus the
stand-in's at the same level and workload, as in overhead.py), the serving process tree's CPU per request
(/proc, between a round's start and end), errors, cache hits (`x-icgate-route: cache`; exact when
`x-icgate-similarity` is 1.0000), requests that skipped part of the cache (`x-icgate-cache-skipped`:
`embedder-busy`, the embedder's queue was too long, so no embedding and nothing stored; `verifier-busy`, the
verifier's queue was too long, so no semantic hit) and the gateway's event-loop lag (the
`icgate_event_loop_lag_seconds` histogram scraped from /metrics before and after each round, so only the
round's samples count; not for a gateway with `--workers`, whose scrapes reach one worker or another).
It checks the issue's targets from the measured numbers; a run where more than 5% of the concurrency-16
requests skipped the embedder or the verifier does not count as the full path.

Run:  .venv/bin/python bench/fullpath.py                     (full: about 6-10 minutes on 2 cores)
      .venv/bin/python bench/fullpath.py --quick --out /tmp/fullpath-quick.md     (smoke run, under 2 minutes)
      .venv/bin/python bench/fullpath.py --variant nosem='{"cache": {"semantic": false}}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cli_module, worktree  # noqa: E402
from bench.litellm_proxy import (  # noqa: E402
    LITELLM_VERSION,
    Deployment,
    LiteLLMProxy,
    build_config,
    ensure_proxy_venv,
    free_port,
    process_cpu_seconds,
)
from bench.overhead import (  # noqa: E402
    CHAT_PATH,
    Proc,
    error_text,
    f2,
    load_connector,
    machine,
    pct,
    spawn,
    stop,
    wait_ready,
    write_policy,
)

QQP = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
DIRECT, LITELLM, ICGATE = "standin", "litellm", "icgate"
ROUTER = {"kind": "learned", "default_tier": "small", "large_tier": "large"}
JSON = {"content-type": "application/json"}
LAG_METRIC = "icgate_event_loop_lag_seconds"  # a Histogram (gateway/telemetry.py), sampled 10 times a second
WARM_CONCURRENCY = 4  # low enough that the embedder's queue never turns a text away: all get stored
FULL = {"levels": [1, 16, 64], "rounds": 6, "requests_per_round": 300, "warm": 2000}
QUICK = {"levels": [1, 16], "rounds": 3, "requests_per_round": 100, "warm": 500}


# --- questions and workloads ----------------------------------------------------------------------------


def load_questions(path: Path, seed: int) -> list[str]:
    """Distinct Quora questions (text_a of each pair, case-insensitively unique), shuffled with `seed`."""
    if not path.is_file():
        raise SystemExit(f"data not found: {path} (see ../shared/data/README.md)")
    seen: dict[str, str] = {}
    with gzip.open(path, "rt") as lines:
        for line in lines:
            text = json.loads(line)["text_a"].strip()
            if text:
                seen.setdefault(text.casefold(), text)
    texts = list(seen.values())
    random.Random(seed).shuffle(texts)
    return texts


class Pool:
    """Hands out each question once in the whole run."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.used = 0

    def take(self) -> str:
        if self.used >= len(self.texts):
            raise RuntimeError(f"all {len(self.texts)} distinct questions used: lower the counts")
        self.used += 1
        return self.texts[self.used - 1]

    def take_many(self, n: int) -> list[str]:
        return [self.take() for _ in range(n)]


@dataclass(frozen=True)
class Workload:
    name: str
    repeat_share: float  # share of requests that repeat a question the same target answered before
    model: str = "auto"  # `auto`: routed; a backend name: the named path
    about: str = ""


WORKLOADS = (
    Workload("distinct", 0.0, about="new questions only (misses)"),
    Workload("repeats30", 0.3, about="30% exact repeats of answered questions, 70% new"),
)
EXTRAS = (  # at concurrency 1 only
    Workload("exact-hit", 1.0, about="every request repeats an answered question"),
    Workload("named", 0.0, model="small", about="`model: small`, new questions: no routing decision"),
)


def body(question: str, model: str) -> bytes:
    """One user message, no max_tokens: the stand-in's echo ends with `stop`, so the gateway stores it."""
    return json.dumps({"model": model, "messages": [{"role": "user", "content": question}]}).encode()


# --- targets and processes ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base_url: str
    pid: int  # the serving process: its CPU and its children's is the target's cost
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))  # what each request sends
    icgate: bool = False
    log_path: Path | None = None
    alive: Callable[[], bool] = lambda: True
    history: list[str] = field(default_factory=list)  # questions it answered from its backend: repeatable
    # One process answers /metrics. With `--workers N` each scrape reaches one worker or another, so the
    # loop-lag histogram's change over a round means nothing and is not reported.
    one_process: bool = True

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into `base`: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def icgate_policy(path: Path, standin_url: str, overrides: list[dict[str, Any]]) -> dict[str, Any]:
    """The default policy with both backends on the stand-in (overhead.write_policy), plus `overrides`."""
    write_policy(path, standin_url, "", router=ROUTER)
    policy = yaml.safe_load(path.read_text())
    for section in ("cache", "embedding"):  # write_policy's pass-through choices: back to the defaults
        policy.pop(section)
    for override in overrides:
        policy = merge(policy, override)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return dict(policy)


def parse_override(text: str) -> dict[str, Any]:
    """YAML or JSON (JSON is YAML), inline or `@file`."""
    value = yaml.safe_load(Path(text[1:]).read_text() if text.startswith("@") else text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a policy override must be a mapping, not {text!r}")
    return value


@dataclass
class Setup:
    """What ran: the policies and commands, for the report."""

    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    litellm_config: dict[str, Any] = field(default_factory=dict)


def spawn_gateway(
    name: str,
    workdir: Path,
    standin: Proc,
    overrides: list[dict[str, Any]],
    serve_args: str,
    code: tuple[Path, str] | None = None,
) -> tuple[Proc, dict[str, Any], str]:
    """`icgate serve` with its own policy file and data directory; also the policy and the command.
    With `code` (a checkout and its revision, `--before`), that code rather than this one's."""
    port = free_port()
    path = workdir / f"policy-{name}.yaml"
    policy = icgate_policy(path, standin.url, overrides)
    cli = ["serve", "--policy", str(path), "--port", str(port), "--data-dir", str(workdir / f"data-{name}")]
    cli += ["--no-launch", *shlex.split(serve_args)]
    command = shlex.join(["icgate", *cli]).replace(str(workdir) + "/", "")
    if code is None:
        return spawn(name, ["-m", "icgate.gateway.cli.main", *cli], port, workdir), policy, command
    tree, rev = code
    proc = spawn(name, ["-m", cli_module(tree), *cli], port, workdir, cwd=tree)
    return proc, policy, f"{command}  # the code at {rev}"


@contextlib.contextmanager
def servers(
    workdir: Path, args: argparse.Namespace, setup: Setup
) -> Iterator[tuple[Proc, list[Proc], list[Target]]]:
    """The stand-in, every gateway variant and LiteLLM's proxy, as subprocesses; all stopped on exit.

    The gateways load their models while LiteLLM's proxy starts (its `start` waits until it answers)."""
    with contextlib.ExitStack() as stack:
        sport = free_port()
        standin = spawn(DIRECT, ["-m", "bench.standin_backend", "--port", str(sport)], sport, workdir)
        stack.callback(stop, standin)
        variants: list[tuple[str, list[dict[str, Any]], str, tuple[Path, str] | None]] = [
            (ICGATE, [args.policy_override], args.icgate_args, None)
        ]
        if args.before:
            tree = stack.enter_context(worktree(args.before))
            variants.append(
                (f"{ICGATE}-before", [args.policy_override], args.icgate_args, (tree, args.before))
            )
        overrides = dict(args.variant)
        for name in [*overrides, *(n for n in args.variant_serve if n not in overrides)]:
            serve_args = f"{args.icgate_args} {args.variant_serve.get(name, '')}"
            variants.append(
                (f"{ICGATE}-{name}", [args.policy_override, overrides.get(name, {})], serve_args, None)
            )
        gateways = []
        for name, policy_overrides, serve_args, code in variants:
            gw, setup.policies[name], setup.commands[name] = spawn_gateway(
                name, workdir, standin, policy_overrides, serve_args, code
            )
            stack.callback(stop, gw)
            gateways.append(gw)
        proxy = stack.enter_context(start_litellm(workdir, standin, setup))
        targets = [proc_target(standin, False)]
        for gw, (_, _, serve_args, _) in zip(gateways, variants, strict=True):
            targets.append(replace(proc_target(gw, True), one_process="--workers" not in serve_args))
        running = proxy.proc
        assert running is not None
        targets.append(
            Target(
                LITELLM,
                proxy.base_url,
                proxy.pid,
                dict(proxy.headers),
                False,
                proxy.log_path,
                lambda: running.poll() is None,
            )
        )
        yield standin, gateways, targets


def proc_target(proc: Proc, icgate: bool) -> Target:
    return Target(
        proc.name,
        proc.url,
        proc.popen.pid,
        dict(JSON),
        icgate,
        proc.log_path,
        lambda: proc.popen.poll() is None,
    )


def start_litellm(workdir: Path, standin: Proc, setup: Setup) -> LiteLLMProxy:
    """One worker, one deployment (the stand-in) serving `model: auto`, its master key, no cache, no DB."""
    exe = ensure_proxy_venv(quiet=False)
    setup.litellm_config = build_config(
        [Deployment("standin", standin.url + "/v1")], "simple-shuffle", model_name="auto"
    )
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump(setup.litellm_config, sort_keys=False))
    setup.commands[LITELLM] = "litellm --config litellm.yaml --host 127.0.0.1 --num_workers 1"
    return LiteLLMProxy(config, exe=exe, log_path=workdir / "litellm.log")


# --- event-loop lag -------------------------------------------------------------------------------------


@dataclass
class Lag:
    """A slice of the event-loop lag histogram: cumulative count per bucket upper bound (seconds)."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum_s: float = 0.0

    def __sub__(self, other: Lag) -> Lag:
        return Lag(
            {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.count - other.count,
            self.sum_s - other.sum_s,
        )

    def __add__(self, other: Lag) -> Lag:
        les = self.buckets.keys() | other.buckets.keys()
        return Lag(
            {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les},
            self.count + other.count,
            self.sum_s + other.sum_s,
        )

    def bound_ms(self, q: float) -> float:
        """Upper bound (ms) of the bucket holding the q-quantile (q = 1: the largest sample's bucket)."""
        if self.count <= 0:
            return math.nan
        for le in sorted(self.buckets):
            if self.buckets[le] >= q * self.count - 1e-9:
                return le * 1000.0
        return math.inf

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.sum_s / self.count if self.count > 0 else math.nan

    def text(self) -> str:
        """mean / p99 bucket / max bucket, ms"""
        if self.count <= 0:
            return "n/a"
        return f"{self.mean_ms:.2f} / <={lag_bound(self.bound_ms(0.99))} / <={lag_bound(self.bound_ms(1.0))}"


def lag_bound(ms: float) -> str:
    return ">2500" if math.isinf(ms) else f"{ms:g}"


def parse_lag(text: str) -> Lag:
    lag = Lag()
    for family in text_string_to_metric_families(text):
        if family.name != LAG_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                lag.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_count"):
                lag.count = sample.value
            elif sample.name.endswith("_sum"):
                lag.sum_s = sample.value
    return lag


async def scrape_lag(session: aiohttp.ClientSession, target: Target) -> Lag | None:
    if not (target.icgate and target.one_process):
        return None
    async with session.get(target.base_url + "/metrics") as resp:
        return parse_lag(await resp.text())


# --- load -----------------------------------------------------------------------------------------------


class Feed:
    """The questions one target is sent in one round: new ones from `new`, repeats from its history.

    Whether request k repeats, and which answered question, comes from a generator seeded by the round
    (not the target), so every target sees the same mix.
    """

    def __init__(self, workload: Workload, new: Callable[[], str], history: list[str], seed: str) -> None:
        self.workload = workload
        self.new = new
        self.history = history
        self.rng = random.Random(seed)

    def next(self) -> str:
        repeat, pick = self.rng.random() < self.workload.repeat_share, self.rng.random()
        if repeat and self.history:
            return self.history[int(pick * len(self.history))]
        return self.new()


@dataclass
class Round:
    target: str
    latencies_ms: list[float] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # per ok request: `x-icgate-route` ("" if none)
    exact_hits: int = 0  # `x-icgate-route: cache` with `x-icgate-similarity: 1.0000`
    examples: int = 0  # answers whose request carried in-context examples (`x-icgate-examples` > 0)
    skipped: int = 0  # answers that skipped the embedder or the verifier (`x-icgate-cache-skipped`)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the target's process tree
    lag: Lag | None = None

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def hits(self) -> int:
        return self.routes.count("cache")

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else math.nan

    def error(self, kind: str, sample: str) -> None:
        self.errors[kind] += 1
        self.error_samples.setdefault(kind, sample[:300])

    def answered(self, latency_ms: float, headers: Any) -> None:
        route = headers.get("x-icgate-route", "")
        self.latencies_ms.append(latency_ms)
        self.routes.append(route)
        if route == "cache" and headers.get("x-icgate-similarity") == "1.0000":
            self.exact_hits += 1
        if int(headers.get("x-icgate-examples", "0")) > 0:
            self.examples += 1
        if headers.get("x-icgate-cache-skipped"):
            self.skipped += 1


async def send(session: aiohttp.ClientSession, target: Target, feed: Feed, result: Round) -> None:
    """One request; an answer from the backend that the gateway stored makes its question repeatable."""
    question = feed.next()
    t0 = time.perf_counter()
    try:
        async with session.post(
            target.chat_url, data=body(question, feed.workload.model), headers=target.headers
        ) as resp:
            raw = await resp.read()
            status, headers = resp.status, resp.headers
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error(type(exc).__name__, str(exc))
        return
    if status != 200:
        result.error(f"HTTP {status}", raw.decode(errors="replace"))
        return
    result.answered((time.perf_counter() - t0) * 1000.0, headers)
    # Without its embedding an answer is not stored; without verification it is.
    stored = (
        headers.get("x-icgate-route") != "cache" and headers.get("x-icgate-cache-skipped") != "embedder-busy"
    )
    if stored and feed.workload.model == "auto":
        target.history.append(question)


async def run_round(
    session: aiohttp.ClientSession,
    target: Target,
    feed: Feed,
    n: int,
    concurrency: int,
    max_s: float,
) -> Round:
    """Closed loop: `concurrency` workers send requests back to back until `n` are sent or `max_s` passed."""
    result = Round(target.name)
    issued = 0
    deadline = time.perf_counter() + max_s

    async def worker() -> None:
        nonlocal issued
        while issued < n and time.perf_counter() < deadline:
            issued += 1
            await send(session, target, feed, result)

    lag0 = await scrape_lag(session, target)
    cpu0 = process_cpu_seconds(target.pid)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - start
    result.cpu_s = process_cpu_seconds(target.pid) - cpu0
    lag1 = await scrape_lag(session, target)
    if lag0 is not None and lag1 is not None:
        result.lag = lag1 - lag0
    return result


def order(names: list[str], i: int) -> list[str]:
    """Round i's order: rotate by i, reversed every other cycle (with 3 targets: all 6 orders)."""
    k = i % len(names)
    rotated = names[k:] + names[:k]
    return rotated[::-1] if (i // len(names)) % 2 else rotated


# --- cells: one concurrency and workload ----------------------------------------------------------------


@dataclass
class Cell:
    concurrency: int
    workload: Workload
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return list(self.rounds)

    def all(self, target: str) -> list[Round]:
        return self.rounds[target]

    def ok(self, target: str) -> int:
        return sum(r.ok for r in self.all(target))

    def latencies(self, target: str, route: Callable[[str], bool] = lambda _: True) -> list[float]:
        return [
            lat
            for r in self.all(target)
            for lat, rt in zip(r.latencies_ms, r.routes, strict=True)
            if route(rt)
        ]

    def rps(self, target: str) -> float:
        wall = sum(r.wall_s for r in self.all(target))
        return self.ok(target) / wall if wall else math.nan

    def p(self, target: str, q: float) -> float:
        return pct(self.latencies(target), q)

    def added(self, target: str, q: float, route: Callable[[str], bool] = lambda _: True) -> float:
        """The target's percentile minus the stand-in's, as overhead.py's `Level.added`."""
        return pct(self.latencies(target, route), q) - self.p(DIRECT, q)

    def cpu_ms(self, target: str) -> float:
        return 1000.0 * sum(r.cpu_s for r in self.all(target)) / max(1, self.ok(target))

    def errors(self, target: str) -> Counter[str]:
        return sum((r.errors for r in self.all(target)), Counter())

    def skipped(self, target: str) -> int:
        return sum(r.skipped for r in self.all(target))

    def hits(self, target: str) -> tuple[int, int]:
        """(exact, semantic) cache hits."""
        exact = sum(r.exact_hits for r in self.all(target))
        return exact, sum(r.hits for r in self.all(target)) - exact

    def routes(self, target: str) -> Counter[str]:
        return Counter(rt for r in self.all(target) for rt in r.routes if rt)

    def examples(self, target: str) -> int:
        return sum(r.examples for r in self.all(target))

    def lag(self, target: str) -> Lag | None:
        lags = [r.lag for r in self.all(target) if r.lag is not None]
        return sum(lags[1:], lags[0]) if lags else None


def is_miss(route: str) -> bool:
    return route != "cache"


async def measure_cell(
    targets: list[Target], pool: Pool, concurrency: int, workload: Workload, args: argparse.Namespace
) -> Cell:
    """A short warm-up per target (connection pools at this concurrency), then the interleaved rounds."""
    cell = Cell(concurrency, workload, {t.name: [] for t in targets})
    timeout = aiohttp.ClientTimeout(total=60)
    async with contextlib.AsyncExitStack() as stack:
        sessions = {
            t.name: await stack.enter_async_context(
                aiohttp.ClientSession(connector=load_connector(concurrency), timeout=timeout)
            )
            for t in targets
        }
        for t in targets:
            feed = Feed(workload, pool.take, t.history, f"warm/{concurrency}/{workload.name}")
            await run_round(
                sessions[t.name],
                t,
                feed,
                max(20, 2 * concurrency),
                concurrency,
                args.max_round_s,
            )
        by_name = {t.name: t for t in targets}
        for i in range(args.rounds):
            cell.orders.append(order([t.name for t in targets], i))
            for name in cell.orders[-1]:
                t = by_name[name]
                feed = Feed(workload, pool.take, t.history, f"{concurrency}/{workload.name}/{i}")
                r = await run_round(
                    sessions[name],
                    t,
                    feed,
                    args.requests_per_round,
                    concurrency,
                    args.max_round_s,
                )
                cell.rounds[name].append(r)
                print_round(cell, i, args.rounds, r)
    return cell


def print_round(cell: Cell, i: int, rounds: int, r: Round) -> None:
    extra = f"  hits {r.hits:4d}  skipped {r.skipped:4d}  lag {r.lag.text()} ms" if r.lag is not None else ""
    print(
        f"  c={cell.concurrency:<3} {cell.workload.name:<9} round {i + 1}/{rounds} {r.target:<16} "
        f"{r.ok:5d} ok "
        f"{sum(r.errors.values()):3d} err {r.rps:8.1f} req/s  p50 {pct(r.latencies_ms, 50):7.2f}  "
        f"p99 {pct(r.latencies_ms, 99):7.2f} ms  cpu {1000 * r.cpu_s / max(1, r.ok):6.2f} ms/req{extra}",
        flush=True,
    )


async def warm_up(targets: list[Target], questions: list[str]) -> dict[str, Round]:
    """Every gateway answers all `questions` (its cache fills); LiteLLM and the stand-in a hundred of them."""
    out: dict[str, Round] = {}
    warm = Workload("warm-up", 0.0)
    async with aiohttp.ClientSession(
        connector=load_connector(WARM_CONCURRENCY), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        for t in targets:
            n = len(questions) if t.icgate else min(100, len(questions))
            feed = Feed(warm, iter(questions).__next__, t.history, "warm")
            t0 = time.monotonic()
            out[t.name] = r = await run_round(session, t, feed, n, WARM_CONCURRENCY, 600.0)
            print(
                f"  warm-up {t.name:<16} {r.ok} ok, {sum(r.errors.values())} errors, {r.hits} cache hits, "
                f"{r.skipped} skipped, {len(t.history)} stored, {r.rps:.0f} req/s "
                f"({time.monotonic() - t0:.1f} s)",
                flush=True,
            )
    return out


async def probe_headers(targets: list[Target], pool: Pool) -> dict[str, list[dict[str, str]]]:
    """Per gateway, the `x-icgate-*` headers of a new question and of the same question again."""
    out: dict[str, list[dict[str, str]]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for t in (t for t in targets if t.icgate):
            question, seen = pool.take(), []
            for _ in range(2):
                async with session.post(t.chat_url, data=body(question, "auto"), headers=JSON) as resp:
                    await resp.read()
                    seen.append(
                        {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("x-icgate-")}
                    )
                await asyncio.sleep(0.3)  # the answer is stored off the hot path
            out[t.name] = seen
    return out


# --- checks and report ----------------------------------------------------------------------------------


@dataclass
class Check:
    text: str
    passed: bool | None  # None: not measured in this run


def find(cells: list[Cell], concurrency: int, workload: str) -> Cell | None:
    return next((c for c in cells if c.concurrency == concurrency and c.workload.name == workload), None)


def checks(cells: list[Cell], gateways: list[str]) -> list[Check]:
    """The issue's targets, per gateway, from the measured numbers."""
    return [c for g in gateways for c in (*throughput_checks(cells, g), *latency_checks(cells, g))]


MAX_SKIPPED_SHARE = 0.05  # requests that may skip the embedder in a run that counts as the full path


def throughput_checks(cells: list[Cell], g: str) -> list[Check]:
    """(1) concurrency 16, distinct: at least twice LiteLLM's req/s, and a p99 no worse than its."""
    c16 = find(cells, 16, "distinct")
    if c16 is None:
        return [Check(f"(1) `{g}`, concurrency 16, distinct: not measured (16 not in --levels)", None)]
    ratio = c16.rps(g) / c16.rps(LITELLM)
    skipped = c16.skipped(g)
    # A request that skipped the embedder or the verifier did not take the full path: the targets count
    # only when nearly all of them did.
    full_path = skipped <= MAX_SKIPPED_SHARE * max(1, c16.ok(g))
    note = (
        f"; {skipped} of {c16.ok(g)} requests skipped the embedder or the verifier (cache skipped)"
        + ("" if full_path else f": over {MAX_SKIPPED_SHARE:.0%}, so not the full path")
        if skipped
        else ""
    )
    return [
        Check(
            f"(1a) `{g}`, concurrency 16, distinct: req/s {c16.rps(g):.1f} >= 2 x LiteLLM's "
            f"{c16.rps(LITELLM):.1f} (ratio {ratio:.2f}){note}",
            ratio >= 2.0 and full_path,
        ),
        Check(
            f"(1b) `{g}`, concurrency 16, distinct: p99 {f2(c16.p(g, 99))} ms <= LiteLLM's "
            f"{f2(c16.p(LITELLM, 99))} ms{note}",
            c16.p(g, 99) <= c16.p(LITELLM, 99) and full_path,
        ),
    ]


def latency_checks(cells: list[Cell], g: str) -> list[Check]:
    """(2) concurrency 1: added p50 <= 8 ms on a miss, <= 1 ms on an exact hit and on a named backend."""
    out = []
    c1 = find(cells, 1, "distinct")
    if c1 is None:
        out.append(Check(f"(2a) `{g}`, concurrency 1, miss: not measured (1 not in --levels)", None))
    else:
        miss = c1.added(g, 50, is_miss)
        out.append(
            Check(f"(2a) `{g}`, concurrency 1, cache miss: added p50 {f2(miss)} ms <= 8 ms", miss <= 8.0)
        )
    for workload, label in (("exact-hit", "exact cache hit"), ("named", "named backend (`model: small`)")):
        cell = find(cells, 1, workload)
        if cell is not None:
            added = cell.added(g, 50)
            out.append(
                Check(f"(2b) `{g}`, concurrency 1, {label}: added p50 {f2(added)} ms <= 1 ms", added <= 1.0)
            )
    return out


def check_line(c: Check) -> str:
    mark = "n/a" if c.passed is None else ("PASS" if c.passed else "**FAIL**")
    return f"- {mark}: {c.text}"


def hits_text(cell: Cell, target: str) -> str:
    if not target.startswith(ICGATE):
        return "-"
    exact, semantic = cell.hits(target)
    skipped = cell.skipped(target)
    return f"{exact} + {semantic} / {cell.ok(target)}" + (f"; {skipped} skipped" if skipped else "")


def routes_text(cell: Cell, target: str) -> str:
    """`x-icgate-route` counts, and how many requests got in-context examples."""
    routes = ", ".join(f"{k} {n}" for k, n in sorted(cell.routes(target).items()))
    return f"{routes}; examples {cell.examples(target)}" if routes else "-"


def lag_text(cell: Cell, target: str) -> str:
    lag = cell.lag(target)
    return lag.text() if lag is not None else "-"


def summary_table(cells: list[Cell], workload: str) -> list[str]:
    out = [
        "| concurrency | target | req/s | added p50 ms | added p99 ms | p99 ms | CPU ms/req | loop lag "
        "mean / p99 / max ms | cache hits exact + semantic / ok | routes; with examples | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for cell in (c for c in cells if c.workload.name == workload):
        for t in cell.targets:
            added = ("-", "-") if t == DIRECT else (f2(cell.added(t, 50)), f2(cell.added(t, 99)))
            out.append(
                f"| {cell.concurrency} | {t} | {cell.rps(t):.1f} | {added[0]} | {added[1]} "
                f"| {f2(cell.p(t, 99))} | {cell.cpu_ms(t):.2f} | {lag_text(cell, t)} | {hits_text(cell, t)} "
                f"| {routes_text(cell, t)} | {error_text(cell.errors(t))} |"
            )
    return out


def extras_table(cells: list[Cell]) -> list[str]:
    out = [
        "| path | target | p50 ms | added p50 ms | added p50 ms, misses only | p99 ms | CPU ms/req "
        "| cache hits exact + semantic / ok | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    rows = [find(cells, 1, "distinct"), *(find(cells, 1, w.name) for w in EXTRAS)]
    for cell in (c for c in rows if c is not None):
        for t in cell.targets:
            added = "-" if t == DIRECT else f2(cell.added(t, 50))
            misses = f2(cell.added(t, 50, is_miss)) if t not in (DIRECT, LITELLM) else "-"
            out.append(
                f"| {cell.workload.name} | {t} | {f2(cell.p(t, 50))} | {added} | {misses} "
                f"| {f2(cell.p(t, 99))} "
                f"| {cell.cpu_ms(t):.2f} | {hits_text(cell, t)} | {error_text(cell.errors(t))} |"
            )
    return out


def rounds_table(cells: list[Cell]) -> list[str]:
    """Per round req/s of each target: the noise behind the pooled numbers."""
    out = [
        "| concurrency | workload | round | order | req/s per target |",
        "| ---: | --- | ---: | --- | --- |",
    ]
    for cell in cells:
        for i, names in enumerate(cell.orders):
            rps = ", ".join(f"{n} {cell.rounds[n][i].rps:.0f}" for n in cell.targets)
            out.append(
                f"| {cell.concurrency} | {cell.workload.name} | {i + 1} | {', '.join(names)} | {rps} |"
            )
    return out


def error_notes(cells: list[Cell]) -> list[str]:
    lines = []
    for cell in cells:
        for t in cell.targets:
            errors = cell.errors(t)
            if errors:
                samples: dict[str, str] = {}
                for r in cell.all(t):
                    for kind, sample in r.error_samples.items():
                        samples.setdefault(kind, sample)
                lines.append(
                    f"- **Errors on `{t}` (c={cell.concurrency}, {cell.workload.name})**: "
                    f"{error_text(errors)}; " + "; ".join(f"{k}: `{v}`" for k, v in samples.items())
                )
    return lines or ["- No request failed on any target in any measured round."]


@dataclass
class Run:
    """Everything the report needs."""

    args: argparse.Namespace
    info: dict[str, str]
    setup: Setup
    measured: Measured
    questions_used: int
    questions_total: int
    started: dt.datetime
    elapsed_s: float


def report(run: Run) -> str:
    a, info = run.args, run.info
    gateways = list(run.setup.policies)
    lines = [
        "# icgate's full request path vs LiteLLM's proxy",
        "",
        f"Generated by `bench/fullpath.py` on {run.started:%Y-%m-%d %H:%M} UTC in {run.elapsed_s:.0f} s"
        + (" (**--quick smoke run: small counts, noisy**)" if a.quick else "")
        + ".",
        "",
        f"- Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- Machine: {info['cpu']}, {info['nproc']} cores; Python {info['python']}; {info['platform']}; "
        f"load average before {info['loadavg_before']}, after {info['loadavg_after']}",
        f"- Code: {info['code']}; {info['libs']}; LiteLLM proxy {LITELLM_VERSION} (own venv)",
        f"- Counts: levels {a.levels}, {a.rounds} rounds x {a.requests_per_round} requests per target, "
        f"cell and round (a round stops after {a.max_round_s:g} s); cache warm-up {a.warm} questions per "
        f"gateway at concurrency {WARM_CONCURRENCY}",
        f"- Data: `{QQP.relative_to(ROOT.parent)}`: {run.questions_used} of {run.questions_total} distinct "
        "questions used (one per pair), none sent as new twice",
        "",
        "## Targets of the issue",
        "",
        *(check_line(c) for c in checks(run.measured.cells, gateways)),
        "",
        "Added latency is the target's percentile minus the stand-in's at the same level and workload (as "
        "in overhead.py). CPU is the serving process tree's user+system time (/proc) over the round's wall "
        "time, per answered request; for `standin` its own. Loop lag is the gateway's "
        "`icgate_event_loop_lag_seconds` histogram differenced over the measured rounds: mean, and the upper "
        "bounds of the buckets holding the 99th percentile and the largest sample (it samples 10 times a "
        "second).",
        "",
    ]
    for w in WORKLOADS:
        lines += [f"## Workload `{w.name}`: {w.about}", "", *summary_table(run.measured.cells, w.name), ""]
    lines += [
        "## Concurrency 1: miss, exact hit and named backend",
        "",
        "`exact-hit`: every request repeats a question the target answered (for the gateway: an exact cache "
        "hit). `named`: `model: small` with new questions, no routing decision; by default "
        "(`cache.named_backends: exact`) exact hits only and no embedding on its path, the answer embedded "
        'and stored after the response. "misses only" leaves out requests the cache answered.',
        "",
        *extras_table(run.measured.cells),
        "",
        "## Setup",
        "",
        *setup_lines(run),
        "## Notes",
        "",
        *error_notes(run.measured.cells),
        "",
        "## Rounds",
        "",
        *rounds_table(run.measured.cells),
        "",
    ]
    return "\n".join(lines)


def setup_lines(run: Run) -> list[str]:
    lines = []
    for name, policy in run.setup.policies.items():
        lines += [
            f"`{name}`: `{run.setup.commands[name]}` with this policy:",
            "",
            "```yaml",
            yaml.safe_dump(policy, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    lines += [
        f"`litellm`: `{run.setup.commands[LITELLM]}`, config:",
        "",
        "```yaml",
        yaml.safe_dump(run.setup.litellm_config, sort_keys=False).rstrip(),
        "```",
        "",
        "Warm-up:",
        "",
    ]
    for name, r in run.measured.warm.items():
        lines.append(
            f"- `{name}`: {r.ok} answered ({r.hits} from the cache, {r.skipped} without the embedding), "
            f"{error_text(r.errors)} errors, {r.rps:.0f} req/s"
        )
    for name, n in run.measured.stored.items():
        lines.append(
            f"- `{name}` stored the answers to {n} routed questions in the whole run (warm-up included)"
        )
    lines += ["", "`x-icgate-*` response headers of a new question, then the same question again:", ""]
    for name, seen in run.measured.probes.items():
        for label, headers in zip(("new", "again"), seen, strict=True):
            lines.append(
                f"- `{name}`, {label}: " + ", ".join(f"`{k}: {v}`" for k, v in sorted(headers.items()))
            )
    return [*lines, ""]


# --- main -----------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path, setup: Setup, pool: Pool) -> Measured:
    """Start everything, warm up, measure every cell; the processes are stopped whatever happens."""
    with servers(workdir, args, setup) as (standin, gateways, targets):
        t0 = time.monotonic()
        await wait_ready(standin, "/healthz", 60)
        await asyncio.gather(*(wait_ready(gw, "/readyz", 300) for gw in gateways))
        print(
            f"targets ready after {time.monotonic() - t0:.1f} s: "
            + ", ".join(f"{t.name} {t.base_url}" for t in targets),
            flush=True,
        )
        out = Measured(warm=await warm_up(targets, pool.take_many(args.warm)))
        out.probes = await probe_headers(targets, pool)
        for name, seen in out.probes.items():
            print(f"  {name} x-icgate headers, new then again: {seen}", flush=True)
        plan = [(c, w, targets) for c in args.levels for w in WORKLOADS]
        plan += [(1, w, [t for t in targets if t.name != LITELLM]) for w in EXTRAS]
        for concurrency, workload, chosen in plan:
            out.cells.append(await measure_cell(chosen, pool, concurrency, workload, args))
            for t in targets:
                if not t.alive():
                    raise RuntimeError(f"{t.name} died; see {t.log_path}")
        out.stored = {t.name: len(t.history) for t in targets if t.icgate}
    return out


@dataclass
class Measured:
    warm: dict[str, Round]
    probes: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)  # per gateway: routed questions its backend answered


async def main_async(args: argparse.Namespace) -> int:
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    info = machine(args.code_label)
    ensure_proxy_venv(quiet=False)  # a first install takes minutes: before any server starts
    questions = load_questions(QQP, args.seed)
    pool, setup = Pool(questions), Setup()
    with tempfile.TemporaryDirectory(prefix="icgate-fullpath-") as tmp:
        measured = await measure(args, Path(tmp), setup, pool)
    info["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run = Run(
        args,
        info,
        setup,
        measured,
        pool.used,
        len(questions),
        started,
        time.monotonic() - t0,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(run))
    for w in WORKLOADS:
        print(f"\n{w.name}:")
        print("\n".join(summary_table(run.measured.cells, w.name)))
    print("\nconcurrency 1:")
    print("\n".join(extras_table(run.measured.cells)))
    print()
    print("\n".join(check_line(c) for c in checks(run.measured.cells, list(setup.policies))))
    print(f"report: {args.out} ({run.elapsed_s:.0f} s)")
    return 0


def variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, override = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant wants NAME=OVERRIDE, not {text!r}")
    return name, parse_override(override)


def variant_serve(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant-serve wants NAME=FLAGS, not {text!r}")
    return name, flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument(
        "--levels", type=int, nargs="+", help=f"concurrency levels (default {FULL['levels']})"
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per cell (default {FULL['rounds']})")
    parser.add_argument("--requests-per-round", type=int, help=f"default {FULL['requests_per_round']}")
    parser.add_argument(
        "--warm", type=int, help=f"questions per gateway before measuring (default {FULL['warm']})"
    )
    parser.add_argument("--max-round-s", type=float, default=30.0, help="a round stops after this long")
    parser.add_argument("--icgate-args", default="", help="extra `icgate serve` flags, e.g. '--workers 2'")
    parser.add_argument(
        "--policy-override",
        type=parse_override,
        default={},
        help="YAML/JSON (or @file) merged into icgate's policy",
    )
    parser.add_argument(
        "--variant",
        type=variant,
        action="append",
        default=[],
        help="NAME=OVERRIDE: one more gateway, `icgate-NAME`: the icgate policy with OVERRIDE merged in",
    )
    parser.add_argument(
        "--variant-serve",
        type=variant_serve,
        action="append",
        default=[],
        help="NAME=FLAGS: `icgate serve` flags for variant `icgate-NAME` (made if no --variant names it)",
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="one more gateway, `icgate-before`: the default policy served by the code at git revision REV",
    )
    parser.add_argument("--seed", type=int, default=0, help="question order and repeat choices")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fullpath.md")
    parser.add_argument("--code-label", help="describe the code measured (default: git commit of the repo)")
    args = parser.parse_args(argv)
    args.variant_serve = dict(args.variant_serve)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.requests_per_round < 1 or args.warm < 0 or min(args.levels) < 1:
        parser.error("--rounds, --requests-per-round and --levels must be positive, --warm not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
