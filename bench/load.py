"""Load benchmark: Azure LLM inference traces replayed through icgate and LiteLLM's proxy.

    .venv/bin/python bench/load.py                      # conv at 1x, 1.5x, 2x; code at 1.5x
    .venv/bin/python bench/load.py --traces conv --loads 1.5 --duration-s 15

Two simulated backends (bench/simulator: `small`, fast; `large`, slower), each its own process,
are started once and shared by every system. First their capacity is measured with each trace's
request mix (closed loop, directly against the simulator), C = C_small + C_large. Then, per trace
and load k, a window of the trace is replayed open loop at a mean rate of k*C (its burstiness
kept, its inter-arrival times scaled) through each system in turn:

    (a)  icgate, admission on          (b)  icgate, admission off (same policy otherwise)
    (c1) LiteLLM proxy, simple-shuffle (c2) LiteLLM proxy, least-busy

Each system gets a fresh gateway or proxy process, and the simulators are idle before it starts.
A request is good when it completes with TTFT <= the TTFT objective (from the client's send) and
TPOT <= the TPOT objective; goodput is good requests over the window's duration.
Writes a Markdown report and a plot (default bench/results/load.md and load.png).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `gateway` importable
    sys.path.insert(0, str(REPO))

from bench.litellm_proxy import (  # noqa: E402
    LITELLM_VERSION,
    Deployment,
    LiteLLMProxy,
    build_config,
    ensure_proxy_venv,
    free_port,
    process_cpu_seconds,
)
from bench.simulator.engine import EngineConfig  # noqa: E402

TRACE_DIR = REPO.parent / "shared" / "data" / "traces"
TRACE_FILES = {
    "conv": "AzureLLMInferenceTrace_conv.csv",
    "code": "AzureLLMInferenceTrace_code.csv",
}
ICGATE = REPO / ".venv" / "bin" / "icgate"
# "tok " is one simulator token (a word) and four characters, so the gateway's chars/4 prompt
# estimate equals the simulator's word count.
WORD = "tok "
# Share of the TPOT objective a full batch may use in the cost model: the rest absorbs bursts of
# prefills, which stall every running sequence (the simulator has no chunked prefill).
TPOT_MARGIN = 0.8
SEED = 0
REFUSED_LATE_S = 0.1  # a 429 slower than this was held in a queue first
Tier = Literal["small", "large"]
TIERS: tuple[Tier, Tier] = ("small", "large")


# --------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class TraceRow:
    at_s: float  # seconds since the trace's first row
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    name: str
    rows: list[TraceRow]
    clipped: int  # prompts shortened to fit the smaller KV cache

    @property
    def prompts(self) -> np.ndarray:
        return np.array([r.prompt_tokens for r in self.rows])


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' as POSIX seconds (strptime takes at most 6 fraction digits)."""
    head, _, frac = stamp.strip().partition(".")
    whole = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def load_trace(name: str, kv_tokens: int) -> Trace:
    """Read a trace CSV; outputs of 0 become 1 and prompts are clipped so prompt+output fits `kv_tokens`."""
    path = TRACE_DIR / TRACE_FILES[name]
    rows, clipped, start = [], 0, None
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            at = _seconds(rec["TIMESTAMP"])
            start = at if start is None else start
            output = max(1, int(rec["GeneratedTokens"]))
            prompt = max(1, int(rec["ContextTokens"]))
            if prompt + output > kv_tokens:
                prompt, clipped = max(1, kv_tokens - output), clipped + 1
            rows.append(TraceRow(at - start, prompt, output))
    return Trace(name, rows, clipped)


@dataclass(frozen=True)
class Arrival:
    index: int  # row in the trace
    due_s: float  # offset from the replay's start
    prompt_tokens: int
    output_tokens: int


