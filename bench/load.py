"""Load benchmark: icgate's admission (learned, constant and oracle lengths) vs. LiteLLM's proxy.

    .venv/bin/python bench/load.py  # content 1x, 1.5x (+ max_tokens 1024), 2x; conv 1x, 1.5x, 2x; code 1.5x
    .venv/bin/python bench/load.py --traces content --loads 1.5 --duration-s 15 --capped none  # a smoke run

Two simulated backends (bench/simulator: `small`, fast; `large`, slower), each its own process,
are started once and shared by every system. First their capacity is measured with each trace's
request mix (closed loop, directly against the simulator), C = C_small + C_large. Then, per trace,
load k and what the client sends as `max_tokens`, a window of the trace is replayed open loop at a
mean rate of k*C (its burstiness kept, its inter-arrival times scaled) through each system in turn:

    (a)  icgate, admission, shipped length predictor (cold start)
    (a+) icgate, admission, each backend's own predictor, learned by the same gateway in a learning
         phase of other prompts just before its window   (a0) icgate, admission, one constant length
    (a*) icgate, admission, oracle length (the ceiling) (b)  icgate, admission off
    (c1) LiteLLM simple-shuffle   (c2) LiteLLM least-busy
    (c3) LiteLLM least-busy + max_parallel_requests   (c4) LiteLLM simple-shuffle + max_parallel_requests
    and, only when named in --systems: (a+s) and (a*s), (a+) and (a*) with `admission.shed_long_quantile`

Traces: `content` replays real prompts with known answer lengths (bench/content_trace.py) at the conv
trace's arrival times, the measured half of its conversations only ((a+) learns from the other half);
`conv` and `code` replay the Azure traces' token counts with synthetic prompts.
The client sends no `max_tokens` (or one fixed cap on every request, `--capped`); only (a*)'s client
sends the true length. The simulators learn each request's true length out of band, from a file keyed
by a hash of the conversation that only they read (bench/simulator/lengths.py).

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
from collections.abc import Callable, Iterator, Sequence
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

from bench import content_trace  # noqa: E402
from bench.content_trace import Item  # noqa: E402
from bench.harness import cache_entries, code_label, gateway_engine  # noqa: E402
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
from bench.simulator.lengths import KnownLength, LengthBook, prompt_key  # noqa: E402

TRACE_DIR = REPO.parent / "shared" / "data" / "traces"
TRACE_FILES = {
    "conv": "AzureLLMInferenceTrace_conv.csv",
    "code": "AzureLLMInferenceTrace_code.csv",
}
CONTENT = "content"  # real prompts at the conv trace's arrival times (bench/content_trace.py)
CONTENT_TIMES = "conv"
TRACES = (CONTENT, *TRACE_FILES)
ICGATE = REPO / ".venv" / "bin" / "icgate"
# "tok " is one simulator token (a word) and four characters, so the gateway's chars/4 prompt
# estimate equals the simulator's word count.
WORD = "tok "
# An Azure row's synthetic prompt starts with a per-request id of 3 base-36 characters (plus a space:
# one word, four characters, so the estimate above still holds). Each trace draws its ids from its own
# range, so conv and code never share a prompt; the id means nothing to a gateway, and only the
# simulator's length file maps the prompt to the trace's GeneratedTokens.
RID_CHARS = 3
RID_RANGES = {"conv": (0, 20_000), "code": (20_000, 36**RID_CHARS)}
# Share of the TPOT objective a full batch may use in the cost model: the rest absorbs bursts of
# prefills, which stall every running sequence (the simulator has no chunked prefill).
TPOT_MARGIN = 0.8
SEED = 0
REFUSED_LATE_S = 0.1  # without a recognisable body, a 429 slower than this was held in a queue first
# icgate's 429 for a request it queued and then could not start in time (gateway/backends/admission.py
# `_too_late`); every other admission 429 comes at arrival.
LATE_REFUSAL_TEXT = "could not start in time"
# (a*)'s constant prediction: far above any answer, so icgate's cap at the client's max_tokens (the
# true length) is what admission sees, for every request.
ORACLE_CONSTANT = 1_000_000
Tier = Literal["small", "large"]
TIERS: tuple[Tier, Tier] = ("small", "large")


# --------------------------------------------------------------------------- the trace


def base36(n: int, width: int = RID_CHARS) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(width):
        n, d = divmod(n, 36)
        out = digits[d] + out
    if n:
        raise ValueError("number too large for the width")
    return out


def synthetic_prompt(rid: str, prompt_tokens: int) -> str:
    """`rid tok tok ...`: `prompt_tokens` words and 4*`prompt_tokens` characters."""
    return f"{rid} " + WORD * (prompt_tokens - 1)


@dataclass(frozen=True)
class TraceRow:
    at_s: float  # seconds since the trace's first row
    prompt_tokens: int  # what the simulator charges: ContextTokens, or cl100k of the real conversation
    output_tokens: int  # the true answer length, which only the simulator is told (out of band)
    rid: str = ""  # an Azure row: the per-request id its synthetic prompt starts with
    item: Item | None = None  # a content row: the real conversation

    @property
    def source(self) -> str:
        return self.item.source if self.item is not None else "azure"

    def messages(self) -> list[dict[str, str]]:
        if self.item is not None:
            return self.item.messages()
        return [{"role": "user", "content": synthetic_prompt(self.rid, self.prompt_tokens)}]

    @property
    def routing_tokens(self) -> int:
        """The gateway's prompt estimate (chars/4 over every message): what the rule router compares."""
        if self.item is None:
            return self.prompt_tokens
        return max(1, sum(len(text) for _, text in self.item.conversation) // 4)


@dataclass(frozen=True)
class Trace:
    name: str
    rows: list[TraceRow]
    clipped: int  # prompts shortened to fit the smaller KV cache
    half: content_trace.Half = "measure"  # learn: (a+)'s learning traffic, never replayed in a window

    @property
    def prompts(self) -> np.ndarray:
        return np.array([r.prompt_tokens for r in self.rows])

    @property
    def file(self) -> str:
        if self.name == CONTENT:
            return (
                f"{TRACE_FILES[CONTENT_TIMES]} (arrival times) + real prompts (bench/content_trace.py), "
                f"the {self.half} half"
            )
        return TRACE_FILES[self.name]


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' as POSIX seconds (strptime takes at most 6 fraction digits)."""
    head, _, frac = stamp.strip().partition(".")
    whole = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def load_trace(
    name: str,
    kv_tokens: int,
    weights: dict[str, float] | None = None,
    pool: dict[str, list[Item]] | None = None,
    half: content_trace.Half = "measure",
) -> Trace:
    """Read a trace. Azure: outputs of 0 become 1 and prompts are clipped so prompt+output fits `kv_tokens`;
    each row gets its per-request id. `content`: the conv trace's times, each row a real conversation of
    `half` of the pool (`content_trace.split_pool`; every system's windows replay the measured half, (a+)'s
    learning phase the other), assigned by `content_trace.assign` with `weights`; `pool` saves reading the
    sources again."""
    if name == CONTENT:
        times = load_trace(CONTENT_TIMES, kv_tokens)
        pool = pool if pool is not None else content_trace.load_pool()
        mine = content_trace.split_pool(pool)[half]
        chosen = content_trace.assign(len(times.rows), mine, weights or content_trace.DEFAULT_WEIGHTS, SEED)
        rows = []
        for row, pick in zip(times.rows, chosen, strict=True):
            item = pick.item
            if item.prompt_tokens + item.output_tokens > kv_tokens:
                raise ValueError(
                    f"{item.source} {item.item_id} does not fit the KV cache ({kv_tokens} tokens)"
                )
            rows.append(TraceRow(row.at_s, item.prompt_tokens, item.output_tokens, item=item))
        return Trace(name, rows, 0, half)
    path = TRACE_DIR / TRACE_FILES[name]
    low, high = RID_RANGES[name]
    rows, clipped, start = [], 0, None
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    if len(records) > high - low:
        raise ValueError(f"{name}: {len(records)} rows, but only {high - low} request ids")
    ids = random.Random(f"rid-{name}").sample(range(low, high), len(records))
    for rec, rid in zip(records, ids, strict=True):
        at = _seconds(rec["TIMESTAMP"])
        start = at if start is None else start
        output = max(1, int(rec["GeneratedTokens"]))
        prompt = max(1, int(rec["ContextTokens"]))
        if prompt + output > kv_tokens:
            prompt, clipped = max(1, kv_tokens - output), clipped + 1
        rows.append(TraceRow(at - start, prompt, output, rid=base36(rid)))
    return Trace(name, rows, clipped)


def learning_trace(
    trace: Trace,
    kv_tokens: int,
    weights: dict[str, float] | None = None,
    pool: dict[str, list[Item]] | None = None,
) -> Trace:
    """(a+)'s learning traffic for `trace`: for `content`, the learning half of the conversations (none
    of which a window replays); for an Azure trace, its second half of rows (each row's prompt carries an
    id of its own, and a window replays only rows from the first half: `check_learning_apart`)."""
    if trace.name == CONTENT:
        return load_trace(CONTENT, kv_tokens, weights, pool, half="learn")
    return Trace(trace.name, trace.rows[len(trace.rows) // 2 :], trace.clipped, "learn")


def check_learning_apart(learning: Trace, arrivals: Sequence[Arrival]) -> None:
    """ValueError if a replayed request's conversation is one the learning phase sends."""
    learned = {prompt_key(r.messages()) for r in learning.rows}
    seen = [a.index for a in arrivals if a.row is not None and prompt_key(a.row.messages()) in learned]
    if seen:
        raise ValueError(f"{learning.name}: {len(seen)} replayed rows are learning traffic (first {seen[0]})")


def length_book(traces: Sequence[Trace]) -> LengthBook:
    """What the simulators alone are told: each row's conversation -> its prompt and true answer tokens.

    A conversation that appears twice means one length (content_trace gives each one length); a clash
    would make the lookup ambiguous, so it is an error."""
    entries: dict[str, KnownLength] = {}
    for trace in traces:
        for row in trace.rows:
            key = prompt_key(row.messages())
            known = KnownLength(row.prompt_tokens, row.output_tokens)
            if entries.setdefault(key, known) != known:
                raise ValueError(f"{trace.name}: one conversation, two lengths ({entries[key]} and {known})")
    return LengthBook(entries)


@dataclass(frozen=True)
class Arrival:
    index: int  # row in the trace
    due_s: float  # offset from the replay's start
    prompt_tokens: int
    output_tokens: int
    row: TraceRow | None = None  # None: a synthetic prompt of `prompt_tokens` words, without an id


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
        Arrival(i, (r.at_s - trace.rows[0].at_s) * scale, r.prompt_tokens, r.output_tokens, r)
        for i, r in enumerate(trace.rows[:n])
    ]


@dataclass(frozen=True)
class ClientMode:
    """What the client puts in `max_tokens`: nothing (`none`), one cap on every request (`capN`), or the
    true length (`oracle`, the old setup: (a*) only)."""

    key: str
    cap: int | None = None

    def max_tokens(self, true_tokens: int) -> int | None:
        return true_tokens if self.key == "oracle" else self.cap

    @property
    def label(self) -> str:
        if self.key == "oracle":
            return "max_tokens = the true length"
        return "no max_tokens" if self.cap is None else f"max_tokens {self.cap} on every request"


NO_MAX_TOKENS = ClientMode("none")
ORACLE = ClientMode("oracle")


def client_mode(text: str) -> ClientMode:
    """`none`, `oracle`, or a cap: `cap1024` or `1024`."""
    text = text.strip().lower()
    if text in ("none", "oracle"):
        return NO_MAX_TOKENS if text == "none" else ORACLE
    cap = int(text.removeprefix("cap"))
    if cap < 1:
        raise ValueError("a max_tokens cap must be positive")
    return ClientMode(f"cap{cap}", cap)


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


def start_sim(tier: Tier, logs: Path, lengths: Path | None = None) -> Sim:
    """One simulator process; with `lengths`, it alone knows each replayed request's true length."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.simulator", "--preset", tier, "--port", str(port)]
    cmd += ["--model-name", f"sim-{tier}"]
    if lengths is not None:
        cmd += ["--lengths", str(lengths)]
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
    max_tokens: int | None  # what the client sent (None: no max_tokens)
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
    output_tokens: int | None = None  # the true length (the benchmark knows it; the client never sends it)
    routing_tokens: int | None = None  # the gateway's prompt estimate, when it differs from prompt_tokens
    source: str | None = None  # where the prompt comes from (azure, arena-hard, gsm8k, meancache)
    refusal: str | None = None  # a 429's kind: "arrival" or "queue" (after waiting in icgate's queue)
    cache_skipped: str | None = None  # x-icgate-cache-skipped (embedder-busy: no embedding for the predictor)
    examples: int | None = None  # x-icgate-examples: in-context examples prepended (must stay 0 here)
    route: str | None = None  # x-icgate-route: a tier, or `cache` for an answer the cache gave
    # The conversation sent; None: `prompt_tokens` words of `tok`. Not kept in the per-request log.
    messages: list[dict[str, str]] | None = field(default=None, repr=False)

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


def outcome_for(arrival: Arrival, client: ClientMode) -> Outcome:
    """The request `arrival` becomes when the client sends `client`'s max_tokens."""
    row = arrival.row
    return Outcome(
        arrival.index,
        arrival.prompt_tokens,
        client.max_tokens(arrival.output_tokens),
        output_tokens=arrival.output_tokens,
        routing_tokens=row.routing_tokens if row is not None else None,
        source=row.source if row is not None else None,
        messages=row.messages() if row is not None else None,
    )


def chat_body(
    model: str, prompt_tokens: int, max_tokens: int | None, messages: list[dict[str, str]] | None = None
) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages if messages is not None else [{"role": "user", "content": WORD * prompt_tokens}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def refusal_kind(body: str, waited_s: float | None) -> str:
    """Whether a 429 came at arrival or after queueing: icgate says so in its message (LATE_REFUSAL_TEXT);
    LiteLLM never waits for a slot (its 429 may still be slow to come from a busy proxy). Without either
    (another gateway), the time it took decides."""
    if LATE_REFUSAL_TEXT in body:
        return "queue"
    if waited_s is None or any(
        sign in body for sign in ("backend_at_capacity", "litellm", "max_parallel_requests")
    ):
        return "arrival"
    return "queue" if waited_s > REFUSED_LATE_S else "arrival"


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


def _int_header(value: str | None) -> int | None:
    return int(value) if value else None


async def send(session: aiohttp.ClientSession, endpoint: Endpoint, out: Outcome) -> None:
    """Send one streamed chat completion and fill in `out` as it goes (a cancel leaves it partial)."""
    headers = {"content-type": "application/json", **endpoint.headers}
    out.sent = time.perf_counter()
    try:
        body = chat_body(endpoint.model, out.prompt_tokens, out.max_tokens, out.messages)
        async with session.post(endpoint.url, data=body, headers=headers) as resp:
            out.status = resp.status
            out.backend = resp.headers.get("x-icgate-backend") or resp.headers.get("x-litellm-model-id")
            queue = resp.headers.get("x-icgate-queue-ms")
            out.queue_ms = float(queue) if queue else None
            out.predicted_tokens = _int_header(resp.headers.get("x-icgate-predicted-tokens"))
            out.cache_skipped = resp.headers.get("x-icgate-cache-skipped")
            out.examples = _int_header(resp.headers.get("x-icgate-examples"))
            out.route = resp.headers.get("x-icgate-route")
            if resp.status != 200:
                out.retry_after = resp.headers.get("retry-after")
                text = await resp.text()
                out.error = text[:300]
                if resp.status == 429:
                    out.refusal = refusal_kind(text, time.perf_counter() - out.sent)
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


@dataclass(frozen=True)
class Objectives:
    """The TTFT and TPOT objectives, in seconds: what a request must meet to count as good."""

    ttft_s: float
    tpot_s: float

    def can_still_be_good(self, out: Outcome, now: float) -> bool:
        """Whether a request still open at `now` could yet finish within both objectives, given the
        length its answer will have (the benchmark knows it; the client never sends it)."""
        if out.sent is None:
            return True
        if out.first_token is None:
            return now - out.sent <= self.ttft_s
        if out.first_token - out.sent > self.ttft_s:
            return False
        tokens = out.output_tokens or 1
        if out.max_tokens is not None:
            tokens = min(tokens, out.max_tokens)
        return now - out.first_token <= max(1, tokens - 1) * self.tpot_s

    def straggle_s(self, arrivals: Sequence[Arrival], at_least_s: float) -> float:
        """Long enough for the window's longest answer at the objectives, so a request cut off at the end
        could not have been good."""
        longest = max((a.output_tokens for a in arrivals), default=1)
        return max(at_least_s, self.ttft_s + longest * self.tpot_s + 1.0)


async def replay(
    endpoint: Endpoint | Sequence[Endpoint],
    arrivals: Sequence[Arrival],
    duration_s: float,
    straggle_s: float,
    client: ClientMode = ORACLE,
    objectives: Objectives | None = None,
) -> list[Outcome]:
    """Send every arrival at its time, open loop; wait at most `straggle_s` past the window, then cancel.

    With `objectives`, the wait ends as soon as no open request can still be good (the rest were misses
    whatever happened next, and nothing more is measured), so a long straggler wait costs time only
    while it can change the result. Several endpoints (replicas, bench/replicas.py): arrival i goes to
    endpoint i mod N, round-robin. `client` decides max_tokens; the default, the true length, is the
    old setup bench/replicas.py keeps."""
    endpoints = [endpoint] if isinstance(endpoint, Endpoint) else list(endpoint)
    outcomes = [outcome_for(a, client) for a in arrivals]
    async with client_session() as session:
        start = time.perf_counter() + 0.2
        tasks = []
        for i, (arrival, out) in enumerate(zip(arrivals, outcomes, strict=True)):
            out.due = start + arrival.due_s
            delay = out.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(session, endpoints[i % len(endpoints)], out)))
        deadline = start + duration_s + straggle_s
        pending = {t for t in tasks if not t.done()}
        by_task = dict(zip(tasks, outcomes, strict=True))
        while pending:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(remaining, 0.5))
            now = time.perf_counter()
            if objectives is not None and not any(
                objectives.can_still_be_good(by_task[t], now) for t in pending
            ):
                break
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes


