"""The per-tenant vector index: isolation, replace, remove, flat -> HNSW, tombstones, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from icgate.cache.index import VectorIndex, _HnswStore, _Store, set_threads

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int, n_centroids: int = 40, noise: float = 0.35) -> np.ndarray:
    """Unit vectors scattered around random centroids: closer to real embeddings than pure Gaussians."""
    rng = np.random.default_rng(seed)
    centroids = unit(np.random.default_rng(1234).standard_normal((n_centroids, DIM)))
    return unit(centroids[rng.integers(0, n_centroids, n)] + noise * rng.standard_normal((n, DIM)))


def ids_of(hits: list[tuple[int, float]]) -> list[int]:
    return [i for i, _ in hits]


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


def store_of(index: VectorIndex, namespace: str) -> _Store:
    return index._namespaces[namespace].store


@pytest.mark.parametrize("threshold", [1000, 100], ids=["flat", "hnsw"])
def test_namespaces_never_cross(threshold: int) -> None:
    index = VectorIndex(DIM, hnsw_threshold=threshold)
    a, b = clustered(300, seed=1), clustered(300, seed=2)
    ids = np.arange(300)
    index.add("tenant-a", ids, a)
    index.add("tenant-b", ids, b)  # the very same ids, other vectors
    # b's vectors searched in a: every score is against a's entry with that id; b's copies are not found
    for row, hits in enumerate(index.search("tenant-a", b[:20], 10)):
        assert len(hits) == 10
        for i, score in hits:
            assert score == pytest.approx(float(a[i] @ b[row]), abs=1e-5)
        assert hits[0][1] < 0.999
    # each tenant finds its own vectors under its own ids
    for name, vectors in (("tenant-a", a), ("tenant-b", b)):
        top = [index.search_one(name, vectors[i], 1)[0] for i in range(50)]
        assert [i for i, _ in top] == list(range(50))
        assert all(score == pytest.approx(1.0, abs=1e-5) for _, score in top)
    index.remove("tenant-a", ids[:150])
    assert index.size("tenant-a") == 150 and index.size("tenant-b") == 300
    index.drop("tenant-b")
    assert index.namespaces() == ["tenant-a"]
    assert index.search_one("tenant-b", b[0], 5) == []


@pytest.mark.parametrize("threshold", [1000, 100], ids=["flat", "hnsw"])
def test_re_adding_an_id_replaces_it(threshold: int) -> None:
    index = VectorIndex(DIM, hnsw_threshold=threshold)
    vectors = clustered(400, seed=3)
    index.add("t", np.arange(400), vectors)
    assert index.kind("t") == ("hnsw" if threshold < 400 else "flat")
    replacement = clustered(1, seed=99)
    index.add("t", np.array([7]), replacement)
    assert index.size("t") == 400
    assert index.search_one("t", replacement[0], 1)[0] == (7, pytest.approx(1.0, abs=1e-5))
    old_hits = index.search_one("t", vectors[7], 50)
    assert old_hits[0][0] != 7  # the old vector is gone: id 7 now scores as the replacement
    assert all(
        s == pytest.approx(float(replacement[0] @ vectors[7]), abs=1e-5) for i, s in old_hits if i == 7
    )
    assert ids_of(old_hits).count(7) <= 1
    # the same id twice in one call: the last one wins
    index.add("t", np.array([8, 8]), np.vstack([vectors[8], replacement[0]]))
    assert index.size("t") == 400
    assert set(ids_of(index.search_one("t", replacement[0], 2))) == {7, 8}


@pytest.mark.parametrize("threshold", [1000, 100], ids=["flat", "hnsw"])
def test_remove(threshold: int) -> None:
    index = VectorIndex(DIM, hnsw_threshold=threshold)
    vectors = clustered(300, seed=4)
    index.add("t", np.arange(300), vectors)
    assert index.remove("t", np.array([1, 2, 3, 1000])) == 3
    assert index.remove("t", np.array([1])) == 0
    assert index.size("t") == 297
    for i in (1, 2, 3):
        assert i not in ids_of(index.search_one("t", vectors[i], 300))
    assert index.search_one("t", vectors[4], 1)[0][0] == 4


def test_flat_to_hnsw_switch_keeps_recall() -> None:
    index = VectorIndex(DIM, hnsw_threshold=1500)
    vectors = clustered(4000, seed=5)
    ids = np.arange(10_000, 14_000)
    queries = clustered(200, seed=6)
    for start in range(0, 1500, 500):
        index.add("t", ids[start : start + 500], vectors[start : start + 500])
    assert index.kind("t") == "flat"
    assert index.size("t") == 1500
    flat_hits = index.search("t", queries, 10)
    index.add("t", ids[1500:1600], vectors[1500:1600])  # crosses the threshold: rebuilt as HNSW
    assert index.kind("t") == "hnsw"
    for start in range(1600, 4000, 800):
        index.add("t", ids[start : start + 800], vectors[start : start + 800])
    assert index.size("t") == 4000
    truth = exact_top(vectors, ids, queries, 10)
    hits = index.search("t", queries, 10)
    recall = np.mean([len(set(truth[q]) & set(ids_of(h))) / 10 for q, h in enumerate(hits)])
    assert recall >= 0.95
    # best first, and the scores are the true inner products
    for q, h in enumerate(hits):
        scores = [s for _, s in h]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(vectors[h[0][0] - 10_000] @ queries[q]), abs=1e-5)
    # the flat answers before the switch were exact
    truth_1500 = exact_top(vectors[:1500], ids[:1500], queries, 10)
    assert all(ids_of(h) == list(truth_1500[q]) for q, h in enumerate(flat_hits))


def test_tombstones_are_filtered_then_rebuilt_away() -> None:
    index = VectorIndex(DIM, hnsw_threshold=500)
    vectors = clustered(2000, seed=7, n_centroids=10)
    ids = np.arange(2000)
    index.add("t", ids, vectors)
    store = store_of(index, "t")
    assert isinstance(store, _HnswStore)
    # remove a whole neighbourhood: the entries closest to vector 0
    nearest = exact_top(vectors, ids, vectors[:1], 300)[0]
    assert index.remove("t", nearest) == 300  # 15% of 2000: tombstones, no rebuild yet
    assert store_of(index, "t") is store and store._dead == 300
    hits = index.search_one("t", vectors[0], 10)
    assert len(hits) == 10  # still a full answer although the 300 nearest are dead
    assert not set(ids_of(hits)) & set(nearest.tolist())
    alive = np.setdiff1d(ids, nearest)
    assert set(ids_of(hits)) <= set(alive.tolist())
    queries = clustered(100, seed=70, n_centroids=10)
    truth = exact_top(vectors[alive], alive, queries, 10)
    found = index.search("t", queries, 10)
    assert np.mean([len(set(truth[q]) & set(ids_of(h))) / 10 for q, h in enumerate(found)]) >= 0.95
    # past 20% dead the namespace is rebuilt without tombstones, with the same content
    more = alive[:150]
    assert index.remove("t", more) == 150
    rebuilt = store_of(index, "t")
    assert rebuilt is not store and isinstance(rebuilt, _HnswStore) and rebuilt._dead == 0
    assert index.size("t") == 1550
    left = np.setdiff1d(alive, more)
    assert sorted(rebuilt.snapshot()[0].tolist()) == left.tolist()
    self_hits = [index.search_one("t", vectors[i], 1)[0][0] for i in left[:200]]
    assert self_hits == left[:200].tolist()
    # shrinking far below the threshold rebuilds it as exact search again
    index.remove("t", left[:1200])
    assert index.kind("t") == "flat" and index.size("t") == 350


def test_empty_and_unknown_namespaces() -> None:
    index = VectorIndex(DIM)
    query = clustered(1, seed=8)
    assert index.search_one("nobody", query[0], 5) == []
    assert index.search("nobody", np.vstack([query, query]), 5) == [[], []]
    assert index.size("nobody") == 0 and index.kind("nobody") is None
    assert index.remove("nobody", np.array([1])) == 0
    index.drop("nobody")
    assert index.namespaces() == []
    index.add("t", np.array([1]), query)
    assert index.search_one("t", query[0], 0) == []
    assert index.search_one("t", query[0], 5) == [(1, pytest.approx(1.0, abs=1e-5))]
    index.remove("t", np.array([1]))
    assert index.search_one("t", query[0], 5) == [] and index.namespaces() == ["t"]
    index.add("t", np.array([], dtype=np.int64), np.empty((0, DIM), np.float32))
    with pytest.raises(ValueError):
        index.add("t", np.array([1, 2]), query)
    with pytest.raises(ValueError):
        index.add("t", np.array([-1]), query)
    with pytest.raises(ValueError):
        index.search_one("t", query[0, :-1], 5)


def test_a_search_during_a_rebuild_sees_the_old_index_and_late_writes_are_kept() -> None:
    index = VectorIndex(DIM, hnsw_threshold=300)
    vectors = clustered(800, seed=9)
    index.add("t", np.arange(300), vectors[:300])
    building, release = threading.Event(), threading.Event()
    new_store = index._new_store

    def slow_new_store(live: int) -> _Store:
        store = new_store(live)
        add = store.add

        def slow_add(ids: np.ndarray, vecs: np.ndarray) -> None:
            if not building.is_set():
                building.set()
                assert release.wait(10)
            add(ids, vecs)

        store.add = slow_add  # type: ignore[method-assign, assignment]
        return store

    index._new_store = slow_new_store  # type: ignore[method-assign]
    rebuild = threading.Thread(target=index.add, args=("t", np.arange(300, 400), vectors[300:400]))
    rebuild.start()
    assert building.wait(10)
    # meanwhile the old (flat) index answers, and takes writes
    assert index.kind("t") == "flat"
    assert index.search_one("t", vectors[350], 1)[0][0] == 350
    index.add("t", np.arange(400, 800), vectors[400:800])
    index.add("t", np.array([5]), vectors[799:800])  # replace
    assert index.remove("t", np.arange(10, 20)) == 10
    assert index.search_one("t", vectors[700], 1)[0][0] == 700
    release.set()
    rebuild.join(10)
    assert index.kind("t") == "hnsw"
    assert index.size("t") == 790
    assert sorted(store_of(index, "t").snapshot()[0].tolist()) == sorted(set(range(800)) - set(range(10, 20)))
    assert not set(ids_of(index.search_one("t", vectors[15], 50))) & set(range(10, 20))
    assert set(ids_of(index.search_one("t", vectors[799], 2))) == {5, 799}


def test_concurrent_writes_and_searches() -> None:
    """Two writers (crossing the HNSW threshold, so rebuilds run mid-way) and three searchers."""
    index = VectorIndex(DIM, hnsw_threshold=1000, ef_construction=40)
    vectors = clustered(4000, seed=10)
    index.add("t", np.arange(500), vectors[:500])
    removed: list[int] = []  # appended only after remove() returned
    errors: list[BaseException] = []
    done = threading.Event()
    searches = [0]

    def writer(lo: int, hi: int) -> None:
        try:
            set_threads(1)
            for start in range(lo, hi, 50):
                index.add("t", np.arange(start, start + 50), vectors[start : start + 50])
                gone = np.arange(start, start + 50, 5)  # never re-added
                index.remove("t", gone)
                removed.extend(gone.tolist())
        except BaseException as exc:
            errors.append(exc)

    def searcher(seed: int) -> None:
        set_threads(1)
        rng = np.random.default_rng(seed)
        try:
            while not done.is_set():
                already_removed = set(removed[: len(removed)])
                for hits in index.search("t", vectors[rng.integers(0, 4000, 4)], 8):
                    found = ids_of(hits)
                    assert not set(found) & already_removed
                    assert all(0 <= i < 4000 for i in found)
                searches[0] += 1
        except BaseException as exc:
            errors.append(exc)

    searchers = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    writers = [threading.Thread(target=writer, args=r) for r in ((500, 2250), (2250, 4000))]
    for t in searchers + writers:
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    for t in searchers:
        t.join(10)
    assert not errors, errors
    assert searches[0] > 10
    assert index.kind("t") == "hnsw"
    expected = set(range(4000)) - set(removed)
    assert index.size("t") == len(expected)
    assert set(store_of(index, "t").snapshot()[0].tolist()) == expected
