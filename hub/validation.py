"""Validation of incoming resources with fhir.resources (R4B models, which read R4 content).

Owns: turning pydantic errors into OperationOutcome issues with FHIRPath-like locations.
Validation is the ingest ceiling (about 1,700-2,700 resources/s per core), so it runs once
per write, from the received bytes, and the model is thrown away: the stored JSON is the
received JSON, not a re-dump.
Calls: fhir.resources.  Called by: the store's write path and bulk ingest workers.
"""

from __future__ import annotations

import decimal
import types
import typing
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from hub.errors import FhirError, Issue, unprocessable


@lru_cache(maxsize=512)
def model_class(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ModuleNotFoundError):
        return None


def is_resource_type(name: str) -> bool:
    return bool(name) and name[0].isupper() and model_class(name) is not None


def _location(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not part.startswith("function-after") and part not in ("__root__",):
            path += f".{part}"
    return path


def issues_from(error: ValidationError, resource_type: str) -> list[Issue]:
    issues = []
    for detail in error.errors(include_url=False):
        location = _location(resource_type, tuple(detail.get("loc", ())))
        message = detail.get("msg", "invalid")
        code = "structure" if detail.get("type") in ("extra_forbidden", "missing") else "value"
        if detail.get("type") == "extra_forbidden":
            message = "Unknown element"
        issues.append(Issue(code, f"{location}: {message}", expression=(location,)))
    return issues


def validate_resource(raw: bytes, resource_type: str, document: dict[str, Any] | None = None) -> None:
    """Raise a 422 FhirError listing every problem; return None when the resource is valid."""
    model = model_class(resource_type)
    if model is None:
        raise FhirError(404, [Issue("not-supported", f"Unknown resource type '{resource_type}'")])
    try:
        model.model_validate_json(raw)
    except ValidationError as exc:
        raise unprocessable(issues_from(exc, resource_type)) from None
    except KeyError as exc:  # fhir_core looks up an inner resourceType it does not know
        issues: list[Issue] = []
        _unknown_inner_types(orjson.loads(raw), resource_type, issues)
        raise unprocessable(
            issues or [Issue("value", f"{resource_type}: {exc}", expression=(resource_type,))]
        ) from None
    except (ValueError, TypeError) as exc:
        raise unprocessable(
            [Issue("value", f"{resource_type}: {exc}", expression=(resource_type,))]
        ) from None
    # fhir_core coerces nested primitives ("active": "yes" becomes True); the store keeps the
    # received JSON, so the JSON types themselves must be right.
    type_issues = json_type_issues(document if document is not None else orjson.loads(raw), resource_type)
    if type_issues:
        raise unprocessable(type_issues)


def _unknown_inner_types(node: Any, path: str, out: list[Issue]) -> None:
    if isinstance(node, dict):
        kind = node.get("resourceType")
        if "." in path and isinstance(kind, str) and model_class(kind) is None:
            out.append(Issue("not-supported", f"{path}: Unknown resource type '{kind}'", expression=(path,)))
        for key, value in node.items():
            _unknown_inner_types(value, f"{path}.{key}", out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _unknown_inner_types(value, f"{path}[{i}]", out)


FieldKind = tuple[str, Any]  # (boolean|integer|decimal|string|element|resource|any, element model)


def _classify(annotation: Any) -> FieldKind:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _classify(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _classify(args[0]) if len(args) == 1 else ("any", None)
    if annotation is bool:
        return "boolean", None
    if annotation is int:
        return "integer", None
    if annotation is decimal.Decimal:
        return "decimal", None
    if hasattr(annotation, "get_model_klass"):
        klass = annotation.get_model_klass()
        return ("resource", None) if klass.__name__ in ("Resource", "DomainResource") else ("element", klass)
    return "string", None


@lru_cache(maxsize=4096)
def _fields(model: Any) -> dict[str, FieldKind]:
    return {(info.alias or name): _classify(info.annotation) for name, info in model.model_fields.items()}


_JSON_TYPE_OK: dict[str, Callable[[Any], bool]] = {
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "decimal": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
}


def json_type_issues(document: dict[str, Any], resource_type: str) -> list[Issue]:
    """Elements whose JSON type is wrong for their FHIR type (a string where a boolean belongs)."""
    issues: list[Issue] = []

    def walk_object(node: dict[str, Any], model: Any, path: str) -> None:
        fields = _fields(model)
        for key, value in node.items():
            kind = fields.get(key)
            if kind is None or value is None:
                continue  # unknown elements and nulls were already reported by pydantic
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                walk_value(item, kind, f"{path}.{key}" + (f"[{i}]" if i is not None else ""))

    def walk_value(value: Any, kind: FieldKind, where: str) -> None:
        name, model = kind
        if name == "element" and isinstance(value, dict):
            walk_object(value, model, where)
        elif name == "resource" and isinstance(value, dict):
            inner = model_class(value.get("resourceType", ""))
            if inner is not None:
                walk_object(value, inner, where)
        elif name in _JSON_TYPE_OK and not _JSON_TYPE_OK[name](value):
            issues.append(
                Issue("value", f"{where}: expected a JSON {name}, got {value!r}", expression=(where,))
            )

    walk_object(document, model_class(resource_type), resource_type)
    return issues
