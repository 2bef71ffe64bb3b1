"""An in-process replay of admission in front of a vLLM-like backend, on a virtual clock.

Why: the load benchmark takes minutes of real time and two processes per backend; the questions "how far
off is the predicted wait?" and "how many 429s come only after queueing?" need neither. Here the event
loop's clock is virtual (`VirtualLoop`: a timer's wait takes no real time), so `asyncio.sleep` and
`asyncio.timeout`, which admission's queue uses, run as fast as the CPU allows and give the same numbers
on every run. The backend (`Engine`) costs time as vLLM does without chunked prefill: every decode step
takes `decode_ms_base + decode_ms_per_seq * batch`, and a prefill stalls the whole batch. Nothing in
admission knows these numbers: it learns them from the streams it sees, as it would in front of a real
server.

    .venv/bin/python -m tests.gateway.backends.replay   # the tables in docs/admission.md
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from icgate.gateway.backends.admission import Admission, AdmissionRefused, Ask, Job, Relayed
from icgate.gateway.config import AdmissionConfig, BackendConfig


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks: the time the loop would have slept until its next timer passes at once."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            self._loop.virtual_now += timeout
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when every task waits on a timer (no real sockets)."""

    def __init__(self) -> None:
        self.virtual_now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.virtual_now


@dataclass(frozen=True)
class EngineCost:
    """The bench simulator's `large` preset (bench/simulator/engine.py), which admission never sees: the
    backend whose full batch is near the TPOT objective."""

    decode_ms_base: float = 20.0
    decode_ms_per_seq: float = 1.5
    prefill_ms_base: float = 5.0
    prefill_ms_per_token: float = 0.08
    max_num_seqs: int = 64

    def step_s(self, batch: int) -> float:
        return (self.decode_ms_base + self.decode_ms_per_seq * batch) / 1000

    def prefill_s(self, prompt: int) -> float:
        return (self.prefill_ms_base + self.prefill_ms_per_token * prompt) / 1000


@dataclass(eq=False)
class Seq:
    prompt: int
    output: int
    generated: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Engine:
    """Continuous batching, FCFS: each iteration prefills the newly admitted (stalling the batch), then
    runs one decode step in which every sequence already running gains a token."""

    def __init__(self, cost: EngineCost) -> None:
        self.cost = cost
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self._wake = asyncio.Event()

    def submit(self, prompt: int, output: int) -> Seq:
        seq = Seq(prompt, max(1, output))
        self.waiting.append(seq)
        self._wake.set()
        return seq

    async def serve(self, job: Job, prompt: int, output: int, counted: bool = True) -> float:
        """One request to its end, streamed, holding `job`: its progress counted as the call stage counts a
        stream's (unless `counted` is False), its size told at the end. Returns when its first token came."""
        seq = self.submit(prompt, output)
        if counted:
            job.produced = lambda: Relayed(seq.generated, 4 * seq.generated)
        try:
            await seq.first.wait()
            job.first_token_at = first = asyncio.get_running_loop().time()
            await seq.done.wait()
        finally:
            self.abort(seq)
        job.completion_tokens = output
        return first

    def abort(self, seq: Seq) -> None:
        for line in (self.waiting, self.running):
            if seq in line:
                line.remove(seq)

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            decoding = list(self.running)
            room = self.cost.max_num_seqs - len(self.running)
            admitted, self.waiting = self.waiting[:room], self.waiting[room:]
            if admitted:
                await asyncio.sleep(sum(self.cost.prefill_s(s.prompt) for s in admitted))
                self.running.extend(admitted)
                self._emit(admitted)
            if decoding:
                await asyncio.sleep(self.cost.step_s(len(decoding)))
                self._emit([s for s in decoding if s in self.running])

    def _emit(self, seqs: Sequence[Seq]) -> None:
        for seq in seqs:
            seq.generated += 1
            seq.first.set()
            if seq.generated >= seq.output:
                self.running.remove(seq)
                seq.done.set()


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: int
    output: int  # the true length
    p50: int  # what the length predictor says
    p90: int