def schedule(trace: Trace, rate: float, duration_s: float) -> list[Arrival]:
    """The trace's first rows, their arrival times scaled so the mean rate over `duration_s` is `rate`.

    The window is the first n = rate*duration rows; the gaps keep their relative sizes (burstiness),
    stretched or squeezed by one factor so that row n (the first one not sent) would fall at the end.
    """
    n = max(1, round(rate * duration_s))
    if n >= len(trace.rows):
        raise ValueError(f"{trace.name}: {n} requests asked, the trace has {len(trace.rows)}")
    span = trace.rows[n].at_s - trace.rows[0].at_s
    scale = duration_s / span
    return [
        Arrival(i, (r.at_s - trace.rows[0].at_s) * scale, r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(trace.rows[:n])
    ]


# --------------------------------------------------------------------------- processes


class Managed:
    """A subprocess in its own process group, ready once `ready_url` answers 200; killed whole on exit."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, log_path: Path, timeout_s: float = 120):
        self.name, self.cmd, self.ready_url, self.log_path = name, cmd, ready_url, log_path
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Managed:
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = started + self.timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.ready_url).status_code == 200:
                        self.startup_s = time.monotonic() - started
                        return self
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready at {self.ready_url} within {self.timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group

    def __enter__(self) -> Managed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Sim:
    """One simulator process and what the benchmark needs to know about it."""

    tier: Tier
    config: EngineConfig
    port: int
    process: Managed

    @property
    def model(self) -> str:
        return f"sim-{self.tier}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counters(self) -> dict[str, float]:
        """The simulator's vLLM-style gauges and counters, summed over labels."""
        text = httpx.get(self.url + "/metrics", timeout=5.0, trust_env=False).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out


def start_sim(tier: Tier, logs: Path) -> Sim:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.simulator", "--preset", tier, "--port", str(port)]
    cmd += ["--model-name", f"sim-{tier}"]
    proc = Managed(f"sim-{tier}", cmd, f"http://127.0.0.1:{port}/health", logs / f"sim-{tier}.log", 30)
    proc.start()
    return Sim(tier, EngineConfig.preset(tier), port, proc)


def wait_idle(sims: Sequence[Sim], timeout_s: float = 120.0) -> float:
    """Block until every simulator runs and holds nothing; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        busy = 0.0
        for sim in sims:
            c = sim.counters()
            busy += c.get("vllm:num_requests_running", 0) + c.get("vllm:num_requests_waiting", 0)
        if busy == 0:
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"simulators still busy after {timeout_s:.0f} s")


# --------------------------------------------------------------------------- the client


@dataclass
class Endpoint:
    """Where the load goes: a chat completions URL, its auth header and the model to ask for."""

    url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """One request as the client saw it; times are `time.perf_counter()` seconds."""

    index: int
    prompt_tokens: int
    max_tokens: int
    due: float = 0.0  # when it should have been sent
    sent: float | None = None
    first_token: float | None = None  # the first chunk with content
    ended: float | None = None
    status: int | None = None
    completion_tokens: int = 0
    done: bool = False  # saw `data: [DONE]`
    retry_after: str | None = None
    backend: str | None = None  # x-icgate-backend, or LiteLLM's deployment id
    queue_ms: float | None = None  # x-icgate-queue-ms
    predicted_tokens: int | None = None  # x-icgate-predicted-tokens: the output length admission assumed
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.first_token is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None or self.sent is None else self.first_token - self.sent

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; 0 for a one-token answer."""
        if not self.completed or self.ended is None or self.first_token is None:
            return None
        return (self.ended - self.first_token) / max(1, self.completion_tokens - 1)


def chat_body(model: str, prompt_tokens: int, max_tokens: int) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": WORD * prompt_tokens}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


def client_session(connections: int = 0) -> aiohttp.ClientSession:
    # Keep-alive below uvicorn's 5 s: reusing a connection the server is closing fails the POST.
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=2.0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


def _note_chunk(out: Outcome, payload: bytes, now: float) -> None:
    """First content time and the usage count from one SSE `data:` payload."""
    if payload.strip() == b"[DONE]":
        out.done = True
        return
    chunk = json.loads(payload)
    if out.first_token is None:
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                out.first_token = now
                break
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens"):
        out.completion_tokens = int(usage["completion_tokens"])


async def send(session: aiohttp.ClientSession, endpoint: Endpoint, out: Outcome) -> None:
    """Send one streamed chat completion and fill in `out` as it goes (a cancel leaves it partial)."""
    headers = {"content-type": "application/json", **endpoint.headers}
    out.sent = time.perf_counter()
    try:
        body = chat_body(endpoint.model, out.prompt_tokens, out.max_tokens)
        async with session.post(endpoint.url, data=body, headers=headers) as resp:
            out.status = resp.status
            out.backend = resp.headers.get("x-icgate-backend") or resp.headers.get("x-litellm-model-id")
            queue = resp.headers.get("x-icgate-queue-ms")
            out.queue_ms = float(queue) if queue else None
            predicted = resp.headers.get("x-icgate-predicted-tokens")
            out.predicted_tokens = int(predicted) if predicted else None
            if resp.status != 200:
                out.retry_after = resp.headers.get("retry-after")
                out.error = (await resp.text())[:300]
                return
            async for line in resp.content:
                if line.startswith(b"data:"):
                    _note_chunk(out, line[5:], time.perf_counter())
    except asyncio.CancelledError:
        out.error = out.error or "timed out"
        raise
    except (aiohttp.ClientError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        out.ended = time.perf_counter()


async def replay(
    endpoint: Endpoint | Sequence[Endpoint], arrivals: Sequence[Arrival], duration_s: float, straggle_s: float
) -> list[Outcome]:
    """Send every arrival at its time, open loop; wait at most `straggle_s` past the window, then cancel.
    Several endpoints (replicas, bench/replicas.py): arrival i goes to endpoint i mod N, round-robin."""
    endpoints = [endpoint] if isinstance(endpoint, Endpoint) else list(endpoint)
    outcomes = [Outcome(a.index, a.prompt_tokens, a.output_tokens) for a in arrivals]
    async with client_session() as session:
        start = time.perf_counter() + 0.2
        tasks = []
        for i, (arrival, out) in enumerate(zip(arrivals, outcomes, strict=True)):
            out.due = start + arrival.due_s
            delay = out.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, endpoints[i % len(endpoints)], out)))
        remaining = start + duration_s + straggle_s - time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes


async def warm_up(endpoint: Endpoint, n: int = 6) -> None:
    """A few tiny requests (one token each), so lazy imports are not paid inside the measured window."""
    async with client_session() as session:
        for i in range(n):
            out = Outcome(-1, 200 if i % 2 else 2000, 1)  # short and long prompts: both tiers under a rule
            await send(session, endpoint, out)
            if out.status != 200:
                raise RuntimeError(f"warm-up request failed: {out.status} {out.error}")


# --------------------------------------------------------------------------- capacity


@dataclass(frozen=True)
class Capacity:
    """Saturated throughput of one backend with a trace's mix, measured closed loop."""

    req_s: float  # generated tokens per second / the mix's mean output length
    completions_s: float  # finished requests per second in the window (noisier)
    output_tok_s: float
    prompt_tok_s: float


async def _closed_loop_capacity(
    sim: Sim, rows: Sequence[TraceRow], concurrency: int, warmup_s: float, measure_s: float
) -> Capacity:
    endpoint = Endpoint(sim.url + "/v1/chat/completions", sim.model)
    cycle = itertools.cycle(rows)
    stop = asyncio.Event()

    async def worker(delay: float) -> None:
        await asyncio.sleep(delay)  # spread the starts: a synchronised batch would finish in waves
        async with client_session(1) as session:
            while not stop.is_set():
                row = next(cycle)
                await send(session, endpoint, Outcome(-1, row.prompt_tokens, row.output_tokens))

    rng = random.Random(SEED)
    workers = [asyncio.create_task(worker(rng.uniform(0, 1.0))) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    before, t0 = await asyncio.to_thread(sim.counters), time.perf_counter()
    await asyncio.sleep(measure_s)
    after, t1 = await asyncio.to_thread(sim.counters), time.perf_counter()
    stop.set()
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)

    def rate(name: str) -> float:
        return (after.get(name, 0.0) - before.get(name, 0.0)) / (t1 - t0)

    mean_output = float(np.mean([r.output_tokens for r in rows]))
    out_tok_s = rate("vllm:generation_tokens_total")
    return Capacity(
        req_s=out_tok_s / mean_output,
        completions_s=rate("vllm:request_success_total"),
        output_tok_s=out_tok_s,
        prompt_tok_s=rate("vllm:prompt_tokens_total"),
    )


