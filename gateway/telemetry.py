"""Traces and metrics for the request path.

Everything here is owned by one `Telemetry` object built at start-up and passed
in: no global tracer provider, no global Prometheus registry. Several gateways
can then live in one process (tests do this) without sharing spans or counts.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.pool import Pool, QueuePool

from icgate.gateway.config import TelemetryConfig
from icgate.gateway.records import RequestRecord

REQUEST_SPAN = "icgate.request"
STAGE_PREFIX = "icgate."
# Label value used when a request ended before a route or backend was chosen.
NONE_LABEL = "none"

# LLM calls take seconds to minutes; the gateway's own share should take well under 10 ms.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

AttributeValue = str | bool | int | float


class Tracing:
    """OpenTelemetry spans for one gateway, on a tracer provider of its own.

    With `traces_exporter: none` and no injected exporter there is no provider at
    all: spans are the shared invalid no-op span and cost a function call.
    """

    def __init__(
        self,
        cfg: TelemetryConfig,
        exporter: SpanExporter | None = None,
        export_timeout_s: float = 10.0,
    ) -> None:
        self.service_name = cfg.service_name
        self.provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        processors: list[SpanProcessor] = []
        if exporter is not None:
            # Injected (tests): export synchronously so spans are visible at once.
            processors.append(SimpleSpanProcessor(exporter))
        configured = _configured_exporter(cfg, export_timeout_s)
        if configured is not None:
            processors.append(BatchSpanProcessor(configured, export_timeout_millis=export_timeout_s * 1000.0))
        self.processors: tuple[SpanProcessor, ...] = tuple(processors)
        if processors:
            # shutdown_on_exit=False: no atexit hook per instance; the owner calls shutdown().
            self.provider = TracerProvider(
                resource=Resource.create({SERVICE_NAME: cfg.service_name}), shutdown_on_exit=False
            )
            for processor in processors:
                self.provider.add_span_processor(processor)
            self._tracer = self.provider.get_tracer("icgate")

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @property
    def tracer(self) -> trace.Tracer:
        return self._tracer

    def request_span(
        self, ctx_id: str, attributes: Mapping[str, Any] | None = None, parent: Context | None = None
    ) -> AbstractContextManager[trace.Span]:
        """Root span of one request; stage spans opened inside it become its children.

        A new trace unless `parent` is given (e.g. extracted from an incoming
        `traceparent` header), never a child of whatever span happens to be
        current. Exceptions are recorded and mark the span as error.
        """
        if self.provider is None:
            return nullcontext(trace.INVALID_SPAN)
        attrs = {"icgate.request_id": ctx_id, **_clean(attributes or {})}
        return self._span(
            REQUEST_SPAN,
            context=parent if parent is not None else Context(),
            kind=trace.SpanKind.SERVER,
            attributes=attrs,
        )

    def stage_span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[trace.Span]:
        """Child span `icgate.<name>` of the current span (contextvars: safe across awaits)."""
        if self.provider is None:
            return nullcontext(trace.INVALID_SPAN)
        return self._span(STAGE_PREFIX + name, attributes=_clean(attributes or {}) or None)

    @contextmanager
    def _span(self, name: str, **options: Any) -> Iterator[trace.Span]:
        """A current span that records an exception by its type and message, never its traceback: a
        traceback carries the messages of the exceptions it was raised from (a provider's 401 quoting the
        API key it was sent) and the gateway's source paths, and traces leave the gateway."""
        with self._tracer.start_as_current_span(name, record_exception=False, **options) as span:
            try:
                yield span
            except Exception as exc:
                attributes = {"exception.type": type(exc).__qualname__, "exception.message": str(exc)}
                span.add_event("exception", attributes)
                raise

    @staticmethod
    def record_outcome(span: trace.Span, record: RequestRecord) -> None:
        """Put the request log's facts on the root span, so trace and log agree."""
        if not span.is_recording():
            return
        span.set_attributes(
            _clean(
                {
                    "icgate.route": record.route,
                    "icgate.backend": record.backend,
                    "icgate.fallback_from": record.fallback_from,
                    "icgate.endpoint": record.endpoint,
                    "icgate.model_requested": record.model_requested,
                    "icgate.stream": record.stream,
                    "http.response.status_code": record.status_code,
                    "error.type": record.error_type,
                    "icgate.prompt_tokens": record.prompt_tokens,
                    "icgate.completion_tokens": record.completion_tokens,
                    "icgate.cost_usd": record.cost_usd,
                    "icgate.latency_ms": record.latency_ms,
                    "icgate.overhead_ms": record.overhead_ms,
                    "icgate.queue_ms": record.queue_ms,
                }
            )
        )
        if record.status_code >= 500 or record.error_type:
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.error_type))

    def shutdown(self) -> None:
        """Flush pending spans and stop exporters; bounded by the export timeout."""
        if self.provider is not None:
            self.provider.shutdown()


