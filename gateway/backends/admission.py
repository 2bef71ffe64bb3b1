"""Load-aware admission: which backend takes a request, and whether it can take it in time.

At arrival every request gets one of four answers (`Admission.place`, then `Admission.hold`):

- **admit now**: the backend has a free slot, room for the request's tokens, and a batch it can join
  without pushing a time per output token (its own, or a running request's) past its objective;
- **queue**: a bounded priority queue per backend, ordered by class, then shortest predicted output
  first, with ageing so long requests never starve; held only while it can still meet its objective;
- **spill**: a routed request whose tier cannot meet the objective goes to the other tier when that
  one can (the small tier then gets in-context examples, as always);
- **refuse** at once (429 with `Retry-After`) when no candidate can give the first token in time,
  rather than holding a request that will miss its objective anyway. A request told it can wait and
  then refused at its deadline is a misprediction; such refusals say so (`AdmissionRefused.stage`).

A backend whose circuit breaker is open (it kept failing) is no candidate at all: the request goes to
the spill candidates, else the caller's fallback, else `BackendUnavailable` (503). See docs/backends.md.

How long a request would wait is estimated from live state only: the predicted end of every request
in flight (for a stream, the tokens left of its predicted answer once its tokens so far are counted;
else its time to first token plus predicted output times time per output token, both measured on this
backend) and the predicted service of every request queued ahead of it, played forward over the
backend's slots. A backend's own vLLM-style signals, when polled and fresh, add the requests it has
queued for other clients. A request is told it can wait only if that wait, plus the `wait_quantile` of
how much longer than predicted the backend's recent queued requests waited, meets its objective.

Time per output token is `DecodeModel`: a + b x batch, learnt from finished streams against the batch
they ran in (`tpot_breach` says who a newcomer would push over).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from icgate.gateway.backends.shared import SharedSlots, SharedStateDown
from icgate.gateway.config import AdmissionConfig, BackendConfig, CircuitBreakerConfig

RefusedAt = Literal["arrival", "queued"]
# `shed_long_quantile` reads the predicted outputs of a backend's last RECENT_SIZES requests, and none until
# it has seen MIN_RECENT_SIZES.
RECENT_SIZES = 256
MIN_RECENT_SIZES = 32


class AdmissionRefused(Exception):
    """429: the request cannot start in time. `stage` says whether it was refused at arrival, having
    waited for nothing, or after waiting in the queue (`waited_s`), which a client and the benchmark need
    to tell apart (`x-icgate-refused`); `predicted_wait_s` is what admission expected it to wait."""

    def __init__(
        self,
        backend: str,
        retry_after_s: float,
        reason: str,
        *,
        stage: RefusedAt = "arrival",
        predicted_wait_s: float | None = None,
        waited_s: float = 0.0,
    ) -> None:
        super().__init__(reason)
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.reason = reason
        self.stage: RefusedAt = stage
        self.predicted_wait_s = predicted_wait_s
        self.waited_s = waited_s


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
    # Backends whose own length predictor sizes this request: name -> (p50, p90). See `on`.
    outputs_by_backend: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    def on(self, backend: str) -> Ask:
        """The request as `backend` would serve it: sized by that backend's own predicted output, if any."""
        own = self.outputs_by_backend.get(backend)
        if own is None:
            return self
        return replace(self, output_tokens=own[0], output_tokens_p90=own[1], outputs_by_backend={})

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


