"""Running a FHIR search: one SQL statement for the page, then includes, then shaping.

Owns: executing a ``SearchQuery``: totals, sort order (any indexed parameter, linear on
both databases: see ``_sort_key``), offset
paging, ``_include``/``_revinclude`` (with ``:iterate``) and ``_summary``/``_elements``.
Calls: ``query`` (parsing), ``shaping``, ``consent.context`` (the rows the request may see,
added to the page, total and include statements; what was returned is reported),
``hub.crypto.envelope`` (opening sealed content), SQLAlchemy.  Called by: the REST
interactions (search, conditional operations, conditional references in transactions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from consent.context import report, visible_clause
from hub.crypto.envelope import open_content
from hub.db.schema import INDEX_TABLES, idx_reference, resource
from hub.errors import bad_request
from hub.search.query import Include, SearchQuery, parse
from hub.search.registry import Registry
from hub.search.shaping import shape

__all__ = ["Match", "SearchQuery", "SearchResult", "execute", "find_ids", "parse"]

MAX_INCLUDED = 2000
MAX_INCLUDE_ROUNDS = 4
_CHUNK = 900  # stay under SQLite's bound-parameter limits


@dataclass(frozen=True)
class Match:
    pid: int
    res_type: str
    res_id: str
    content: bytes


@dataclass(frozen=True)
class SearchResult:
    matches: list[Match]
    included: list[Match]
    total: int | None
    has_more: bool


def _content(value: Any) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _opened(row: Any) -> bytes:
    """A row's JSON, decrypted when it is stored encrypted (hub.crypto)."""
    return open_content(_content(row.content), row.res_type, row.res_id)


def _visible(table: sa.Table = resource) -> list[sa.ColumnElement[bool]]:
    """The access layer's condition for this request: hidden rows never reach a page, a
    total, an include or a conditional match."""
    clause = visible_clause(table)
    return [] if clause is None else [clause]


def _where(query: SearchQuery) -> list[sa.ColumnElement[bool]]:
    return [
        resource.c.res_type == query.res_type,
        resource.c.deleted.is_(False),
        *query.conditions,
        *_visible(),
    ]


def _sort_key(registry: Registry, query: SearchQuery, key: str, descending: bool) -> sa.ColumnElement[Any]:
    if key == "_id":
        column: sa.ColumnElement[Any] = resource.c.res_id
    elif key == "_lastUpdated":
        column = resource.c.last_updated
    else:
        param = registry.get(query.res_type, key)
        assert param is not None
        table = INDEX_TABLES[param.type]
        value = {
            "string": table.c.get("value_norm"),
            "token": table.c.get("value"),
            "date": table.c.get("high" if descending else "low"),
            "number": table.c.get("low"),
            "quantity": table.c.get("low"),
            "uri": table.c.get("uri"),
            "reference": table.c.get("target_id"),
        }[param.type]
        # A resource with several values sorts by its smallest (ascending) or largest (descending).
        aggregate = sa.func.max(value) if descending else sa.func.min(value)
        # One index probe by pid per row, so the sort is linear in the rows matched. Both
        # ``+ 0`` (no index on hash_identity may serve it) and GROUP BY (no min/max-by-index
        # rewrite) keep PostgreSQL off the (hash_identity, value, pid) index, which it picks
        # without fresh statistics and then scans whole for every row: quadratic (6,000
        # Patients, _sort=name,given,family: 37 s before, 0.3 s after).
        column = (
            sa.select(aggregate)
            .where(table.c.pid == resource.c.pid, table.c.hash_identity + 0 == param.hash_identity)
            .group_by(table.c.pid)
            .correlate(resource)
            .scalar_subquery()
        )
    return column.desc().nulls_last() if descending else column.asc().nulls_last()


