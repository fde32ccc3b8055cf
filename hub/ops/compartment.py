"""The Patient compartment: which resources belong to which patients.

Owns: reading the official R4 Patient CompartmentDefinition
(``fhir/compartmentdefinition-patient.json``) once, the reference parameters that put a
resource of each supported type into a patient's compartment, and the SQL that selects the
pids of compartment members from ``idx_reference``.
Calls: the search-parameter registry, the schema.  Called by: ``$everything`` and ``$export``.

A resource of type T is in the compartment of patient P when one of T's compartment
parameters (Observation: ``subject``, ``performer``) has an index row pointing at
``Patient/P``. ``hash_identity = H(T, code)`` already names the type, so one lookup on
``idx_reference (target_id, target_type)`` filtered by the set of compartment hashes finds
the members of every type at once. The Patient itself is in its own compartment.
Only types the registry supports can match: others have no index rows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import lru_cache
from typing import Any

import orjson
import sqlalchemy as sa

from hub.db.schema import idx_reference, resource
from hub.search.registry import FHIR_DATA_DIR, Registry, SearchParam

DEFINITION_FILE = FHIR_DATA_DIR / "compartmentdefinition-patient.json"

# Patient ids as literal values or as a subquery selecting one column of ids.
PatientIds = Sequence[str] | sa.Select[Any]


@lru_cache(maxsize=1)
def definition_params() -> dict[str, tuple[str, ...]]:
    """Every resource type of the definition with its compartment parameter codes (may be empty)."""
    document = orjson.loads(DEFINITION_FILE.read_bytes())
    return {entry["code"]: tuple(entry.get("param", ())) for entry in document["resource"]}


@lru_cache(maxsize=4)
def links(registry: Registry) -> dict[str, tuple[SearchParam, ...]]:
    """Supported type -> the indexed reference parameters that link it to a patient."""
    result: dict[str, tuple[SearchParam, ...]] = {}
    for res_type, codes in definition_params().items():
        params = tuple(
            p
            for p in (registry.get(res_type, code) for code in codes)
            if p is not None and p.indexed and p.type == "reference"
        )
        if params:
            result[res_type] = params
    return result


def compartment_types(registry: Registry) -> tuple[str, ...]:
    """Supported types that can be in a Patient compartment, Patient included, sorted."""
    return tuple(sorted(set(links(registry)) | {"Patient"}))


@lru_cache(maxsize=1)
def shared_types() -> tuple[str, ...]:
    """Types no patient compartment can hold (Practitioner, Organization, Location, Medication...),
    whatever the registry supports. A patient's record may reference them freely."""
    return tuple(sorted(t for t, params in definition_params().items() if not params))


def _hashes(registry: Registry, types: Collection[str] | None) -> list[int]:
    return [
        p.hash_identity
        for res_type, params in links(registry).items()
        if types is None or res_type in types
        for p in params
    ]


def _ids_condition(column: sa.ColumnElement[str], patient_ids: PatientIds) -> sa.ColumnElement[bool]:
    if isinstance(patient_ids, sa.Select):
        return column.in_(patient_ids)
    if len(patient_ids) == 1:
        return column == patient_ids[0]
    return column.in_(list(patient_ids))


def linked_pids(
    registry: Registry, patient_ids: PatientIds, types: Collection[str] | None = None
) -> sa.Select[Any]:
    """Pids of resources (of ``types``, default all) linked to the patients by a compartment
    parameter; excludes the patients themselves. Deleted resources have no index rows."""
    return sa.select(idx_reference.c.pid).where(
        _ids_condition(idx_reference.c.target_id, patient_ids),
        idx_reference.c.target_type == "Patient",
        idx_reference.c.hash_identity.in_(_hashes(registry, types)),
    )


def patient_pids(patient_ids: PatientIds) -> sa.Select[Any]:
    """Pids of the Patient resources themselves (deleted ones included; callers filter)."""
    return sa.select(resource.c.pid).where(
        resource.c.res_type == "Patient", _ids_condition(resource.c.res_id, patient_ids)
    )


def member_pids(
    registry: Registry, patient_ids: PatientIds, types: Collection[str] | None = None
) -> sa.Select[Any] | sa.CompoundSelect:
    """Pids of every resource in the compartments of the patients (optionally of some types only).

    A pid may appear more than once in the linked part (a resource referencing two of the
    patients); use it under ``IN``, or through the UNION, which removes duplicates.
    """
    parts: list[sa.Select[Any]] = []
    if types is None or set(types) & set(links(registry)):
        parts.append(linked_pids(registry, patient_ids, types))
    if types is None or "Patient" in types:
        parts.append(patient_pids(patient_ids))
    if not parts:
        return sa.select(resource.c.pid).where(sa.false())
    return parts[0] if len(parts) == 1 else sa.union(*parts)


def all_patient_ids() -> sa.Select[Any]:
    """The ids of every non-deleted Patient, as a subquery for ``PatientIds``."""
    return sa.select(resource.c.res_id).where(resource.c.res_type == "Patient", resource.c.deleted.is_(False))