async def warm_up(endpoint: Endpoint, n: int = 6) -> int:
    """A few tiny requests (one token each), so lazy imports are not paid inside the measured window; how
    many were answered (all of them, or this raises)."""
    async with client_session() as session:
        for i in range(n):
            # A short and a long prompt: both tiers under a rule. Unknown to the simulators' length file,
            # they are answered with max_tokens (1) as before.
            out = Outcome(-1, 2 if i % 2 else 2000, 1)
            await send(session, endpoint, out)
            if out.status != 200:
                raise RuntimeError(f"warm-up request failed: {out.status} {out.error}")
    return n


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
                # Straight to the simulator, so max_tokens = the true length hides nothing from anyone; it
                # also sizes the answer when the simulator has no length file (bench/replicas.py).
                out = Outcome(-1, row.prompt_tokens, row.output_tokens, messages=row.messages())
                await send(session, endpoint, out)

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


def rule_tier(routing_tokens: int, threshold: int) -> Tier:
    """What the gateway's rule picks from its chars/4 estimate (`TraceRow.routing_tokens`)."""
    return "large" if routing_tokens > threshold else "small"


@dataclass
class TraceSetup:
    """Everything measured and decided for one trace before its load runs."""

    trace: Trace
    capacity: dict[Tier, Capacity]  # with the mix of the rows replayed
    threshold: int
    plans: dict[Tier, BackendPlan]
    mix_rows: int = 0  # the first rows of the trace, the largest replay window (0: the whole trace)
    whole_capacity: dict[Tier, Capacity] | None = None  # with the whole trace's mix (sizes the window)
    learning: Trace | None = None  # (a+)'s learning traffic (`learning_trace`), apart from every window

    @property
    def mix(self) -> list[TraceRow]:
        return self.trace.rows[: self.mix_rows] if self.mix_rows else self.trace.rows

    @property
    def total_capacity(self) -> float:
        return sum(c.req_s for c in self.capacity.values())

    @property
    def large_share(self) -> float:
        return self.capacity["large"].req_s / self.total_capacity

    @property
    def mean_output(self) -> float:
        """The replayed mix's mean answer: (a0)'s one constant length."""
        return float(np.mean([r.output_tokens for r in self.mix]))


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
    threshold = rule_threshold(np.array([r.routing_tokens for r in mix]), share)
    plans = {}
    for tier in TIERS:
        sub = [r for r in mix if rule_tier(r.routing_tokens, threshold) == tier]
        plans[tier] = plan_backend(sims[tier].config, tier, sub, args.tpot_slo_ms)
    return TraceSetup(trace, capacity, threshold, plans, mix_rows, whole)


# --------------------------------------------------------------------------- the systems


Lengths = Literal["learned", "constant", "oracle"]
# How icgate's per-backend length learning (`lengths.refit_interval_s`, gateway/store/length_learning.py)
# is set: `never` - no refit within a run, so the predictor in force never changes mid-window (samples are
# still written, so every icgate system pays the same per request); `phase` - (a+): refit often during its
# learning phase, and fit each backend once only, so the window's answers never train anything.
Refit = Literal["never", "phase"]
NO_REFIT_S = 36_000.0  # the first refit comes a tenth of this after start: an hour, long after any run
FIT_ONCE = 1_000_000_000  # (a+)'s `lengths.min_new_rows`: a backend once fitted is never refitted
SHED_QUANTILE = 0.75  # (a+s), (a*s): a request that would queue is refused if longer than 3/4 of recent ones


@dataclass(frozen=True)
class System:
    key: str
    label: str
    kind: Literal["icgate", "litellm"]
    admission: bool = False
    lengths: Lengths | None = None  # icgate with admission: what sizes a request's answer
    strategy: Literal["simple-shuffle", "least-busy"] | None = None
    max_parallel: bool = False  # LiteLLM: per-deployment max_parallel_requests = icgate's max_concurrent
    learn: bool = False  # icgate: a learning phase before the window ((a+): each backend's own predictor)
    shed: bool = False  # icgate: `admission.shed_long_quantile` (SHED_QUANTILE): the longest first under load

    @property
    def client(self) -> ClientMode | None:
        """The max_tokens this system's client always sends (None: the run's client mode)."""
        return ORACLE if self.lengths == "oracle" else None


