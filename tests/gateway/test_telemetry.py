from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from icgate.gateway.config import TelemetryConfig
from icgate.gateway.records import RequestRecord
from icgate.gateway.telemetry import LoopLagMonitor, Metrics, Telemetry, Tracing


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    assert span.attributes is not None
    return span.attributes


def make_record(**overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "created_at": datetime.now(UTC),
        "tenant_id": None,
        "api_key_id": None,
        "endpoint": "chat",
        "model_requested": "auto",
        "route": "small",
        "backend": "gemma",
        "fallback_from": None,
        "stream": False,
        "status_code": 200,
        "error_type": None,
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "cost_usd": 0.25,
        "latency_ms": 1500.0,
        "overhead_ms": 2.0,
        "queue_ms": 40.0,
        "decisions": {},
    }
    fields.update(overrides)
    return RequestRecord(**fields)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in the rendered output, None if absent."""
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    return None


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Iterator[Telemetry]:
    t = Telemetry.from_config(TelemetryConfig(), exporter=exporter)
    yield t
    t.shutdown()


def test_request_span_with_stages_nests(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    tracing = telemetry.tracing
    with tracing.request_span("req-abc", {"icgate.endpoint": "chat", "skipped": None}) as root:
        for stage in ("policy", "route", "backend"):
            with tracing.stage_span(stage, {"icgate.stage": stage}):
                pass
        tracing.record_outcome(root, make_record())

    spans = exporter.get_finished_spans()
    assert len(spans) == 4
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"icgate.request", "icgate.policy", "icgate.route", "icgate.backend"}
    root_span = by_name["icgate.request"]
    assert root_span.parent is None
    assert root_span.kind == trace.SpanKind.SERVER
    assert attrs(root_span)["icgate.request_id"] == "req-abc"
    assert attrs(root_span)["icgate.endpoint"] == "chat"
    assert "skipped" not in attrs(root_span)
    assert attrs(root_span)["icgate.route"] == "small"
    assert attrs(root_span)["http.response.status_code"] == 200
    assert "error.type" not in attrs(root_span)
    for stage in ("policy", "route", "backend"):
        child = by_name[f"icgate.{stage}"]
        assert child.parent is not None
        assert child.parent.span_id == root_span.context.span_id
        assert child.context.trace_id == root_span.context.trace_id
        assert attrs(child)["icgate.stage"] == stage
    assert root_span.resource.attributes["service.name"] == "icgate"


def test_request_span_is_a_new_trace_even_inside_another_span(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    tracing = telemetry.tracing
    with tracing.request_span("outer", {}), tracing.request_span("inner", {}):
        pass
    inner, outer = exporter.get_finished_spans()
    assert inner.parent is None
    assert inner.context.trace_id != outer.context.trace_id


async def test_concurrent_requests_keep_their_own_children(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    tracing = telemetry.tracing

    async def handle(request_id: str) -> None:
        with tracing.request_span(request_id, {}):
            for stage in ("embed", "backend"):
                with tracing.stage_span(stage):
                    await asyncio.sleep(0.01)

    await asyncio.gather(handle("a"), handle("b"))
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    roots = {attrs(s)["icgate.request_id"]: s for s in spans if s.name == "icgate.request"}
    for stage_span in (s for s in spans if s.name != "icgate.request"):
        owners = [
            rid
            for rid, r in roots.items()
            if stage_span.parent is not None and r.context.span_id == stage_span.parent.span_id
        ]
        assert len(owners) == 1
    for root in roots.values():
        children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        assert sorted(c.name for c in children) == ["icgate.backend", "icgate.embed"]


def test_exception_marks_span_as_error(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    tracing = telemetry.tracing
    with pytest.raises(RuntimeError), tracing.request_span("req-x", {}), tracing.stage_span("backend"):
        raise RuntimeError("backend down")
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert all(s.status.status_code == trace.StatusCode.ERROR for s in spans)
    assert any(e.name == "exception" for e in spans[0].events)


def test_error_outcome_marks_root_span(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with telemetry.tracing.request_span("req-e", {}) as span:
        telemetry.tracing.record_outcome(span, make_record(status_code=502, error_type="backend_timeout"))
    (root,) = exporter.get_finished_spans()
    assert root.status.status_code == trace.StatusCode.ERROR
    assert attrs(root)["error.type"] == "backend_timeout"


def test_two_instances_share_neither_spans_nor_metrics() -> None:
    exp_a, exp_b = InMemorySpanExporter(), InMemorySpanExporter()
    a = Telemetry.from_config(TelemetryConfig(service_name="a"), exporter=exp_a)
    b = Telemetry.from_config(TelemetryConfig(service_name="b"), exporter=exp_b)
    try:
        with a.tracing.request_span("req-a", {}), a.tracing.stage_span("route"):
            pass
        a.metrics.observe(make_record())
        assert len(exp_a.get_finished_spans()) == 2
        assert exp_b.get_finished_spans() == ()
        assert a.metrics.registry is not b.metrics.registry
        labels = {"route": "small", "backend": "gemma", "status": "200"}
        assert sample(a.metrics, "icgate_requests_total", labels) == 1
        assert sample(b.metrics, "icgate_requests_total", labels) is None
        # The global OTel provider is left alone.
        assert not isinstance(trace.get_tracer_provider(), type(a.tracing.provider))
    finally:
        a.shutdown()
        b.shutdown()


def test_observe_counts_the_record() -> None:
    m = Metrics()
    m.observe(make_record())
    m.observe(make_record(status_code=502, error_type="backend_error", completion_tokens=0, cost_usd=0.0))
    m.observe(
        make_record(
            route="cache", backend=None, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, queue_ms=0.0
        )
    )

    assert sample(m, "icgate_requests_total", {"route": "small", "backend": "gemma", "status": "200"}) == 1
    assert sample(m, "icgate_requests_total", {"route": "small", "backend": "gemma", "status": "502"}) == 1
    assert sample(m, "icgate_requests_total", {"route": "cache", "backend": "none", "status": "200"}) == 1
    assert sample(m, "icgate_route_total", {"route": "small"}) == 2
    assert sample(m, "icgate_route_total", {"route": "cache"}) == 1
    assert sample(m, "icgate_tokens_total", {"backend": "gemma", "kind": "prompt"}) == 24
    assert sample(m, "icgate_tokens_total", {"backend": "gemma", "kind": "completion"}) == 30
    assert sample(m, "icgate_tokens_total", {"backend": "none", "kind": "prompt"}) is None
    assert sample(m, "icgate_cost_usd_total", {"backend": "gemma"}) == pytest.approx(0.25)

    assert sample(m, "icgate_request_latency_seconds_count", {"route": "small"}) == 2
    assert sample(m, "icgate_request_latency_seconds_sum", {"route": "small"}) == pytest.approx(3.0)
    # 1.5 s falls in the 2.5 s bucket, not the 1 s one.
    assert sample(m, "icgate_request_latency_seconds_bucket", {"route": "small", "le": "1.0"}) == 0
    assert sample(m, "icgate_request_latency_seconds_bucket", {"route": "small", "le": "2.5"}) == 2
    # 2 ms overhead: above the 1 ms bucket, inside the 2.5 ms one.
    assert sample(m, "icgate_overhead_seconds_bucket", {"route": "small", "le": "0.001"}) == 0
    assert sample(m, "icgate_overhead_seconds_bucket", {"route": "small", "le": "0.0025"}) == 2
    assert sample(m, "icgate_overhead_seconds_bucket", {"route": "small", "le": "0.0001"}) == 0
    assert sample(m, "icgate_queue_wait_seconds_count") == 3
    assert sample(m, "icgate_queue_wait_seconds_sum") == pytest.approx(0.08)


def test_errors_fallbacks_and_dropped_logs() -> None:
    m = Metrics()
    m.backend_error("gemma", "timeout")
    m.backend_error("gemma", "timeout")
    m.fallback("gemma", "smollm")
    m.request_log_dropped(3)
    assert sample(m, "icgate_backend_errors_total", {"backend": "gemma", "kind": "timeout"}) == 2
    assert sample(m, "icgate_fallbacks_total", {"from_backend": "gemma", "to_backend": "smollm"}) == 1
    assert sample(m, "icgate_request_log_dropped_total") == 3


def test_inflight_gauges_go_back_down_even_on_error() -> None:
    m = Metrics()
    assert sample(m, "icgate_inflight_requests") == 0
    with m.inflight(), m.backend_inflight("gemma"):
        assert sample(m, "icgate_inflight_requests") == 1
        assert sample(m, "icgate_backend_inflight", {"backend": "gemma"}) == 1
        with m.inflight():
            assert sample(m, "icgate_inflight_requests") == 2
    assert sample(m, "icgate_inflight_requests") == 0
    assert sample(m, "icgate_backend_inflight", {"backend": "gemma"}) == 0

    with pytest.raises(ValueError), m.inflight(), m.backend_inflight("gemma"):
        assert sample(m, "icgate_inflight_requests") == 1
        raise ValueError("boom")
    assert sample(m, "icgate_inflight_requests") == 0
    assert sample(m, "icgate_backend_inflight", {"backend": "gemma"}) == 0


def test_render_content_type() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    assert b"icgate_requests_total" in body or b"# HELP icgate_requests_total" in body


def test_none_exporter_builds_no_processor() -> None:
    t = Telemetry.from_config(TelemetryConfig(traces_exporter="none"))
    assert t.tracing.provider is None
    assert t.tracing.processors == ()
    assert not t.tracing.enabled
    with t.tracing.request_span("req", {"a": 1}) as root, t.tracing.stage_span("route") as stage:
        assert not root.is_recording()
        assert not stage.is_recording()
        t.tracing.record_outcome(root, make_record())
    t.shutdown()


def test_console_exporter_builds() -> None:
    t = Telemetry.from_config(TelemetryConfig(traces_exporter="console", service_name="svc"))
    (processor,) = t.tracing.processors
    assert isinstance(processor, BatchSpanProcessor)
    console = processor._batch_processor._exporter
    assert isinstance(console, ConsoleSpanExporter)
    console.out = io.StringIO()
    with t.tracing.request_span("req-console", {}):
        pass
    t.shutdown()
    assert '"name": "icgate.request"' in console.out.getvalue()


def test_otlp_exporter_builds_and_shuts_down_quickly() -> None:
    cfg = TelemetryConfig(traces_exporter="otlp", otlp_endpoint="http://127.0.0.1:1/v1/traces")
    exporter = InMemorySpanExporter()
    t = Telemetry.from_config(cfg, exporter=exporter, export_timeout_s=0.5)
    kinds = [type(p) for p in t.tracing.processors]
    assert kinds == [SimpleSpanProcessor, BatchSpanProcessor]
    with t.tracing.request_span("req-otlp", {}):
        pass
    assert len(exporter.get_finished_spans()) == 1
    # The pending span goes to a closed loopback port: refused at once, retries bounded by the timeout.
    started = time.monotonic()
    t.shutdown()
    assert time.monotonic() - started < 5.0


def test_tracing_without_exporter_is_disabled() -> None:
    assert not Tracing(TelemetryConfig()).enabled


async def test_the_loop_lag_monitor_sees_a_blocked_event_loop() -> None:
    seen: list[float] = []
    monitor = LoopLagMonitor(seen.append, interval_s=0.02)
    monitor.start()
    await asyncio.sleep(0.1)  # an idle loop: a few samples
    time.sleep(0.3)  # the loop blocked, as CPU work on it would block it
    await asyncio.sleep(0.05)
    await monitor.stop()
    assert len(seen) >= 3
    assert max(seen) >= 0.25  # the timer due 20 ms in ran at least 280 ms late
    assert "icgate_event_loop_lag_seconds" in Metrics().render()[0].decode()
