"""Backends that fail, hang or stall, over real HTTP against the stand-ins: what the client gets, what is
retried, how long it takes, and when a backend stops being called (its circuit breaker)."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

StartGateway = Callable[[Policy], RunningGateway]
FAST = 10.0  # seconds: generous, but far from the 120 s a hung backend used to cost


def chat(
    gw: RunningGateway, model: str = "auto", control: dict[str, Any] | None = None, **extra: Any
) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    if control is not None:
        body["x_standin"] = control
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)


def stream_events(gw: RunningGateway, model: str = "auto", control: dict[str, Any] | None = None) -> tuple[
    httpx.Headers, int, list[dict[str, Any]]
]:  # fmt: skip
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": "a b c d"}],
    }
    if control is not None:
        body["x_standin"] = control
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        if resp.status_code != 200:  # failed before the first byte: a plain JSON error
            return resp.headers, resp.status_code, [json.loads(resp.read())]
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        status, headers = resp.status_code, resp.headers
    return headers, status, [json.loads(line) for line in lines if line != "[DONE]"]


def metric(gw: RunningGateway, line_start: str) -> float | None:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def policy_with(standins: Standins, transport: str, small: dict[str, Any] | None = None,
                large: dict[str, Any] | None = None, **overrides: Any) -> Policy:  # fmt: skip
    policy = standin_policy(standins, transport, **overrides)
    for backend, fields in zip(policy.backends, (small or {}, large or {}), strict=True):
        for key, value in fields.items():
            setattr(backend, key, value)
    return policy


# --- errors: whose fault, what the client reads ---------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_rejected_request_is_the_clients_error_not_retried_not_counted(
    standins: Standins, start_gateway: StartGateway, transport: str, status: int
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    reason = "The model `small-model` does not exist." if status == 404 else "'messages' is malformed"
    for _ in range(6):  # more than the circuit breaker's default threshold
        resp = chat(gw, control={"fail": status, "fail_message": reason})
        assert resp.status_code == status
        error = resp.json()["error"]
        assert error["message"] == f"The backend 'small' rejected the request ({status}): {reason}"
        assert error["type"] == "invalid_request_error"
        assert "litellm" not in resp.text and "OpenAIException" not in resp.text
    assert not standins.large.received
    assert len(standins.small.received) == 6
    assert metric(gw, 'icgate_backend_errors_total{backend="small"') is None
    assert gw.gateway.admission.circuits()["small"] == "closed"


def test_context_window_exceeded_says_so(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    message = "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens."
    resp = chat(gw, control={"fail": 400, "fail_message": message})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert message in resp.json()["error"]["message"]


def test_a_backend_refusing_the_gateways_key_is_a_server_error_and_falls_back(
    standins: Standins,
    start_gateway: StartGateway,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ICGATE_TEST_SMALL_KEY", "sk-very-secret-value")
    gw = start_gateway(policy_with(standins, transport, small={"api_key_env": "ICGATE_TEST_SMALL_KEY"}))
    caplog.set_level(logging.WARNING, logger="icgate")
    rescued = chat(gw, control={"fail": 401, "only": "small-model", "fail_message": "Incorrect API key"})
    assert rescued.status_code == 200
    assert rescued.headers["x-icgate-fallback-from"] == "small"
    assert standins.small.received[0]["headers"]["authorization"] == "Bearer sk-very-secret-value"
    both = chat(gw, control={"fail": 403})
    assert both.status_code == 502
    error = both.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "backend_error")
    assert "backend authentication failed" in error["message"]
    assert 'kind="auth"' in httpx.get(gw.url + "/metrics").text
    # The full detail is logged with the request id, the key never.
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("icgate")]
    request_id = both.headers["x-icgate-request-id"]
    assert any(request_id in m and "403" in m for m in logged), logged
    assert "sk-very-secret-value" not in caplog.text


def test_backend_rate_limiting_is_a_429_after_the_fallback(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = chat(gw, control={"fail": 429})
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert "retry-after" in resp.headers
    assert len(standins.small.received) == 1 and len(standins.large.received) == 1


# --- hanging and stalling backends ----------------------------------------------------------------------


def test_a_hung_stream_fails_over_after_its_first_byte_timeout(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(policy_with(standins, transport, small={"ttfb_timeout_s": 1.0}))
    started = time.monotonic()
    headers, status, chunks = stream_events(gw, control={"hang_s": 60, "only": "small-model"})
    assert time.monotonic() - started < FAST
    assert status == 200 and headers["x-icgate-fallback-from"] == "small"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "large-model says: a b c d"
    assert (
        'icgate_backend_errors_total{backend="small",kind="timeout"} 1.0'
        in httpx.get(gw.url + "/metrics").text
    )


def test_a_hung_whole_answer_fails_over_after_timeout_s(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(policy_with(standins, transport, small={"timeout_s": 1.0}))
    started = time.monotonic()
    resp = chat(gw, control={"hang_s": 60, "only": "small-model"})
    assert time.monotonic() - started < FAST
    assert resp.status_code == 200 and resp.headers["x-icgate-fallback-from"] == "small"


def test_the_first_byte_timeout_defaults_to_the_latency_objective(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    # ttft objective 500 ms: the first chunk may take 1.5 s (objective plus a 1 s margin), not 30 s.
    gw = start_gateway(standin_policy(standins, transport, admission={"ttft_slo_ms": 500}))
    started = time.monotonic()
    headers, status, _ = stream_events(gw, control={"hang_s": 60, "only": "small-model"})
    assert time.monotonic() - started < FAST
    assert status == 200 and headers["x-icgate-fallback-from"] == "small"


@pytest.mark.parametrize("stream", [False, True])
def test_two_hung_backends_share_one_request_budget(
    standins: Standins, start_gateway: StartGateway, transport: str, stream: bool
) -> None:
    # Alone, small would give up after 2 s and large after 60 s; the request's 3 s budget bounds both.
    small, large = {"timeout_s": 2.0, "ttfb_timeout_s": 2.0}, {"timeout_s": 60.0, "ttfb_timeout_s": 60.0}
    gw = start_gateway(policy_with(standins, transport, small=small, large=large, request_timeout_s=3.0))
    started = time.monotonic()
    if stream:
        _, status, chunks = stream_events(gw, control={"hang_s": 60})
        error = chunks[0]["error"] if chunks else {}
    else:
        resp = chat(gw, control={"hang_s": 60})
        status, error = resp.status_code, resp.json()["error"]
    assert time.monotonic() - started < FAST
    assert status == 504 and error["code"] == "backend_error"
    assert len(standins.small.received) == 1 and len(standins.large.received) == 1


def test_a_stream_that_stalls_ends_with_an_error_event_and_counts_against_the_backend(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(policy_with(standins, transport, small={"timeout_s": 1.0}))
    started = time.monotonic()
    headers, status, chunks = stream_events(gw, control={"stall_after_first_s": 60})
    assert time.monotonic() - started < FAST
    assert status == 200 and headers["x-icgate-backend"] == "small"
    assert chunks[0]["choices"][0]["delta"]["content"] == "small-model"
    assert chunks[-1]["error"]["code"] == "backend_error"
    assert gw.gateway.admission.states["small"].errors == 1


# --- the circuit breaker --------------------------------------------------------------------------------


def test_a_failing_backend_stops_being_called_then_is_probed_again(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    # A cool-down long enough for the eight requests and the checks below on a loaded machine.
    breaker = {"failures": 3, "cooldown_s": 5.0}
    gw = start_gateway(standin_policy(standins, transport, circuit_breaker=breaker))
    standins.small.fail_next = 1000
    for n in range(8):
        resp = chat(gw)
        assert resp.status_code == 200 and resp.headers["x-icgate-backend"] == "large"
        # Three failures fall back; then small's circuit is open and admission sends its tier's
        # requests straight to the other tier (a spill), without calling small at all.
        assert resp.headers.get("x-icgate-fallback-from") == ("small" if n < 3 else None)
    assert len(standins.small.received) == 3
    assert metric(gw, 'icgate_admission_backend_circuit_open{backend="small"}') == 1.0
    assert metric(gw, 'icgate_admission_backend_circuit_open{backend="large"}') == 0.0
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["backends"]["small"] == "open"
    # After the cool-down one probe goes through; it succeeds, the circuit closes.
    standins.small.fail_next = 0
    deadline = time.monotonic() + 10
    while gw.gateway.admission.circuits()["small"] != "half_open" and time.monotonic() < deadline:
        time.sleep(0.05)
    resp = chat(gw)
    assert resp.headers["x-icgate-backend"] == "small" and "x-icgate-fallback-from" not in resp.headers
    assert len(standins.small.received) == 4
    assert gw.gateway.admission.circuits()["small"] == "closed"
    assert metric(gw, 'icgate_admission_backend_circuit_open{backend="small"}') == 0.0


def test_a_failed_probe_reopens_the_circuit(standins: Standins, start_gateway: StartGateway) -> None:
    breaker = {"failures": 2, "cooldown_s": 0.5}
    gw = start_gateway(standin_policy(standins, "http", circuit_breaker=breaker))
    standins.small.fail_next = 1000
    for _ in range(3):
        chat(gw)
    assert len(standins.small.received) == 2
    time.sleep(0.6)
    chat(gw)  # the probe, which fails
    chat(gw)
    assert len(standins.small.received) == 3
    assert gw.gateway.admission.circuits()["small"] == "open"


def test_with_every_circuit_open_requests_get_503_and_readyz_says_unavailable(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    breaker = {"failures": 1, "cooldown_s": 60}
    gw = start_gateway(standin_policy(standins, transport, circuit_breaker=breaker))
    assert httpx.get(gw.url + "/readyz").json() == {
        "status": "ready",
        "backends": {"small": "closed", "large": "closed"},
    }
    assert chat(gw, control={"fail": 500}).status_code == 502  # small fails, then large: both open
    resp = chat(gw)
    assert resp.status_code == 503
    assert (resp.json()["error"]["type"], resp.json()["error"]["code"]) == (
        "server_error",
        "backend_unavailable",
    )
    assert int(resp.headers["retry-after"]) >= 1
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "backends": {"small": "open", "large": "open"}}
    assert len(standins.small.received) == 1 and len(standins.large.received) == 1


# --- fallback across tiers ------------------------------------------------------------------------------


def test_a_request_for_large_is_never_answered_by_small_unless_allowed(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    resp = chat(gw, model="large", control={"fail": 500})
    assert resp.status_code == 502
    assert not standins.small.received
    # A small request may be answered by large: no downgrade.
    up = chat(gw, model="small", control={"fail": 500, "only": "small-model"})
    assert up.status_code == 200 and up.headers["x-icgate-backend"] == "large"
    assert "x-icgate-downgraded" not in up.headers

    allowed = start_gateway(standin_policy(standins, transport, allow_downgrade=True))
    down = chat(allowed, model="large", control={"fail": 500, "only": "large-model"})
    assert down.status_code == 200
    assert down.headers["x-icgate-backend"] == "small"
    assert down.headers["x-icgate-fallback-from"] == "large"
    assert down.headers["x-icgate-downgraded"] == "true"


def test_a_routed_request_may_fall_back_to_a_lower_tier_and_says_so(
    standins: Standins, start_gateway: StartGateway, transport: str
) -> None:
    gw = start_gateway(standin_policy(standins, transport))
    # ~500 estimated tokens: routed to large.
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 2}
    resp = chat(gw, control={"fail": 500, "only": "large-model"}, **body)
    assert resp.status_code == 200
    assert resp.headers["x-icgate-backend"] == "small" and resp.headers["x-icgate-downgraded"] == "true"


# --- no leaked connections -------------------------------------------------------------------------------


def test_failing_litellm_calls_leave_no_unclosed_connections(
    standins: Standins, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    policy = standin_policy(standins, "litellm", circuit_breaker={"enabled": False})
    policy.backends[1].mode = "completion"  # litellm's text-completion route, where sessions leaked
    gw = start_gateway(policy)
    caplog.set_level(logging.WARNING)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    for model in ("small", "large"):
        for stream in (False, True):
            for fail in (500, 404):
                with pytest.raises(openai.APIStatusError):
                    resp = client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": "x"}],
                        stream=stream,
                        extra_body={"x_standin": {"fail": fail}},
                    )
                    if stream:
                        list(resp)
            with pytest.raises(openai.APIStatusError):
                client.completions.create(model=model, prompt="x", extra_body={"x_standin": {"fail": 500}})
    gc.collect()
    time.sleep(0.2)
    assert "Unclosed" not in caplog.text
