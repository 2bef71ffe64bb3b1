"""The pipeline's stages as plain functions, then `Pipeline.run` in-process with a fake backend client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from icgate.gateway.backends.admission import Admission, Ask
from icgate.gateway.backends.client import BackendError
from icgate.gateway.config import AdmissionConfig, AuthConfig, BackendConfig, Policy, TelemetryConfig
from icgate.gateway.errors import GatewayError
from icgate.gateway.pipeline.admit import candidates_for
from icgate.gateway.pipeline.authenticate import authenticate
from icgate.gateway.pipeline.explain import response_headers
from icgate.gateway.pipeline.route import route, route_features
from icgate.gateway.pipeline.run import Pipeline
from icgate.gateway.pipeline.stream import token_usage
from icgate.gateway.pipeline.target import Target, resolve_target
from icgate.gateway.records import ANONYMOUS, Endpoint, RequestContext, RequestRecord, Tenant
from icgate.gateway.route_models import RouteModels
from icgate.gateway.telemetry import Telemetry
from icgate.lengths.predict import OutputLengthHeuristic
from icgate.routers.base import RouteDecision, RouteFeatures
from icgate.routers.rules import LongPromptRule
from icgate.text import estimate_prompt_tokens as estimate_body_tokens

THRESHOLD = 50  # estimated prompt tokens above which the rule router picks the large tier


def make_policy(**overrides: Any) -> Policy:
    raw: dict[str, Any] = {
        "backends": [
            {"name": "small", "tier": "small", "model": "openai/s", "max_concurrent": 2},
            {"name": "large", "tier": "large", "model": "openai/l", "max_concurrent": 2},
        ],
        "routed_models": ["auto"],
        "router": {"kind": "rule", "large_if_prompt_tokens_over": THRESHOLD},
    }
    raw.update(overrides)
    return Policy.model_validate(raw)


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


class KeyTable:
    """An Authenticator over a dict."""

    def __init__(self, keys: dict[str, Tenant]) -> None:
        self.keys = keys
        self.seen: list[str] = []

    async def authenticate(self, plaintext: str) -> Tenant | None:
        self.seen.append(plaintext)
        return self.keys.get(plaintext)


class ListSink:
    def __init__(self, accept: bool = True) -> None:
        self.records: list[RequestRecord] = []
        self.accept = accept

    def submit(self, record: RequestRecord) -> bool:
        self.records.append(record)
        return self.accept


def reply(backend: str, prompt_tokens: int = 7, completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": f"cmpl-{backend}",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{backend} says hi"}}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def delta(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    total = prompt_tokens + completion_tokens
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
    return {"object": "chat.completion.chunk", "choices": [], "usage": usage}


def retryable(backend: str) -> BackendError:
    return BackendError(backend, 502, f"backend {backend} failed: boom", retryable=True)


class FakeClient:
    """Stands in for BackendClient. `script[name]` lists what each successive call to a backend does:
    an exception is raised; for `complete` a dict is returned; for `stream` a list of chunks is
    yielded, and an exception inside that list is raised mid-stream."""

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[str, str, str]] = []  # (kind, backend, endpoint)
        self.streams_opened = 0
        self.streams_closed = 0
        self.in_flight_seen: list[int] = []
        self.admission: Admission | None = None

    def _next(self, backend: BackendConfig) -> Any:
        if self.admission is not None:
            self.in_flight_seen.append(self.admission.states[backend.name].in_flight)
        queue = self.script.get(backend.name)
        return queue.pop(0) if queue else None

    async def complete(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("complete", backend.name, endpoint))
        outcome = self._next(backend)
        await asyncio.sleep(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome if outcome is not None else reply(backend.name)

    async def stream(
        self, backend: BackendConfig, endpoint: Endpoint, body: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(("stream", backend.name, endpoint))
        outcome = self._next(backend)
        if isinstance(outcome, BaseException):
            raise outcome
        items = outcome if outcome is not None else [delta(backend.name), delta(" done"), usage_chunk(5, 2)]
        return self._relay(items)

    async def _relay(self, items: list[Any]) -> AsyncIterator[dict[str, Any]]:
        self.streams_opened += 1
        try:
            for item in items:
                await asyncio.sleep(0)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.streams_closed += 1


class Harness:
    def __init__(self, policy: Policy | None = None, client: FakeClient | None = None, **kw: Any) -> None:
        self.policy = policy or make_policy()
        self.client = client or FakeClient()
        wait = kw.pop("max_queue_wait_s", 1.0)
        self.admission = Admission(self.policy.backends, AdmissionConfig(max_queue_wait_s=wait))
        self.client.admission = self.admission
        self.sink = ListSink(accept=kw.pop("accept", True))
        self.telemetry = kw.pop("telemetry", None) or Telemetry.from_config(TelemetryConfig())
        r = self.policy.router
        rule = LongPromptRule(r.default_tier, r.large_tier, r.large_if_prompt_tokens_over)
        self.pipeline = Pipeline(
            self.policy,
            self.client,  # type: ignore[arg-type]
            self.admission,
            self.telemetry,
            RouteModels(router=rule, length=OutputLengthHeuristic()),
            authenticator=kw.pop("authenticator", None),
            sink=self.sink,
        )
        assert not kw, kw

    def in_flight(self) -> dict[str, int]:
        return {name: state.in_flight for name, state in self.admission.states.items()}

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.telemetry.metrics.registry.get_sample_value(name, labels or {})


IDLE = {"small": 0, "large": 0}


# --- authenticate ---------------------------------------------------------------------------------

ALICE = Tenant(id=3, name="alice", api_key_id=9)


async def test_authenticate_valid_key_gives_its_tenant() -> None:
    table = KeyTable({"icg-good": ALICE})
    for required in (True, False):
        assert await authenticate("icg-good", AuthConfig(required=required), table) == ALICE


async def test_authenticate_not_required_lets_unknown_callers_in_as_anonymous() -> None:
    table = KeyTable({"icg-good": ALICE})
    auth = AuthConfig(required=False)
    assert await authenticate("icg-bad", auth, table) is ANONYMOUS
    assert await authenticate(None, auth, table) is ANONYMOUS
    assert await authenticate("icg-good", auth, None) is ANONYMOUS
    assert table.seen == ["icg-bad"]  # no key, no lookup


@pytest.mark.parametrize(("key", "message"), [("icg-bad", "Incorrect API key"), (None, "Missing API key")])
async def test_authenticate_required_refuses_with_401(key: str | None, message: str) -> None:
    with pytest.raises(GatewayError) as info:
        await authenticate(key, AuthConfig(required=True), KeyTable({"icg-good": ALICE}))
    err = info.value
    assert (err.status_code, err.code, err.type) == (401, "invalid_api_key", "invalid_request_error")
    assert message in err.message
    assert err.body()["error"]["code"] == "invalid_api_key"


# --- resolve_target, features, route, candidates ----------------------------------------------------


def test_resolve_target_routed_name_and_backend_name() -> None:
    policy = make_policy(routed_models=["auto", "cheap"])
    assert resolve_target("auto", policy) == Target(routed=True)
    assert resolve_target("cheap", policy) == Target(routed=True)
    large = resolve_target("large", policy)
    assert large.routed is False and large.backend == policy.backend("large")


def test_resolve_target_unknown_model_is_404_naming_the_param() -> None:
    with pytest.raises(GatewayError) as info:
        resolve_target("gpt-17", make_policy())
    err = info.value
    assert (err.status_code, err.code, err.param) == (404, "model_not_found", "model")
    assert "gpt-17" in err.message
    for name in ("auto", "small", "large"):
        assert name in err.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": [{"role": "user", "content": "x" * 40}]}, 10),
        ({"messages": [{"role": "system", "content": "x" * 8}, {"role": "user", "content": "y" * 12}]}, 5),
        ({"messages": [{"role": "assistant", "content": None}, {"role": "user", "content": "abcd"}]}, 1),
        ({"prompt": "z" * 81}, 20),
        ({"prompt": ""}, 1),
        ({}, 1),
    ],
)
def test_estimate_prompt_tokens_is_about_four_chars_a_token(body: dict[str, Any], expected: int) -> None:
    assert estimate_prompt_tokens(context_of(body)) == expected


def estimate_prompt_tokens(ctx: RequestContext) -> int:
    return estimate_body_tokens(ctx.body, ctx.endpoint)


def context_of(body: dict[str, Any]) -> RequestContext:
    return RequestContext(endpoint="chat" if "messages" in body else "completions", body=body)


def test_a_pass_through_messages_field_is_not_a_completions_input() -> None:
    ctx = RequestContext(endpoint="completions", body={"prompt": "z" * 40, "messages": 5})
    assert estimate_prompt_tokens(ctx) == 10
    assert route_features(ctx).conversation_depth == 0


def test_route_features_depth_counts_user_turns() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a" * 20},
            {"role": "assistant", "content": "b" * 20},
            {"role": "user", "content": "c" * 20},
            {"role": "tool", "content": "d" * 20},
        ]
    }
    features = route_features(context_of(body))
    assert features.conversation_depth == 2
    assert features.prompt_tokens == estimate_prompt_tokens(context_of(body))
    assert route_features(context_of({"prompt": "hello"})).conversation_depth == 0


class FixedRouter:
    """A rule-like router (no score): its decision stands as it gives it."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.seen: list[RouteFeatures] = []

    def route(self, features: RouteFeatures) -> RouteDecision:
        self.seen.append(features)
        return RouteDecision(tier=self.tier, score=None, reasons=("fixed",))


