"""Load-aware admission: which backend takes a request, and whether it can take it in time.

At arrival every request gets one of four answers (`Admission.place`, then `Admission.hold`):

- **admit now**: the backend has a free slot (and room for the request's tokens);
- **queue**: a bounded priority queue per backend, ordered by class, then shortest predicted output
  first, with ageing so long requests never starve; held only while it can still meet its objective;
- **spill**: a routed request whose tier cannot meet the objective goes to the other tier when that
  one can (the small tier then gets in-context examples, as always);
- **refuse** at once (429 with `Retry-After`) when no candidate can give the first token in time,
  rather than holding a request that will miss its objective anyway.

How long a request would wait is estimated from live state only: the predicted end of every request
in flight (time to first token plus predicted output times time per output token, both moving
averages measured on this backend) and the predicted service of every request queued ahead of it,
played forward over the backend's slots. A backend's own vLLM-style signals, when polled and fresh,
add the requests it has queued for other clients.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.config import AdmissionConfig, BackendConfig


class AdmissionRefused(Exception):
    def __init__(self, backend: str, retry_after_s: float, reason: str) -> None:
        super().__init__(reason)
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.reason = reason


@dataclass(frozen=True)
class Ask:
    """What admission knows about one request."""

    prompt_tokens: int
    output_tokens: int  # predicted (p50), capped by max_tokens
    rank: int = 0  # priority class: lower first
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def budget_s(self, now: float) -> float | None:
        """Time left to the first-token objective, or None without one."""
        return None if self.ttft_slo_s is None else self.ttft_slo_s - (now - self.arrived)


class Latency:
    """A moving average and a p90 over recent samples, with a prior until the first sample."""

    def __init__(self, prior_s: float, alpha: float = 0.2, window: int = 64) -> None:
        self.prior_s = prior_s
        self.alpha = alpha
        self.mean_s: float | None = None
        self._recent: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.mean_s = seconds if self.mean_s is None else self.mean_s + self.alpha * (seconds - self.mean_s)
        self._recent.append(seconds)

    @property
    def estimate_s(self) -> float:
        return self.prior_s if self.mean_s is None else self.mean_s

    @property
    def p90_s(self) -> float:
        if not self._recent:
            return self.prior_s
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass(frozen=True)
class BackendSignals:
    """What a backend reports about itself (vLLM's /metrics), and when it was read."""

    waiting: float
    running: float
    kv_usage: float | None
    read_at: float  # time.monotonic()


@dataclass(eq=False)
class Job:
    """A request holding one of a backend's slots."""

    ask: Ask
    started: float
    queued_s: float = 0.0
    first_token_at: float | None = None  # streams only
    completion_tokens: int | None = None  # known once it ends


@dataclass
class Waiter:
    ask: Ask
    seq: int
    enqueued: float
    granted: asyncio.Future[None]
    job: Job | None = None  # set when it is given a slot


class BackendState:
    """Live state of one backend as this gateway sees it, plus its queue."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.jobs: set[Job] = set()
        self.waiters: list[Waiter] = []
        self.ttft = Latency(config.expected_ttft_ms / 1000)
        self.tpot = Latency(config.expected_tpot_ms / 1000)
        self.errors = 0
        self.served = 0
        self.signals: BackendSignals | None = None

    @property
    def in_flight(self) -> int:
        return len(self.jobs)

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def tokens_in_flight(self, now: float) -> int:
        """Prompts plus predicted remaining output of the requests in flight."""
        total = 0
        for job in self.jobs:
            produced = 0
            if job.first_token_at is not None:
                produced = int((now - job.first_token_at) / max(self.tpot.estimate_s, 1e-6))
            total += job.ask.prompt_tokens + max(0, job.ask.output_tokens - produced)
        return total

    def fresh_signals(self, now_monotonic: float, stale_s: float) -> BackendSignals | None:
        s = self.signals
        return s if s is not None and now_monotonic - s.read_at <= stale_s else None

    def service_s(self, ask: Ask) -> float:
        return self.ttft.estimate_s + ask.output_tokens * self.tpot.estimate_s

    def remaining_s(self, job: Job, now: float) -> float:
        """Predicted time until a job in flight ends (at least one token's time: it is still running)."""
        end = job.started + self.service_s(job.ask)
        return max(end - now, self.tpot.estimate_s)

    @property
    def utilisation(self) -> float:
        return (self.in_flight + self.waiting) / self.config.max_concurrent


class Admission:
    """Holds every backend's live state and queue; decides admit, queue, spill or refuse."""

    def __init__(self, backends: list[BackendConfig], config: AdmissionConfig) -> None:
        self.config = config
        self.states = {b.name: BackendState(b) for b in backends}
        self._seq = itertools.count()

    # --- estimates ------------------------------------------------------------------------------

    def _order_key(self, waiter_ask: Ask, enqueued: float, seq: int, now: float) -> tuple[float, float, int]:
        """Class first, then shortest predicted output, aged by time waited."""
        aged = waiter_ask.output_tokens - self.config.ageing_tokens_per_s * (now - enqueued)
        return (waiter_ask.rank, aged, seq)

    def has_room(self, state: BackendState, ask: Ask, now: float) -> bool:
        """A free slot and room for the request's tokens (an idle backend always has room)."""
        if not self.config.enabled:
            return True
        if state.in_flight == 0:
            return True
        if state.in_flight >= state.config.max_concurrent:
            return False
        signals = state.fresh_signals(time.monotonic(), self.config.metrics_stale_s)
        if signals is not None and signals.kv_usage is not None and signals.kv_usage >= 0.98:
            return False
        limit = state.config.max_tokens_in_flight
        return limit is None or state.tokens_in_flight(now) + ask.tokens <= limit

    def wait_s(self, state: BackendState, ask: Ask, now: float) -> float:
        """Predicted wait for a slot: in-flight ends and the queue ahead played forward over the slots."""
        external = 0.0
        signals = state.fresh_signals(time.monotonic(), self.config.metrics_stale_s)
        if signals is not None and signals.waiting > 0:
            # Requests queued inside the backend by other clients go first.
            external = signals.waiting * state.service_s(ask) / state.config.max_concurrent
        if not state.waiters and self.has_room(state, ask, now):
            return external
        key = self._order_key(ask, now, -1, now)
        ahead = [w for w in state.waiters if self._order_key(w.ask, w.enqueued, w.seq, now) < key]
        ends = sorted(state.remaining_s(job, now) for job in state.jobs)
        slots = ends[: state.config.max_concurrent]
        slots += [0.0] * (state.config.max_concurrent - len(slots))
        heapq.heapify(slots)
        for waiter in sorted(ahead, key=lambda w: self._order_key(w.ask, w.enqueued, w.seq, now)):
            heapq.heappush(slots, heapq.heappop(slots) + state.service_s(waiter.ask))
        free_at = slots[0]
        if not ahead and state.in_flight < state.config.max_concurrent:
            free_at = min(ends) if ends else 0.0  # a slot is free but tokens are not: the next end
        return free_at + external

    def ttft_s(self, state: BackendState, ask: Ask, now: float) -> float:
        """Predicted time from now to the request's first token on this backend."""
        return self.wait_s(state, ask, now) + state.ttft.estimate_s

    # --- the decision at arrival ----------------------------------------------------------------

    def place(
        self, ask: Ask, candidates: Sequence[BackendConfig], spill: Sequence[BackendConfig] = ()
    ) -> tuple[BackendConfig, bool]:
        """The backend that should take the request and whether that is a spill; or AdmissionRefused.

        Admit now where there is room; else the candidate with the earliest predicted first token, if it
        meets the objective; else a spill candidate that does; else refuse. Without an objective,
        the least utilised candidate, as before.
        """
        now = time.perf_counter()
        states = [self.states[b.name] for b in candidates]
        if not self.config.enabled:
            return min(states, key=lambda s: s.in_flight).config, False
        free = [s for s in states if not s.waiters and self.has_room(s, ask, now)]
        if free:
            return min(free, key=lambda s: s.utilisation).config, False
        budget = ask.budget_s(now)
        if budget is None:
            return min(states, key=lambda s: s.utilisation).config, False
        best = min(states, key=lambda s: self.ttft_s(s, ask, now))
        best_ttft = self.ttft_s(best, ask, now)
        if best_ttft <= budget and best.waiting < self.config.max_queue:
            return best.config, False
        spill_states = [self.states[b.name] for b in spill]
        if spill_states:
            other = min(spill_states, key=lambda s: self.ttft_s(s, ask, now))
            if self.ttft_s(other, ask, now) <= budget and (
                other.waiting < self.config.max_queue or self.has_room(other, ask, now)
            ):
                return other.config, True
        retry = max(1.0, math.ceil(best_ttft - max(budget, 0.0)))
        if best.waiting >= self.config.max_queue:
            reason = f"backend {best.config.name} has {best.waiting} requests queued (the limit)"
        else:
            reason = (
                f"backend {best.config.name} cannot start this request within its time-to-first-token "
                f"objective ({ask.ttft_slo_s * 1000:.0f} ms; predicted {best_ttft * 1000:.0f} ms)"
                if ask.ttft_slo_s is not None
                else f"backend {best.config.name} is saturated"
            )
        raise AdmissionRefused(best.config.name, retry, reason)

    # --- holding a slot -------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(self, backend: BackendConfig, ask: Ask) -> AsyncIterator[Job]:
        """Wait for a slot (bounded by the objective and `max_queue_wait_s`), hold it for the call.

        Yields the `Job`, whose `first_token_at` and `completion_tokens` the caller fills in; they
        become the backend's measured time to first token and time per output token.
        """
        state = self.states[backend.name]
        if not self.config.enabled:
            job = Job(ask, time.perf_counter())
            state.jobs.add(job)
            try:
                yield job
            finally:
                self._finish(state, job)
            return
        now = time.perf_counter()
        if state.waiters or not self.has_room(state, ask, now):
            job = await self._queue(state, ask, now)
        else:
            job = Job(ask, now)
            state.jobs.add(job)
        try:
            yield job
        finally:
            self._finish(state, job)
            self._grant(state)

    async def _queue(self, state: BackendState, ask: Ask, now: float) -> Job:
        if len(state.waiters) >= self.config.max_queue:
            raise AdmissionRefused(
                state.config.name,
                max(1.0, math.ceil(self.wait_s(state, ask, now))),
                f"backend {state.config.name} has {len(state.waiters)} requests queued (the limit)",
            )
        waiter = Waiter(ask, next(self._seq), now, asyncio.get_running_loop().create_future())
        state.waiters.append(waiter)
        self._grant(state)  # it may be first in line for a slot that is already free
        timeout = self.config.max_queue_wait_s
        budget = ask.budget_s(now)
        if budget is not None:
            # Past this, the first token would come too late even if the slot came now.
            timeout = min(timeout, max(0.0, budget - state.ttft.estimate_s))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            if waiter.job is not None:  # granted in the same instant: keep the slot
                return waiter.job
            state.waiters.remove(waiter)
            self._grant(state)
            raise AdmissionRefused(
                state.config.name,
                max(1.0, math.ceil(self.wait_s(state, ask, time.perf_counter()))),
                f"backend {state.config.name} is at capacity ({state.config.max_concurrent} in flight) "
                f"and the request could not start in time",
            ) from None
        except BaseException:
            # Cancelled (the client left): give up the place, or the slot it was just given.
            if waiter.job is not None:
                state.jobs.discard(waiter.job)
            else:
                state.waiters.remove(waiter)
            self._grant(state)
            raise
        assert waiter.job is not None
        return waiter.job

    def _grant(self, state: BackendState) -> None:
        """Give free slots to the best waiters; a granted waiter's job counts in flight at once."""
        now = time.perf_counter()
        while state.waiters:
            best = min(state.waiters, key=lambda w: self._order_key(w.ask, w.enqueued, w.seq, now))
            if not self.has_room(state, best.ask, now):
                return
            state.waiters.remove(best)
            best.job = Job(best.ask, now, queued_s=now - best.enqueued)
            state.jobs.add(best.job)
            best.granted.set_result(None)

    def _finish(self, state: BackendState, job: Job) -> None:
        state.jobs.discard(job)
        now = time.perf_counter()
        state.served += 1
        if job.first_token_at is not None:
            state.ttft.add(job.first_token_at - job.started)
        tokens = job.completion_tokens
        if not tokens:
            return
        if job.first_token_at is not None:
            if tokens > 1 and job.first_token_at < now:
                state.tpot.add((now - job.first_token_at) / (tokens - 1))
        else:  # a whole answer at once: what is left after the usual first token, per token
            decode = now - job.started - state.ttft.estimate_s
            if decode > 0:
                state.tpot.add(decode / tokens)

    def backend_failed(self, backend: BackendConfig) -> None:
        self.states[backend.name].errors += 1

    def note_signals(self, backend: str, signals: BackendSignals) -> None:
        self.states[backend].signals = signals

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Every backend's live state, for /admin and the tests."""
        now = time.perf_counter()
        out: dict[str, dict[str, float | int | None]] = {}
        for name, s in self.states.items():
            signals = s.fresh_signals(time.monotonic(), self.config.metrics_stale_s)
            out[name] = {
                "in_flight": s.in_flight,
                "waiting": s.waiting,
                "tokens_in_flight": s.tokens_in_flight(now),
                "ttft_ms": s.ttft.estimate_s * 1000,
                "ttft_p90_ms": s.ttft.p90_s * 1000,
                "tpot_ms": s.tpot.estimate_s * 1000,
                "tpot_p90_ms": s.tpot.p90_s * 1000,
                "errors": s.errors,
                "served": s.served,
                "backend_waiting": signals.waiting if signals else None,
                "backend_running": signals.running if signals else None,
                "backend_kv_usage": signals.kv_usage if signals else None,
            }
        return out
