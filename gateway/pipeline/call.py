"""Stage 7, call: admit and call the chosen backend; on a retryable failure, once more on the fallback.

Each attempt holds an admission slot (the caller keeps it until the answer, or the stream, is done),
gets the body augmented for its backend's tier, and is bounded: a stream by its time to first chunk, a
whole answer by the backend's `timeout_s`, both by what is left of the request's budget (two hung
backends must not double the wait). Backends whose circuit is open are skipped; a client's error is not
retried and does not count against the backend. See docs/backends.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from icgate.gateway.backends.admission import (
    Admission,
    AdmissionRefused,
    Ask,
    BackendUnavailable,
    Job,
    Relayed,
)
from icgate.gateway.backends.client import BackendClient, BackendError
from icgate.gateway.config import BackendConfig, Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.admit import refusal, unavailable
from icgate.gateway.pipeline.augment import Augmented, augment
from icgate.gateway.pipeline.cache_lookup import CacheLookup
from icgate.gateway.pipeline.target import Target
from icgate.gateway.records import RequestContext
from icgate.gateway.store.cache_entries import CacheEntries
from icgate.gateway.telemetry import Telemetry

log = logging.getLogger("icgate.pipeline")
T = TypeVar("T")
R = TypeVar("R")
Chunk = dict[str, Any]
OpenStream = tuple[Chunk, AsyncGenerator[Chunk, None]]


@dataclass(frozen=True)
class CallPlan:
    """Where the request may go and what admission is asked, from the route and admit stages."""

    target: Target
    candidates: list[BackendConfig]
    spill: list[BackendConfig]
    ask: Ask
    lookup: CacheLookup | None


@dataclass(frozen=True)
class Called(Generic[R]):
    result: R
    examples: list[int]  # the cache entries prepended to the attempt that answered


def backend_failure(err: BackendError) -> GatewayError:
    """A backend failure the client is not to blame for, once nothing else is left to try."""
    if err.status_code == 429:
        return GatewayError(
            429, str(err), type="rate_limit_error", code="backend_rate_limited", headers={"retry-after": "1"}
        )
    status = 504 if err.kind == "timeout" else 502
    return GatewayError(status, str(err), type="server_error", code="backend_error")


class Caller:
    """The call stage, with what it needs for every request."""

    def __init__(
        self,
        policy: Policy,
        client: BackendClient,
        admission: Admission,
        telemetry: Telemetry,
        entries: CacheEntries | None,
    ) -> None:
        self.policy = policy
        self.client = client
        self.admission = admission
        self.telemetry = telemetry
        self.entries = entries

    async def complete(self, ctx: RequestContext, plan: CallPlan, exits: AsyncExitStack) -> Called[Chunk]:
        def complete(backend: BackendConfig, body: dict[str, Any]) -> Awaitable[Chunk]:
            return self.client.complete(backend, ctx.endpoint, body)

        return await self._attempts(ctx, plan, exits, complete)

    async def open_stream(
        self, ctx: RequestContext, plan: CallPlan, exits: AsyncExitStack
    ) -> Called[OpenStream]:
        """Open the stream and pull its first chunk, so failures can still fall back."""

        async def open_and_peek(backend: BackendConfig, body: dict[str, Any]) -> OpenStream:
            chunks = await self.client.stream(backend, ctx.endpoint, body)
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = {}
            except BaseException:
                await chunks.aclose()
                raise
            return first, chunks

        return await self._attempts(ctx, plan, exits, open_and_peek)

    async def _attempts(
        self,
        ctx: RequestContext,
        plan: CallPlan,
        exits: AsyncExitStack,
        call: Callable[[BackendConfig, dict[str, Any]], Awaitable[T]],
    ) -> Called[T]:
        metrics = self.telemetry.metrics
        deadline = ctx.arrived + self.policy.request_budget_s()
        backend, spilled, tries = self._place(ctx, plan)
        role = "fallback" if tries == 1 else "spill" if spilled else "first"
        while True:
            tries -= 1
            slot = AsyncExitStack()
            took, queued = ctx.backend_s, 0.0  # this attempt's backend time is what it adds to backend_s
            try:
                with self.telemetry.tracing.stage_span("admit"):
                    job = await slot.enter_async_context(self.admission.hold(backend, plan.ask))
                queued = job.queued_s
                ctx.queue_s += queued
                slot.enter_context(metrics.backend_inflight(backend.name))
                # The answer's size, for the backend's measured time per output token; for a stream, its
                # tokens so far, for how far along it is (admission's predicted ends and TPOTs).
                slot.callback(_note_output, ctx, job)
                if ctx.stream:
                    job.produced = partial(_streamed, ctx)
                ctx.backend = backend
                explain.admitted(ctx, backend, job.predicted_wait_s, job.ask.output_tokens)
                metrics.admission(backend.name, "spilled" if spilled else "admitted")
                own = backend.first_byte_timeout_s(plan.ask.ttft_slo_s) if ctx.stream else backend.timeout_s
                limit = max(0.0, min(own, deadline - time.perf_counter()))
                result, examples = await self._call_once(ctx, plan, backend, limit, call)
                explain.attempt(ctx, backend, role, ctx.backend_s - took, queued)
                self.admission.backend_succeeded(backend)
                if ctx.stream:
                    job.first_token_at = time.perf_counter()
                # The slot stays held until the caller is done (a stream holds it to the end).
                exits.push_async_exit(slot)
                return Called(result, examples)
            except AdmissionRefused as refused:
                await slot.aclose()
                ctx.queue_s += refused.waited_s  # queueing, not the gateway's own work (overhead_ms)
                self.admission.backend_neutral(backend)
                metrics.admission(refused.backend, "refused")
                explain.refused(ctx, refused)
                explain.attempt(ctx, backend, role, 0.0, refused=refused.reason)
                raise refusal(refused) from None
            except BackendError as err:
                await slot.aclose()
                explain.attempt(ctx, backend, role, ctx.backend_s - took, queued, error=err)
                fallback = self._after_failure(ctx, plan.target, backend, err, tries > 0, deadline)
                if fallback is None:
                    raise backend_failure(err) from None
                backend, role = fallback, "fallback"
            except BaseException:
                # Cancelled (the client left) or a bug: the slot is given back, the backend not blamed.
                await slot.aclose()
                self.admission.backend_neutral(backend)
                raise

    def _place(self, ctx: RequestContext, plan: CallPlan) -> tuple[BackendConfig, bool, int]:
        """The first backend to try, whether admission spilled the request to another tier, and how many
        attempts are left (the first and one fallback; none left when the first is already a fallback)."""
        metrics = self.telemetry.metrics
        try:
            placed = self.admission.decide(plan.ask, plan.candidates, plan.spill)
        except AdmissionRefused as refused:
            metrics.admission(refused.backend, "refused")
            explain.refused(ctx, refused)
            raise refusal(refused) from None
        except BackendUnavailable as down:
            first = plan.candidates[0]
            fallback = self._fallback_for(ctx, plan.target, first)
            if fallback is None:
                metrics.admission(first.name, "unavailable")
                explain.unavailable(ctx, down.backends)
                raise unavailable(down) from None
            self._fell_back(ctx, first, fallback, "circuit_open")
            return fallback, False, 1
        explain.placed(ctx, placed, plan.ask)
        backend = placed.backend
        if placed.spilled:
            explain.spilled(ctx, ctx.route, backend)
            ctx.route = backend.tier
        return backend, placed.spilled, 2

    async def _call_once(
        self,
        ctx: RequestContext,
        plan: CallPlan,
        backend: BackendConfig,
        limit: float,
        call: Callable[[BackendConfig, dict[str, Any]], Awaitable[T]],
    ) -> tuple[T, list[int]]:
        started = time.perf_counter()
        try:
            with self.telemetry.tracing.stage_span("backend"):
                async with asyncio.timeout(limit):
                    augmented = self._augment(ctx, plan, backend)
                    return await call(backend, augmented.body), augmented.examples
        except TimeoutError:
            waited = "no first chunk" if ctx.stream else "no answer"
            raise BackendError(
                backend.name,
                504,
                f"The backend '{backend.name}' did not answer in time.",
                True,
                detail=f"{waited} within {limit:.1f} s",
            ) from None
        finally:
            ctx.backend_s += time.perf_counter() - started

    def augmented(self, ctx: RequestContext, plan: CallPlan, backend: BackendConfig) -> Augmented:
        """The request as `backend` should get it (also for a caller that makes the call itself)."""
        return self._augment(ctx, plan, backend)

    def _augment(self, ctx: RequestContext, plan: CallPlan, backend: BackendConfig) -> Augmented:
        if plan.lookup is None or self.entries is None:
            return Augmented(ctx.body)
        with self.telemetry.tracing.stage_span("augment"):
            augmented = augment(
                ctx, plan.lookup, self.entries, backend, self.policy.small_tier, plan.ask.prompt_tokens
            )
        explain.examples(ctx, augmented)
        return augmented

    def _after_failure(
        self,
        ctx: RequestContext,
        target: Target,
        backend: BackendConfig,
        err: BackendError,
        tries_left: bool,
        deadline: float,
    ) -> BackendConfig | None:
        """Blame (or not) the backend that failed, and pick where to retry, if anywhere."""
        # The full story (the backend's own words, litellm's) goes to the log, never to the client.
        log.warning(
            "request %s: backend %s failed (%s): %s", ctx.request_id, backend.name, err.kind, err.detail
        )
        if err.client_fault:
            self.admission.backend_neutral(backend)
            raise GatewayError(
                err.status_code, str(err), type="invalid_request_error", code=err.code
            ) from None
        self.admission.backend_failed(backend)
        self.telemetry.metrics.backend_error(backend.name, err.kind)
        # One fallback, and only while the request's budget lasts (else it could not even start).
        retry = err.retryable and tries_left and deadline > time.perf_counter()
        fallback = self._fallback_for(ctx, target, backend) if retry else None
        if fallback is not None:
            self._fell_back(ctx, backend, fallback, err.kind)
        return fallback

    def _fallback_for(
        self, ctx: RequestContext, target: Target, backend: BackendConfig
    ) -> BackendConfig | None:
        """The one retry target: the policy's fallback, if its circuit lets a call through and, for a
        request addressed by name, it is not of a lower tier (unless `allow_downgrade`)."""
        fallback = self.policy.fallback_for(backend)
        if fallback is None:
            return None
        lower = self.policy.tier_rank(fallback.tier) < self.policy.tier_rank(backend.tier)
        if not target.routed and lower and not self.policy.allow_downgrade:
            explain.fallback_refused(ctx, fallback, "lower tier")
            return None
        if not self.admission.claim(fallback):
            explain.fallback_refused(ctx, fallback, "circuit open")
            return None
        return fallback

    def _fell_back(
        self, ctx: RequestContext, failed: BackendConfig, fallback: BackendConfig, kind: str
    ) -> None:
        self.telemetry.metrics.fallback(failed.name, fallback.name)
        ctx.fallback_from = failed.name
        ctx.route = fallback.tier
        lower = self.policy.tier_rank(fallback.tier) < self.policy.tier_rank(failed.tier)
        explain.fell_back(ctx, failed, fallback, kind, lower)


def _note_output(ctx: RequestContext, job: Job) -> None:
    """The answer's size as the backend counted it; a stream whose backend sent no usage is left to
    admission to count from its text (a cut stream's bill, one token a chunk, is no count of it)."""
    reported = ctx.usage_reported if ctx.stream else ctx.completion_tokens > 0
    job.completion_tokens = ctx.completion_tokens if reported else None


def _streamed(ctx: RequestContext) -> Relayed:
    """What a stream has relayed so far (admission counts the tokens in it: `CharsPerToken`)."""
    return Relayed(len(ctx.output_parts), ctx.output_chars)
