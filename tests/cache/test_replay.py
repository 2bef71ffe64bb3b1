"""Which entries replay regenerates, within a budget, and which it prunes."""

from __future__ import annotations

from icgate.cache.replay import plan_replay
from tests.cache.test_store import entry

DAY = 86_400.0


def test_plan_replays_valuable_small_answers_within_budget_and_prunes_unused() -> None:
    now = 30 * DAY
    entries = [
        entry(1, tier="small", hits=10, utility=0.6, created_at=now - 2 * DAY),  # valuable: replay first
        entry(2, tier="small", hits=2, utility=0.5, created_at=now - 2 * DAY),
        entry(3, tier="large", hits=9, utility=0.9, created_at=now - 2 * DAY),  # already large: keep
        entry(4, tier="large", hits=1, feedback_sum=-2.0, utility=0.4, created_at=now - 2 * DAY),  # poor
        entry(5, tier="small", utility=0.5, created_at=now - 20 * DAY),  # never used, old: prune
        entry(6, tier="small", utility=0.5, created_at=now - DAY),  # never used, young: keep
    ]
    plan = plan_replay(entries, "large", now, budget_usd=1.0, cost_of=lambda e: 0.4, max_entries=10)
    assert [e.id for e in plan.replay] == [1, 2]  # the third (id 4) would exceed the budget
    assert [e.id for e in plan.prune] == [5]
    generous = plan_replay(entries, "large", now, budget_usd=10.0, cost_of=lambda e: 0.4, max_entries=10)
    assert [e.id for e in generous.replay] == [1, 2, 4, 6]
    capped = plan_replay(entries, "large", now, budget_usd=10.0, cost_of=lambda e: 0.4, max_entries=1)
    assert [e.id for e in capped.replay] == [1]
