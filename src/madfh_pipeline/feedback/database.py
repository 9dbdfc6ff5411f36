"""Engines, transactions and migrations for the two supported backends: embedded SQLite and PostgreSQL.

SQLite is the embedded default (one file, no server), tuned for several processes writing at once:

- ``journal_mode=WAL``: readers never block the writer and see a consistent snapshot for a whole transaction;
- ``synchronous=FULL``: a commit that returned is on disk (survives a killed process and a power cut);
- ``busy_timeout``: a writer waits for the lock instead of failing with "database is locked";
- ``foreign_keys=ON``: SQLite enforces foreign keys only when asked, per connection;
- write transactions start with ``BEGIN IMMEDIATE``: they take the write lock up front, so two writers queue on the
  busy timeout instead of one failing when it upgrades a read lock (the classic deferred-transaction deadlock).
  Python's sqlite3 module is put in autocommit mode so that these BEGINs are ours, not its own.

PostgreSQL needs nothing special for writes (READ COMMITTED, constraints do the work); reads that must be
consistent across several statements (snapshots) run in a READ ONLY, REPEATABLE READ transaction.

The schema exists only through Alembic migrations (``migrations/``, shipped inside the package). Migrations run on a
connection we open, inside one transaction that holds the write lock (SQLite) or an advisory lock (PostgreSQL), so
two processes that open a fresh database at the same time cannot both try to create it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session

from madfh_pipeline.feedback.errors import SchemaOutOfDateError, UnsupportedDatabaseError

logger = logging.getLogger(__name__)

#: The Alembic script folder, next to this module (installed with the package).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock that serialises migrations (any constant; "MADFH_KB" in ASCII).
MIGRATION_LOCK_KEY = 0x4D41444648_4B42
#: Execution option that marks a connection as a writer (SQLite: ``BEGIN IMMEDIATE``).
WRITE_OPTION = "madfh_write"
DEFAULT_BUSY_TIMEOUT_S = 30.0
SUPPORTED_BACKENDS = ("sqlite", "postgresql")

#: Command that upgrades a server database, quoted in error messages.
UPGRADE_COMMAND = "python -m madfh_pipeline.feedback upgrade --url <URL>"


def parse_url(url: str | URL) -> URL:
    """Validate a knowledge-base URL: a SQLite *file* or a PostgreSQL server.

    In-memory SQLite is refused: every pooled connection would see its own empty database, which looks like lost
    writes. Plain ``postgresql://`` uses SQLAlchemy's default driver (psycopg 3 since SQLAlchemy 2.1).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise UnsupportedDatabaseError(
            f"Knowledge base URL uses '{backend}'; supported are sqlite:///<file> and postgresql+psycopg://..."
        )
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:") or parsed.query.get("mode") == "memory":
            raise UnsupportedDatabaseError(
                "The knowledge base needs a SQLite *file* (sqlite:///path/to/kb.sqlite), not an in-memory database: "
                "each connection would see a different, empty database."
            )
    return parsed


def sqlite_url(path: str | Path) -> URL:
    """The URL of an embedded knowledge base file."""
    return URL.create("sqlite", database=str(Path(path)))


def display_url(url: URL) -> str:
    """The URL with its password hidden, for logs and messages."""
    return url.render_as_string(hide_password=True)


