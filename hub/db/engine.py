"""Engine construction for SQLite (embedded default) and PostgreSQL.

Owns: driver settings that make both databases behave alike for the store: SQLite WAL
and immediate write transactions, URL aliases; and the per-request guard
(:class:`RequestGuard`): a time limit on every database transaction begun while a request
is being served (PostgreSQL ``statement_timeout``, set on a connection only when it
differs from what the connection has; SQLite a progress handler), and cancelling the
statements of a request whose client went away (psycopg ``cancel_safe``,
``sqlite3.Connection.interrupt``); PostgreSQL connections pinged before use only after
sitting idle (not on every checkout).
Calls: SQLAlchemy.  Called by: the CLI, the app factory, tests; ``hub.api.app`` opens a
guard around each FHIR request (code outside a guard, such as CLI jobs, is not limited).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

# SQLite calls the progress handler every this many virtual-machine instructions.
_SQLITE_PROGRESS_STEPS = 10_000
# A pooled PostgreSQL connection idle longer than this is pinged before use.
_PING_AFTER_IDLE_SECONDS = 5.0
# Connection info keys: the session's statement_timeout in ms as set here (absent or None:
# the server's default), one set by a transaction not yet committed, and the idle clock.
_TIMEOUT_KEY = "hub_statement_timeout"
_PENDING_TIMEOUT_KEY = "hub_statement_timeout_pending"
_UNKNOWN_TIMEOUT = -1
_IDLE_SINCE_KEY = "hub_idle_since"


class RequestGuard:
    """The database work of one request: its time limit per transaction and its cancellation.

    The pool's checkout event registers each DBAPI connection the request takes (checkin
    forgets it), so :meth:`cancel`, called from the event loop when the client disconnects,
    reaches exactly the statements this request is running and no other request's.
    """

    def __init__(self, timeout_seconds: float | None) -> None:
        self.timeout = timeout_seconds if timeout_seconds and timeout_seconds > 0 else None
        self.cancelled = False
        self.timed_out = False  # set by the SQLite handler; PostgreSQL reports QueryCanceled
        self._deadline: float | None = None  # of the current transaction (SQLite)
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def begin_transaction(self) -> None:
        if self.timeout is not None:
            self._deadline = time.monotonic() + self.timeout

    def should_abort(self) -> bool:
        if self.cancelled:
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.timed_out = True
            return True
        return False

    def attach(self, dbapi_connection: Any) -> None:
        with self._lock:
            self._connections.append(dbapi_connection)

    def detach(self, dbapi_connection: Any) -> None:
        with self._lock:
            if dbapi_connection in self._connections:
                self._connections.remove(dbapi_connection)

    def cancel(self) -> None:
        """Stop what the request's connections are executing (idempotent, never raises)."""
        with self._lock:
            self.cancelled = True
            connections = list(self._connections)
        for connection in connections:
            try:
                if hasattr(connection, "cancel_safe"):  # psycopg 3.2+
                    connection.cancel_safe(timeout=2.0)
                elif hasattr(connection, "interrupt"):  # sqlite3
                    connection.interrupt()
                else:
                    connection.cancel()
            except Exception:  # noqa: BLE001, S110  (a connection already closed has nothing to stop)
                pass


_guard: ContextVar[RequestGuard | None] = ContextVar("hub_request_guard", default=None)


@contextmanager
def guarded(guard: RequestGuard) -> Iterator[RequestGuard]:
    """Run the enclosed database work (in this thread/context) under ``guard``."""
    token = _guard.set(guard)
    try:
        yield guard
    finally:
        _guard.reset(token)


class RequestCancelled(Exception):
    """The client went away; the request's remaining database work is not started."""


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
    # hide_parameters: a database error's text (logged, and kept as a connector message's
    # error) never carries a statement's values: CCCDs, names, resource bodies.
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # No pool_pre_ping: it costs a round trip on every checkout; _configure_idle_ping
        # pings only connections that sat idle (see _PING_AFTER_IDLE_SECONDS).
        kwargs.update(pool_size=10, max_overflow=20)
        # JIT off: a consent-filtered search adds a per-row subquery's estimated cost to every
        # candidate row, which pushes it over jit_above_cost, and compiling then costs 50 ms
        # to over a second per statement for queries that run in a few milliseconds.
        kwargs["connect_args"] = {"options": "-c jit=off"}
    engine = sa.create_engine(url, **kwargs)
    if is_sqlite(url):
        _configure_sqlite(engine)
    else:
        _configure_postgres(engine)
        _configure_idle_ping(engine)
    _configure_guard(engine)
    return engine


