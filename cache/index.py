"""The vector index: faiss, one namespace per tenant, exact while small and HNSW when large.

Every namespace (tenant) owns its own faiss index, its own id map and its own lock. Nothing is shared between
namespaces, so a search can only ever return entries of its own namespace, and its cost depends only on that
namespace's size (no filtering of a shared index, whose cost would leak other tenants' sizes).

Storage per namespace:

- up to `hnsw_threshold` live entries: exact search, `IndexIDMap2(IndexFlatIP)`; removal is real removal;
- above it the namespace is rebuilt into `IndexHNSWFlat(METRIC_INNER_PRODUCT)` (approximate). HNSW cannot
  remove, so removed or replaced entries become tombstones: their slot is cleared in a bitmap that is passed
  to faiss as an `IDSelectorBitmap`, so they are skipped inside the search itself, and `efSearch` is raised
  by the dead fraction to keep the same number of live candidates. Ids are mapped by this module (slot ->
  id), not by an `IndexIDMap`, because a replaced id must tombstone its old slot but not its new one. When
  tombstones exceed `TOMBSTONE_REBUILD_FRACTION` of the slots, the live entries are rebuilt into a fresh
  index (flat again if few enough remain).

The vectors are kept only inside faiss (both index types store them in full), and a rebuild reconstructs
them from there: one copy in steady state, two during a rebuild.

Threading: each namespace has a readers-writer lock. Searches take it shared (faiss releases the GIL, so
searches of one namespace run in parallel); `add` and `remove` take it exclusively, briefly. A rebuild is
done by the thread whose `add`/`remove` made it necessary, outside the exclusive lock: it snapshots the live
entries (lock shared), builds the new index while searches and writes keep using the old one (writes are
also logged), then, under the exclusive lock, replays the logged writes onto the new index and swaps it
in. A search therefore sees either the old index or the complete new one, never a half-built one. The
calling thread of that write blocks for the build (10-50 s at 50k entries of dim 384 on the 2-core box):
call `add`/`remove` off the request path.

OpenMP threads: faiss parallelises with OpenMP, and with libgomp (what the faiss-cpu wheels ship) the thread
count set by `faiss.omp_set_num_threads` is per calling thread, not per process: set it in each thread that
searches, e.g. `ThreadPoolExecutor(initializer=set_threads, initargs=(1,))`. Measured on the 2-core box
(bench/results/cache_lookup.md, with other jobs running): a single HNSW query runs on one thread either
way; a single flat query with 2 threads was 2.5-3x *slower* than with 1 (55 vs 20 ms at 100k entries),
because OpenMP workers wait for a core. So searching threads should use 1. Builds (`add` of many vectors
into HNSW) parallelise well: leave the writer thread at the default (all cores), and consider
OMP_WAIT_POLICY=PASSIVE in the environment on a shared machine.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

TOMBSTONE_REBUILD_FRACTION = 0.2

Hits = list[tuple[int, float]]
Ids = npt.NDArray[np.int64]
Vectors = npt.NDArray[np.float32]  # one unit vector a row; search scores come in the same type


def set_threads(n: int) -> None:
    """Set the OpenMP thread count faiss uses in the *calling* thread (libgomp keeps it per thread)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    faiss.omp_set_num_threads(n)


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers, so writers are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _Store(Protocol):
    """One namespace's faiss index. Callers hold the namespace lock (shared for `search`)."""

    kind: str

    def add(self, ids: Ids, vectors: Vectors) -> None: ...

    def remove(self, ids: Ids) -> int: ...

    def search(self, queries: Vectors, k: int) -> tuple[Vectors, Ids]: ...

    def size(self) -> int: ...

    def needs_rebuild(self, hnsw_threshold: int, /) -> bool: ...

    def snapshot(self) -> tuple[Ids, Vectors]: ...


class _FlatStore:
    """Exact inner-product search; removal compacts the index."""

    kind = "flat"

    def __init__(self, dim: int) -> None:
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: set[int] = set()

    def add(self, ids: Ids, vectors: Vectors) -> None:
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)
        self._ids.update(ids.tolist())

    def remove(self, ids: Ids) -> int:
        present = np.fromiter((i for i in ids.tolist() if i in self._ids), dtype=np.int64)
        if present.size == 0:
            return 0
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(present)))
        self._ids.difference_update(present.tolist())
        return removed

    def search(self, queries: Vectors, k: int) -> tuple[Vectors, Ids]:
        return self._index.search(queries, k)  # labels are ids already; -1 pads a short result

    def size(self) -> int:
        return len(self._ids)

    def needs_rebuild(self, hnsw_threshold: int, /) -> bool:
        return len(self._ids) > hnsw_threshold

    def snapshot(self) -> tuple[Ids, Vectors]:
        n = self._index.ntotal
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        if n == 0:
            return ids, np.empty((0, self._index.d), np.float32)
        return ids, faiss.downcast_index(self._index.index).reconstruct_n(0, n)


