"""The records the store reads and writes, and the one place a resource's JSON is finalized.

Owns: setting ``id`` and ``meta.versionId``/``meta.lastUpdated`` and serializing once,
and deciding whether the version is stored encrypted.
Calls: orjson, validation, index extraction, ``hub.crypto`` (policy), ``hub.instants``.
Called by: the store and bulk ingest workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from hub.crypto.keys import current as current_keyring
from hub.crypto.policy import needs_sealing
from hub.instants import instant as instant  # re-exported: the store's callers use it
from hub.search.index import IndexRows, extract_index_rows
from hub.search.registry import Registry
from hub.validation import validate_resource


def now() -> datetime:
    """Current time truncated to milliseconds, the precision of meta.lastUpdated."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; PostgreSQL, the session's zone. Both become UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class StoredResource:
    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    deleted: bool
    content: bytes | None  # exactly the stored JSON; None for a deletion

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    def parsed(self) -> dict[str, Any]:
        return orjson.loads(self.content) if self.content else {}


@dataclass(frozen=True)
class NewResource:
    """A validated, indexed resource version ready to be written."""

    res_type: str
    res_id: str
    version: int
    last_updated: datetime
    content: bytes  # always the plaintext JSON; the writer seals it when ``encrypt`` says so
    index_rows: IndexRows
    encrypt: bool = False  # store as an envelope (hub.crypto.policy)


def finalize(
    registry: Registry,
    resource: dict[str, Any],
    res_id: str,
    version: int,
    last_updated: datetime,
    *,
    validate: bool = True,
) -> NewResource:
    """Stamp id and meta, serialize once, validate those bytes, extract index rows.

    ``validate=False`` is for resources the hub builds itself from a fixed template (the
    audit trail's AuditEvents, one per request): validating them would cost more than the
    rest of the write and can only find the hub's own bugs, which tests catch instead.
    """
    res_type = resource["resourceType"]
    resource["id"] = res_id
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    resource["meta"] = {**meta, "versionId": str(version), "lastUpdated": instant(last_updated)}
    content = orjson.dumps(resource)
    if validate:
        validate_resource(content, res_type, resource)
    index_rows = extract_index_rows(registry, res_type, resource)
    # Decided here, where the plaintext dict and index rows exist; sealing itself happens in
    # the writer, because bulk ingest still edits ids and references in these bytes.
    ring = current_keyring()
    encrypt = ring is not None and ring.encrypt and needs_sealing(res_type, content, resource, index_rows)
    return NewResource(res_type, res_id, version, last_updated, content, index_rows, encrypt)


def same_content(stored: bytes, candidate: dict[str, Any]) -> bool:
    """True when two versions differ at most in meta.versionId/lastUpdated."""

    def strip(resource: dict[str, Any]) -> dict[str, Any]:
        meta = {
            k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")
        }
        return {**resource, "meta": meta}

    return strip(orjson.loads(stored)) == strip(candidate)