def workload(
    n: int, rate: float, seed: int = 0, noise: float = 0.0, burstiness: float = 2.0
) -> list[Request]:
    """`n` requests at `rate` per second with gamma inter-arrivals of coefficient of variation
    `burstiness` (production traces are bursty), lognormal prompts and answers shaped like the Azure
    conversation trace (means ~1,100 and ~210 tokens), and a prediction off by lognormal `noise`
    (0: the oracle; ~0.6: a learned predictor)."""
    rng = np.random.default_rng(seed)
    shape = 1 / burstiness**2
    gaps = rng.gamma(shape, 1 / (rate * shape), n)
    prompts = np.clip(rng.lognormal(6.6, 0.8, n), 16, 8000).astype(int)
    outputs = np.clip(rng.lognormal(5.0, 0.8, n), 4, 2000).astype(int)
    off = np.exp(rng.normal(0.0, noise, n)) if noise > 0 else np.ones(n)
    p90_factor = float(np.exp(1.2816 * noise)) if noise > 0 else 1.0
    return [
        Request(
            float(t),
            int(p),
            int(o),
            max(1, round(o * f)),
            max(1, round(o * f * p90_factor)),
        )
        for t, p, o, f in zip(np.cumsum(gaps), prompts, outputs, off, strict=True)
    ]


Outcome = Literal["served", "arrival", "queued"]
T = TypeVar("T")


@dataclass
class Result:
    request: Request
    outcome: Outcome = "served"
    predicted_wait_s: float | None = None  # at arrival, for a request that was not refused then
    waited_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None


async def _one(
    adm: Admission,
    backend: BackendConfig,
    engine: Engine,
    request: Request,
    slo: tuple[float, float | None],
    counted: bool,
) -> Result:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, request.arrival_s - loop.time()))
    result = Result(request)
    ask = Ask(
        request.prompt,
        request.p50,
        ttft_slo_s=slo[0],
        tpot_slo_s=slo[1],
        arrived=loop.time(),
        output_tokens_p90=request.p90,
    )
    try:
        placed = adm.decide(ask, [backend])
    except AdmissionRefused:
        result.outcome = "arrival"
        return result
    state = adm.states[placed.backend.name]
    result.predicted_wait_s = adm.wait_s(state, ask, loop.time())
    try:
        async with adm.hold(placed.backend, ask) as job:
            result.waited_s = job.queued_s
            first = await engine.serve(job, request.prompt, request.output, counted)
            result.ttft_s = first - request.arrival_s
            if request.output > 1:
                result.tpot_s = (loop.time() - first) / (request.output - 1)
    except AdmissionRefused as refused:
        result.outcome = refused.stage
        result.waited_s = loop.time() - request.arrival_s
    return result


@dataclass(frozen=True)
class Setup:
    cost: EngineCost = EngineCost()
    max_concurrent: int = 30  # bench/load.py's plan for this backend: TPOT within 80% of 100 ms
    ttft_slo_s: float = 1.5
    tpot_slo_s: float = 0.1
    ttft_margin: float = 0.1
    admission: dict[str, Any] = field(default_factory=dict)
    counted: bool = True  # tell admission the tokens streamed so far (as the call stage does)
    tpot_objective: bool = True  # admission is told the TPOT objective (the score always counts it)

    def backend(self) -> BackendConfig:
        # The priors a careful operator would write: one prefill and a decode step, and the TPOT of a
        # full batch (as bench/load.py's policy does).
        return BackendConfig.model_validate(
            {
                "name": "small",
                "model": "openai/small",
                "max_concurrent": self.max_concurrent,
                "expected_ttft_ms": 1000
                * (self.cost.prefill_s(1100) + self.cost.step_s(self.max_concurrent)),
                "expected_tpot_ms": 1000 * self.cost.step_s(self.max_concurrent),
            }
        )

    def capacity_rps(self, mean_prompt: float = 1100, mean_output: float = 210) -> float:
        """Requests per second at a full batch, prefills stalling it (bench/load.py's estimate)."""
        n = self.max_concurrent
        tpot = self.cost.step_s(n) + n * self.cost.prefill_s(int(mean_prompt)) / mean_output
        return n / (self.cost.prefill_s(int(mean_prompt)) + mean_output * tpot)


def replay(setup: Setup, requests: Sequence[Request]) -> list[Result]:
    """Every request through admission (decide, then hold) and the engine, on a virtual clock."""

    async def main() -> list[Result]:
        loop = asyncio.get_running_loop()
        config = AdmissionConfig.model_validate(
            {
                "ttft_slo_ms": setup.ttft_slo_s * 1000,
                "ttft_margin": setup.ttft_margin,
                **setup.admission,
            }
        )
        backend = setup.backend()
        adm = Admission([backend], config, clock=loop.time, signals_clock=loop.time)
        engine = Engine(setup.cost)
        running = loop.create_task(engine.run())
        slo = (setup.ttft_slo_s, setup.tpot_slo_s if setup.tpot_objective else None)
        try:
            return list(
                await asyncio.gather(*(_one(adm, backend, engine, r, slo, setup.counted) for r in requests))
            )
        finally:
            running.cancel()

    return on_virtual_clock(main)


