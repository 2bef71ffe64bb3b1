"""Cache entries in memory: lookup by exact key, expiry, and eviction by worth.

The hot path reads only this store and the vector index; the database is the
durable copy, kept in step by the gateway off the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Starting utility by the tier that produced the answer: the best tier's answer is worth more as an
# example for the smaller ones (IC-Cache).
BEST_TIER_UTILITY = 0.8
DEFAULT_UTILITY = 0.5


def initial_utility(*, best_tier: bool) -> float:
    """A new entry's utility. The caller knows its policy's tiers: it says whether the best one answered."""
    return BEST_TIER_UTILITY if best_tier else DEFAULT_UTILITY


@dataclass
class CacheEntry:
    id: int
    namespace: str  # one per tenant: entries never cross it
    exact_key: str
    context_fingerprint: str
    embed_text: str  # what was embedded: the last user turn with its context
    prompt_text: str  # the last user turn alone (shown as an example's question)
    response_text: str
    response: dict[str, Any]  # the full response body, replayed on a hit
    backend: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    vector: npt.NDArray[np.float32]
    utility: float = DEFAULT_UTILITY
    feedback_sum: float = 0.0
    feedback_count: int = 0
    hits: int = 0
    helped: int = 0  # times used as an in-context example
    created_at: float = 0.0
    last_used_at: float = 0.0
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def apply_feedback(self, score: float, weight: float = 0.2) -> None:
        """Feedback in [-1, 1] moves utility; it never leaves [0, 1]."""
        self.feedback_sum += score
        self.feedback_count += 1
        self.utility = min(1.0, max(0.0, self.utility + weight * score))


def keep_score(entry: CacheEntry, now: float, half_life_s: float = 86_400.0) -> float:
    """What an entry is worth keeping: utility first, then recent use and hits (not plain LRU)."""
    idle = max(0.0, now - max(entry.last_used_at, entry.created_at))
    recency = math.exp(-idle * math.log(2) / half_life_s)
    popularity = 1.0 - 1.0 / (1.0 + entry.hits + entry.helped)
    return entry.utility + 0.5 * recency + 0.3 * popularity


@dataclass
class CacheStore:
    entries: dict[int, CacheEntry] = field(default_factory=dict)
    _exact: dict[tuple[str, str], int] = field(default_factory=dict)
    _by_namespace: dict[str, set[int]] = field(default_factory=dict)

    def add(self, entry: CacheEntry) -> None:
        if entry.id in self.entries:
            self.remove(entry.id)
        self.entries[entry.id] = entry
        self._exact[(entry.namespace, entry.exact_key)] = entry.id
        self._by_namespace.setdefault(entry.namespace, set()).add(entry.id)

    def remove(self, entry_id: int) -> CacheEntry | None:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return None
        key = (entry.namespace, entry.exact_key)
        if self._exact.get(key) == entry_id:
            del self._exact[key]
        self._by_namespace.get(entry.namespace, set()).discard(entry_id)
        return entry

    def get(self, entry_id: int) -> CacheEntry | None:
        return self.entries.get(entry_id)

    def exact(self, namespace: str, key: str) -> CacheEntry | None:
        entry_id = self._exact.get((namespace, key))
        return self.entries.get(entry_id) if entry_id is not None else None

    def size(self, namespace: str) -> int:
        return len(self._by_namespace.get(namespace, ()))

    def namespace_ids(self, namespace: str) -> list[int]:
        return sorted(self._by_namespace.get(namespace, ()))

    def expired(self, now: float) -> list[int]:
        return [e.id for e in self.entries.values() if e.expired(now)]

    def over_capacity(self, namespace: str, capacity: int, now: float) -> list[int]:
        """The entries to evict so that `namespace` holds at most `capacity`, least worth first."""
        ids = self._by_namespace.get(namespace, set())
        excess = len(ids) - capacity
        if excess <= 0:
            return []
        ranked = sorted(ids, key=lambda i: (keep_score(self.entries[i], now), i))
        return ranked[:excess]
