"""Every tenant's cache entries: memory and faiss for the request path, the database behind them.

Reads on the hot path touch only the in-memory store and the vector index.
Inserts happen after the response is sent; stats updates go through a
write-behind queue. Every replica loads the table at start and then follows it
by id watermark (new entries) and tombstones (deletions), so replicas sharing
one PostgreSQL converge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from icgate.cache.embed import EmbedderBusyError, ServiceTime, UnembeddableTextError
from icgate.cache.index import VectorIndex, set_threads
from icgate.cache.onnx_models import default_threads
from icgate.cache.store import CacheEntry, CacheStore, initial_utility
from icgate.cache.verify import DEFAULT_ARTIFACT, MAX_TEXT_CHARS, HitVerifier, ScorerLoader, one_openmp_thread
from icgate.gateway.config import CacheConfig, RequestLogConfig
from icgate.gateway.store import tables
from icgate.gateway.store.db import sqlite_file
from icgate.gateway.store.duty_cycle import BacklogFullError, DutyCycle
from icgate.gateway.store.in_flight import InFlight, Lead
from icgate.gateway.store.write_behind import Retry, StorageEvents, WriteBehindQueue
from icgate.text import scrub_pii

log = logging.getLogger("icgate.cache")

Vector = npt.NDArray[np.float32]
Floats = npt.NDArray[np.float64]
# The embedder (`MicroBatcher.embed(text, scope)`), for entries whose vector is made after the response.
EmbedLater = Callable[[str, str], Awaitable[Vector]]


class VerifierBusyError(RuntimeError):
    """The verifier's queue would keep this request waiting longer than `cache.verify_max_queue_ms`: it
    goes on without a semantic hit (its embedding, examples and route stand)."""


CALIBRATED_NAME = "hit_verifier.joblib"  # where `icgate cache calibrate` puts its artifact in the data dir


def verifier_path(spec: str | None, data_dir: Path) -> Path:
    """The policy's artifact, else one calibrated into the data dir, else the shipped one."""
    if spec:
        return Path(spec)
    calibrated = data_dir / CALIBRATED_NAME
    return calibrated if calibrated.is_file() else DEFAULT_ARTIFACT


def load_verifier(spec: str | None, data_dir: Path, cross_encoder: ScorerLoader | None = None) -> HitVerifier:
    """The verifier (`verifier_path`), its cross-encoder built by `cross_encoder` (default: torch)."""
    return HitVerifier.load(verifier_path(spec, data_dir), cross_encoder)


@dataclass(frozen=True)
class Candidate:
    entry: CacheEntry
    similarity: float


@dataclass(frozen=True)
class Hit:
    entry: CacheEntry
    similarity: float
    kind: str  # exact | semantic
    verifier_score: float


@dataclass
class NewEntry:
    """What the pipeline knows about an answer worth storing."""

    namespace: str
    exact_key: str
    context_fingerprint: str
    embed_text: str
    prompt_text: str
    response_text: str
    response: dict[str, Any]
    backend: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    vector: np.ndarray | None  # None: embed `embed_text` when inserting (`CacheEntries.embed_later`)


@dataclass
class Usage:
    """What served or helped one request, so feedback can find it."""

    namespace: str = ""
    served: list[int] = field(default_factory=list)
    helped: list[int] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)


# Fields with the same name and meaning in `CacheEntry` and the `cache_entries` row.
_COPIED = (
    "namespace", "exact_key", "context_fingerprint", "embed_text", "prompt_text", "response_text",
    "response", "backend", "tier", "prompt_tokens", "completion_tokens", "utility", "feedback_sum",
    "feedback_count", "hits", "helped",
)  # fmt: skip


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


FEEDBACK_OVERLAP = timedelta(seconds=5)


