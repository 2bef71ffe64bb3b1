"""Soak: `icgate serve` under a steady mixed load for a long time, watched for anything that grows.

LiteLLM's proxy leaks memory over days (BerriAI/litellm#12685, #27954) and file descriptors (#13220,
#12872), and its RSS ratchets up when request-log writes to the database fail (#38193). This benchmark
holds one `icgate serve` process at a steady open-loop rate for `--duration-s` (default 30 minutes) and
samples, every `--sample-s` (default 10 s):

- the serving process tree's RSS, open file descriptors and threads (/proc/<pid>/status, /proc/<pid>/fd);
- the gateway's live asyncio tasks, database pool connections (checked out, idle) and requests in flight,
  from its /metrics (`icgate_asyncio_tasks`, `icgate_db_connections{state}`, `icgate_inflight_requests`);
- the window's p50 / p99 latency of answered non-streamed requests, and its outcomes by kind.

Set-up. Two stand-in backends (bench/standin_backend.py) in threads of this process: `small` fails
`--backend-error-rate` of its calls with HTTP 500 (the gateway retries them on `large`, so the client gets
its answer with `x-icgate-fallback-from`) and breaks `--stream-break-rate` of its streams after the first
chunk (the connection drops mid-answer: the client gets an error event). `icgate serve` runs as a
subprocess with the default policy except: its two backends on the stand-ins (each backend's `client` left
at its default), the learned router, auth off, no trace export, and the cache capped at `--cache-entries`
per tenant, and the requests remembered for feedback (`cache.feedback_memory`) at the same number. The
caps are there so that both maps reach their steady state (full, evicting) before the measurement: with
the default caps (100,000 entries; 50,000 requests, about 0.5 KB each) they grow by design through the
whole run and hide any other growth. The database is SQLite in the data directory, or
`--database-url` (PostgreSQL).

The load: `--rate` arrivals a second, evenly spaced, each request its own task (open loop: a slow gateway
does not slow the arrivals). Questions are real Quora questions (../shared/data/cache/qqp_pairs.jsonl.gz).
The mix (`MIX`): new questions (misses, stored), exact repeats of recently answered ones (exact hits), the
other question of a Quora duplicate pair whose first question was answered (semantic candidates: hits when
the verifier agrees), requests naming the `large` backend (the named path), streams read to the end,
streams the client drops after the first chunk, non-streamed requests the client gives up on while the
backend is still working, requests that ask both stand-ins for a 503 (the client gets an OpenAI error
object with a 5xx status), and malformed requests (4xx). Every outcome is classified. A 5xx OpenAI error
that blames a backend on any other request passes an injected failure through (a 500 of `small` whose
fallback was refused: `large`'s circuit was open) and is counted as such; anything else (a 5xx nobody
injected, a non-OpenAI error body, a stream that ends without `[DONE]`, a client-side exception or
timeout) counts as `unexpected`.

Protocol: start-up; `--prefill` questions at concurrency 4 (the cache fills to its cap); a warm-up at the
soak's rate (`--warmup-s`); an idle pause (`--idle-s`, longer than the keep-alive timeouts) and the
`idle-before` sample; the soak itself (`--duration-s`); the same idle pause and the `idle-after` sample.
Comparing the two idle samples shows what the soak left behind (descriptors, tasks, connections, threads)
with the load's own churn gone.

Verdict per series (`BOUNDS`, each with why): RSS and latency by the slope per 10 minutes of a
least-squares line through the soak's second half (growth that keeps going); descriptors, tasks and threads
by idle after - idle before (under an open loop they follow the requests in flight, which a shared machine
does not hold steady; the report also gives their slope with the requests in flight held constant);
database connections by the most checked out at once. Latency is not judged when the machine's median load
average is above its cores: it then measures the machine.

Run:  .venv/bin/python bench/soak.py                                    (30 minutes plus about 4)
      .venv/bin/python bench/soak.py --duration-s 120 --out /tmp/soak.md  (a smoke run)
      .venv/bin/python bench/soak.py --database-url postgresql://postgres@127.0.0.1:5432/soak
      .venv/bin/python bench/soak.py --from-json bench/results/soak.json --notes bench/results/soak.notes.md
          (the report and plot again from a run's JSON, with a hand-written reading)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import json
import logging
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerThread, free_port  # noqa: E402
from bench.litellm_proxy import tree_pids  # noqa: E402
from bench.overhead import machine, pct  # noqa: E402
from bench.standin_backend import StandinBackend  # noqa: E402

QQP = ROOT.parent / "shared" / "data" / "cache" / "qqp_pairs.jsonl.gz"
PREPARED_MODELS = ROOT / "data" / "models"  # `make install` exports the embedder's graphs there
CHAT = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
PREFILL_CONCURRENCY = 4  # low enough that the embedder's queue turns no text away: all are stored
CLIENT_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_TEXT = f"no answer within the client's {CLIENT_TIMEOUT_S:g} s timeout"
MAX_OUTSTANDING = 256  # arrivals beyond this many unanswered requests are skipped (and counted)
ABANDON_AFTER_S = 0.3  # an abandoning client hangs up this long after sending
ABANDON_BACKEND_MS = 2000  # while the stand-in is still "working" on its answer
STREAM_GAP_MS = 5  # pause between streamed words: a stream lasts ~60 ms
# SQLAlchemy's QueuePool defaults (pool_size 5 + max_overflow 10), which the gateway's engine keeps.
DB_POOL_LIMIT = 15

# Share of arrivals per kind of request.
MIX: dict[str, float] = {
    "miss": 0.30,  # a new question
    "repeat": 0.20,  # a recently answered question again: an exact hit
    "paraphrase": 0.12,  # the duplicate of an answered question: a semantic candidate
    "named": 0.10,  # `model: large` (the named path: exact hits only); half new, half repeats
    "stream": 0.13,  # streamed and read to the end; half new questions, half repeats
    "stream-cut": 0.06,  # streamed; the client hangs up after the first chunk
    "abandon": 0.05,  # not streamed; the client hangs up while the backend works
    "fail": 0.02,  # asks both stand-ins for a 503: the client gets a 5xx OpenAI error
    "bad": 0.02,  # malformed: a 4xx OpenAI error
}
NON_STREAMED = ("miss", "repeat", "paraphrase", "named")  # the kinds whose latency the windows report
# A 5xx OpenAI error object that blames a backend: the stand-ins fail only when told to, so it passes an
# injected failure through (a 500 of `small` whose fallback was refused: the other's circuit was open).
PASSED_THROUGH = "5xx-passed-through"
BACKEND_ERROR_CODES = ("backend_error", "backend_unavailable")
ANSWERS = {"ok", "exact", "semantic", PASSED_THROUGH}
# Outcomes that are what the request asked for; everything else is `unexpected:...`.
EXPECTED = {
    "miss": ANSWERS,
    "repeat": ANSWERS,
    "paraphrase": ANSWERS,
    "named": ANSWERS,
    "stream": {*ANSWERS, "stream-broken"},
    "stream-cut": {"cut", "stream-broken", PASSED_THROUGH},
    "abandon": {"cut", *ANSWERS},
    "fail": {"5xx-injected"},
    "bad": {"4xx"},
}
BAD_BODIES: tuple[bytes, ...] = (
    b'{"model": "auto"}',  # no messages
    json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    b'{"model": "auto", "messages": [',  # not JSON
    json.dumps({"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
)


@dataclass(frozen=True)
class Bound:
    """The measure a series is judged by, and its limit."""

    measure: str  # "slope": per 10 min, 2nd half | "left": idle after - idle before | "max": during the soak
    limit: float
    why: str
    relative: bool = False  # the limit is a share of the series' median (latency)


BOUNDS: dict[str, Bound] = {
    "rss_mb": Bound(
        "slope",
        2.0,
        "2 MB per 10 min is ~170 bytes per request at 20 req/s: a leak of anything per request (a context, "
        "an answer, a span, a socket's buffers) is more",
    ),
    # Descriptors, tasks and threads follow the requests in flight (a socket or two and a few tasks each),
    # which an open loop on a shared machine does not hold steady: what the soak left behind, with the
    # load gone, is the sharp measure (one leaked per thousand requests would leave dozens).
    "fds": Bound("left", 5, "idle after - before: keep-alive connections to the stand-ins vary by a few"),
    "tasks": Bound("left", 2, "idle after - before: the background loops are a fixed set"),
    "threads": Bound("left", 2, "idle after - before: worker pools are bounded and stay warm"),
    "db_checked_out": Bound("max", float(DB_POOL_LIMIT), "the pool's limit (SQLAlchemy's 5 + 10 overflow)"),
    "p50_ms": Bound(
        "slope", 0.10, "10% of the median per 10 min; judged only on a machine not oversubscribed", True
    ),
    "p99_ms": Bound(
        "slope",
        0.25,
        "25% of the median per 10 min (noisier); judged only on a machine not oversubscribed",
        True,
    ),
}


# --- questions ------------------------------------------------------------------------------------------


@dataclass
class Questions:
    """Quora questions, each sent as new at most once: duplicate pairs (their first question is sent as new,
    the second later as a paraphrase) and questions of non-duplicate pairs (for requests whose answer is
    not stored: failures, abandoned requests)."""

    pairs: list[tuple[str, str]]
    singles: list[str]
    rng: random.Random
    answered: deque[str] = field(default_factory=lambda: deque(maxlen=100_000))
    paraphrases: deque[str] = field(default_factory=lambda: deque(maxlen=100_000))
    _twins: dict[str, str] = field(default_factory=dict)  # first question -> its duplicate

    @classmethod
    def load(cls, path: Path, seed: int) -> Questions:
        if not path.is_file():
            raise SystemExit(f"data not found: {path} (see ../shared/data/README.md)")
        seen: set[str] = set()
        pairs, singles = [], []
        with gzip.open(path, "rt") as lines:
            for line in lines:
                row = json.loads(line)
                a, b = row["text_a"].strip(), row["text_b"].strip()
                if not a or a.casefold() in seen:
                    continue
                if row["duplicate"] == 1 and b and b.casefold() not in seen and b.casefold() != a.casefold():
                    seen.update((a.casefold(), b.casefold()))
                    pairs.append((a, b))
                elif row["duplicate"] != 1:
                    seen.add(a.casefold())
                    singles.append(a)
        rng = random.Random(seed)
        rng.shuffle(pairs)
        rng.shuffle(singles)
        return cls(pairs, singles, rng)

    def new(self) -> str:
        """A question never sent; its duplicate becomes a paraphrase once it is answered."""
        if not self.pairs:
            return self.single()
        a, b = self.pairs.pop()
        self._twins[a] = b
        return a

    def single(self) -> str:
        if self.singles:
            return self.singles.pop()
        if self.pairs:
            return self.pairs.pop()[0]
        raise RuntimeError("every question has been sent: lower --rate or --duration-s")

    def stored(self, question: str) -> None:
        """The backend answered `question` (so the gateway stored it): it may be repeated."""
        self.answered.append(question)
        twin = self._twins.pop(question, None)
        if twin is not None:
            self.paraphrases.append(twin)

    def repeat(self, recent: int) -> str | None:
        """One of the last `recent` answered questions (older ones may have been evicted)."""
        if not self.answered:
            return None
        k = min(recent, len(self.answered))
        return self.answered[-1 - self.rng.randrange(k)]

    def paraphrase(self) -> str | None:
        return self.paraphrases.pop() if self.paraphrases else None


# --- the stand-ins --------------------------------------------------------------------------------------


class InjectedBreak(Exception):
    """Raised inside a stand-in's stream: the connection drops mid-answer."""


