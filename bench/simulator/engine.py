"""A continuous-batching engine that costs time the way vLLM does, without a model.

One loop task owns the batch. Each iteration it admits waiting sequences in
FCFS order while a batch slot and KV capacity are free (a sequence reserves
`prompt_tokens + max_tokens` KV tokens for its whole life, so admission never
has to preempt), charges their prefill, which ends with their first token, then
runs one decode step in which every sequence that was already running gains a
token. Time is spent with `asyncio.sleep`, so a single process can simulate a
GPU server's latency and throughput while the gateway in front of it is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

# How far behind its own schedule the loop may fall before it stops catching up.
# Sleeps overshoot by a fraction of a millisecond, so the loop keeps a schedule
# (each step starts when the previous one was due to end) and only resets it
# after a real stall, when catching up would compress the following steps.
_MAX_LAG_S = 0.05


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and cost model of one simulated backend.

    Prefill of a request costs `prefill_ms_base + prefill_ms_per_token * prompt_tokens`.
    A decode step costs `decode_ms_base + decode_ms_per_seq * batch_size`, so the
    time per output token (TPOT) grows with the batch while throughput still rises.
    `max_prefill_tokens` caps the prompt tokens admitted in one iteration (vLLM's
    `max_num_batched_tokens`), so a burst is prefilled over several steps instead
    of one long stall; the first waiting request is always admitted if it fits.
    """

    max_num_seqs: int = 32
    kv_cache_tokens: int = 65_536
    prefill_ms_per_token: float = 0.02
    prefill_ms_base: float = 2.0
    decode_ms_base: float = 8.0
    decode_ms_per_seq: float = 0.5
    default_max_tokens: int = 256
    max_prefill_tokens: int = 8192

    PRESETS: ClassVar[tuple[str, ...]] = ("small", "large")

    @classmethod
    def small(cls, **overrides: Any) -> EngineConfig:
        """A fast backend (think a 7-8B model on one GPU).

        With the Azure conversation mix (prompt mean 1155, output mean 211 tokens)
        a request reserves ~1.4k KV tokens, so 64k tokens hold ~47 of them and the
        32 batch slots are the limit. A full batch decodes in 8 + 0.5 * 32 = 24 ms
        (TPOT 24 ms, against 8.5 ms alone): 32 / 24 ms = 1333 tokens/s, ~6.3
        requests/s of 211 tokens, minus ~25 ms of prefill per request. Measured at
        saturation with that mix (48 closed-loop clients): ~6 requests/s, ~1.1k output
        tokens/s, median TPOT 28 ms (prefill steps stall the batch, as without chunked prefill).
        """
        return replace(cls(), **overrides)

    @classmethod
    def large(cls, **overrides: Any) -> EngineConfig:
        """A slower, bigger backend (think a 70B model on a few GPUs).

        48k KV tokens hold ~35 conversation requests, so KV starts to bind before
        the 32 slots when prompts run long. A full batch decodes in
        20 + 1.5 * 32 = 68 ms (TPOT 68 ms, against 21.5 ms alone): ~470 tokens/s,
        ~2.2 requests/s, minus ~100 ms of prefill per request. Measured at saturation:
        ~1.9 requests/s, ~350 output tokens/s, median TPOT 79 ms.
        """
        base = cls(
            max_num_seqs=32,
            kv_cache_tokens=49_152,
            prefill_ms_per_token=0.08,
            prefill_ms_base=5.0,
            decode_ms_base=20.0,
            decode_ms_per_seq=1.5,
        )
        return replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngineConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}, expected one of {cls.PRESETS}")
        factory = cls.small if name == "small" else cls.large
        return factory(**overrides)

    def prefill_ms(self, prompt_tokens: int) -> float:
        return self.prefill_ms_base + self.prefill_ms_per_token * prompt_tokens

    def decode_step_ms(self, batch_size: int) -> float:
        return self.decode_ms_base + self.decode_ms_per_seq * batch_size


class RequestTooLarge(ValueError):
    """The request could never fit in the KV cache, so queueing it would block everyone behind it."""


