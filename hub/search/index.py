"""Extraction of search-index rows from a resource, at write time.

Owns: how each FHIR element kind becomes rows of the ``idx_*`` tables. Rows are plain
tuples in table column order without the leading ``pid`` (assigned at write time), so
they pickle cheaply across ingest worker processes and feed COPY directly.
Calls: registry, hashing, normalize, dates, words (the word rows of name parameters),
``hub.crypto.blind``, ``consent.derive`` (the ``compartment`` and ``access_grant`` rows;
compartment references only the database can resolve come out as ``compartment_pending``
rows, resolved before writing by ``hub.ops.compartment.resolve``).
Called by: the store (every write), bulk ingest, ``hub reindex``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from consent.derive import access_rows
from hub.crypto.blind import index_contact, index_identifier
from hub.search.dates import DateFormatError, date_range
from hub.search.hashing import hash64
from hub.search.normalize import fold
from hub.search.registry import Registry, SearchParam
from hub.search.words import searched_by_word, word_rows

IndexRows = dict[str, list[tuple[Any, ...]]]

_STRING_PARTS = {
    # HumanName and Address: every part is searchable on its own, plus the text.
    "family": None, "given": None, "prefix": None, "suffix": None, "text": None,
    "line": None, "city": None, "district": None, "state": None, "postalCode": None, "country": None,
}  # fmt: skip


_CONTACT_CHANNELS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in _STRING_PARTS:
            part = value.get(key)
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (p for p in part if isinstance(p, str))


def _tokens(value: Any) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(system, code, display) triples of a code, Coding, CodeableConcept, Identifier..."""
    if isinstance(value, str):
        yield None, value, None
    elif isinstance(value, bool):
        yield None, "true" if value else "false", None
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "value" not in value and "code" not in value):
            text = value.get("text")
            for coding in value.get("coding", ()):
                yield coding.get("system"), coding.get("code"), coding.get("display")
            if text:  # :text matches CodeableConcept.text as well as each Coding.display
                yield None, None, text
        elif "code" in value:  # Coding, Quantity-as-token
            yield value.get("system"), value.get("code"), value.get("display")
        elif "value" in value:  # Identifier, ContactPoint
            id_type = value.get("type")
            display = id_type.get("text") if isinstance(id_type, dict) else None
            system = value.get("system")
            # CCCD/BHYT/BHXH numbers and phone numbers are indexed as keyed hashes (hub.crypto).
            if system in _CONTACT_CHANNELS:  # a channel, not a code system
                yield None, index_contact(system, str(value["value"])), display
            else:
                yield system, index_identifier(system, str(value["value"])), display


def _reference(value: Any) -> tuple[str | None, str | None, str | None] | None:
    """(target type, target id, absolute url) of a Reference or canonical."""
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str) or not ref or ref.startswith("#"):
        return None
    if "://" in ref or ref.startswith("urn:"):
        return None, None, ref.split("|", 1)[0]
    parts = ref.split("/")
    if len(parts) in (2, 4) and max(len(parts[0]), len(parts[1])) > 64:
        return None, None, ref  # no local type or id is that long (nor fits target_type/target_id)
    if len(parts) == 2:
        return parts[0], parts[1], None
    if len(parts) == 4 and parts[2] == "_history":
        return parts[0], parts[1], None
    return None, None, ref


def _date_bounds(value: Any) -> Iterator[tuple[int, int]]:
    try:
        if isinstance(value, str):
            yield date_range(value)
        elif isinstance(value, dict):
            if "start" in value or "end" in value:  # Period: open ends reach to the extremes
                low = date_range(value["start"])[0] if value.get("start") else -(2**62)
                high = date_range(value["end"])[1] if value.get("end") else 2**62
                yield low, high
            elif "event" in value or "repeat" in value:  # Timing
                for event in value.get("event", ()):
                    yield date_range(event)
                bounds = value.get("repeat", {}).get("boundsPeriod")
                if bounds:
                    yield from _date_bounds(bounds)
    except DateFormatError:
        return


