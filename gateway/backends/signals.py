"""Polls backends' own load signals (vLLM's Prometheus `/metrics`) for admission.

A backend shared with other clients can be busier than this gateway's own count says; vLLM tells
how many requests it is running and holding, and how full its KV cache is. A reading older than
`admission.metrics_stale_s` is ignored (see `BackendState.fresh_signals`), so a backend whose
metrics stop answering falls back to the gateway's own view.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from icgate.gateway.backends.admission import Admission, BackendSignals
from icgate.gateway.config import BackendConfig

log = logging.getLogger("icgate.admission")

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")


def parse_vllm_metrics(text: str, read_at: float) -> BackendSignals | None:
    """The three signals from a Prometheus text page (summed over models); None if it has none."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (WAITING, RUNNING, *KV_USAGE):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    if WAITING not in values and RUNNING not in values:
        return None
    kv = next((values[k] for k in KV_USAGE if k in values), None)
    return BackendSignals(values.get(WAITING, 0.0), values.get(RUNNING, 0.0), kv, read_at)


class SignalPoller:
    """One task polling every backend that has a `metrics_url`."""

    def __init__(self, backends: list[BackendConfig], admission: Admission, interval_s: float) -> None:
        self.backends = [b for b in backends if b.metrics_url]
        self.admission = admission
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.backends and self._task is None:
            self._task = asyncio.create_task(self._run(), name="icgate-backend-signals")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def poll_once(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._poll(client, b) for b in self.backends))

    async def _poll(self, client: httpx.AsyncClient, backend: BackendConfig) -> None:
        assert backend.metrics_url is not None
        try:
            response = await client.get(backend.metrics_url)
            response.raise_for_status()
            signals = parse_vllm_metrics(response.text, time.monotonic())
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("backend %s: metrics unavailable (%s)", backend.name, type(exc).__name__)
            return
        if signals is not None:
            self.admission.note_signals(backend.name, signals)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.interval_s) as client:
            while True:
                await self.poll_once(client)
                await asyncio.sleep(self.interval_s)