async def route_with(router: FixedRouter, target: Target, text: str = "hi") -> RouteDecision:
    models = RouteModels(router=router, length=OutputLengthHeuristic())
    ctx = RequestContext(endpoint="chat", body=chat(text))
    outcome = await route(ctx, target, None, models, make_policy(), None)
    return outcome.decision


async def test_route_named_backend_keeps_its_tier_without_asking_the_router() -> None:
    router = FixedRouter("small")
    decision = await route_with(router, resolve_target("large", make_policy()), "x" * 40_000)
    assert decision.tier == "large" and decision.score is None
    assert "large" in decision.reasons[0]
    assert router.seen == []


async def test_route_routed_target_asks_the_router() -> None:
    router = FixedRouter("large")
    decision = await route_with(router, Target(routed=True), "abcdefghijkl")
    assert decision == RouteDecision(tier="large", score=None, reasons=("fixed",))
    assert [(f.prompt_tokens, f.conversation_depth, f.text) for f in router.seen] == [(3, 1, "abcdefghijkl")]


def test_candidates_for_tier_named_backend_and_empty_tier() -> None:
    policy = make_policy(
        backends=[
            {"name": "s1", "tier": "small", "model": "m"},
            {"name": "s2", "tier": "small", "model": "m"},
            {"name": "l1", "tier": "large", "model": "m"},
        ]
    )
    decision = RouteDecision(tier="small", score=None, reasons=())
    assert [b.name for b in candidates_for(Target(routed=True), decision.tier, policy)] == ["s1", "s2"]
    named = Target(routed=False, backend=policy.backend("s2"))
    assert candidates_for(named, "large", policy) == [policy.backend("s2")]
    with pytest.raises(GatewayError) as info:
        candidates_for(Target(routed=True), "medium", policy)
    assert info.value.status_code == 503 and "medium" in info.value.message


