"""Turn a search parameter's FHIRPath expression into a fast value extractor.

Owns: compiling the common simple FHIRPath shapes of the official definitions into plain
Python walkers (fhirpathpy manages ~28k evaluations/s, too slow for ~20 parameters per
resource at ingest). Shapes compiled here:
``Type.a.b``, ``(Type.a as X)``, ``Type.a.as(X)``, ``Type.a.where(resolve() is T)`` and
``Type.a.where(field='literal')``. Anything else falls back to fhirpathpy.
Calls: fhirpathpy (fallback only).  Called by: the registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any

Extractor = Callable[[dict[str, Any]], list[Any]]

# Type suffixes that may follow a choice element's name in JSON (valueQuantity...).
_CHOICE_SUFFIXES = frozenset(
    (
        "Base64Binary",
        "Boolean",
        "Canonical",
        "Code",
        "Date",
        "DateTime",
        "Decimal",
        "Id",
        "Instant",
        "Integer",
        "Markdown",
        "Oid",
        "PositiveInt",
        "String",
        "Time",
        "UnsignedInt",
        "Uri",
        "Url",
        "Uuid",
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactPoint",
        "Count",
        "Distance",
        "Duration",
        "HumanName",
        "Identifier",
        "Money",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "SampledData",
        "Signature",
        "Timing",
        "ContactDetail",
        "Contributor",
        "DataRequirement",
        "Expression",
        "ParameterDefinition",
        "RelatedArtifact",
        "TriggerDefinition",
        "UsageContext",
        "Dosage",
        "Meta",
    )
)

_SEGMENT = r"[A-Za-z][A-Za-z0-9]*"
_PATH_RE = re.compile(rf"^{_SEGMENT}(?:\.{_SEGMENT})*$")
_AS_PAREN_RE = re.compile(
    rf"^\((?P<path>{_SEGMENT}(?:\.{_SEGMENT})*) as (?P<type>{_SEGMENT})\)(?P<rest>(?:\.{_SEGMENT})*)$"
)
_AS_CALL_RE = re.compile(rf"^(?P<path>{_SEGMENT}(?:\.{_SEGMENT})*)\.as\((?P<type>{_SEGMENT})\)$")
_WHERE_RESOLVE_RE = re.compile(
    rf"^(?P<path>{_SEGMENT}(?:\.{_SEGMENT})*)\.where\(resolve\(\) is (?P<type>{_SEGMENT})\)$"
)
_WHERE_EQ_RE = re.compile(
    rf"^(?P<path>{_SEGMENT}(?:\.{_SEGMENT})*)\.where\((?P<field>{_SEGMENT}) ?= ?'(?P<value>[^']*)'\)$"
)


def split_union(expression: str) -> list[str]:
    """Split on top-level ``|`` (not inside parentheses or quotes)."""
    parts: list[str] = []
    depth, quoted, start = 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def parts_for_type(expression: str, resource_type: str) -> list[str]:
    """The union members of an expression that apply to one resource type."""
    members = []
    for part in split_union(expression):
        bare = part.lstrip("(")
        if bare.startswith(resource_type + ".") or bare == resource_type or bare.startswith("Resource."):
            members.append(part)
    return members


@lru_cache(maxsize=4096)
def _choice_keys(keys: tuple[str, ...]) -> dict[str, str]:
    """name -> the first key (in order) that is ``name`` followed by a choice type suffix,
    for an object with these keys (``effectiveDateTime``: ``effective`` and ``effectiveDate``).

    Objects of one kind share their key sets, so this is computed once per shape instead of
    scanning every key for each element a search parameter asks for and does not find."""
    found: dict[str, str] = {}
    for key in keys:
        for i in range(1, len(key)):
            if key[i].isupper() and key[i:] in _CHOICE_SUFFIXES:
                found.setdefault(key[:i], key)
    return found


def _children(node: Any, name: str) -> Iterator[Any]:
    if not isinstance(node, dict):
        return
    value = node.get(name)
    if value is None:
        # A choice element ("Observation.effective") appears as effectiveDateTime etc.
        key = _choice_keys(tuple(node)).get(name)
        if key is None:
            return
        value = node[key]
    if isinstance(value, list):
        yield from value
    else:
        yield value


def _walk(nodes: Iterable[Any], segments: list[str]) -> list[Any]:
    current = list(nodes)
    for segment in segments:
        current = [child for node in current for child in _children(node, segment)]
        if not current:
            break
    return current


def _path_extractor(segments: list[str]) -> Extractor:
    if len(segments) == 1:
        name = segments[0]
        return lambda resource: list(_children(resource, name))
    return lambda resource: _walk((resource,), segments)


def _reference_type(value: Any) -> str | None:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and "/" in ref:
            parts = ref.split("/")
            return parts[-4] if len(parts) >= 4 and parts[-2] == "_history" else parts[-2]
        return value.get("type") if isinstance(value.get("type"), str) else None
    return None


def compile_part(part: str) -> Extractor | None:
    """A plain-Python extractor for one union member, or None if the shape is not simple."""
    if _PATH_RE.match(part):
        segments = part.split(".")[1:]
        if not segments:
            return lambda resource: [resource]
        return _path_extractor(segments)
    if match := _AS_PAREN_RE.match(part) or _AS_CALL_RE.match(part):
        segments = match["path"].split(".")[1:]
        typ = match["type"]
        segments[-1] += typ[0].upper() + typ[1:]
        rest = match.groupdict().get("rest")
        return _path_extractor(segments + (rest.split(".")[1:] if rest else []))
    if match := _WHERE_RESOLVE_RE.match(part):
        inner = _path_extractor(match["path"].split(".")[1:])
        target = match["type"]
        return lambda resource: [v for v in inner(resource) if _reference_type(v) in (target, None)]
    if match := _WHERE_EQ_RE.match(part):
        inner = _path_extractor(match["path"].split(".")[1:])
        field, literal = match["field"], match["value"]
        return lambda resource: [
            v for v in inner(resource) if isinstance(v, dict) and v.get(field) == literal
        ]
    return None


def _fhirpath_extractor(expression: str) -> Extractor:
    from fhirpathpy import compile as fhirpath_compile
    from fhirpathpy.models import models

    evaluate = fhirpath_compile(expression, models["r4"])
    return lambda resource: list(evaluate(resource, None))


def compile_expression(expression: str, resource_type: str) -> tuple[Extractor, bool]:
    """The extractor for ``expression`` restricted to ``resource_type``.

    Returns (extractor, compiled) where ``compiled`` is False when fhirpathpy is used.
    """
    parts = parts_for_type(expression, resource_type)
    compiled = [compile_part(p.replace("Resource.", resource_type + ".", 1)) for p in parts]
    if parts and all(c is not None for c in compiled):
        extractors = [c for c in compiled if c is not None]
        if len(extractors) == 1:
            return extractors[0], True
        return (lambda resource: [v for e in extractors for v in e(resource)]), True
    own = " | ".join(parts) if parts else expression
    return _fhirpath_extractor(own), False
