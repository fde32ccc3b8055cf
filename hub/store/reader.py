"""Reading current versions, earlier versions and history.

Owns: the read-side SQL over ``resource`` and ``resource_history`` (each history row is
filtered by the visibility of its own version, see ``consent.decision.Access.visible``).
Calls: ``consent.context`` (the visibility condition of every read; what was read is
reported), ``hub.crypto.envelope`` (opening sealed content), SQLAlchemy.
Called by: the store.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from consent.context import report, required, visible_clause
from hub.crypto.envelope import open_content
from hub.db.schema import resource, resource_history
from hub.store.records import StoredResource, as_utc

_COLUMNS = ("res_type", "res_id", "version", "last_updated", "deleted", "content")
_MAX_VERSION = 2**31 - 1  # the version column is an INTEGER (int4 on PostgreSQL)


def _content_bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return value if isinstance(value, bytes) else value.encode()


def to_stored(row: sa.Row[Any]) -> StoredResource:
    content = _content_bytes(row.content)
    return StoredResource(
        res_type=row.res_type,
        res_id=row.res_id,
        version=row.version,
        last_updated=as_utc(row.last_updated),
        deleted=bool(row.deleted),
        # Encrypted versions are opened here, once; plain ones pass through untouched.
        content=None if content is None else open_content(content, row.res_type, row.res_id),
    )


def current_row(
    conn: sa.Connection, res_type: str, res_id: str, *, for_update: bool = False, visible_only: bool = False
) -> sa.Row[Any] | None:
    """The current row; with visible_only, None also when the request may not see it."""
    query = sa.select(resource.c.pid, *(resource.c[c] for c in _COLUMNS)).where(
        resource.c.res_id == res_id, resource.c.res_type == res_type
    )
    clause = visible_clause(resource) if visible_only else None
    if not visible_only:
        required()  # fail closed: even the lookup a write makes before its own check needs an Access
    if clause is not None:
        query = query.where(clause)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).first()


def current_rows(
    conn: sa.Connection, keys: list[tuple[str, str]], *, for_update: bool = False
) -> dict[tuple[str, str], sa.Row[Any]]:
    """``current_row`` of several (type, id) at once (not filtered by visibility: the caller
    checks what it may do with each), by (type, id); absent ones are missing."""
    required()  # fail closed, as current_row
    found: dict[tuple[str, str], sa.Row[Any]] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), 400):  # 2 bound parameters each: under SQLite's limit
        chunk = unique[start : start + 400]
        query = sa.select(resource.c.pid, *(resource.c[c] for c in _COLUMNS)).where(
            sa.tuple_(resource.c.res_type, resource.c.res_id).in_(chunk)
        )
        if for_update and conn.dialect.name == "postgresql":
            query = query.with_for_update()
        for row in conn.execute(query).all():
            found[(row.res_type, row.res_id)] = row
    return found


def version_row(conn: sa.Connection, res_type: str, res_id: str, version: int) -> sa.Row[Any] | None:
    """One version, when the request may see that version: the current one by its
    ``compartment`` rows, an earlier one by its own (``history_compartment``). A result moved
    to another patient is no longer the first patient's, but its first version still is (and
    never was the second patient's)."""
    if not 0 < version <= _MAX_VERSION:  # no such version; PostgreSQL would fail on the bind
        return None
    row = current_row(conn, res_type, res_id)  # its pid; what the request sees is decided below
    if row is None:
        return None
    if row.version == version:
        return current_row(conn, res_type, res_id, visible_only=True)
    query = sa.select(resource_history.c.pid, *(resource_history.c[c] for c in _COLUMNS)).where(
        resource_history.c.pid == row.pid, resource_history.c.version == version
    )
    clause = visible_clause(resource_history)
    if clause is not None:
        query = query.where(clause)
    return conn.execute(query).first()


def history(
    conn: sa.Connection,
    *,
    res_type: str | None,
    res_id: str | None,
    since: datetime | None,
    count: int,
    offset: int,
) -> tuple[list[StoredResource], int]:
    """Versions newest first, and how many there are in all."""

    def select_from(table: sa.Table) -> sa.Select[Any]:
        query = sa.select(table.c.pid, *(table.c[c] for c in _COLUMNS))
        clause = visible_clause(table)
        if clause is not None:
            query = query.where(clause)
        if res_type is not None:
            query = query.where(table.c.res_type == res_type)
        if res_id is not None:
            query = query.where(table.c.res_id == res_id)
        if since is not None:
            query = query.where(table.c.last_updated >= since)
        return query

    union = sa.union_all(select_from(resource), select_from(resource_history)).subquery()
    total = conn.execute(sa.select(sa.func.count()).select_from(union)).scalar_one()
    rows = conn.execute(
        sa.select(union)
        .order_by(union.c.last_updated.desc(), union.c.version.desc())
        .limit(count)
        .offset(offset)
    ).all()
    report(r.pid for r in rows)
    return [to_stored(r) for r in rows], total


def resolve_bare_ids(conn: sa.Connection, ids: list[str]) -> dict[str, list[str]]:
    """Resource types holding each of the given ids (used to resolve urn:uuid references).
    Unfiltered: callers that answer a restricted principal check visibility themselves."""
    required()
    found: dict[str, list[str]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = conn.execute(
            sa.select(resource.c.res_id, resource.c.res_type).where(resource.c.res_id.in_(chunk))
        ).all()
        for res_id, res_type in rows:
            found.setdefault(res_id, []).append(res_type)
    return found