def _configured_exporter(cfg: TelemetryConfig, timeout_s: float) -> SpanExporter | None:
    if cfg.traces_exporter == "console":
        return ConsoleSpanExporter(service_name=cfg.service_name)
    if cfg.traces_exporter == "otlp":
        # Imported here: only deployments that export OTLP pay for the import.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # endpoint=None falls back to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, then localhost:4318.
        return OTLPSpanExporter(endpoint=cfg.otlp_endpoint, timeout=timeout_s)
    return None


def _clean(attributes: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """OTel accepts only primitives: drop None, stringify the rest."""
    out: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str | bool | int | float) else str(value)
    return out


LiveState = Callable[[], Mapping[str, Mapping[str, float | int | None]]]


class BackendStateCollector(Collector):
    """Admission's live view of each backend, read at scrape time.

    Exported as `icgate_admission_backend_<field>{backend}`.
    """

    def __init__(self, snapshot: LiveState) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for backend, fields in self.snapshot().items():
            for field, value in fields.items():
                if value is None:
                    continue
                family = families.get(field)
                if family is None:
                    name = f"icgate_admission_backend_{field}"
                    description = f"Admission's live {field.replace('_', ' ')}."
                    family = families[field] = GaugeMetricFamily(name, description, labels=["backend"])
                family.add_metric([backend], float(value))
        return list(families.values())


LengthsInForce = Callable[[], Mapping[str, tuple[str, int]]]


class LengthModelCollector(Collector):
    """Which length predictor sizes each backend's requests, read at scrape time:
    `icgate_length_model_answers{backend,version}` is the number of that backend's answers its own
    predictor was fitted on, and 0 where the shared predictor (`version`) still sizes them. A refit that
    swapped in shows as a new version here, without reading the log (docs/lengths.md)."""

    def __init__(self, in_force: LengthsInForce) -> None:
        self.in_force = in_force

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "icgate_length_model_answers",
            "Answers the length predictor in force for a backend was fitted on (0: the shared predictor).",
            labels=["backend", "version"],
        )
        for backend, (version, answers) in self.in_force().items():
            family.add_metric([backend, version], float(answers))
        return [family]


class RuntimeCollector(Collector):
    """What a long run must hold level, read at scrape time: the event loop's live asyncio tasks
    (`icgate_asyncio_tasks`) and the database pool's connections (`icgate_db_connections{state}`:
    `checked_out` in use, `idle` kept open). A leak of either shows as a climb (bench/soak.py)."""

    def __init__(self, tasks: Callable[[], int | None], pool: Callable[[], Pool | None]) -> None:
        self.tasks = tasks
        self.pool = pool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        out = []
        tasks = self.tasks()
        if tasks is not None:
            out.append(GaugeMetricFamily("icgate_asyncio_tasks", "Live asyncio tasks.", value=tasks))
        pool = self.pool()
        if isinstance(pool, QueuePool):  # SQLite files and PostgreSQL; an in-memory SQLite has one
            family = GaugeMetricFamily(
                "icgate_db_connections", "Database pool connections by state.", labels=["state"]
            )
            family.add_metric(["checked_out"], float(pool.checkedout()))
            family.add_metric(["idle"], float(pool.checkedin()))
            out.append(family)
        out.extend(heap_families())
        return out


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33 and later): byte counts as size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's `mallinfo2`, or None on another C library (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


