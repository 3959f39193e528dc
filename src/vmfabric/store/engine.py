"""Opening the database: engine settings, migrations, and sessions.

SQLite is the default (one file in the state directory, WAL so readers never wait for the
writer, foreign keys on). Transactions start with BEGIN IMMEDIATE, so two controller
processes sharing the file queue for the write lock up front instead of failing when a read
transaction tries to upgrade. Within one process, threads take turns on a single connection:
SQLite runs one write transaction at a time anyway, and a single connection keeps its page
cache, which every commit on another connection would make it throw away (measured on VM
creates from 16 threads: 6.5 ms of CPU each with a pool of 15 connections, 3.9 ms with one).
Waiting for the connection also hands over at once, where SQLite's busy handler sleeps in
growing steps. PostgreSQL is used when the URL names it.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_BUSY_TIMEOUT_MS = 30_000


def open_engine(url: str) -> Engine:
    """An engine for `url`, with the SQLite settings above when it is SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=1,
        max_overflow=0,
        pool_timeout=_BUSY_TIMEOUT_MS / 1000,
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe when several processes start at once."""
    config = Config()
    config.set_main_option("script_location", "vmfabric.store:migrations")
    with _migration_lock(engine), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialize migrations: a lock file beside a SQLite database, an advisory lock otherwise."""
    database = engine.url.database
    if engine.dialect.name == "sqlite":
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(875001)"))
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(875001)"))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (services return them)."""
    return sessionmaker(engine, expire_on_commit=False)