class DecodeModel:
    """Time per output token with n sequences in the batch, as a + b * n.

    A decode step costs more the more sequences it carries (vLLM reads every running sequence's KV),
    and every newcomer's prefill stalls the whole batch once; in steady state that stall adds about
    n x prefill / answer length per token, also linear in n. So a line fits both, and it is fitted
    where they show: on finished streams, their TPOT against the mean batch they ran in, by weighted
    least squares over the recent ones.

    The prior is the policy's `expected_tpot_ms` read as the TPOT of a full batch (`max_concurrent`),
    with PRIOR_BASE_SHARE of it for a lone sequence, worth PRIOR_WEIGHT samples: a backend that is always
    full shows the level at its batch but not the slope, which then stays the prior's until the data
    spans more batch sizes.
    """

    PRIOR_BASE_SHARE = 0.3  # vLLM-like engines: a lone sequence's step is about 1/3 of a full batch's
    PRIOR_WEIGHT = 4.0

    def __init__(self, full_batch_s: float, full_batch: int, window: int = 128) -> None:
        base = full_batch_s * self.PRIOR_BASE_SHARE
        if full_batch <= 1:
            self._prior = [(1.0, full_batch_s, self.PRIOR_WEIGHT)]
        else:
            half = self.PRIOR_WEIGHT / 2
            self._prior = [(1.0, base, half), (float(full_batch), full_batch_s, half)]
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.a, self.b = self._fit()

    def add(self, batch: float, tpot_s: float) -> None:
        self._samples.append((max(1.0, batch), max(0.0, tpot_s)))
        self.a, self.b = self._fit()

    @property
    def samples(self) -> int:
        return len(self._samples)

    def step_s(self, batch: float) -> float:
        """The time per output token with `batch` sequences decoding."""
        return self.a + self.b * max(1.0, batch)

    def _fit(self) -> tuple[float, float]:
        points = [*self._prior, *((x, y, 1.0) for x, y in self._samples)]
        w = sum(p[2] for p in points)
        sx = sum(p[2] * p[0] for p in points)
        sy = sum(p[2] * p[1] for p in points)
        sxx = sum(p[2] * p[0] * p[0] for p in points)
        sxy = sum(p[2] * p[0] * p[1] for p in points)
        spread = w * sxx - sx * sx
        b = (w * sxy - sx * sy) / spread if spread > 1e-9 else 0.0
        if b <= 0:  # noise that slopes down: a step never gets cheaper with more sequences
            return sy / w, 0.0
        a = (sy - b * sx) / w
        if a < 0:  # through the origin
            return 0.0, sxy / sxx
        return a, b


class WaitError:
    """How much longer than predicted requests queued for a slot: the residuals (actual minus predicted
    wait) of the requests that waited in the last `window_s`. A request refused after waiting counts
    with the time it waited, a lower bound of what it would have needed. `margin_s` is the upper
    quantile admission adds to a predicted wait before it tells a request it can wait (docs/admission.md).

    The last `most`, and none older than `window_s`: a margin so large that it refuses at arrival every
    request that would have queued gets no new residuals to replace it, so the old ones age out, and
    with fewer than `min_samples` there is no margin until the queue has shown again how it does. Five
    minutes, not one: a shorter window empties in quiet spells and the margin swings (in the replay,
    tests/gateway/backends/replay.py, the late share at 1.5x rose from 3% to 10% with 60 s).
    """

    def __init__(self, window_s: float = 300.0, min_samples: int = 20, most: int = 512) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._residuals: deque[tuple[float, float]] = deque(maxlen=most)  # (when, actual - predicted)
        self._margins: dict[float, float] = {}  # by quantile, until the residuals change

    def add(self, predicted_s: float, actual_s: float, now: float) -> None:
        self._residuals.append((now, actual_s - predicted_s))
        self._margins.clear()

    def _recent(self, now: float) -> deque[tuple[float, float]]:
        while self._residuals and self._residuals[0][0] < now - self.window_s:
            self._residuals.popleft()
            self._margins.clear()
        return self._residuals

    def margin_s(self, quantile: float | None, now: float) -> float:
        """The `quantile` of the recent residuals, at least 0 (an early slot needs no allowance); 0 without
        a quantile or with too few of them."""
        if quantile is None or len(self._recent(now)) < self.min_samples:
            return 0.0
        margin = self._margins.get(quantile)
        if margin is None:
            residuals = np.fromiter((r for _, r in self._residuals), float)
            margin = max(0.0, float(np.quantile(residuals, quantile)))
            self._margins[quantile] = margin
        return margin

    def bias_s(self, now: float) -> float | None:
        """The mean recent residual: how much longer (or, below 0, shorter) than predicted waits were."""
        recent = self._recent(now)
        return float(np.mean([r for _, r in recent])) if recent else None


@dataclass(frozen=True)
class TpotBreach:
    """Admitting the request now would push a time per output token over its objective."""

    predicted_s: float
    slo_s: float
    whose: Literal["own", "running"]  # the newcomer's own, or a request already running's

    def describe(self) -> str:
        who = "its own" if self.whose == "own" else "a running request's"
        return (
            f"the time-per-output-token objective ({self.slo_s * 1000:.0f} ms; "
            f"predicted {self.predicted_s * 1000:.0f} ms for {who})"
        )