def on_virtual_clock(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`main()` run to its end on a `VirtualLoop`."""
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(main())


def late_share(arrival: int, queued: int) -> float | None:
    """Of the 429s, those that came after queueing (None: no 429)."""
    refused = arrival + queued
    return queued / refused if refused else None


@dataclass(frozen=True)
class Summary:
    requests: int
    served: int
    refused_arrival: int
    refused_queued: int
    good: int  # served within both objectives
    ttft_miss: int
    tpot_miss: int
    wait_bias_ms: float | None  # mean (actual - predicted) wait of the requests that queued
    wait_mae_ms: float | None

    @property
    def late_share(self) -> float | None:
        return late_share(self.refused_arrival, self.refused_queued)

    def __add__(self, other: Summary) -> Summary:
        def mean(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else (a + b) / 2

        return Summary(
            self.requests + other.requests,
            self.served + other.served,
            self.refused_arrival + other.refused_arrival,
            self.refused_queued + other.refused_queued,
            self.good + other.good,
            self.ttft_miss + other.ttft_miss,
            self.tpot_miss + other.tpot_miss,
            mean(self.wait_bias_ms, other.wait_bias_ms),
            mean(self.wait_mae_ms, other.wait_mae_ms),
        )

    def cells(self) -> list[str]:
        late = "-" if self.late_share is None else f"{self.late_share:.1%}"
        error = "-" if self.wait_mae_ms is None else f"{self.wait_bias_ms:+.0f} / {self.wait_mae_ms:.0f}"
        counts = (self.good, self.tpot_miss, self.refused_arrival, self.refused_queued)
        return [*(str(c) for c in counts), late, error]


COLUMNS = ["good", "TPOT miss", "429 at arrival", "429 after queueing", "late share", "wait error (ms)"]


def summarise(results: Sequence[Result], setup: Setup) -> Summary:
    served = [r for r in results if r.outcome == "served"]
    in_time = [r for r in served if (r.ttft_s or 0) <= setup.ttft_slo_s]
    slow = [r for r in in_time if (r.tpot_s or 0) > setup.tpot_slo_s]
    queued = [r for r in results if r.predicted_wait_s is not None and r.predicted_wait_s > 0]
    errors = [r.waited_s - (r.predicted_wait_s or 0.0) for r in queued]
    return Summary(
        requests=len(results),
        served=len(served),
        refused_arrival=sum(r.outcome == "arrival" for r in results),
        refused_queued=sum(r.outcome == "queued" for r in results),
        good=len(in_time) - len(slow),
        ttft_miss=len(served) - len(in_time),
        tpot_miss=len(slow),
        wait_bias_ms=1000 * float(np.mean(errors)) if errors else None,
        wait_mae_ms=1000 * float(np.mean(np.abs(errors))) if errors else None,
    )


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--loads", default="1,1.5,2")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    lengths = ((0.0, "oracle"), (0.6, "predicted (sigma 0.6)"))

    def run(setup: Setup, load: float, noise: float) -> Summary:
        rate = load * Setup().capacity_rps()
        runs = [
            summarise(replay(setup, workload(args.requests, rate, s, noise)), setup)
            for s in range(args.seeds)
        ]
        total = runs[0]
        for more in runs[1:]:
            total = total + more
        return total

    print(
        f"capacity {Setup().capacity_rps():.2f} req/s; {args.requests} requests x {args.seeds} seeds a row\n"
    )
    rows = []
    for load in loads:
        for noise, name in lengths:
            # The wait as predicted before the queue's misses were measured and before streams' tokens were
            # counted, against now.
            for label, setup in (
                ("prediction only", Setup(counted=False, admission={"wait_quantile": None})),
                ("tokens counted, wait_quantile 0.95", Setup()),
            ):
                rows.append([f"{load:g}x", name, label, *run(setup, load, noise).cells()])
    print(_table(["load", "lengths", "admission", *COLUMNS], rows) + "\n")
    rows = []
    for concurrent in (30, 48, 64):
        for load in loads:
            for on in (False, True):
                setup = Setup(max_concurrent=concurrent, tpot_objective=on)
                cells = run(setup, load, 0.6).cells()
                rows.append([str(concurrent), f"{load:g}x", "yes" if on else "no", *cells])
    print(_table(["max_concurrent", "load", "TPOT objective in admission", *COLUMNS], rows))


if __name__ == "__main__":
    main()
