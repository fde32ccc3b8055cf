"""One function per FHIR REST interaction: read, vread, create, update, delete, history, search.

Owns: the HTTP-level semantics of each interaction (status codes, headers, Prefer,
conditional variants). Each function is (context, connection, request) -> response.
Conditional operations take a transaction-scoped lock on their condition first
(``lock_condition``: a PostgreSQL advisory lock per type and normalised criteria), so
concurrent conditional creates/updates of the same thing make one resource. Writes follow
"hidden is unknown" (docs/access.md): the store answers ids the caller cannot see as unknown,
and conditions only ever match what the caller can see.
Calls: the store, the search engine, bundle builders.  Called by: the router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from consent.decision import Access
from hub.errors import Issue, bad_request, conflict, operation_outcome, precondition_failed
from hub.rest import bundles
from hub.rest.messages import FhirRequest, FhirResponse
from hub.search import engine as search_engine
from hub.search.dates import DateFormatError, date_range, from_micros
from hub.search.hashing import hash64
from hub.search.registry import Registry
from hub.settings import DEFAULT_EXPORT_DIR
from hub.store import Store, StoredResource


@dataclass
class Context:
    store: Store
    registry: Registry
    # The base of links when a request carries none (the CLI, tests driving the router):
    # BASE_URL, else the local default. Requests from the web adapter carry their own.
    base_url: str
    default_count: int = 20
    max_count: int = 1000
    export_dir: Path = DEFAULT_EXPORT_DIR
    export_retention_hours: float = 24.0  # finished $export jobs and their files, then removed
    max_bundle_entries: int = 10_000  # entries of one transaction or batch (413 beyond)
    # Called when work detached from a request (an $export job) has disclosed data, so the
    # audit trail records it; set by the router.
    disclosed: Callable[[Access, str], None] | None = None


def link_base(ctx: Context, request: FhirRequest) -> str:
    """The FHIR base of the links a response writes: the request's (BASE_URL, else where
    the client connected; set by the web adapter), else the router's configured one."""
    return (request.base_url or ctx.base_url).rstrip("/")


def _resource_headers(ctx: Context, request: FhirRequest, stored: StoredResource) -> dict[str, str]:
    base = link_base(ctx, request)
    return {
        "ETag": stored.etag,
        "Last-Modified": format_datetime(stored.last_updated, usegmt=True),
        "Location": f"{base}/{stored.res_type}/{stored.res_id}/_history/{stored.version}",
    }


def respond_with(
    ctx: Context, request: FhirRequest, stored: StoredResource, status: int, message: str
) -> FhirResponse:
    headers = _resource_headers(ctx, request, stored)
    preference = request.prefer("return")
    if preference == "minimal":
        return FhirResponse(status, None, headers)
    if preference == "OperationOutcome":
        return FhirResponse(
            status, orjson.dumps(operation_outcome([Issue("informational", message, "information")])), headers
        )
    return FhirResponse(status, stored.content, headers)


def _body_for(request: FhirRequest, res_type: str) -> dict[str, Any]:
    body = request.json_body()
    if body["resourceType"] != res_type:
        raise bad_request(f"The body is a {body['resourceType']}, but the URL names {res_type}")
    return body


# --- reads -------------------------------------------------------------------------------


def read(ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str, res_id: str) -> FhirResponse:
    stored = ctx.store.get(conn, res_type, res_id)
    headers = _resource_headers(ctx, request, stored)
    del headers["Location"]
    if request.header("if-none-match") == stored.etag:
        return FhirResponse(304, None, headers)
    return FhirResponse(200, stored.content, headers)


def vread(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str, res_id: str, vid: str
) -> FhirResponse:
    if not (vid.isascii() and vid.isdigit() and len(vid) <= 18):  # see search.query._non_negative
        raise bad_request(f"Version id must be a number, not {vid!r}")
    stored = ctx.store.get_version(conn, res_type, res_id, int(vid))
    headers = _resource_headers(ctx, request, stored)
    del headers["Location"]
    return FhirResponse(200, stored.content, headers)


