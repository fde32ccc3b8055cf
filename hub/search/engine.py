"""Running a FHIR search: one SQL statement for the page, then includes, then shaping.

Owns: executing a ``SearchQuery``: totals (only when asked), sort order (any indexed
parameter, linear on both databases: see ``_sort_key``) with the pid as tie-breaker, keyset
paging (the page after a ``_cursor``: ``_after``; the cursor of the next page) and offset
paging for clients that send ``_offset``, ``_include``/``_revinclude`` (with ``:iterate``)
and ``_summary``/``_elements``.
Calls: ``query`` (parsing), ``cursor`` (the tokens), ``shaping``, ``consent.context`` (the rows the request may see,
added to the page, total and include statements; what was returned is reported),
``hub.crypto.envelope`` (opening sealed content), SQLAlchemy.  Called by: the REST
interactions (search, conditional operations, conditional references in transactions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from consent.context import report, visible_clause
from hub.crypto.blind import search_forms
from hub.crypto.envelope import open_content
from hub.db.schema import idx_token, index_table, resource
from hub.errors import bad_request
from hub.search import cursor
from hub.search.hashing import hash64
from hub.search.query import Include, SearchQuery, parse
from hub.search.registry import Registry
from hub.search.shaping import shape

__all__ = ["Match", "SearchQuery", "SearchResult", "execute", "find_ids", "find_ids_many", "parse"]

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
    next_cursor: str | None = None  # where the next page starts (None: this is the last)


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


@dataclass(frozen=True)
class _SortKey:
    """One key of a search's order: the row's value, its direction, and what a cursor holds."""

    value: sa.ColumnElement[Any]
    descending: bool
    kind: str  # int | float | str | instant: the JSON type of the value in a cursor
    nullable: bool  # correlated aggregates: rows without a value sort last in both directions


_KIND_OF_TYPE = {
    "string": "str",
    "token": "str",
    "date": "int",
    "number": "float",
    "quantity": "float",
    "uri": "str",
    "reference": "str",
}


# What a cursor may hold for each kind of key (an instant travels as ISO 8601 text).
_CURSOR_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "instant": str,
}


def _sort_keys(registry: Registry, query: SearchQuery, dialect: str) -> list[_SortKey]:
    """The requested _sort keys, then pid: a total order, so keyset paging neither repeats
    nor skips rows. The pid goes the way of the last key (ascending without _sort), so a
    single-key sort on a column is one row-value comparison an index range serves."""
    keys = [_sort_key(registry, query, key, descending) for key, descending in query.sort]
    if dialect == "sqlite":
        # SQLite keeps instants as text, and the store's text ("…+00:00") is not what
        # SQLAlchemy binds for a datetime: the cursor holds and compares the stored text.
        keys = [
            _SortKey(sa.type_coerce(k.value, sa.Text), k.descending, "str", k.nullable)
            if k.kind == "instant"
            else k
            for k in keys
        ]
    last_descending = keys[-1].descending if keys else False
    return [*keys, _SortKey(resource.c.pid, last_descending, "int", nullable=False)]


def _sort_key(registry: Registry, query: SearchQuery, key: str, descending: bool) -> _SortKey:
    if key == "_id":
        return _SortKey(resource.c.res_id, descending, "str", nullable=False)
    if key == "_lastUpdated":
        return _SortKey(resource.c.last_updated, descending, "instant", nullable=False)
    param = registry.get(query.res_type, key)
    assert param is not None
    table = index_table(param.type, query.res_type)
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
    return _SortKey(column, descending, _KIND_OF_TYPE[param.type], nullable=True)


def _ordered(key: _SortKey, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    if not key.nullable:
        # No NULLS LAST on a NOT NULL column: PostgreSQL reads a btree backwards only in
        # its own DESC NULLS FIRST order, so the clause would cost the index on -_lastUpdated.
        return column.desc() if key.descending else column.asc()
    return column.desc().nulls_last() if key.descending else column.asc().nulls_last()


def _after(
    keys: list[_SortKey], columns: list[sa.ColumnElement[Any]], start: list[Any]
) -> sa.ColumnElement[bool]:
    """Rows that come after the row whose sort values were ``start``, in the page order.

    Plain columns all one way (no _sort, _id, _lastUpdated): one row-value comparison, which
    both databases turn into an index range. Otherwise the lexicographic expansion, with
    NULLS LAST in both directions: nothing sorts after a NULL but other NULLs (decided by
    the keys after it), and a NULL sorts after every value."""
    bound = [sa.literal(value, column.type) for value, column in zip(start, columns, strict=True)]
    if not any(k.nullable for k in keys) and len({k.descending for k in keys}) == 1:
        row, cursor_row = sa.tuple_(*columns), sa.tuple_(*bound)
        return row < cursor_row if keys[0].descending else row > cursor_row
    alternatives: list[sa.ColumnElement[bool]] = []
    equal_so_far: list[sa.ColumnElement[bool]] = []
    for key, column, value, parameter in zip(keys, columns, start, bound, strict=True):
        if value is None:
            equal_so_far.append(column.is_(None))
            continue
        beyond = column < parameter if key.descending else column > parameter
        if key.nullable:
            beyond = sa.or_(beyond, column.is_(None))
        alternatives.append(sa.and_(*equal_so_far, beyond))
        equal_so_far.append(column == parameter)
    return sa.or_(*alternatives)  # never empty: the pid, last, is never NULL


def _cursor_values(keys: list[_SortKey], row: Any) -> list[cursor.Scalar]:
    values: list[cursor.Scalar] = []
    for i, key in enumerate(keys):
        value = getattr(row, f"sort_{i}")
        values.append(value.isoformat() if key.kind == "instant" and value is not None else value)
    return values


def _start_values(keys: list[_SortKey], query: SearchQuery, token: str) -> list[Any]:
    """The decoded cursor, each value checked against its key (400 when it does not fit):
    a value of the wrong type would otherwise reach the database as a comparison error."""
    values: list[Any] = cursor.decode(cursor.query_key(query.res_type, query.used), token, len(keys))
    wrong = bad_request("_cursor holds a value that does not fit this search's sort")
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        if value is None:
            if not key.nullable:
                raise wrong
            continue
        if isinstance(value, bool) or not isinstance(value, _CURSOR_TYPES[key.kind]):
            raise wrong
        if key.kind == "instant":
            try:
                values[i] = datetime.fromisoformat(str(value))
            except ValueError:
                raise wrong from None
    return values


def _total(conn: sa.Connection, query: SearchQuery) -> int:
    counted = sa.select(resource.c.pid).where(*_where(query)).subquery()
    return int(conn.execute(sa.select(sa.func.count()).select_from(counted)).scalar_one())


def execute(conn: sa.Connection, registry: Registry, query: SearchQuery) -> SearchResult:
    """One page of the search, after ``query.cursor`` (keyset) or ``query.offset`` rows.

    ``total`` is counted only for ``_total=accurate`` and ``_summary=count``: the COUNT
    costs as much as reading every match, which most clients never look at. It stays a
    statement of its own rather than ``count(*) OVER ()`` on the page: a page after a
    cursor sees only the rows after it, and on page 1 the window makes the database read
    every match with its content before the LIMIT (PostgreSQL, 10k Observations of one
    patient, page 1 of 20: COUNT 44-108 ms + page 1 ms apart, 135-171 ms as one windowed
    statement; load average 19 on 2 cores).
    ``_total=estimate`` gives the exact total when it is free (the first page holds every
    match) and none otherwise."""
    if query.summary == "count":
        return SearchResult([], [], _total(conn, query), False)
    total = _total(conn, query) if query.total == "accurate" else None
    if query.count == 0:
        return SearchResult([], [], total, False)
    keys = _sort_keys(registry, query, conn.dialect.name)
    fields = (resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.content)
    labeled = [key.value.label(f"sort_{i}") for i, key in enumerate(keys)]
    start = _start_values(keys, query, query.cursor) if query.cursor else None
    if any(key.nullable for key in keys):
        # Correlated aggregates: computed once per row in a subquery that OFFSET 0 keeps the
        # planners from inlining, so the keyset condition and ORDER BY reuse the values
        # instead of probing the index table again for each mention.
        rows_with_keys = (
            sa.select(*fields, *labeled).where(*_where(query)).offset(sa.literal_column("0")).subquery()
        )
        columns: list[sa.ColumnElement[Any]] = [rows_with_keys.c[f"sort_{i}"] for i in range(len(keys))]
        statement = sa.select(*(rows_with_keys.c[f.name] for f in fields), *columns)
    else:
        # Plain columns: the conditions stay on the table, where indexes serve them.
        columns = [key.value for key in keys]
        statement = sa.select(*fields, *labeled).where(*_where(query))
    if start is not None:
        statement = statement.where(_after(keys, columns, start))
    statement = (
        statement.order_by(*(_ordered(key, column) for key, column in zip(keys, columns, strict=True)))
        .limit(query.count + 1)
        .offset(query.offset)
    )
    rows = conn.execute(statement).all()
    page = rows[: query.count]
    has_more = len(rows) > query.count
    next_cursor = (
        cursor.encode(cursor.query_key(query.res_type, query.used), _cursor_values(keys, page[-1]))
        if has_more
        else None
    )
    if total is None and query.total == "estimate" and not has_more and not query.cursor and not query.offset:
        total = len(page)
    matches = [Match(r.pid, r.res_type, r.res_id, _opened(r)) for r in page]
    included = _included(conn, query.includes, matches) if query.includes else []
    if query.summary not in (None, "false") or query.elements:
        matches = [_shaped(m, query) for m in matches]
        included = [_shaped(m, query) for m in included]
    report(m.pid for m in [*matches, *included])
    return SearchResult(matches, included, total, has_more, next_cursor)


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
    references = index_table("reference", include.source_type)  # AuditEvent's: their own table
    if not include.reverse:
        sources = [m.pid for m in frontier if m.res_type == include.source_type]
        for chunk in _chunks(sources):
            joined = resource.join(
                references,
                sa.and_(
                    resource.c.res_type == references.c.target_type,
                    resource.c.res_id == references.c.target_id,
                ),
            )
            statement = (
                sa.select(*columns)
                .select_from(joined)
                .where(
                    references.c.pid.in_(chunk),
                    references.c.hash_identity == include.hash_identity,
                    resource.c.deleted.is_(False),
                    *_visible(),
                )
                .distinct()
            )
            if include.target_type:
                statement = statement.where(references.c.target_type == include.target_type)
            rows += conn.execute(statement).all()
    else:
        targets = [(m.res_type, m.res_id) for m in frontier]
        if include.target_type:
            targets = [t for t in targets if t[0] == include.target_type]
        for chunk in _chunks(targets):
            pointing = sa.select(references.c.pid).where(
                references.c.hash_identity == include.hash_identity,
                references.c.target_id.in_([i for _, i in chunk]),
                references.c.target_type.in_({t for t, _ in chunk}),
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


def find_ids_many(
    conn: sa.Connection,
    registry: Registry,
    criteria: Sequence[tuple[str, list[tuple[str, str]]]],
    base_url: str,
) -> list[list[str]]:
    """``find_ids`` for several (type, criteria), in order (at most 2 ids each).

    A transaction of conditional PUTs (a QĐ 130 episode: ~30 ``Type?identifier=sys|value``
    of a dozen types) looked each up with a statement of its own. The criteria that are one
    token ``system|code`` (the usual ``identifier=``) are looked up together, whatever their
    type, one statement per chunk of them, by the same hashes ``predicates.token`` searches
    (the value as given and its keyed forms, ``hub.crypto.blind``) and among the rows the
    request may see; any other criteria go through ``find_ids`` one by one."""
    found: list[list[str]] = [[] for _ in criteria]
    wanted: dict[int, list[int]] = {}  # hash_sys_value -> indexes of the criteria asking for it
    for index, (res_type, params) in enumerate(criteria):
        hashes = _token_hashes(registry, res_type, params)
        if hashes is None:
            found[index] = find_ids(conn, registry, res_type, params, base_url)
            continue
        for value_hash in hashes:
            wanted.setdefault(value_hash, []).append(index)
    if not wanted:
        return found
    matched: list[set[str]] = [set() for _ in criteria]
    types = sorted({criteria[i][0] for indexes in wanted.values() for i in indexes})
    joined = resource.join(idx_token, idx_token.c.pid == resource.c.pid)
    for chunk in _chunks(list(wanted)):
        statement = (
            sa.select(idx_token.c.hash_sys_value, resource.c.res_type, resource.c.res_id)
            .select_from(joined)
            .where(
                idx_token.c.hash_sys_value.in_(chunk),
                resource.c.res_type.in_(types),
                resource.c.deleted.is_(False),
                *_visible(),
            )
            .distinct()
        )
        for value_hash, res_type, res_id in conn.execute(statement).all():
            for index in wanted[value_hash]:
                if criteria[index][0] == res_type:
                    matched[index].add(res_id)
    for index, ids in enumerate(matched):
        if ids:
            found[index] = sorted(ids)[:2]
    return found


def _token_hashes(registry: Registry, res_type: str, params: list[tuple[str, str]]) -> list[int] | None:
    """The ``hash_sys_value`` forms one ``name=system|code`` token criterion matches (as
    ``predicates.token`` builds them), or None when the criteria are anything else (several
    parameters, modifiers, chains, OR lists, escapes, other parameter types)."""
    if len(params) != 1:
        return None
    name, value = params[0]
    if not name or name[0] == "_" or any(c in name for c in ":.") or any(c in value for c in ",\\\x00"):
        return None
    param = registry.get(res_type, name)
    if param is None or not param.indexed or param.type != "token":
        return None
    system, bar, code_value = value.partition("|")
    if not (bar and system and code_value):
        return None
    forms = [code_value, *search_forms(param.expression, system, code_value)]
    return [hash64(param.resource_type, param.code, system, form) for form in forms]
