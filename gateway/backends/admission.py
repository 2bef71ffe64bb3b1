"""Load-aware admission: which backend takes a request, and whether it can take it in time.

At arrival every request gets one of four answers (`Admission.place`, then `Admission.hold`):

- **admit now**: the backend has a free slot (and room for the request's tokens);
- **queue**: a bounded priority queue per backend, ordered by class, then shortest predicted output
  first, with ageing so long requests never starve; held only while it can still meet its objective;
- **spill**: a routed request whose tier cannot meet the objective goes to the other tier when that
  one can (the small tier then gets in-context examples, as always);
- **refuse** at once (429 with `Retry-After`) when no candidate can give the first token in time,
  rather than holding a request that will miss its objective anyway.

A backend whose circuit breaker is open (it kept failing) is no candidate at all: the request goes to
the spill candidates, else the caller's fallback, else `BackendUnavailable` (503). See docs/backends.md.

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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from icgate.gateway.backends.shared import SharedSlots, SharedStateDown
from icgate.gateway.config import AdmissionConfig, BackendConfig, CircuitBreakerConfig


class AdmissionRefused(Exception):
    def __init__(self, backend: str, retry_after_s: float, reason: str) -> None:
        super().__init__(reason)
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.reason = reason


class BackendUnavailable(Exception):
    """Every candidate's circuit is open: nothing to queue for, the client should come back later."""

    def __init__(self, backends: Sequence[str], retry_after_s: float) -> None:
        names = ", ".join(f"'{b}'" for b in backends)
        super().__init__(f"backend {names} is unavailable after repeated failures")
        self.backends = list(backends)
        self.retry_after_s = retry_after_s


CircuitStatus = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """One backend's circuit: closed (calls go through), open (none, for the cool-down), half-open
    (one probe call; its outcome closes or reopens the circuit).

    Sees only the backend's own failures: a client's bad request says nothing about its health.
    """

    def __init__(self, config: CircuitBreakerConfig) -> None:
        self.config = config
        self.state: CircuitStatus = "closed"
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=config.window)  # True: the call failed
        self.opened_at = 0.0
        self.probe_at: float | None = None  # when the half-open probe went out
        self.times_opened = 0

    def status(self, now: float) -> CircuitStatus:
        if self.state == "open" and now - self.opened_at >= self.config.cooldown_s:
            return "half_open"
        return self.state

    def available(self, now: float) -> bool:
        """May a call go to the backend now? Past the cool-down, one probe may (another only if the
        last one was lost, e.g. its client left, for as long as a cool-down)."""
        if not self.config.enabled or self.state == "closed":
            return True
        if self.state == "open":
            return now - self.opened_at >= self.config.cooldown_s
        return self.probe_at is None or now - self.probe_at >= self.config.cooldown_s

    def begin(self, now: float) -> None:
        """A call is going out: when the circuit is not closed, it is the probe."""
        if self.config.enabled and self.state != "closed" and self.available(now):
            self.state, self.probe_at = "half_open", now

    def success(self) -> None:
        self.consecutive = 0
        self.outcomes.append(False)
        if self.state == "half_open":  # the probe came back: trust it again, with a clean slate
            self.state, self.probe_at = "closed", None
            self.outcomes.clear()

    def failure(self, now: float) -> None:
        self.consecutive += 1
        self.outcomes.append(True)
        if not self.config.enabled or self.state == "open":
            return  # already open: a call that was in flight before does not extend the cool-down
        failed = sum(self.outcomes)
        ratio_tripped = (
            len(self.outcomes) >= self.config.min_calls
            and failed / len(self.outcomes) >= self.config.failure_ratio
        )
        if self.state == "half_open" or self.consecutive >= self.config.failures or ratio_tripped:
            self.state, self.opened_at, self.probe_at = "open", now, None
            self.times_opened += 1

    def neutral(self) -> None:
        """The call ended without a verdict on the backend (a client error, a cancelled call)."""
        if self.state == "half_open":
            self.probe_at = None  # the next request may probe

    def retry_after_s(self, now: float) -> float:
        if self.state != "open":
            return 1.0
        return max(1.0, math.ceil(self.config.cooldown_s - (now - self.opened_at)))