class FaultyStandin(StandinBackend):
    """A stand-in that fails `error_rate` of its calls with HTTP 500 and breaks `break_rate` of its streams
    after the first chunk; it counts what it injected."""

    def __init__(self, name: str, error_rate: float, break_rate: float, seed: int) -> None:
        super().__init__(name, keep=0)
        self.error_rate = error_rate
        self.break_rate = break_rate
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()

    async def _prepare_counted(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        body, failure = await super()._prepare_counted(request)
        if failure is None and self.rng.random() < self.error_rate:
            self.injected["500"] += 1
            err = {"error": {"message": "injected", "type": "server_error", "param": None, "code": None}}
            return body, JSONResponse(err, status_code=500)
        return body, failure

    async def _stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        broken = self.rng.random() < self.break_rate
        n = 0
        async for chunk in super()._stream(*args, **kwargs):
            if broken and n == 1:
                self.injected["stream-break"] += 1
                raise InjectedBreak("injected stream break")
            n += 1
            yield chunk


class _QuietBreaks(logging.Filter):
    """uvicorn logs every exception of an app with its traceback: not the breaks we inject."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, InjectedBreak):
                return False
            exc = exc.__cause__ or exc.__context__ or getattr(exc, "exceptions", [None])[0]
        return True


@dataclass
class Standins:
    small: FaultyStandin
    large: StandinBackend
    servers: list[ServerThread]

    @property
    def injected(self) -> Counter[str]:
        return Counter(self.small.injected)


@contextlib.contextmanager
def standins(error_rate: float, break_rate: float, seed: int) -> Iterator[Standins]:
    logging.getLogger("uvicorn.error").addFilter(_QuietBreaks())
    small = FaultyStandin("small-model", error_rate, break_rate, seed)
    large = StandinBackend("large-model", keep=0)
    servers = [ServerThread(small.app).start(), ServerThread(large.app).start()]
    try:
        yield Standins(small, large, servers)
    finally:
        for server in servers:
            server.stop()


# --- the gateway ----------------------------------------------------------------------------------------


def soak_policy(
    small_url: str, large_url: str, cache_entries: int, database_url: str | None
) -> dict[str, Any]:
    """The default policy but for the backends (the stand-ins), the learned router, auth, trace export and
    the cache's cap."""
    backends = [
        {"name": name, "tier": name, "model": f"openai/{model}", "api_base": url + "/v1"}
        for name, model, url in (("small", "small-model", small_url), ("large", "large-model", large_url))
    ]
    policy: dict[str, Any] = {
        "backends": backends,
        "routed_models": ["auto"],
        "router": {"kind": "learned", "default_tier": "small", "large_tier": "large"},
        "auth": {"required": False},
        "telemetry": {"traces_exporter": "none"},
        # The requests remembered for feedback are a bounded map as well (50,000 by default, ~0.5 KB
        # each): at 20 req/s it fills for 40 minutes. At the cache's cap it is full within the warm-up.
        "cache": {"max_entries_per_tenant": cache_entries, "feedback_memory": cache_entries},
    }
    if database_url:
        policy["database"] = {"url": database_url}
    return policy


@dataclass
class GatewayProc:
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path
    command: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"


def start_gateway(workdir: Path, policy: dict[str, Any], env: Iterable[str] = ()) -> GatewayProc:
    """`icgate serve` on a free port with its own data directory (sharing the prepared model graphs)."""
    data = workdir / "data"
    data.mkdir(parents=True)
    if PREPARED_MODELS.is_dir():  # no export at start-up
        (data / "models").symlink_to(PREPARED_MODELS)
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    port = free_port()
    cli = ["serve", "--policy", str(path), "--port", str(port), "--data-dir", str(data), "--no-launch"]
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "icgate.gateway.cli.main", *cli],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **dict(kv.split("=", 1) for kv in env)},
        )
    command = shlex.join([*env, "icgate", *cli]).replace(str(workdir) + "/", "")
    return GatewayProc(popen, f"http://127.0.0.1:{port}", log_path, command)


