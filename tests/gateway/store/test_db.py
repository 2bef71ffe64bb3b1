from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from icgate.gateway.store.db import alembic_config, current_revision, make_engine, normalize_url, upgrade
from icgate.gateway.store.tables import Base

TABLES = {
    "tenants",
    "api_keys",
    "request_log",
    "cache_entries",
    "model_artifacts",
    "route_samples",
    "length_samples",
    "leases",
}
HEAD = "0006"


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_tables_and_sets_revision(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert _tables(empty_db_url) >= TABLES
    assert current_revision(empty_db_url) == HEAD


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == HEAD
    assert _tables(db_url) >= TABLES


def test_models_match_migrations(db_url: str) -> None:
    """A model change without a migration (or the reverse) fails here."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_back(db_url: str) -> None:
    command.downgrade(alembic_config(db_url), "0001")
    assert current_revision(db_url) == "0001"
    assert "cache_entries" not in _tables(db_url)

    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(db_url) is None
    assert not TABLES & _tables(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == HEAD


def test_sqlite_engine_uses_wal_and_creates_parent_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) > 0
        assert path.exists()
    finally:
        engine.dispose()


def test_plain_postgresql_urls_use_psycopg() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