def execute(conn: sa.Connection, registry: Registry, query: SearchQuery) -> SearchResult:
    total: int | None = None
    if query.summary == "count" or query.total != "none":
        counted = sa.select(resource.c.pid).where(*_where(query)).subquery()
        total = conn.execute(sa.select(sa.func.count()).select_from(counted)).scalar_one()
    if query.summary == "count" or query.count == 0:
        return SearchResult([], [], total, False)
    order = [_sort_key(registry, query, key, descending) for key, descending in query.sort]
    statement = (
        sa.select(resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.content)
        .where(*_where(query))
        .order_by(*order, resource.c.pid)
        .limit(query.count + 1)
        .offset(query.offset)
    )
    rows = conn.execute(statement).all()
    matches = [Match(r.pid, r.res_type, r.res_id, _opened(r)) for r in rows[: query.count]]
    included = _included(conn, query.includes, matches) if query.includes else []
    if query.summary not in (None, "false") or query.elements:
        matches = [_shaped(m, query) for m in matches]
        included = [_shaped(m, query) for m in included]
    report(m.pid for m in [*matches, *included])
    return SearchResult(matches, included, total, len(rows) > query.count)


def _shaped(match: Match, query: SearchQuery) -> Match:
    return Match(match.pid, match.res_type, match.res_id, shape(match.content, query.summary, query.elements))


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _included(conn: sa.Connection, includes: list[Include], page: list[Match]) -> list[Match]:
    """Resources pulled in by _include/_revinclude; :iterate repeats on what was pulled in."""
    seen = {m.pid for m in page}
    frontier, found = page, list[Match]()
    for round_number in range(MAX_INCLUDE_ROUNDS):
        fresh: list[Match] = []
        for include in includes:
            if round_number > 0 and not include.iterate:
                continue
            for row in _include_rows(conn, include, frontier):
                if row.pid not in seen and len(found) + len(fresh) < MAX_INCLUDED:
                    seen.add(row.pid)
                    fresh.append(row)
        if not fresh:
            break
        found += fresh
        frontier = fresh
    return found


def _include_rows(conn: sa.Connection, include: Include, frontier: list[Match]) -> list[Match]:
    columns = (resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.content)
    rows: list[Any] = []
    if not include.reverse:
        sources = [m.pid for m in frontier if m.res_type == include.source_type]
        for chunk in _chunks(sources):
            joined = resource.join(
                idx_reference,
                sa.and_(
                    resource.c.res_type == idx_reference.c.target_type,
                    resource.c.res_id == idx_reference.c.target_id,
                ),
            )
            statement = (
                sa.select(*columns)
                .select_from(joined)
                .where(
                    idx_reference.c.pid.in_(chunk),
                    idx_reference.c.hash_identity == include.hash_identity,
                    resource.c.deleted.is_(False),
                    *_visible(),
                )
                .distinct()
            )
            if include.target_type:
                statement = statement.where(idx_reference.c.target_type == include.target_type)
            rows += conn.execute(statement).all()
    else:
        targets = [(m.res_type, m.res_id) for m in frontier]
        if include.target_type:
            targets = [t for t in targets if t[0] == include.target_type]
        for chunk in _chunks(targets):
            pointing = sa.select(idx_reference.c.pid).where(
                idx_reference.c.hash_identity == include.hash_identity,
                idx_reference.c.target_id.in_([i for _, i in chunk]),
                idx_reference.c.target_type.in_({t for t, _ in chunk}),
            )
            statement = sa.select(*columns).where(
                resource.c.res_type == include.source_type,
                resource.c.deleted.is_(False),
                *_visible(),
                resource.c.pid.in_(pointing),
            )
            rows += conn.execute(statement).all()
    return [Match(r.pid, r.res_type, r.res_id, _opened(r)) for r in rows]


def find_ids(
    conn: sa.Connection, registry: Registry, res_type: str, params: list[tuple[str, str]], base_url: str
) -> list[str]:
    """Ids matching a conditional-operation query (at most 2: enough to tell one from many)."""
    if not params:
        raise bad_request("A conditional operation needs search criteria")
    query = parse(registry, res_type, params, base_url=base_url)
    statement = sa.select(resource.c.res_id).where(*_where(query)).limit(2)
    return [r[0] for r in conn.execute(statement).all()]
