"""The one request pipeline, shared by the HTTP API and the in-process middleware.

Read `Pipeline.run` top to bottom to follow a request:

    authenticate -> resolve_target -> exact cache -> embed + retrieve -> semantic hit
    -> route -> admit -> augment with examples -> call backend (fallback once) -> record + store

Each stage is a small function that takes what it needs and returns its
decision; `Pipeline` only wires them and notes each decision in
`ctx.decisions`, which the headers, the request log, metrics and traces share.
The cache stages live in `gateway.cache_stages`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import cache_stages, routing
from gateway.admission import Admission, AdmissionRefused, Ask, BackendUnavailable, Job
from gateway.backends import BackendClient, BackendError, message_text
from gateway.cache_service import CacheService, Hit, namespace_for, scrub_pii
from gateway.config import AuthConfig, BackendConfig, Policy
from gateway.context import ANONYMOUS, RequestContext, RequestRecord, Tenant
from gateway.errors import GatewayError
from gateway.limits import TenantLimiter
from gateway.route_samples import RouteSample
from gateway.telemetry import Telemetry
from routers.base import RouteDecision, RouteFeatures, Router
from routers.length import PromptLengthHeuristic

log = logging.getLogger("icgate.pipeline")
ROUTE_SAMPLE_MAX_CHARS = 8_000


class Authenticator(Protocol):
    async def authenticate(self, plaintext: str) -> Tenant | None: ...


class SampleSink(Protocol):
    def submit(self, sample: RouteSample) -> bool: ...


class RecordSink(Protocol):
    def submit(self, record: RequestRecord) -> bool: ...


@dataclass(frozen=True)
class Target:
    """What the client asked for: a routed name, or one backend by its name."""

    routed: bool
    backend: BackendConfig | None = None


@dataclass
class PipelineResult:
    ctx: RequestContext
    response: dict[str, Any] | None = None
    chunks: StreamRelay | None = None

    def headers(self) -> dict[str, str]:
        return response_headers(self.ctx)


# --- stages -------------------------------------------------------------------------------------


async def authenticate(api_key: str | None, auth: AuthConfig, authenticator: Authenticator | None) -> Tenant:
    """The tenant behind an API key. Without `auth.required`, unknown callers are anonymous."""
    tenant = await authenticator.authenticate(api_key) if (api_key and authenticator) else None
    if tenant is not None:
        return tenant
    if auth.required:
        message = (
            "Incorrect API key provided."
            if api_key
            else "Missing API key: send 'Authorization: Bearer <key>'."
        )
        raise GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")
    return ANONYMOUS


def resolve_target(model: str, policy: Policy) -> Target:
    if model in policy.routed_models:
        return Target(routed=True)
    backend = policy.backend(model)
    if backend is None:
        known = ", ".join([*policy.routed_models, *(b.name for b in policy.backends)])
        raise GatewayError(
            404,
            f"The model '{model}' does not exist. Available models: {known}.",
            param="model",
            code="model_not_found",
        )
    return Target(routed=False, backend=backend)


def chat_messages(ctx: RequestContext) -> list[dict[str, Any]]:
    """The messages of a chat request; none for a completion (a pass-through `messages` is not its input)."""
    return ctx.body["messages"] if ctx.endpoint == "chat" else []


def estimate_prompt_tokens(ctx: RequestContext) -> int:
    """About four characters a token: good enough to route on, and free."""
    if ctx.endpoint == "chat":
        chars = sum(len(message_text(m.get("content"))) for m in chat_messages(ctx))
    else:
        chars = len(str(ctx.body.get("prompt", "")))
    return max(1, chars // 4)


def route_features(ctx: RequestContext) -> RouteFeatures:
    depth = sum(1 for m in chat_messages(ctx) if m.get("role") == "user")
    return RouteFeatures(prompt_tokens=estimate_prompt_tokens(ctx), conversation_depth=depth)


def route(target: Target, features: RouteFeatures, router: Router) -> RouteDecision:
    if target.backend is not None:
        return RouteDecision(
            tier=target.backend.tier, score=None, reasons=(f"addressed as {target.backend.name}",)
        )
    return router.route(features)


def candidates_for(target: Target, decision: RouteDecision, policy: Policy) -> list[BackendConfig]:
    if target.backend is not None:
        return [target.backend]
    backends = policy.tier(decision.tier)
    if not backends:
        raise GatewayError(503, f"no backend serves tier '{decision.tier}'", type="server_error")
    return backends


def spill_candidates(target: Target, decision: RouteDecision, policy: Policy) -> list[BackendConfig]:
    """Where a routed request may go when its tier cannot meet the objective: the other tiers."""
    if target.backend is not None or not policy.admission.spill:
        return []
    return [b for b in policy.backends if b.tier != decision.tier]


def ask_for(ctx: RequestContext, policy: Policy) -> Ask:
    """What admission needs: sizes (the prompt estimate, the predicted output) and the class's objectives."""
    name, cls = policy.admission.priority_of(ctx.tenant.name)
    routed = ctx.decisions.get("route") or {}
    predicted = routed.get("predicted_tokens") or {}
    ctx.decisions["priority"] = {"class": name, "rank": cls.rank, "ttft_slo_ms": cls.ttft_slo_ms}
    return Ask(
        prompt_tokens=routed.get("prompt_tokens_est") or estimate_prompt_tokens(ctx),
        output_tokens=int(predicted.get("p50") or 0),
        output_tokens_p90=int(predicted.get("p90") or 0),
        rank=cls.rank,
        ttft_slo_s=cls.ttft_slo_ms / 1000 if cls.ttft_slo_ms else None,
        tpot_slo_s=cls.tpot_slo_ms / 1000 if cls.tpot_slo_ms else None,
        arrived=ctx.arrived,
    )


