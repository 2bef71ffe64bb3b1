"""Wiring: one `Gateway` holds every long-lived part, built once from a policy.

`Gateway.start` builds each part (database, log writers, limits, local backends, embedder, models,
cache) and then the `Pipeline`, once, through its constructor. The HTTP app and the in-process
middleware both start a `Gateway` and call `gateway.pipeline.run(...)`; nothing here is global, so
several gateways can live in one process (the tests do that).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import Engine

from icgate.cache.embed import Embedder, MicroBatcher, resolve_model_dir
from icgate.cache.onnx_models import default_threads
from icgate.cache.runtime import load_embedder, pair_scorer_loader
from icgate.cache.verify import ScorerLoader
from icgate.gateway import route_models
from icgate.gateway.backends.admission import Admission
from icgate.gateway.backends.client import BackendClient
from icgate.gateway.backends.local import LocalBackends
from icgate.gateway.backends.shared import SharedSlots
from icgate.gateway.backends.signals import SignalPoller
from icgate.gateway.cache_replay import ReplayRuns
from icgate.gateway.config import EmbeddingConfig, Policy, models_dir
from icgate.gateway.live_policy import LivePolicy
from icgate.gateway.pipeline.quotas import TenantLimiter
from icgate.gateway.pipeline.run import Pipeline
from icgate.gateway.records import Tenant, namespace_for
from icgate.gateway.route_models import RouteModels
from icgate.gateway.store import db, tables
from icgate.gateway.store.artifacts import ModelWatcher, StoredModel
from icgate.gateway.store.cache_entries import CacheEntries, Usage, load_verifier
from icgate.gateway.store.keys import KeyAuthenticator, database_unavailable
from icgate.gateway.store.length_learning import LengthLearning, length_kind
from icgate.gateway.store.length_samples import LengthSampleWriter
from icgate.gateway.store.request_log import RequestLogWriter
from icgate.gateway.store.route_samples import RouteSampleWriter, label_from_feedback, label_sample
from icgate.gateway.telemetry import LoopLagMonitor, Telemetry, running_tasks
from icgate.lengths.predict import LengthModel

log = logging.getLogger("icgate")
FEEDBACK_FLUSH_S = 2.0  # feedback waits this long at most for its route sample to be written


class EmbeddingService:
    """The gateway's models (the embedder and the verifier's cross-encoder) on the policy's runtime,
    loaded once (in a worker thread) and run off the event loop. Exported graphs live in `graphs`."""

    def __init__(self, config: EmbeddingConfig, graphs: Path) -> None:
        self.config = config
        self.graphs = graphs
        self.threads = config.threads or default_threads()
        self._embedder: Embedder | None = None
        self._loading: asyncio.Task[Embedder] | None = None

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    async def embedder(self) -> Embedder:
        if self._embedder is None:
            if self._loading is None:
                self._loading = asyncio.create_task(asyncio.to_thread(self.load))
            self._embedder = await asyncio.shield(self._loading)
        return self._embedder

    def load(self) -> Embedder:
        """Build the embedder (exporting its graph first if needed); blocking, call off the loop."""
        model_dir = resolve_model_dir(self.config.model)
        return load_embedder(model_dir, self.config.runtime, self.graphs, self.threads, self.config.max_batch)

    def cross_encoder_loader(self) -> ScorerLoader:
        """What a verifier artifact's cross-encoder is built with: the same engine and graph folder."""
        return pair_scorer_loader(self.config.runtime, self.graphs, self.threads)

    async def decode(self, token_ids: list[int]) -> str:
        """The text behind token ids of the served model's own tokenizer (OpenAI accepts token input)."""
        embedder = await self.embedder()
        decode = getattr(embedder, "decode_tokens", None)
        if decode is None:
            raise ValueError("this embedding model takes text only")
        # Off the event loop, as `embed`: an input may hold a million ids.
        return str(await asyncio.to_thread(decode, token_ids))

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors and the number of input tokens they cost."""
        embedder = await self.embedder()
        count = getattr(embedder, "count_tokens", None)

        def work() -> tuple[np.ndarray, int]:
            # Both off the event loop: counting tokenizes the whole input, megabytes at worst.
            tokens = sum(count(texts)) if count else sum(len(t.split()) for t in texts)
            return embedder.encode(texts), tokens

        return await asyncio.to_thread(work)


class Gateway:
    def __init__(
        self,
        policy: Policy,
        data_dir: Path,
        launch_local: bool = True,
        embeddings: EmbeddingService | None = None,
        policy_path: Path | None = None,
    ) -> None:
        self.policy = policy
        self.data_dir = data_dir
        self.launch_local = launch_local
        self.database_url = policy.database_url(data_dir)
        self.telemetry = Telemetry.from_config(policy.telemetry)
        # Injectable so that several gateways in one process (tests) share one loaded model.
        self.embeddings = embeddings or EmbeddingService(policy.embedding, models_dir(data_dir))
        self.local = LocalBackends()
        self.client = BackendClient()
        self.engine: Engine | None = None
        self.cache_entries: CacheEntries | None = None
        self.batcher: MicroBatcher | None = None
        self.log_writer: RequestLogWriter | None = None
        self.sample_writer: RouteSampleWriter | None = None
        self.length_writer: LengthSampleWriter | None = None
        self.watchers: list[ModelWatcher[Any]] = []
        self.backend_length_watchers: dict[str, ModelWatcher[LengthModel]] = {}
        self.length_learning: LengthLearning | None = None  # each backend's own length predictor
        self.ready = False
        self.admission = Admission(policy.backends, policy.admission, policy.circuit_breaker)
        self.signals = SignalPoller(policy.backends, self.admission, policy.admission.metrics_interval_s)
        self.telemetry.metrics.watch_backends(self.admission.snapshot)
        self.telemetry.metrics.watch_runtime(running_tasks, lambda: self.engine.pool if self.engine else None)
        self.loop_lag = LoopLagMonitor(self.telemetry.metrics.loop_lag.observe)
        self._spend_task: asyncio.Task[None] | None = None
        self._limiter: TenantLimiter | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.replays: ReplayRuns | None = None  # cache replay runs started from the console
        self.shared: SharedSlots | None = None  # state shared with the other replicas (Redis)
        self._pipeline: Pipeline | None = None
        self.telemetry.metrics.watch_lengths(self.lengths_in_force)  # reads the pipeline's models
        # The policy file, if any: the console's changes are applied through it (gateway/live_policy.py).
        self.live_policy = LivePolicy(policy, policy_path, self.swap_policy, policy.admin.policy_poll_s)

    @property
    def pipeline(self) -> Pipeline:
        """The request pipeline; it exists once `start` has built its parts."""
        if self._pipeline is None:
            raise RuntimeError("the gateway has not started")
        return self._pipeline

    async def start(self) -> None:
        """Migrate the database, start the writers, limits and any local backends, load the models and
        the cache; then build the pipeline from those parts, and be ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.loop_lag.start()
        await asyncio.to_thread(db.upgrade, self.database_url)
        self.engine = db.make_engine(self.database_url)
        await self._start_shared()
        events = self.telemetry.metrics  # what the write-behind queues drop, and why writes fail
        self.log_writer = RequestLogWriter(self.engine, self.policy.request_log, events=events)
        await self.log_writer.start()
        self.sample_writer = RouteSampleWriter(self.engine, self.policy.request_log, events=events)
        await self.sample_writer.start()
        if self.policy.lengths.learn:
            self.length_writer = LengthSampleWriter(self.engine, self.policy.request_log, events=events)
            await self.length_writer.start()
        limiter = await self._start_limits()
        # Model servers and the embedder load side by side: start-up is bounded by the slower.
        waits: list[Awaitable[object]] = []
        local = [b for b in self.policy.backends if b.launch is not None]
        if local and self.launch_local:
            log.info("starting %d local backend(s): %s", len(local), ", ".join(b.name for b in local))
            waits.append(self.local.start_all(local, self.data_dir))
        if self.policy.embedding.preload:
            waits.append(self.embeddings.embedder())
        await asyncio.gather(*waits)
        models = await self._start_models()
        if self.policy.cache.enabled or self.policy.router.kind == "learned":
            await self._start_batcher()
        if self.policy.cache.enabled:
            await self._start_cache()
        self._pipeline = Pipeline(
            self.policy,
            self.client,
            self.admission,
            self.telemetry,
            models,
            authenticator=KeyAuthenticator(self.engine),
            limiter=limiter,
            entries=self.cache_entries,
            embed=self.batcher.embed if self.batcher is not None else None,
            sink=self.log_writer,
            samples=self.sample_writer,
            lengths=self.length_writer,
        )
        for watcher in self.watchers:
            watcher.start()
        if self.policy.lengths.learn:
            self.length_learning = LengthLearning(
                self.engine,
                self.policy.lengths,
                [b.name for b in self.policy.backends],
                on_published=self._check_backend_length,
                shared=lambda: self.pipeline.models.length,
            )
            self.length_learning.start()
        await self.live_policy.start(self.engine)
        self.replays = ReplayRuns(self.engine, lambda: self.policy, self._in_flight)
        self.ready = True

    def _in_flight(self, backend: str) -> int:
        state = self.admission.snapshot().get(backend, {})
        return int(state.get("in_flight") or 0)

    async def _start_shared(self) -> None:
        """With a Redis URL, backend slots and key revocations are shared with every replica."""
        url = self.policy.shared_state.url()
        if url is None:
            return
        config = self.policy.shared_state
        self.shared = SharedSlots.from_url(url, config.key_prefix, config.lease_s)
        await self.shared.start()
        fallbacks = self.telemetry.metrics.shared_fallbacks
        self.admission.share(self.shared, fallbacks.labels("slots").inc)
        self.shared.on_keys_revoked = self._forget_keys
        log.info("shared state in Redis (%s): slots, rate limits and key revocations", config.key_prefix)

    def _forget_keys(self) -> None:
        forget = getattr(self._pipeline.authenticator if self._pipeline else None, "forget", None)
        if callable(forget):
            forget()

    def keys_revoked(self) -> None:
        """A key was revoked: this replica forgets the keys it knew at once, and so does every replica
        that shares Redis with it (else within their key cache's few seconds)."""
        self._forget_keys()
        if self.shared is not None:
            task = asyncio.get_running_loop().create_task(self.shared.announce_revocation())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _start_limits(self) -> TenantLimiter:
        """Tenants' rate limits and budgets (spend read from the request log), backends' own signals."""
        limiter = self._limiter = TenantLimiter(
            self.policy.admission,
            self.engine,
            shared_url=self.policy.shared_state.url(),
            on_shared_down=self.telemetry.metrics.shared_fallbacks.labels("limits").inc,
            shared_prefix=self.policy.shared_state.key_prefix,
        )
        if limiter.budgeted_tenants():
            await asyncio.to_thread(limiter.refresh_spend)
            await limiter.seed_shared()
            self._spend_task = asyncio.create_task(self._refresh_spend(limiter), name="icgate-spend")
        self.signals.start()
        return limiter

    def swap_policy(self, policy: Policy) -> None:
        """A policy changed where it is read per request: in force from the next request on. A budget
        set this way counts what the tenant already spent in its window from the next spend reading."""
        self.policy = policy
        self.pipeline.swap_policy(policy)
        limiter = self._limiter
        if limiter is not None and limiter.budgeted_tenants() and self._spend_task is None:
            self._spend_task = asyncio.create_task(
                self._refresh_spend(limiter, first=0.0), name="icgate-spend"
            )

    async def _refresh_spend(self, limiter: TenantLimiter, first: float | None = None) -> None:
        wait = self.policy.admission.spend_refresh_s if first is None else first
        while True:
            await asyncio.sleep(wait)
            wait = self.policy.admission.spend_refresh_s
            try:
                await asyncio.to_thread(limiter.refresh_spend)
                await limiter.seed_shared()
            except Exception as exc:  # the database may be briefly away: keep the last reading
                log.warning("could not re-read tenants' spend: %s", type(exc).__name__)

    async def _start_batcher(self) -> None:
        """One embedding per request, shared by the cache stages and the router."""
        embedder = await self.embeddings.embedder()
        self.batcher = MicroBatcher(
            embedder,
            max_batch=self.policy.embedding.max_batch,
            max_wait_ms=self.policy.embedding.max_wait_ms,
            max_queue_ms=self.policy.embedding.max_queue_ms,
        )

    async def _start_cache(self) -> None:
        """The cache needs the embedder (for vectors) and the verifier (for safe semantic hits)."""
        assert self.engine is not None
        loader = self.embeddings.cross_encoder_loader()
        verifier = await asyncio.to_thread(load_verifier, self.policy.cache.verifier, self.data_dir, loader)
        embedder = await self.embeddings.embedder()
        self.cache_entries = CacheEntries(
            self.policy.cache,
            self.policy.tier_rank,
            self.policy.best_tier,
            self.engine,
            verifier,
            dim=embedder.dim,
            embed_later=self.batcher.embed if self.batcher is not None else None,
            events=self.telemetry.metrics,
        )
        await self.cache_entries.start()

    async def _start_models(self) -> RouteModels:
        """The router and the length predictor: the newest published, else the configured or shipped ones;
        watchers (started with the pipeline) swap in whatever `icgate router train` / `icgate length
        train` publish later."""
        assert self.engine is not None
        models = await asyncio.to_thread(route_models.initial_models, self.policy, self.engine)
        log.info("router %s, length predictor %s", models.router_version, models.length_version)
        interval = self.policy.router.reload_interval_s
        if self.policy.router.kind == "learned" and self.policy.router.artifact is None:
            router_watcher = ModelWatcher(
                self.engine, "router", route_models.load_router, self._swap_router, interval
            )
            router_watcher.current_id = models.router_row
            self.watchers.append(router_watcher)
        length_watcher = ModelWatcher(
            self.engine, "length", route_models.load_length, self._swap_length, interval
        )
        length_watcher.current_id = models.length_row
        self.watchers.append(length_watcher)
        for backend in self.policy.backends:
            own = models.backend_lengths.get(backend.name)
            watcher = ModelWatcher(
                self.engine,
                length_kind(backend.name),
                route_models.load_length,
                partial(self._swap_backend_length, backend.name),
                interval,
            )
            watcher.current_id = own.row if own is not None else None
            self.backend_length_watchers[backend.name] = watcher
            self.watchers.append(watcher)
        return models

    def lengths_in_force(self) -> dict[str, tuple[str, int]]:
        """Per backend, the version of the length predictor that sizes its requests and the answers it
        was fitted on (0: the shared predictor); empty before the pipeline starts."""
        if self._pipeline is None:
            return {}
        models = self._pipeline.models
        shared = "constant" if self.policy.lengths.predictor == "constant" else models.length_version
        out = {}
        for backend in self.policy.backends:
            own = models.backend_lengths.get(backend.name)
            out[backend.name] = (own.version, own.answers) if own and shared != "constant" else (shared, 0)
        return out

    def _swap_router(self, loaded: route_models.LoadedRouter, stored: StoredModel) -> None:
        self.pipeline.swap_models(route_models.with_router(self.pipeline.models, loaded, stored, self.policy))

    def _swap_length(self, loaded: LengthModel, stored: StoredModel) -> None:
        self.pipeline.swap_models(route_models.with_length(self.pipeline.models, loaded, stored))

    def _swap_backend_length(self, backend: str, loaded: LengthModel, stored: StoredModel) -> None:
        models = route_models.with_backend_length(self.pipeline.models, backend, loaded, stored, self.policy)
        self.pipeline.swap_models(models)

    async def _check_backend_length(self, backend: str) -> None:
        """A refit here published `backend`'s predictor: swap it in now, not at the next poll."""
        watcher = self.backend_length_watchers.get(backend)
        if watcher is not None:
            await watcher.check()

    async def _stop_models(self) -> None:
        """The model watchers and the length refit (a refit in its worker thread finishes on its own)."""
        for watcher in self.watchers:
            await watcher.stop()
        if self.length_learning is not None:
            await self.length_learning.stop()

    async def label_route_sample(self, request_id: str, tenant: Tenant, score: float) -> bool:
        """Feedback on a routed request labels its route sample (written off the hot path: flush first)."""
        if self.engine is None or self.sample_writer is None:
            return False
        # With the database away the sample may wait in the queue for long: the label would fail anyway.
        await self.sample_writer.flush(timeout_s=FEEDBACK_FLUSH_S)
        label = label_from_feedback(score)
        try:
            return await asyncio.to_thread(
                label_sample, self.engine, request_id, tenant.id, label, "feedback"
            )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not label a route sample: %s", type(exc).__name__)
            raise database_unavailable("record this feedback") from None

    async def past_usage(self, request_id: str) -> Usage | None:
        """What served or helped a past request, from its request-log row (after a restart)."""
        if self.engine is None:
            return None
        engine = self.engine

        def read() -> Usage | None:
            table = tables.RequestLog
            with engine.connect() as conn:
                row = conn.execute(
                    sa.select(table.tenant_id, table.decisions).where(table.request_id == request_id)
                ).first()
            if row is None:
                return None
            decisions = row.decisions or {}
            served = (decisions.get("cache") or {}).get("entry")
            return Usage(
                namespace=namespace_for(Tenant(id=row.tenant_id, name="")),
                served=[int(served)] if served else [],
                helped=[int(i) for i in decisions.get("examples") or []],
            )

        try:
            return await asyncio.to_thread(read)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read a past request: %s", type(exc).__name__)
            raise database_unavailable("record this feedback") from None

    async def stop(self) -> None:
        """Flush the request log (nothing acknowledged is lost), stop local backends, export spans."""
        self.ready = False
        await self.live_policy.stop()
        if self.replays is not None:
            await self.replays.stop()
        if self.shared is not None:
            await self.shared.close()
        if self._limiter is not None:
            await self._limiter.close()
        await self.loop_lag.stop()
        await self.signals.stop()
        if self._spend_task is not None:
            self._spend_task.cancel()
            await asyncio.gather(self._spend_task, return_exceptions=True)
        await self._stop_models()
        # A database still away gets the shutdown grace, once for all the write-behind queues together.
        deadline = asyncio.get_running_loop().time() + self.policy.server.graceful_shutdown_s

        def left() -> float:
            return max(0.0, deadline - asyncio.get_running_loop().time())

        if self.cache_entries is not None:
            await self.cache_entries.stop(left())
        if self.batcher is not None:
            self.batcher.close()
        if self.log_writer is not None:
            await self.log_writer.close(left())
        if self.sample_writer is not None:
            await self.sample_writer.close(left())
        if self.length_writer is not None:
            await self.length_writer.close(left())
        await self.client.aclose()
        await self.local.stop_all()
        if self.engine is not None:
            self.engine.dispose()
        self.telemetry.shutdown()