def rows_for(param: SearchParam, resource: dict[str, Any], out: IndexRows) -> None:
    assert param.extractor is not None
    values = param.extractor(resource)
    if not values:
        return
    rtype, code, identity = param.resource_type, param.code, param.hash_identity
    kind = param.type
    if kind == "token":
        rows = out.setdefault("token", [])
        for value in values:
            for system, token, display in _tokens(value):
                rows.append(
                    (
                        identity,
                        hash64(rtype, code, token),
                        hash64(rtype, code, system, None),
                        hash64(rtype, code, system, token),
                        system,
                        token,
                        fold(display) if display else None,
                    )
                )
    elif kind == "reference":
        rows = out.setdefault("reference", [])
        for value in values:
            target = _reference(value)
            if target is not None:
                ttype, tid, url = target
                rows.append((identity, hash64(rtype, code, tid or url), ttype, tid, url))
    elif kind == "string":
        rows = out.setdefault("string", [])
        by_word = searched_by_word(rtype, code)
        for value in values:
            for text in _strings(value):
                folded = fold(text)
                rows.append((identity, hash64(rtype, code, text), folded, text))
                if by_word:  # the words a multi-word name search looks for (hub.search.words)
                    rows.extend(word_rows(rtype, code, folded))
    elif kind == "date":
        rows = out.setdefault("date", [])
        for value in values:
            for low, high in _date_bounds(value):
                rows.append((identity, low, high))
    elif kind == "uri":
        rows = out.setdefault("uri", [])
        for value in values:
            if isinstance(value, str):
                rows.append((identity, hash64(rtype, code, value), value))
    elif kind == "number":
        rows = out.setdefault("number", [])
        for value in values:
            if isinstance(value, int | float) and not isinstance(value, bool):
                rows.append((identity, float(value), float(value)))
    elif kind == "composite":
        _composite_rows(param, values, out.setdefault("composite", []))
    elif kind == "quantity":
        rows = out.setdefault("quantity", [])
        for value in values:
            if isinstance(value, dict) and isinstance(value.get("value"), int | float):
                system, unit = value.get("system"), value.get("code") or value.get("unit")
                number = float(value["value"])
                rows.append((identity, hash64(rtype, code, system, unit), system, unit, number, number))


def _token_forms(value: Any) -> Iterator[str]:
    """How a composite's token part can be asked for: ``code`` and ``system|code``."""
    for system, code, _ in _tokens(value):
        if code:
            yield code
            if system:
                yield f"{system}|{code}"


def _composite_second(
    kind: str, value: Any
) -> Iterator[tuple[tuple[str, str], float | None, float | None, str | None]]:
    """(key suffix, low, high, text) forms of a composite's second component."""
    if kind == "token":
        for form in _token_forms(value):
            yield ("t", form), None, None, None
    elif kind == "quantity":
        if isinstance(value, dict) and isinstance(value.get("value"), int | float):
            number = float(value["value"])
            system, unit = value.get("system"), value.get("code") or value.get("unit")
            yield ("q", ""), number, number, None
            if unit:
                yield ("q", f"{system or ''}|{unit}"), number, number, None
    elif kind == "date":
        for low, high in _date_bounds(value):
            yield ("d", ""), float(low), float(high), None
    elif kind == "string":
        for text in _strings(value):
            yield ("s", ""), None, None, fold(text)
    elif kind == "reference":
        target = _reference(value)
        if target is not None:
            yield ("r", target[1] or target[2] or ""), None, None, None


def _composite_rows(param: SearchParam, elements: list[Any], rows: list[tuple[Any, ...]]) -> None:
    (_, first), (second_kind, second) = param.components
    rtype, code, identity = param.resource_type, param.code, param.hash_identity
    for element in elements:
        firsts = [form for value in first(element) for form in _token_forms(value)]
        if not firsts:
            continue
        for value in second(element):
            for suffix, low, high, text in _composite_second(second_kind, value):
                for form in firsts:
                    rows.append((identity, hash64(rtype, code, form, *suffix), low, high, text))


# The indexed parameters of each type, per registry: asked for once per resource written.
_INDEXED: weakref.WeakKeyDictionary[Registry, dict[str, list[SearchParam]]] = weakref.WeakKeyDictionary()


def _indexed_params(registry: Registry, resource_type: str) -> list[SearchParam]:
    by_type = _INDEXED.setdefault(registry, {})
    params = by_type.get(resource_type)
    if params is None:
        params = by_type[resource_type] = registry.indexed_params(resource_type)
    return params


def extract_index_rows(registry: Registry, resource_type: str, resource: dict[str, Any]) -> IndexRows:
    rows: IndexRows = {}
    for param in _indexed_params(registry, resource_type):
        rows_for(param, resource, rows)
    unique = {kind: list(dict.fromkeys(found)) for kind, found in rows.items() if found}
    unique.update(access_rows(registry, resource_type, resource.get("id", ""), resource, unique))
    return unique