@dataclass(frozen=True)
class Ask:
    """What admission knows about one request."""

    prompt_tokens: int
    output_tokens: int  # predicted (p50), capped by max_tokens
    rank: int = 0  # priority class: lower first
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    arrived: float = field(default_factory=time.perf_counter)
    output_tokens_p90: int | None = None  # what to expect once it has outrun its p50

    @property
    def output_p90(self) -> int:
        return max(self.output_tokens, self.output_tokens_p90 or 0)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def budget_s(self, now: float, margin: float = 0.0) -> float | None:
        """Time left to the first-token objective less `margin` of it, or None without one."""
        if self.ttft_slo_s is None:
            return None
        return self.ttft_slo_s * (1.0 - margin) - (now - self.arrived)


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


class TtftModel:
    """Time to first token as a + b * (prompt tokens to prefill, this request's and those just ahead).

    A long prompt, or a burst of them admitted together, takes longer to its first token; a plain
    average would promise a short TTFT to the request that arrives in the middle of such a burst.
    Fitted by least squares on recent samples; the moving average stands in until there are enough.
    """

    def __init__(self, prior_s: float, window: int = 64, min_samples: int = 8) -> None:
        self.mean = Latency(prior_s, window=window)
        self.min_samples = min_samples
        self._tokens: deque[float] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None  # (a, b)

    def add(self, tokens: int, seconds: float) -> None:
        self.mean.add(seconds)
        self._tokens.append(float(tokens))
        self._seconds.append(max(0.0, seconds))
        if len(self._tokens) >= self.min_samples and np.ptp(self._tokens) > 0:
            slope, intercept = np.polyfit(np.array(self._tokens), np.array(self._seconds), 1)
            if slope <= 0:
                self._fit = (float(np.mean(self._seconds)), 0.0)
            else:
                self._fit = (max(0.0, float(intercept)), float(slope))

    def estimate_s(self, tokens: int) -> float:
        if self._fit is None:
            return self.mean.estimate_s
        a, b = self._fit
        return a + b * tokens


@dataclass(frozen=True)
class Placement:
    """Where admission placed a request, and what it saw of that backend at the decision: kept for the
    request's explanation, never computed for it."""

    backend: BackendConfig
    spilled: bool
    in_flight: int  # requests holding one of its slots
    waiting: int  # requests in its queue
    ttft_s: float | None = None  # the predicted time to first token, when the choice needed one


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
    prefill_tokens: int = 0  # its prompt plus those still prefilling when it started
    first_token_at: float | None = None  # streams only
    completion_tokens: int | None = None  # known once it ends


@dataclass
class Waiter:
    ask: Ask
    seq: int
    enqueued: float
    granted: asyncio.Future[None]
    latest_start: float | None = None  # past this its first token is late (None: no objective)
    job: Job | None = None  # set when it is given a slot


class BackendState:
    """Live state of one backend as this gateway sees it, plus its queue."""

    def __init__(self, config: BackendConfig, breaker: CircuitBreakerConfig | None = None) -> None:
        self.config = config
        self.breaker = CircuitBreaker(breaker or CircuitBreakerConfig())
        self.jobs: set[Job] = set()
        self.waiters: list[Waiter] = []
        self.ttft = TtftModel(config.expected_ttft_ms / 1000)
        self.tpot = Latency(config.expected_tpot_ms / 1000)
        self.errors = 0
        self.served = 0
        self.signals: BackendSignals | None = None
        self.elsewhere = 0  # slots other replicas hold (shared state), as last counted

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

    def prefilling_tokens(self, now: float) -> int:
        """Prompt tokens of requests in flight still waiting for their first token."""
        return sum(
            job.ask.prompt_tokens
            for job in self.jobs
            if job.first_token_at is None and now - job.started < 2 * self.ttft.estimate_s(job.prefill_tokens)
        )

    def start_job(self, ask: Ask, now: float, queued_s: float = 0.0) -> Job:
        job = Job(ask, now, queued_s, prefill_tokens=self.prefilling_tokens(now) + ask.prompt_tokens)
        self.jobs.add(job)
        return job

    def service_s(self, ask: Ask) -> float:
        return self.ttft.estimate_s(ask.prompt_tokens) + ask.output_tokens * self.tpot.estimate_s

    def remaining_s(self, job: Job, now: float) -> float:
        """Predicted time until a job in flight ends: by its p50 length, once past that its p90, then
        as long again as it has overrun; at least one token's time, since it is still running."""
        end = job.started + self.service_s(job.ask)
        if end <= now:
            end += (job.ask.output_p90 - job.ask.output_tokens) * self.tpot.estimate_s
        if end <= now:
            # Past its p90 too: answer lengths have a heavy tail, so expect it to run about as long
            # again as it has overrun (not "any moment now", which would promise slots that stay taken).
            end = now + (now - end)
        return max(end - now, self.tpot.estimate_s)

    @property
    def utilisation(self) -> float:
        return (self.in_flight + self.elsewhere + self.waiting) / self.config.max_concurrent


