"""Per-request records: who asked (`Tenant`), the request as it goes (`RequestContext`), and what is
logged of it (`RequestRecord`).

`RequestContext` carries what accumulates over a request (the backend that answered, timings, token
counts, status). Stages pass their decisions to each other as typed outcomes, not through it;
`ctx.decisions` is their explanation, written by `gateway.pipeline.explain`, which the response
headers, the request log, the metrics and the trace all read.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

from icgate.gateway.config import BackendConfig
from icgate.text import estimate_prompt_tokens

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class Tenant:
    id: int | None
    name: str
    api_key_id: int | None = None


ANONYMOUS = Tenant(id=None, name="anonymous")


def namespace_for(tenant: Tenant) -> str:
    """One cache namespace per tenant: entries, scores and timing never cross it."""
    return f"tenant:{tenant.id}" if tenant.id is not None else "anonymous"


@dataclass
class RequestContext:
    endpoint: Endpoint
    # The validated request body, unknown fields included (they pass through).
    body: dict[str, Any]
    tenant: Tenant = ANONYMOUS
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:24]}")
    arrived: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    route: str | None = None  # cache | small | large | <tier>
    backend: BackendConfig | None = None
    fallback_from: str | None = None  # backend that failed before the fallback served
    decisions: dict[str, Any] = field(default_factory=dict)
    # Time spent waiting on backends (and in admission queues); the rest of the
    # wall time is the gateway's own overhead.
    backend_s: float = 0.0
    queue_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status_code: int = 200
    error_type: str | None = None
    # The answer as it streamed by, for storing it once the stream ends; its characters, counted as
    # they pass (admission reads them live); whether the backend's usage gave `completion_tokens`.
    output_parts: list[str] = field(default_factory=list)
    output_chars: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None
    overhead_frozen_ms: float | None = None
    total_frozen_ms: float | None = None

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", False))

    @cached_property
    def prompt_estimate(self) -> int:
        """The prompt's tokens at four characters a token (`icgate.text.estimate_prompt_tokens`), once per
        request: the quotas, the route stage and a cut stream's bill all read it. The body the client
        sent never changes (examples go into a copy)."""
        return estimate_prompt_tokens(self.body, self.endpoint)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.arrived

    def overhead_ms(self) -> float:
        """Wall time so far minus backend and queue time; fixed once the answer is decided.

        The backend time is the wait for the backend's answer as the event loop saw it: when the loop
        is busy, an answer that has arrived waits for it, and that wait counts as backend time. So under
        load this is the gateway's own work, not all the time it added; `total_ms` is what it added
        and the backend took together, as a client would measure it at the gateway's door.
        """
        if self.overhead_frozen_ms is not None:
            return self.overhead_frozen_ms
        return self._overhead_ms(self.elapsed_s())

    def _overhead_ms(self, total_s: float) -> float:
        return max(0.0, (total_s - self.backend_s - self.queue_s) * 1000.0)

    def total_ms(self) -> float:
        """Wall time from arrival until the answer (or a stream's first chunk) was in hand."""
        if self.total_frozen_ms is not None:
            return self.total_frozen_ms
        return self.elapsed_s() * 1000.0

    def freeze_overhead(self) -> None:
        """Called when the answer (or a stream's first chunk) is in hand: what follows is delivery,
        and the header, the log and the metrics must all show the same number."""
        if self.overhead_frozen_ms is None:
            total_s = self.elapsed_s()  # once: the two numbers add up exactly
            self.total_frozen_ms = total_s * 1000.0
            self.overhead_frozen_ms = self._overhead_ms(total_s)

    def cost_usd(self) -> float:
        if self.backend is None:
            return 0.0
        return self.backend.cost_usd(self.prompt_tokens, self.completion_tokens)


@dataclass(frozen=True)
class RequestBodies:
    """A request's prompt and answer as stored (`request_log.store_bodies`): PII scrubbed, bounded."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class RequestRecord:
    """One row of the request log: what happened to one request."""

    request_id: str
    created_at: datetime
    tenant_id: int | None
    api_key_id: int | None
    endpoint: str
    model_requested: str
    route: str | None
    backend: str | None
    fallback_from: str | None
    stream: bool
    status_code: int
    error_type: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    overhead_ms: float
    queue_ms: float
    decisions: dict[str, Any]
    # Written to their own table (`request_bodies`), in the same transaction as the row; None unless the
    # policy stores bodies. Keyword-only, so that a row read back (`LogRow`) keeps its positional fields.
    bodies: RequestBodies | None = field(default=None, kw_only=True)

    @classmethod
    def from_context(cls, ctx: RequestContext, bodies: RequestBodies | None = None) -> RequestRecord:
        return cls(
            request_id=ctx.request_id,
            created_at=ctx.created_at,
            tenant_id=ctx.tenant.id,
            api_key_id=ctx.tenant.api_key_id,
            endpoint=ctx.endpoint,
            model_requested=ctx.model,
            route=ctx.route,
            backend=ctx.backend.name if ctx.backend else None,
            fallback_from=ctx.fallback_from,
            stream=ctx.stream,
            status_code=ctx.status_code,
            error_type=ctx.error_type,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            cost_usd=ctx.cost_usd(),
            latency_ms=ctx.elapsed_s() * 1000.0,
            overhead_ms=ctx.overhead_ms(),
            queue_ms=ctx.queue_s * 1000.0,
            decisions=ctx.decisions,
            bodies=bodies,
        )
