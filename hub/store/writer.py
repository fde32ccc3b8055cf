"""Writing resource rows and their index rows.

Owns: pid allocation, bulk insertion (COPY on PostgreSQL, executemany on SQLite), moving
the current version into history (one resource, or many at once: ``replace_many``) (with the compartment rows it had, into
``history_compartment``), replacing index rows (each type's into the table
``hub.db.schema.index_table`` names: AuditEvent's references apart), and sealing versions
that are stored encrypted.
Calls: SQLAlchemy, psycopg (COPY), ``hub.crypto`` (seal), ``hub.ops.compartment`` (pending
compartment references the caller left unresolved).  Called by: the store, bulk ingest,
the audit trail and ``hub reindex``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from hub.crypto.envelope import seal
from hub.crypto.keys import keyring_for
from hub.db.schema import (
    INDEX_TABLES,
    compartment,
    history_compartment,
    index_table,
    resource,
    resource_history,
)
from hub.ops.compartment import PENDING
from hub.ops.compartment import resolve as resolve_compartment
from hub.store.records import NewResource, instant

_COPY_THRESHOLD = 64  # below this many rows, plain INSERTs beat setting up a COPY


def _is_postgres(conn: sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def allocate_pids(conn: sa.Connection, count: int) -> list[int]:
    if count == 0:
        return []
    if _is_postgres(conn):
        rows = conn.exec_driver_sql(
            "SELECT nextval('resource_pid_seq') FROM generate_series(1, %(n)s)", {"n": count}
        ).all()
        return [r[0] for r in rows]
    # SQLite: the caller holds the write lock (BEGIN IMMEDIATE), and rows are never removed
    # from `resource`, so max(pid) only grows.
    top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(resource.c.pid), 0))).scalar_one()
    return list(range(top + 1, top + 1 + count))


def _bulk_rows(
    conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    if not rows:
        return
    if _is_postgres(conn) and len(rows) >= _COPY_THRESHOLD:
        raw: Any = conn.connection.dbapi_connection  # psycopg's Connection, for COPY
        assert raw is not None
        with (
            raw.cursor() as cursor,
            cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    marker = "%s" if _is_postgres(conn) else "?"
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([marker] * len(columns))})"
    conn.exec_driver_sql(sql, rows)


_RESOURCE_COLUMNS = ("pid", "res_type", "res_id", "version", "last_updated", "deleted", "content")


def insert_index_rows(conn: sa.Connection, pids: Sequence[int], items: Sequence[NewResource]) -> None:
    by_table: dict[sa.Table, list[tuple[Any, ...]]] = {}
    for pid, item in zip(pids, items, strict=True):
        if PENDING in item.index_rows:
            # Callers resolve with this hub's base URL (the store, ingest, reindex); whatever
            # is left is resolved without it: absolute URLs then stay foreign (restricted).
            resolve_compartment(conn, item.index_rows, None)
        for kind, rows in item.index_rows.items():
            by_table.setdefault(index_table(kind, item.res_type), []).extend((pid, *row) for row in rows)
    for table, rows in by_table.items():
        _bulk_rows(conn, table, [c.name for c in table.columns], rows)


def stored_content(conn: sa.Connection, item: NewResource) -> bytes:
    """The bytes to store for a version: its JSON, or the envelope sealing it (hub.crypto).

    Sealing happens here, at the last moment, with the keys of the database written to:
    until then the content may still be edited (bulk ingest renumbers ids in it).
    """
    if not item.encrypt:
        return item.content
    return seal(
        keyring_for(conn.engine),
        item.content,
        item.res_type,
        item.res_id,
        item.version,
        instant(item.last_updated),
    )


def insert_new(conn: sa.Connection, items: Sequence[NewResource]) -> list[int]:
    """Insert resources that do not exist yet (any version number), with their indexes."""
    pids = allocate_pids(conn, len(items))
    rows = [
        (pid, it.res_type, it.res_id, it.version, it.last_updated, False, stored_content(conn, it).decode())
        for pid, it in zip(pids, items, strict=True)
    ]
    _bulk_rows(conn, resource, _RESOURCE_COLUMNS, rows)
    insert_index_rows(conn, pids, items)
    return pids


def archive_current(conn: sa.Connection, pid: int) -> None:
    """Copy the current version of a resource into history before it is replaced, with the
    compartment rows it has (a version is visible to those who could see that version)."""
    conn.execute(
        history_compartment.insert().from_select(
            ["pid", "version", "patient_id", "labels"],
            sa.select(compartment.c.pid, resource.c.version, compartment.c.patient_id, compartment.c.labels)
            .join(resource, resource.c.pid == compartment.c.pid)
            .where(compartment.c.pid == pid),
        )
    )
    columns = [
        resource.c[name]
        for name in ("pid", "version", "res_type", "res_id", "last_updated", "deleted", "content")
    ]
    conn.execute(
        resource_history.insert().from_select(
            ["pid", "version", "res_type", "res_id", "last_updated", "deleted", "content"],
            sa.select(*columns).where(resource.c.pid == pid),
        )
    )


def replace_many(conn: sa.Connection, rows: Sequence[tuple[int, NewResource]]) -> None:
    """New current versions of several resources at once (pid, new version), each current
    row locked by the caller (``reader.current_rows(for_update=True)``; SQLite: the one
    writer) so none can change meanwhile: their current versions archived with two
    statements, the rows updated with one executemany, their index rows replaced with one
    DELETE per index table and the bulk insert (``replace_current`` does this per resource)."""
    if not rows:
        return
    pids = [pid for pid, _ in rows]
    for start in range(0, len(pids), 500):
        chunk = pids[start : start + 500]
        conn.execute(
            history_compartment.insert().from_select(
                ["pid", "version", "patient_id", "labels"],
                sa.select(
                    compartment.c.pid, resource.c.version, compartment.c.patient_id, compartment.c.labels
                )
                .join(resource, resource.c.pid == compartment.c.pid)
                .where(compartment.c.pid.in_(chunk)),
            )
        )
        names = ("pid", "version", "res_type", "res_id", "last_updated", "deleted", "content")
        conn.execute(
            resource_history.insert().from_select(
                list(names), sa.select(*(resource.c[n] for n in names)).where(resource.c.pid.in_(chunk))
            )
        )
        for table in INDEX_TABLES.values():
            conn.execute(table.delete().where(table.c.pid.in_(chunk)))
    conn.execute(
        resource.update()
        .where(resource.c.pid == sa.bindparam("b_pid"))
        .values(
            version=sa.bindparam("b_version"),
            last_updated=sa.bindparam("b_last_updated"),
            deleted=False,
            content=sa.bindparam("b_content"),
        ),
        [
            {
                "b_pid": pid,
                "b_version": item.version,
                "b_last_updated": item.last_updated,
                "b_content": stored_content(conn, item).decode(),
            }
            for pid, item in rows
        ],
    )
    insert_index_rows(conn, pids, [item for _, item in rows])


def delete_index_rows(conn: sa.Connection, pid: int, *, keep_compartment: bool = False) -> None:
    for kind, table in INDEX_TABLES.items():
        if not (keep_compartment and kind == "compartment"):
            conn.execute(table.delete().where(table.c.pid == pid))


def replace_current(
    conn: sa.Connection,
    pid: int,
    expected_version: int,
    version: int,
    last_updated: datetime,
    content: bytes | None,
) -> bool:
    """Make a new current version (content None = deleted). False if someone else won the race."""
    archive_current(conn, pid)
    result = conn.execute(
        resource.update()
        .where(resource.c.pid == pid, resource.c.version == expected_version)
        .values(
            version=version,
            last_updated=last_updated,
            deleted=content is None,
            content=content.decode() if content is not None else None,
        )
    )
    if result.rowcount != 1:
        return False
    # A deleted resource keeps its compartment rows: its history stays that patient's data.
    delete_index_rows(conn, pid, keep_compartment=content is None)
    return True