# --- response_headers, token_usage ---------------------------------------------------------------------


def test_response_headers_plain() -> None:
    policy = make_policy()
    ctx = RequestContext(endpoint="chat", body=chat())
    ctx.route, ctx.backend, ctx.queue_s = "small", policy.backend("small"), 0.0125
    ctx.decisions["route"] = {"score": None}
    headers = response_headers(ctx)
    assert headers["x-icgate-request-id"] == ctx.request_id
    assert headers["x-icgate-route"] == "small"
    assert headers["x-icgate-backend"] == "small"
    assert headers["x-icgate-queue-ms"] == "12.50"
    assert float(headers["x-icgate-overhead-ms"]) >= 0
    assert "x-icgate-fallback-from" not in headers
    assert "x-icgate-router-score" not in headers


def test_response_headers_with_fallback_and_score() -> None:
    policy = make_policy()
    ctx = RequestContext(endpoint="chat", body=chat())
    ctx.route, ctx.backend, ctx.fallback_from = "large", policy.backend("large"), "small"
    ctx.decisions["route"] = {"score": 0.123456}
    headers = response_headers(ctx)
    assert headers["x-icgate-fallback-from"] == "small"
    assert headers["x-icgate-router-score"] == "0.1235"
    assert headers["x-icgate-backend"] == "large"


def test_response_headers_before_any_decision() -> None:
    headers = response_headers(RequestContext(endpoint="completions", body={}))
    assert headers["x-icgate-route"] == "none" and headers["x-icgate-backend"] == "none"


def test_token_usage() -> None:
    assert token_usage(reply("x", prompt_tokens=11, completion_tokens=4)) == (11, 4)
    assert token_usage({"usage": None}) == (0, 0)
    assert token_usage({}) == (0, 0)
    assert token_usage({"usage": {"prompt_tokens": 2}}) == (2, 0)


# --- Pipeline.run: non-streaming --------------------------------------------------------------------