@dataclass(frozen=True)
class Placement:
    """Where admission placed a request, and what it saw of that backend at the decision: kept for the
    request's explanation, never computed for it."""

    backend: BackendConfig
    spilled: bool
    in_flight: int  # requests holding one of its slots
    waiting: int  # requests in its queue
    ttft_s: float | None = None  # the predicted time to first token, when the choice needed one
    wait_s: float | None = None  # the predicted wait for a slot, when the choice needed one


@dataclass(frozen=True)
class BackendSignals:
    """What a backend reports about itself (vLLM's /metrics), and when it was read."""

    waiting: float
    running: float
    kv_usage: float | None
    read_at: float  # time.monotonic()


@dataclass(frozen=True)
class Relayed:
    """How much of an answer a stream has relayed so far."""

    chunks: int  # chunks of the stream
    chars: int  # characters of answer text in them


class CharsPerToken:
    """Characters per output token in a backend's answers, from its finished streams whose usage it
    reported; turns what a stream has relayed into tokens.

    Why not a token a chunk: servers may put several tokens in one chunk (vLLM's stream interval, a
    provider batching its writes, the bench simulator's 50 ms), and a stream counted by its chunks looks
    less far along than it is, so admission would predict its slot later than it frees. The prior is
    four characters a token (English text, the gateway's prompt estimate), worth one short answer."""

    PRIOR_CHARS = 400.0
    PRIOR_TOKENS = 100.0

    def __init__(self, window: int = 64) -> None:
        self._samples: deque[tuple[int, int]] = deque(maxlen=window)
        self._chars = self.PRIOR_CHARS
        self._tokens = self.PRIOR_TOKENS

    def add(self, chars: int, tokens: int) -> None:
        if chars <= 0 or tokens <= 0:
            return
        if len(self._samples) == self._samples.maxlen:
            old_chars, old_tokens = self._samples[0]
            self._chars, self._tokens = self._chars - old_chars, self._tokens - old_tokens
        self._samples.append((chars, tokens))
        self._chars, self._tokens = self._chars + chars, self._tokens + tokens

    @property
    def estimate(self) -> float:
        return self._chars / self._tokens

    def tokens(self, relayed: Relayed) -> float:
        """Tokens in what a stream relayed: its characters at the learned rate, and at least a token a
        chunk."""
        return max(float(relayed.chunks), relayed.chars / self.estimate)


@dataclass(eq=False)
class Job:
    """A request holding one of a backend's slots."""

    ask: Ask
    started: float
    queued_s: float = 0.0
    prefill_tokens: int = 0  # its prompt plus those still prefilling when it started
    first_token_at: float | None = None  # streams only
    completion_tokens: int | None = None  # the backend's count (its usage) once it ends; None: not said
    predicted_wait_s: float = 0.0  # what admission expected it to wait for its slot (queued_s is actual)
    # What the stream has relayed so far, read live (the call stage sets it for a stream): what is left
    # of the answer is then its predicted length less the tokens in that (`CharsPerToken`), not a guess
    # from how long it has run.
    produced: Callable[[], Relayed] | None = None
    batch_area: float | None = None  # the backend's batch-seconds when it started: its mean batch at the end


@dataclass
class Waiter:
    ask: Ask
    seq: int
    enqueued: float
    granted: asyncio.Future[None]
    latest_start: float | None = None  # past this its first token is late (None: no objective)
    job: Job | None = None  # set when it is given a slot
    predicted_wait_s: float = 0.0  # in this gateway's queue, as predicted when it joined


def tokens_left(ask: Ask, produced: float) -> float:
    """What is left of a request's predicted answer after `produced` tokens: to its p50; once past that,
    to its p90; past that too, as many again as it has overrun (answer lengths have a heavy tail, and
    "any moment now" would promise slots that stay taken)."""
    if produced < ask.output_tokens:
        return ask.output_tokens - produced
    if produced < ask.output_p90:
        return ask.output_p90 - produced
    return max(1.0, produced - ask.output_p90)


