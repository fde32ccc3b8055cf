"""The CPU-heavy half of bulk import, run in worker processes.

Owns: turning one unit into validated, indexed ``NewResource`` records without touching
the database. Bundles of plain POSTs are prepared here in full; anything that needs the
database to decide (conditional entries, PUT, DELETE) is sent back for the main process
to run as an ordinary transaction.
Calls: records (finalize = validate + index), validation (resources with placeholder
references, validated as received), references.  Called by: the pipeline.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from hub.errors import FhirError
from hub.ingest.sources import Unit
from hub.search.registry import get_registry
from hub.store.records import NewResource, finalize, now
from hub.store.references import URN_UUID, rewrite, uuid_of
from hub.validation import validate_resource

# Placeholder type for urn:uuid references to resources of earlier bundles; the main process
# swaps in the real type (or falls back to a full transaction when it cannot).
UNRESOLVED = "Unresolved"


@dataclass
class Prepared:
    unit: Unit
    resources: list[NewResource] = field(default_factory=list)
    unresolved: set[str] = field(default_factory=set)  # ids behind UNRESOLVED references
    needs_transaction: bool = False  # run the whole unit through the REST transaction path
    errors: list[str] = field(default_factory=list)
    rejected: int = 0  # resources not stored because of errors


def prepare(unit: Unit) -> Prepared:
    result = Prepared(unit)
    try:
        if unit.kind == "ndjson":
            _prepare_ndjson(unit, result)
        elif unit.kind == "bundle":
            _prepare_bundle(unit, result)
        else:
            _prepare_single(unit, result)
    except orjson.JSONDecodeError as exc:
        result.errors.append(f"{unit.source}: not valid JSON: {exc}")
        result.rejected += 1
    return result


def prepare_without_payload(unit: Unit) -> Prepared:
    """``prepare`` for a worker process: the caller keeps the unit, so its bytes need not travel back."""
    prepared = prepare(unit)
    prepared.unit = replace(unit, payload=b"")
    return prepared


def _is_plain_post(entry: dict[str, Any]) -> bool:
    request = entry.get("request") or {}
    return (
        request.get("method") == "POST"
        and not request.get("ifNoneExist")
        and isinstance(entry.get("resource"), dict)
        and (entry.get("fullUrl") is None or uuid_of(entry.get("fullUrl")) is not None)
    )


def _prepare_bundle(unit: Unit, result: Prepared) -> None:
    bundle = orjson.loads(unit.payload)
    entries = bundle.get("entry") or []
    if bundle.get("type") != "transaction" or not all(_is_plain_post(e) for e in entries):
        result.needs_transaction = True
        return
    mapping: dict[str, str] = {}
    ids: list[str] = []
    for entry in entries:
        res_id = uuid_of(entry.get("fullUrl")) or str(uuid.uuid4())
        ids.append(res_id)
        if entry.get("fullUrl"):
            mapping[entry["fullUrl"]] = f"{entry['resource']['resourceType']}/{res_id}"

    placeholders: set[str] = set()  # ids behind UNRESOLVED references of the current entry

    def resolve(reference: str) -> str | None:
        mapped = mapping.get(reference)
        if mapped is not None:
            return mapped
        if reference.startswith(URN_UUID):
            bare = uuid_of(reference)
            if bare is None:
                return None
            result.unresolved.add(bare)
            placeholders.add(bare)
            return f"{UNRESOLVED}/{bare}"
        if "?" in reference and "/" not in reference.split("?", 1)[0]:
            result.needs_transaction = True  # a conditional reference needs a search
        return None

    moment = now()
    registry = get_registry()
    for index, (entry, res_id) in enumerate(zip(entries, ids, strict=True)):
        resource = entry["resource"]
        placeholders.clear()
        rewrite(resource, resolve)
        if result.needs_transaction:
            result.resources.clear()
            return
        try:
            if placeholders:
                result.resources.append(_finalize_with_placeholders(resource, res_id, moment, placeholders))
            else:
                result.resources.append(finalize(registry, resource, res_id, 1, moment))
        except FhirError as error:
            result.errors.append(f"{unit.source}: Bundle.entry[{index}]: {error}")
    if result.errors:  # a transaction is all or nothing
        result.rejected = len(entries)
        result.resources.clear()


def _as_received(content: bytes, placeholders: set[str]) -> bytes:
    """The content with its placeholder references back in the ``urn:uuid:`` form they came in."""
    for bare in placeholders:
        content = content.replace(f'"{UNRESOLVED}/{bare}"'.encode(), f'"{URN_UUID}{bare}"'.encode())
    return content


def _finalize_with_placeholders(
    resource: dict[str, Any], res_id: str, moment: datetime, placeholders: set[str]
) -> NewResource:
    """``finalize`` for a resource with placeholder references, validating them as received.

    The placeholder type is no resource type, so a validator that checks reference syntax
    (``Type/id`` of a known type) would refuse it; the ``urn:uuid:`` reference it stands for
    is valid, and so is the ``Type/id`` the main process puts in its place. Index rows are
    extracted from the placeholder form (the main process patches them), so validation
    runs on a byte copy afterwards; if invalid content breaks extraction first, validation
    is what reports it."""
    try:
        item = finalize(get_registry(), resource, res_id, 1, moment, validate=False)
    except FhirError:
        raise
    except Exception:
        validate_resource(_as_received(orjson.dumps(resource), placeholders), resource["resourceType"])
        raise
    validate_resource(_as_received(item.content, placeholders), item.res_type)
    return item


def _prepare_ndjson(unit: Unit, result: Prepared) -> None:
    moment = now()
    registry = get_registry()
    for offset, line in enumerate(unit.payload.splitlines()):
        if not line.strip():
            continue
        where = f"{unit.source.rsplit(':', 1)[0]}:{unit.first_line + offset}"
        try:
            resource = orjson.loads(line)
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise ValueError("not a FHIR resource")
            res_id = resource.get("id") or str(uuid.uuid4())
            result.resources.append(finalize(registry, resource, res_id, 1, moment))
        except (FhirError, ValueError) as error:
            result.errors.append(f"{where}: {error}")
            result.rejected += 1


def _prepare_single(unit: Unit, result: Prepared) -> None:
    resource = orjson.loads(unit.payload)
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        result.errors.append(f"{unit.source}: not a FHIR resource")
        result.rejected += 1
        return
    try:
        res_id = resource.get("id") or str(uuid.uuid4())
        result.resources.append(finalize(get_registry(), resource, res_id, 1, now()))
    except FhirError as error:
        result.errors.append(f"{unit.source}: {error}")
        result.rejected += 1