class _HnswStore:
    """HNSW graph over slots 0..n-1; removed/replaced slots are tombstones skipped via a bitmap selector."""

    kind = "hnsw"

    def __init__(self, dim: int, m: int, ef_construction: int, ef_search: int) -> None:
        self._index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = ef_construction
        self._ef_search = ef_search
        self._slot_ids = np.empty(0, dtype=np.int64)  # slot -> id (valid up to ntotal)
        self._live_bits = np.zeros(0, dtype=np.uint8)  # bit set = slot is live
        self._id_slot: dict[int, int] = {}
        self._dead = 0
        self._params = self._make_params()

    def add(self, ids: Ids, vectors: Vectors) -> None:
        self._kill(ids)
        start = self._index.ntotal
        end = start + len(ids)
        self._reserve(end)
        self._index.add(vectors)
        self._slot_ids[start:end] = ids
        slots = np.arange(start, end, dtype=np.int64)
        np.bitwise_or.at(self._live_bits, slots >> 3, (1 << (slots & 7)).astype(np.uint8))
        self._id_slot.update(zip(ids.tolist(), slots.tolist(), strict=True))
        self._params = self._make_params()

    def remove(self, ids: Ids) -> int:
        removed = self._kill(ids)
        if removed:
            self._params = self._make_params()
        return removed

    def search(self, queries: Vectors, k: int) -> tuple[Vectors, Ids]:
        scores, slots = self._index.search(queries, k, params=self._params)
        ids = np.where(slots >= 0, self._slot_ids[np.maximum(slots, 0)], -1)
        return scores, ids

    def size(self) -> int:
        return len(self._id_slot)

    def needs_rebuild(self, _hnsw_threshold: int, /) -> bool:
        """Already HNSW: only tombstones make a rebuild worth it, whatever the threshold."""
        return self._dead > TOMBSTONE_REBUILD_FRACTION * self._index.ntotal

    def snapshot(self) -> tuple[Ids, Vectors]:
        slots = np.fromiter(self._id_slot.values(), dtype=np.int64, count=len(self._id_slot))
        slots.sort()
        if slots.size == 0:
            return slots, np.empty((0, self._index.d), np.float32)
        return self._slot_ids[slots].copy(), self._index.reconstruct_batch(slots)

    def _kill(self, ids: Ids) -> int:
        slots = [s for s in (self._id_slot.pop(i, None) for i in ids.tolist()) if s is not None]
        if slots:
            dead = np.asarray(slots, dtype=np.int64)
            np.bitwise_and.at(self._live_bits, dead >> 3, (~(1 << (dead & 7))).astype(np.uint8))
            self._dead += len(slots)
        return len(slots)

    def _reserve(self, n_slots: int) -> None:
        if n_slots <= len(self._slot_ids):
            return
        capacity = max(n_slots, 2 * len(self._slot_ids), 1024)
        self._slot_ids = np.resize(self._slot_ids, capacity)
        bits = np.zeros((capacity + 7) // 8, dtype=np.uint8)
        bits[: len(self._live_bits)] = self._live_bits
        self._live_bits = bits  # a new buffer: the selector is remade by the caller (via _make_params)

    def _make_params(self) -> Any:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stubs
        if self._dead == 0:
            params.efSearch = self._ef_search
            return params
        # Dead slots still occupy candidate places during the graph walk: widen the beam by the dead share.
        params.efSearch = math.ceil(self._ef_search * self._index.ntotal / max(len(self._id_slot), 1))
        # The one-argument form keeps a reference to the bitmap (faiss reads it through a raw pointer); a
        # bitmap that is later reallocated by _reserve gets a new selector, as every write remakes params.
        params.sel = faiss.IDSelectorBitmap(self._live_bits)  # type: ignore[call-arg, arg-type]
        return params


@dataclass
class _Namespace:
    store: _Store
    lock: _ReadWriteLock = field(default_factory=_ReadWriteLock)
    # Writes made while a rebuild is in flight, replayed onto the new index before it is swapped in. Set
    # (under `lock` shared plus `rebuild_claim`) by the rebuilding thread; appended to under `lock` exclusive.
    pending: list[tuple[str, Ids, Vectors | None]] | None = None
    rebuild_claim: threading.Lock = field(default_factory=threading.Lock)


class VectorIndex:
    """Per-namespace (per-tenant) vector search over unit vectors; scores are inner products (= cosine)."""

    def __init__(
        self,
        dim: int,
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
    ) -> None:
        if dim < 1 or hnsw_threshold < 0 or hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError("invalid VectorIndex parameters")
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self._namespaces: dict[str, _Namespace] = {}
        self._registry_lock = threading.Lock()

    # -- writes -------------------------------------------------------------------------------------------

    def add(self, namespace: str, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert entries; an id already in the namespace is replaced. May rebuild (see module doc)."""
        checked_ids, checked_vectors = self._check_entries(ids, vectors)
        if checked_ids.size == 0:
            return
        ns = self._namespace(namespace, create=True)
        assert ns is not None
        with ns.lock.write():
            ns.store.add(checked_ids, checked_vectors)
            if ns.pending is not None:  # the caller may reuse its arrays
                ns.pending.append(("add", checked_ids.copy(), checked_vectors.copy()))
        self._rebuild_if_needed(ns)

    def remove(self, namespace: str, ids: npt.ArrayLike) -> int:
        """Remove entries by id; returns how many were present."""
        checked = self._check_ids(ids)
        ns = self._namespace(namespace)
        if ns is None or checked.size == 0:
            return 0
        with ns.lock.write():
            removed = ns.store.remove(checked)
            if removed and ns.pending is not None:
                ns.pending.append(("remove", checked.copy(), None))
        if removed:
            self._rebuild_if_needed(ns)
        return removed

    def drop(self, namespace: str) -> None:
        """Forget a namespace and all its entries (searches already running finish on the old index)."""
        with self._registry_lock:
            self._namespaces.pop(namespace, None)

    # -- reads --------------------------------------------------------------------------------------------

    def search(self, namespace: str, vectors: npt.ArrayLike, k: int) -> list[Hits]:
        """Top-k (id, score) per query row, best first; a 1-D vector is one query.

        An unknown or empty namespace gives an empty list for every query.
        """
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}) or ({self.dim},)")
        ns = self._namespaces.get(namespace)
        if ns is None or k < 1:
            return [[] for _ in range(len(queries))]
        with ns.lock.read():
            if ns.store.size() == 0:
                return [[] for _ in range(len(queries))]
            scores, ids = ns.store.search(queries, k)
        return [
            [(i, s) for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def search_one(self, namespace: str, vector: npt.ArrayLike, k: int) -> Hits:
        """Top-k (id, score) for one query vector, best first; [] for an unknown namespace."""
        return self.search(namespace, np.asarray(vector).reshape(1, -1), k)[0]

    def size(self, namespace: str) -> int:
        """Live entries in the namespace (0 if unknown)."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return 0
        with ns.lock.read():
            return ns.store.size()

    def kind(self, namespace: str) -> str | None:
        """How the namespace is searched now: 'flat' (exact) or 'hnsw'; None if unknown."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return None
        with ns.lock.read():
            return ns.store.kind

    def namespaces(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._namespaces)

    # -- internals ----------------------------------------------------------------------------------------

    def _namespace(self, name: str, create: bool = False) -> _Namespace | None:
        ns = self._namespaces.get(name)
        if ns is None and create:
            with self._registry_lock:
                ns = self._namespaces.setdefault(name, _Namespace(store=_FlatStore(self.dim)))
        return ns

    def _new_store(self, live: int) -> _Store:
        if live > self.hnsw_threshold:
            return _HnswStore(self.dim, self.hnsw_m, self.ef_construction, self.ef_search)
        return _FlatStore(self.dim)

    def _rebuild_if_needed(self, ns: _Namespace) -> None:
        """Build a fresh index from the live entries outside the lock, then replay late writes and swap."""
        while True:
            with ns.lock.read():  # no writer meanwhile, searches go on; the claim keeps other rebuilders out
                with ns.rebuild_claim:
                    if ns.pending is not None or not ns.store.needs_rebuild(self.hnsw_threshold):
                        return  # nothing to do, or another thread is rebuilding (it will replay our write)
                    ns.pending = []
                try:
                    ids, vectors = ns.store.snapshot()
                except BaseException:
                    ns.pending = None
                    raise
            try:
                fresh = self._new_store(len(ids))
                fresh.add(ids, vectors)
                del ids, vectors
            except BaseException:
                with ns.lock.write():
                    ns.pending = None
                raise
            with ns.lock.write():
                for op, op_ids, op_vectors in ns.pending:
                    if op == "add":
                        assert op_vectors is not None
                        fresh.add(op_ids, op_vectors)
                    else:
                        fresh.remove(op_ids)
                ns.store = fresh
                ns.pending = None

    def _check_ids(self, ids: npt.ArrayLike) -> Ids:
        checked = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if checked.size and checked.min() < 0:
            raise ValueError("ids must be >= 0")
        return checked

    def _check_entries(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> tuple[Ids, Vectors]:
        checked_ids = self._check_ids(ids)
        rows = np.ascontiguousarray(vectors, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.shape != (len(checked_ids), self.dim):
            raise ValueError(f"vectors must have shape ({len(checked_ids)}, {self.dim}), got {rows.shape}")
        if len(checked_ids) > 1 and len(np.unique(checked_ids)) != len(
            checked_ids
        ):  # the same id twice in one call: the last one wins
            _, first_in_reversed = np.unique(checked_ids[::-1], return_index=True)
            keep = np.sort(len(checked_ids) - 1 - first_in_reversed)
            checked_ids, rows = checked_ids[keep], np.ascontiguousarray(rows[keep])
        return checked_ids, rows