def backend_failure(err: BackendError) -> GatewayError:
    """A backend failure the client is not to blame for, once nothing else is left to try."""
    if err.status_code == 429:
        return GatewayError(
            429, str(err), type="rate_limit_error", code="backend_rate_limited", headers={"retry-after": "1"}
        )
    status = 504 if err.kind == "timeout" else 502
    return GatewayError(status, str(err), type="server_error", code="backend_error")


def refusal(refused: AdmissionRefused) -> GatewayError:
    return GatewayError(
        429,
        f"{refused.reason}; retry later.",
        type="rate_limit_error",
        code="backend_at_capacity",
        headers={"retry-after": str(int(refused.retry_after_s))},
    )


def response_headers(ctx: RequestContext) -> dict[str, str]:
    headers = {
        "x-icgate-request-id": ctx.request_id,
        "x-icgate-route": ctx.route or "none",
        "x-icgate-backend": ctx.backend.name if ctx.backend else "none",
        "x-icgate-overhead-ms": f"{ctx.overhead_ms():.2f}",
        "x-icgate-queue-ms": f"{ctx.queue_s * 1000:.2f}",
    }
    if ctx.fallback_from:
        headers["x-icgate-fallback-from"] = ctx.fallback_from
        if (ctx.decisions.get("fallback") or {}).get("downgraded"):
            headers["x-icgate-downgraded"] = "true"
    cached = ctx.decisions.get("cache") or {}
    if cached.get("similarity") is not None:
        headers["x-icgate-similarity"] = f"{cached['similarity']:.4f}"
    if "examples" in ctx.decisions:
        headers["x-icgate-examples"] = str(len(ctx.decisions["examples"]))
    routed = ctx.decisions.get("route") or {}
    if routed.get("score") is not None:
        headers["x-icgate-router-score"] = f"{routed['score']:.4f}"
    if routed.get("predicted_tokens"):
        headers["x-icgate-predicted-tokens"] = str(routed["predicted_tokens"]["p50"])
    return headers


