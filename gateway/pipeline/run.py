"""The one request pipeline, shared by the HTTP API and the in-process middleware.

`Pipeline.run` reads as the request's path; each stage is a module of this package:

    authenticate -> quotas -> target -> cache_lookup (a hit, or the answer of an identical request in
    flight, is answered here)
    -> route -> admit -> call (augment per attempt, fallback once) -> record

A caller that makes the backend call itself (LiteLLM's router, through gateway/inprocess/litellm_router.py)
takes `advise` instead: the same stages up to the choice of backend, then `settle` with the outcome.

Stages hand each other typed outcomes (`Target`, `CacheLookup`, `RouteOutcome`, `CallPlan`, `Trail`);
`explain` turns them into `ctx.decisions`, which the headers, the request log, metrics and traces
share. Everything the pipeline uses arrives through its constructor (built once by
`gateway.wiring`); the router and length models are the one thing swapped while serving, through
`swap_models`.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from icgate.gateway.backends.admission import Admission
from icgate.gateway.backends.client import BackendClient
from icgate.gateway.config import Policy
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline import explain
from icgate.gateway.pipeline.admit import ask_for, candidates_for, priority_of, spill_candidates
from icgate.gateway.pipeline.advise import Advice, advised_backend
from icgate.gateway.pipeline.authenticate import Authenticator, authenticate
from icgate.gateway.pipeline.cache_lookup import (
    CacheLookup,
    Embed,
    hit_response,
    look_up,
    release,
    replay_as_stream,
)
from icgate.gateway.pipeline.call import Caller, CallPlan, OpenStream
from icgate.gateway.pipeline.quotas import TenantLimiter
from icgate.gateway.pipeline.record import LengthSink, Recorder, RecordSink, SampleSink, Trail
from icgate.gateway.pipeline.route import RouteOutcome, route
from icgate.gateway.pipeline.stream import StreamRelay, token_usage
from icgate.gateway.pipeline.target import Target, resolve_target
from icgate.gateway.records import RequestContext, RequestRecord, Tenant
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store.cache_entries import CacheEntries, Hit
from icgate.gateway.telemetry import Telemetry


@dataclass
class PipelineResult:
    ctx: RequestContext
    response: dict[str, Any] | None = None
    chunks: StreamRelay | None = None

    def headers(self) -> dict[str, str]:
        return explain.response_headers(self.ctx)


class Pipeline:
    def __init__(  # noqa: PLR0913 - the wiring point: every part a request may touch, named
        self,
        policy: Policy,
        client: BackendClient,
        admission: Admission,
        telemetry: Telemetry,
        models: RouteModels,
        *,
        authenticator: Authenticator | None = None,
        limiter: TenantLimiter | None = None,
        entries: CacheEntries | None = None,
        embed: Embed | None = None,
        sink: RecordSink | None = None,
        samples: SampleSink | None = None,
        lengths: LengthSink | None = None,
    ) -> None:
        self.policy = policy
        self.client = client
        self.admission = admission
        self.telemetry = telemetry
        self.authenticator = authenticator
        self.limiter = limiter
        self.entries = entries
        self.embed = embed
        self._models = models
        self.caller = Caller(policy, client, admission, telemetry, entries)
        self.recorder = Recorder(policy, telemetry, sink, samples, limiter, entries, lengths)

    @property
    def models(self) -> RouteModels:
        return self._models

    def swap_models(self, models: RouteModels) -> None:
        """A newer router or length predictor, whole, between two requests."""
        self._models = models

    def swap_policy(self, policy: Policy) -> None:
        """A policy changed only where it is read per request (`gateway.policy_edit.LIVE_PATHS`): each
        stage, the tenants' limiter and the cache take the new one between two requests."""
        self.policy = policy
        self.caller.policy = policy
        self.recorder.policy = policy
        if self.limiter is not None:
            self.limiter.config = policy.admission
        if self.entries is not None:
            self.entries.config = policy.cache

    async def check_caller(self, api_key: str | None) -> Tenant:
        """Authentication alone, for endpoints that do not run the whole pipeline."""
        return await authenticate(api_key, self.policy.auth, self.authenticator)

    def record(
        self, ctx: RequestContext, trail: Trail | None = None, response: dict[str, Any] | None = None
    ) -> None:
        """The record stage (also for a request the HTTP layer cut before it reached the pipeline)."""
        self.recorder.record(ctx, trail or Trail(), response)

    async def run(
        self, ctx: RequestContext, api_key: str | None = None, tenant: Tenant | None = None
    ) -> PipelineResult:
        """Decide and call. For a stream, returns once the first chunk is in hand. A `tenant` given by
        the caller (an in-process client wrapped for one tenant) stands in for the key's."""
        tracing, metrics = self.telemetry.tracing, self.telemetry.metrics
        exits = AsyncExitStack()
        exits.enter_context(metrics.inflight())
        attributes = {"icgate.model": ctx.model, "icgate.stream": ctx.stream, "icgate.endpoint": ctx.endpoint}
        with tracing.request_span(ctx.request_id, attributes) as span:
            try:
                result = await self._stages(ctx, api_key, tenant, exits)
                ctx.freeze_overhead()
            except BaseException as exc:
                # Whatever went wrong, the slot and the in-flight count are given back. A failed request
                # served and helped nothing: its record needs no trail.
                await exits.aclose()
                if isinstance(exc, GatewayError):
                    ctx.status_code, ctx.error_type = exc.status_code, exc.type
                elif ctx.error_type != "shutdown":  # a cut at the shutdown deadline is already noted
                    ctx.status_code, ctx.error_type = 500, type(exc).__name__
                self.record(ctx)
                raise
            finally:
                tracing.record_outcome(span, RequestRecord.from_context(ctx))
        return result

    async def _stages(
        self, ctx: RequestContext, api_key: str | None, tenant: Tenant | None, exits: AsyncExitStack
    ) -> PipelineResult:
        target, lookup = await self._before_route(ctx, api_key, tenant, may_lead=True)
        try:
            if lookup is not None and lookup.hit is not None:
                return await self._serve_hit(ctx, Trail(target, lookup), lookup.hit, exits)
            plan = await self._route(ctx, target, lookup)
            if ctx.stream:
                opened = await self.caller.open_stream(ctx, plan, exits)
                return self._relay(ctx, opened.result, exits, Trail(target, lookup, opened.examples))
            called = await self.caller.complete(ctx, plan, exits)
            response = called.result
            ctx.prompt_tokens, ctx.completion_tokens = token_usage(response)
            await exits.aclose()
            self.record(ctx, Trail(target, lookup, called.examples), response)
            return PipelineResult(ctx, response=response)
        finally:
            release(lookup)  # identical requests waiting for this one: unless its answer went to the insert

    async def _before_route(
        self, ctx: RequestContext, api_key: str | None, tenant: Tenant | None, may_lead: bool = False
    ) -> tuple[Target, CacheLookup | None]:
        """Stages 1-4: who asks, within which limits, for what, and what the cache holds for it.
        `may_lead`: identical requests may wait for this one's answer (the caller releases them)."""
        tracing = self.telemetry.tracing
        with tracing.stage_span("authenticate"):
            ctx.tenant = tenant or await authenticate(api_key, self.policy.auth, self.authenticator)
            explain.tenant(ctx)
        if self.limiter is not None:
            with tracing.stage_span("limits"):
                await self._check_quota(ctx)
        with tracing.stage_span("resolve_target"):
            target = resolve_target(ctx.model, self.policy)
            explain.target(ctx, target)
        return target, await self._look_up(ctx, target, may_lead)

    async def _route(self, ctx: RequestContext, target: Target, lookup: CacheLookup | None) -> CallPlan:
        """Stages 5-6: the tier, then where the request may go and what admission is asked."""
        with self.telemetry.tracing.stage_span("route"):
            routed = await route(ctx, target, lookup, self.models, self.policy, self.embed)
            ctx.route = routed.tier
            explain.route(ctx, routed)
        return self._plan(ctx, target, lookup, routed)

    async def advise(
        self, ctx: RequestContext, api_key: str | None = None, tenant: Tenant | None = None
    ) -> Advice:
        """The pipeline's decisions for a caller that makes the call itself (gateway/pipeline/advise.py):
        a cache hit (recorded here), or the backend and the body to send it. `settle` records the rest."""
        try:
            target, lookup = await self._before_route(ctx, api_key, tenant)
            if lookup is not None and lookup.hit is not None:
                ctx.route = "cache"
                response = hit_response(ctx, lookup.hit)
                ctx.prompt_tokens, ctx.completion_tokens = token_usage(response)
                trail = Trail(target, lookup)
                self.record(ctx, trail, response)
                return Advice(ctx, trail, response=response)
            plan = await self._route(ctx, target, lookup)
            backend = advised_backend(self.admission, plan)
            ctx.backend, ctx.route = backend, backend.tier
            explain.admitted(ctx, backend, predicted_tokens=plan.ask.on(backend.name).output_tokens)
            augmented = self.caller.augmented(ctx, plan, backend)
            ctx.freeze_overhead()  # icgate's own work ends here: the call and its time are the caller's
            return Advice(
                ctx, Trail(target, lookup, augmented.examples), backend=backend, body=augmented.body
            )
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                ctx.status_code, ctx.error_type = exc.status_code, exc.type
            else:
                ctx.status_code, ctx.error_type = 500, type(exc).__name__
            self.record(ctx)
            raise

    def settle(
        self, advice: Advice, response: dict[str, Any] | None, error: str | None = None, status: int = 502
    ) -> None:
        """The outcome of an advised call the caller made: its answer (stored in the cache when good, like
        the pipeline's own), or the error it ended with."""
        ctx = advice.ctx
        if error is not None or response is None:
            ctx.status_code, ctx.error_type = status, error or "no_response"
            self.record(ctx, advice.trail)
            return
        ctx.prompt_tokens, ctx.completion_tokens = token_usage(response)
        self.record(ctx, advice.trail, response)

    async def _check_quota(self, ctx: RequestContext) -> None:
        assert self.limiter is not None
        try:
            await self.limiter.check(ctx.tenant.name, ctx.prompt_estimate)
        except GatewayError:
            self.telemetry.metrics.admission("none", "limited")
            raise

    async def _look_up(self, ctx: RequestContext, target: Target, may_lead: bool) -> CacheLookup | None:
        if self.entries is None or self.embed is None:
            return None
        lookup = await look_up(ctx, target, self.entries, self.embed, self.telemetry.tracing, may_lead)
        if lookup is not None:
            explain.cache(ctx, lookup)
        return lookup

    def _plan(
        self, ctx: RequestContext, target: Target, lookup: CacheLookup | None, routed: RouteOutcome
    ) -> CallPlan:
        name, cls = priority_of(ctx, self.policy)
        explain.priority(ctx, name, cls)
        return CallPlan(
            target=target,
            candidates=candidates_for(target, routed.tier, self.policy),
            spill=spill_candidates(target, routed.tier, self.policy),
            ask=ask_for(ctx, routed, cls),
            lookup=lookup,
        )

    async def _serve_hit(
        self, ctx: RequestContext, trail: Trail, hit: Hit, exits: AsyncExitStack
    ) -> PipelineResult:
        ctx.route = "cache"
        response = hit_response(ctx, hit)
        ctx.prompt_tokens, ctx.completion_tokens = token_usage(response)
        if ctx.stream:
            chunks = replay_as_stream(ctx, response)
            first = await anext(chunks)
            return self._relay(ctx, (first, chunks), exits, trail)
        await exits.aclose()
        self.record(ctx, trail, response)
        return PipelineResult(ctx, response=response)

    def _relay(
        self, ctx: RequestContext, opened: OpenStream, exits: AsyncExitStack, trail: Trail
    ) -> PipelineResult:
        """A stream handed to the client; when it ends, the record stage runs with this request's trail."""
        relay = StreamRelay(
            ctx, opened, exits, self.admission, self.telemetry.metrics, partial(self.record, trail=trail)
        )
        return PipelineResult(ctx, chunks=relay)
