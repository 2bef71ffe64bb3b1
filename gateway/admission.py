"""Which backend of a tier takes a request, and whether it can take it now.

This is the foundation's admission: a per-backend concurrency limit with a
bounded wait, choosing the least loaded backend of the tier. The load-aware
admission issue replaces the decision with one that uses predicted lengths and
latency objectives, behind the same `admit` call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.config import BackendConfig


@dataclass
class BackendLoad:
    """Live state of one backend as the gateway sees it."""

    backend: BackendConfig
    in_flight: int = 0
    waiting: int = 0

    @property
    def utilisation(self) -> float:
        return (self.in_flight + self.waiting) / self.backend.max_concurrent


class AdmissionRefused(Exception):
    def __init__(self, backend: str, retry_after_s: float, reason: str) -> None:
        super().__init__(reason)
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.reason = reason


class BackendPool:
    """Holds every backend's load and its concurrency slots."""

    def __init__(self, backends: list[BackendConfig], max_queue_wait_s: float) -> None:
        self.loads = {b.name: BackendLoad(b) for b in backends}
        self._slots = {b.name: asyncio.Semaphore(b.max_concurrent) for b in backends}
        self.max_queue_wait_s = max_queue_wait_s

    def choose(self, candidates: list[BackendConfig]) -> BackendConfig:
        """The least utilised candidate (ties: policy order)."""
        return min(candidates, key=lambda b: self.loads[b.name].utilisation)

    @asynccontextmanager
    async def admit(self, backend: BackendConfig) -> AsyncIterator[float]:
        """Hold one of the backend's slots for the duration; yields the seconds spent waiting."""
        load = self.loads[backend.name]
        slots = self._slots[backend.name]
        started = time.perf_counter()
        load.waiting += 1
        try:
            if slots.locked():
                async with asyncio.timeout(self.max_queue_wait_s):
                    await slots.acquire()
            else:
                await slots.acquire()  # a free slot: never refuse, even with a zero wait
        except TimeoutError:
            raise AdmissionRefused(
                backend.name,
                retry_after_s=max(1.0, math.ceil(self.max_queue_wait_s)),
                reason=f"backend {backend.name} is at capacity ({backend.max_concurrent} in flight)",
            ) from None
        finally:
            load.waiting -= 1
        load.in_flight += 1
        try:
            yield time.perf_counter() - started
        finally:
            load.in_flight -= 1
            slots.release()
