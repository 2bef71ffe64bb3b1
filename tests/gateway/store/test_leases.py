"""Leases: one holder at a time, on SQLite and PostgreSQL, also when replicas race for one."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import sqlalchemy as sa

from icgate.gateway.store import leases
from icgate.gateway.store.db import make_engine
from icgate.gateway.store.tables import utcnow


def test_a_lease_is_taken_once_until_it_runs_out(engine: sa.Engine) -> None:
    now = utcnow()
    assert leases.take(engine, "job", "a", 60, now)
    assert not leases.take(engine, "job", "b", 60, now + timedelta(seconds=30))
    assert not leases.take(engine, "job", "a", 60, now + timedelta(seconds=30))  # not even by its holder
    assert leases.holder(engine, "job", now + timedelta(seconds=30)) == "a"
    assert leases.take(engine, "job", "b", 60, now + timedelta(seconds=61))
    assert leases.holder(engine, "job", now + timedelta(seconds=62)) == "b"
    assert leases.holder(engine, "job", now + timedelta(seconds=200)) is None


def test_a_seized_lease_changes_hands_and_starts_a_new_term(engine: sa.Engine) -> None:
    now = utcnow()
    leases.seize(engine, "fresh", "a", 60, now)  # no row yet
    assert leases.holder(engine, "fresh", now + timedelta(seconds=1)) == "a"
    assert leases.take(engine, "job", "a", 60, now)
    leases.seize(engine, "job", "b", 60, now + timedelta(seconds=30))  # held by a, taken anyway
    assert leases.holder(engine, "job", now + timedelta(seconds=31)) == "b"
    assert leases.holder(engine, "job", now + timedelta(seconds=89)) == "b"  # its own term, not a's
    assert not leases.take(engine, "job", "a", 60, now + timedelta(seconds=61))
    assert leases.take(engine, "job", "a", 60, now + timedelta(seconds=91))


def test_leases_of_other_jobs_are_independent(engine: sa.Engine) -> None:
    assert leases.take(engine, "one", "a", 60)
    assert leases.take(engine, "two", "b", 60)


def race(start: threading.Barrier, engine: sa.Engine, name: str, now: datetime, wins: list[str]) -> None:
    start.wait()
    if leases.take(engine, "refit", name, 50, now):
        wins.append(name)


def test_replicas_racing_for_a_lease_never_both_win(db_url: str) -> None:
    """Eight replicas (each its own engine, as separate processes would have) race, round after round, for
    a lease that has just run out: exactly one wins each round."""
    engines = [make_engine(db_url) for _ in range(8)]
    try:
        for round_ in range(5):
            now = utcnow() + timedelta(seconds=100 * round_)
            wins: list[str] = []
            start = threading.Barrier(len(engines))
            threads = [
                threading.Thread(target=race, args=(start, engine, f"replica-{i}", now, wins))
                for i, engine in enumerate(engines)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1, (round_, wins)
    finally:
        for engine in engines:
            engine.dispose()