async def test_run_routes_calls_and_records_once() -> None:
    h = Harness()
    ctx = RequestContext(endpoint="chat", body=chat("hi there"))
    result = await h.pipeline.run(ctx)

    assert result.response is not None and result.chunks is None
    assert result.response["id"] == "cmpl-small"
    assert h.client.calls == [("complete", "small", "chat")]
    assert h.client.in_flight_seen == [1]  # the slot is held during the call
    assert h.in_flight() == IDLE
    assert (ctx.route, ctx.backend and ctx.backend.name) == ("small", "small")
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (7, 3)
    assert ctx.decisions["authenticate"] == {"tenant": "anonymous"}
    assert ctx.decisions["target"] == {"routed": True}
    assert ctx.decisions["route"]["tier"] == "small"
    assert ctx.decisions["route"]["prompt_tokens_est"] == estimate_prompt_tokens(ctx)
    assert ctx.decisions["admit"]["backend"] == "small"
    assert "fallback" not in ctx.decisions

    [record] = h.sink.records
    assert record.request_id == ctx.request_id
    assert (record.route, record.backend, record.status_code, record.stream) == ("small", "small", 200, False)
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)
    assert record.fallback_from is None
    assert record.decisions is ctx.decisions
    assert result.headers()["x-icgate-route"] == "small"
    assert h.metric("icgate_requests_total", {"route": "small", "backend": "small", "status": "200"}) == 1
    assert h.metric("icgate_inflight_requests") == 0


async def test_run_long_prompt_goes_to_large_and_named_backend_is_honoured() -> None:
    h = Harness()
    long_ctx = RequestContext(endpoint="chat", body=chat("x" * 4 * (THRESHOLD + 1)))
    await h.pipeline.run(long_ctx)
    named_ctx = RequestContext(endpoint="chat", body={**chat("x" * 4 * (THRESHOLD + 1)), "model": "small"})
    await h.pipeline.run(named_ctx)
    assert [c[1] for c in h.client.calls] == ["large", "small"]
    assert long_ctx.route == "large" and named_ctx.route == "small"
    assert named_ctx.decisions["target"] == {"routed": False}
    assert [r.backend for r in h.sink.records] == ["large", "small"]


async def test_run_authenticates_with_the_authenticator() -> None:
    h = Harness(policy=make_policy(auth={"required": True}), authenticator=KeyTable({"icg-good": ALICE}))
    ctx = RequestContext(endpoint="chat", body=chat())
    await h.pipeline.run(ctx, api_key="icg-good")
    assert ctx.tenant == ALICE
    assert ctx.decisions["authenticate"] == {"tenant": "alice"}
    assert (h.sink.records[0].tenant_id, h.sink.records[0].api_key_id) == (3, 9)

    bad = RequestContext(endpoint="chat", body=chat())
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(bad, api_key="icg-bad")
    assert info.value.status_code == 401
    assert len(h.client.calls) == 1  # the refused request never reached a backend
    assert h.sink.records[-1].status_code == 401 and h.sink.records[-1].backend is None


async def test_run_unknown_model_is_recorded_as_404() -> None:
    h = Harness()
    ctx = RequestContext(endpoint="chat", body={**chat(), "model": "nope"})
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(ctx)
    assert info.value.code == "model_not_found"
    assert h.client.calls == []
    [record] = h.sink.records
    assert (record.status_code, record.error_type, record.route) == (404, "invalid_request_error", None)
    assert h.metric("icgate_inflight_requests") == 0


async def test_run_falls_back_once_on_a_retryable_error() -> None:
    h = Harness(client=FakeClient({"small": [retryable("small")]}))
    ctx = RequestContext(endpoint="chat", body=chat())
    result = await h.pipeline.run(ctx)

    assert result.response is not None and result.response["id"] == "cmpl-large"
    assert [c[1] for c in h.client.calls] == ["small", "large"]
    assert (ctx.fallback_from, ctx.route, ctx.backend and ctx.backend.name) == ("small", "large", "large")
    assert ctx.decisions["fallback"] == {"from": "small", "to": "large", "error": "http_502"}
    assert ctx.decisions["admit"]["backend"] == "large"
    assert result.headers()["x-icgate-fallback-from"] == "small"
    assert h.in_flight() == IDLE
    [record] = h.sink.records
    assert (record.fallback_from, record.backend, record.route, record.status_code) == (
        "small",
        "large",
        "large",
        200,
    )
    assert h.metric("icgate_fallbacks_total", {"from_backend": "small", "to_backend": "large"}) == 1
    assert h.metric("icgate_backend_errors_total", {"backend": "small", "kind": "http_502"}) == 1


