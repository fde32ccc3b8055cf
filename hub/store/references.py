"""Rewriting references inside a resource: fullUrls and placeholders to ``Type/id``.

Owns: finding every ``Reference.reference`` in a resource tree and the urn:uuid conventions.
Calls: nothing.  Called by: Bundle transactions and bulk ingest.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

URN_UUID = "urn:uuid:"


def iter_references(node: Any) -> Iterator[dict[str, Any]]:
    """Every object that carries a string ``reference`` key, depth first."""
    found: list[dict[str, Any]] = []
    _collect(node, found)
    return iter(found)


def _collect(node: Any, found: list[dict[str, Any]]) -> None:
    # Into one list: a recursive generator passes every holder up through each level of
    # ``yield from``, and every write walks each resource two or three times.
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            found.append(node)
        for value in node.values():
            if isinstance(value, dict | list):
                _collect(value, found)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                _collect(item, found)


def rewrite(resource: dict[str, Any], resolve: Callable[[str], str | None]) -> None:
    """Replace each reference for which ``resolve`` returns a new value."""
    for holder in iter_references(resource):
        replacement = resolve(holder["reference"])
        if replacement is not None:
            holder["reference"] = replacement


def uuid_of(full_url: str | None) -> str | None:
    """The uuid of a ``urn:uuid:`` fullUrl when it is a well-formed UUID (a valid FHIR id)."""
    if not full_url or not full_url.startswith(URN_UUID):
        return None
    candidate = full_url[len(URN_UUID) :]
    try:
        uuid.UUID(candidate)
    except ValueError:
        return None
    return candidate.lower()