def _seen(state: BackendState, spilled: bool, ttft_s: float | None = None) -> Placement:
    return Placement(state.config, spilled, state.in_flight, state.waiting, ttft_s)


class Admission:
    """Holds every backend's live state and queue; decides admit, queue, spill or refuse."""

    def __init__(
        self,
        backends: list[BackendConfig],
        config: AdmissionConfig,
        breaker: CircuitBreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        signals_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` is what `Ask.arrived` and `Job.first_token_at` are measured on (by default, like
        `RequestContext.arrived`, `time.perf_counter`); `signals_clock` is what `BackendSignals.read_at`
        is stamped with. Fake clocks drive waits, deadlines and cool-downs in tests without sleeping."""
        self.config = config
        self.states = {b.name: BackendState(b, breaker) for b in backends}
        self.clock = clock
        self.signals_clock = signals_clock
        self._seq = itertools.count()
        self.shared: SharedSlots | None = None
        self.on_shared_down: Callable[[], None] = lambda: None

    def share(self, shared: SharedSlots, on_down: Callable[[], None]) -> None:
        """Take slots from the count every replica shares (docs/scaling.md); `on_down` hears of each
        request that fell back to this replica's own count because Redis did not answer."""
        self.shared = shared
        self.on_shared_down = on_down
        shared.backends = list(self.states)
        shared.on_counts = self._note_elsewhere

    def _note_elsewhere(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            state = self.states.get(name)
            if state is None:
                continue
            freed = n < state.elsewhere
            state.elsewhere = n
            if freed:
                self._grant(state)  # slots other replicas gave back may start this replica's waiters

    # --- estimates ------------------------------------------------------------------------------

    def _order_key(self, ask: Ask, enqueued: float, seq: float, now: float) -> tuple[float, float, float]:
        """Class first, then shortest predicted output, aged by time waited."""
        aged = ask.output_tokens - self.config.ageing_tokens_per_s * (now - enqueued)
        return (ask.rank, aged, seq)

    def has_room(self, state: BackendState, ask: Ask, now: float) -> bool:
        """A free slot and room for the request's tokens (an idle backend always has room)."""
        if not self.config.enabled:
            return True
        busy = state.in_flight + state.elsewhere
        if busy == 0:
            return True
        if busy >= state.config.max_concurrent:
            return False
        signals = state.fresh_signals(self.signals_clock(), self.config.metrics_stale_s)
        if signals is not None and signals.kv_usage is not None and signals.kv_usage >= 0.98:
            return False
        limit = state.config.max_tokens_in_flight
        return limit is None or state.tokens_in_flight(now) + ask.tokens <= limit

    def _external_s(self, state: BackendState, ask: Ask) -> float:
        """Requests the backend says it holds for other clients go first (fresh signals only)."""
        signals = state.fresh_signals(self.signals_clock(), self.config.metrics_stale_s)
        if signals is None or signals.waiting <= 0:
            return 0.0
        return signals.waiting * state.service_s(ask) / state.config.max_concurrent

    def _starts(self, state: BackendState, order: list[Ask], now: float) -> list[float]:
        """Predicted start (seconds from now) of each request in queue order: the in-flight ends and
        the queue played forward over the backend's slots."""
        cap = state.config.max_concurrent
        ends = sorted(state.remaining_s(job, now) for job in state.jobs)[:cap]
        # A free slot is usable now only if the tokens in flight and the KV cache allow; else at the next end.
        usable_now = not ends or (bool(order) and self.has_room(state, order[0], now))
        slots = ends + [0.0 if usable_now else ends[0]] * (cap - len(ends))
        heapq.heapify(slots)
        starts = []
        for ask in order:
            start = heapq.heappop(slots)
            starts.append(start)
            heapq.heappush(slots, start + state.service_s(ask))
        return starts

    def _plan(self, state: BackendState, ask: Ask, now: float) -> tuple[int, float]:
        """Where a newcomer joins the queue, and its predicted start (seconds from now).

        Class first, then shortest predicted output (aged), but never ahead of a waiter whose
        objective that would break: a request told it can wait is not overtaken into missing.
        """
        waiters = state.waiters
        key = self._order_key(ask, now, math.inf, now)  # after equals already waiting
        pos = next(
            (i for i, w in enumerate(waiters) if key < self._order_key(w.ask, w.enqueued, w.seq, now)),
            len(waiters),
        )
        asks = [w.ask for w in waiters]
        before = self._starts(state, asks, now)
        while True:
            starts = self._starts(state, [*asks[:pos], ask, *asks[pos:]], now)
            broken = [
                i
                for i in range(pos, len(waiters))
                if (latest := waiters[i].latest_start) is not None
                and now + starts[i + 1] > latest >= now + before[i]
            ]
            if not broken:
                return pos, starts[pos] + self._external_s(state, ask)
            pos = broken[-1] + 1

    def wait_s(self, state: BackendState, ask: Ask, now: float) -> float:
        """Predicted wait for a slot (see `_plan`)."""
        if not state.waiters and self.has_room(state, ask, now):
            return self._external_s(state, ask)
        return self._plan(state, ask, now)[1]

    def first_token_s(self, state: BackendState, ask: Ask, wait_s: float, now: float) -> float:
        """The backend's time to first token for a request that starts after `wait_s`: with the
        prompts still prefilling now if it starts now, its own prompt alone if later."""
        ahead = state.prefilling_tokens(now) if wait_s <= 0 else 0
        return state.ttft.estimate_s(ahead + ask.prompt_tokens)

    def ttft_s(self, state: BackendState, ask: Ask, now: float) -> float:
        """Predicted time from now to the request's first token on this backend."""
        wait = self.wait_s(state, ask, now)
        return wait + self.first_token_s(state, ask, wait, now)

    # --- the decision at arrival ----------------------------------------------------------------

    def place(
        self, ask: Ask, candidates: Sequence[BackendConfig], spill: Sequence[BackendConfig] = ()
    ) -> tuple[BackendConfig, bool]:
        """The backend that should take the request and whether that is a spill (see `decide`)."""
        placed = self.decide(ask, candidates, spill)
        return placed.backend, placed.spilled

    def decide(
        self, ask: Ask, candidates: Sequence[BackendConfig], spill: Sequence[BackendConfig] = ()
    ) -> Placement:
        """The backend that should take the request, whether that is a spill, and what admission saw of
        it; or AdmissionRefused.

        Backends whose circuit is open are skipped; when that leaves no candidate, the spill candidates
        stand in (a spill), and with none of those either, BackendUnavailable. Then: admit now where
        there is room; else the candidate with the earliest predicted first token, if it meets the
        objective; else a spill candidate that does; else refuse. Without an objective, the least
        utilised candidate, as before.
        """
        now = self.clock()
        live = [b for b in candidates if self.available(b, now)]
        live_spill = [b for b in spill if self.available(b, now)]
        forced = not live
        if forced:
            if not live_spill:
                retry = min((self.states[b.name].breaker.retry_after_s(now) for b in candidates), default=1.0)
                raise BackendUnavailable([b.name for b in candidates], retry)
            live, live_spill = live_spill, []
        placed = self._choose(ask, live, live_spill, now)
        self.states[placed.backend.name].breaker.begin(now)
        return replace(placed, spilled=True) if forced else placed

    def _choose(
        self, ask: Ask, candidates: Sequence[BackendConfig], spill: Sequence[BackendConfig], now: float
    ) -> Placement:
        states = [self.states[b.name] for b in candidates]
        if not self.config.enabled:
            return _seen(min(states, key=lambda s: s.in_flight), False)
        budget = ask.budget_s(now, self.config.ttft_margin)
        free = [
            s
            for s in states
            if not s.waiters
            and self.has_room(s, ask, now)
            # A busy backend whose prefill backlog would make the first token late is not free.
            and (budget is None or s.in_flight == 0 or self.first_token_s(s, ask, 0.0, now) <= budget)
        ]
        if free:
            return _seen(min(free, key=lambda s: s.utilisation), False)
        if budget is None:
            return _seen(min(states, key=lambda s: s.utilisation), False)
        best_ttft, best = min(((self.ttft_s(s, ask, now), s) for s in states), key=lambda p: p[0])
        if best_ttft <= budget and best.waiting < self.config.max_queue:
            return _seen(best, False, best_ttft)
        spill_states = [self.states[b.name] for b in spill]
        if spill_states:
            other_ttft, other = min(((self.ttft_s(s, ask, now), s) for s in spill_states), key=lambda p: p[0])
            has_place = other.waiting < self.config.max_queue or self.has_room(other, ask, now)
            if other_ttft <= budget and has_place:
                return _seen(other, True, other_ttft)
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
            job = state.start_job(ask, self.clock())
            try:
                yield job
            finally:
                self._finish(state, job)
            return
        now = self.clock()
        if state.waiters or not self.has_room(state, ask, now):
            job = await self._queue(state, ask, now)
        else:
            job = state.start_job(ask, now)
        owner = None
        if self.shared is not None:
            try:
                owner = await self._shared_slot(state, ask, job)
            except BaseException:  # refused or cancelled while waiting for a shared slot: it never ran
                state.jobs.discard(job)
                self._grant(state)
                raise
        try:
            yield job
        finally:
            self._finish(state, job)
            self._grant(state)
            if owner is not None:
                await self._give_back(state, owner)

    async def _shared_slot(self, state: BackendState, ask: Ask, job: Job) -> str | None:
        """This replica has given the request a slot; now one of the slots all replicas share. Waits in
        the shared line no longer than the request's objective (or `max_queue_wait_s`) allows; refused
        past that. Redis not answering: go on with this replica's slot alone (warned, counted)."""
        assert self.shared is not None
        now = self.clock()
        budget = ask.budget_s(now, self.config.ttft_margin)
        timeout = self.config.max_queue_wait_s
        if budget is not None:
            timeout = min(timeout, max(0.0, budget - self.first_token_s(state, ask, 0.0, now)))
        owner = self.shared.new_owner()
        order = ask.rank * 1e10 + time.time()  # class first, then arrival (replicas' clocks agree enough)
        try:
            got = await self.shared.acquire(
                state.config.name, state.config.max_concurrent, owner, order, timeout
            )
        except SharedStateDown:  # said in the log by the slots' `Outage`; counted here, per request
            self.on_shared_down()
            return None
        if not got:
            raise AdmissionRefused(
                state.config.name,
                max(1.0, math.ceil(self.wait_s(state, ask, self.clock()))),
                f"backend {state.config.name} is at capacity ({state.config.max_concurrent} in flight across "
                "replicas) and the request could not start in time",
            )
        started = self.clock()
        job.queued_s += started - now
        job.started = started  # its time to first token counts from here
        return owner

    async def _give_back(self, state: BackendState, owner: str) -> None:
        assert self.shared is not None
        try:
            await asyncio.shield(self.shared.release(state.config.name, owner))
        except SharedStateDown:
            self.on_shared_down()  # the lease runs out on its own

    async def _queue(self, state: BackendState, ask: Ask, now: float) -> Job:
        if len(state.waiters) >= self.config.max_queue:
            raise AdmissionRefused(
                state.config.name,
                max(1.0, math.ceil(self.wait_s(state, ask, now))),
                f"backend {state.config.name} has {len(state.waiters)} requests queued (the limit)",
            )
        pos, start = self._plan(state, ask, now)
        budget = ask.budget_s(now, self.config.ttft_margin)
        latest = None
        if budget is not None:
            # Past this, the first token would come too late even if the slot came then.
            latest = now + budget - self.first_token_s(state, ask, start, now)
        future = asyncio.get_running_loop().create_future()
        waiter = Waiter(ask, next(self._seq), now, future, latest_start=latest)
        state.waiters.insert(pos, waiter)
        self._grant(state)  # it may be first in line for a slot that is already free
        timeout = self.config.max_queue_wait_s
        if latest is not None:
            timeout = min(timeout, max(0.0, latest - now))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(waiter.granted)
        except AdmissionRefused:
            raise  # refused at its turn (see _grant), already out of the queue
        except TimeoutError:
            if waiter.granted.done():  # granted or refused in the same instant
                if waiter.job is not None:
                    return waiter.job
                raise waiter.granted.exception() from None  # type: ignore[misc]
            state.waiters.remove(waiter)
            self._grant(state)
            raise self._too_late(state, ask, self.clock()) from None
        except BaseException:
            # Cancelled (the client left): give up the place, or the slot it was just given.
            if waiter.job is not None:
                state.jobs.discard(waiter.job)
            elif waiter in state.waiters:
                state.waiters.remove(waiter)
            elif waiter.granted.done():
                waiter.granted.exception()  # refused meanwhile: nobody else will read it
            self._grant(state)
            raise
        assert waiter.job is not None
        return waiter.job

    def _grant(self, state: BackendState) -> None:
        """Give free slots to the head of the queue; a granted waiter's job counts in flight at once."""
        now = self.clock()
        while state.waiters and self.has_room(state, state.waiters[0].ask, now):
            head = state.waiters.pop(0)
            budget = head.ask.budget_s(now, self.config.ttft_margin)
            if budget is not None and self.first_token_s(state, head.ask, 0.0, now) > budget:
                # The prompts prefilling ahead of it would make its first token late: refuse it now
                # rather than admit a miss, and give the slot to the next.
                head.granted.set_exception(self._too_late(state, head.ask, now))
                continue
            head.job = state.start_job(head.ask, now, queued_s=now - head.enqueued)
            head.granted.set_result(None)

    def _too_late(self, state: BackendState, ask: Ask, now: float) -> AdmissionRefused:
        return AdmissionRefused(
            state.config.name,
            max(1.0, math.ceil(self.wait_s(state, ask, now))),
            f"backend {state.config.name} is at capacity ({state.config.max_concurrent} in flight) "
            f"and the request could not start in time",
        )

    def _finish(self, state: BackendState, job: Job) -> None:
        state.jobs.discard(job)
        now = self.clock()
        state.served += 1
        if job.first_token_at is not None:
            state.ttft.add(job.prefill_tokens, job.first_token_at - job.started)
        tokens = job.completion_tokens
        if not tokens:
            return
        if job.first_token_at is not None:
            if tokens > 1 and job.first_token_at < now:
                state.tpot.add((now - job.first_token_at) / (tokens - 1))
        else:  # a whole answer at once: what is left after the usual first token, per token
            decode = now - job.started - state.ttft.estimate_s(job.prefill_tokens)
            if decode > 0:
                state.tpot.add(decode / tokens)

    # --- backend health (the circuit breaker) ---------------------------------------------------

    def available(self, backend: BackendConfig, now: float | None = None) -> bool:
        """Whether the backend's circuit lets a call through now."""
        return self.states[backend.name].breaker.available(self.clock() if now is None else now)

    def claim(self, backend: BackendConfig) -> bool:
        """For a call placed outside `place` (the fallback): True, and the probe taken if half-open."""
        now = self.clock()
        breaker = self.states[backend.name].breaker
        if not breaker.available(now):
            return False
        breaker.begin(now)
        return True

    def backend_failed(self, backend: BackendConfig) -> None:
        """The backend itself failed (5xx, timeout, unreachable, rejected our key): counts to its circuit."""
        state = self.states[backend.name]
        state.errors += 1
        state.breaker.failure(self.clock())

    def backend_succeeded(self, backend: BackendConfig) -> None:
        self.states[backend.name].breaker.success()

    def backend_neutral(self, backend: BackendConfig) -> None:
        """The call ended saying nothing about the backend's health (a client's error, a cancellation)."""
        self.states[backend.name].breaker.neutral()

    def circuits(self) -> dict[str, CircuitStatus]:
        now = self.clock()
        return {name: s.breaker.status(now) for name, s in self.states.items()}

    def serving(self) -> bool:
        """At least one backend would take a call now (readiness)."""
        now = self.clock()
        return any(s.breaker.available(now) for s in self.states.values())

    def note_signals(self, backend: str, signals: BackendSignals) -> None:
        self.states[backend].signals = signals

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Every backend's live state, for /admin and the tests."""
        now = self.clock()
        out: dict[str, dict[str, float | int | None]] = {}
        for name, s in self.states.items():
            signals = s.fresh_signals(self.signals_clock(), self.config.metrics_stale_s)
            out[name] = {
                "in_flight": s.in_flight,
                "waiting": s.waiting,
                "tokens_in_flight": s.tokens_in_flight(now),
                "ttft_ms": s.ttft.mean.estimate_s * 1000,
                "ttft_p90_ms": s.ttft.mean.p90_s * 1000,
                "tpot_ms": s.tpot.estimate_s * 1000,
                "tpot_p90_ms": s.tpot.p90_s * 1000,
                "errors": s.errors,
                "served": s.served,
                # 1 while the backend gets no calls or only a probe (icgate_admission_backend_circuit_open).
                "circuit_open": int(s.breaker.status(now) != "closed"),
                "circuit_opened": s.breaker.times_opened,
                "backend_waiting": signals.waiting if signals else None,
                "backend_running": signals.running if signals else None,
                "backend_kv_usage": signals.kv_usage if signals else None,
            }
        return out
