"""Shared fixtures.

`db_url` yields a fresh, migrated database, once on SQLite and once on
PostgreSQL (a database created for the test and dropped after it). Point
ICGATE_TEST_POSTGRES_URL at another server to test there; the URL's database
is only used to issue CREATE/DROP DATABASE.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from icgate.gateway.store.db import make_engine, normalize_url, upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "ICGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    """An autocommit engine on the server, for creating throwaway databases."""
    engine = make_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {reason}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database that no other test uses."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'icgate.db'}"
        return
    admin: sa.Engine = request.getfixturevalue("postgres_admin")
    name = f"icgate_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield normalize_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A fresh database migrated to head."""
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()