def _configure_guard(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        guard = _guard.get()
        if guard is not None:
            guard.attach(dbapi_connection)
            record.info["hub_guard"] = guard

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, record: Any) -> None:
        guard = record.info.pop("hub_guard", None) if record is not None else None
        if guard is not None:
            guard.detach(dbapi_connection)


def _configure_postgres(engine: sa.Engine) -> None:
    from psycopg.adapt import Loader

    class RawJsonbLoader(Loader):
        # Resource JSON goes back to clients as stored; parsing it here would be wasted work.
        def load(self, data: Any) -> bytes:
            return bytes(data)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.adapters.register_loader("jsonb", RawJsonbLoader)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Every statement of a guarded request's transaction is bounded (PostgreSQL answers
        # QueryCanceled, SQLSTATE 57014, past it); unguarded work runs with the server's
        # default. The setting is the session's, set only when the connection's differs:
        # a per-transaction SET LOCAL would cost a round trip on every transaction.
        guard = _guard.get()
        if guard is not None and guard.cancelled:
            raise RequestCancelled("the client disconnected")
        wanted = (
            max(1, int(guard.timeout * 1000)) if guard is not None and guard.timeout is not None else None
        )
        info = conn.info  # the DBAPI connection's (cleared when it is invalidated)
        if info.get(_TIMEOUT_KEY) == wanted:
            return
        value = "DEFAULT" if wanted is None else str(wanted)
        conn.exec_driver_sql(f"SET statement_timeout TO {value}")
        if getattr(conn.connection.dbapi_connection, "autocommit", False):  # holds at once
            info[_TIMEOUT_KEY] = wanted
        else:
            info[_PENDING_TIMEOUT_KEY] = wanted

    # A SET in a transaction lasts only if the transaction commits.
    # (An invalidated connection has no info to keep: its replacement starts afresh.)
    @sa.event.listens_for(engine, "commit")
    def _on_commit(conn: sa.Connection) -> None:
        if not conn.invalidated and _PENDING_TIMEOUT_KEY in conn.info:
            conn.info[_TIMEOUT_KEY] = conn.info.pop(_PENDING_TIMEOUT_KEY)

    @sa.event.listens_for(engine, "rollback")
    def _on_rollback(conn: sa.Connection) -> None:
        if not conn.invalidated:
            conn.info.pop(_PENDING_TIMEOUT_KEY, None)

    @sa.event.listens_for(engine, "handle_error")
    def _on_error(context: sa.engine.ExceptionContext) -> None:
        # Whatever failed (a commit, too), the session's setting is no longer known.
        if context.connection is not None and not context.connection.invalidated:
            context.connection.info.pop(_PENDING_TIMEOUT_KEY, None)
            context.connection.info[_TIMEOUT_KEY] = _UNKNOWN_TIMEOUT


def _configure_idle_ping(engine: sa.Engine) -> None:
    """Ping a pooled connection before use only when it has been idle a while.

    Under load connections are reused within milliseconds and were just seen working; a
    connection that died mid-request fails that request (503 ``transient``) and SQLAlchemy
    then discards every connection older than the failure. One that sat idle (the database
    may have restarted meanwhile) is pinged, and replaced when the ping fails.
    """

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE_KEY] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE_KEY)
        if idle_since is None or time.monotonic() - idle_since < _PING_AFTER_IDLE_SECONDS:
            return
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                # The pool discards this connection and tries another (up to three times).
                raise sa.exc.DisconnectionError(str(error)) from error
            raise


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
        # A statement of a guarded request stops ("interrupted") past its deadline or once
        # the client is gone; unguarded work (CLI jobs) never does.
        dbapi_connection.set_progress_handler(_sqlite_progress, _SQLITE_PROGRESS_STEPS)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front: a deferred transaction that upgrades to a write
        # lock can fail with SQLITE_BUSY instead of waiting for the busy timeout.
        guard = _guard.get()
        if guard is not None:
            if guard.cancelled:
                raise RequestCancelled("the client disconnected")
            guard.begin_transaction()
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def _sqlite_progress() -> int:
    guard = _guard.get()
    return 1 if guard is not None and guard.should_abort() else 0
