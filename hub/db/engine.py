"""Engine construction for SQLite (embedded default) and PostgreSQL.

Owns: driver settings that make both databases behave alike for the store: SQLite WAL
and immediate write transactions, URL aliases.
Calls: SQLAlchemy.  Called by: the CLI, the app factory, tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and pick the psycopg 3 driver for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def is_sqlite(engine_or_url: sa.Engine | str) -> bool:
    url = (
        engine_or_url.url if isinstance(engine_or_url, sa.Engine) else make_url(normalize_url(engine_or_url))
    )
    return url.get_backend_name() == "sqlite"


def create_engine(url: str, *, echo: bool = False) -> sa.Engine:
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
    engine = sa.create_engine(url, **kwargs)
    if is_sqlite(url):
        _configure_sqlite(engine)
    else:
        _configure_postgres(engine)
    return engine


def _configure_postgres(engine: sa.Engine) -> None:
    from psycopg.adapt import Loader

    class RawJsonbLoader(Loader):
        # Resource JSON goes back to clients as stored; parsing it here would be wasted work.
        def load(self, data: Any) -> bytes:
            return bytes(data)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.adapters.register_loader("jsonb", RawJsonbLoader)


def _configure_sqlite(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from pysqlite so BEGIN IMMEDIATE is possible.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front: a deferred transaction that upgrades to a write
        # lock can fail with SQLITE_BUSY instead of waiting for the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")