def _since(request: FhirRequest) -> datetime | None:
    values = [v for k, v in request.query if k == "_since"]
    if not values:
        return None
    try:
        return from_micros(date_range(values[-1])[0])
    except DateFormatError as exc:
        raise bad_request(f"_since: {exc}") from None


def _paging(ctx: Context, request: FhirRequest) -> tuple[int, int]:
    count, offset = ctx.default_count, 0
    for key, value in request.query:
        if key in ("_count", "_offset"):
            if not (value.isascii() and value.isdigit() and len(value) <= 18):  # see query._non_negative
                raise bad_request(f"{key} must be a non-negative integer")
            if key == "_count":
                count = min(int(value), ctx.max_count)
            else:
                offset = int(value)
    return count, offset


def history(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str | None, res_id: str | None
) -> FhirResponse:
    count, offset = _paging(ctx, request)
    versions, total = ctx.store.history(
        conn, res_type=res_type, res_id=res_id, since=_since(request), count=count, offset=offset
    )
    path = "/".join(p for p in (res_type, res_id, "_history") if p)
    links = bundles.paging_links(
        link_base(ctx, request), path, request.query, offset, count, offset + len(versions) < total
    )
    return FhirResponse(200, bundles.history(link_base(ctx, request), versions, total, links))


def search(ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str) -> FhirResponse:
    lenient = request.prefer("handling") == "lenient"
    query = search_engine.parse(
        ctx.registry,
        res_type,
        request.query,
        base_url=link_base(ctx, request),
        lenient=lenient,
        default_count=ctx.default_count,
        max_count=ctx.max_count,
    )
    result = search_engine.execute(conn, ctx.registry, query)
    links = bundles.search_links(
        link_base(ctx, request), res_type, query.used, query.count, query.offset, result.next_cursor
    )
    outcome = operation_outcome(query.ignored) if query.ignored else None
    body = bundles.searchset(
        link_base(ctx, request),
        [(m.res_type, m.res_id, m.content) for m in result.matches],
        result.total,
        links,
        outcome,
        included=[(m.res_type, m.res_id, m.content) for m in result.included],
    )
    return FhirResponse(200, body)


# --- writes ------------------------------------------------------------------------------


def create(ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str) -> FhirResponse:
    body = _body_for(request, res_type)
    condition = request.header("if-none-exist")
    if condition:
        pairs = _query_pairs(condition)
        lock_condition(conn, res_type, pairs)
        existing = search_engine.find_ids(conn, ctx.registry, res_type, pairs, link_base(ctx, request))
        if len(existing) > 1:
            raise precondition_failed(f"If-None-Exist '{condition}' matches more than one {res_type}")
        if existing:
            stored = ctx.store.get(conn, res_type, existing[0])
            return respond_with(
                ctx, request, stored, 200, f"{res_type}/{existing[0]} already exists; nothing created"
            )
    body.pop("id", None)
    stored = ctx.store.create(conn, body, request.assigned_id)
    return respond_with(ctx, request, stored, 201, f"Created {res_type}/{stored.res_id}")


def update(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str, res_id: str
) -> FhirResponse:
    if len(res_id) > 64:  # FHIR ids are 1-64 characters (and res_id is VARCHAR(64))
        raise bad_request(f"The id {res_id[:64]!r}... is longer than the 64 characters of a FHIR id")
    body = _body_for(request, res_type)
    if body.get("id") != res_id:
        raise bad_request(f"The body's id ({body.get('id')!r}) must equal the id in the URL ({res_id!r})")
    stored, created = ctx.store.update(
        conn, res_type, res_id, body, if_match=request.if_match(), server_id=request.assigned_id == res_id
    )
    status = 201 if created else 200
    return respond_with(
        ctx, request, stored, status, f"{'Created' if created else 'Updated'} {res_type}/{res_id}"
    )