SYSTEMS = {
    s.key: s
    for s in (
        System(
            "icgate",
            "(a) icgate, admission, shipped length predictor (cold start)",
            "icgate",
            True,
            "learned",
        ),
        System(
            "icgate-learn",
            "(a+) icgate, admission, each backend's own learned lengths (after a learning phase)",
            "icgate",
            True,
            "learned",
            learn=True,
        ),
        System("icgate-constant", "(a0) icgate, admission, one constant length", "icgate", True, "constant"),
        System("icgate-oracle", "(a*) icgate, admission, oracle length (ceiling)", "icgate", True, "oracle"),
        System(
            "icgate-learn-shed",
            "(a+s) icgate, admission, each backend's own learned lengths, the longest first under load",
            "icgate",
            True,
            "learned",
            learn=True,
            shed=True,
        ),
        System(
            "icgate-oracle-shed",
            "(a*s) icgate, admission, oracle length, the longest first under load (ceiling)",
            "icgate",
            True,
            "oracle",
            shed=True,
        ),
        System("icgate-off", "(b) icgate, admission off", "icgate", admission=False),
        System("litellm-shuffle", "(c1) LiteLLM simple-shuffle", "litellm", strategy="simple-shuffle"),
        System("litellm-least-busy", "(c2) LiteLLM least-busy", "litellm", strategy="least-busy"),
        System(
            "litellm-mpr",
            "(c3) LiteLLM least-busy + max_parallel_requests",
            "litellm",
            strategy="least-busy",
            max_parallel=True,
        ),
        System(
            "litellm-shuffle-mpr",
            "(c4) LiteLLM simple-shuffle + max_parallel_requests",
            "litellm",
            strategy="simple-shuffle",
            max_parallel=True,
        ),
    )
}
DEFAULT_SYSTEMS = (
    "icgate",
    "icgate-learn",
    "icgate-constant",
    "icgate-oracle",
    "icgate-off",
    "litellm-shuffle",
    "litellm-least-busy",
    "litellm-mpr",
    "litellm-shuffle-mpr",
)


def icgate_policy(
    setup: TraceSetup,
    sims: dict[Tier, Sim],
    admission: bool,
    args: argparse.Namespace,
    lengths: Lengths | None = None,
    refit: Refit | None = None,
    shed: bool = False,
) -> dict[str, Any]:
    """Every icgate variant gets this policy; `admission.enabled` and how answers are sized differ.

    `lengths`: learned - the shipped predictor (and, once a backend has its own, that one), fed the
    request's embedding, which the gateway makes only for the cache or a learned router, so the cache is on
    with nothing but a semantic lookup that can never hit (nothing is stored, no exact hits, no in-context
    examples: the prompt reaches the backend unchanged); constant - every request predicted the mix's mean
    answer; oracle - a constant above any answer, which icgate caps at the client's max_tokens, the true
    length. None (admission off, bench/replicas.py): the cache off, as before, so the predictor sees no
    embedding. `refit` (see `Refit`): None leaves the gateway's defaults. `shed`: the longest first under
    load (`admission.shed_long_quantile: SHED_QUANTILE`).
    """
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
    policy: dict[str, Any] = {
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
            "shed_long_quantile": SHED_QUANTILE if shed else None,
        },
    }
    if lengths == "learned":
        policy["cache"] = {
            "enabled": True,
            "exact": False,
            "semantic": True,
            "examples": False,
            "store": False,
        }
        policy["embedding"] = {"preload": True}
    elif lengths == "constant":
        policy["lengths"] = {"predictor": "constant", "constant_tokens": max(1, round(setup.mean_output))}
    elif lengths == "oracle":
        policy["lengths"] = {"predictor": "constant", "constant_tokens": ORACLE_CONSTANT}
    if refit == "never":
        policy["lengths"] = {**policy.get("lengths", {}), "refit_interval_s": NO_REFIT_S}
    elif refit == "phase":
        policy["lengths"] = {
            **policy.get("lengths", {}),
            "refit_interval_s": args.learn_refit_s,
            "min_new_rows": FIT_ONCE,
        }
    return policy


def policy_problem(policy: dict[str, Any]) -> str | None:
    """Why icgate would refuse this policy at start (e.g. a knob it does not have yet), or None."""
    from pydantic import ValidationError

    from icgate.gateway.config import Policy

    try:
        Policy.model_validate(policy)
    except ValidationError as exc:
        return " ".join(str(exc).split())[:300]
    return None


def litellm_config(
    setup: TraceSetup, sims: dict[Tier, Sim], strategy: str, max_parallel: bool = False
) -> dict[str, Any]:
    """One model group `sim` over both simulators; simple-shuffle weighted by measured capacity;
    `max_parallel`: each deployment's max_parallel_requests is icgate's max_concurrent for that backend."""
    deployments = [Deployment(sims[t].model, sims[t].url + "/v1", id=f"sim-{t}") for t in TIERS]
    config = build_config(deployments, strategy)  # type: ignore[arg-type]
    for entry, tier in zip(config["model_list"], TIERS, strict=True):
        if strategy == "simple-shuffle":
            entry["litellm_params"]["weight"] = round(setup.capacity[tier].req_s, 3)
        if max_parallel:
            entry["litellm_params"]["max_parallel_requests"] = setup.plans[tier].max_concurrent
    return config


@dataclass
class Front:
    """A running gateway or proxy: where to send, its process, and (icgate) where its metrics, its data
    directory (its SQLite database) and its log are."""

    endpoint: Endpoint
    pid: int
    startup_s: float
    metrics_url: str | None = None
    data_dir: Path | None = None
    log_path: Path | None = None
    policy: dict[str, Any] | None = None


