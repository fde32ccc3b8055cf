"""The Patient compartment: which resources belong to which patients.

Owns: the compartment rule as data (``fhir/compartment-links.json``: for every type the
official R4 Patient CompartmentDefinition lists with parameters, the FHIRPath of each
parameter from the official R4 SearchParameter definitions, compiled with the registry's
extractor machinery; and the types that may stand without a patient), ``NO_PATIENT``,
resolving at write time the references only the database can resolve (identifier
references, this hub's own absolute URLs, a Binary's ``securityContext``), and the SQL that
selects the pids of a patient's compartment members from the ``compartment`` table.
Calls: the extractor compiler, the schema, ``hub.crypto.blind``, ``consent.context``.
Called by: ``consent.derive`` (membership of a resource), the store, bulk ingest and
``hub reindex`` (resolution), ``$everything`` and ``$export`` (members).

A resource of type T is in the compartment of patient P when one of T's compartment
references names ``Patient/P``: relative, versioned, as an absolute URL of this hub's base,
or as an identifier the hub resolves to exactly one Patient. Membership follows the current
version (``compartment``); each archived version keeps the rows it had
(``history_compartment``). A resource of a compartment type that names no resolvable
patient gets one row with ``patient_id = NO_PATIENT``: only unrestricted roles see it. The
Patient itself is in its own compartment (only: ``Patient.link`` is not followed).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import sqlalchemy as sa

from hub.db.schema import compartment, idx_token, resource
from hub.search.extract import Extractor, compile_expression
from hub.search.hashing import hash64
from hub.search.registry import FHIR_DATA_DIR, Registry

DEFINITION_FILE = FHIR_DATA_DIR / "compartmentdefinition-patient.json"
LINKS_FILE = FHIR_DATA_DIR / "compartment-links.json"

# The patient_id of the one compartment row of a resource that belongs in some patient's
# record but names no patient the hub can resolve: no patient's id is empty, so no grant,
# own-record or break-glass rule ever opens it; only unrestricted roles see it.
NO_PATIENT = ""

# Pending rows (IndexRows key): what only the database can resolve, resolved by ``resolve``
# before the rows are written. (labels, kind, value, system): kind "identifier" (value,
# system), "url" (an absolute URL naming a Patient) or "context" (``Type/id`` of a Binary's
# securityContext, whose patients the Binary shares).
PENDING = "compartment_pending"

# Patient ids as literal values or as a subquery selecting one column of ids.
PatientIds = Sequence[str] | sa.Select[Any]


@lru_cache(maxsize=1)
def definition_params() -> dict[str, tuple[str, ...]]:
    """Every resource type of the definition with its compartment parameter codes (may be empty)."""
    document = orjson.loads(DEFINITION_FILE.read_bytes())
    return {entry["code"]: tuple(entry.get("param", ())) for entry in document["resource"]}


@dataclass(frozen=True)
class Links:
    by_type: dict[str, tuple[Extractor, ...]]  # type -> extractors of its compartment references
    standalone: frozenset[str]  # types that may stand without a patient
    subject_elements: tuple[str, ...]  # elements whose non-patient target puts data outside


@lru_cache(maxsize=1)
def links() -> Links:
    """The compartment references of every compartment type, compiled once."""
    document = orjson.loads(LINKS_FILE.read_bytes())
    by_type = {
        res_type: tuple(compile_expression(expression, res_type)[0] for expression in params.values())
        for res_type, params in document["links"].items()
    }
    return Links(
        by_type, frozenset(document.get("standalone", ())), tuple(document.get("subject_elements", ()))
    )


def compartment_types(registry: Registry | None = None) -> tuple[str, ...]:
    """Types that can be in a Patient compartment, Patient included, sorted."""
    return tuple(sorted(set(links().by_type) | {"Patient"}))


@lru_cache(maxsize=1)
def shared_types() -> tuple[str, ...]:
    """Types no patient compartment can hold (Practitioner, Organization, Location, Medication...),
    whatever the registry supports. A patient's record may reference them freely."""
    return tuple(sorted(t for t, params in definition_params().items() if not params))


# --- resolution at write time -------------------------------------------------------------


def _own_patient(url: str, base_url: str | None) -> str | None:
    """The id of ``{base_url}/Patient/{id}[/_history/n]``; None for any other URL."""
    if not base_url:
        return None
    prefix = base_url.rstrip("/") + "/"
    if not url.startswith(prefix):
        return None
    parts = url[len(prefix) :].split("/")
    if (
        len(parts) in (2, 4)
        and parts[0] == "Patient"
        and parts[1]
        and (len(parts) == 2 or parts[2] == "_history")
    ):
        return parts[1]
    return None


def _visible(table: sa.Table) -> list[sa.ColumnElement[bool]]:
    from consent.context import visible_clause

    clause = visible_clause(table)
    return [] if clause is None else [clause]