def measure_capacity(
    sim: Sim, mix: Sequence[TraceRow], concurrency: int, warmup_s: float, measure_s: float
) -> Capacity:
    """Saturate `sim` with `mix` in random order; requests in flight at the end are dropped."""
    rows = random.Random(SEED).sample(list(mix), len(mix))
    capacity = asyncio.run(_closed_loop_capacity(sim, rows, concurrency, warmup_s, measure_s))
    wait_idle([sim])
    return capacity


# --------------------------------------------------------------------------- policy choices


@dataclass(frozen=True)
class BackendPlan:
    """What icgate is told about one backend, derived from the simulator's published cost model."""

    tier: Tier
    max_concurrent: int
    tpot_cap: int  # largest batch whose predicted TPOT fits the budget
    kv_cap: int  # sequences of the sub-mix's mean size that fit the KV cache
    mean_prefill_ms: float
    mean_output: float
    predicted_tpot_ms: float  # at max_concurrent: the expected_tpot_ms prior
    predicted_ttft_ms: float  # one prefill plus one decode step: the expected_ttft_ms prior


def predicted_tpot_ms(config: EngineConfig, batch: int, mean_prefill_ms: float, mean_output: float) -> float:
    """A decode step of `batch` sequences plus the prefills that stall it.

    In steady state batch/mean_output sequences finish per step and as many new ones are prefilled,
    so each step also carries that share of a prefill.
    """
    return config.decode_step_ms(batch) + batch * mean_prefill_ms / mean_output


