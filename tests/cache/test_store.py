"""The in-memory store: exact lookup per namespace, expiry, eviction by worth."""

from __future__ import annotations

import numpy as np

from icgate.cache.store import CacheEntry, CacheStore, initial_utility, keep_score


def entry(i: int, namespace: str = "t1", key: str | None = None, **kw: object) -> CacheEntry:
    fields: dict[str, object] = {
        "id": i, "namespace": namespace, "exact_key": key or f"k{i}", "context_fingerprint": "",
        "embed_text": f"q{i}", "prompt_text": f"q{i}", "response_text": f"a{i}", "response": {},
        "backend": "small", "tier": "small", "prompt_tokens": 3, "completion_tokens": 4,
        "vector": np.zeros(4, dtype=np.float32), "created_at": 0.0, "last_used_at": 0.0,
    }  # fmt: skip
    fields.update(kw)
    return CacheEntry(**fields)  # type: ignore[arg-type]


def test_exact_lookup_is_per_namespace() -> None:
    store = CacheStore()
    store.add(entry(1, "t1", "same"))
    store.add(entry(2, "t2", "same"))
    assert store.exact("t1", "same").id == 1  # type: ignore[union-attr]
    assert store.exact("t2", "same").id == 2  # type: ignore[union-attr]
    assert store.exact("t3", "same") is None
    store.remove(1)
    assert store.exact("t1", "same") is None and store.size("t1") == 0 and store.size("t2") == 1


def test_expiry() -> None:
    store = CacheStore()
    store.add(entry(1, expires_at=100.0))
    store.add(entry(2, expires_at=None))
    assert store.expired(99.0) == []
    assert store.expired(100.0) == [1]


def test_eviction_keeps_useful_entries_over_recent_useless_ones() -> None:
    store = CacheStore()
    now = 10 * 86_400.0
    store.add(entry(1, utility=0.9, hits=5, last_used_at=now - 5 * 86_400.0))  # useful, a bit old
    store.add(entry(2, utility=0.1, last_used_at=now - 60))  # recent but useless
    store.add(entry(3, utility=0.5, last_used_at=now - 3600))
    assert store.over_capacity("t1", 3, now) == []
    assert store.over_capacity("t1", 2, now) == [2]
    assert store.over_capacity("t1", 1, now) == [2, 3]
    assert keep_score(store.get(1), now) > keep_score(store.get(2), now)  # type: ignore[arg-type]


def test_feedback_moves_utility_within_bounds() -> None:
    e = entry(1, utility=initial_utility(best_tier=True))
    assert e.utility == 0.8 and initial_utility(best_tier=False) == 0.5
    e.apply_feedback(1.0)
    e.apply_feedback(1.0)
    assert e.utility == 1.0
    for _ in range(10):
        e.apply_feedback(-1.0)
    assert e.utility == 0.0 and e.feedback_count == 12 and e.feedback_sum == -8.0
