"""Leases: jobs that one replica at a time runs, coordinated through the database every replica shares.

A lease is a row (`leases`): its holder and when it runs out. `take` succeeds only on a row that has run
out (one UPDATE whose WHERE says so) or on a new row (one INSERT on the primary key), so two replicas
racing for it cannot both win, on PostgreSQL (the second UPDATE waits for the first and re-reads the row)
as on SQLite (writes are serialised). Replicas' clocks only need to agree to within a small share of the
lease: they write and compare `expires_at` by their own clocks.

Why a row and not PostgreSQL's advisory locks: the same code then serves SQLite, and a lease that stays
taken for its whole term also spaces the job out (`length_learning` holds it for one refit interval, so
the refit runs once per interval across all replicas, not once per replica).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from icgate.gateway.store import tables
from icgate.gateway.store.tables import utcnow


def take(engine: sa.Engine, name: str, holder: str, term_s: float, now: datetime | None = None) -> bool:
    """Take the lease `name` for `term_s` if it has run out (or never existed); True when taken."""
    now = now or utcnow()
    until = now + timedelta(seconds=term_s)
    table = tables.LeaseRow
    with engine.begin() as conn:
        taken = conn.execute(
            sa.update(table)
            .where(table.name == name, table.expires_at <= now)
            .values(holder=holder, expires_at=until)
        )
        if taken.rowcount:
            return True
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(table).values(name=name, holder=holder, expires_at=until))
    except sa.exc.IntegrityError:
        return False  # held by someone else (or just taken by them)
    return True


def seize(engine: sa.Engine, name: str, holder: str, term_s: float, now: datetime | None = None) -> None:
    """Take the lease `name` for `term_s` whoever holds it: for a job an operator asks for now, which then
    also restarts the spacing (the next scheduled run, on any replica, is a whole term away)."""
    now = now or utcnow()
    until = now + timedelta(seconds=term_s)
    table = tables.LeaseRow
    move = sa.update(table).where(table.name == name).values(holder=holder, expires_at=until)
    with engine.begin() as conn:
        if conn.execute(move).rowcount:
            return
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(table).values(name=name, holder=holder, expires_at=until))
    except sa.exc.IntegrityError:  # another replica inserted it meanwhile: take it from them
        with engine.begin() as conn:
            conn.execute(move)


def holder(engine: sa.Engine, name: str, now: datetime | None = None) -> str | None:
    """Who holds the lease now (None: nobody)."""
    now = now or utcnow()
    table = tables.LeaseRow
    with engine.connect() as conn:
        row = conn.execute(sa.select(table.holder, table.expires_at).where(table.name == name)).first()
    return None if row is None or row.expires_at <= now else str(row.holder)
