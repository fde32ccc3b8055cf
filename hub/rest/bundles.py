"""Building response Bundles from stored JSON without parsing it again.

Owns: the assembly of every Bundle the hub answers with (searchset, history, and the
transaction-/batch-response of ``hub.rest.transaction``), and paging links (by offset for
history and ``$everything``, by keyset cursor for searches).
Calls: orjson.  Called by: the interactions, ``$everything``, Bundle processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from hub.store import StoredResource
from hub.store.records import instant


def page_link(base: str, path: str, params: Sequence[tuple[str, str]], offset: int, count: int) -> str:
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    kept += [("_count", str(count)), ("_offset", str(offset))]
    return f"{base}/{path}?{urlencode(kept)}"


def paging_links(
    base: str, path: str, params: Sequence[tuple[str, str]], offset: int, count: int, has_more: bool
) -> list[dict[str, str]]:
    links = [{"relation": "self", "url": page_link(base, path, params, offset, count)}]
    if offset > 0:
        links.append(
            {"relation": "previous", "url": page_link(base, path, params, max(offset - count, 0), count)}
        )
    if has_more:
        links.append({"relation": "next", "url": page_link(base, path, params, offset + count, count)})
    return links


def search_links(
    base: str,
    path: str,
    params: Sequence[tuple[str, str]],
    count: int,
    offset: int,
    next_cursor: str | None,
) -> list[dict[str, str]]:
    """A searchset's links: ``self`` as asked, ``next`` by keyset cursor. A cursor cannot
    be walked backwards, so ``previous`` (optional in FHIR) is given only to a client paging
    by ``_offset``, the old way, which still works."""
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count", "_cursor")]
    here = [(k, v) for k, v in params if k == "_cursor"] + ([("_offset", str(offset))] if offset else [])
    links = [
        {"relation": "self", "url": f"{base}/{path}?{urlencode([*kept, ('_count', str(count)), *here])}"}
    ]
    if offset > 0 and not any(k == "_cursor" for k, _ in params):
        links.append(
            {"relation": "previous", "url": page_link(base, path, kept, max(offset - count, 0), count)}
        )
    if next_cursor is not None:
        following = [*kept, ("_count", str(count)), ("_cursor", next_cursor)]
        links.append({"relation": "next", "url": f"{base}/{path}?{urlencode(following)}"})
    return links


def _head(bundle_type: str, total: int | None, links: list[dict[str, str]]) -> bytes:
    head: dict[str, object] = {"resourceType": "Bundle", "type": bundle_type}
    if total is not None:
        head["total"] = total
    if links:  # FHIR JSON forbids empty arrays
        head["link"] = links
    return orjson.dumps(head)[:-1]


def _entries(entries: list[bytes]) -> bytes:
    # FHIR JSON forbids empty arrays: a Bundle without entries has no "entry" at all.
    return b',"entry":[' + b",".join(entries) + b"]}" if entries else b"}"


def _search_entry(base: str, res_type: str, res_id: str, content: bytes, mode: bytes) -> bytes:
    url = orjson.dumps(f"{base}/{res_type}/{res_id}")
    return b'{"fullUrl":' + url + b',"resource":' + content + b',"search":{"mode":"' + mode + b'"}}'


def response(bundle_type: str, entries: Sequence[dict[str, Any]]) -> bytes:
    """A ``transaction-response`` or ``batch-response`` Bundle of the given entries."""
    return _head(bundle_type, None, []) + _entries([orjson.dumps(entry) for entry in entries])


def searchset(
    base: str,
    matches: Sequence[tuple[str, str, bytes]],
    total: int | None,
    links: list[dict[str, str]],
    outcome: dict[str, object] | None = None,
    included: Sequence[tuple[str, str, bytes]] = (),
) -> bytes:
    entries = [_search_entry(base, t, i, content, b"match") for t, i, content in matches]
    entries += [_search_entry(base, t, i, content, b"include") for t, i, content in included]
    if outcome is not None:
        entries.append(b'{"resource":' + orjson.dumps(outcome) + b',"search":{"mode":"outcome"}}')
    return _head("searchset", total, links) + _entries(entries)


def history(base: str, versions: Sequence[StoredResource], total: int, links: list[dict[str, str]]) -> bytes:
    entries = []
    for v in versions:
        request = {
            "method": "DELETE" if v.deleted else ("POST" if v.version == 1 else "PUT"),
            "url": f"{v.res_type}" if v.version == 1 and not v.deleted else f"{v.res_type}/{v.res_id}",
        }
        response = {
            "status": "204" if v.deleted else ("201" if v.version == 1 else "200"),
            "etag": v.etag,
            "lastModified": instant(v.last_updated),
        }
        entry = b'{"fullUrl":' + orjson.dumps(f"{base}/{v.res_type}/{v.res_id}")
        if v.content is not None:
            entry += b',"resource":' + v.content
        entry += b',"request":' + orjson.dumps(request) + b',"response":' + orjson.dumps(response) + b"}"
        entries.append(entry)
    return _head("history", total, links) + _entries(entries)
