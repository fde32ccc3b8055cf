"""Parsing a FHIR search into SQL conditions: parameters, modifiers, chains and ``_has``.

Owns: the search query model (``SearchQuery``) and the grammar of parameter names:
``code``, ``code:modifier``, ``ref:Type.code`` chains (up to three levels) and
``_has:Type:ref:code`` reverse chains (nestable); the result parameters (``_count``,
``_offset``, ``_cursor``, ``_total``, ``_sort``, ``_summary``, ...); the query-size limits (``SearchLimits``:
parameters per query, comma-separated values per parameter, sort keys; 400 beyond).
Every condition is built against a given alias of ``resource``, so a chain's inner search
is just another search on a fresh alias.
Calls: registry, predicates, settings (the limits' defaults), ``consent.context`` (a chain's
or ``_has``'s inner search sees only the rows the request may see).
Called by: ``hub.search.engine``, ``consent.decision`` (granular scopes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from consent.context import visible_clause
from hub.db.schema import index_table, resource
from hub.errors import Issue, bad_request
from hub.search import predicates
from hub.search.predicates import PidSet
from hub.search.registry import Registry
from hub.settings import Settings, get_settings
from hub.validation import is_resource_type

RESULT_PARAMS = frozenset(
    {
        "_count",
        "_offset",
        "_cursor",
        "_total",
        "_sort",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_format",
        "_pretty",
    }
)
SUMMARY_VALUES = frozenset({"true", "false", "text", "data", "count"})
MAX_CHAIN_DEPTH = 3

Target = sa.FromClause  # the resource table or an alias of it


@dataclass(frozen=True)
class SearchLimits:
    """How big one search may be: each bound keeps a query's SQL (and its cost) bounded."""

    params: int = 50  # parameters in the query string, result parameters included
    or_values: int = 100  # comma-separated alternatives of one parameter
    sort_keys: int = 3

    @classmethod
    def of(cls, settings: Settings) -> SearchLimits:
        return cls(settings.max_search_params, settings.max_or_values, settings.max_sort_keys)


@dataclass(frozen=True)
class Include:
    source_type: str
    param_code: str
    hash_identity: int
    target_type: str | None
    iterate: bool
    reverse: bool  # _revinclude


@dataclass
class SearchQuery:
    res_type: str
    conditions: list[sa.ColumnElement[bool]] = field(default_factory=list)
    count: int = 20
    offset: int = 0  # rows skipped (clients that page by _offset; the hub's links use cursors)
    cursor: str | None = None  # where the page starts: an opaque token of hub.search.cursor
    # No COUNT unless asked: "accurate" counts every match, "estimate" gives the total only
    # when it is free (hub.search.engine.execute), "none" (the default) never.
    total: str = "none"
    summary: str | None = None  # true | text | data | count | false
    elements: list[str] | None = None
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (parameter, descending)
    includes: list[Include] = field(default_factory=list)
    # What was understood, for the self link, and what was skipped under lenient handling.
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[Issue] = field(default_factory=list)


class UnknownParameter(Exception):
    """A parameter or modifier the hub does not support (an error unless handling=lenient)."""


def parse(
    registry: Registry,
    res_type: str,
    params: list[tuple[str, str]],
    *,
    base_url: str,
    lenient: bool = False,
    default_count: int = 20,
    max_count: int = 1000,
    limits: SearchLimits | None = None,
) -> SearchQuery:
    limits = limits or SearchLimits.of(get_settings())
    if len(params) > limits.params:
        raise bad_request(f"A search may have at most {limits.params} parameters, not {len(params)}")
    query = SearchQuery(res_type, count=default_count)
    for raw_name, raw_value in params:
        if "\x00" in raw_name + raw_value:  # PostgreSQL text cannot hold NUL; no FHIR value has one
            raise bad_request(f"Search parameter {raw_name!r} contains a NUL character")
        try:
            if raw_name.partition(":")[0] in RESULT_PARAMS:
                _result_param(registry, query, raw_name, raw_value, max_count)
                if len(query.sort) > limits.sort_keys:
                    raise bad_request(f"_sort may have at most {limits.sort_keys} keys")
            else:
                # Chains and _has pass the value on to the innermost parameter unchanged.
                if len(_split_or(raw_value)) > limits.or_values:
                    raise bad_request(f"Parameter {raw_name!r} may list at most {limits.or_values} values")
                query.conditions.append(
                    condition(registry, resource, res_type, raw_name, raw_value, base_url)
                )
        except UnknownParameter as unknown:
            if not lenient:
                raise bad_request(str(unknown)) from None
            query.ignored.append(Issue("not-supported", str(unknown), severity="warning"))
            continue
        query.used.append((raw_name, raw_value))
    if query.cursor is not None and query.offset:
        raise bad_request(
            "_cursor and _offset cannot be combined: a cursor already says where the page starts"
        )
    return query


