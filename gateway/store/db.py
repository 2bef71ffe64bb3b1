"""Database engines and schema migrations.

One code path for both stores: an SQLite file (the embedded default) and
PostgreSQL (shared by replicas). The schema is owned by Alembic; the gateway
runs `upgrade` at start-up or `icgate db upgrade` does it by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

# Inside the installed package (`icgate/migrations`), beside `gateway/`.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Any constant will do; it only has to be the same for every replica.
_PG_MIGRATION_LOCK = 0x1C6A7E


def normalize_url(url: str) -> URL:
    """Parse `url`, pointing plain PostgreSQL URLs at the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def make_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine ready for concurrent use from worker threads.

    SQLite gets WAL (readers do not block the writer) and a busy timeout (a
    second writer waits instead of failing with "database is locked").
    Parameters are hidden from exception messages so a failed insert never
    writes request data or key material into a log.
    """
    parsed = normalize_url(url)
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(parsed, **kwargs)

    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    memory = _is_memory_sqlite(parsed)
    if memory:
        # One shared connection, or every checkout would see a new empty database.
        kwargs.setdefault("poolclass", StaticPool)
    else:
        assert parsed.database is not None
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    return engine


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config built in code, so migrations run from any directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["database_url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` up to `revision`; a no-op when already there.

    Processes that start together are serialised (PostgreSQL: an advisory
    lock; SQLite: a write lock taken up front), so only one runs each migration
    and the others then find nothing to do.
    """
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        _serialize_sqlite_transactions(engine)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def _serialize_sqlite_transactions(engine: sa.Engine) -> None:
    """Make the pysqlite driver run DDL inside `BEGIN IMMEDIATE` transactions.

    By default it commits DDL on its own and begins transactions lazily, so two
    processes could both see an empty schema and both try to create it.
    """

    @sa.event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def current_revision(url: str) -> str | None:
    """The schema revision at `url`, or None for a database never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
