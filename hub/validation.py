"""Validation of incoming resources with fhir.resources (R4B models, which read R4 content).

Owns: turning pydantic errors into OperationOutcome issues with FHIRPath-like locations.
Validation is the ingest ceiling (about 1,700-2,700 resources/s per core), so it runs once
per write, from the received bytes, and the model is thrown away: the stored JSON is the
received JSON, not a re-dump.
Calls: fhir.resources.  Called by: the store's write path and bulk ingest workers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

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


def validate_resource(raw: bytes, resource_type: str) -> None:
    """Raise a 422 FhirError listing every problem; return None when the resource is valid."""
    model = model_class(resource_type)
    if model is None:
        raise FhirError(404, [Issue("not-supported", f"Unknown resource type '{resource_type}'")])
    try:
        model.model_validate_json(raw)
    except ValidationError as exc:
        raise unprocessable(issues_from(exc, resource_type)) from None
    except (ValueError, TypeError) as exc:
        raise unprocessable(
            [Issue("value", f"{resource_type}: {exc}", expression=(resource_type,))]
        ) from None
