"""Database engines and schema migrations.

One code path for both stores: an SQLite file (the embedded default) and
PostgreSQL (shared by replicas). The schema is owned by Alembic; the gateway
runs `upgrade` at start-up or `icgate db upgrade` does it by hand.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
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
# A PostgreSQL server that does not answer (a host gone, packets dropped) fails a connection attempt after
# this, instead of the operating system's minutes: write-behind queues retry, key lookups answer from memory.
PG_CONNECT_TIMEOUT_S = 10
NEARLY_FULL_BYTES = 1 << 20  # below this free, a failed SQLite write is put down to a full disk
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
    connect_args = kwargs.pop("connect_args", {})
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        if parsed.get_backend_name() == "postgresql":
            connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        return sa.create_engine(parsed, connect_args=connect_args, **kwargs)

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


class DatabaseUnusableError(RuntimeError):
    """The gateway could not write to its database; the message is one line for the operator."""


def check_writable(url: str, timeout_s: float = 5.0) -> None:
    """Raise DatabaseUnusableError (one line, no traceback needed) unless the database at `url` takes a
    write now. SQLite: the data directory is created and a real write is committed (a read-only
    filesystem or file, or a full disk, fail here, not on the first request's log row); PostgreSQL: it
    answers within `timeout_s` and is not read-only (a standby)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not _is_memory_sqlite(parsed):
            assert parsed.database is not None
            _check_sqlite(Path(parsed.database).expanduser())
        return
    engine = make_engine(
        url, connect_args={"connect_timeout": max(1, round(timeout_s))}, poolclass=sa.NullPool
    )
    where = f"{parsed.get_backend_name()} database {parsed.database!r} at {parsed.host}:{parsed.port or 5432}"
    try:
        with engine.connect() as conn:
            read_only = conn.dialect.name == "postgresql" and (
                conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
            )
    except sa.exc.DBAPIError as exc:
        raise DatabaseUnusableError(
            f"cannot connect to the {where}: {_first_line(exc.orig or exc)}"
        ) from None
    finally:
        engine.dispose()
    if read_only:
        raise DatabaseUnusableError(f"the {where} is read-only (a standby?): the gateway must write to it")


def _check_sqlite(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnusableError(
            f"cannot create the data directory {path.parent}: {exc.strerror or exc}"
        ) from None
    existed = path.exists()
    try:
        conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            # A real write, committed: SQLite opens a file it may not write read-only without a word, and
            # a full disk only shows when a page is written. The value written is the one there.
            conn.execute("BEGIN IMMEDIATE")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if not existed and path.exists() and path.stat().st_size == 0:
            path.unlink(missing_ok=True)  # an empty file our attempt left
        raise DatabaseUnusableError(_sqlite_problem(path, exc)) from None


def _sqlite_problem(path: Path, exc: sqlite3.Error) -> str:
    """One line: what SQLite said, and what the filesystem says (SQLite reports a full disk met while
    sizing its shared-memory file as an I/O error, and a read-only one as a file it cannot open)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    said = _first_line(exc)
    read_only_fs, free = filesystem_state(path)
    if read_only_fs:
        return f"the database {path} cannot be written: its filesystem is mounted read-only ({said})"
    if code == sqlite3.SQLITE_READONLY:
        return (
            f"the database {path} cannot be written: it is read-only ({said}); the file and its directory "
            "must be writable"
        )
    if code == sqlite3.SQLITE_FULL or (free is not None and free < NEARLY_FULL_BYTES):
        return (
            f"the database {path} cannot be written: the disk is full ({said}; {free} bytes free); "
            "free space on its filesystem"
        )
    if code == sqlite3.SQLITE_CANTOPEN:
        return f"the database {path} cannot be opened ({said}); its directory must exist and be writable"
    return f"the database {path} cannot be written: {said}"


def sqlite_file(engine: sa.Engine) -> Path | None:
    """The file behind an SQLite engine; None for another database or SQLite in memory."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or _is_memory_sqlite(url) or url.database is None:
        return None
    return Path(url.database).expanduser()


def filesystem_state(path: Path) -> tuple[bool, int | None]:
    """Whether the filesystem holding `path` is read-only, and the bytes free on it (None: unknown).

    SQLite reports a write refused by a filesystem gone read-only as a plain I/O error: this tells. The
    mount flags do not always say it (ext4 turned read-only by an error keeps `rw` in its mount options on
    recent kernels), so a file is also created and dropped at once in the directory.
    """
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False, None
    read_only = bool(fs.f_flag & os.ST_RDONLY)
    if not read_only:
        try:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as exc:
            read_only = exc.errno == errno.EROFS
    return read_only, fs.f_bavail * fs.f_frsize


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