@functools.cache
def _sqlite_memory_used() -> Callable[[], int] | None:
    """SQLite's own count of the heap it holds (page caches, statements), from the shared library
    Python's `sqlite3` links; None where there is none to load."""
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).sqlite3_memory_used
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = []
    return fn


def heap_families() -> list[GaugeMetricFamily]:
    """Where a growing RSS sits: the C heap's bytes in use, the bytes it holds free (fragmentation
    the allocator has not returned), the part of the heap SQLite holds, and the Python objects alive.
    A climb in the C heap is native (SQLite, onnxruntime, faiss, the allocator); in the last, Python."""
    out = [
        GaugeMetricFamily(
            "icgate_python_allocated_blocks",
            "Python object allocator blocks in use (sys.getallocatedblocks).",
            value=float(sys.getallocatedblocks()),
        )
    ]
    mallinfo2 = _mallinfo2()
    info = mallinfo2() if mallinfo2 is not None else None
    if info is not None:
        family = GaugeMetricFamily(
            "icgate_malloc_bytes",
            "C heap (glibc malloc) bytes: in_use by the process, free but kept by the allocator, "
            "mmapped for large blocks (part of in_use).",
            labels=["state"],
        )
        family.add_metric(["in_use"], float(info.uordblks + info.hblkhd))
        family.add_metric(["free"], float(info.fordblks))
        family.add_metric(["mmapped"], float(info.hblkhd))
        out.append(family)
    sqlite_used = _sqlite_memory_used()
    if sqlite_used is not None:
        out.append(
            GaugeMetricFamily(
                "icgate_sqlite_memory_bytes",
                "Heap SQLite holds, all connections: page caches, schemas, statements.",
                value=float(sqlite_used()),
            )
        )
    return out