def _non_negative(name: str, value: str) -> int:
    # ASCII digits only ("²".isdigit() is true, int() refuses it), and few enough that the
    # database takes the number (both cap LIMIT/OFFSET at 2**63 - 1).
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise bad_request(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _result_param(registry: Registry, query: SearchQuery, raw_name: str, value: str, max_count: int) -> None:
    name, _, modifier = raw_name.partition(":")
    if name == "_count":
        query.count = min(_non_negative(name, value), max_count)
    elif name == "_offset":
        query.offset = _non_negative(name, value)
    elif name == "_cursor":
        query.cursor = value
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise bad_request("_total must be none, estimate or accurate")
        query.total = value
    elif name == "_summary":
        if value not in SUMMARY_VALUES:
            raise bad_request(f"_summary must be one of {', '.join(sorted(SUMMARY_VALUES))}")
        query.summary = value
    elif name == "_elements":
        query.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif name == "_sort":
        for key in value.split(","):
            descending = key.startswith("-")
            key = key.lstrip("-")
            param = registry.get(query.res_type, key)
            if key not in ("_id", "_lastUpdated") and (
                param is None or not param.indexed or param.type == "composite"
            ):
                raise UnknownParameter(f"Cannot sort {query.res_type} by '{key}'")
            query.sort.append((key, descending))
    elif name in ("_include", "_revinclude"):
        if modifier not in ("", "iterate", "recurse"):
            raise UnknownParameter(f"Modifier ':{modifier}' is not supported on {name}")
        query.includes.append(
            _include(registry, value, iterate=bool(modifier), reverse=name == "_revinclude")
        )


def _include(registry: Registry, value: str, *, iterate: bool, reverse: bool) -> Include:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise bad_request(f"_include/_revinclude take Source:param[:Target], not {value!r}")
    source_type, code = parts[0], parts[1]
    param = registry.get(source_type, code)
    if param is None or param.type != "reference":
        raise UnknownParameter(f"'{source_type}:{code}' is not a reference parameter the hub indexes")
    target_type = parts[2] if len(parts) == 3 else None
    if target_type is not None and not is_resource_type(target_type):
        raise bad_request(f"Unknown resource type '{target_type}' in {value!r}")
    return Include(source_type, code, param.hash_identity, target_type, iterate, reverse)


def condition(
    registry: Registry,
    target: Target,
    res_type: str,
    raw_name: str,
    value: str,
    base_url: str,
    depth: int = 0,
) -> sa.ColumnElement[bool]:
    """The condition one parameter puts on ``target`` (the resource table or an alias)."""
    if depth > MAX_CHAIN_DEPTH:
        raise bad_request(f"Chains and _has may nest at most {MAX_CHAIN_DEPTH} levels")
    if raw_name.startswith("_has:"):
        return _reverse_chain(registry, target, res_type, raw_name, value, base_url, depth)
    head, dot, rest = raw_name.partition(".")
    name, _, modifier = head.partition(":")
    if dot:
        return _chain(registry, target, res_type, name, modifier or None, rest, value, base_url, depth)
    alternatives = _split_or(value)
    if not alternatives:
        raise bad_request(f"Parameter '{name}' has no value")
    if name == "_id":
        if modifier:
            raise UnknownParameter(f"Modifier ':{modifier}' is not supported on _id")
        return target.c.res_id.in_(alternatives)
    if name == "_lastUpdated":
        return sa.or_(*(predicates.last_updated(target.c.last_updated, v) for v in alternatives))
    param = registry.get(res_type, name)
    if param is None or not param.indexed:
        raise UnknownParameter(f"Unknown or unsupported search parameter '{name}' for {res_type}")
    if modifier == "missing":
        return _apply(target, [predicates.missing(param, value)])
    if param.type == "reference":
        if modifier and not (modifier[0].isupper() and is_resource_type(modifier)):
            raise UnknownParameter(
                f"Modifier ':{modifier}' is not supported for reference parameter '{name}'"
            )
        return _apply(target, [predicates.reference(param, v, modifier, base_url) for v in alternatives])
    if modifier and modifier not in predicates.MODIFIERS.get(param.type, frozenset()):
        raise UnknownParameter(f"Modifier ':{modifier}' is not supported for {param.type} parameter '{name}'")
    build = predicates.BUILDERS[param.type]
    return _apply(target, [build(param, v, modifier) for v in alternatives])


def _apply(target: Target, sets: list[PidSet]) -> sa.ColumnElement[bool]:
    """Alternatives (comma-separated values) OR together; ':not' means none of them."""
    pids: Any = sets[0].pids if len(sets) == 1 else sa.union(*(s.pids for s in sets))
    matched = target.c.pid.in_(pids)
    return ~matched if sets[0].negated else matched


def _chain(
    registry: Registry,
    target: Target,
    res_type: str,
    name: str,
    type_modifier: str | None,
    rest: str,
    value: str,
    base_url: str,
    depth: int,
) -> sa.ColumnElement[bool]:
    """``subject:Patient.name=x``: resources whose reference points at a matching resource."""
    param = registry.get(res_type, name)
    if param is None or param.type != "reference":
        raise UnknownParameter(
            f"'{name}' is not a reference parameter of {res_type}, so it cannot be chained"
        )
    candidates = [type_modifier] if type_modifier else [t for t in param.targets if registry.supports(t)]
    selects = []
    for target_type in candidates:
        inner = resource.alias()
        try:
            inner_condition = condition(registry, inner, target_type, rest, value, base_url, depth + 1)
        except UnknownParameter:
            if type_modifier or len(candidates) == 1:
                raise
            continue  # that target type lacks the chained parameter; the others may have it
        matching_ids = sa.select(inner.c.res_id).where(
            inner.c.res_type == target_type, inner.c.deleted.is_(False), inner_condition, *_visible(inner)
        )
        references = index_table("reference", param.resource_type)
        selects.append(
            sa.select(references.c.pid)
            .where(
                references.c.hash_identity == param.hash_identity,
                references.c.target_type == target_type,
                references.c.target_id.in_(matching_ids),
            )
            .correlate(None)
        )
    if not selects:
        raise UnknownParameter(f"No target type of '{name}' has the chained parameter '{rest}'")
    return _apply(target, [PidSet(s) for s in selects])


def _reverse_chain(
    registry: Registry, target: Target, res_type: str, raw_name: str, value: str, base_url: str, depth: int
) -> sa.ColumnElement[bool]:
    """``_has:Observation:patient:code=x``: resources that matching Observations point at."""
    parts = raw_name.split(":", 3)
    if len(parts) != 4:
        raise bad_request(f"_has needs the form _has:Type:reference:parameter, not {raw_name!r}")
    _, source_type, reference_code, rest = parts
    ref_param = registry.get(source_type, reference_code)
    if ref_param is None or ref_param.type != "reference":
        raise UnknownParameter(f"'{source_type}:{reference_code}' is not a reference parameter")
    source = resource.alias()
    source_condition = condition(registry, source, source_type, rest, value, base_url, depth + 1)
    source_pids = sa.select(source.c.pid).where(
        source.c.res_type == source_type, source.c.deleted.is_(False), source_condition, *_visible(source)
    )
    references = index_table("reference", source_type)
    pointed_at = (
        sa.select(references.c.target_id)
        .where(
            references.c.hash_identity == ref_param.hash_identity,
            references.c.target_type == res_type,
            references.c.pid.in_(source_pids),
        )
        .correlate(None)
    )
    return target.c.res_id.in_(pointed_at)


def _visible(alias: sa.FromClause) -> list[sa.ColumnElement[bool]]:
    """Chains and _has only look through resources the request may see: otherwise
    ``Patient?_has:Observation:subject:code=<HIV test>`` would tell who has a hidden result."""
    clause = visible_clause(alias)  # type: ignore[arg-type]
    return [] if clause is None else [clause]


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