class BackendState:
    """Live state of one backend as this gateway sees it, plus its queue."""

    def __init__(self, config: BackendConfig, breaker: CircuitBreakerConfig | None = None) -> None:
        self.config = config
        self.breaker = CircuitBreaker(breaker or CircuitBreakerConfig())
        self.jobs: set[Job] = set()
        self.waiters: list[Waiter] = []
        self.ttft = TtftModel(config.expected_ttft_ms / 1000)
        self.tpot = Latency(config.expected_tpot_ms / 1000)
        self.decode = DecodeModel(config.expected_tpot_ms / 1000, config.max_concurrent)
        self.wait_error = WaitError()
        self.chars_per_token = CharsPerToken()
        # Predicted outputs of the requests it was recently asked to take: what "long" means for it.
        self.recent_sizes: deque[int] = deque(maxlen=RECENT_SIZES)
        self.errors = 0
        self.served = 0
        self.signals: BackendSignals | None = None
        self.elsewhere = 0  # slots other replicas hold (shared state), as last counted
        # The batch integrated over time (batch-seconds): a finished stream's mean batch is the
        # difference over its life, whatever came and went meanwhile.
        self._area = 0.0
        self._batch = 0.0  # the batch since `_batch_at`
        self._batch_at: float | None = None

    @property
    def in_flight(self) -> int:
        return len(self.jobs)

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def note_batch(self, now: float, batch: float) -> None:
        """The batch is `batch` from `now` on."""
        self._area = self.area_at(now)
        self._batch_at = now if self._batch_at is None else max(now, self._batch_at)
        self._batch = batch

    def area_at(self, now: float) -> float:
        if self._batch_at is None:
            return self._area
        return self._area + self._batch * max(0.0, now - self._batch_at)

    def progress(self, job: Job, now: float) -> tuple[float, float]:
        """(seconds it has been decoding, tokens it has produced): counted for a stream, else estimated
        from the time since its (predicted) first token."""
        per_token = max(self.tpot.estimate_s, 1e-6)
        if job.first_token_at is not None:
            elapsed = max(0.0, now - job.first_token_at)
            if job.produced is not None:
                return elapsed, max(1.0, self.chars_per_token.tokens(job.produced()))
            return elapsed, max(1.0, elapsed / per_token)
        if job.produced is not None:  # a stream still waiting for its first token
            return 0.0, 0.0
        # A whole answer at once: as `service_s` predicts it, its time to first token and then a token
        # every TPOT.
        decoding = now - job.started - self.ttft.estimate_s(max(job.prefill_tokens, job.ask.prompt_tokens))
        if decoding <= 0:
            return 0.0, 0.0
        return decoding, decoding / per_token

    def tokens_in_flight(self, now: float) -> int:
        """Prompts plus predicted remaining output of the requests in flight."""
        total = 0
        for job in self.jobs:
            produced = self.progress(job, now)[1]
            total += job.ask.prompt_tokens + max(0, job.ask.output_tokens - int(produced))
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
        job.batch_area = self.area_at(now)
        self.jobs.add(job)
        return job

    def longer_than_most(self, size: int, quantile: float) -> int | None:
        """The `quantile` of its recent requests' predicted outputs, if `size` is above it (None: not, or
        too few seen yet to say)."""
        if len(self.recent_sizes) < MIN_RECENT_SIZES:
            return None
        ordered = sorted(self.recent_sizes)
        cut = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]
        return cut if size > cut else None

    def service_s(self, ask: Ask) -> float:
        return self.ttft.estimate_s(ask.prompt_tokens) + ask.output_tokens * self.tpot.estimate_s

    def remaining_s(self, job: Job, now: float) -> float:
        """Predicted time until a job in flight ends: its first token if still to come, then what is left
        of its predicted answer (`tokens_left`) counted from the tokens it has produced, so that the
        time it has already run, slower or faster than predicted, is no error of the prediction; at least
        one token's time, since it is still running."""
        per_token = self.tpot.estimate_s
        produced = self.progress(job, now)[1]
        if produced == 0:
            ttft = self.ttft.estimate_s(max(job.prefill_tokens, job.ask.prompt_tokens))
            to_first = max(0.0, job.started + ttft - now)
            return max(to_first + job.ask.output_tokens * per_token, per_token)
        return tokens_left(job.ask, produced) * per_token

    @property
    def utilisation(self) -> float:
        return (self.in_flight + self.elsewhere + self.waiting) / self.config.max_concurrent


@dataclass(frozen=True)
class Outlook:
    """One backend's prediction for one request, in seconds from now: its first token, its wait for a
    slot, and the allowance for how much longer than predicted the queue's recent waits were."""

    state: BackendState
    ttft_s: float
    wait_s: float
    margin_s: float = 0.0

    def fits(self, budget_s: float, max_wait_s: float) -> bool:
        if self.wait_s <= 0:
            return self.ttft_s <= budget_s
        return self.ttft_s + self.margin_s <= budget_s and self.wait_s + self.margin_s <= max_wait_s