def route_sample_of(ctx: RequestContext) -> RouteSample | None:
    """A routed request a backend answered: the prompt (PII scrubbed), who answered, how long."""
    if not (ctx.decisions.get("target") or {}).get("routed") or ctx.backend is None or ctx.status_code != 200:
        return None
    if ctx.route == "cache" or ctx.endpoint != "chat":
        return None
    users = [m for m in chat_messages(ctx) if m.get("role") == "user"]
    text = (
        ctx.cache.prompt_text
        if ctx.cache is not None
        else message_text(users[-1].get("content"))
        if users
        else ""
    )
    if not text.strip():
        return None
    return RouteSample(
        request_id=ctx.request_id,
        tenant_id=ctx.tenant.id,
        # Training data needs the question, not a megabyte of pasted context: bounded, so the scrub
        # (on the event loop) stays cheap.
        prompt_text=scrub_pii(text[:ROUTE_SAMPLE_MAX_CHARS]),
        tier=ctx.backend.tier,
        backend=ctx.backend.name,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        finish_reason=ctx.finish_reason,
    )


def usage_of(response: dict[str, Any]) -> tuple[int, int]:
    usage = response.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class StreamRelay:
    """Relays a backend stream to the client, then releases the backend slot and records.

    A class rather than a generator: `aclose()` must release the slot even when the
    consumer never started iterating (a client that disconnects before the first
    byte), which a generator's `finally` cannot promise. Closing twice is harmless.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        ctx: RequestContext,
        opened: tuple[dict[str, Any], AsyncGenerator[dict[str, Any], None]],
        exits: AsyncExitStack,
    ) -> None:
        self._pipeline = pipeline
        self._ctx = ctx
        self._first: dict[str, Any] | None = opened[0] or None
        self._rest = opened[1]
        self._exits = exits
        self._closed = False

    def __aiter__(self) -> StreamRelay:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            chunk = await self._next_from_backend()
        self._note(chunk)
        return chunk

    async def _next_from_backend(self) -> dict[str, Any]:
        """The next chunk; a backend that sends nothing for its `timeout_s` has failed (and counts so)."""
        backend = self._ctx.backend
        try:
            async with asyncio.timeout(backend.timeout_s if backend is not None else None):
                return await anext(self._rest)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except (BackendError, TimeoutError) as exc:
            name = backend.name if backend is not None else "none"
            err = (
                exc
                if isinstance(exc, BackendError)
                else BackendError(name, 504, f"The backend '{name}' stopped sending.", True)
            )
            log.warning(
                "request %s: stream from %s failed (%s): %s", self._ctx.request_id, name, err.kind, err.detail
            )
            status = 504 if err.kind == "timeout" else 502
            self._ctx.status_code, self._ctx.error_type = status, "backend_error"
            self._pipeline.telemetry.metrics.backend_error(err.backend, err.kind)
            if backend is not None and not err.client_fault:
                self._pipeline.admission.backend_failed(backend)
            await self.aclose()
            raise GatewayError(status, str(err), type="server_error", code="backend_error") from None

    def _note(self, chunk: dict[str, Any]) -> None:
        """Usage and the answer's text, for the request log and the cache insert."""
        if chunk.get("usage"):
            self._ctx.prompt_tokens, self._ctx.completion_tokens = usage_of(chunk)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                self._ctx.output_parts.append((choice.get("delta") or {}).get("content") or "")
                self._ctx.finish_reason = choice.get("finish_reason") or self._ctx.finish_reason

    def _bill_what_was_sent(self) -> None:
        """A stream cut before its usage chunk (backend failure, client gone) is billed for what it
        delivered: one token per content chunk, as OpenAI-compatible servers stream them."""
        ctx = self._ctx
        if ctx.completion_tokens == 0:
            ctx.completion_tokens = sum(1 for part in ctx.output_parts if part)
        if ctx.prompt_tokens == 0 and ctx.completion_tokens:
            ctx.prompt_tokens = estimate_prompt_tokens(ctx)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._rest.aclose()
        finally:
            self._bill_what_was_sent()
            await self._exits.aclose()
            self._pipeline.record(self._ctx)