def _by_identifier(conn: sa.Connection, system: str | None, value: str) -> list[str] | None:
    """The one Patient (visible to the request) holding this identifier; None if none or several."""
    from hub.crypto.blind import index_identifier

    forms = {value, index_identifier(system, value)}
    hashes = [hash64("Patient", "identifier", system, form) for form in forms]
    if system is None:  # a bare value matches the value under any system
        condition = idx_token.c.hash_value.in_([hash64("Patient", "identifier", form) for form in forms])
    else:
        condition = idx_token.c.hash_sys_value.in_(hashes)
    rows = conn.execute(
        sa.select(resource.c.res_id)
        .join(idx_token, idx_token.c.pid == resource.c.pid)
        .where(
            condition, resource.c.res_type == "Patient", resource.c.deleted.is_(False), *_visible(resource)
        )
        .distinct()
        .limit(2)
    ).all()
    return [rows[0][0]] if len(rows) == 1 else None


def _of_context(conn: sa.Connection, reference: str) -> tuple[list[str], int] | None:
    """The patients and labels of the resource ``Type/id`` (visible to the request); None if
    unknown."""
    res_type, _, res_id = reference.partition("/")
    row = conn.execute(
        sa.select(resource.c.pid).where(
            resource.c.res_type == res_type, resource.c.res_id == res_id, *_visible(resource)
        )
    ).first()
    if row is None:
        return None
    rows = conn.execute(
        sa.select(compartment.c.patient_id, compartment.c.labels).where(compartment.c.pid == row.pid)
    ).all()
    mask = 0
    for _, labels in rows:
        mask |= labels
    return [r[0] for r in rows], mask


def _merged(mask: int, other: int) -> int:
    """A Binary is as sensitive as its securityContext: the sensitive classes of both."""
    from consent.labels import NORMAL, SENSITIVE

    merged = mask | other
    return merged & ~NORMAL if merged & SENSITIVE else merged


def resolve(conn: sa.Connection, rows: dict[str, list[tuple[Any, ...]]], base_url: str | None) -> None:
    """Replace the pending rows of one resource's index rows by its final compartment rows.

    Identifier references resolve to the one Patient holding the identifier that the current
    request may see (hidden patients are unknown, as everywhere); absolute URLs only under
    this hub's ``base_url``; a securityContext to the patients of that resource (and its
    sensitive labels: a Binary is as sensitive as what it belongs to). What does not
    resolve leaves the resource with no patient: if no other reference names one, it gets the
    ``NO_PATIENT`` row. A securityContext naming a resource outside every compartment (an
    Organization's logo) leaves the Binary outside too.
    """
    pending = rows.pop(PENDING, None)
    if not pending:
        return
    mask = pending[0][0]
    patients = dict.fromkeys(p for p, _ in rows.get("compartment", ()) if p != NO_PATIENT)
    unresolved = False
    for _, kind, value, system in pending:
        found: list[str] | None
        if kind == "identifier":
            found = _by_identifier(conn, system, value)
        elif kind == "url":
            own = _own_patient(value, base_url)
            found = [own] if own else None
        else:
            context = _of_context(conn, value)
            found = None if context is None else context[0]
            if context is not None:
                mask = _merged(mask, context[1])
        if found is None:
            unresolved = True
        for patient in found or ():
            if patient == NO_PATIENT:
                unresolved = True
            else:
                patients[patient] = None
    if patients:
        rows["compartment"] = [(patient, mask) for patient in patients]
    elif unresolved or rows.get("compartment"):
        rows["compartment"] = [(NO_PATIENT, mask)]
    else:
        rows.pop("compartment", None)


def has_no_patient(rows: dict[str, list[tuple[Any, ...]]]) -> bool:
    """Whether resolved rows put the resource in no patient's record although it belongs in one."""
    members = rows.get("compartment") or ()
    return any(row[0] == NO_PATIENT for row in members)


# --- members of compartments (reads) ------------------------------------------------------


def _ids_condition(column: sa.ColumnElement[str], patient_ids: PatientIds) -> sa.ColumnElement[bool]:
    if isinstance(patient_ids, sa.Select):
        return column.in_(patient_ids)
    wanted = [p for p in patient_ids if p != NO_PATIENT]
    if len(wanted) == 1:
        return column == wanted[0]
    return column.in_(wanted)


def member_pids(
    registry: Registry, patient_ids: PatientIds, types: Collection[str] | None = None
) -> sa.Select[Any]:
    """Pids of every resource in the compartments of the patients (optionally of some types
    only), the Patients included, from the ``compartment`` rows of current versions.

    Deleted resources keep their rows (callers filter), and a pid may appear more than once
    (a resource of two of the patients): use it under ``IN``.
    """
    query = sa.select(compartment.c.pid).where(_ids_condition(compartment.c.patient_id, patient_ids))
    if types is not None:
        typed = sa.select(resource.c.pid).where(resource.c.res_type.in_(sorted(types)))
        query = query.where(compartment.c.pid.in_(typed))
    return query


def all_patient_ids() -> sa.Select[Any]:
    """The ids of every non-deleted Patient, as a subquery for ``PatientIds``."""
    return sa.select(resource.c.res_id).where(resource.c.res_type == "Patient", resource.c.deleted.is_(False))