def running_tasks() -> int | None:
    """Tasks alive on the running event loop, the one `/metrics` is answered on; None outside one."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None


class Metrics:
    """Prometheus metrics for one gateway, in a registry of its own.

    Label values are route and backend names from the policy, HTTP status codes
    and error kinds chosen by the caller: all bounded. Never pass a model name
    from the request body or a tenant as a label.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "icgate_requests_total", "Requests answered.", ["route", "backend", "status"], registry=r
        )
        self.latency = Histogram(
            "icgate_request_latency_seconds",
            "Wall time from arrival to response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "icgate_overhead_seconds",
            "Time the gateway adds: wall time minus backend and queue time.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "icgate_queue_wait_seconds",
            "Time spent waiting for admission to a backend.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.routes = Counter("icgate_route_total", "Routing decisions.", ["route"], registry=r)
        self.backend_errors = Counter(
            "icgate_backend_errors_total", "Backend call failures.", ["backend", "kind"], registry=r
        )
        self.fallbacks = Counter(
            "icgate_fallbacks_total",
            "Requests retried on a fallback backend.",
            ["from_backend", "to_backend"],
            registry=r,
        )
        self.admissions = Counter(
            "icgate_admission_total",
            "Admission outcomes: admitted, queued, spilled, refused, limited.",
            ["backend", "outcome"],
            registry=r,
        )
        self.inflight_requests = Gauge("icgate_inflight_requests", "Requests being handled.", registry=r)
        self.backend_inflight_requests = Gauge(
            "icgate_backend_inflight", "Calls in flight per backend.", ["backend"], registry=r
        )
        self.tokens = Counter("icgate_tokens_total", "Tokens processed.", ["backend", "kind"], registry=r)
        self.cost = Counter("icgate_cost_usd_total", "Backend cost in US dollars.", ["backend"], registry=r)
        self.loop_lag = Histogram(
            "icgate_event_loop_lag_seconds",
            "How late the event loop ran a timer: a wait every request on this process shares, and that "
            "the overhead histogram books as backend time when it falls during a backend call.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.log_dropped = Counter(
            "icgate_request_log_dropped_total",
            "Request log rows dropped because the write-behind queue was full.",
            registry=r,
        )
        self.storage_drops = Counter(
            "icgate_storage_dropped_total",
            "Records never written to the database: their write-behind queue was full (the database away, "
            "full or read-only for long), the database rejected them, or it was still away at shutdown; "
            "cache_store_budget: named requests' answers not stored, as too many waited for their turn.",
            ["what"],  # request_log | route_samples | cache_insert | cache_update | cache_store_budget
            registry=r,
        )
        self.storage_errors = Counter(
            "icgate_storage_errors_total",
            "Failed database writes off the request path, each retried: by queue and by what the database "
            "said (unavailable, full, read_only, rejected, other).",
            ["what", "kind"],
            registry=r,
        )
        self.shared_fallbacks = Counter(
            "icgate_shared_state_fallbacks_total",
            "Requests counted by this replica alone because Redis (shared state) did not answer.",
            ["what"],  # slots | limits
            registry=r,
        )

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request. Errors and fallbacks are counted where they happen."""
        route = record.route or NONE_LABEL
        backend = record.backend or NONE_LABEL
        self.requests.labels(route, backend, str(record.status_code)).inc()
        self.routes.labels(route).inc()
        self.latency.labels(route).observe(record.latency_ms / 1000.0)
        self.overhead.labels(route).observe(record.overhead_ms / 1000.0)
        self.queue_wait.observe(record.queue_ms / 1000.0)
        if record.backend is not None:
            self.tokens.labels(backend, "prompt").inc(record.prompt_tokens)
            self.tokens.labels(backend, "completion").inc(record.completion_tokens)
            self.cost.labels(backend).inc(record.cost_usd)

    def backend_error(self, backend: str, kind: str) -> None:
        self.backend_errors.labels(backend, kind).inc()

    def fallback(self, from_backend: str, to_backend: str) -> None:
        self.fallbacks.labels(from_backend, to_backend).inc()

    def watch_backends(self, snapshot: LiveState) -> None:
        self.registry.register(BackendStateCollector(snapshot))

    def watch_lengths(self, in_force: LengthsInForce) -> None:
        self.registry.register(LengthModelCollector(in_force))

    def watch_runtime(self, tasks: Callable[[], int | None], pool: Callable[[], Pool | None]) -> None:
        self.registry.register(RuntimeCollector(tasks, pool))

    def admission(self, backend: str, outcome: str) -> None:
        self.admissions.labels(backend, outcome).inc()

    def request_log_dropped(self, count: int = 1) -> None:
        self.log_dropped.inc(count)

    def storage_dropped(self, what: str, count: int) -> None:
        self.storage_drops.labels(what).inc(count)

    def storage_error(self, what: str, kind: str) -> None:
        self.storage_errors.labels(what, kind).inc()

    @contextmanager
    def inflight(self) -> Iterator[None]:
        """Count a request as in flight for the duration of the block, errors included."""
        self.inflight_requests.inc()
        try:
            yield
        finally:
            self.inflight_requests.dec()

    @contextmanager
    def backend_inflight(self, backend: str) -> Iterator[None]:
        gauge = self.backend_inflight_requests.labels(backend)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LoopLagMonitor:
    """Samples the event loop's lag: how late a timer set for `interval_s` runs.

    A busy loop (CPU work on it, a blocking call) delays every request at once, and shows up in no
    stage's span; this makes it visible (`icgate_event_loop_lag_seconds`). Ten wake-ups a second.
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.observe = observe
        self.interval_s = interval_s
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample(), name="icgate-loop-lag")

    async def _sample(self) -> None:
        while True:
            started = self.clock()
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, self.clock() - started - self.interval_s))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class Telemetry:
    """The tracing and metrics of one gateway, built once at start-up."""

    def __init__(self, tracing: Tracing, metrics: Metrics) -> None:
        self.tracing = tracing
        self.metrics = metrics

    @classmethod
    def from_config(
        cls, cfg: TelemetryConfig, exporter: SpanExporter | None = None, export_timeout_s: float = 10.0
    ) -> Telemetry:
        return cls(Tracing(cfg, exporter=exporter, export_timeout_s=export_timeout_s), Metrics())

    def shutdown(self) -> None:
        self.tracing.shutdown()


__all__ = ["REQUEST_SPAN", "LoopLagMonitor", "Metrics", "Telemetry", "Tracing"]