@dataclass(eq=False)
class Sequence:
    """One request in the engine: the server reads `generated` as it grows.

    Timestamps are `time.monotonic()` seconds, kept for tests and benchmarks.
    """

    id: int
    prompt_tokens: int
    max_tokens: int
    arrived_at: float
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    generated: int = 0
    aborted: bool = False
    # The answer ends by itself at `max_tokens` (an out-of-band true length) rather than being cut there.
    natural_end: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def finish_reason(self) -> str:
        if self.aborted:
            return "abort"
        return "stop" if self.natural_end else "length"

    async def wait_progress(self, seen: int) -> int:
        """Wait until more than `seen` tokens exist or the sequence is done; return the count."""
        while self.generated <= seen and not self._done.is_set():
            self._changed.clear()
            await self._changed.wait()
        return self.generated

    async def wait_done(self) -> None:
        await self._done.wait()

    def _advance(self, now: float) -> None:
        if self.generated == 0:
            self.first_token_at = now
        self.generated += 1
        self._changed.set()

    def _finish(self, now: float, aborted: bool = False) -> None:
        self.finished_at = now
        self.aborted = aborted
        self._done.set()
        self._changed.set()


class Engine:
    """The scheduler and its counters; `start()` must run inside the serving event loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_used = 0
        self.max_running_seen = 0
        self.requests_served = 0
        self.requests_aborted = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps = 0
        self.finished: deque[Sequence] = deque(maxlen=10_000)  # recent sequences, for tests
        self._ids = itertools.count(1)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        now = time.monotonic()
        for seq in [*self.running, *self.waiting]:
            seq._finish(now, aborted=True)
        self.running.clear()
        self.waiting.clear()
        self.kv_used = 0

    # --- requests --------------------------------------------------------

    def submit(
        self, prompt_tokens: int, max_tokens: int | None = None, natural_end: bool = False
    ) -> Sequence:
        max_tokens = self.config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if prompt_tokens + max_tokens > self.config.kv_cache_tokens:
            raise RequestTooLarge(
                f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) tokens exceed the KV cache "
                f"({self.config.kv_cache_tokens} tokens)"
            )
        if self._wake is None:
            raise RuntimeError("engine not started")
        seq = Sequence(
            next(self._ids), prompt_tokens, max_tokens, arrived_at=time.monotonic(), natural_end=natural_end
        )
        self.waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (its client went away), freeing its slot and KV reservation."""
        if seq.done:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used -= seq.kv_tokens
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.requests_aborted += 1
        seq._finish(time.monotonic(), aborted=True)
        if self._wake is not None:
            self._wake.set()

    # --- counters --------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.kv_used / self.config.kv_cache_tokens

    # --- scheduling ------------------------------------------------------

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch, FCFS, stopping at the first that does not fit."""
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.kv_used + seq.kv_tokens > self.config.kv_cache_tokens:
                break
            if admitted and seq.prompt_tokens > budget:
                break
            self.waiting.popleft()
            budget -= seq.prompt_tokens
            self.kv_used += seq.kv_tokens
            self.running.append(seq)
            seq.admitted_at = time.monotonic()
            admitted.append(seq)
        self.max_running_seen = max(self.max_running_seen, len(self.running))
        return admitted

    def _emit(self, seqs: list[Sequence]) -> None:
        """Give each still-running sequence in `seqs` one token and retire the finished ones."""
        now = time.monotonic()
        for seq in seqs:
            if seq.done:  # aborted while the step ran
                continue
            seq._advance(now)
            self.generation_tokens_total += 1
            if seq.generated >= seq.max_tokens:
                self.running.remove(seq)
                self.kv_used -= seq.kv_tokens
                self.requests_served += 1
                seq._finish(now)
                self.finished.append(seq)

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        due = loop.time()

        async def spend(ms: float) -> None:
            nonlocal due
            now = loop.time()
            if now - due > _MAX_LAG_S:
                due = now
            due += ms / 1000.0
            await asyncio.sleep(max(0.0, due - loop.time()))

        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
                continue
            decoding = list(self.running)
            admitted = self._admit()
            if not decoding and not admitted:
                # The head of the queue cannot fit yet nothing runs: only an abort can change that.
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
                continue
            self.steps += 1
            if admitted:
                self.prompt_tokens_total += sum(s.prompt_tokens for s in admitted)
                await spend(sum(self.config.prefill_ms(s.prompt_tokens) for s in admitted))
                self._emit(admitted)
            decoding = [s for s in decoding if not s.done]
            if decoding:
                await spend(self.config.decode_step_ms(len(decoding)))
                self._emit(decoding)
