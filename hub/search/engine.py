"""Running a FHIR search: parse the query, build one SQL statement, page the results.

Owns: the search query model (filters, result parameters) and its execution.
Calls: registry, predicates, SQLAlchemy.  Called by: the REST router (search, conditional
operations, conditional references in transactions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from hub.db.schema import resource
from hub.errors import Issue, bad_request
from hub.search import predicates
from hub.search.registry import Registry

# Result parameters this engine honours; anything else starting with "_" must be a filter.
RESULT_PARAMS = frozenset({"_count", "_offset", "_total", "_sort", "_summary", "_format", "_pretty"})
SORTABLE_COLUMNS = {"_id": resource.c.res_id, "_lastUpdated": resource.c.last_updated}


@dataclass
class SearchQuery:
    res_type: str
    conditions: list[sa.ColumnElement[bool]] = field(default_factory=list)
    count: int = 20
    offset: int = 0
    total: str = "accurate"  # none | estimate | accurate
    summary_count: bool = False
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    # What was understood, for the self link and for warnings under lenient handling.
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[Issue] = field(default_factory=list)


@dataclass(frozen=True)
class SearchResult:
    matches: list[tuple[str, str, bytes]]  # (type, id, stored JSON)
    total: int | None
    has_more: bool


def _positive_int(name: str, value: str) -> int:
    if not value.isdigit():
        raise bad_request(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def parse(
    registry: Registry,
    res_type: str,
    params: list[tuple[str, str]],
    *,
    base_url: str,
    lenient: bool = False,
    default_count: int = 20,
    max_count: int = 1000,
) -> SearchQuery:
    query = SearchQuery(res_type, count=default_count)
    for raw_name, raw_value in params:
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMS:
            _result_param(query, name, raw_value, registry, lenient, max_count)
            query.used.append((raw_name, raw_value))
            continue
        try:
            condition = _filter(registry, res_type, name, modifier or None, raw_value, base_url)
        except _Unknown as unknown:
            if not lenient:
                raise bad_request(str(unknown)) from None
            query.ignored.append(Issue("not-supported", str(unknown), severity="warning"))
            continue
        query.conditions.append(condition)
        query.used.append((raw_name, raw_value))
    return query


class _Unknown(Exception):
    pass


def _result_param(
    query: SearchQuery, name: str, value: str, registry: Registry, lenient: bool, max_count: int
) -> None:
    if name == "_count":
        query.count = min(_positive_int(name, value), max_count)
    elif name == "_offset":
        query.offset = _positive_int(name, value)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise bad_request("_total must be none, estimate or accurate")
        query.total = value
    elif name == "_summary":
        if value == "count":
            query.summary_count = True
        elif value != "false" and not lenient:
            raise bad_request(f"_summary={value} is not supported yet")
    elif name == "_sort":
        for key in value.split(","):
            descending = key.startswith("-")
            key = key.lstrip("-")
            if key not in SORTABLE_COLUMNS:
                if lenient:
                    continue
                raise bad_request(f"Sorting by '{key}' is not supported; use _id or _lastUpdated")
            query.sort.append((key, descending))


def _filter(
    registry: Registry, res_type: str, name: str, modifier: str | None, value: str, base_url: str
) -> sa.ColumnElement[bool]:
    alternatives = [v for v in _split_or(value)]
    if not alternatives:
        raise bad_request(f"Parameter '{name}' has no value")
    if name == "_id":
        return resource.c.res_id.in_(alternatives)
    if name == "_lastUpdated":
        return sa.or_(*(predicates.last_updated(v) for v in alternatives))
    param = registry.get(res_type, name)
    if param is None or not param.indexed:
        raise _Unknown(f"Unknown or unsupported search parameter '{name}' for {res_type}")
    if modifier == "missing":
        return predicates.missing(param, value)
    if param.type == "reference":
        if modifier and not modifier[0].isupper():
            raise _Unknown(f"Modifier ':{modifier}' is not supported for reference parameter '{name}'")
        return sa.or_(*(predicates.reference(param, v, modifier, base_url) for v in alternatives))
    if modifier and modifier not in predicates.MODIFIERS.get(param.type, frozenset()):
        raise _Unknown(f"Modifier ':{modifier}' is not supported for {param.type} parameter '{name}'")
    build = predicates.BUILDERS[param.type]
    if modifier == "not":
        # :not with several values means none of them.
        return sa.and_(*(build(param, v, modifier) for v in alternatives))
    return sa.or_(*(build(param, v, modifier) for v in alternatives))


def _split_or(value: str) -> list[str]:
    """Split on commas that are not escaped with a backslash."""
    parts, current, escaped = [], "", False
    for ch in value:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p != ""]


def _base(query: SearchQuery) -> sa.Select[Any]:
    return sa.select(resource.c.pid).where(
        resource.c.res_type == query.res_type, resource.c.deleted.is_(False), *query.conditions
    )


def execute(conn: sa.Connection, query: SearchQuery) -> SearchResult:
    total: int | None = None
    if query.summary_count or query.total != "none":
        total = conn.execute(sa.select(sa.func.count()).select_from(_base(query).subquery())).scalar_one()
    if query.summary_count or query.count == 0:
        return SearchResult([], total, False)
    order = [
        SORTABLE_COLUMNS[key].desc() if descending else SORTABLE_COLUMNS[key].asc()
        for key, descending in query.sort
    ]
    statement = (
        sa.select(resource.c.res_type, resource.c.res_id, resource.c.content)
        .where(resource.c.res_type == query.res_type, resource.c.deleted.is_(False), *query.conditions)
        .order_by(*order, resource.c.pid)
        .limit(query.count + 1)
        .offset(query.offset)
    )
    rows = conn.execute(statement).all()
    matches = [
        (r.res_type, r.res_id, r.content if isinstance(r.content, bytes) else r.content.encode())
        for r in rows[: query.count]
    ]
    return SearchResult(matches, total, len(rows) > query.count)


def find_ids(
    conn: sa.Connection, registry: Registry, res_type: str, params: list[tuple[str, str]], base_url: str
) -> list[str]:
    """Ids matching a conditional-operation query (at most 2: enough to tell one from many)."""
    if not params:
        raise bad_request("A conditional operation needs search criteria")
    query = parse(registry, res_type, params, base_url=base_url)
    statement = _base(query).with_only_columns(resource.c.res_id).limit(2)
    return [r[0] for r in conn.execute(statement).all()]