async def test_run_does_not_fall_back_on_a_client_error() -> None:
    bad_request = BackendError("small", 400, "max_tokens is too large", retryable=False)
    h = Harness(client=FakeClient({"small": [bad_request]}))
    ctx = RequestContext(endpoint="chat", body=chat())
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(ctx)
    assert (info.value.status_code, info.value.type) == (400, "invalid_request_error")
    assert "max_tokens is too large" in info.value.message
    assert [c[1] for c in h.client.calls] == ["small"]
    assert ctx.fallback_from is None and "fallback" not in ctx.decisions
    assert h.in_flight() == IDLE
    [record] = h.sink.records
    assert (record.status_code, record.backend) == (400, "small")


@pytest.mark.parametrize(("status", "expected"), [(502, 502), (504, 504)])
async def test_run_both_backends_failing_is_a_server_error(status: int, expected: int) -> None:
    errors = {n: [BackendError(n, status, f"{n} down", retryable=True)] for n in ("small", "large")}
    h = Harness(client=FakeClient(errors))
    ctx = RequestContext(endpoint="chat", body=chat())
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(ctx)
    assert (info.value.status_code, info.value.code, info.value.type) == (
        expected,
        "backend_error",
        "server_error",
    )
    assert [c[1] for c in h.client.calls] == ["small", "large"]  # one fallback, not more
    assert h.in_flight() == IDLE
    assert [r.status_code for r in h.sink.records] == [expected]


async def test_run_without_fallback_target_fails_after_one_attempt() -> None:
    policy = make_policy(backends=[{"name": "only", "tier": "small", "model": "m"}])
    h = Harness(policy=policy, client=FakeClient({"only": [retryable("only")]}))
    with pytest.raises(GatewayError) as info:
        await h.pipeline.run(RequestContext(endpoint="chat", body=chat()))
    assert info.value.status_code == 502
    assert h.client.calls == [("complete", "only", "chat")]


async def test_run_saturated_backend_is_refused_with_429_and_retry_after() -> None:
    h = Harness(max_queue_wait_s=0.05)
    small = h.policy.backend("small")
    assert small is not None
    ask = Ask(prompt_tokens=1, output_tokens=1)
    async with h.admission.hold(small, ask), h.admission.hold(small, ask):  # max_concurrent: 2, both taken
        ctx = RequestContext(endpoint="chat", body=chat())
        with pytest.raises(GatewayError) as info:
            await h.pipeline.run(ctx)
    err = info.value
    assert (err.status_code, err.code, err.type) == (429, "backend_at_capacity", "rate_limit_error")
    assert int(err.headers["retry-after"]) >= 1
    assert h.client.calls == []
    assert h.in_flight() == IDLE and h.admission.states["small"].waiting == 0
    assert h.sink.records[0].status_code == 429
    [attempt] = ctx.decisions["attempts"]  # it queued, then was refused: an attempt that never called
    assert (attempt["backend"], attempt["outcome"]) == ("small", "refused") and "capacity" in attempt["error"]


async def test_run_counts_records_the_sink_drops() -> None:
    h = Harness(accept=False)
    await h.pipeline.run(RequestContext(endpoint="chat", body=chat()))
    assert len(h.sink.records) == 1
    assert h.metric("icgate_request_log_dropped_total") == 1


# --- Pipeline.run: streaming ------------------------------------------------------------------------


async def test_stream_records_once_after_it_is_consumed_and_releases_the_slot() -> None:
    h = Harness()
    ctx = RequestContext(endpoint="chat", body=chat(stream=True))
    result = await h.pipeline.run(ctx)
    assert result.response is None and result.chunks is not None
    # The stream is open: the slot is held and nothing is recorded yet.
    assert h.in_flight() == {"small": 1, "large": 0}
    assert h.sink.records == []

    chunks = [chunk async for chunk in result.chunks]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:2]] == ["small", " done"]
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert h.in_flight() == IDLE
    [record] = h.sink.records
    assert record.stream is True and record.status_code == 200 and record.backend == "small"
    assert (record.prompt_tokens, record.completion_tokens) == (5, 2)
    assert h.client.streams_closed == 1
    assert h.metric("icgate_inflight_requests") == 0