async def wait_ready(gw: GatewayProc, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if gw.popen.poll() is not None:
                raise RuntimeError(f"icgate serve exited with {gw.popen.returncode}:\n{gw.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(gw.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"icgate serve not ready after {timeout_s} s:\n{gw.tail()}")


def stop_gateway(gw: GatewayProc, timeout_s: float = 60.0) -> int:
    """SIGTERM (the gateway drains and flushes its log), SIGKILL if it hangs; its exit status."""
    if gw.popen.poll() is None:
        gw.popen.send_signal(signal.SIGTERM)
        try:
            gw.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            gw.popen.kill()
            gw.popen.wait(10)
    return gw.popen.returncode


# --- /proc and /metrics ---------------------------------------------------------------------------------


@dataclass
class ProcState:
    rss_mb: float = 0.0
    fds: int = 0
    threads: int = 0
    cpu_s: float = 0.0


def proc_state(pid: int) -> ProcState:
    """RSS, open descriptors, threads and CPU seconds of the process tree under `pid`."""
    out = ProcState()
    tick = os.sysconf("SC_CLK_TCK")
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.rss_mb += int(line.split()[1]) / 1024.0
                elif line.startswith("Threads:"):
                    out.threads += int(line.split()[1])
            out.fds += len(os.listdir(f"/proc/{p}/fd"))
            stat = Path(f"/proc/{p}/stat").read_text()
            fields_ = stat[stat.rindex(")") + 2 :].split()
            out.cpu_s += (int(fields_[11]) + int(fields_[12])) / tick
    return out


GAUGES = {
    "tasks": ("icgate_asyncio_tasks", {}),
    "db_checked_out": ("icgate_db_connections", {"state": "checked_out"}),
    "db_idle": ("icgate_db_connections", {"state": "idle"}),
    "inflight": ("icgate_inflight_requests", {}),
    "log_dropped": ("icgate_request_log_dropped_total", {}),
    "malloc_in_use": ("icgate_malloc_bytes", {"state": "in_use"}),
    "malloc_free": ("icgate_malloc_bytes", {"state": "free"}),
    "py_blocks": ("icgate_python_allocated_blocks", {}),
    "sqlite_memory": ("icgate_sqlite_memory_bytes", {}),
}


def parse_gauges(text: str) -> dict[str, float | None]:
    """The values of `GAUGES` in a /metrics page (None: absent)."""
    out: dict[str, float | None] = dict.fromkeys(GAUGES)
    wanted = {(name, tuple(sorted(labels.items()))): key for key, (name, labels) in GAUGES.items()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = wanted.get((s.name, tuple(sorted(s.labels.items()))))
            if key is not None:
                out[key] = s.value
    return out


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float | None]:
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return parse_gauges(await resp.text())
    except (aiohttp.ClientError, TimeoutError):
        return dict.fromkeys(GAUGES)


# --- the load -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    outcome: str  # ok | exact | semantic | cut | stream-broken | 4xx | 5xx-injected | unexpected:...
    done: float  # time.monotonic() when it ended
    latency_ms: float
    fallback: bool = False

    @property
    def expected(self) -> bool:
        return self.outcome in EXPECTED[self.kind]


def chat_body(question: str, model: str = "auto", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": question}], **extra}).encode()


def hit_kind(headers: Any) -> str:
    if headers.get("x-icgate-route") != "cache":
        return "ok"
    return "exact" if headers.get("x-icgate-similarity") == "1.0000" else "semantic"


def openai_error(raw: bytes) -> dict[str, Any] | None:
    """The `error` object of an OpenAI error body, None if `raw` is not one."""
    with contextlib.suppress(ValueError, AttributeError):
        err = json.loads(raw).get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err
    return None


def is_openai_error(raw: bytes) -> bool:
    return openai_error(raw) is not None


class Load:
    """Sends the mix, classifies every answer, and feeds answered questions back as repeatable."""

    def __init__(self, url: str, questions: Questions, seed: int, cache_entries: int) -> None:
        self.url = url + CHAT
        self.q = questions
        self.rng = random.Random(seed)
        self.recent = max(1, cache_entries // 2)  # repeats come from what the capped cache surely holds
        self.outcomes: list[Outcome] = []
        self.unexpected_samples: dict[str, str] = {}
        self.outstanding = 0
        self.skipped = 0  # arrivals dropped because MAX_OUTSTANDING requests were unanswered
        self.sent: list[float] = []  # arrival times
        self.skips: list[tuple[float, str]] = []  # (when, `x-icgate-cache-skipped`) of answers

    def pick(self) -> str:
        r, acc = self.rng.random(), 0.0
        for kind, share in MIX.items():
            acc += share
            if r < acc:
                return kind
        return "miss"

    async def one(self, session: aiohttp.ClientSession, kind: str) -> None:
        self.outstanding += 1
        t0 = time.monotonic()
        try:
            outcome, fallback, stored = await self._send(session, kind)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            outcome, fallback, stored = f"unexpected:{type(exc).__name__}", False, None
            self.unexpected_samples.setdefault(f"{kind}/{outcome}", str(exc)[:300] or CLIENT_TIMEOUT_TEXT)
        finally:
            self.outstanding -= 1
        done = time.monotonic()
        self.outcomes.append(Outcome(kind, outcome, done, (done - t0) * 1000.0, fallback))
        if stored is not None:
            self.q.stored(stored)

    async def _send(self, session: aiohttp.ClientSession, kind: str) -> tuple[str, bool, str | None]:
        """(outcome, answered by the fallback?, the question if a backend answered it and it was stored)."""
        if kind == "bad":
            body = BAD_BODIES[self.rng.randrange(len(BAD_BODIES))]
            async with session.post(self.url, data=body, headers=JSON_HEADERS) as resp:
                raw = await resp.read()
                return (
                    (
                        "4xx"
                        if 400 <= resp.status < 500 and is_openai_error(raw)
                        else self._odd(kind, resp.status, raw)
                    ),
                    False,
                    None,
                )
        if kind == "fail":
            body = chat_body(self.q.single(), x_standin={"fail": 503})
            async with session.post(self.url, data=body, headers=JSON_HEADERS) as resp:
                raw = await resp.read()
                ok = resp.status >= 500 and is_openai_error(raw)
                return ("5xx-injected" if ok else self._odd(kind, resp.status, raw)), False, None
        if kind == "abandon":
            body = chat_body(self.q.single(), x_standin={"delay_ms": ABANDON_BACKEND_MS})
            try:
                async with asyncio.timeout(ABANDON_AFTER_S):
                    async with session.post(self.url, data=body, headers=JSON_HEADERS) as resp:
                        raw = await resp.read()
                        return self._answer(kind, resp, raw, None)
            except TimeoutError:
                return "cut", False, None
        if kind in ("stream", "stream-cut"):
            return await self._stream(session, kind)
        question: str | None = None
        model = "large" if kind == "named" else "auto"
        if kind == "repeat" or (kind == "named" and self.rng.random() < 0.5):
            question = self.q.repeat(self.recent)
        elif kind == "paraphrase":
            question = self.q.paraphrase()
        fresh = question is None or kind == "paraphrase"
        question = question or self.q.new()
        body = chat_body(question, model=model)
        async with session.post(self.url, data=body, headers=JSON_HEADERS) as resp:
            raw = await resp.read()
            return self._answer(kind, resp, raw, question if fresh else None)

    def _answer(
        self, kind: str, resp: aiohttp.ClientResponse, raw: bytes, fresh: str | None
    ) -> tuple[str, bool, str | None]:
        if resp.status != 200:
            return self._odd(kind, resp.status, raw), False, None
        answer = json.loads(raw)
        if not answer.get("choices"):
            return self._odd(kind, resp.status, raw), False, None
        outcome = hit_kind(resp.headers)
        fallback = bool(resp.headers.get("x-icgate-fallback-from"))
        kept = self._kept(resp.headers)
        return outcome, fallback, fresh if outcome == "ok" and kept else None

    def _kept(self, headers: Mapping[str, str]) -> bool:
        """Whether the gateway stores the answer: not when it went without its embedding (a busy
        embedder); the skips are counted."""
        skipped = headers.get("x-icgate-cache-skipped")
        if skipped:
            self.skips.append((time.monotonic(), skipped))
        return skipped != "embedder-busy"

    async def _stream(self, session: aiohttp.ClientSession, kind: str) -> tuple[str, bool, str | None]:
        repeat = self.q.repeat(self.recent) if self.rng.random() < 0.5 else None
        question = repeat or self.q.new()
        extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
        body = chat_body(question, x_standin={"chunk_gap_ms": STREAM_GAP_MS}, **extra)
        async with session.post(self.url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                return self._odd(kind, resp.status, await resp.read()), False, None
            events = []
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(line[6:].strip())
                if kind == "stream-cut":
                    resp.close()  # hang up: the connection is dropped, not returned to the pool
                    return "cut", False, None
            fallback = bool(resp.headers.get("x-icgate-fallback-from"))
            if not events or events[-1] != b"[DONE]":
                return (
                    self._odd(kind, 200, b"stream ended without [DONE]: " + b"|".join(events[-2:])),
                    False,
                    None,
                )
            if any(is_openai_error(e) for e in events[:-1]):
                return "stream-broken", fallback, None
            outcome = hit_kind(resp.headers)
            kept = self._kept(resp.headers)
            return outcome, fallback, question if outcome == "ok" and repeat is None and kept else None

    def _odd(self, kind: str, status: int, raw: bytes) -> str:
        """A status the request did not ask for: an injected backend failure passed through, or unexpected."""
        err = openai_error(raw)
        if status >= 500 and err is not None and err.get("code") in BACKEND_ERROR_CODES:
            return PASSED_THROUGH
        outcome = f"unexpected:HTTP {status}"
        self.unexpected_samples.setdefault(f"{kind}/{outcome}", raw[:300].decode(errors="replace"))
        return outcome

    async def run(self, duration_s: float, rate: float, kinds: tuple[str, ...] | None = None) -> None:
        """Open loop: one arrival every 1/rate seconds for `duration_s`; then wait for the stragglers."""
        connector = aiohttp.TCPConnector(limit=MAX_OUTSTANDING, keepalive_timeout=2.0)
        tasks: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
            start, n = time.monotonic(), 0
            while n / rate < duration_s:
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                n += 1
                self.sent.append(time.monotonic())
                if self.outstanding >= MAX_OUTSTANDING:
                    self.skipped += 1
                    continue
                kind = self.pick() if kinds is None else kinds[n % len(kinds)]
                task = asyncio.create_task(self.one(s, kind))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=90)

    async def prefill(self, n: int) -> None:
        """`n` new questions at PREFILL_CONCURRENCY: the cache fills (to its cap, if n reaches it)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            left = n

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await self.one(s, "miss")

            await asyncio.gather(*(worker() for _ in range(PREFILL_CONCURRENCY)))


# --- samples --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    phase: str  # idle-before | soak | idle-after
    t_s: float  # seconds since the soak started
    rss_mb: float
    fds: int
    threads: int
    tasks: float | None
    db_checked_out: float | None
    db_idle: float | None
    inflight: float | None
    log_dropped: float | None
    cpu_pct: float  # the gateway tree's CPU over the window (100 = one core)
    client_cpu_pct: float  # this process's: the load generator and the stand-ins
    loadavg_1m: float
    outstanding: int  # client requests not yet answered
    sent: int = 0  # arrivals in the window
    answered: int = 0  # answered non-streamed requests in the window (the latency's sample)
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    outcomes: dict[str, int] = field(default_factory=dict)
    cache_skipped: dict[str, int] = field(default_factory=dict)  # `x-icgate-cache-skipped` in the window
    # Where the RSS sits (the gateway process only; None: not glibc, or a report from before these existed)
    malloc_in_use_mb: float | None = None  # C heap bytes handed out (SQLite, onnxruntime, faiss, big objects)
    malloc_free_mb: float | None = None  # C heap bytes free but kept: fragmentation
    py_blocks_k: float | None = None  # Python objects alive, thousands
    sqlite_mb: float | None = None  # the part of malloc_in_use_mb SQLite holds (its page caches)


class Sampler:
    def __init__(self, gw: GatewayProc, load: Load) -> None:
        self.gw = gw
        self.load = load
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._last_t = time.monotonic()
        self._last_cpu = proc_state(gw.pid).cpu_s
        self._last_own_cpu = own_cpu_s()

    async def take(self, session: aiohttp.ClientSession, phase: str, readings: int = 1) -> Sample:
        """One sample; with `readings` > 1 (idle), the least of that many readings 0.25 s apart, so that
        what a periodic job holds for a moment (a database connection, a task) does not count as kept."""
        # The sample's instant: /proc is read now, the windows end now; the scrape may take a while.
        now, own, states = time.monotonic(), own_cpu_s(), [proc_state(self.gw.pid)]
        scraped = [await scrape(session, self.gw.url)]
        for _ in range(readings - 1):
            await asyncio.sleep(0.25)
            states.append(proc_state(self.gw.pid))
            scraped.append(await scrape(session, self.gw.url))
        state = ProcState(
            min(s.rss_mb for s in states), min(s.fds for s in states), min(s.threads for s in states)
        )
        state.cpu_s = states[0].cpu_s
        gauges = {k: least(g[k] for g in scraped) for k in GAUGES}
        window = [o for o in self.load.outcomes if self._last_t < o.done <= now]
        latencies = [o.latency_ms for o in window if o.kind in NON_STREAMED and o.outcome in EXPECTED[o.kind]]
        cpu = 100.0 * (state.cpu_s - self._last_cpu) / max(1e-9, now - self._last_t)
        own_pct = 100.0 * (own - self._last_own_cpu) / max(1e-9, now - self._last_t)
        sample = Sample(
            phase,
            now - self.t0,
            round(state.rss_mb, 2),
            state.fds,
            state.threads,
            gauges["tasks"],
            gauges["db_checked_out"],
            gauges["db_idle"],
            gauges["inflight"],
            gauges["log_dropped"],
            round(cpu, 1),
            round(own_pct, 1),
            os.getloadavg()[0],
            self.load.outstanding,
            sent=sum(1 for t in self.load.sent if self._last_t < t <= now),
            answered=len(latencies),
            p50_ms=round(pct(latencies, 50), 2),
            p99_ms=round(pct(latencies, 99), 2),
            outcomes=dict(Counter(f"{o.kind}/{o.outcome}" for o in window)),
            cache_skipped=dict(Counter(why for t, why in self.load.skips if self._last_t < t <= now)),
            malloc_in_use_mb=scaled(gauges["malloc_in_use"], 1 / 2**20),
            malloc_free_mb=scaled(gauges["malloc_free"], 1 / 2**20),
            py_blocks_k=scaled(gauges["py_blocks"], 1e-3),
            sqlite_mb=scaled(gauges["sqlite_memory"], 1 / 2**20),
        )
        self._last_t, self._last_cpu, self._last_own_cpu = now, state.cpu_s, own
        self.samples.append(sample)
        return sample

    async def every(self, session: aiohttp.ClientSession, period_s: float, until: float) -> None:
        """A soak sample every `period_s` until `until` (monotonic), the last one at `until`."""
        k = 1
        while True:
            at = min(self.t0 + k * period_s, until)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            s = await self.take(session, "soak")
            print(sample_line(s), flush=True)
            if at >= until:
                return
            k += 1


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else round(value * factor, 2)


def least(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def sample_line(s: Sample) -> str:
    unexpected = sum(n for k, n in s.outcomes.items() if ":" in k)
    return (
        f"  {s.phase:<11} t={s.t_s:7.1f}s rss {s.rss_mb:7.1f} MB  fds {s.fds:4d}  threads {s.threads:3d}  "
        f"tasks {fmt(s.tasks)}  db {fmt(s.db_checked_out)}/{fmt(s.db_idle)}  inflight {fmt(s.inflight)}  "
        f"sent {s.sent:4d}  p50 {s.p50_ms:7.1f}  p99 {s.p99_ms:7.1f} ms  "
        f"cpu {s.cpu_pct:5.1f}% (client {s.client_cpu_pct:4.1f}%)  "
        f"heap {fmt(s.malloc_in_use_mb)}+{fmt(s.malloc_free_mb)} MB sqlite {fmt(s.sqlite_mb)} "
        f"py {fmt(s.py_blocks_k)}k  "
        f"unexpected {unexpected}"
    )


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class Config:
    duration_s: float = 1800.0
    rate: float = 20.0
    sample_s: float = 10.0
    warmup_s: float = 120.0
    settle_s: float = 120.0  # soak samples before this are left out of max - min
    idle_s: float = 8.0
    prefill: int = 2000
    cache_entries: int = 2000
    backend_error_rate: float = 0.03
    stream_break_rate: float = 0.05
    database_url: str | None = None
    gateway_env: tuple[str, ...] = ()  # NAME=VALUE set for the gateway process (an allocator setting, say)
    seed: int = 0


@dataclass
class Result:
    config: Config
    samples: list[Sample]
    outcomes: Counter[str]  # kind/outcome over the soak phase
    fallbacks: int
    injected: Counter[str]  # by the stand-in, over the whole run
    skipped: int
    unexpected_samples: dict[str, str]
    exit_code: int
    log_tracebacks: int
    log_errors: list[str]
    policy: dict[str, Any]
    command: str
    prefill_s: float
    startup_s: float

    def phase(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == name]

    @property
    def unexpected(self) -> int:
        return sum(n for k, n in self.outcomes.items() if ":" in k.split("/", 1)[1])


async def run_soak(cfg: Config, workdir: Path) -> Result:
    """Start everything, prefill, warm up, soak, and sample; everything is stopped on the way out."""
    questions = Questions.load(QQP, cfg.seed)
    with standins(cfg.backend_error_rate, cfg.stream_break_rate, cfg.seed) as backs:
        small_url, large_url = (s.url for s in backs.servers)
        policy = soak_policy(small_url, large_url, cfg.cache_entries, cfg.database_url)
        t0 = time.monotonic()
        gw = start_gateway(workdir, policy, cfg.gateway_env)
        try:
            await wait_ready(gw)
            startup_s = time.monotonic() - t0
            print(f"gateway ready in {startup_s:.1f} s at {gw.url}", flush=True)
            load = Load(gw.url, questions, cfg.seed, cfg.cache_entries)
            t0 = time.monotonic()
            await load.prefill(cfg.prefill)
            prefill_s = time.monotonic() - t0
            print(f"prefill: {cfg.prefill} questions in {prefill_s:.1f} s", flush=True)
            if cfg.warmup_s > 0:
                await load.run(cfg.warmup_s, cfg.rate)
                print(f"warm-up: {cfg.warmup_s:g} s at {cfg.rate:g} req/s", flush=True)
            async with aiohttp.ClientSession() as metrics_session:
                await asyncio.sleep(cfg.idle_s)
                sampler = Sampler(gw, load)
                first = len(load.outcomes)
                print(sample_line(await sampler.take(metrics_session, "idle-before", 5)), flush=True)
                sampler.t0 = sampler._last_t = time.monotonic()
                soak = asyncio.create_task(load.run(cfg.duration_s, cfg.rate))
                await sampler.every(metrics_session, cfg.sample_s, sampler.t0 + cfg.duration_s)
                await soak  # the stragglers
                soak_outcomes = load.outcomes[first:]
                await asyncio.sleep(cfg.idle_s)
                print(sample_line(await sampler.take(metrics_session, "idle-after", 5)), flush=True)
        finally:
            exit_code = stop_gateway(gw)
        log = gw.log_path.read_text(errors="replace")
        return Result(
            cfg,
            sampler.samples,
            Counter(f"{o.kind}/{o.outcome}" for o in soak_outcomes),
            sum(o.fallback for o in soak_outcomes),
            backs.injected,
            load.skipped,
            load.unexpected_samples,
            exit_code,
            log.count("Traceback"),
            [line for line in log.splitlines() if " ERROR " in line or "ERROR:" in line][:20],
            policy,
            gw.command,
            prefill_s,
            startup_s,
        )


# --- verdicts -------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    series: str
    slope_per_10min: float  # of the line through the soak's second half
    held_slope_per_10min: float  # the same, over the whole soak, with the requests in flight held constant
    spread: float  # max - min after the settle time
    median: float
    highest: float
    left: float  # idle after - idle before (NaN: no idle samples or no value)
    bound: Bound
    oversubscribed: bool = False  # the machine's median load average was above its cores

    @property
    def limit(self) -> float:
        return self.bound.limit * (self.median if self.bound.relative else 1.0)

    @property
    def value(self) -> float:
        return {"slope": self.slope_per_10min, "left": self.left, "max": self.highest}[self.bound.measure]

    @property
    def judged(self) -> bool:
        return not (self.bound.relative and self.oversubscribed)

    @property
    def flat(self) -> bool:
        return not self.judged or self.value <= self.limit


def series(samples: list[Sample], name: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(s.t_s, getattr(s, name)) for s in samples if getattr(s, name) is not None]
    pts = [(t, v) for t, v in pts if not math.isnan(v)]
    return np.array([t for t, _ in pts], dtype=float), np.array([v for _, v in pts], dtype=float)


def slope_per_10min(t: np.ndarray, v: np.ndarray) -> float:
    if len(t) < 2 or float(np.ptp(t)) == 0.0:
        return math.nan
    return float(np.polyfit(t, v, 1)[0]) * 600.0


def held_slope_per_10min(samples: list[Sample], name: str) -> float:
    """The series' slope with the gateway's requests in flight as a second regressor: how it moves with
    time at a constant load (an open loop on a shared machine does not hold the load steady)."""
    pts = [
        (s.t_s, s.inflight, getattr(s, name))
        for s in samples
        if s.inflight is not None and getattr(s, name) is not None and not math.isnan(getattr(s, name))
    ]
    if len(pts) < 4:
        return math.nan
    t, q, v = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
    design = np.column_stack([np.ones_like(t), q, t])
    coef = np.linalg.lstsq(design, v, rcond=None)[0]
    return float(coef[2]) * 600.0


def oversubscribed(samples: list[Sample]) -> bool:
    loads = [s.loadavg_1m for s in samples]
    return bool(loads) and float(np.median(loads)) > (os.cpu_count() or 1)


def verdicts(result: Result) -> list[Verdict]:
    soak = result.phase("soak")
    before, after = result.phase("idle-before"), result.phase("idle-after")
    half = result.config.duration_s / 2
    busy = oversubscribed(soak)
    out = []
    for name, bound in BOUNDS.items():
        t, v = series(soak, name)
        if len(t) == 0:
            continue
        late = t >= half
        settled = v[t >= min(result.config.settle_s, half)]
        x = getattr(before[0], name) if before else None
        y = getattr(after[-1], name) if after else None
        out.append(
            Verdict(
                name,
                slope_per_10min(t[late], v[late]),
                held_slope_per_10min(soak, name),
                float(np.ptp(settled)) if len(settled) else math.nan,
                float(np.median(settled)) if len(settled) else math.nan,
                float(np.max(v)),
                math.nan if x is None or y is None or math.isnan(x) or math.isnan(y) else y - x,
                bound,
                busy,
            )
        )
    return out


# --- report ---------------------------------------------------------------------------------------------


def verdict_lines(vs: list[Verdict]) -> list[str]:
    out = [
        "| series | slope per 10 min, 2nd half | same, in-flight held constant | max - min after settle "
        "| median | max | idle after - before | judged by | verdict |",
        "| --- |" + " ---: |" * 6 + " --- | --- |",
    ]
    names = {"slope": "slope", "left": "idle after - before", "max": "max"}
    for v in vs:
        limit = f"{v.bound.limit:g} x median = {v.limit:.0f}" if v.bound.relative else f"{v.limit:g}"
        if not v.judged:
            verdict = "not judged: the machine was oversubscribed"
        else:
            verdict = "flat" if v.flat else "**GROWS**"
        left = "-" if math.isnan(v.left) else f"{v.left:+g}"
        out.append(
            f"| {v.series} | {v.slope_per_10min:+.2f} | {v.held_slope_per_10min:+.2f} | {v.spread:.1f} "
            f"| {v.median:.1f} | {v.highest:g} | {left} | {names[v.bound.measure]} <= {limit} | {verdict} |"
        )
    return out


def bound_lines() -> list[str]:
    return [f"- `{name}`: {b.why}." for name, b in BOUNDS.items()]


def idle_lines(result: Result) -> list[str]:
    before, after = result.phase("idle-before"), result.phase("idle-after")
    if not before or not after:
        return ["(no idle samples)"]
    b, a = before[0], after[-1]
    out = ["| idle, no load | before the soak | after the soak | change |", "| --- | ---: | ---: | ---: |"]
    for name in (*IDLE_SERIES, *HEAP_SERIES):
        x, y = getattr(b, name), getattr(a, name)
        change = "-" if x is None or y is None else f"{y - x:+g}"
        out.append(f"| {name} | {fmt(x)} | {fmt(y)} | {change} |")
    return out


IDLE_SERIES = ("rss_mb", "fds", "threads", "tasks", "db_checked_out", "db_idle", "inflight", "log_dropped")
HEAP_SERIES = ("malloc_in_use_mb", "sqlite_mb", "malloc_free_mb", "py_blocks_k")


def heap_lines(result: Result) -> list[str]:
    """RSS beside its parts that the gateway can see: which of them moves with it."""
    soak = result.phase("soak")
    half = result.config.duration_s / 2
    out = [
        "| series | first soak sample | last soak sample | change | slope per 10 min, 2nd half |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("rss_mb", *HEAP_SERIES):
        t, v = series(soak, name)
        if len(t) == 0:
            continue
        late = t >= half
        slope = slope_per_10min(t[late], v[late])
        out.append(f"| {name} | {v[0]:g} | {v[-1]:g} | {v[-1] - v[0]:+.2f} | {slope:+.2f} |")
    return out


def condensed(samples: list[Sample], rows: int = 31) -> list[Sample]:
    """About `rows` of the soak's samples, evenly spread, first and last included."""
    if len(samples) <= rows:
        return samples
    idx = sorted({round(i * (len(samples) - 1) / (rows - 1)) for i in range(rows)})
    return [samples[i] for i in idx]


def sample_table(samples: list[Sample]) -> list[str]:
    out = [
        "| phase | t (min) | RSS MB | fds | threads | tasks | DB out / idle | in flight | sent | answered "
        "| p50 ms | p99 ms | CPU % (client) | load 1m | cache skipped | outcomes not ok/hit |",
        "| --- |" + " ---: |" * 5 + " --- |" + " ---: |" * 5 + " --- | ---: | --- | --- |",
    ]
    for s in samples:
        other = ", ".join(
            f"{k} {n}"
            for k, n in sorted(s.outcomes.items())
            if k.split("/", 1)[1] not in ("ok", "exact", "semantic")
        )
        skipped = ", ".join(f"{why} {n}" for why, n in sorted(s.cache_skipped.items()))
        out.append(
            f"| {s.phase} | {s.t_s / 60:.1f} | {s.rss_mb:.1f} | {s.fds} | {s.threads} | {fmt(s.tasks)} "
            f"| {fmt(s.db_checked_out)} / {fmt(s.db_idle)} | {fmt(s.inflight)} | {s.sent} | {s.answered} "
            f"| {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.cpu_pct:.0f} ({s.client_cpu_pct:.0f}) "
            f"| {s.loadavg_1m:.2f} | {skipped or '-'} | {other or '-'} |"
        )
    return out


def outcome_lines(result: Result) -> list[str]:
    by_kind: dict[str, Counter[str]] = {}
    for key, n in result.outcomes.items():
        kind, outcome = key.split("/", 1)
        by_kind.setdefault(kind, Counter())[outcome] += n
    out = ["| kind | share | sent | outcomes |", "| --- | ---: | ---: | --- |"]
    for kind, share in MIX.items():
        counts = by_kind.get(kind, Counter())
        text = ", ".join(f"{o} {n}" for o, n in counts.most_common())
        out.append(f"| {kind} | {share:.0%} | {sum(counts.values())} | {text or '-'} |")
    return out


def report(
    result: Result,
    info: dict[str, str],
    argv: list[str],
    started: dt.datetime,
    png: str | None,
    notes: str = "",
) -> str:
    cfg = result.config
    vs = verdicts(result)
    soak = result.phase("soak")
    flat = all(v.flat for v in vs)
    lines = [
        "# Soak: `icgate serve` under a steady mixed load",
        "",
        f"Generated by `bench/soak.py` on {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"- Command: `{shlex.join([Path(sys.executable).name, *argv])}`",
        f"- Machine: {info['cpu']}, {info['nproc']} cores; Python {info['python']}; {info['platform']}; "
        f"load average before {info['loadavg_before']}, after {info['loadavg_after']} (each sample's "
        "1-minute load average is in the table below: the latency and CPU columns carry the machine's noise)",
        f"- Code: {info['code']}; {info['libs']}",
        f"- Load: {cfg.rate:g} req/s open loop for {cfg.duration_s / 60:g} min, sampled every "
        f"{cfg.sample_s:g} s; before it: start-up {result.startup_s:.0f} s, {cfg.prefill} prefill questions "
        f"({result.prefill_s:.0f} s), {cfg.warmup_s:g} s warm-up at the same rate, {cfg.idle_s:g} s idle",
        f"- Injected: stand-in `small` fails {cfg.backend_error_rate:.0%} of calls with HTTP 500 and breaks "
        f"{cfg.stream_break_rate:.0%} of its streams after the first chunk (whole run: "
        + (", ".join(f"{n} {k}" for k, n in sorted(result.injected.items())) or "none")
        + f"); {MIX['fail']:.0%} of requests ask both stand-ins for a 503; {MIX['bad']:.0%} are malformed",
        f"- Gateway: `{result.command}`; exit status {result.exit_code} after SIGTERM; "
        f"{result.log_tracebacks} tracebacks in its log",
        "",
        "## Verdict",
        "",
        f"**{'Flat' if flat else 'Something grows'}**: {sum(v.flat for v in vs)} of {len(vs)} series within "
        f"their bounds; {result.unexpected} unexpected outcomes of {sum(result.outcomes.values())} requests; "
        f"{result.skipped} arrivals skipped (more than {MAX_OUTSTANDING} unanswered).",
        "",
        *verdict_lines(vs),
        "",
        f"Slope, 2nd half: least-squares line through the soak's samples from minute "
        f"{cfg.duration_s / 120:g} on. In-flight held constant: a least-squares fit over the whole soak with "
        "the gateway's requests in flight as a second regressor (descriptors and tasks follow the load, "
        "which an open loop on a shared machine does not hold steady). max - min and median: the soak's "
        f"samples from minute {min(cfg.settle_s, cfg.duration_s / 2) / 60:g} on. Idle after - before: see "
        "below. Latency is that of answered non-streamed requests (misses, exact and semantic hits) as this "
        "load generator saw them. The bounds (`BOUNDS` in bench/soak.py) and why:",
        "",
        *bound_lines(),
        "",
        *([notes, ""] if notes else []),
        "## Idle before and after",
        "",
        "The gateway with no load, after the same idle pause before and after the soak: what the soak left "
        "behind, without the load's own churn.",
        "",
        *idle_lines(result),
        "",
        "## Where the RSS sits",
        "",
        "The gateway's own view of its heap, from /metrics: `malloc_in_use_mb` is what the C heap has handed "
        "out (SQLite's page caches, onnxruntime's and faiss's buffers, Python objects over 512 bytes), "
        "`sqlite_mb` the part of it SQLite holds (page caches of the pooled connections), "
        "`malloc_free_mb` what it holds free without returning it (fragmentation), `py_blocks_k` the Python "
        "objects alive (thousands). RSS growing with `malloc_free_mb` is the allocator; with "
        "`malloc_in_use_mb`, native memory held (`sqlite_mb`: SQLite's share); with `py_blocks_k`, Python "
        "objects.",
        "",
        *heap_lines(result),
        "",
    ]
    if png:
        lines += ["## Plot", "", f"![soak]({png})", ""]
    lines += [
        "## Samples",
        "",
        f"{len(soak)} soak samples (all in `soak.json`); about one row in "
        f"{max(1, round(len(soak) / 31))} here, with the idle ones.",
        "",
        *sample_table(result.phase("idle-before") + condensed(soak) + result.phase("idle-after")),
        "",
        "## Outcomes over the soak",
        "",
        "`ok`: answered by a backend; `exact` / `semantic`: by the cache; `cut`: the client hung up (as it "
        "meant to); `stream-broken`: the stream ended in an OpenAI error event (the stand-in broke it); "
        "`4xx` / `5xx-injected`: an OpenAI error object with that status, as asked. "
        f"{result.fallbacks} answers came from the fallback backend (the stand-in's injected 500s).",
        "",
        *outcome_lines(result),
        "",
    ]
    if result.unexpected_samples:
        lines += ["Unexpected outcomes, first of each kind:", ""]
        lines += [f"- `{k}`: `{v}`" for k, v in result.unexpected_samples.items()]
        lines.append("")
    if result.log_errors:
        lines += ["Gateway log lines with ERROR (first 20):", "", "```", *result.log_errors, "```", ""]
    lines += [
        "## Policy",
        "",
        "```yaml",
        yaml.safe_dump(
            {**result.policy, "backends": "two stand-ins, small and large (URLs vary)"}, sort_keys=False
        ).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(result: Result, path: Path) -> bool:
    """RSS, descriptors, tasks and connections, latency and the machine's load over the soak; False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    soak, cfg = result.phase("soak"), result.config
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True)
    t, rss = series(soak, "rss_mb")
    axes[0].plot(t / 60, rss, color="tab:blue", label="RSS")
    late = t >= cfg.duration_s / 2
    if late.sum() >= 2:
        slope, icpt = np.polyfit(t[late], rss[late], 1)
        fit_t = t[late]
        axes[0].plot(
            fit_t / 60,
            slope * fit_t + icpt,
            "k--",
            linewidth=1,
            label=f"2nd half: {slope * 600:+.1f} MB / 10 min",
        )
    mid = float(np.median(rss)) if len(rss) else 0.0
    half_span = max(30.0, float(np.ptp(rss)) / 2 + 5) if len(rss) else 30.0
    axes[0].set_ylim(mid - half_span, mid + half_span)
    axes[0].set_ylabel("RSS, MB (axis not from 0)")
    for name, color, ax in (
        ("fds", "tab:orange", axes[1]),
        ("threads", "tab:brown", axes[1]),
        ("tasks", "tab:green", axes[2]),
        ("inflight", "tab:purple", axes[2]),
        ("db_checked_out", "tab:red", axes[2]),
    ):
        x, v = series(soak, name)
        ax.plot(x / 60, v, label=name, color=color, linewidth=1)
    for name, marker in (("fds", "o"), ("tasks", "s")):
        ax = axes[1] if name == "fds" else axes[2]
        for phase, at in (("idle-before", 0.0), ("idle-after", cfg.duration_s / 60)):
            idle = [getattr(x, name) for x in result.phase(phase) if getattr(x, name) is not None]
            if idle:
                ax.plot([at], idle[:1], marker=marker, color="black", linestyle="none")
    axes[1].set_ylabel("count (black: idle)")
    axes[2].axhline(DB_POOL_LIMIT, color="tab:red", linestyle=":", linewidth=1, label="DB pool limit")
    axes[2].set_ylabel("count (black: idle)")
    for name, color in (("p50_ms", "tab:blue"), ("p99_ms", "tab:red")):
        x, v = series(soak, name)
        axes[3].plot(x / 60, v, label=name.removesuffix("_ms"), color=color, linewidth=1)
    axes[3].set_yscale("log")
    axes[3].set_ylabel("latency, ms (log)")
    axes[4].plot([x.t_s / 60 for x in soak], [x.loadavg_1m for x in soak], label="load average (1 min)")
    axes[4].axhline(os.cpu_count() or 1, color="black", linestyle=":", linewidth=1, label="cores")
    axes[4].set_ylabel("machine load")
    ax_cpu = axes[4].twinx()
    ax_cpu.plot([x.t_s / 60 for x in soak], [x.cpu_pct for x in soak], color="tab:gray", linewidth=0.8)
    ax_cpu.set_ylabel("gateway CPU % (grey)")
    ax_cpu.set_ylim(0, 100 * (os.cpu_count() or 1))
    axes[4].set_xlabel("minutes into the soak")
    for i, ax in enumerate(axes):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        if i in (1, 2, 4):
            ax.set_ylim(bottom=0)
    fig.suptitle(f"icgate soak: {cfg.rate:g} req/s mixed load, sampled every {cfg.sample_s:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--rate", type=float, default=d.rate, help="arrivals per second (open loop)")
    p.add_argument("--sample-s", type=float, default=d.sample_s)
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="load before the soak, not measured")
    p.add_argument("--settle-s", type=float, default=d.settle_s, help="soak time left out of max - min")
    p.add_argument("--idle-s", type=float, default=d.idle_s, help="pause before each idle sample")
    p.add_argument("--prefill", type=int, default=d.prefill, help="questions stored before the warm-up")
    p.add_argument("--cache-entries", type=int, default=d.cache_entries, help="cache.max_entries_per_tenant")
    p.add_argument("--backend-error-rate", type=float, default=d.backend_error_rate)
    p.add_argument("--stream-break-rate", type=float, default=d.stream_break_rate)
    p.add_argument("--database-url", default=None, help="e.g. postgresql://postgres@127.0.0.1:5432/soak")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--gateway-env", nargs="*", default=[], metavar="NAME=VALUE", help="environment for the gateway"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.md")
    p.add_argument("--notes", type=Path, help="markdown put into the report under its verdict (a reading)")
    p.add_argument("--from-json", type=Path, help="no run: the report and plot again from a run's JSON")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration_s <= 0 or args.sample_s <= 0:
        p.error("--rate, --duration-s and --sample-s must be positive")
    return args


def to_json(result: Result, info: dict[str, str], started: dt.datetime, argv: list[str]) -> dict[str, Any]:
    """Everything the report is made from: `--from-json` makes it again."""
    raw = {k: v for k, v in vars(result).items() if k not in ("config", "samples")}
    raw.update(
        config=asdict(result.config),
        samples=[asdict(s) for s in result.samples],
        outcomes=dict(result.outcomes),  # asdict would rebuild a Counter from (key, count) pairs
        injected=dict(result.injected),
        machine=info,
        started=started.isoformat(),
        argv=argv,
    )
    return raw


def from_json(raw: dict[str, Any]) -> tuple[Result, dict[str, str], dt.datetime, list[str]]:
    fields_ = {k: v for k, v in raw.items() if k in Result.__dataclass_fields__}
    env = tuple(raw["config"].get("gateway_env", ()))
    fields_["config"] = Config(**{**raw["config"], "gateway_env": env})
    fields_["samples"] = [Sample(**s) for s in raw["samples"]]
    for name in ("outcomes", "injected"):
        fields_[name] = Counter(raw[name])
    return Result(**fields_), raw["machine"], dt.datetime.fromisoformat(raw["started"]), raw["argv"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        result, info, started, used = from_json(json.loads(args.from_json.read_text()))
    else:
        given = {k: getattr(args, k) for k in Config.__dataclass_fields__ if k in vars(args)}
        cfg = Config(**{**given, "gateway_env": tuple(args.gateway_env)})
        started = dt.datetime.now(dt.UTC)
        info = machine()
        with tempfile.TemporaryDirectory(prefix="icgate-soak-") as tmp:
            result = asyncio.run(run_soak(cfg, Path(tmp)))
        info["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        used = [str(Path(__file__).relative_to(ROOT)), *(sys.argv[1:] if argv is None else argv)]
        out.with_suffix(".json").write_text(json.dumps(to_json(result, info, started, used), indent=1))
    png = out.with_suffix(".png")
    plotted = plot(result, png)
    if not plotted:
        print("matplotlib is not installed (pyproject's dev extras have it): no plot", file=sys.stderr)
    notes = args.notes.read_text().strip() if args.notes else ""
    if args.from_json:
        notes = (
            f"_Report made again from `{args.from_json.name}` (`bench/soak.py --from-json`) on "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, with the current verdicts; the run is the one "
            f"described above._\n\n" + notes
        )
    out.write_text(report(result, info, used, started, png.name if plotted else None, notes))
    print("\n".join(verdict_lines(verdicts(result))))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