def create_kb_engine(url: str | URL, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """An engine set up as the module docstring describes (SQLite pragmas and BEGIN IMMEDIATE for writers)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = Path(parsed.database or "")
        if not database.parent.exists():
            raise FileNotFoundError(
                f"Folder of the knowledge base file does not exist: {database.parent} (create it, or fix the URL)."
            )
        engine = sa.create_engine(parsed, connect_args={"timeout": busy_timeout_s})
        _configure_sqlite(engine, busy_timeout_s)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    """Install the per-connection pragmas and our own BEGIN (see the module docstring)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Driver-level autocommit: transactions are begun by the "begin" listener below, not by sqlite3 itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            mode = _enable_wal(cursor, busy_timeout_s)
            if str(mode).lower() != "wal":
                raise UnsupportedDatabaseError(
                    f"SQLite refused WAL mode (journal_mode is {mode!r}); the knowledge base needs a local file "
                    "system that supports shared memory (not a network share)."
                )
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _enable_wal(cursor: Any, busy_timeout_s: float) -> str:
    """Switch the file to WAL mode (a no-op once it is, since the mode is stored in the file); returns the mode.

    Switching needs a moment of exclusive access, and SQLite answers "database is locked" at once instead of
    calling the busy handler when another connection holds a lock, which happens when two processes open a new
    file together. So the switch is retried, for at most the busy timeout, and the last error is raised if the
    file stays locked.
    """
    mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode == "wal":
        return mode
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return str(cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def writer(engine: Engine) -> Engine:
    """A view of ``engine`` whose transactions are write transactions."""
    return engine.execution_options(**{WRITE_OPTION: True})


def snapshot_reader(engine: Engine) -> Engine:
    """A view of ``engine`` whose transactions see one consistent snapshot of the whole database.

    SQLite in WAL mode already gives a transaction one snapshot from its first read; PostgreSQL needs REPEATABLE READ
    (READ ONLY, so a snapshot can never write by accident).
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


# --------------------------------------------------------------------------------------------------- migrations


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations (no alembic.ini needed).

    ``connection`` is handed to ``migrations/env.py``, which refuses to run without one: migrations always run on a
    connection this module opened and locked.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"No migrations found in {MIGRATIONS_DIR}; the package is incomplete.")
    return head


VERSION_TABLE = "alembic_version"


def _read_revision(connection: Connection) -> str | None:
    """The revision recorded in Alembic's version table (read directly: opening a knowledge base stays quiet,
    where Alembic's MigrationContext logs two INFO lines each time)."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    revisions = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(revisions) > 1:
        raise SchemaOutOfDateError(f"The database records several schema heads {revisions}; fix it by hand.")
    return revisions[0] if revisions else None


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return _read_revision(connection)


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """One write transaction holding the lock that serialises migrations."""
    with writer(engine).connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        yield connection


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Migrate the database up to ``revision`` in one locked transaction; returns the revision reached."""
    scripts = ScriptDirectory.from_config(alembic_config())
    target = scripts.get_current_head() if revision == "head" else revision
    with _migration_connection(engine) as connection:
        before = _read_revision(connection)
        if before == target:
            return before
        if before is not None and before not in {script.revision for script in scripts.walk_revisions()}:
            raise SchemaOutOfDateError(
                f"Knowledge base {display_url(engine.url)} is at schema revision {before}, which this code does not "
                "know (written by a newer version?). Upgrade madfh_pipeline instead of the database."
            )
        command.upgrade(alembic_config(connection), revision)
        after = _read_revision(connection)
    if before != after:
        logger.info("Knowledge base %s migrated from %s to %s.", display_url(engine.url), before or "empty", after)
    return after or ""


def downgrade(engine: Engine, revision: str) -> str | None:
    """Migrate the database down to ``revision`` (``base``: drop everything); returns the revision reached."""
    with _migration_connection(engine) as connection:
        command.downgrade(alembic_config(connection), revision)
        after = _read_revision(connection)
    logger.warning("Knowledge base %s downgraded to %s.", display_url(engine.url), after or "base (empty)")
    return after


def check_schema(engine: Engine) -> str:
    """Raise :class:`SchemaOutOfDateError` unless the database is at this code's head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no knowledge-base schema" if current is None else f"is at schema revision {current}"
        raise SchemaOutOfDateError(
            f"Knowledge base {display_url(engine.url)} {state}; this code needs {head}. "
            f"Migrate it explicitly: {UPGRADE_COMMAND} (or KnowledgeBase(url, migrate=True))."
        )
    return current


def new_revision(engine: Engine, message: str) -> Path:
    """Draft a migration (Alembic autogenerate) from the models' difference to a database at head.

    A development tool: it writes ``migrations/versions/<rev>_<message>.py`` into the source tree (editable install),
    to be read, completed and committed by hand. Autogenerate misses some changes (CHECK constraints, data moves).
    """
    check_schema(engine)
    with writer(engine).connect() as connection, connection.begin():
        script = command.revision(alembic_config(connection), message=message, autogenerate=True)
    scripts = script if isinstance(script, list) else [script]
    path = Path(scripts[0].path)  # type: ignore[union-attr]
    logger.info("Drafted migration %s: review it before committing.", path)
    return path