# --- the pipeline -------------------------------------------------------------------------------


class Pipeline:
    def __init__(
        self,
        policy: Policy,
        client: BackendClient,
        admission: Admission,
        router: Router,
        telemetry: Telemetry,
        authenticator: Authenticator | None = None,
        sink: RecordSink | None = None,
        cache: CacheService | None = None,
        embed: cache_stages.Embed | None = None,
    ) -> None:
        self.cache = cache
        self.embed = embed
        self.policy = policy
        self.client = client
        self.admission = admission
        self.limiter: TenantLimiter | None = None  # rate limits and budgets, once started
        self._charges: set[asyncio.Task[None]] = set()
        self.models = routing.Models(router=router, length=PromptLengthHeuristic())
        self.telemetry = telemetry
        self.authenticator = authenticator
        self.sink = sink
        self.samples: SampleSink | None = None  # route samples (router training data), once started

    async def check_caller(self, api_key: str | None) -> Tenant:
        """Authentication alone, for endpoints that do not run the whole pipeline."""
        return await authenticate(api_key, self.policy.auth, self.authenticator)

    async def run(self, ctx: RequestContext, api_key: str | None = None) -> PipelineResult:
        """Decide and call. For a stream, returns once the first chunk is in hand."""
        tracing, metrics = self.telemetry.tracing, self.telemetry.metrics
        exits = AsyncExitStack()
        exits.enter_context(metrics.inflight())
        attributes = {"icgate.model": ctx.model, "icgate.stream": ctx.stream, "icgate.endpoint": ctx.endpoint}
        with tracing.request_span(ctx.request_id, attributes) as span:
            try:
                result = await self._decide_and_call(ctx, api_key, exits)
                ctx.freeze_overhead()
            except BaseException as exc:
                # Whatever went wrong, the slot and the in-flight count are given back.
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

    async def _decide_and_call(
        self, ctx: RequestContext, api_key: str | None, exits: AsyncExitStack
    ) -> PipelineResult:
        tracing = self.telemetry.tracing
        with tracing.stage_span("authenticate"):
            ctx.tenant = await authenticate(api_key, self.policy.auth, self.authenticator)
            ctx.decisions["authenticate"] = {"tenant": ctx.tenant.name}
        if self.limiter is not None:
            with tracing.stage_span("limits"):
                try:
                    await self.limiter.check(ctx.tenant.name, estimate_prompt_tokens(ctx))
                except GatewayError:
                    self.telemetry.metrics.admission("none", "limited")
                    raise
        with tracing.stage_span("resolve_target"):
            target = resolve_target(ctx.model, self.policy)
            ctx.decisions["target"] = {"routed": target.routed}
        hit = await self._look_up_cache(ctx, target)
        if hit is not None:
            return await self._serve_hit(ctx, hit, exits)
        with tracing.stage_span("route"):
            decision = await self._route(ctx, target)
        candidates = candidates_for(target, decision, self.policy)
        spill = spill_candidates(target, decision, self.policy)
        if ctx.stream:
            opened = await self._first_stream(ctx, candidates, spill, exits)
            return PipelineResult(ctx, chunks=StreamRelay(self, ctx, opened, exits))
        response = await self._call(ctx, candidates, spill, exits)
        ctx.prompt_tokens, ctx.completion_tokens = usage_of(response)
        await exits.aclose()
        self.record(ctx, response)
        return PipelineResult(ctx, response=response)

    async def _route(self, ctx: RequestContext, target: Target) -> RouteDecision:
        """Features (with the cache's embedding and best example), predicted length, then the decision."""
        models = self.models
        needs_vector = target.routed and models.router_needs_embedding
        vector = ctx.cache.vector if ctx.cache is not None else None
        text = routing.last_user_text(ctx.body, ctx.endpoint)
        if vector is None and needs_vector and self.embed is not None and text:
            # the cache was off for this request: embed for the router (in the tenant's memo scope)
            scope = namespace_for(ctx.tenant)
            vector = await cache_stages.embed_request(self.embed, text, scope)
        example = routing.best_example(ctx.cache)
        features = routing.with_cache_view(route_features(ctx), vector, example, text)
        max_tokens = ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens")
        predicted = routing.predict_length(models, features, text, max_tokens)
        if not target.routed:
            decision = route(target, features, models.router)
        elif needs_vector and vector is None:
            tier = self.policy.router.default_tier
            decision = RouteDecision(tier, None, ("no request embedding (embedder off): default tier",))
        else:
            decision = routing.choose_tier(self.policy, models, features, predicted, example)
        ctx.route = decision.tier
        ctx.decisions["route"] = {
            "tier": decision.tier,
            "score": decision.score,
            "reasons": list(decision.reasons),
            "prompt_tokens_est": features.prompt_tokens,
            "predicted_tokens": {"p50": predicted.p50, "p90": predicted.p90},
            "router": models.router_version if target.routed else None,
            "length_model": models.length_version,
        }
        return decision

    async def _look_up_cache(self, ctx: RequestContext, target: Target) -> Hit | None:
        """Exact cache, then embed and retrieve, then a semantic hit; the lookup stays on ctx."""
        if self.cache is None or self.embed is None:
            return None
        tracing = self.telemetry.tracing
        min_tier = target.backend.tier if target.backend is not None else None
        ctx.cache = lookup = cache_stages.plan_lookup(ctx, self.cache, min_tier)
        if lookup is None:
            return None
        with tracing.stage_span("exact_cache"):
            hit = cache_stages.look_up_exact(lookup, self.cache, min_tier)
        if hit is None:
            with tracing.stage_span("embed_retrieve"):
                await cache_stages.embed_and_retrieve(lookup, self.cache, self.embed)
            with tracing.stage_span("semantic_hit"):
                hit = await cache_stages.look_up_semantic(lookup, self.cache, min_tier, ctx.body)
        best = lookup.candidates[0].similarity if lookup.candidates else None
        ctx.decisions["cache"] = {
            "hit": hit.kind if hit else None,
            "entry": hit.entry.id if hit else None,
            "similarity": hit.similarity if hit else best,
            "verifier": hit.verifier_score if hit else None,
            "candidates": len(lookup.candidates),
            "servable": lookup.servable,
        }
        if hit is not None:
            lookup.served_by = hit.entry.id
        return hit

    async def _serve_hit(self, ctx: RequestContext, hit: Hit, exits: AsyncExitStack) -> PipelineResult:
        ctx.route = "cache"
        response = cache_stages.hit_response(ctx, hit)
        ctx.prompt_tokens, ctx.completion_tokens = usage_of(response)
        if ctx.stream:
            chunks = cache_stages.replay_as_stream(ctx, response)
            first = await anext(chunks)
            return PipelineResult(ctx, chunks=StreamRelay(self, ctx, (first, chunks), exits))
        await exits.aclose()
        self.record(ctx, response)
        return PipelineResult(ctx, response=response)

    def _body_for(self, ctx: RequestContext, backend: BackendConfig) -> dict[str, Any]:
        """The request as this backend gets it: with in-context examples for the small tier."""
        if self.cache is None or ctx.cache is None:
            return ctx.body
        with self.telemetry.tracing.stage_span("augment"):
            return cache_stages.augment(
                ctx, self.cache, backend, estimate_prompt_tokens(ctx), self.policy.tiers[0]
            )

    async def _attempts(
        self,
        ctx: RequestContext,
        candidates: list[BackendConfig],
        spill: list[BackendConfig],
        exits: AsyncExitStack,
        call: Callable[[BackendConfig], Awaitable[Any]],
    ) -> Any:
        """Admit and call the chosen backend; on a retryable failure, once more on the fallback.

        Each attempt is bounded: a stream by its time to first chunk, a whole answer by the backend's
        `timeout_s`, both by what is left of the request's budget (two hung backends must not double
        the wait). Backends whose circuit is open are skipped; a client's error is not retried and does
        not count against the backend. See docs/backends.md.
        """
        metrics = self.telemetry.metrics
        ask = ask_for(ctx, self.policy)
        deadline = ctx.arrived + self.policy.request_budget_s()
        tries = 2  # the first attempt and one fallback
        try:
            backend, spilled = self.admission.place(ask, candidates, spill)
        except AdmissionRefused as refused:
            metrics.admission(refused.backend, "refused")
            ctx.decisions["admit"] = {"refused": refused.reason}
            raise refusal(refused) from None
        except BackendUnavailable as down:
            fallback = self._fallback_for(ctx, candidates[0])
            if fallback is None:
                metrics.admission(candidates[0].name, "unavailable")
                ctx.decisions["admit"] = {"unavailable": down.backends}
                raise GatewayError(
                    503,
                    f"The {down}; retry later.",
                    type="server_error",
                    code="backend_unavailable",
                    headers={"retry-after": str(int(down.retry_after_s))},
                ) from None
            self._fell_back(ctx, candidates[0], fallback, "circuit_open")
            backend, spilled, tries = fallback, False, 1
        if spilled:
            ctx.decisions["spill"] = {"from": ctx.route, "to": backend.name}
            ctx.route = backend.tier
        while True:
            tries -= 1
            slot = AsyncExitStack()
            try:
                with self.telemetry.tracing.stage_span("admit"):
                    job = await slot.enter_async_context(self.admission.hold(backend, ask))
                ctx.queue_s += job.queued_s
                slot.enter_context(metrics.backend_inflight(backend.name))
                # The answer's size, for the backend's measured time per output token.
                slot.callback(self._note_output, ctx, job)
                ctx.backend = backend
                ctx.decisions["admit"] = {"backend": backend.name, "queue_ms": round(ctx.queue_s * 1000, 2)}
                metrics.admission(backend.name, "spilled" if spilled else "admitted")
                own = backend.first_byte_timeout_s(ask.ttft_slo_s) if ctx.stream else backend.timeout_s
                limit = max(0.0, min(own, deadline - time.perf_counter()))
                started = time.perf_counter()
                try:
                    with self.telemetry.tracing.stage_span("backend"):
                        async with asyncio.timeout(limit):
                            result = await call(backend)
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
                self.admission.backend_succeeded(backend)
                if ctx.stream:
                    job.first_token_at = time.perf_counter()
                # The slot stays held until the caller is done (a stream holds it to the end).
                exits.push_async_exit(slot)
                return result
            except AdmissionRefused as refused:
                await slot.aclose()
                self.admission.backend_neutral(backend)
                metrics.admission(refused.backend, "refused")
                ctx.decisions["admit"] = {"refused": refused.reason}
                raise refusal(refused) from None
            except BackendError as err:
                await slot.aclose()
                # The full story (the backend's own words, litellm's) goes to the log, never to the client.
                log.warning(
                    "request %s: backend %s failed (%s): %s",
                    ctx.request_id,
                    backend.name,
                    err.kind,
                    err.detail,
                )
                if err.client_fault:
                    self.admission.backend_neutral(backend)
                    raise GatewayError(
                        err.status_code, str(err), type="invalid_request_error", code=err.code
                    ) from None
                self.admission.backend_failed(backend)
                metrics.backend_error(backend.name, err.kind)
                # One fallback, and only while the request's budget lasts (else it could not even start).
                retry = err.retryable and tries > 0 and deadline > time.perf_counter()
                fallback = self._fallback_for(ctx, backend) if retry else None
                if fallback is not None:
                    self._fell_back(ctx, backend, fallback, err.kind)
                    backend = fallback
                    continue
                raise backend_failure(err) from None
            except BaseException:
                # Cancelled (the client left) or a bug: the slot is given back, the backend not blamed.
                await slot.aclose()
                self.admission.backend_neutral(backend)
                raise

    def _fallback_for(self, ctx: RequestContext, backend: BackendConfig) -> BackendConfig | None:
        """The one retry target: the policy's fallback, if its circuit lets a call through and, for a
        request addressed by name, it is not of a lower tier (unless `allow_downgrade`)."""
        fallback = self.policy.fallback_for(backend)
        if fallback is None:
            return None
        named = not (ctx.decisions.get("target") or {}).get("routed", True)
        lower = self.policy.tier_rank(fallback.tier) < self.policy.tier_rank(backend.tier)
        if named and lower and not self.policy.allow_downgrade:
            ctx.decisions["fallback_refused"] = {"to": fallback.name, "reason": "lower tier"}
            return None
        if not self.admission.claim(fallback):
            ctx.decisions["fallback_refused"] = {"to": fallback.name, "reason": "circuit open"}
            return None
        return fallback

    def _fell_back(
        self, ctx: RequestContext, failed: BackendConfig, fallback: BackendConfig, kind: str
    ) -> None:
        self.telemetry.metrics.fallback(failed.name, fallback.name)
        ctx.fallback_from = failed.name
        ctx.route = fallback.tier
        ctx.decisions["fallback"] = {"from": failed.name, "to": fallback.name, "error": kind}
        if self.policy.tier_rank(fallback.tier) < self.policy.tier_rank(failed.tier):
            ctx.decisions["fallback"]["downgraded"] = True

    @staticmethod
    def _note_output(ctx: RequestContext, job: Job) -> None:
        job.completion_tokens = ctx.completion_tokens or len(ctx.output_parts)

    async def _call(
        self,
        ctx: RequestContext,
        candidates: list[BackendConfig],
        spill: list[BackendConfig],
        exits: AsyncExitStack,
    ) -> Any:
        def complete(backend: BackendConfig) -> Awaitable[Any]:
            return self.client.complete(backend, ctx.endpoint, self._body_for(ctx, backend))

        return await self._attempts(ctx, candidates, spill, exits, complete)

    async def _first_stream(
        self,
        ctx: RequestContext,
        candidates: list[BackendConfig],
        spill: list[BackendConfig],
        exits: AsyncExitStack,
    ) -> tuple[dict[str, Any], AsyncGenerator[dict[str, Any], None]]:
        """Open the stream and pull its first chunk, so failures can still fall back."""

        async def open_and_peek(
            backend: BackendConfig,
        ) -> tuple[dict[str, Any], AsyncGenerator[dict[str, Any], None]]:
            chunks = await self.client.stream(backend, ctx.endpoint, self._body_for(ctx, backend))
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = {}
            except BaseException:
                await chunks.aclose()
                raise
            return first, chunks

        return await self._attempts(ctx, candidates, spill, exits, open_and_peek)

    def record(self, ctx: RequestContext, response: dict[str, Any] | None = None) -> None:
        """Off the hot path: metrics now, the log row through the write-behind queue, the cache insert."""
        ctx.freeze_overhead()
        record = RequestRecord.from_context(ctx)
        self.telemetry.metrics.observe(record)
        if self.sink is not None and not self.sink.submit(record):
            self.telemetry.metrics.request_log_dropped()
        if self.limiter is not None and ctx.backend is not None and self.limiter.tracks(ctx.tenant.name):
            task = asyncio.get_running_loop().create_task(
                self.limiter.charge(ctx.tenant.name, ctx.completion_tokens, ctx.cost_usd())
            )
            self._charges.add(task)
            task.add_done_callback(self._charges.discard)
        if self.cache is not None:
            cache_stages.store_answer(ctx, self.cache, response)
        if self.samples is not None and routing.sampled(self.policy.router.sample_share):
            sample = route_sample_of(ctx)
            if sample is not None:
                self.samples.submit(sample)