def _dt(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


@dataclass(eq=False)
class _NewRow:
    """A new entry on its way to the database; its insert task learns the outcome from `done`."""

    entry: CacheEntry
    done: asyncio.Future[bool]


class _EntryWriter(WriteBehindQueue[_NewRow]):
    """New entries, written in batches. The database assigns each its id, which the entry needs before it
    can be served (its key in memory and in the vector index, in the request log and in every replica's
    sync), so an entry waits here, unserved, while the database is away, and is remembered once written."""

    def _after_write(self, records: list[_NewRow]) -> None:
        for record in records:
            if not record.done.done():
                record.done.set_result(True)

    def _after_loss(self, records: list[_NewRow]) -> None:
        for record in records:
            if not record.done.done():
                record.done.set_result(False)


class CacheEntries:
    """Every tenant's cache entries: in memory and in a vector index for the request path, in the
    database behind them (inserts after the response, stats through a write-behind queue)."""

    def __init__(  # noqa: PLR0913 - the cache's parts, then where its queues report
        self,
        config: CacheConfig,
        tier_rank: Callable[[str], int],
        best_tier: str,
        engine: sa.Engine,
        verifier: HitVerifier,
        dim: int,
        clock: Callable[[], float] = time.time,
        embed_later: EmbedLater | None = None,
        events: StorageEvents | None = None,
        close_timeout_s: float = 30.0,
    ) -> None:
        self.config = config
        self.embed_later = embed_later
        # Embedding the answers of named requests after their response: at most this share of the clock.
        self.background = DutyCycle(config.store_embed_share, config.store_embed_backlog)
        self._events = events
        self.tier_rank = tier_rank
        self.best_tier = best_tier  # its answers start with a higher utility
        self.engine = engine
        self.verifier = verifier
        self.clock = clock
        self.store = CacheStore()
        # Identical requests in flight: the first leads, the others wait for its answer (`cache.coalesce`).
        self.in_flight = InFlight()
        self.index = VectorIndex(dim, hnsw_threshold=config.hnsw_threshold)
        # One OpenMP thread per search: on 2 cores a single query is 2.5-3x slower with two
        # (bench/results/cache_lookup.md), and faiss's thread count is per calling thread.
        self._search_pool = ThreadPoolExecutor(2, "icgate-search", initializer=set_threads, initargs=(1,))
        self.verify_threads = config.verify_threads or default_threads()
        self._verify_pool = ThreadPoolExecutor(
            self.verify_threads, "icgate-verify", initializer=one_openmp_thread
        )
        # The verifier's queue, bounded in time as the embedder's is: pairs waiting or being scored, and
        # what scoring a pair took on the verifier's thread.
        self._verify_pending = 0
        self._pair_time = ServiceTime()
        self.scrub: Callable[[str], str] = scrub_pii if config.scrub_pii else (lambda text: text)
        self._watermark = 0
        # Ids are handed out before commit: an entry committed late can carry an id below one
        # already seen, so each sync looks back this many ids (known ones are skipped).
        self._lookback = 1_000
        self._deleted_since: datetime | None = None
        self._feedback_since: datetime | None = None
        self._usage: OrderedDict[str, Usage] = OrderedDict()
        self._inserts: set[asyncio.Task[None]] = set()
        self._close_timeout_s = close_timeout_s
        # (namespace, exact key) -> tier rank of the answer on its way to the database, so an identical
        # request answered meanwhile does not queue the same answer again.
        self._pending: dict[tuple[str, str], tuple[int, object]] = {}
        self._sync_task: asyncio.Task[None] | None = None
        # Both queues wait out a database that stops answering (gateway/store/write_behind.py).
        self._writes = _EntryWriter(
            self._write_entries,
            RequestLogConfig(queue_size=config.insert_queue_size, batch_size=32, flush_interval_s=0.002),
            name="cache inserts",
            what="cache_insert",
            events=events,
            retry=Retry(close_timeout_s=close_timeout_s),
            sqlite_file=sqlite_file(engine),
        )
        self._updates: WriteBehindQueue[tuple[int, dict[str, Any]]] = WriteBehindQueue(
            self._write_updates,
            RequestLogConfig(),
            name="cache updates",
            what="cache_update",
            events=events,
            retry=Retry(close_timeout_s=close_timeout_s),
            sqlite_file=sqlite_file(engine),
        )

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        loaded = await self.sync()
        log.info("cache: %d entries loaded", loaded)
        await self._writes.start()
        await self._updates.start()
        self._sync_task = asyncio.create_task(self._follow(), name="cache sync")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Write what is pending. With the database away, new entries and stats wait for it at most
        `timeout_s` in all (default: `close_timeout_s`); what is still unwritten then is counted lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._close_timeout_s if timeout_s is None else max(0.0, timeout_s))
        self.background.drain()  # answers waiting for their turn are embedded now, not at the share's pace
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
        if self._inserts:  # answers still being embedded are queued, then written
            await asyncio.wait(set(self._inserts), timeout=max(0.0, deadline - loop.time()))
        await self._writes.close(max(0.0, deadline - loop.time()))
        if self._inserts:  # every one has its outcome now
            await asyncio.gather(*self._inserts, return_exceptions=True)
        await self._updates.close(max(0.0, deadline - loop.time()))
        self._search_pool.shutdown(wait=False)
        self._verify_pool.shutdown(wait=False)

    async def _follow(self) -> None:
        """Sync every interval; expire and evict about once a minute (it walks every entry)."""
        rounds_per_eviction = max(1, round(60.0 / self.config.sync_interval_s))
        rounds = 0
        failing_since: float | None = None  # a database outage: one line, then one every 30 s
        logged_at = 0.0
        while True:
            await asyncio.sleep(self.config.sync_interval_s)
            rounds += 1
            try:
                await self.sync()
                if rounds % rounds_per_eviction == 0:
                    await self.expire_and_evict()
            except SQLAlchemyError as exc:
                now = time.monotonic()
                if failing_since is None or now - logged_at >= 30.0:
                    failing_since = now if failing_since is None else failing_since
                    logged_at = now
                    log.warning(
                        "cache sync failing for %.0f s (serving what is in memory): %s",
                        now - failing_since,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    )
                continue
            except Exception:
                log.exception("cache sync failed; retrying next interval")
                continue
            if failing_since is not None:
                log.warning("cache sync works again after %.0f s", time.monotonic() - failing_since)
                failing_since = None

    async def sync(self) -> int:
        """Apply entries added, deleted and rated in the database since the last sync (by any replica)."""
        rows, deleted, max_deleted = await asyncio.to_thread(self._read_changes)
        self._remember_many([entry_of(row) for row in rows])
        for entry_id in deleted:
            self._forget(entry_id)
        if max_deleted is not None:
            self._deleted_since = max_deleted
        for entry_id, utility, total, count in await asyncio.to_thread(self._read_feedback):
            entry = self.store.get(entry_id)
            if entry is not None:  # the values are absolute: applying one twice changes nothing
                entry.utility, entry.feedback_sum, entry.feedback_count = utility, total, count
        return len(rows)

    def _read_feedback(self) -> list[tuple[int, float, float, int]]:
        """Entries whose feedback changed since the last look (a few seconds of overlap: replicas' clocks
        differ a little, and a row written late must not be missed)."""
        table = tables.CacheEntryRow
        query = sa.select(
            table.id, table.utility, table.feedback_sum, table.feedback_count, table.feedback_at
        ).where(table.feedback_at.is_not(None), table.deleted_at.is_(None))
        if self._feedback_since is not None:
            query = query.where(table.feedback_at >= self._feedback_since - FEEDBACK_OVERLAP)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        stamps = [r.feedback_at for r in rows if r.feedback_at is not None]
        if stamps:
            self._feedback_since = max(max(stamps), self._feedback_since or max(stamps))
        elif self._feedback_since is None:
            self._feedback_since = datetime.now(UTC)
        return [(r.id, r.utility, r.feedback_sum, r.feedback_count) for r in rows]

    def _read_changes(self) -> tuple[list[tables.CacheEntryRow], list[int], datetime | None]:
        table = tables.CacheEntryRow
        with Session(self.engine) as session:
            since = max(0, self._watermark - self._lookback)
            # Ids first: the look-back window is mostly entries already held (this replica's own), and
            # whole rows (answers, vectors) cost the GIL to build. Rows from the first unknown id on.
            live = table.deleted_at.is_(None)
            ids = session.scalars(sa.select(table.id).where(table.id > since, live).order_by(table.id)).all()
            unknown = [i for i in ids if self.store.get(i) is None]
            new: list[tables.CacheEntryRow] = []
            if unknown:
                found = session.scalars(
                    sa.select(table).where(table.id >= unknown[0], live).order_by(table.id)
                ).all()
                new = [row for row in found if self.store.get(row.id) is None]
            if ids:
                self._watermark = max(self._watermark, ids[-1])
            query = sa.select(table.id, table.deleted_at).where(table.deleted_at.is_not(None))
            if self._deleted_since is not None:
                query = query.where(table.deleted_at >= self._deleted_since)
            gone = session.execute(query).all()
            session.expunge_all()
        stamps = [d for _, d in gone if d is not None]
        latest = max(stamps) if stamps else None
        return list(new), [i for i, _ in gone], latest

    def _remember_many(self, entries: list[CacheEntry]) -> None:
        """Many entries at once (a replica's start, another replica's inserts): one index insert per
        tenant, not one per entry, so faiss builds the graph in one call on all its threads. At 100k
        entries that took a replica's start-up from 103 s to 69 s (bench/cache_scale.py, random vectors;
        bench/results/cache_scale.md has clustered ones)."""
        groups: dict[str, list[CacheEntry]] = {}
        for entry in entries:
            self.store.add(entry)
            groups.setdefault(entry.namespace, []).append(entry)
        for namespace, group in groups.items():
            ids = np.fromiter((e.id for e in group), dtype=np.int64, count=len(group))
            self.index.add(namespace, ids, np.stack([e.vector for e in group]))

    def _remember(self, entry: CacheEntry) -> None:
        self.store.add(entry)
        self.index.add(entry.namespace, np.array([entry.id], dtype=np.int64), entry.vector[None, :])

    def _forget(self, entry_id: int) -> None:
        entry = self.store.remove(entry_id)
        if entry is not None:
            self.index.remove(entry.namespace, np.array([entry_id], dtype=np.int64))

    # --- hot path ---------------------------------------------------------------------------------

    @property
    def semantic_max_chars(self) -> int:
        """The longest prompt a semantic hit is tried for: the policy's, never above what the verifier
        reads."""
        return min(self.config.semantic_max_chars, MAX_TEXT_CHARS)

    def allowed(self, entry: CacheEntry, min_tier: str | None) -> bool:
        """A request addressed to a backend is served only by answers of its tier or a better one."""
        if entry.expired(self.clock()):
            return False
        return min_tier is None or self.tier_rank(entry.tier) >= self.tier_rank(min_tier)

    def exact(self, namespace: str, key: str) -> CacheEntry | None:
        return self.store.exact(namespace, key)

    async def retrieve(self, namespace: str, vector: np.ndarray, k: int) -> list[Candidate]:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._search_pool, self.index.search_one, namespace, vector, k)
        out = []
        for entry_id, score in found:
            entry = self.store.get(int(entry_id))
            if entry is not None and entry.namespace == namespace:
                out.append(Candidate(entry, float(score)))
        return out

    async def verify(self, prompt_text: str, vector: Vector, entries: list[CacheEntry]) -> Floats:
        """The verifier's P(same question) for the request against each entry, on the verifier's own
        threads: it may run a cross-encoder (milliseconds per pair) and the event loop must not wait.

        Raises VerifierBusyError, before queueing, when the pairs ahead would keep this request waiting
        longer than `cache.verify_max_queue_ms`: `verify_threads` threads score every tenant's pairs,
        and under a burst their queue, not the backends, would set the tail (docs/performance.md).
        """
        bound = self.config.verify_max_queue_ms
        if bound is not None and self.expected_verify_wait_s() * 1000.0 > bound:
            raise VerifierBusyError(f"{self._verify_pending} pairs ahead of this request's")
        self._verify_pending += len(entries)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._verify_pool,
                self._score,
                prompt_text,
                vector,
                [(e.prompt_text, e.vector) for e in entries],
            )
        finally:
            self._verify_pending -= len(entries)

    def expected_verify_wait_s(self) -> float:
        """How long the pairs queued or being scored keep a new request waiting: their number times the
        measured seconds per pair (measured on one thread, with the others busy beside it), shared by
        the verifier's threads."""
        return self._pair_time.wait_s(self._verify_pending) / self.verify_threads

    def _score(self, prompt_text: str, vector: Vector, against: list[tuple[str, Vector]]) -> Floats:
        started = time.perf_counter()
        scores = self.verifier.score_batch(
            [prompt_text] * len(against),
            [text for text, _ in against],
            np.repeat(vector[None, :], len(against), axis=0),
            np.stack([v for _, v in against]),
        )
        self._pair_time.timed(time.perf_counter() - started, len(against))
        return scores

    # --- after the response -----------------------------------------------------------------------

    def note_usage(self, request_id: str, usage: Usage) -> None:
        """Remember what served or helped a request (bounded), and count it on the entries."""
        self._usage[request_id] = usage
        while len(self._usage) > self.config.feedback_memory:
            self._usage.popitem(last=False)
        now = self.clock()
        for counter, entry_ids in (("hits", usage.served), ("helped", usage.helped)):
            for entry_id in entry_ids:
                entry = self.store.get(entry_id)
                if entry is None:
                    continue
                setattr(entry, counter, getattr(entry, counter) + 1)
                entry.last_used_at = now
                self._updates.submit((entry_id, {counter: getattr(entry, counter), "last_used_at": _dt(now)}))

    def insert_later(self, request_id: str, new: NewEntry, lead: Lead | None = None) -> None:
        """Store an answer off the hot path; the request has already been answered. `lead`: identical
        requests wait for this answer (`in_flight`); they get the entry once it is scrubbed, before the
        database has it, or nothing if it is not stored."""
        if len(self._inserts) >= self.config.insert_queue_size + 64:
            self._writes.refuse()  # the database is behind: skip (and count) rather than pile up
            if lead is not None:
                lead.share(None)
            return
        task = asyncio.create_task(self._insert(request_id, new, lead))
        self._inserts.add(task)
        task.add_done_callback(self._inserts.discard)
        if lead is not None:  # however the insert ends (even cancelled before it ran), nobody waits on
            task.add_done_callback(lambda _: lead.share(None))

    async def _insert(self, request_id: str, new: NewEntry, lead: Lead | None = None) -> None:
        key = (new.namespace, new.exact_key)
        rank = self.tier_rank(new.tier)
        token = object()
        try:
            existing = self.store.exact(*key)
            if existing is not None and rank <= self.tier_rank(existing.tier):
                return
            vector = new.vector if new.vector is not None else await self._embed(new)
            if vector is None:
                return
            pending = self._pending.get(key)
            if pending is not None and rank <= pending[0]:
                return  # an answer as good is on its way to the database
            self._pending[key] = (rank, token)
            # Scrubbing is linear but a prompt may be megabytes: off the event loop.
            entry = await asyncio.to_thread(self._new_entry, new, vector)
            if lead is not None:
                lead.share(entry)
            row = _NewRow(entry, asyncio.get_running_loop().create_future())
            if not self._writes.submit(row) or not await row.done:
                return  # not written: counted and logged by the queue
            existing = self.store.exact(*key)
            if existing is not None and existing.id != entry.id and rank > self.tier_rank(existing.tier):
                await self._replace(existing)
            self._remember(entry)
            usage = self._usage.setdefault(request_id, Usage(namespace=new.namespace))
            usage.produced.append(entry.id)
            if self.store.size(entry.namespace) > self.config.max_entries_per_tenant:
                await self.expire_and_evict()
        except Exception:
            log.exception("cache insert failed for %s", request_id)
        finally:
            if self._pending.get(key, (0, None))[1] is token:
                del self._pending[key]

    async def _replace(self, worse: CacheEntry) -> None:
        """A better tier's answer replaces `worse` (tombstoned; if the database is away again, it is only
        dropped here, and the new entry takes its exact key everywhere as other replicas sync it)."""
        try:
            await self.delete([worse.id])
        except Exception as exc:
            log.warning("cache: could not tombstone replaced entry %d: %s", worse.id, type(exc).__name__)
            self._forget(worse.id)

    async def _embed(self, new: NewEntry) -> Vector | None:
        """The vector of an entry that was not embedded on the request's path, in its turn within the
        background share; None (nothing stored) when the embedder is busy or cannot read the text, or too
        many answers already wait for their turn: a store is the first thing to shed."""
        embed_later = self.embed_later
        if embed_later is None:
            return None
        try:
            return await self.background.run(lambda: embed_later(new.embed_text, new.namespace))
        except BacklogFullError:
            if self._events is not None:
                self._events.storage_dropped("cache_store_budget", 1)
            log.debug(
                "cache insert skipped: %d answers wait for the background share", self.background.waiting
            )
            return None
        except (EmbedderBusyError, UnembeddableTextError) as exc:
            log.debug("cache insert skipped: %s", type(exc).__name__)
            return None

    def _new_entry(self, new: NewEntry, vector: Vector) -> CacheEntry:
        """The entry for `new`, scrubbed, not yet written (its id is 0)."""
        now = self.clock()
        entry = CacheEntry(
            id=0,
            namespace=new.namespace,
            exact_key=new.exact_key,
            context_fingerprint=new.context_fingerprint,
            embed_text=self.scrub(new.embed_text),
            prompt_text=self.scrub(new.prompt_text),
            response_text=self.scrub(new.response_text),
            response=new.response,
            backend=new.backend,
            tier=new.tier,
            prompt_tokens=new.prompt_tokens,
            completion_tokens=new.completion_tokens,
            vector=np.asarray(vector, dtype=np.float32),
            utility=initial_utility(best_tier=new.tier == self.best_tier),
            created_at=now,
            last_used_at=now,
            expires_at=now + self.config.ttl_s if self.config.ttl_s else None,
        )
        if entry.response_text != new.response_text:
            entry.response = _with_content(new.response, entry.response_text)
        return entry

    def _write_entries(self, batch: list[_NewRow]) -> None:
        """New entries, in one transaction; each gets its id once committed.

        One compiled INSERT, each row's values as its parameters: a statement built per row with the
        values inside made SQLAlchemy compute a cache key over every value (vector bytes and answer
        included), 0.36 ms of CPU per row against 0.11, on threads that hold the GIL the event loop
        needs (docs/performance.md). A row at a time, so each id comes from the driver's own last row
        id, on any SQLite as on PostgreSQL."""
        ids = []
        with self.engine.begin() as conn:
            for row in batch:
                key = conn.execute(_INSERT_ENTRY, row_values(row.entry)).inserted_primary_key
                assert key is not None  # a single-row insert always has one
                ids.append(int(key[0]))
        for row, entry_id in zip(batch, ids, strict=True):
            row.entry.id = entry_id

    def _write_updates(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """Counters and times, merged per entry, then one UPDATE per set of columns with the entries as its
        parameters (an executemany of one compiled statement, not a statement built per entry)."""
        merged: dict[int, dict[str, Any]] = {}
        for entry_id, values in batch:
            merged.setdefault(entry_id, {}).update(values)
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for entry_id, values in merged.items():
            by_columns.setdefault(tuple(sorted(values)), []).append({"entry_id": entry_id, **values})
        with self.engine.begin() as conn:
            for columns, params in by_columns.items():
                conn.execute(_update_entries(columns), params)

    async def delete(self, entry_ids: list[int]) -> int:
        """Tombstone entries so every replica drops them, and drop them here now."""
        if not entry_ids:
            return 0
        await asyncio.to_thread(tombstone_rows, self.engine, entry_ids, _dt(self.clock()))
        for entry_id in entry_ids:
            self._forget(entry_id)
        return len(entry_ids)

    async def expire_and_evict(self) -> int:
        """TTL first, then per-tenant capacity by worth (utility, recency, use), never plain LRU."""
        now = self.clock()
        doomed = set(self.store.expired(now))
        for namespace in {e.namespace for e in self.store.entries.values()}:
            doomed.update(self.store.over_capacity(namespace, self.config.max_entries_per_tenant, now))
        return await self.delete(sorted(doomed))

    async def feedback(
        self,
        request_id: str,
        score: float,
        namespace: str,
        lookup: Callable[[str], Awaitable[Usage | None]],
    ) -> int | None:
        """Move the utility of every entry that served, helped or came from `request_id`.

        None when the request is unknown to this tenant (another tenant's id looks the same).
        """
        usage = self._usage.get(request_id) or await lookup(request_id)
        if usage is None or usage.namespace != namespace:
            return None
        touched = 0
        for entry_id in {*usage.served, *usage.helped, *usage.produced}:
            entry = self.store.get(entry_id)
            if entry is None or entry.namespace != namespace:
                continue
            entry.apply_feedback(score)
            touched += 1
            self._updates.submit(
                (
                    entry_id,
                    {
                        "utility": entry.utility,
                        "feedback_sum": entry.feedback_sum,
                        "feedback_count": entry.feedback_count,
                        "feedback_at": _dt(time.time()),  # the other replicas' next sync takes it
                    },
                )
            )
        return touched

    async def flush(self) -> None:
        """Wait for pending inserts and stats writes (tests, shutdown)."""
        while self._inserts:
            await asyncio.gather(*list(self._inserts), return_exceptions=True)
        await self._updates.flush()


def entry_of(row: tables.CacheEntryRow) -> CacheEntry:
    """The in-memory entry for a database row."""
    return CacheEntry(
        id=row.id,
        **{name: getattr(row, name) for name in _COPIED},
        vector=np.frombuffer(row.vector, dtype=np.float32).copy(),
        created_at=_epoch(row.created_at) or 0.0,
        last_used_at=_epoch(row.last_used_at) or 0.0,
        expires_at=_epoch(row.expires_at),
    )


def tombstone_rows(
    target: sa.Engine | sa.Connection | Session, entry_ids: list[int], when: datetime | None = None
) -> None:
    """Mark entries deleted: every replica drops them on its next sync.

    Given an engine, in a transaction of its own; given a connection or session, in the caller's.
    """
    if not entry_ids:
        return
    table = tables.CacheEntryRow
    statement = sa.update(table).where(table.id.in_(entry_ids)).values(deleted_at=when or datetime.now(UTC))
    if isinstance(target, sa.Engine):
        with target.begin() as conn:
            conn.execute(statement)
    else:
        target.execute(statement)


_INSERT_ENTRY = sa.insert(tables.CacheEntryRow)  # compiled once, cached by the engine


@functools.cache
def _update_entries(columns: tuple[str, ...]) -> sa.Update:
    """UPDATE cache_entries SET <columns> WHERE id = :entry_id, every value a parameter (built once per
    set of columns: a handful, from the feedback and utility updates)."""
    table = tables.CacheEntryRow
    return (
        sa.update(table)
        .where(table.id == sa.bindparam("entry_id"))
        .values({name: sa.bindparam(name) for name in columns})
    )


def row_values(entry: CacheEntry) -> dict[str, Any]:
    """The database row's columns for an entry (but its id, assigned on insert)."""
    return {
        **{name: getattr(entry, name) for name in _COPIED},
        "vector": np.asarray(entry.vector, dtype=np.float32).tobytes(),
        "created_at": _dt(entry.created_at),
        "last_used_at": _dt(entry.last_used_at),
        "expires_at": _dt(entry.expires_at),
    }


def row_of(entry: CacheEntry) -> tables.CacheEntryRow:
    """The database row for an entry (its id is assigned on insert)."""
    return tables.CacheEntryRow(**row_values(entry))


def _with_content(response: dict[str, Any], text: str) -> dict[str, Any]:
    choices = [
        {**c, "message": {**c.get("message", {}), "content": text}} if i == 0 else c
        for i, c in enumerate(response.get("choices", []))
    ]
    return {**response, "choices": choices}


# --- browsing (the admin console) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEntry:
    """A cache entry as the console lists it: what it answers, who produced it, what it is worth."""

    id: int
    namespace: str
    prompt_text: str
    response_text: str
    backend: str
    tier: str
    utility: float
    hits: int
    helped: int
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime | None


def list_entries(
    engine: sa.Engine, namespace: str | None, text: str | None, limit: int = 50, before_id: int | None = None
) -> list[StoredEntry]:
    """Live entries (not deleted), newest first, from the table every replica syncs from; keyset on the id.
    `text` is a case-sensitive part of the question or the answer."""
    table = tables.CacheEntryRow
    query = (
        sa.select(
            table.id,
            table.namespace,
            table.prompt_text,
            table.response_text,
            table.backend,
            table.tier,
            table.utility,
            table.hits,
            table.helped,
            table.created_at,
            table.last_used_at,
            table.expires_at,
        )
        .where(table.deleted_at.is_(None))
        .order_by(table.id.desc())
        .limit(limit)
    )
    if namespace is not None:
        query = query.where(table.namespace == namespace)
    if before_id is not None:
        query = query.where(table.id < before_id)
    if text:
        query = query.where(
            sa.or_(
                table.prompt_text.contains(text, autoescape=True),
                table.response_text.contains(text, autoescape=True),
            )
        )
    with engine.connect() as conn:
        return [StoredEntry(*tuple(row)) for row in conn.execute(query)]