def plan_backend(
    config: EngineConfig, tier: Tier, rows: Sequence[TraceRow], tpot_slo_ms: float
) -> BackendPlan:
    """The largest batch whose predicted TPOT is within TPOT_MARGIN of the objective and that fits the KV."""
    prefill = float(np.mean([config.prefill_ms(r.prompt_tokens) for r in rows]))
    output = float(np.mean([r.output_tokens for r in rows]))
    size = float(np.mean([r.prompt_tokens + r.output_tokens for r in rows]))
    budget = TPOT_MARGIN * tpot_slo_ms
    fits = [
        n
        for n in range(1, config.max_num_seqs + 1)
        if predicted_tpot_ms(config, n, prefill, output) <= budget
    ]
    tpot_cap = max(fits, default=1)
    kv_cap = max(1, int(config.kv_cache_tokens // size))
    n = min(tpot_cap, kv_cap)
    return BackendPlan(
        tier=tier,
        max_concurrent=n,
        tpot_cap=tpot_cap,
        kv_cap=kv_cap,
        mean_prefill_ms=prefill,
        mean_output=output,
        predicted_tpot_ms=predicted_tpot_ms(config, n, prefill, output),
        predicted_ttft_ms=prefill + config.decode_step_ms(n),
    )


def rule_threshold(prompts: np.ndarray, large_share: float) -> int:
    """Prompt length above which `large_share` of the requests lie (the rule router's threshold)."""
    return int(np.quantile(prompts, 1.0 - large_share))


def rule_tier(prompt_tokens: int, threshold: int) -> Tier:
    """What the gateway's rule picks: its estimate is chars/4, which WORD makes equal to the words."""
    return "large" if prompt_tokens > threshold else "small"


@dataclass
class TraceSetup:
    """Everything measured and decided for one trace before its load runs."""

    trace: Trace
    capacity: dict[Tier, Capacity]  # with the mix of the rows replayed
    threshold: int
    plans: dict[Tier, BackendPlan]
    mix_rows: int = 0  # the first rows of the trace, the largest replay window (0: the whole trace)
    whole_capacity: dict[Tier, Capacity] | None = None  # with the whole trace's mix (sizes the window)

    @property
    def mix(self) -> list[TraceRow]:
        return self.trace.rows[: self.mix_rows] if self.mix_rows else self.trace.rows

    @property
    def total_capacity(self) -> float:
        return sum(c.req_s for c in self.capacity.values())

    @property
    def large_share(self) -> float:
        return self.capacity["large"].req_s / self.total_capacity


def measure_capacities(
    sims: dict[Tier, Sim], mix: Sequence[TraceRow], label: str, args: argparse.Namespace, quick: bool = False
) -> dict[Tier, Capacity]:
    """Both backends, one after the other (measured together they would share the client's CPU)."""
    warmup, measure = args.capacity_warmup_s, args.capacity_s
    if quick:
        warmup, measure = warmup / 2, measure / 2
    out = {}
    for tier in TIERS:
        out[tier] = measure_capacity(sims[tier], mix, args.capacity_concurrency, warmup, measure)
        print(f"[{label}] capacity {tier}: {out[tier]}", flush=True)
    return out


def prepare_trace(
    trace: Trace, max_load: float, sims: dict[Tier, Sim], args: argparse.Namespace
) -> TraceSetup:
    """Capacity with the mix that will be replayed, then the rule's threshold and the concurrency limits.

    The trace is not stationary (its first rows have longer answers and fewer long prompts than the
    whole), and every replay window is a prefix of the trace. So a quick measurement with the whole
    trace's mix sizes the largest window, and capacity is then measured with that window's rows.
    """
    whole = measure_capacities(sims, trace.rows, f"{trace.name} whole", args, quick=True)
    mix_rows = min(
        len(trace.rows) - 1, round(max_load * sum(c.req_s for c in whole.values()) * args.duration_s)
    )
    mix = trace.rows[:mix_rows]
    capacity = measure_capacities(sims, mix, f"{trace.name} first {mix_rows} rows", args)
    share = capacity["large"].req_s / sum(c.req_s for c in capacity.values())
    threshold = rule_threshold(np.array([r.prompt_tokens for r in mix]), share)
    plans = {}
    for tier in TIERS:
        sub = [r for r in mix if rule_tier(r.prompt_tokens, threshold) == tier]
        plans[tier] = plan_backend(sims[tier].config, tier, sub, args.tpot_slo_ms)
    return TraceSetup(trace, capacity, threshold, plans, mix_rows, whole)


# --------------------------------------------------------------------------- the systems


@dataclass(frozen=True)
class System:
    key: str
    label: str
    kind: Literal["icgate", "litellm"]
    admission: bool = False
    strategy: Literal["simple-shuffle", "least-busy"] | None = None


SYSTEMS = {
    s.key: s
    for s in (
        System("icgate", "(a) icgate, admission on", "icgate", admission=True),
        System("icgate-off", "(b) icgate, admission off", "icgate", admission=False),
        System("litellm-shuffle", "(c1) LiteLLM simple-shuffle", "litellm", strategy="simple-shuffle"),
        System("litellm-least-busy", "(c2) LiteLLM least-busy", "litellm", strategy="least-busy"),
    )
}


def icgate_policy(
    setup: TraceSetup, sims: dict[Tier, Sim], admission: bool, args: argparse.Namespace
) -> dict:
    """Both icgate variants get this policy; only `admission.enabled` differs."""
    backends = []
    for tier in TIERS:
        sim, plan = sims[tier], setup.plans[tier]
        backends.append(
            {
                "name": tier,
                "tier": tier,
                "model": f"openai/{sim.model}",
                "api_base": sim.url + "/v1",
                "client": "http",
                "metrics_url": sim.url + "/metrics",
                "max_concurrent": plan.max_concurrent,
                "expected_ttft_ms": round(plan.predicted_ttft_ms, 1),
                "expected_tpot_ms": round(plan.predicted_tpot_ms, 1),
                "context_window": sim.config.kv_cache_tokens,
            }
        )
    return {
        "backends": backends,
        "routed_models": ["auto"],
        "cache": {"enabled": False},
        "embedding": {"preload": False},
        "router": {"kind": "rule", "large_if_prompt_tokens_over": setup.threshold},
        "admission": {
            "enabled": admission,
            "ttft_slo_ms": args.ttft_slo_ms,
            "tpot_slo_ms": args.tpot_slo_ms,
            "ttft_margin": args.ttft_margin,
        },
    }


def litellm_config(setup: TraceSetup, sims: dict[Tier, Sim], strategy: str) -> dict:
    """One model group `sim` over both simulators; simple-shuffle weighted by measured capacity."""
    deployments = [Deployment(sims[t].model, sims[t].url + "/v1", id=f"sim-{t}") for t in TIERS]
    config = build_config(deployments, strategy)  # type: ignore[arg-type]
    if strategy == "simple-shuffle":
        for entry, tier in zip(config["model_list"], TIERS, strict=True):
            entry["litellm_params"]["weight"] = round(setup.capacity[tier].req_s, 3)
    return config


@dataclass
class Front:
    """A running gateway or proxy: where to send, its process, and (icgate) where its metrics are."""

    endpoint: Endpoint
    pid: int
    startup_s: float
    metrics_url: str | None = None


@contextlib.contextmanager
def serve_system(
    system: System, setup: TraceSetup, sims: dict[Tier, Sim], work: Path, args: argparse.Namespace
) -> Iterator[Front]:
    """A fresh icgate or LiteLLM proxy process for one run, stopped when the block ends."""
    port = free_port()
    tag = f"{setup.trace.name}-{system.key}-{port}"
    if system.kind == "icgate":
        policy = work / f"{tag}.yaml"
        policy.write_text(yaml.safe_dump(icgate_policy(setup, sims, system.admission, args), sort_keys=False))
        data = work / tag
        cmd = [str(ICGATE), "serve", "--policy", str(policy), "--data-dir", str(data)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-launch"]
        base = f"http://127.0.0.1:{port}"
        with Managed("icgate", cmd, base + "/readyz", work / f"{tag}.log") as proc:
            endpoint = Endpoint(base + "/v1/chat/completions", "auto")
            yield Front(endpoint, proc.pid, proc.startup_s, base + "/metrics")
        return
    assert system.strategy is not None
    config = work / f"{tag}.yaml"
    config.write_text(yaml.safe_dump(litellm_config(setup, sims, system.strategy), sort_keys=False))
    exe = ensure_proxy_venv()
    # LiteLLM aborts a stream after 100 identical chunks (a looping-model guard); the simulator's
    # answer is the word `tok` repeated, so a slow decode (one token a chunk) would trip it.
    env = {**os.environ, "REPEATED_STREAMING_CHUNK_LIMIT": "1000000"}
    with LiteLLMProxy(config, port, exe=exe, log_path=work / f"{tag}.log", env=env) as proxy:
        endpoint = Endpoint(proxy.base_url + "/v1/chat/completions", "sim", proxy.headers)
        yield Front(endpoint, proxy.pid, proxy.startup_s or 0.0)


def admission_counters(metrics_url: str) -> dict[str, int]:
    """icgate's `icgate_admission_total` by backend/outcome."""
    text = httpx.get(metrics_url, timeout=5.0, trust_env=False).text
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "icgate_admission_total":
                out[f"{sample.labels['backend']}/{sample.labels['outcome']}"] = int(sample.value)
    return out


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One (trace, load, system) run: the summary numbers the report shows."""

    trace: str
    load: float
    system: str
    offered_rps: float
    duration_s: float
    sent: int
    completed: int
    good: int
    goodput_rps: float
    goodput_tok_s: float  # output tokens of good requests per second: SJF-like ordering cannot inflate it
    refused: int
    refused_late: int  # 429s that came only after waiting in icgate's queue
    refused_late_wait_s: float | None  # how long those waited, on average
    failed: int  # errors other than 429
    timed_out: int  # cancelled at the end of the straggler wait
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    miss_ttft: int  # completed but late first token
    miss_tpot: int  # completed, first token in time, too slow after
    large_share: float | None  # of completed requests, served by the large backend
    spilled: int  # completed on the other tier than the rule picks (icgate)
    queue_ms_mean: float | None
    send_lag_p99_ms: float  # how late the client sent (CPU starvation of the load generator)
    cpu: dict[str, float]  # share of one core over the run, per process
    admission: dict[str, int]  # icgate_admission_total
    errors: dict[str, int]
    startup_s: float
    drain_s: float
    wall_s: float


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(
    outcomes: Sequence[Outcome],
    trace: str,
    load: float,
    system: str,
    duration_s: float,
    threshold: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The request-level numbers of a run (the caller adds CPU, counters and timings)."""
    ttft_slo, tpot_slo = args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000
    done = [o for o in outcomes if o.completed]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    tpots = [o.tpot_s * 1000 for o in done if o.tpot_s is not None]
    late = [o for o in done if (o.ttft_s or 0) > ttft_slo]
    slow = [o for o in done if (o.ttft_s or 0) <= ttft_slo and (o.tpot_s or 0) > tpot_slo]
    bad = {id(o) for o in (*late, *slow)}
    good = [o for o in done if id(o) not in bad]
    refused = [o for o in outcomes if o.status == 429]
    # A refusal at arrival takes milliseconds; one after a queue timeout took most of the objective.
    waits = [o.ended - o.sent for o in refused if o.ended is not None and o.sent is not None]
    late_waits = [w for w in waits if w > REFUSED_LATE_S]
    timed_out = [o for o in outcomes if o.error == "timed out"]
    failed = [o for o in outcomes if not o.completed and o.status != 429 and o.error != "timed out"]
    on_large = [o for o in done if o.backend and "large" in o.backend]
    spilled = [o for o in done if o.backend in TIERS and o.backend != rule_tier(o.prompt_tokens, threshold)]
    queues = [o.queue_ms for o in done if o.queue_ms is not None]
    lags = [(o.sent - o.due) * 1000 for o in outcomes if o.sent is not None]
    errors = Counter((f"HTTP {o.status}" if o.status else (o.error or "?"))[:60] for o in failed)
    return {
        "trace": trace,
        "load": load,
        "system": system,
        "offered_rps": len(outcomes) / duration_s,
        "duration_s": duration_s,
        "sent": len(outcomes),
        "completed": len(done),
        "good": len(good),
        "goodput_rps": len(good) / duration_s,
        "goodput_tok_s": sum(o.completion_tokens for o in good) / duration_s,
        "refused": len(refused),
        "refused_late": len(late_waits),
        "refused_late_wait_s": float(np.mean(late_waits)) if late_waits else None,
        "failed": len(failed),
        "timed_out": len(timed_out),
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "tpot_p50_ms": _pct(tpots, 50),
        "tpot_p99_ms": _pct(tpots, 99),
        "miss_ttft": len(late),
        "miss_tpot": len(slow),
        "large_share": len(on_large) / len(done) if done else None,
        "spilled": len(spilled),
        "queue_ms_mean": float(np.mean(queues)) if queues else None,
        "send_lag_p99_ms": _pct(lags, 99) or 0.0,
        "errors": dict(errors),
    }


def run_one(
    system: System,
    setup: TraceSetup,
    load: float,
    sims: dict[Tier, Sim],
    work: Path,
    args: argparse.Namespace,
) -> RunResult:
    """One system at one load: fresh front process, warm-up, idle simulators, replay, numbers."""
    started = time.monotonic()
    arrivals = schedule(setup.trace, load * setup.total_capacity, args.duration_s)
    counters: dict[str, int] = {}
    with serve_system(system, setup, sims, work, args) as front:
        asyncio.run(warm_up(front.endpoint))
        wait_idle(list(sims.values()))
        pids = {"front": front.pid, **{f"sim-{t}": sims[t].process.pid for t in TIERS}}
        cpu0 = {k: process_cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
        t0 = time.monotonic()
        outcomes = asyncio.run(replay(front.endpoint, arrivals, args.duration_s, args.straggle_s))
        wall = time.monotonic() - t0
        cpu1 = {k: process_cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
        if front.metrics_url:
            counters = admission_counters(front.metrics_url)
    drain_s = wait_idle(list(sims.values()))
    summary = summarize(outcomes, setup.trace.name, load, system.key, args.duration_s, setup.threshold, args)
    dump_outcomes(work / f"{setup.trace.name}-{load:g}-{system.key}.jsonl", outcomes)
    return RunResult(
        **summary,
        cpu={k: (cpu1[k] - cpu0[k]) / wall for k in cpu0},
        admission=counters,
        startup_s=front.startup_s,
        drain_s=drain_s,
        wall_s=time.monotonic() - started,
    )


def dump_outcomes(path: Path, outcomes: Sequence[Outcome]) -> None:
    """Every request of a run, one JSON object a line, for looking closer afterwards."""
    with open(path, "w") as f:
        for o in outcomes:
            f.write(json.dumps({**asdict(o), "ttft_s": o.ttft_s, "tpot_s": o.tpot_s}) + "\n")


# --------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def results_table(results: Sequence[RunResult]) -> list[str]:
    head = (
        "| load | system | offered req/s | goodput req/s | good output tok/s | sent | completed | "
        "refused (429) | "
        "of which after queueing (mean wait s) | failed | "
        "timed out | late TTFT | slow TPOT | p50 TTFT ms | p99 TTFT ms | p50 TPOT ms | p99 TPOT ms | "
        "on large | spilled | mean queue ms | CPU front / sims / client |"
    )
    lines = [head, "|" + " ---: | --- |" + " ---: |" * 19]
    for r in results:
        cpu = r.cpu
        sims_cpu = cpu.get("sim-small", 0) + cpu.get("sim-large", 0)
        lines.append(
            f"| {r.load:g}x | {SYSTEMS[r.system].label} | {r.offered_rps:.2f} | **{r.goodput_rps:.2f}** | "
            f"{r.goodput_tok_s:.0f} | "
            f"{r.sent} | {r.completed} | {r.refused} | {r.refused_late} ({_f(r.refused_late_wait_s)}) | "
            f"{r.failed} | {r.timed_out} | {r.miss_ttft} | "
            f"{r.miss_tpot} | {_ms(r.ttft_p50_s)} | {_ms(r.ttft_p99_s)} | {_f(r.tpot_p50_ms, 0)} | "
            f"{_f(r.tpot_p99_ms, 0)} | {_f(None if r.large_share is None else 100 * r.large_share, 0)}% | "
            f"{r.spilled if SYSTEMS[r.system].kind == 'icgate' else '-'} | {_f(r.queue_ms_mean, 0)} | "
            f"{cpu.get('front', 0):.0%} / {sims_cpu:.0%} / {cpu.get('client', 0):.0%} |"
        )
    return lines


def best_baseline(results: Sequence[RunResult], trace: str, load: float) -> RunResult | None:
    rivals = [r for r in results if r.trace == trace and r.load == load and r.system != "icgate"]
    return max(rivals, key=lambda r: r.goodput_rps, default=None)


def ratio_lines(results: Sequence[RunResult], ttft_slo_s: float) -> list[str]:
    lines = [
        "| trace | load | (a) goodput | best of (b), (c1), (c2) | its goodput | ratio | (a) p99 TTFT ms "
        "| target met |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if r.system != "icgate":
            continue
        rival = best_baseline(results, r.trace, r.load)
        if rival is None:
            continue
        ratio = r.goodput_rps / rival.goodput_rps if rival.goodput_rps > 0 else math.inf
        ttft_ok = r.ttft_p99_s is not None and r.ttft_p99_s <= ttft_slo_s
        met = "yes" if ratio >= 1.5 and ttft_ok else "no"
        target = f"{met}" if r.load == 1.5 else f"({met}; the target is set at 1.5x)"
        lines.append(
            f"| {r.trace} | {r.load:g}x | {r.goodput_rps:.2f} | {SYSTEMS[rival.system].label} | "
            f"{rival.goodput_rps:.2f} | **{ratio:.2f}x** | {_ms(r.ttft_p99_s)} | {target} |"
        )
    return lines


def setup_lines(setup: TraceSetup, tpot_slo_ms: float) -> list[str]:
    t = setup.trace
    lines = [
        f"- trace `{TRACE_FILES[t.name]}`: {len(t.rows)} requests, prompt mean "
        f"{np.mean(t.prompts):.0f} / median {np.median(t.prompts):.0f} tokens, output mean "
        f"{np.mean([r.output_tokens for r in t.rows]):.0f}; {t.clipped} prompts clipped to fit the KV cache",
    ]
    mix = setup.mix
    prompts = np.array([r.prompt_tokens for r in mix])
    if setup.mix_rows:
        whole = setup.whole_capacity or {}
        lines.append(
            f"- replayed rows: the first {setup.mix_rows} (the largest window), prompt mean "
            f"{prompts.mean():.0f}, output mean {np.mean([r.output_tokens for r in mix]):.0f}; capacity "
            "below is measured with this mix (with the whole trace's mix, which only sized the window: "
            + ", ".join(f"{k} {c.req_s:.2f}" for k, c in whole.items())
            + " req/s)"
        )
    mean_output = float(np.mean([r.output_tokens for r in mix]))
    for tier in TIERS:
        c = setup.capacity[tier]
        lines.append(
            f"- `{tier}` capacity: **{c.req_s:.2f} req/s** ({c.output_tok_s:.0f} output tok/s / "
            f"{mean_output:.0f}, the mix's mean output). Other estimates from the same window, for its "
            f"noise: finished requests {c.completions_s:.2f}/s; prefilled {c.prompt_tok_s:.0f} tok/s / "
            f"{prompts.mean():.0f}, the mix's mean prompt = {c.prompt_tok_s / prompts.mean():.2f}/s"
        )
    lines.append(
        f"- C = {setup.total_capacity:.2f} req/s; large share {setup.large_share:.1%} -> rule threshold "
        f"`large_if_prompt_tokens_over: {setup.threshold}` (share of the replayed rows above it: "
        f"{float(np.mean(prompts > setup.threshold)):.1%})"
    )
    for tier in TIERS:
        p = setup.plans[tier]
        cfg = EngineConfig.preset(tier)
        lines.append(
            f"- `{tier}` `max_concurrent: {p.max_concurrent}`: its sub-mix has mean prefill "
            f"{p.mean_prefill_ms:.0f} ms and mean output {p.mean_output:.0f} tokens; TPOT(n) = "
            f"{cfg.decode_ms_base:g} + {cfg.decode_ms_per_seq:g}*n + n*{p.mean_prefill_ms:.0f}/"
            f"{p.mean_output:.0f} ms fits {TPOT_MARGIN:.0%} of {tpot_slo_ms:g} ms up to n = "
            f"{p.tpot_cap}; the KV cache holds {p.kv_cap} such requests; priors `expected_tpot_ms: "
            f"{p.predicted_tpot_ms:.0f}`, `expected_ttft_ms: {p.predicted_ttft_ms:.0f}`"
        )
    return lines


def arrival_lines(setup: TraceSetup, loads: Sequence[float], args: argparse.Namespace) -> list[str]:
    """How bursty each replay is: arrivals per tenth of the window, as multiples of capacity."""
    lines = []
    for load in loads:
        arrivals = schedule(setup.trace, load * setup.total_capacity, args.duration_s)
        tenth = args.duration_s / 10
        counts = np.histogram([a.due_s for a in arrivals], bins=10, range=(0, args.duration_s))[0]
        rates = " ".join(f"{c / tenth / setup.total_capacity:.1f}" for c in counts)
        lines.append(
            f"- {load:g}x: {len(arrivals)} requests (trace rows 0-{len(arrivals) - 1}); offered rate per "
            f"tenth of the window, in multiples of C: {rates}"
        )
    return lines


def admission_lines(results: Sequence[RunResult]) -> list[str]:
    lines = [
        "| trace | load | system | icgate_admission_total (backend/outcome) | errors |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for r in results:
        if SYSTEMS[r.system].kind != "icgate" and not r.errors:
            continue
        counters = ", ".join(f"{k} {v}" for k, v in sorted(r.admission.items())) or "-"
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        lines.append(f"| {r.trace} | {r.load:g}x | {SYSTEMS[r.system].label} | {counters} | {errors} |")
    return lines


def plot(results: Sequence[RunResult], traces: Sequence[str], ttft_slo_s: float, path: Path) -> None:
    """Goodput vs load (top row) and p99 TTFT vs load (bottom row), one column per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(traces), figsize=(5.5 * len(traces), 8), squeeze=False)
    for col, trace in enumerate(traces):
        top, bottom = axes[0][col], axes[1][col]
        for key, system in SYSTEMS.items():
            rows = sorted((r for r in results if r.trace == trace and r.system == key), key=lambda r: r.load)
            if not rows:
                continue
            loads = [r.load for r in rows]
            top.plot(loads, [r.goodput_rps for r in rows], marker="o", label=system.label)
            bottom.plot(loads, [r.ttft_p99_s or np.nan for r in rows], marker="o", label=system.label)
        offered = sorted({(r.load, r.offered_rps) for r in results if r.trace == trace})
        if offered:
            top.plot([o[0] for o in offered], [o[1] for o in offered], "k:x", label="offered")
        top.set(title=f"{trace}: goodput", xlabel="load (x capacity)", ylabel="good req/s")
        top.set_ylim(bottom=0)
        bottom.axhline(ttft_slo_s, color="grey", linestyle="--", label="TTFT objective")
        bottom.set(title=f"{trace}: p99 TTFT of completed", xlabel="load (x capacity)", ylabel="seconds")
        bottom.set_yscale("log")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    path: Path,
    results: Sequence[RunResult],
    setups: dict[str, TraceSetup],
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    traces = list(setups)
    lines = [
        "# Load benchmark: admission vs. no admission vs. LiteLLM's proxy on Azure LLM traces",
        "",
        f"- date: {meta['date']} (run took {meta['took_s'] / 60:.1f} min)",
        f"- machine: {os.cpu_count()} CPUs; {platform.platform()}; load average (1, 5, 15 min) at start "
        f"{meta['load_start']}, at end {meta['load_end']} (shared, noisy machine)",
        f"- python {platform.python_version()}; LiteLLM proxy `litellm[proxy]=={LITELLM_VERSION}` "
        "in its own venv",
        f"- code: {meta['commit']}",
        f"- command: `{meta['command']}`",
        f"- objectives: TTFT <= {args.ttft_slo_ms:g} ms (from the client's send), "
        f"TPOT <= {args.tpot_slo_ms:g} ms; "
        f"window {args.duration_s:g} s per run, then at most {args.straggle_s:g} s for stragglers; "
        f"(a) aims {args.ttft_margin:.0%} under the TTFT objective (`admission.ttft_margin`)",
        f"- per-request logs and configs: `{meta['work']}` (not kept)",
        "",
        "## Setup",
        "",
    ]
    lines += METHOD.splitlines()
    for trace in traces:
        lines += [
            "",
            f"### `{trace}`: capacity and policy",
            "",
            *setup_lines(setups[trace], args.tpot_slo_ms),
            *arrival_lines(setups[trace], sorted({r.load for r in results if r.trace == trace}), args),
        ]
    lines += [
        "",
        "## Target: (a)'s goodput over the best baseline",
        "",
        *ratio_lines(results, args.ttft_slo_ms / 1000),
    ]
    for trace in traces:
        rows = [r for r in results if r.trace == trace]
        lines += ["", f"## Results: `{trace}`", "", *results_table(rows)]
    lines += ["", "## Admission counters and errors", "", *admission_lines(results)]
    lines += ["", f"![goodput and p99 TTFT vs load]({path.with_suffix('.png').name})", ""]
    lines += ["## Caveats", "", *CAVEATS.splitlines()]
    path.write_text("\n".join(lines) + "\n")


METHOD = f"""\
- **Backends**: two simulators (`python -m bench.simulator --preset small|large`), one process each,
  started once and shared by all systems; before each run they are idle (0 running, 0 waiting). They
  cost time like vLLM's continuous batching (prefill per prompt token, a decode step per batch, no
  chunked prefill, so a prefill stalls the running batch) and count words as tokens.
- **Capacity**: per trace and backend, a closed loop of many clients sends the rows that will be
  replayed, shuffled, straight to the simulator; after a warm-up, req/s = generated tokens/s over the
  window divided by the rows' mean output length. C = C_small + C_large; load k offers k*C req/s.
  Two other estimates from the same window (finished requests; prefilled tokens / mean prompt) are
  shown below: they differ by 10-60%, so a 20 s window is short for these heavy-tailed mixes.
  The trace is not stationary (its first rows have longer answers and fewer long prompts than the
  whole), so a quick first measurement with the whole trace's mix only sizes the largest replay
  window, and C is measured with that window.
- **Replay**: the trace's first n = k*C*window rows, in order; their gaps are scaled by one factor so
  the window lasts exactly its duration (the trace's burstiness is kept). Each request is a streamed
  chat completion (`stream_options.include_usage`) with a prompt of ContextTokens words `tok` and
  `max_tokens` = GeneratedTokens, so the answer has the trace's length. Requests still open after the
  straggler wait are cancelled and count as misses (timed out).
- **Systems**, one fresh process per (system, load), in the order (a), (b), (c1), (c2) at each load:
  (a)/(b) `icgate serve --no-launch` with identical policies but `admission.enabled`; routed model
  `auto`, rule router (threshold below), both backends `client: http` with `metrics_url`, cache off, no
  embedding preload. (c1)/(c2) `litellm --config ... --num_workers 1` (bench/litellm_proxy.py) with one
  model group over the two simulators, `num_retries: 0`; simple-shuffle gets `weight` = each backend's
  measured capacity, so it splits like the rule does on average; least-busy balances in-flight
  counts. LiteLLM neither queues nor refuses: it forwards everything, and the simulators queue. Its
  guard against looping models (abort a stream after 100 identical chunks) is raised out of the way
  (`REPEATED_STREAMING_CHUNK_LIMIT`), since the simulator answers `tok tok tok ...`.
- **Why the threshold**: the rule sends prompts longer than T to `large`; T is the prompt quantile
  that gives `large` its share of the measured capacity, so (b) is not handicapped by a lopsided split.
- **Why max_concurrent** (only (a) enforces it): a decode step of n sequences takes
  decode_ms_base + decode_ms_per_seq*n, and in steady state n/mean_output sequences are replaced per
  step, each costing its prefill, which stalls the batch. n is the largest batch whose predicted TPOT
  stays within {TPOT_MARGIN:.0%} of the objective (the rest is headroom for bursts of prefills) and
  whose mean request fits the KV cache. The priors `expected_ttft_ms` / `expected_tpot_ms` come from
  the same model.
- **Metrics**: good = status 200, stream finished, TTFT (first chunk with content, from the client's
  send) <= objective and TPOT = (end - first token)/(tokens - 1) <= objective; goodput = good /
  window. Percentiles are over completed requests (refused and timed-out ones have none). *Spilled* =
  served by the tier the rule did not pick (x-icgate-backend); *CPU* = share of one core each process
  used during the replay (2 cores in all)."""

CAVEATS = """\
- The replay sends `max_tokens` = the true output length, and icgate predicts a request's output as
  its length predictor's p50 capped by `max_tokens`: admission's service-time estimate is informed by
  that cap (exact whenever the prediction exceeds the true length). A real client's `max_tokens` is a
  loose bound.
- Everything (simulators, gateway or proxy, load generator) shares 2 noisy cores; the CPU column shows
  who used them. A front process near 100% of a core adds its own queueing to TTFT.
- The simulators are a cost model, not GPUs. Capacity is measured with all replayed rows on each
  backend, while under the rule each backend sees a sub-mix (long prompts on `large`), whose capacity
  in req/s differs; smaller windows (lower loads) are prefixes of the measured one.
- Each cell is one run of one window (the first rows of the trace); no repetitions, so differences of
  a few percent are noise."""


# --------------------------------------------------------------------------- main


def parse_loads(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default="conv,code", help="comma list of: " + ", ".join(TRACE_FILES))
    p.add_argument("--loads", default="1,1.5,2", help="loads as multiples of capacity, for every trace")
    p.add_argument(
        "--trace-loads",
        action="append",
        default=None,
        metavar="TRACE=LOADS",
        help="override --loads for one trace, e.g. code=1.5 (default: code=1.5)",
    )
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of: " + ", ".join(SYSTEMS))
    p.add_argument("--duration-s", type=float, default=60.0, help="offered load per run")
    p.add_argument("--straggle-s", type=float, default=30.0, help="wait after the window before cancelling")
    p.add_argument("--ttft-slo-ms", type=float, default=1500.0)
    p.add_argument(
        "--ttft-margin",
        type=float,
        default=0.1,
        help="icgate's admission.ttft_margin: the share of the TTFT objective it keeps in reserve",
    )
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--capacity-s", type=float, default=20.0)
    p.add_argument("--capacity-warmup-s", type=float, default=8.0)
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    p.add_argument("--rerender", type=Path, metavar="WORK_DIR", help="rebuild the report of a finished run")
    return p


def loads_per_trace(args: argparse.Namespace) -> dict[str, list[float]]:
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    unknown = [t for t in traces if t not in TRACE_FILES]
    if unknown:
        raise SystemExit(f"unknown traces {unknown}")
    plan = {t: parse_loads(args.loads) for t in traces}
    for item in args.trace_loads if args.trace_loads is not None else ["code=1.5"]:
        name, _, loads = item.partition("=")
        if name in plan:
            plan[name] = parse_loads(loads)
    return plan


def _commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = " plus uncommitted changes" if git("status", "--porcelain") else ""
    return f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}"


def kv_limit() -> int:
    """The smaller simulator's KV cache: a request routed to either backend must fit it."""
    return min(EngineConfig.preset(t).kv_cache_tokens for t in TIERS)


def setup_to_json(setup: TraceSetup) -> dict[str, Any]:
    whole = setup.whole_capacity
    return {
        "trace": setup.trace.name,
        "capacity": {t: asdict(c) for t, c in setup.capacity.items()},
        "threshold": setup.threshold,
        "plans": {t: asdict(p) for t, p in setup.plans.items()},
        "mix_rows": setup.mix_rows,
        "whole_capacity": {t: asdict(c) for t, c in whole.items()} if whole else None,
    }


def setup_from_json(raw: dict[str, Any]) -> TraceSetup:
    return TraceSetup(
        load_trace(raw["trace"], kv_limit()),
        {t: Capacity(**c) for t, c in raw["capacity"].items()},
        int(raw["threshold"]),
        {t: BackendPlan(**p) for t, p in raw["plans"].items()},
        raw.get("mix_rows", 0),
        {t: Capacity(**c) for t, c in raw["whole_capacity"].items()} if raw.get("whole_capacity") else None,
    )


def run_benchmark(args: argparse.Namespace, work: Path) -> tuple[list[RunResult], dict[str, TraceSetup]]:
    """Simulators up, then per trace: capacity, policy choices, and every (load, system) run.

    What a run produces is saved in `work` as it goes (setups.json, results.json, one .jsonl of
    requests per run), so `--rerender` can rebuild the report without running again.
    """
    plan = loads_per_trace(args)
    systems = [SYSTEMS[s.strip()] for s in args.systems.split(",") if s.strip()]
    if any(s.kind == "litellm" for s in systems):
        ensure_proxy_venv(quiet=False)
    sims = {t: start_sim(t, work) for t in TIERS}
    results: list[RunResult] = []
    setups: dict[str, TraceSetup] = {}
    try:
        for name, loads in plan.items():
            setup = prepare_trace(load_trace(name, kv_limit()), max(loads), sims, args)
            setups[name] = setup
            (work / "setups.json").write_text(json.dumps([setup_to_json(x) for x in setups.values()]))
            print(f"[{name}] C = {setup.total_capacity:.2f} req/s, rule threshold {setup.threshold}")
            print(f"[{name}] plans {setup.plans}", flush=True)
            for load in loads:
                for system in systems:
                    result = run_one(system, setup, load, sims, work, args)
                    results.append(result)
                    (work / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
                    print(json.dumps(asdict(result)), flush=True)
    finally:
        for sim in sims.values():
            sim.process.stop()
    return results, setups


def rerender(work: Path, out: Path) -> int:
    """Rebuild the report from a finished run's work dir, summarising its requests again."""
    meta = json.loads((work / "meta.json").read_text())
    args = argparse.Namespace(**meta["args"])
    setups = {raw["trace"]: setup_from_json(raw) for raw in json.loads((work / "setups.json").read_text())}
    names = {f.name for f in dataclasses.fields(Outcome)}
    results = []
    for raw in json.loads((work / "results.json").read_text()):
        path = work / f"{raw['trace']}-{raw['load']:g}-{raw['system']}.jsonl"
        with open(path) as f:
            outcomes = [Outcome(**{k: v for k, v in json.loads(line).items() if k in names}) for line in f]
        threshold = setups[raw["trace"]].threshold
        summary = summarize(
            outcomes, raw["trace"], raw["load"], raw["system"], raw["duration_s"], threshold, args
        )
        kept = {k: raw[k] for k in ("cpu", "admission", "startup_s", "drain_s", "wall_s")}
        results.append(RunResult(**summary, **kept))
    render(out, results, setups, meta, args)
    return 0


def render(
    out: Path,
    results: Sequence[RunResult],
    setups: dict[str, TraceSetup],
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, list(setups), args.ttft_slo_ms / 1000, out.with_suffix(".png"))
    write_report(out, results, setups, meta, args)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Stopped with SIGTERM, still stop the simulators and the gateway or proxy (the `finally`s).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.rerender:
        return rerender(args.rerender, args.out)
    started, load_start = time.monotonic(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="icgate-load-"))
    print(f"work dir {work}", flush=True)
    results, setups = run_benchmark(args, work)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "took_s": time.monotonic() - started,
        "load_start": load_start,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": _commit(),
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/load.py", *(argv or sys.argv[1:])]
        ),
        "work": str(work),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    render(args.out, results, setups, meta, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