def _seen(
    state: BackendState, spilled: bool, ttft_s: float | None = None, wait_s: float | None = None
) -> Placement:
    return Placement(state.config, spilled, state.in_flight, state.waiting, ttft_s, wait_s)


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
            self._batch_changed(state)
            if freed:
                self._grant(state)  # slots other replicas gave back may start this replica's waiters

    # --- the batch ------------------------------------------------------------------------------

    def batch(self, state: BackendState) -> float:
        """Sequences the backend is running: this replica's, other replicas' (shared slots), and, when
        its fresh signals say more, the others' it runs for other clients."""
        own = state.in_flight + state.elsewhere
        signals = state.fresh_signals(self.signals_clock(), self.config.metrics_stale_s)
        return max(float(own), signals.running) if signals is not None else float(own)

    def _batch_changed(self, state: BackendState) -> None:
        state.note_batch(self.clock(), self.batch(state))

    def _start(self, state: BackendState, ask: Ask, now: float, queued_s: float = 0.0) -> Job:
        job = state.start_job(ask, now, queued_s)
        state.note_batch(now, self.batch(state))
        return job

    def _drop(self, state: BackendState, job: Job) -> None:
        state.jobs.discard(job)
        self._batch_changed(state)

    # --- estimates ------------------------------------------------------------------------------

    def _order_key(self, ask: Ask, enqueued: float, seq: float, now: float) -> tuple[float, float, float]:
        """Class first, then shortest predicted output, aged by time waited."""
        aged = ask.output_tokens - self.config.ageing_tokens_per_s * (now - enqueued)
        return (ask.rank, aged, seq)

    def has_room(self, state: BackendState, ask: Ask, now: float) -> bool:
        """A free slot, room for the request's tokens, and a batch it would not push past a time per
        output token objective (an idle backend always has room)."""
        return self._no_room(state, ask, now) is None

    def _no_room(
        self, state: BackendState, ask: Ask, now: float
    ) -> Literal["slots", "tokens", "tpot"] | None:
        """Why the request cannot start on the backend now, or None."""
        if not self.config.enabled:
            return None
        busy = state.in_flight + state.elsewhere
        if busy == 0:
            return None
        if busy >= state.config.max_concurrent:
            return "slots"
        signals = state.fresh_signals(self.signals_clock(), self.config.metrics_stale_s)
        if signals is not None and signals.kv_usage is not None and signals.kv_usage >= 0.98:
            return "tokens"
        limit = state.config.max_tokens_in_flight
        if limit is not None and state.tokens_in_flight(now) + ask.tokens > limit:
            return "tokens"
        if self.tpot_breach(state, ask, now) is not None:
            return "tpot"
        return None

    def tpot_breach(self, state: BackendState, ask: Ask, now: float) -> TpotBreach | None:
        """Whether admitting `ask` now would push a time per output token over its objective: its own, or
        that of a request already running (one that would meet its objective without the newcomer).

        The backend's step time is `state.decode` (a + b x batch). Every sequence decodes one token a
        step, so over the next r tokens of a running request the batch is the external sequences plus
        each of ours for as many of those steps as it has tokens left: the sum of min(r_i, r). The
        newcomer adds itself for min(its predicted length, r) of those steps, and its prefill stalls
        them all once. A long answer therefore weighs on every running request to its end; a short one
        only on the few steps it overlaps. Requests after it are checked against it in their turn.
        """
        slo = ask.tpot_slo_s
        running = [job for job in state.jobs if job.ask.tpot_slo_s is not None]
        if slo is None and not running:
            return None
        a, b = state.decode.a, state.decode.b
        external = max(0.0, self.batch(state) - state.in_flight)
        views = [(job, *state.progress(job, now)) for job in state.jobs]
        lefts = sorted(tokens_left(job.ask, produced) for job, _, produced in views)
        prefix = list(itertools.accumulate(lefts, initial=0))

        def overlap(r: float) -> float:  # sum over our running requests of min(r_i, r)
            k = bisect.bisect_right(lefts, r)
            return prefix[k] + r * (len(lefts) - k)

        length = max(1, ask.output_tokens)
        if slo is not None:
            own = a + b * (1 + external + overlap(length) / length)
            if own > slo:
                return TpotBreach(own, slo, "own")
        stall = state.ttft.estimate_s(ask.prompt_tokens)
        for job, elapsed, produced in views:
            job_slo = job.ask.tpot_slo_s
            if job_slo is None:
                continue
            left = tokens_left(job.ask, produced)
            tokens = max(1, produced + left - 1)  # TPOT counts the tokens after the first
            decode_s = elapsed + a * left + b * (overlap(left) + external * left)
            before = decode_s / tokens
            after = (decode_s + b * min(length, left) + stall) / tokens
            if before <= job_slo < after:
                return TpotBreach(after, job_slo, "running")
        return None

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
        blocked = self._no_room(state, order[0], now) if order and ends else None
        if blocked == "tpot":
            # The batch is as large as the objective allows: a newcomer takes the slot of the next to
            # end, not one of the slots `max_concurrent` has left.
            slots = list(ends)
        else:
            # A free slot is usable now only if the tokens in flight and the KV cache allow; else at the
            # next end.
            slots = ends + [0.0 if blocked is None else ends[0]] * (cap - len(ends))
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
        objective that would break: a request told it can wait is not overtaken into missing. "Break"
        allows for the queue's recent misses (`WaitError`), as the waiter's own admission did: predicted
        lengths are what put a newcomer ahead, and a waiter overtaken on a prediction that was short
        then waits longer than predicted (docs/admission.md, "Overtaking").
        """
        waiters = state.waiters
        key = self._order_key(ask, now, math.inf, now)  # after equals already waiting
        pos = next(
            (i for i, w in enumerate(waiters) if key < self._order_key(w.ask, w.enqueued, w.seq, now)),
            len(waiters),
        )
        asks = [w.ask for w in waiters]
        before = self._starts(state, asks, now)
        margin = state.wait_error.margin_s(self.config.wait_quantile, now)
        while True:
            starts = self._starts(state, [*asks[:pos], ask, *asks[pos:]], now)
            broken = [
                i
                for i in range(pos, len(waiters))
                if (latest := waiters[i].latest_start) is not None
                and now + starts[i + 1] + margin > latest >= now + before[i]
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
        return self._outlook(state, ask, now).ttft_s

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
        there is room (`has_room`: slots, tokens, TPOT objectives); else the candidate with the earliest
        predicted first token, if it meets the objective with the queue's allowance for its misses and
        the wait is within `max_queue_wait_s`; else a spill candidate that does; else refuse, at
        arrival. Without an objective, the least utilised candidate, as before.
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

        def on(s: BackendState) -> Ask:  # the request as sized for that backend
            return ask.on(s.config.name)

        for s in states:
            s.recent_sizes.append(on(s).output_tokens)

        free = [
            s
            for s in states
            if not s.waiters
            and self.has_room(s, on(s), now)
            # A busy backend whose prefill backlog would make the first token late is not free.
            and (budget is None or s.in_flight == 0 or self.first_token_s(s, on(s), 0.0, now) <= budget)
        ]
        if free:
            return _seen(min(free, key=lambda s: s.utilisation), False)
        if budget is None:
            return _seen(min(states, key=lambda s: s.utilisation), False)
        best = min((self._outlook(s, on(s), now) for s in states), key=lambda o: o.ttft_s)
        shed = None
        if best.fits(budget, self.config.max_queue_wait_s) and best.state.waiting < self.config.max_queue:
            placed = _seen(best.state, False, best.ttft_s, best.wait_s)
            shed = self._shed(placed, on(best.state))
            if shed is None:
                return placed
        spill_states = [self.states[b.name] for b in spill]
        if spill_states:
            other = min((self._outlook(s, on(s), now) for s in spill_states), key=lambda o: o.ttft_s)
            o = other.state
            has_place = o.waiting < self.config.max_queue or self.has_room(o, on(o), now)
            if other.fits(budget, self.config.max_queue_wait_s) and has_place:
                placed = _seen(o, True, other.ttft_s, other.wait_s)
                long_there = self._shed(placed, on(o))
                if long_there is None:
                    return placed
                shed = shed or long_there
        raise shed or self._refusal(best, on(best.state), budget, now)

    def _shed(self, placed: Placement, ask: Ask) -> AdmissionRefused | None:
        """The refusal for a request that would wait for a slot while `shed_long_quantile` says its answer
        is one of the longest the backend is asked for (the longest first under load), else None. Shedding
        serves objectives: a request without one is never told to wait (no `wait_s`), and a class ranked ahead
        of the default one may wait as before."""
        quantile = self.config.shed_long_quantile
        if quantile is None or not placed.wait_s or placed.wait_s <= 0:
            return None
        if ask.rank < self.config.default_rank:
            return None
        cut = self.states[placed.backend.name].longer_than_most(ask.output_tokens, quantile)
        if cut is None:
            return None
        name = placed.backend.name
        return AdmissionRefused(
            name,
            max(1.0, math.ceil(placed.wait_s)),
            f"backend {name} is saturated and this request's predicted answer ({ask.output_tokens} tokens) "
            f"is longer than {quantile:.0%} of its recent requests' ({cut}); under load the longest are "
            "refused first (admission.shed_long_quantile)",
            predicted_wait_s=placed.wait_s,
        )

    def _outlook(self, state: BackendState, ask: Ask, now: float) -> Outlook:
        wait = self.wait_s(state, ask, now)
        margin = state.wait_error.margin_s(self.config.wait_quantile, now) if wait > 0 else 0.0
        return Outlook(state, wait + self.first_token_s(state, ask, wait, now), wait, margin)

    def _refusal(self, best: Outlook, ask: Ask, budget: float, now: float) -> AdmissionRefused:
        state = best.state
        name = state.config.name
        retry = max(1.0, math.ceil(best.ttft_s + best.margin_s - max(budget, 0.0)))
        if state.waiting >= self.config.max_queue:
            reason = f"backend {name} has {state.waiting} requests queued (the limit)"
        else:
            predicted = f"predicted {best.ttft_s * 1000:.0f} ms"
            if best.margin_s > 0:
                predicted += f", {best.margin_s * 1000:.0f} ms more for the queue's recent misses"
            reason = (
                f"backend {name} cannot start this request within its time-to-first-token "
                f"objective ({(ask.ttft_slo_s or 0) * 1000:.0f} ms; {predicted})"
            )
            in_time = best.ttft_s + best.margin_s <= budget
            if in_time and best.wait_s + best.margin_s > self.config.max_queue_wait_s:
                wait = f"{self.config.max_queue_wait_s:g} s; predicted {best.wait_s:.1f} s"
                reason = f"backend {name} cannot start this request within max_queue_wait_s ({wait})"
            if self._no_room(state, ask, now) == "tpot":
                breach = self.tpot_breach(state, ask, now)
                if breach is not None:
                    reason += f"; taking it now would break {breach.describe()}"
        return AdmissionRefused(name, retry, reason, predicted_wait_s=best.wait_s)

    # --- holding a slot -------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(self, backend: BackendConfig, ask: Ask) -> AsyncIterator[Job]:
        """Wait for a slot (bounded by the objective and `max_queue_wait_s`), hold it for the call.

        Yields the `Job`, whose `first_token_at`, `completion_tokens` and, for a stream, `produced` the
        caller fills in; they become the backend's measured time to first token and time per output
        token, and tell admission how far along the request is.
        """
        ask = ask.on(backend.name)
        state = self.states[backend.name]
        if not self.config.enabled:
            job = self._start(state, ask, self.clock())
            try:
                yield job
            finally:
                self._finish(state, job)
            return
        now = self.clock()
        if state.waiters or not self.has_room(state, ask, now):
            job = await self._queue(state, ask, now)
        else:
            job = self._start(state, ask, now)
        owner = None
        if self.shared is not None:
            try:
                owner = await self._shared_slot(state, ask, job)
            except BaseException:  # refused or cancelled while waiting for a shared slot: it never ran
                self._drop(state, job)
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
                stage="queued",
                predicted_wait_s=job.predicted_wait_s,
                waited_s=job.queued_s + self.clock() - now,
            )
        started = self.clock()
        job.queued_s += started - now
        job.started = started  # its time to first token counts from here
        job.batch_area = state.area_at(started)
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
        predicted = start - self._external_s(state, ask)  # this gateway's queue: what `queued_s` measures
        latest = self._latest_start(state, ask, start, predicted, now)
        future = asyncio.get_running_loop().create_future()
        waiter = Waiter(ask, next(self._seq), now, future, latest_start=latest, predicted_wait_s=predicted)
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
            later = self.clock()
            state.wait_error.add(predicted, later - now, later)  # a lower bound: it would have waited longer
            raise self._too_late(state, waiter, later) from None
        except BaseException:
            # Cancelled (the client left): give up the place, or the slot it was just given.
            if waiter.job is not None:
                self._drop(state, waiter.job)
            elif waiter in state.waiters:
                state.waiters.remove(waiter)
            elif waiter.granted.done():
                waiter.granted.exception()  # refused meanwhile: nobody else will read it
            self._grant(state)
            raise
        assert waiter.job is not None
        return waiter.job

    def _latest_start(
        self, state: BackendState, ask: Ask, start: float, predicted: float, now: float
    ) -> float | None:
        """Past this, the first token would come too late even if the slot came then (None: no objective).
        Refuses at once a request that would only give up at its deadline: `decide` already does for the
        requests it places; this is for a fallback, placed without it."""
        budget = ask.budget_s(now, self.config.ttft_margin)
        if budget is None:
            return None
        latest = now + budget - self.first_token_s(state, ask, start, now)
        margin = state.wait_error.margin_s(self.config.wait_quantile, now) if start > 0 else 0.0
        if now + start + margin > latest or start + margin > self.config.max_queue_wait_s:
            raise AdmissionRefused(
                state.config.name,
                max(1.0, math.ceil(now + start + margin - latest)),
                f"backend {state.config.name} cannot start this request within its time-to-first-token "
                f"objective ({(ask.ttft_slo_s or 0) * 1000:.0f} ms; predicted wait {start * 1000:.0f} ms)",
                predicted_wait_s=predicted,
            )
        return latest

    def _grant(self, state: BackendState) -> None:
        """Give free slots to the head of the queue; a granted waiter's job counts in flight at once."""
        now = self.clock()
        while state.waiters and self.has_room(state, state.waiters[0].ask, now):
            head = state.waiters.pop(0)
            state.wait_error.add(head.predicted_wait_s, now - head.enqueued, now)
            budget = head.ask.budget_s(now, self.config.ttft_margin)
            if budget is not None and self.first_token_s(state, head.ask, 0.0, now) > budget:
                # The prompts prefilling ahead of it would make its first token late: refuse it now
                # rather than admit a miss, and give the slot to the next.
                head.granted.set_exception(self._too_late(state, head, now))
                continue
            head.job = self._start(state, head.ask, now, queued_s=now - head.enqueued)
            head.job.predicted_wait_s = head.predicted_wait_s
            head.granted.set_result(None)

    def _too_late(self, state: BackendState, waiter: Waiter, now: float) -> AdmissionRefused:
        return AdmissionRefused(
            state.config.name,
            max(1.0, math.ceil(self.wait_s(state, waiter.ask, now))),
            f"backend {state.config.name} is at capacity ({state.config.max_concurrent} in flight) "
            f"and the request could not start in time",
            stage="queued",
            predicted_wait_s=waiter.predicted_wait_s,
            waited_s=now - waiter.enqueued,
        )

    def _finish(self, state: BackendState, job: Job) -> None:
        now = self.clock()
        self._drop(state, job)
        state.served += 1
        if job.first_token_at is not None:
            state.ttft.add(job.prefill_tokens, job.first_token_at - job.started)
        tokens = job.completion_tokens
        if job.produced is not None:  # a stream: its text, against the backend's count if it gave one
            relayed = job.produced()
            if tokens:
                state.chars_per_token.add(relayed.chars, tokens)
            else:
                tokens = round(state.chars_per_token.tokens(relayed))
        if not tokens:
            return
        # The batch it ran in, on average over its life (its own place included).
        batch = self.batch(state) + 1
        if job.batch_area is not None and now > job.started:
            batch = (state.area_at(now) - job.batch_area) / (now - job.started)
        if job.first_token_at is not None:
            if tokens > 1 and job.first_token_at < now:
                tpot = (now - job.first_token_at) / (tokens - 1)
                state.tpot.add(tpot)
                state.decode.add(batch, tpot)
        else:  # a whole answer at once: what is left after the usual first token, per token
            decode = now - job.started - state.ttft.estimate_s(job.prefill_tokens)
            if decode > 0:
                state.tpot.add(decode / tokens)
                state.decode.add(batch, decode / tokens)

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
        state = self.states[backend]
        state.signals = signals
        self._batch_changed(state)

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
                # The decode model: time per output token = base + per_seq x batch.
                "batch": self.batch(s),
                "decode_base_ms": s.decode.a * 1000,
                "decode_per_seq_ms": s.decode.b * 1000,
                # How much longer than predicted requests waited in its queue (mean; the margin added).
                "wait_error_ms": None if (bias := s.wait_error.bias_s(now)) is None else bias * 1000,
                "wait_margin_ms": s.wait_error.margin_s(self.config.wait_quantile, now) * 1000,
                # How a stream's relayed text is counted in tokens (`CharsPerToken`).
                "chars_per_token": s.chars_per_token.estimate,
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