def conditional_update(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str
) -> FhirResponse:
    body = _body_for(request, res_type)
    lock_condition(conn, res_type, request.query)
    matches = search_engine.find_ids(conn, ctx.registry, res_type, request.query, link_base(ctx, request))
    if len(matches) > 1:
        raise precondition_failed(f"The conditional update matches more than one {res_type}")
    if matches:
        if body.get("id") not in (None, matches[0]):
            raise bad_request(f"The body's id {body['id']!r} differs from the match {matches[0]!r}")
        body["id"] = matches[0]
        return update(ctx, conn, request, res_type, matches[0])
    if body.get("id"):
        if _exists(ctx, conn, res_type, body["id"]):
            # R4: no match, but the body's id exists -> 409 rather than overwrite it.
            raise conflict(f"{res_type}/{body['id']} exists but does not match the update's criteria")
        # Not there, or hidden from the caller: the store answers both alike (404 for a
        # caller that cannot choose ids, creation with that id for one that can).
        return update(ctx, conn, request, res_type, body["id"])
    stored = ctx.store.create(conn, body, request.assigned_id)
    return respond_with(ctx, request, stored, 201, f"Created {res_type}/{stored.res_id}")


def _exists(ctx: Context, conn: sa.Connection, res_type: str, res_id: str) -> bool:
    """Whether the resource exists as far as the caller can see (hidden is unknown)."""
    from hub.store.reader import current_row

    row = current_row(conn, res_type, res_id, visible_only=True)
    return row is not None and not row.deleted


def delete(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str, res_id: str
) -> FhirResponse:
    deleted = ctx.store.delete(conn, res_type, res_id)
    headers = {"ETag": deleted.etag} if deleted else {}
    return FhirResponse(204, None, headers)


def conditional_delete(
    ctx: Context, conn: sa.Connection, request: FhirRequest, res_type: str
) -> FhirResponse:
    lock_condition(conn, res_type, request.query)
    matches = search_engine.find_ids(conn, ctx.registry, res_type, request.query, link_base(ctx, request))
    if len(matches) > 1:
        raise precondition_failed(f"The conditional delete matches more than one {res_type}")
    if matches:
        return delete(ctx, conn, request, res_type, matches[0])
    return FhirResponse(204)


def _query_pairs(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query.lstrip("?"), keep_blank_values=True)


def condition_key(res_type: str, params: list[tuple[str, str]]) -> int:
    """A signed 64-bit key of a condition: its type and its criteria, normalised (order of
    parameters and of OR-values does not matter; paging and result parameters are ignored)."""
    criteria = sorted(
        (name.strip(), ",".join(sorted(value.split(","))))
        for name, value in params
        if name.strip() not in _NOT_CRITERIA
    )
    return hash64(res_type, *(f"{name}={value}" for name, value in criteria))


_NOT_CRITERIA = frozenset({"_count", "_offset", "_sort", "_format", "_pretty", "_summary", "_elements"})


def lock_condition(conn: sa.Connection, res_type: str, params: list[tuple[str, str]]) -> None:
    """Serialise conditional operations on the same condition until this transaction ends.

    PostgreSQL: a transaction-scoped advisory lock on the condition's key, taken before the
    search, so a second conditional create waits for the first to commit and then finds its
    resource (READ COMMITTED: each statement sees what committed before it). SQLite already
    runs one writer at a time (BEGIN IMMEDIATE). Two different criteria for the same thing
    (identifier vs. identifier plus name) take different locks."""
    lock_conditions(conn, [condition_key(res_type, params)])


def lock_conditions(conn: sa.Connection, keys: list[int]) -> None:
    """Several condition locks at once, in key order (so two transactions cannot deadlock)."""
    if conn.dialect.name != "postgresql" or not keys:
        return
    ordered = sorted(set(keys))
    if len(ordered) == 1:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(ordered[0])))
        return
    # One round trip for all of them (a QĐ 130 episode has ~32 conditions): the aggregate
    # takes the locks row by row as the sorted subquery yields them, so still in key order.
    conn.exec_driver_sql(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest(%(keys)s::bigint[]) AS k ORDER BY k) AS s",
        {"keys": ordered},
    )