async def test_stream_released_when_the_consumer_stops_early() -> None:
    h = Harness()
    result = await h.pipeline.run(RequestContext(endpoint="chat", body=chat(stream=True)))
    assert result.chunks is not None
    first = await anext(result.chunks)
    assert first["choices"][0]["delta"]["content"] == "small"
    assert h.in_flight()["small"] == 1

    await result.chunks.aclose()  # type: ignore[attr-defined]
    assert h.in_flight() == IDLE
    assert len(h.sink.records) == 1
    assert h.metric("icgate_inflight_requests") == 0


async def test_stream_released_when_the_consumer_leaves_before_the_first_chunk() -> None:
    # A client that disconnects before the server sends anything: the HTTP layer never
    # iterates the stream, at most closes it. The slot must not stay held forever.
    h = Harness()
    result = await h.pipeline.run(RequestContext(endpoint="chat", body=chat(stream=True)))
    assert result.chunks is not None
    await result.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    assert h.in_flight() == IDLE
    assert len(h.sink.records) == 1


async def test_stream_falls_back_when_the_first_chunk_fails() -> None:
    h = Harness(client=FakeClient({"small": [[retryable("small")]]}))
    ctx = RequestContext(endpoint="chat", body=chat(stream=True))
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None
    chunks = [c async for c in result.chunks]
    assert chunks[0]["choices"][0]["delta"]["content"] == "large"
    assert [c[1] for c in h.client.calls] == ["small", "large"]
    assert ctx.fallback_from == "small" and result.headers()["x-icgate-fallback-from"] == "small"
    assert h.in_flight() == IDLE
    assert [r.backend for r in h.sink.records] == ["large"]
    attempts = [(a["backend"], a["role"], a["outcome"]) for a in ctx.decisions["attempts"]]
    assert attempts == [("small", "first", "failed"), ("large", "fallback", "answered")]


async def test_stream_open_error_falls_back() -> None:
    h = Harness(client=FakeClient({"small": [retryable("small")]}))
    ctx = RequestContext(endpoint="chat", body=chat(stream=True))
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None
    chunks = [c async for c in result.chunks]
    assert chunks[0]["choices"][0]["delta"]["content"] == "large"
    assert ctx.backend is not None and ctx.backend.name == "large"


async def test_stream_failing_midway_ends_with_502_and_is_recorded() -> None:
    script = {"small": [[delta("partial"), retryable("small")]]}
    h = Harness(client=FakeClient(script))
    ctx = RequestContext(endpoint="chat", body=chat(stream=True))
    result = await h.pipeline.run(ctx)
    assert result.chunks is not None
    received: list[dict[str, Any]] = []
    with pytest.raises(GatewayError) as info:
        async for chunk in result.chunks:
            received.append(chunk)
    assert (info.value.status_code, info.value.code) == (502, "backend_error")
    assert len(received) == 1
    assert [c[1] for c in h.client.calls] == ["small"]  # no fallback once chunks were sent
    assert h.in_flight() == IDLE
    [record] = h.sink.records
    assert (record.status_code, record.error_type) == (502, "backend_error")
    [attempt] = record.decisions["attempts"]  # it opened, then broke: the attempt says so
    assert (attempt["outcome"], attempt["status"]) == ("cut", 502)


async def test_empty_stream_records_and_releases() -> None:
    h = Harness(client=FakeClient({"small": [[]]}))
    result = await h.pipeline.run(
        RequestContext(endpoint="completions", body={"model": "auto", "prompt": "x", "stream": True})
    )
    assert result.chunks is not None
    assert [c async for c in result.chunks] == []
    assert h.client.calls == [("stream", "small", "completions")]
    assert h.in_flight() == IDLE and len(h.sink.records) == 1


# --- traces -------------------------------------------------------------------------------------


async def test_run_traces_one_span_per_stage_under_the_request_span() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    h = Harness(telemetry=Telemetry.from_config(TelemetryConfig(), exporter=exporter))
    h.client.script["small"] = [retryable("small")]
    ctx = RequestContext(endpoint="chat", body=chat())
    await h.pipeline.run(ctx)
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "icgate.request")
    names = [s.name for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    # one admit and one backend span per attempt: the small one failed, the large one answered
    assert names == [
        "icgate.authenticate",
        "icgate.resolve_target",
        "icgate.route",
        "icgate.admit",
        "icgate.backend",
        "icgate.admit",
        "icgate.backend",
    ]
    assert root.attributes is not None
    assert root.attributes["icgate.request_id"] == ctx.request_id
    assert root.attributes["icgate.backend"] == "large"
    assert root.attributes["icgate.fallback_from"] == "small"
    failed_backend = next(s for s in spans if s.name == "icgate.backend")
    assert not failed_backend.status.is_ok
