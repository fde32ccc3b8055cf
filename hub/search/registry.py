"""The one search-parameter registry.

Owns: which search parameters exist for which resource type, with their type, targets,
hash identity and compiled value extractor. Built from ``fhir/search-parameters.json``, a
Bundle of the official R4 SearchParameter resources the hub supports (kept verbatim, so a
parameter's provenance is its ``url``). ``hub registry import-official`` rewrites that file
from the official definitions. ``fhir/search-parameters-hub.json`` adds the hub's own few.
Calls: ``extract`` (compilation), ``hashing``.  Called by: indexing, search, metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from hub.search.extract import Extractor, compile_expression
from hub.search.hashing import hash64

FHIR_DATA_DIR = Path(__file__).resolve().parents[2] / "fhir"
REGISTRY_FILE = FHIR_DATA_DIR / "search-parameters.json"
# The hub's own parameters, where R4 defines none (AuditEvent?purpose=); import-official
# leaves this file alone.
HUB_REGISTRY_FILE = FHIR_DATA_DIR / "search-parameters-hub.json"

# Types whose values live in an idx_* table. composite and special are not indexed yet.
INDEXED_TYPES = frozenset({"string", "token", "date", "number", "quantity", "uri", "reference", "composite"})
# Composite parameters the index understands: a token first, then one of these.
COMPOSITE_SECOND_TYPES = frozenset({"token", "quantity", "date", "string", "reference"})
# Parameters answered from columns of the resource table rather than an index table.
COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})

# The resource types the hub indexes (the clinical and directory core): searchable, and so
# usable in conditional writes. Other R4 types are stored, access-controlled and in
# $everything/$export, but not searchable. Issue 11 added the eight after Provenance, which the
# connectors write (MedicationDispense, ChargeItem, ClinicalImpression, Composition, Specimen,
# Flag) or a reader of them needs (Medication, SupplyDelivery). A type added here has no index
# rows for resources stored before: `hub reindex --type <Type>` after the upgrade.
SUPPORTED_RESOURCE_TYPES: tuple[str, ...] = (
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "RelatedPerson",
    "Group", "Encounter", "Observation", "Condition", "Procedure", "Immunization",
    "AllergyIntolerance", "MedicationRequest", "MedicationStatement", "DiagnosticReport",
    "ImagingStudy", "DocumentReference", "CarePlan", "CareTeam", "Goal", "ServiceRequest", "Task",
    "Communication", "Appointment", "Slot", "Schedule", "Coverage", "Claim",
    "ExplanationOfBenefit", "Consent", "AuditEvent", "Provenance",
    "Specimen", "Flag", "MedicationDispense", "Medication", "ChargeItem", "SupplyDelivery",
    "ClinicalImpression", "Composition",
)  # fmt: skip


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    resource_type: str
    expression: str
    url: str
    targets: tuple[str, ...] = ()
    extractor: Extractor | None = field(default=None, compare=False, repr=False)
    compiled: bool = True
    # Composite parameters: (component type, extractor relative to the element) per component.
    components: tuple[tuple[str, Extractor], ...] = field(default=(), compare=False, repr=False)

    @property
    def hash_identity(self) -> int:
        return _identity(self.resource_type, self.code)

    @property
    def indexed(self) -> bool:
        return self.extractor is not None and self.type in INDEXED_TYPES


@lru_cache(maxsize=8192)
def _identity(resource_type: str, code: str) -> int:
    return hash64(resource_type, code)


class Registry:
    """Search parameters by resource type and code."""

    def __init__(self, definitions: Iterable[dict[str, Any]], resource_types: Iterable[str]) -> None:
        self.resource_types = tuple(resource_types)
        self._params: dict[str, dict[str, SearchParam]] = {t: {} for t in self.resource_types}
        definitions = list(definitions)
        self._by_url = {d.get("url"): d for d in definitions}
        for definition in definitions:
            self._add(definition)

    def _add(self, definition: dict[str, Any]) -> None:
        code, kind = definition["code"], definition["type"]
        bases = self.resource_types if definition["base"] == ["Resource"] else definition["base"]
        for resource_type in bases:
            if resource_type not in self._params:
                continue
            expression = definition.get("expression") or ""
            extractor: Extractor | None = None
            compiled = True
            components: tuple[tuple[str, Extractor], ...] = ()
            if kind == "composite":
                components = self._components(definition)
                if components:
                    extractor, compiled = compile_expression(expression, resource_type)
            elif kind in INDEXED_TYPES and code not in COLUMN_PARAMS and expression:
                extractor, compiled = compile_expression(expression, resource_type)
            self._params[resource_type][code] = SearchParam(
                code=code,
                type=kind,
                resource_type=resource_type,
                expression=expression,
                url=definition.get("url", ""),
                targets=tuple(definition.get("target", ())),
                extractor=extractor,
                compiled=compiled,
                components=components,
            )

    def _components(self, definition: dict[str, Any]) -> tuple[tuple[str, Extractor], ...]:
        """Component extractors of a token-first, two-part composite; () when unsupported."""
        parts = definition.get("component") or []
        if len(parts) != 2:
            return ()
        found = []
        for part in parts:
            component = self._by_url.get(part.get("definition"))
            if component is None:
                return ()
            # Component expressions are relative to the element; root them at a dummy type.
            rooted = " | ".join(f"Element.{p.strip()}" for p in part["expression"].split("|"))
            extractor, compiled = compile_expression(rooted, "Element")
            if not compiled:
                return ()
            found.append((component["type"], extractor))
        if found[0][0] != "token" or found[1][0] not in COMPOSITE_SECOND_TYPES:
            return ()
        return tuple(found)

    def param_by_identity(self, hash_identity: int) -> SearchParam | None:
        if not hasattr(self, "_by_identity"):
            self._by_identity = {
                p.hash_identity: p for params in self._params.values() for p in params.values()
            }
        return self._by_identity.get(hash_identity)

    def supports(self, resource_type: str) -> bool:
        return resource_type in self._params

    def params(self, resource_type: str) -> dict[str, SearchParam]:
        return self._params.get(resource_type, {})

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        return self._params.get(resource_type, {}).get(code)

    def indexed_params(self, resource_type: str) -> list[SearchParam]:
        return [p for p in self.params(resource_type).values() if p.indexed]


def load_definitions(path: Path = REGISTRY_FILE) -> list[dict[str, Any]]:
    bundle = orjson.loads(path.read_bytes())
    return [entry["resource"] for entry in bundle.get("entry", [])]


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    return Registry(load_definitions() + load_definitions(HUB_REGISTRY_FILE), SUPPORTED_RESOURCE_TYPES)


def import_official(official_bundle: Path, out: Path = REGISTRY_FILE) -> int:
    """Keep the official definitions that apply to the supported types; returns the count."""
    bundle = orjson.loads(official_bundle.read_bytes())
    wanted = set(SUPPORTED_RESOURCE_TYPES) | {"Resource"}
    kept = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if set(resource.get("base", ())) & wanted:
            resource.pop("text", None)
            kept.append({"fullUrl": entry.get("fullUrl", resource.get("url")), "resource": resource})
    out.write_bytes(
        orjson.dumps(
            {"resourceType": "Bundle", "id": "hub-search-parameters", "type": "collection", "entry": kept},
            option=orjson.OPT_INDENT_2,
        )
        + b"\n"
    )
    return len(kept)