@contextlib.contextmanager
def serve_system(
    system: System, setup: TraceSetup, sims: dict[Tier, Sim], work: Path, args: argparse.Namespace
) -> Iterator[Front]:
    """A fresh icgate or LiteLLM proxy process for one run, stopped when the block ends."""
    port = free_port()
    tag = f"{setup.trace.name}-{system.key}-{port}"
    if system.kind == "icgate":
        policy = work / f"{tag}.yaml"
        settings = icgate_policy(
            setup, sims, system.admission, args, system.lengths, refit_of(system), system.shed
        )
        policy.write_text(yaml.safe_dump(settings, sort_keys=False))
        data = work / tag
        # The embedder's ONNX graph is exported into <data dir>/models on first use (~25 s): one copy
        # shared by every run, so only the first pays for it.
        shared = work / "models"
        shared.mkdir(exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        (data / "models").symlink_to(shared, target_is_directory=True)
        cmd = [str(ICGATE), "serve", "--policy", str(policy), "--data-dir", str(data)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-launch"]
        base = f"http://127.0.0.1:{port}"
        log_path = work / f"{tag}.log"
        with Managed("icgate", cmd, base + "/readyz", log_path) as proc:
            endpoint = Endpoint(base + "/v1/chat/completions", "auto")
            yield Front(endpoint, proc.pid, proc.startup_s, base + "/metrics", data, log_path, settings)
        return
    assert system.strategy is not None
    config = work / f"{tag}.yaml"
    litellm = litellm_config(setup, sims, system.strategy, system.max_parallel)
    config.write_text(yaml.safe_dump(litellm, sort_keys=False))
    exe = ensure_proxy_venv()
    # LiteLLM aborts a stream after 100 identical chunks (a looping-model guard); the simulator's
    # answer is the word `tok` repeated, so a slow decode (one token a chunk) would trip it.
    env = {**os.environ, "REPEATED_STREAMING_CHUNK_LIMIT": "1000000"}
    with LiteLLMProxy(config, port, exe=exe, log_path=work / f"{tag}.log", env=env) as proxy:
        endpoint = Endpoint(proxy.base_url + "/v1/chat/completions", "sim", proxy.headers)
        yield Front(endpoint, proxy.pid, proxy.startup_s or 0.0)


def has_phase(system: System, args: argparse.Namespace) -> bool:
    """Whether the learning half goes through this system before its window: (a+) learns from it; the
    other icgate systems with admission get `--warm-requests` of it, so every admission starts its window
    with latency models warmed alike."""
    return system.learn or (system.kind == "icgate" and system.admission and args.warm_requests > 0)


def refit_of(system: System) -> Refit:
    """(a+) refits during its learning phase; no other run refits at all."""
    return "phase" if system.learn else "never"


def admission_counters(metrics_url: str) -> dict[str, int]:
    """icgate's `icgate_admission_total` by backend/outcome."""
    text = httpx.get(metrics_url, timeout=5.0, trust_env=False).text
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "icgate_admission_total":
                out[f"{sample.labels['backend']}/{sample.labels['outcome']}"] = int(sample.value)
    return out


def lookup_counts(sims: Sequence[Sim]) -> dict[str, int]:
    """The simulators' length-file lookups so far, hits and misses, summed over both."""
    out = {"hit": 0, "miss": 0}
    for sim in sims:
        text = httpx.get(sim.url + "/metrics", timeout=5.0, trust_env=False).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sim_length_lookups_total":
                    out[sample.labels["result"]] += int(sample.value)
    return out


# --------------------------------------------------------------------------- the gateway's own database

# What `ModelWatcher.check` (gateway/store/artifacts.py) logs once it has handed a model to the gateway.
IN_FORCE = "{kind} model {version} in force"
SETTLE_S = 20.0  # longest wait for the gateway's write-behind queue to store a run's length samples


@dataclass(frozen=True)
class PublishedLength:
    """A backend's own length predictor as the gateway published it (`model_artifacts`, kind
    `length:<backend>`)."""

    backend: str
    row: int
    version: str
    rows: int  # answers it was fitted on (the `rows` that `with_backend_length` holds against min_rows)
    with_embedding: int  # of which the gateway had the request's embedding
    truncated: int  # of which were cut short (fitted as lower bounds)


def published_lengths(engine: Any, backends: Sequence[str]) -> dict[str, PublishedLength]:
    """Each backend's newest published predictor (a backend without one is left out)."""
    from icgate.gateway.store import artifacts
    from icgate.gateway.store.length_learning import length_kind

    out = {}
    for backend in backends:
        row = artifacts.newest(engine, length_kind(backend), with_artifact=False)
        if row is not None:
            t = row.training
            out[backend] = PublishedLength(
                backend,
                row.id,
                row.version,
                int(t.get("rows") or 0),
                int(t.get("with_embedding") or 0),
                int(t.get("truncated") or 0),
            )
    return out


def swapped_in(log_text: str, backend: str, version: str) -> bool:
    """Whether the gateway's log says `backend`'s predictor `version` was handed to it (its watcher's log)."""
    from icgate.gateway.store.length_learning import length_kind

    return IN_FORCE.format(kind=length_kind(backend), version=version) in log_text


def lengths_in_force(
    engine: Any, log_path: Path, backends: Sequence[str], min_rows: int
) -> dict[str, PublishedLength] | None:
    """Every backend's own predictor, once each is published, fitted on at least `min_rows` answers (the
    gateway uses none below that: `route_models.with_backend_length`) and swapped in, as the gateway's log
    says; None until then."""
    found = published_lengths(engine, backends)
    if len(found) < len(backends) or any(p.rows < min_rows for p in found.values()):
        return None
    text = log_path.read_text(errors="replace")
    if not all(swapped_in(text, b, p.version) for b, p in found.items()):
        return None
    return found


def length_artifacts(engine: Any) -> dict[str, int]:
    """Rows of `model_artifacts` per `length:*` kind: what refits published so far."""
    import sqlalchemy as sa

    from icgate.gateway.store import tables

    table = tables.ModelArtifactRow
    query = sa.select(table.kind, sa.func.count()).where(table.kind.like("length:%")).group_by(table.kind)
    with engine.connect() as conn:
        return {str(kind): int(n) for kind, n in conn.execute(query)}


def samples_after(engine: Any, after_id: int) -> tuple[int, int]:
    """Length samples stored after row `after_id`: how many, and the newest id (`after_id` if none)."""
    import sqlalchemy as sa

    from icgate.gateway.store import tables

    table = tables.LengthSampleRow
    query = sa.select(sa.func.count(), sa.func.max(table.id)).where(table.id > after_id)
    with engine.connect() as conn:
        n, top = conn.execute(query).one()
    return int(n or 0), int(top or after_id)


def settle_samples(engine: Any, after_id: int, expected: int, timeout_s: float = SETTLE_S) -> int:
    """Wait until the gateway has stored the length samples of `expected` answers given since row
    `after_id` (its write-behind queue flushes every half second); the newest row id then."""
    deadline = time.monotonic() + timeout_s
    while True:
        n, top = samples_after(engine, after_id)
        if n >= expected or time.monotonic() > deadline:
            if n < expected:
                print(f"only {n} of {expected} length samples stored after {timeout_s:.0f} s", flush=True)
            return top
        time.sleep(0.25)


@dataclass(frozen=True)
class SizedAnswer:
    """One answer of the window as the gateway logged it, and the lengths predicted for it."""

    backend: str
    answered: int
    in_force: int  # p50 of the predictor admission used on this backend, capped at max_tokens
    shipped: int  # p50 of the shipped predictor, capped alike


def sized_answers(engine: Any, after_id: int, own: dict[str, Any], shipped: Any) -> list[SizedAnswer]:
    """The window's answers (length samples after row `after_id`) with the p50 each predictor gives them,
    computed from exactly what the gateway's route stage read (the sample keeps its feature window, its
    prompt estimate and its embedding; tests/gateway/pipeline/test_record_lengths.py checks they are the
    served features). `own`: backend -> its predictor in force; others were sized by `shipped`."""
    from icgate.gateway.store import tables
    from icgate.gateway.store.length_samples import embedding_of, select_samples, usable
    from icgate.lengths.predict import estimate_for, prompt_view

    table = tables.LengthSampleRow
    query = select_samples().where(table.id > after_id).order_by(table.id)
    out = []
    with engine.connect() as conn:
        rows = list(conn.execute(query))
    for row in rows:
        if not usable(row.finish_reason):
            continue
        seen = prompt_view(embedding_of(row.embedding), int(row.prompt_tokens), row.prompt_text)
        cap = row.max_tokens or math.inf
        base = min(estimate_for(shipped, seen).p50, cap)
        mine = min(estimate_for(own[row.backend], seen).p50, cap) if row.backend in own else base
        out.append(SizedAnswer(str(row.backend), int(row.completion_tokens), int(mine), int(base)))
    return out


def score_sizes(answers: Sequence[SizedAnswer]) -> dict[str, dict[str, Any]]:
    """Per backend (and `all` of them pooled, when there are several): how many answers, the predictor in
    force's MAE, Kendall's tau and share predicted short, and the shipped predictor's MAE and tau on the
    same answers."""
    out: dict[str, dict[str, Any]] = {}
    backends = sorted({a.backend for a in answers})
    for backend in [*backends, *(["all"] if len(backends) > 1 else [])]:
        mine = [a for a in answers if backend in ("all", a.backend)]
        true = [float(a.answered) for a in mine]
        used = [float(a.in_force) for a in mine]
        base = [float(a.shipped) for a in mine]
        out[backend] = {
            "answers": len(mine),
            "mean_answered": float(np.mean(true)),
            "mean_predicted": float(np.mean(used)),
            "mae": float(np.mean(np.abs(np.subtract(used, true)))),
            "tau": _kendall(used, true),
            "under": float(np.mean(np.less(used, true))),
            "shipped_mae": float(np.mean(np.abs(np.subtract(base, true)))),
            "shipped_tau": _kendall(base, true),
        }
    return out


def multiset_agreement(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Share of two lists of numbers that pair up one for one (1.0: the same numbers, in any order)."""
    if not a and not b:
        return None
    common = sum((Counter(a) & Counter(b)).values())
    return common / max(len(a), len(b))


# --------------------------------------------------------------------------- (a+): the learning phase


@dataclass
class LearningPhase:
    """Traffic of the learning half sent through a gateway before its window, and what it produced: (a+)'s
    learning phase (`kind` learn, until each backend's own predictor is in force), or the other admission
    systems' warm phase (`kind` warm, `--warm-requests` of them, nothing refitted), which warms their
    admission's latency models (TTFT, TPOT, decode step, wait error) as much as (a+)'s learning does."""

    rate_rps: float
    kind: Literal["learn", "warm"] = "learn"
    sent: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    conversations: int = 0  # distinct conversations sent
    sources: dict[str, int] = field(default_factory=dict)  # requests per source
    answers: dict[str, int] = field(default_factory=dict)  # completed, per backend that answered
    sending_s: float = 0.0  # from the first learning request to the last
    ready_s: float | None = None  # from the first learning request to every backend's own in force
    drain_s: float = 0.0  # then until the simulators were idle
    published: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> PublishedLength
    cache_entries: int | None = None  # after the phase (0: nothing stored that a window could hit)


async def learning_replay(
    endpoint: Endpoint,
    rows: Sequence[TraceRow],
    rate: float,
    client: ClientMode,
    ready: Callable[[Sequence[Outcome]], bool],
    max_s: float,
    poll_s: float = 1.0,
    grace_s: float = 60.0,
    limit: int | None = None,
) -> tuple[list[Outcome], float | None, float]:
    """Send `rows` in order (cycling), evenly spaced at `rate`, until `ready` (a blocking check, run in a
    thread every `poll_s` with the requests so far) says yes, `max_s` passed or `limit` requests were sent;
    then let the answers in flight finish. Returns the requests, when `ready` first said yes (None: never,
    even `grace_s` after the last answer), and how long sending lasted."""
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    ready_s: float | None = None
    async with client_session() as session:
        start = time.perf_counter()
        next_check, i = start + poll_s, 0
        while True:
            now = time.perf_counter()
            if now >= next_check:
                if await asyncio.to_thread(ready, list(outcomes)):
                    ready_s = now - start
                    break
                next_check = time.perf_counter() + poll_s
            if now - start >= max_s or (limit is not None and i >= limit):
                break
            due = start + i / rate
            if due > now:
                await asyncio.sleep(min(due, next_check) - now)
                continue
            row = rows[i % len(rows)]
            out = outcome_for(Arrival(i, due - start, row.prompt_tokens, row.output_tokens, row), client)
            out.due = due
            outcomes.append(out)
            tasks.append(asyncio.create_task(send(session, endpoint, out)))
            i += 1
        sending_s = time.perf_counter() - start
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s + 120.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        deadline = time.perf_counter() + grace_s
        while ready_s is None and time.perf_counter() < deadline:
            if await asyncio.to_thread(ready, outcomes):
                ready_s = time.perf_counter() - start
            else:
                await asyncio.sleep(poll_s)
    return outcomes, ready_s, sending_s


def run_phase(
    front: Front,
    setup: TraceSetup,
    client: ClientMode,
    sims: dict[Tier, Sim],
    args: argparse.Namespace,
    learn: bool,
) -> tuple[LearningPhase, list[Outcome]]:
    """The learning half through this gateway before its window, then the simulators drained to idle.
    `learn` ((a+)): until each backend's own predictor is in force (`lengths_in_force`); else the warm
    phase: `--warm-requests` requests."""
    from icgate.gateway.config import LengthsConfig

    assert setup.learning is not None and front.data_dir is not None and front.log_path is not None
    assert front.policy is not None
    min_rows = LengthsConfig.model_validate(front.policy.get("lengths", {})).min_rows
    backends = [b["name"] for b in front.policy["backends"]]
    engine = gateway_engine(front.data_dir)
    log_path = front.log_path

    def ready(_: Sequence[Outcome]) -> bool:
        return learn and lengths_in_force(engine, log_path, backends, min_rows) is not None

    try:
        phase = LearningPhase(args.learn_load * setup.total_capacity, "learn" if learn else "warm")
        outcomes, phase.ready_s, phase.sending_s = asyncio.run(
            learning_replay(
                front.endpoint,
                setup.learning.rows,
                phase.rate_rps,
                client,
                ready,
                args.learn_max_s,
                grace_s=max(30.0, 3 * args.learn_refit_s) if learn else 0.0,
                limit=None if learn else args.warm_requests,
            )
        )
        phase.drain_s = wait_idle(list(sims.values()))
        done = [o for o in outcomes if o.completed]
        phase.sent, phase.completed = len(outcomes), len(done)
        phase.refused = sum(1 for o in outcomes if o.status == 429)
        phase.failed = len(outcomes) - len(done) - phase.refused
        phase.conversations = len({prompt_key(o.messages) for o in outcomes if o.messages is not None})
        phase.sources = dict(Counter(o.source or "?" for o in outcomes))
        phase.answers = dict(Counter(o.backend or "?" for o in done))
        phase.published = {b: asdict(p) for b, p in published_lengths(engine, backends).items()}
        phase.cache_entries = cache_entries(engine)
    finally:
        engine.dispose()
    print(f"[{phase.kind}] {json.dumps(asdict(phase))}", flush=True)
    return phase, outcomes


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One (trace, load, client, system) run: the summary numbers the report shows."""

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
    client: str = ORACLE.key  # ClientMode.key: what the client sent as max_tokens
    lookups: dict[str, int] = field(default_factory=dict)  # the simulators' length-file hits and misses
    predicted_mae: float | None = None  # |x-icgate-predicted-tokens - tokens answered|, completed requests
    predicted_tau: float | None = None  # Kendall's tau between the two
    predicted_under: float | None = None  # share predicted shorter than answered
    cache_skipped: int = 0  # answered without an embedding (embedder busy): the predictor saw none
    with_examples: int = 0  # answered with in-context examples prepended (the prompt was rewritten)
    from_cache: int = 0  # answered by the cache (x-icgate-route: cache); must stay 0
    # icgate, from its own database after the window:
    per_backend: dict[str, dict[str, Any]] = field(default_factory=dict)  # `score_sizes`
    length_models: dict[str, str] = field(default_factory=dict)  # backend -> predictor in force
    header_agreement: float | None = None  # the in-force p50s recomputed vs x-icgate-predicted-tokens
    refits_in_window: int | None = None  # length predictors published during the window (must be 0)
    length_artifacts: dict[str, int] = field(default_factory=dict)  # `length:*` rows at the end
    cache_entries: int | None = None  # answers the cache held at the end (must be 0)
    learning: dict[str, Any] | None = None  # (a+): `LearningPhase`


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _kendall(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import kendalltau

    tau = float(kendalltau(a, b).statistic)
    return None if math.isnan(tau) else tau


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
    # icgate's message tells a refusal after queueing from one at arrival (`refusal_kind`).
    queued = [o for o in refused if o.refusal == "queue"]
    late_waits = [o.ended - o.sent for o in queued if o.ended is not None and o.sent is not None]
    timed_out = [o for o in outcomes if o.error == "timed out"]
    failed = [o for o in outcomes if not o.completed and o.status != 429 and o.error != "timed out"]
    on_large = [o for o in done if o.backend and "large" in o.backend]
    spilled = [
        o
        for o in done
        if o.backend in TIERS
        and o.backend
        != rule_tier(o.routing_tokens if o.routing_tokens is not None else o.prompt_tokens, threshold)
    ]
    queues = [o.queue_ms for o in done if o.queue_ms is not None]
    lags = [(o.sent - o.due) * 1000 for o in outcomes if o.sent is not None]
    errors = Counter((f"HTTP {o.status}" if o.status else (o.error or "?"))[:60] for o in failed)
    sized = [o for o in done if o.predicted_tokens is not None]
    predicted = [float(o.predicted_tokens or 0) for o in sized]
    answered = [float(o.completion_tokens) for o in sized]
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
        "refused_late": len(queued),
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
        "predicted_mae": float(np.mean(np.abs(np.subtract(predicted, answered)))) if sized else None,
        "predicted_tau": _kendall(predicted, answered),
        "predicted_under": float(np.mean(np.less(predicted, answered))) if sized else None,
        "cache_skipped": sum(1 for o in outcomes if o.cache_skipped),
        "with_examples": sum(1 for o in outcomes if o.examples),
        "from_cache": sum(1 for o in outcomes if o.route == "cache"),
    }


def run_one(
    system: System,
    setup: TraceSetup,
    load: float,
    client: ClientMode,
    sims: dict[Tier, Sim],
    work: Path,
    args: argparse.Namespace,
) -> RunResult:
    """One system at one load: fresh front process, warm-up, (a+)'s learning phase, idle simulators,
    replay, numbers; for icgate also what its own database says of the window (`window_check`)."""
    started = time.monotonic()
    arrivals = schedule(setup.trace, load * setup.total_capacity, args.duration_s)
    sent = system.client or client
    counters: dict[str, int] = {}
    learning: LearningPhase | None = None
    checked: dict[str, Any] = {}
    with serve_system(system, setup, sims, work, args) as front:
        answered = asyncio.run(warm_up(front.endpoint))
        if has_phase(system, args) and setup.learning is not None:
            check_learning_apart(setup.learning, arrivals)
            learning, taught = run_phase(front, setup, sent, sims, args, system.learn)
            answered += sum(1 for o in taught if o.completed)
            dump_outcomes(work / run_file(setup.trace.name, load, client.key, system.key, "before"), taught)
        wait_idle(list(sims.values()))
        engine = gateway_engine(front.data_dir) if front.data_dir is not None else None
        try:
            # Everything before the window is in the database before its first request: the window's
            # answers are the length samples after `mark`.
            mark = settle_samples(engine, 0, answered) if engine is not None else 0
            published = length_artifacts(engine) if engine is not None else {}
            # The window's admissions only (the process also admitted the warm-up and any phase before).
            counters0 = admission_counters(front.metrics_url) if front.metrics_url else {}
            pids = {"front": front.pid, **{f"sim-{t}": sims[t].process.pid for t in TIERS}}
            lookups0 = lookup_counts(list(sims.values()))
            cpu0 = {k: process_cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
            t0 = time.monotonic()
            goals = Objectives(args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
            straggle = goals.straggle_s(arrivals, args.straggle_s)
            outcomes = asyncio.run(replay(front.endpoint, arrivals, args.duration_s, straggle, sent, goals))
            wall = time.monotonic() - t0
            cpu1 = {k: process_cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
            if front.metrics_url:
                counters1 = admission_counters(front.metrics_url)
                counters = {
                    k: n - counters0.get(k, 0) for k, n in counters1.items() if n > counters0.get(k, 0)
                }
            if engine is not None and system.lengths is not None:
                checked = window_check(engine, mark, published, outcomes, learning, system)
            elif engine is not None:
                checked = {
                    "cache_entries": cache_entries(engine),
                    "length_artifacts": length_artifacts(engine),
                }
        finally:
            if engine is not None:
                engine.dispose()
    drain_s = wait_idle(list(sims.values()))
    lookups1 = lookup_counts(list(sims.values()))
    summary = summarize(outcomes, setup.trace.name, load, system.key, args.duration_s, setup.threshold, args)
    dump_outcomes(work / run_file(setup.trace.name, load, client.key, system.key), outcomes)
    return RunResult(
        **summary,
        cpu={k: (cpu1[k] - cpu0[k]) / wall for k in cpu0},
        admission=counters,
        startup_s=front.startup_s,
        drain_s=drain_s,
        wall_s=time.monotonic() - started,
        client=client.key,
        lookups={k: lookups1[k] - lookups0[k] for k in lookups0},
        learning=asdict(learning) if learning is not None else None,
        **checked,
    )


def window_check(
    engine: Any,
    mark: int,
    published_before: dict[str, int],
    outcomes: Sequence[Outcome],
    learning: LearningPhase | None,
    system: System,
) -> dict[str, Any]:
    """What icgate's database says of the window just replayed: each backend's answers sized by the
    predictor in force (`score_sizes`), whether any predictor was published during the window, what the
    cache holds, and how the recomputed shipped p50s agree with the gateway's own headers."""
    from icgate.gateway.route_models import load_length
    from icgate.gateway.store import artifacts
    from icgate.gateway.store.length_learning import length_kind
    from icgate.lengths.predict import load_length_model

    done = [o for o in outcomes if o.completed]
    settle_samples(engine, mark, len(done))
    shipped = load_length_model()
    own: dict[str, Any] = {}
    names: dict[str, str] = dict.fromkeys(TIERS, "shipped") if system.lengths == "learned" else {}
    if learning is not None:
        for backend, info in learning.published.items():
            stored = artifacts.newest(engine, length_kind(backend))
            if stored is not None and stored.id == info["row"]:
                own[backend] = load_length(stored.artifact)
                names[backend] = f"own {stored.version} ({info['rows']} answers)"
    shipped_name = f"shipped {getattr(shipped, 'version', '?')}"
    answers = sized_answers(engine, mark, own, shipped)
    artifacts_now = length_artifacts(engine)
    headers = [o.predicted_tokens for o in done if o.predicted_tokens is not None]
    return {
        "per_backend": score_sizes(answers) if system.lengths == "learned" else {},
        "length_models": {b: shipped_name if n == "shipped" else n for b, n in names.items()},
        "header_agreement": multiset_agreement([a.in_force for a in answers], headers)
        if system.lengths == "learned"
        else None,
        "refits_in_window": sum(artifacts_now.values()) - sum(published_before.values()),
        "length_artifacts": artifacts_now,
        "cache_entries": cache_entries(engine),
    }


# RunResult fields read from icgate's database during the run, not from the requests.
DATABASE_FIELDS = (
    "per_backend",
    "length_models",
    "header_agreement",
    "refits_in_window",
    "length_artifacts",
    "cache_entries",
    "learning",
)


def run_file(trace: str, load: float, client: str, system: str, part: str = "") -> str:
    return f"{trace}-{load:g}-{client}-{system}{'-' + part if part else ''}.jsonl"


def dump_outcomes(path: Path, outcomes: Sequence[Outcome]) -> None:
    """Every request of a run, one JSON object a line, for looking closer afterwards (prompts left out)."""
    with open(path, "w") as f:
        for o in outcomes:
            record = {k: v for k, v in asdict(o).items() if k != "messages"}
            f.write(json.dumps({**record, "ttft_s": o.ttft_s, "tpot_s": o.tpot_s}) + "\n")


# --------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def late_share(r: RunResult) -> float | None:
    """Refusals after queueing as a share of all 429s (the issue's bound: under 10% at 1.5x)."""
    return r.refused_late / r.refused if r.refused else None


def _prediction(r: RunResult) -> str:
    if r.predicted_mae is None:
        return "-"
    return f"{r.predicted_mae:.0f} / {_f(r.predicted_tau)} / {_f(r.predicted_under, 2)}"


def results_table(results: Sequence[RunResult]) -> list[str]:
    head = (
        "| load | system | offered req/s | goodput req/s | good output tok/s | sent | completed | "
        "429 at arrival | 429 after queueing (mean wait s) | after queueing, share of 429s | failed | "
        "timed out | late TTFT | slow TPOT | p50 TTFT ms | p99 TTFT ms | p50 TPOT ms | p99 TPOT ms | "
        "x-icgate-predicted-tokens (the size admission used) vs answered: MAE / tau / share under | "
        "on large | spilled | mean queue ms | CPU front / sims / client |"
    )
    lines = [head, "|" + " ---: | --- |" + " ---: |" * 21]
    for r in results:
        cpu = r.cpu
        sims_cpu = cpu.get("sim-small", 0) + cpu.get("sim-large", 0)
        share = late_share(r)
        lines.append(
            f"| {r.load:g}x | {SYSTEMS[r.system].label} | {r.offered_rps:.2f} | **{r.goodput_rps:.2f}** | "
            f"{r.goodput_tok_s:.0f} | {r.sent} | {r.completed} | {r.refused - r.refused_late} | "
            f"{r.refused_late} ({_f(r.refused_late_wait_s)}) | {'-' if share is None else f'{share:.0%}'} | "
            f"{r.failed} | {r.timed_out} | {r.miss_ttft} | "
            f"{r.miss_tpot} | {_ms(r.ttft_p50_s)} | {_ms(r.ttft_p99_s)} | {_f(r.tpot_p50_ms, 0)} | "
            f"{_f(r.tpot_p99_ms, 0)} | {_prediction(r)} | "
            f"{_f(None if r.large_share is None else 100 * r.large_share, 0)}% | "
            f"{r.spilled if SYSTEMS[r.system].kind == 'icgate' else '-'} | {_f(r.queue_ms_mean, 0)} | "
            f"{cpu.get('front', 0):.0%} / {sims_cpu:.0%} / {cpu.get('client', 0):.0%} |"
        )
    return lines


def _find(
    results: Sequence[RunResult], trace: str, load: float, system: str, client: str | None
) -> RunResult | None:
    for r in results:
        if (
            r.trace == trace
            and r.load == load
            and r.system == system
            and (client is None or r.client == client)
        ):
            return r
    return None


def best_litellm(results: Sequence[RunResult], trace: str, load: float, client: str) -> RunResult | None:
    rivals = [
        r
        for r in results
        if r.trace == trace and r.load == load and r.client == client and SYSTEMS[r.system].kind == "litellm"
    ]
    return max(rivals, key=lambda r: r.goodput_rps, default=None)


def gap_closed(learned: float, constant: float, oracle: float) -> float | None:
    """Share of the goodput gap between one constant length and the oracle that the predictor closes."""
    return (learned - constant) / (oracle - constant) if oracle > constant else None


# (a), (a+) and (a+s): the systems the target is about. Each one's gap is between (a0) and the oracle under
# the same admission policy: (a*s) for (a+s), which sheds the longest under load, else (a*).
LEARNED_SYSTEMS = ("icgate", "icgate-learn", "icgate-learn-shed")


def oracle_for(system: str) -> str:
    return "icgate-oracle-shed" if SYSTEMS[system].shed else "icgate-oracle"


def target_lines(results: Sequence[RunResult], ttft_slo_s: float) -> list[str]:
    """Issue 18's target, on every (trace, load, client) where (a) or (a+) ran; it is set for `content` at
    1.5x."""
    lines = [
        "| trace | client | load | system | goodput | best LiteLLM | its goodput | ratio (>= 1.5) | p99 "
        "TTFT ms "
        "| (a0) goodput | oracle goodput ((a*); (a*s) for (a+s)) | gap closed (>= 50%) | "
        "429s after queueing (< 10%) | "
        "target met |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if r.system not in LEARNED_SYSTEMS:
            continue
        rival = best_litellm(results, r.trace, r.load, r.client)
        constant = _find(results, r.trace, r.load, "icgate-constant", r.client)
        oracle = _find(results, r.trace, r.load, oracle_for(r.system), None)  # its client ignores the run's
        ratio = (
            None if rival is None else (r.goodput_rps / rival.goodput_rps if rival.goodput_rps else math.inf)
        )
        closed = (
            None
            if constant is None or oracle is None
            else gap_closed(r.goodput_rps, constant.goodput_rps, oracle.goodput_rps)
        )
        share = late_share(r)
        checks = [
            ratio is not None and ratio >= 1.5,
            r.ttft_p99_s is not None and r.ttft_p99_s <= ttft_slo_s,
            closed is not None and closed >= 0.5,
            share is None or share < 0.1,
        ]
        met = "yes" if all(checks) else "no"
        if not (r.trace == CONTENT and r.load == 1.5):
            met = f"({met}; the target is set for `content` at 1.5x)"
        lines.append(
            f"| {r.trace} | {r.client} | {r.load:g}x | {SYSTEMS[r.system].label.split(')')[0]}) | "
            f"{r.goodput_rps:.2f} | "
            f"{'-' if rival is None else SYSTEMS[rival.system].label} | "
            f"{'-' if rival is None else f'{rival.goodput_rps:.2f}'} | "
            f"{'-' if ratio is None else f'**{ratio:.2f}x**'} | {_ms(r.ttft_p99_s)} | "
            f"{'-' if constant is None else f'{constant.goodput_rps:.2f}'} | "
            f"{'-' if oracle is None else f'{oracle.goodput_rps:.2f}'} | "
            f"{'-' if closed is None else f'{closed:.0%}'} | {'-' if share is None else f'{share:.0%}'} "
            f"| {met} |"
        )
    return lines


def setup_lines(setup: TraceSetup, tpot_slo_ms: float) -> list[str]:
    t = setup.trace
    lines = [
        f"- trace {t.file}: {len(t.rows)} requests, prompt mean {np.mean(t.prompts):.0f} / median "
        f"{np.median(t.prompts):.0f} tokens, output mean {np.mean([r.output_tokens for r in t.rows]):.0f}; "
        f"{t.clipped} prompts clipped to fit the KV cache",
    ]
    mix = setup.mix
    prompts = np.array([r.prompt_tokens for r in mix])
    if t.name == CONTENT:
        items = {id(r.item): r.item for r in t.rows if r.item is not None}
        pool: dict[str, list[Item]] = {}
        for item in items.values():
            pool.setdefault(item.source, []).append(item)
        lines.append(f"- conversations (each one true length; tokens: {content_trace.TOKENIZER}):")
        lines += [f"  - {line}" for line in content_trace.describe(pool)]
        by_source = Counter(r.source for r in mix)
        lines.append(
            "- replayed rows by source: "
            + ", ".join(f"{k} {v} ({v / len(mix):.0%})" for k, v in sorted(by_source.items()))
            + f"; distinct conversations among them: {len({id(r.item) for r in mix})}"
        )
    if setup.mix_rows:
        whole = setup.whole_capacity or {}
        lines.append(
            f"- replayed rows: the first {setup.mix_rows} (the largest window), prompt mean "
            f"{prompts.mean():.0f}, output mean {setup.mean_output:.0f}; capacity "
            "below is measured with this mix (with the whole trace's mix, which only sized the window: "
            + ", ".join(f"{k} {c.req_s:.2f}" for k, c in whole.items())
            + " req/s)"
        )
    for tier in TIERS:
        c = setup.capacity[tier]
        lines.append(
            f"- `{tier}` capacity: **{c.req_s:.2f} req/s** ({c.output_tok_s:.0f} output tok/s / "
            f"{setup.mean_output:.0f}, the mix's mean output). Other estimates from the same window, for its "
            f"noise: finished requests {c.completions_s:.2f}/s; prefilled {c.prompt_tok_s:.0f} tok/s / "
            f"{prompts.mean():.0f}, the mix's mean prompt = {c.prompt_tok_s / prompts.mean():.2f}/s"
        )
    routing = np.array([r.routing_tokens for r in mix])
    lines.append(
        f"- C = {setup.total_capacity:.2f} req/s; large share {setup.large_share:.1%} -> rule threshold "
        f"`large_if_prompt_tokens_over: {setup.threshold}` on the gateway's chars/4 estimate (share of the "
        f"replayed rows above it: {float(np.mean(routing > setup.threshold)):.1%})"
    )
    for tier in TIERS:
        p = setup.plans[tier]
        cfg = EngineConfig.preset(tier)
        lines.append(
            f"- `{tier}` `max_concurrent: {p.max_concurrent}` (also (c3)/(c4)'s "
            "`max_parallel_requests`): its "
            "sub-mix "
            f"has mean prefill {p.mean_prefill_ms:.0f} ms and mean output {p.mean_output:.0f} tokens; "
            "TPOT(n) = "
            f"{cfg.decode_ms_base:g} + {cfg.decode_ms_per_seq:g}*n + n*{p.mean_prefill_ms:.0f}/"
            f"{p.mean_output:.0f} ms fits {TPOT_MARGIN:.0%} of {tpot_slo_ms:g} ms up to n = "
            f"{p.tpot_cap}; the KV cache holds {p.kv_cap} such requests; priors `expected_tpot_ms: "
            f"{p.predicted_tpot_ms:.0f}`, `expected_ttft_ms: {p.predicted_ttft_ms:.0f}`"
        )
    lines.append(
        f"- (a0)'s constant: `lengths.constant_tokens: {max(1, round(setup.mean_output))}`, the replayed "
        "mix's "
        "mean answer (the best single number an operator could read off its own logs)"
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


def _pair(mae: float | None, tau: float | None) -> str:
    return "-" if mae is None else f"{mae:.0f} / {_f(tau)}"


def learning_lines(
    results: Sequence[RunResult], setups: dict[str, TraceSetup], args: argparse.Namespace
) -> list[str]:
    """(a+)'s learning phases: what the gateway learned from, how much, how long it took."""
    runs = [r for r in results if r.learning]
    if not runs:
        return []
    lines = []
    for trace, setup in setups.items():
        if setup.learning is None or not any(r.trace == trace for r in runs):
            continue
        if trace == CONTENT:
            learn = {id(r.item): r.item for r in setup.learning.rows if r.item is not None}
            measure = {id(r.item): r.item for r in setup.trace.rows if r.item is not None}
            lines.append(
                f"- `{trace}`: the conversations were cut in two by a hash of each one's first user turn "
                f"(`content_trace.split_pool`): {len(learn)} in the learning half, {len(measure)} in the "
                "measured half, 0 message texts in both (checked at start: a user turn, or a quoted answer, "
                "of one half never appears in the other; a MeanCache follow-up goes with its question). "
                "Every system's window replays the measured half only; (a+)'s learning phase sends the "
                "learning half only, so **the prompts (a+) is measured on were never seen by the gateway "
                "before its window**, and the window's own answers never trained it (below)."
            )
        else:
            lines.append(
                f"- `{trace}`: (a+) learns from the trace's second half of rows (each with its own prompt "
                "id); windows replay rows from the first half only (checked per run)."
            )
    learners = [r for r in runs if SYSTEMS[r.system].learn]
    refits = sum(r.refits_in_window or 0 for r in learners) if learners else "-"
    cold = [r for r in results if r.system == "icgate"]
    cold_refits = sum(1 for r in cold if r.length_artifacts)
    warm_requests = getattr(args, "warm_requests", 0)
    warm = (
        "- **The same pre-window traffic for every icgate system with admission.** Admission also learns "
        "from traffic: its TTFT, TPOT, decode-step and wait-error models per backend are fitted online "
        "on the last 64-256 answers. So that (a+) does not start its window with warm latency models "
        "where the others start from the policy's priors, (a), (a0) and (a*) each get a warm phase of "
        f"{warm_requests} requests of the same learning half, at the same rate, then the same drain to "
        "idle (`warm` below); nothing is refitted in theirs. (b) (admission off) and LiteLLM keep nothing "
        "from earlier traffic that would matter and get none."
        if warm_requests
        else "- **No warm phase** (`--warm-requests 0`): (a), (a0) and (a*) start their windows with the "
        "admission's latency models at the policy's priors, (a+) with them fitted on its learning phase."
    )
    lines += [
        "- What the gateway learned from: the answers the simulators gave to the learning half, each as "
        "long as the dataset's answer to that conversation (the same source of lengths as the measured "
        "half: GSM8K answers by Mixtral-8x7B or GPT-4-1106, Arena-Hard by one of three GPT models, "
        "MeanCache's answers). Both simulators answer a conversation with the same length, so `small` and "
        "`large` differ here only in which prompts the rule sends them (long prompts to `large`), not in "
        "how chatty they are. Also in each backend's rows: the 6 warm-up requests (`tok tok ...`, one "
        "token each, cut at `max_tokens: 1`, so fitted as lower bounds).",
        "- How: the same `icgate serve` process and data directory as the window, same policy. Its learning "
        f"requests are sent evenly at {args.learn_load:g}x C (below), with the run's client mode, until the "
        "gateway's own "
        "refit (`gateway/store/length_learning.py`) has published `length:<backend>` for both backends, "
        "fitted on at least `lengths.min_rows` (300, the default) answers each, and the gateway's log says "
        "its watcher swapped each one in; then the simulators drain to idle, and the window starts. "
        f"Policy changes for (a+) only: `lengths.refit_interval_s: {args.learn_refit_s:g}` (the gateway's "
        "default is 600 s; a bench cannot wait that long) so the fit follows the learning traffic, and "
        f"`lengths.min_new_rows: {FIT_ONCE}` so each backend "
        "is fitted once and never refitted: the window's answers are logged but train nothing (length "
        f"predictors published during (a+)'s windows: {refits}). Every other icgate run sets "
        f"`lengths.refit_interval_s: {NO_REFIT_S:g}`, so no refit starts within it: (a) is the shipped "
        f"predictor alone ((a) runs that ended with any `length:*` row: {cold_refits} of {len(cold)}).",
        warm,
        "",
        "| trace | client | load | system | phase | requests sent / answered / 429 | rate req/s | "
        "distinct conversations | by backend answered | sending s | until both in force s | drain s | "
        "fitted on (with embedding, cut short) | cache entries after |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in runs:
        phase = r.learning or {}
        learn = phase.get("kind", "learn") == "learn"
        fitted = ", ".join(
            f"{b} {p['rows']} ({p['with_embedding']}, {p['truncated']}) {p['version']}"
            for b, p in sorted((phase.get("published") or {}).items())
        )
        answers = ", ".join(f"{b} {n}" for b, n in sorted((phase.get("answers") or {}).items()))
        ready = phase.get("ready_s")
        until = ("**not in force**" if ready is None else f"{ready:.0f}") if learn else "-"
        lines.append(
            f"| {r.trace} | {r.client} | {r.load:g}x | {SYSTEMS[r.system].label.split(')')[0]}) | "
            f"{'learning' if learn else 'warm'} | {phase.get('sent')} / {phase.get('completed')} / "
            f"{phase.get('refused')} | {phase.get('rate_rps', 0):.1f} | {phase.get('conversations')} | "
            f"{answers} | {phase.get('sending_s', 0):.0f} | {until} | {phase.get('drain_s', 0):.0f} | "
            f"{(fitted or '-') if learn else '-'} | {phase.get('cache_entries')} |"
        )
    return lines


def sizing_lines(results: Sequence[RunResult]) -> list[str]:
    """Each backend's answers in the window against the p50 its predictor in force gave them."""
    runs = [r for r in results if r.per_backend]
    if not runs:
        return []
    lines = [
        "Computed after each window from the gateway's own length samples of the window's answers (what "
        "its route stage read: the feature window, the prompt estimate, the embedding), with the "
        "predictor each backend had in force, capped at `max_tokens` as admission caps it. For (a+) the "
        "shipped predictor on the same answers is shown too. *Agreement*: share of the recomputed p50s "
        "in force that pair one for one with the gateway's own `x-icgate-predicted-tokens` (the size "
        "admission used for the serving backend) over the completed requests: 100% means the "
        "recomputation is what the gateway used.",
        "",
        "| trace | client | load | system | backend | predictor in force | answers | mean answered | "
        "mean predicted | MAE | Kendall tau | share under | shipped on the same: MAE / tau | agreement |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in runs:
        used = {r.length_models.get(b, "-") for b in r.per_backend if b != "all"}
        models = {**r.length_models, "all": used.pop() if len(used) == 1 else "each backend's in force"}
        for backend, s in r.per_backend.items():
            lines.append(
                f"| {r.trace} | {r.client} | {r.load:g}x | {SYSTEMS[r.system].label.split(')')[0]}) | "
                f"{backend} | {models.get(backend, '-')} | {s['answers']} | "
                f"{s['mean_answered']:.0f} | {s['mean_predicted']:.0f} | **{s['mae']:.0f}** | "
                f"**{_f(s['tau'])}** | {_f(s['under'])} | {_pair(s['shipped_mae'], s['shipped_tau'])} | "
                f"{'-' if r.header_agreement is None else f'{r.header_agreement:.0%}'} |"
            )
    return lines


def admission_lines(results: Sequence[RunResult]) -> list[str]:
    lines = [
        "| trace | client | load | system | simulator lookups hit / miss | icgate_admission_total "
        "(backend/outcome) "
        "| answered without an embedding | with examples | answered by the cache / cache entries at the end "
        "| length predictors published in the window | errors |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for r in results:
        counters = ", ".join(f"{k} {v}" for k, v in sorted(r.admission.items())) or "-"
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        lookups = f"{r.lookups.get('hit', 0)} / {r.lookups.get('miss', 0)}" if r.lookups else "-"
        icgate = SYSTEMS[r.system].kind == "icgate"
        cache = f"{r.from_cache} / {'-' if r.cache_entries is None else r.cache_entries}" if icgate else "-"
        refits = "-" if r.refits_in_window is None else str(r.refits_in_window)
        lines.append(
            f"| {r.trace} | {r.client} | {r.load:g}x | {SYSTEMS[r.system].label} | {lookups} | {counters} | "
            f"{r.cache_skipped} | {r.with_examples} | {cache} | {refits} | {errors} |"
        )
    return lines


def groups_of(results: Sequence[RunResult]) -> list[tuple[str, str]]:
    """(trace, client) pairs in the order they ran."""
    return list(dict.fromkeys((r.trace, r.client) for r in results))


def plot(results: Sequence[RunResult], ttft_slo_s: float, path: Path) -> None:
    """Goodput vs load (top row) and p99 TTFT vs load (bottom row), one column per (trace, client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups_of(results) or [(CONTENT, NO_MAX_TOKENS.key)]
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 8), squeeze=False)
    for col, (trace, client) in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        mine = [r for r in results if r.trace == trace and r.client == client]
        for key, system in SYSTEMS.items():
            rows = sorted((r for r in mine if r.system == key), key=lambda r: r.load)
            if not rows:
                continue
            loads = [r.load for r in rows]
            top.plot(loads, [r.goodput_rps for r in rows], marker="o", label=system.label)
            bottom.plot(loads, [r.ttft_p99_s or np.nan for r in rows], marker="o", label=system.label)
        offered = sorted({(r.load, r.offered_rps) for r in mine})
        if offered:
            top.plot([o[0] for o in offered], [o[1] for o in offered], "k:x", label="offered")
        title = f"{trace}, {client}"
        top.set(title=f"{title}: goodput", xlabel="load (x capacity)", ylabel="good req/s")
        top.set_ylim(bottom=0)
        bottom.axhline(ttft_slo_s, color="grey", linestyle="--", label="TTFT objective")
        bottom.set(title=f"{title}: p99 TTFT of completed", xlabel="load (x capacity)", ylabel="seconds")
        bottom.set_yscale("log")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def disclosure_lines(setups: dict[str, TraceSetup], args: argparse.Namespace) -> list[str]:
    """What every client sent, and what the gateway in front could know of each answer's length."""
    cap = client_mode(str(args.cap))
    lines = [
        "- **The true length never reaches the gateway.** Each simulator is started with `--lengths "
        "lengths.json` (bench/simulator/lengths.py), a file written by the benchmark that maps sha256 of a "
        "conversation (every message's role and text, in order) to its prompt tokens and its true answer "
        "length. A simulator answers a known conversation with exactly that many tokens (cut at `max_tokens` "
        "if the client sent a smaller one, with `finish_reason: length`, else `stop`) and charges its "
        "prefill "
        "for the recorded prompt tokens; the gateway and LiteLLM see only the messages, and nothing in them "
        "reads that file.",
        f"- **What the client sent as `max_tokens`**: runs marked `{NO_MAX_TOKENS.key}` send none; runs "
        "marked "
        f"`{cap.key}` send `max_tokens: {cap.cap}` on every request, whatever its length; (a*) is the one "
        "exception: its client always sends `max_tokens` = the request's true length (the old setup), and "
        "icgate caps its prediction at `max_tokens`, so its admission knows every length: the ceiling, not "
        "a configuration anyone can run.",
        "- **What icgate's admission knew of a request's length**: (a) the shipped length predictor's p50 "
        "(lengths/artifacts/length.joblib, fitted on one model's Arena-Hard answers), from the prompt's "
        "MiniLM embedding and text features: the cold start, before the gateway has learned anything; "
        "(a+) each backend's own predictor, which the same gateway fitted on that backend's answers to a "
        "learning phase of other prompts just before the window (below), from the same embedding and text "
        "features; (a0) one "
        "constant for every request (the mix's mean answer, below); (a*) the true length; (b) nothing (no "
        "admission). LiteLLM routes without any length.",
        "- **Checked in every run** (table at the end): the simulators' lookups hit for every request that "
        "reached them and missed none, so each conversation arrived byte for byte as the client sent it (the "
        "key covers every message: a prepended example or system prompt would miss); no answer carried "
        "`x-icgate-examples`. icgate's policy for (a) and (a+) turns the cache on only to get the embedding "
        "the predictor reads (with a rule router the gateway embeds a request for nothing else): exact "
        "hits, in-context examples and storing are off, so the semantic lookup runs against an empty cache "
        "and can never hit (checked: no answer came from the cache, and the cache held 0 entries at the "
        "end of every run, learning phase included).",
    ]
    if CONTENT in setups:
        lines.append(
            "- **`content`**: the conv trace's arrival times, each row a real conversation "
            "(bench/content_trace.py): "
            "the prompt text is the dataset's, as a user message (a MeanCache follow-up comes after its "
            "first "
            "question and answer: three messages). None of these prompts trained the length predictor: "
            "Arena-Hard "
            "only from the held-out buckets 8-9 of sha1(question_id), the ones the shipped predictor was not "
            "trained on (`lengths/training.py` `split_rows`), and every replayed user turn was checked "
            "against "
            "the artifact's own list of training prompts; GSM8K and MeanCache were never training data "
            "for it. "
            f"Token counts: {content_trace.TOKENIZER}; Arena-Hard's answer counts are the file's (cl100k "
            "too)."
        )
    if any(t in setups for t in TRACE_FILES):
        lines.append(
            "- **`conv` / `code`** (Azure token counts): each prompt is `<id> tok tok ...`, "
            "ContextTokens words, "
            "the first an opaque 3-character id drawn at random per row; the simulators' file maps that "
            "prompt to the row's GeneratedTokens. No `max_tokens` is sent (except by (a*)), so unlike the "
            "previous report's runs the gateway no longer gets the answer's length with the request. "
            "The predictor reads `tok tok ...` (no embedding for a prompt like that means anything), so on "
            "these traces (a) is about as blind as (a0)."
        )
    return lines


def write_report(
    path: Path,
    results: Sequence[RunResult],
    setups: dict[str, TraceSetup],
    meta: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    traces = list(setups)
    lines = [
        "# Load benchmark: icgate's admission (learned, constant, oracle lengths) vs. LiteLLM's proxy",
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
        f"window {args.duration_s:g} s per run, then stragglers for at least {args.straggle_s:g} s and at "
        "most the longest answer's time at the objectives (see Replay); "
        f"icgate with admission aims {args.ttft_margin:.0%} under the TTFT objective "
        "(`admission.ttft_margin`)",
        f"- per-request logs and configs: `{meta['work']}` (not kept)",
    ]
    for key, why in (meta.get("skipped") or {}).items():
        lines.append(f"- **not run**: {SYSTEMS[key].label}: {why}")
    lines += [
        "",
        "## What the client sent and what the gateway could know",
        "",
        *disclosure_lines(setups, args),
    ]
    lines += ["", "## Setup", ""]
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
        "## Target (issue 18): (a) and (a+) against the best LiteLLM, and against (a0) and (a*)",
        "",
        *target_lines(results, args.ttft_slo_ms / 1000),
    ]
    learned = learning_lines(results, setups, args)
    if learned:
        lines += ["", "## Before the window: what (a+) learned, and the others' warm phase", "", *learned]
    sized = sizing_lines(results)
    if sized:
        lines += ["", "## (a) and (a+): each backend's predicted against answered tokens", "", *sized]
    for trace, client in groups_of(results):
        rows = [r for r in results if r.trace == trace and r.client == client]
        sent = client_mode(client).label
        lines += ["", f"## Results: `{trace}`, client sends {sent}", "", *results_table(rows)]
    lines += ["", "## Lookups, admission counters and errors", "", *admission_lines(results)]
    lines += ["", f"![goodput and p99 TTFT vs load]({path.with_suffix('.png').name})", ""]
    lines += ["## Caveats", "", *CAVEATS.splitlines()]
    path.write_text("\n".join(lines) + "\n")


METHOD = f"""\
- **Backends**: two simulators (`python -m bench.simulator --preset small|large --lengths FILE`), one
  process each, started once and shared by all systems; before each run they are idle (0 running, 0
  waiting). They cost time like vLLM's continuous batching (prefill per prompt token, a decode step per
  batch, no chunked prefill, so a prefill stalls the running batch). A request reserves KV for its
  prompt and its whole answer at admission (no preemption).
- **Capacity**: per trace and backend, a closed loop of many clients sends the rows that will be
  replayed, shuffled, straight to the simulator; after a warm-up, req/s = generated tokens/s over the
  window divided by the rows' mean output length. C = C_small + C_large; load k offers k*C req/s.
  Two other estimates from the same window (finished requests; prefilled tokens / mean prompt) are
  shown below: they differ by 10-60%, so a 20 s window is short for these heavy-tailed mixes.
  Traces are not stationary, so a quick first measurement with the whole trace's mix only sizes the
  largest replay window, and C is measured with that window.
- **Replay**: the trace's first n = k*C*window rows, in order; their gaps are scaled by one factor so
  the window lasts exactly its duration (the trace's burstiness is kept). Each request is a streamed
  chat completion (`stream_options.include_usage`). After the window, the client waits for stragglers
  as long as the window's longest answer could take at the objectives (TTFT objective + its tokens x
  TPOT objective), but stops as soon as no open request can still be good (no first token within the
  TTFT objective, or slower than the TPOT objective for the length its answer will have); requests
  still open then are cancelled and count as misses (timed out), so a cancelled request could never
  have been good. Percentiles of completed requests are therefore censored for systems that leave
  requests waiting past that point.
- **Systems**, one fresh process per (system, load, client), in the order listed at each load:
  (a), (a+), (a0), (a*), (b) `icgate serve --no-launch`, routed model `auto`, rule router (threshold
  below), both backends `client: http` with `metrics_url`, no embedding preload, cache off, except for
  (a) and (a+), where it is on for the embedding only (see above). (a+) runs a learning phase of other
  prompts through the same process before its window, and (a), (a0), (a*) a warm phase of the same
  prompts (`--warm-requests`), so every admission starts its window with warm latency models (see
  "Before the window"). (c1)-(c4) `litellm --config ...
  --num_workers 1` (bench/litellm_proxy.py) with one model group over the two simulators, `num_retries: 0`;
  simple-shuffle gets `weight` = each backend's measured capacity, so it splits like the rule does on
  average; least-busy balances in-flight counts. (c1)/(c2) neither queue nor refuse: they forward
  everything, and the simulators queue. (c3)/(c4) set each deployment's `max_parallel_requests` to
  icgate's `max_concurrent` for it. In litellm {LITELLM_VERSION} that is a per-deployment counter
  (`MaxParallelRequestsLimit`, litellm/router_utils/client_initalization_utils.py), taken after the
  deployment is chosen and held until a stream ends: a request routed to a deployment with every slot
  taken gets 429 at once ("Deployment has all max_parallel_requests slots in use"); it never waits for
  a slot, and with `num_retries: 0` it is not tried on the other deployment. Measured on loopback
  (2 slots per deployment, least-busy, a burst of 8 streams): 2 served, 6 refused in 0.13-0.16 s, the
  other deployment unused (least-busy counts a request only after routing it, and ties go to the first
  deployment); the deployment was not put in cooldown (the next 6 sequential requests were served).
  LiteLLM's guard against looping models (abort a stream after 100 identical chunks) is raised out of
  the way (`REPEATED_STREAMING_CHUNK_LIMIT`), since the simulator answers `tok tok tok ...`.
- **Why the threshold**: the rule sends prompts whose chars/4 estimate exceeds T to `large`; T is the
  quantile of that estimate that gives `large` its share of the measured capacity, so (b) is not
  handicapped by a lopsided split.
- **Why max_concurrent** (enforced by (a), (a0), (a*) and, as max_parallel_requests, (c3)/(c4)): a decode
  step of n sequences takes decode_ms_base + decode_ms_per_seq*n, and in steady state n/mean_output
  sequences are replaced per step, each costing its prefill, which stalls the batch. n is the largest
  batch whose predicted TPOT stays within {TPOT_MARGIN:.0%} of the objective (the rest is headroom for
  bursts of prefills) and whose mean request fits the KV cache. The priors `expected_ttft_ms` /
  `expected_tpot_ms` come from the same model.
- **Metrics**: good = status 200, stream finished, TTFT (first chunk with content, from the client's
  send) <= objective and TPOT = (end - first token)/(tokens - 1) <= objective; goodput = good /
  window. Percentiles are over completed requests (refused and timed-out ones have none). A 429 is
  *after queueing* when icgate's message says the request "could not start in time" (it was queued, then
  refused at its turn or when its time ran out), else *at arrival*; LiteLLM's 429s all count as at
  arrival (it never waits for a slot), though a busy proxy may take seconds to send one.
  *Predicted vs answered*: icgate's `x-icgate-predicted-tokens` (the p50 admission used, after the cap at
  `max_tokens`) against the tokens the answer had, over completed requests: mean absolute error,
  Kendall's tau, and the share predicted short. *Spilled* = served by the tier the rule did not pick
  (x-icgate-backend); *CPU* = share of one core each process used during the replay (2 cores in all)."""

CAVEATS = """\
- The content-bearing trace has few long answers to learn from: 41 held-out Arena-Hard prompts carry the
  long tail, and each repeats in a window (every distinct conversation always means one length). GSM8K
  and MeanCache answers are short and similar, so there a single constant is already close.
- (a) pays for its embedding (one MiniLM encode per request on the gateway's CPU) inside the TTFT the
  client measures; (a0), (a*) and (b) make none.
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
    p.add_argument("--traces", default=",".join(TRACES), help="comma list of: " + ", ".join(TRACES))
    p.add_argument("--loads", default="1,1.5,2", help="loads as multiples of capacity, for every trace")
    p.add_argument(
        "--trace-loads",
        action="append",
        default=None,
        metavar="TRACE=LOADS",
        help="override --loads for one trace, e.g. code=1.5 (default: code=1.5)",
    )
    p.add_argument(
        "--systems", default=",".join(DEFAULT_SYSTEMS), help="comma list of: " + ", ".join(SYSTEMS)
    )
    p.add_argument("--cap", type=int, default=1024, help="the fixed max_tokens of the capped runs")
    p.add_argument(
        "--capped",
        action="append",
        default=None,
        metavar="TRACE=LOADS",
        help="also run TRACE at LOADS with max_tokens --cap on every request (default: content=1.5; "
        "'none': no capped runs)",
    )
    p.add_argument(
        "--content-weights",
        default=",".join(f"{k}={v:g}" for k, v in content_trace.DEFAULT_WEIGHTS.items()),
        help="share of the content trace's requests per source",
    )
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
    p.add_argument(
        "--learn-load",
        type=float,
        default=0.9,
        help="(a+)'s learning phase: its learning-half requests are sent evenly at this multiple of C",
    )
    p.add_argument(
        "--learn-refit-s",
        type=float,
        default=10.0,
        help="(a+)'s `lengths.refit_interval_s`: how soon a backend's own predictor follows its answers",
    )
    p.add_argument(
        "--warm-requests",
        type=int,
        default=500,
        help="requests of the learning half every other icgate system with admission gets before its "
        "window (its latency models then start as warm as (a+)'s); 0: none",
    )
    p.add_argument(
        "--learn-max-s",
        type=float,
        default=600.0,
        help="(a+)'s learning phase sends at most this long (it ends once each backend's own is in force)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    p.add_argument("--rerender", type=Path, metavar="WORK_DIR", help="rebuild the report of a finished run")
    return p


def loads_per_trace(args: argparse.Namespace) -> dict[str, list[float]]:
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    unknown = [t for t in traces if t not in TRACES]
    if unknown:
        raise SystemExit(f"unknown traces {unknown}")
    plan = {t: parse_loads(args.loads) for t in traces}
    for item in args.trace_loads if args.trace_loads is not None else ["code=1.5"]:
        name, _, loads = item.partition("=")
        if name in plan:
            plan[name] = parse_loads(loads)
    return plan


def run_plan(args: argparse.Namespace) -> list[tuple[str, float, ClientMode]]:
    """(trace, load, client) in run order: every load with no max_tokens; the capped ones after it."""
    capped: dict[str, list[float]] = {}
    for item in args.capped if args.capped is not None else [f"{CONTENT}=1.5"]:
        if item.strip().lower() == "none":
            continue
        name, _, loads = item.partition("=")
        capped[name.strip()] = parse_loads(loads)
    cap = client_mode(str(args.cap))
    out = []
    for trace, loads in loads_per_trace(args).items():
        for load in loads:
            out.append((trace, load, NO_MAX_TOKENS))
            if load in capped.get(trace, ()):
                out.append((trace, load, cap))
    return out


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


def setup_from_json(
    raw: dict[str, Any], weights: dict[str, float] | None = None, learning: bool = False
) -> TraceSetup:
    trace = load_trace(raw["trace"], kv_limit(), weights)
    return TraceSetup(
        trace,
        {t: Capacity(**c) for t, c in raw["capacity"].items()},
        int(raw["threshold"]),
        {t: BackendPlan(**p) for t, p in raw["plans"].items()},
        raw.get("mix_rows", 0),
        {t: Capacity(**c) for t, c in raw["whole_capacity"].items()} if raw.get("whole_capacity") else None,
        learning_trace(trace, kv_limit(), weights) if learning else None,
    )


def load_traces(
    names: Sequence[str], weights: dict[str, float], learning: bool = False
) -> tuple[dict[str, Trace], dict[str, Trace]]:
    """Every trace the plan replays (the content pool read once), and with `learning` each one's learning
    traffic for (a+) (`learning_trace`)."""
    pool = content_trace.load_pool() if CONTENT in names else None
    if pool is not None:
        content_trace.check_held_out(pool, content_trace.trained_prompt_digests())
    traces = {name: load_trace(name, kv_limit(), weights, pool) for name in names}
    taught = {}
    if learning:
        taught = {name: learning_trace(trace, kv_limit(), weights, pool) for name, trace in traces.items()}
    return traces, taught


def run_benchmark(
    args: argparse.Namespace, work: Path, skipped: dict[str, str]
) -> tuple[list[RunResult], dict[str, TraceSetup]]:
    """Traces and the simulators' length file, simulators up, then per trace: capacity, policy choices,
    and every (load, client, system) run; `skipped` collects systems icgate cannot run.

    What a run produces is saved in `work` as it goes (setups.json, results.json, one .jsonl of
    requests per run), so `--rerender` can rebuild the report without running again.
    """
    plan = run_plan(args)
    systems = [SYSTEMS[s.strip()] for s in args.systems.split(",") if s.strip()]
    if any(s.kind == "litellm" for s in systems):
        ensure_proxy_venv(quiet=False)
    weights = content_trace.parse_weights(args.content_weights)
    learns = any(has_phase(s, args) for s in systems)
    traces, taught = load_traces(list(dict.fromkeys(t for t, _, _ in plan)), weights, learns)
    lengths = length_book([*traces.values(), *taught.values()]).save(work / "lengths.json")
    sims = {t: start_sim(t, work, lengths) for t in TIERS}
    results: list[RunResult] = []
    setups: dict[str, TraceSetup] = {}
    try:
        for name, load, client in plan:
            if name not in setups:
                loads = [x for t, x, _ in plan if t == name]
                setup = setups[name] = prepare_trace(traces[name], max(loads), sims, args)
                setup.learning = taught.get(name)
                (work / "setups.json").write_text(json.dumps([setup_to_json(x) for x in setups.values()]))
                print(f"[{name}] C = {setup.total_capacity:.2f} req/s, rule threshold {setup.threshold}")
                print(f"[{name}] plans {setup.plans}", flush=True)
                for system in systems:
                    if system.kind == "icgate" and system.key not in skipped:
                        problem = policy_problem(
                            icgate_policy(
                                setup,
                                sims,
                                system.admission,
                                args,
                                system.lengths,
                                refit_of(system),
                                system.shed,
                            )
                        )
                        if problem:
                            skipped[system.key] = f"icgate refuses its policy: {problem}"
                            print(f"skipping {system.key}: {problem}", flush=True)
            for system in systems:
                if system.key in skipped or (system.client is not None and client != NO_MAX_TOKENS):
                    continue  # (a*)'s client sends the true length whatever the run's client mode
                result = run_one(system, setups[name], load, client, sims, work, args)
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
    weights = content_trace.parse_weights(args.content_weights)
    raws = json.loads((work / "results.json").read_text())
    learned = any(raw.get("learning") for raw in raws)
    setups = {
        raw["trace"]: setup_from_json(raw, weights, learned)
        for raw in json.loads((work / "setups.json").read_text())
    }
    names = {f.name for f in dataclasses.fields(Outcome)}
    results = []
    for raw in raws:
        path = work / run_file(raw["trace"], raw["load"], raw["client"], raw["system"])
        with open(path) as f:
            outcomes = [Outcome(**{k: v for k, v in json.loads(line).items() if k in names}) for line in f]
        threshold = setups[raw["trace"]].threshold
        summary = summarize(
            outcomes, raw["trace"], raw["load"], raw["system"], raw["duration_s"], threshold, args
        )
        kept = {
            k: raw[k] for k in ("cpu", "admission", "startup_s", "drain_s", "wall_s", "client", "lookups")
        }
        # From the gateway's database at run time (older runs have none).
        kept |= {k: raw[k] for k in DATABASE_FIELDS if k in raw}
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
    plot(results, args.ttft_slo_ms / 1000, out.with_suffix(".png"))
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
    skipped: dict[str, str] = {}
    results, setups = run_benchmark(args, work, skipped)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "took_s": time.monotonic() - started,
        "load_start": load_start,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commit": code_label(REPO),
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/load.py", *(argv or sys.argv[1:])]
        ),
        "work": str(work),
        "skipped": skipped,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    render(args.out, results, setups, meta, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
