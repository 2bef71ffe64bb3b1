"""Cache replay (IC-Cache's offline refinement): which entries to regenerate, which to prune.

Regenerating a small-model answer with the large model, while the large model
is idle, turns a mediocre cached answer into a good example; entries that never
served or helped anyone only cost memory and retrieval time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from icgate.cache.store import CacheEntry


@dataclass(frozen=True)
class ReplayPlan:
    replay: list[CacheEntry]  # best first
    prune: list[CacheEntry]


def needs_replay(entry: CacheEntry, best_tier: str) -> bool:
    """Answered by a cheaper tier, or judged poor by feedback."""
    return entry.tier != best_tier or entry.feedback_sum < 0


def replay_value(entry: CacheEntry) -> float:
    """How much a better answer would pay off: entries that are used often and rated useful first."""
    return (1 + entry.hits + entry.helped) * (0.5 + entry.utility)


def never_helps(entry: CacheEntry, now: float, min_age_s: float, max_utility: float) -> bool:
    age = now - entry.created_at
    return entry.hits == 0 and entry.helped == 0 and age >= min_age_s and entry.utility <= max_utility


def plan_replay(
    entries: list[CacheEntry],
    best_tier: str,
    now: float,
    budget_usd: float,
    cost_of: Callable[[CacheEntry], float],
    max_entries: int,
    prune_after_s: float = 7 * 86_400.0,
    prune_max_utility: float = 0.5,
) -> ReplayPlan:
    """Entries to regenerate within the budget (most valuable first) and entries to prune.

    An entry is pruned only if it is not also worth replaying: a rarely used
    small-tier answer is pruned rather than paid for.
    """
    prune = [e for e in entries if never_helps(e, now, prune_after_s, prune_max_utility)]
    pruned = {e.id for e in prune}
    candidates = sorted(
        (e for e in entries if e.id not in pruned and needs_replay(e, best_tier) and not e.expired(now)),
        key=lambda e: (-replay_value(e), e.id),
    )
    chosen: list[CacheEntry] = []
    spent = 0.0
    for entry in candidates:
        if len(chosen) >= max_entries:
            break
        cost = cost_of(entry)
        if spent + cost > budget_usd:
            continue
        chosen.append(entry)
        spent += cost
    return ReplayPlan(replay=chosen, prune=prune)
