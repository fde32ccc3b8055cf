"""``Patient/{id}/$everything`` and ``Patient/$everything``: a patient's whole record, paged.

Owns: the member set of ``$everything`` (the patients, every resource in their compartments,
and the shared resources those reference), its parameters (``_type``, ``_since``,
``_count``/``_offset``), and the two operation handlers. Also the ``_type``/``_since``
parsers that ``$export`` shares.
Calls: ``hub.ops.compartment``, the schema, ``hub.rest.bundles``, ``consent.context`` (the
rows the request may see; what was returned is reported), ``hub.crypto.envelope`` (opening
sealed content), ``hub.store.pids`` (the page's rows by one pid array).  Called by: the router
(registered by ``hub.app_factory``), ``hub.ops.export`` (parameter parsing).

The member set is one SQL statement, so paging is plain offset paging over one stable
order (the patients first, then by type and pid) and each resource is on exactly one page:

- compartment: the ``compartment`` rows of the patients (every compartment type, the
  Patients themselves, Binaries and stored Bundles of theirs; ``hub.ops.compartment.member_pids``);
- referenced: the targets of every ``idx_reference`` row of a compartment member whose
  type can never be in a patient compartment (Practitioner, Organization, Location,
  Medication...). Referenced Patients, Encounters, Observations... outside this compartment
  are someone else's record, so references never pull them in (a Group that lists this
  patient would otherwise drag in its other members).

``_type`` and ``_since`` filter the final set, the patient included. References are followed
from the whole compartment, so ``_type=Practitioner`` lists the patient's practitioners.

Cost: a page computes the member set once (ordered and counted by a narrow query), then
reads the JSON of the page's rows only. For one patient that is a few index scans (tens of
ms for a 300-resource Synthea record on PostgreSQL). ``Patient/$everything`` builds the set
for every patient on each page, so it grows with the database (about 1 s per page for 92k
resources); populations belong to ``$export``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from consent.context import report, visible_clause
from hub.crypto.envelope import open_content
from hub.db.schema import idx_reference, resource
from hub.errors import bad_request, not_found
from hub.ops import compartment
from hub.rest import bundles
from hub.rest.interactions import link_base
from hub.rest.messages import FhirRequest, FhirResponse
from hub.search.dates import DateFormatError, date_range, from_micros
from hub.store.pids import pid_in
from hub.validation import is_resource_type

if TYPE_CHECKING:
    from hub.rest.router import FhirRouter
    from hub.search.registry import Registry

# Parameters that do not change the result.
_IGNORED = frozenset({"_format", "_pretty"})
_KNOWN = frozenset({"_type", "_since", "_count", "_offset"}) | _IGNORED
# Page order: the patients, then the other resources by type (stable, so offsets page well).
_PATIENTS_FIRST = sa.case((resource.c.res_type == "Patient", 0), else_=1)


# The access log about a patient is in their compartment but is not part of their health
# record: $everything and $export leave it out unless _type asks for it.
AUDIT_TRAIL_TYPES = frozenset({"AuditEvent"})


def types_param(values: list[str]) -> list[str] | None:
    """``_type`` (repeatable, comma lists) as a sorted list of resource types; None when absent."""
    if not values:
        return None
    types = {t.strip() for value in values for t in value.split(",") if t.strip()}
    unknown = sorted(t for t in types if not is_resource_type(t))
    if unknown:
        raise bad_request(f"_type names unknown resource types: {', '.join(unknown)}")
    if not types:
        raise bad_request("_type has no value")
    return sorted(types)


def since_param(values: list[str]) -> datetime | None:
    """``_since`` as the start of the instant it names; None when absent."""
    if not values:
        return None
    if len(values) > 1:
        raise bad_request("_since may appear only once")
    try:
        return from_micros(date_range(values[0])[0])
    except DateFormatError as exc:
        raise bad_request(f"_since: {exc}") from None


def everything_pids(registry: Registry, patient_ids: compartment.PatientIds) -> sa.CompoundSelect[int]:
    """Pids of the compartment members of the patients plus the shared resources they reference.

    Deleted resources may appear (the Patient rows, deleted reference targets): callers filter.
    References are followed only from members the request may see: a Practitioner that only
    a hidden HIV result (or a hidden AuditEvent) points at would otherwise tell of it.
    """
    members = compartment.member_pids(registry, patient_ids).cte("compartment_members")
    source = resource.alias("source")
    # What the access log points at is not part of the record: AuditEvents are no source.
    source_conditions: list[sa.ColumnElement[bool]] = [
        source.c.pid.in_(sa.select(members.c.pid)),
        source.c.res_type.not_in(sorted(AUDIT_TRAIL_TYPES)),
    ]
    visible = visible_clause(source)  # type: ignore[arg-type]
    if visible is not None:
        source_conditions.append(visible)
    sources = sa.select(source.c.pid).where(*source_conditions)
    target = resource.alias("target")
    referenced = (
        sa.select(target.c.pid)
        .select_from(
            idx_reference.join(
                target,
                sa.and_(
                    target.c.res_id == idx_reference.c.target_id,
                    target.c.res_type == idx_reference.c.target_type,
                ),
            )
        )
        .where(
            idx_reference.c.pid.in_(sources),
            idx_reference.c.target_type.in_(compartment.shared_types()),
        )
    )
    return sa.union(sa.select(members.c.pid), referenced)


def _params(router: FhirRouter, request: FhirRequest) -> tuple[list[str] | None, datetime | None, int, int]:
    lenient = request.prefer("handling") == "lenient"
    values: dict[str, list[str]] = {}
    for key, value in request.query:
        if key not in _KNOWN:
            if lenient:
                continue
            raise bad_request(f"$everything does not support the parameter '{key}'")
        values.setdefault(key, []).append(value)
    count, offset = router.ctx.default_count, 0
    for key in ("_count", "_offset"):
        if key in values:
            raw = values[key][-1]
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):  # see query._non_negative
                raise bad_request(f"{key} must be a non-negative integer")
            if key == "_count":
                count = min(int(raw), router.ctx.max_count)
            else:
                offset = int(raw)
    return types_param(values.get("_type", [])), since_param(values.get("_since", [])), count, offset


def _everything(
    router: FhirRouter,
    request: FhirRequest,
    patient_ids: compartment.PatientIds,
    path: str,
    must_exist: str | None = None,
) -> FhirResponse:
    """The page of the member set; ``must_exist`` names a Patient that must be live (404/410)."""
    ctx = router.ctx
    types, since, count, offset = _params(router, request)
    conditions: list[sa.ColumnElement[bool]] = [
        resource.c.pid.in_(everything_pids(ctx.registry, patient_ids)),
        resource.c.deleted.is_(False),
    ]
    visible = visible_clause(resource)
    if visible is not None:
        conditions.append(visible)
    if types is not None:
        conditions.append(resource.c.res_type.in_(types))
    else:
        conditions.append(resource.c.res_type.not_in(sorted(AUDIT_TRAIL_TYPES)))
    if since is not None:
        conditions.append(resource.c.last_updated >= since)
    with ctx.store.read() as conn:
        if must_exist is not None:
            ctx.store.get(conn, "Patient", must_exist)
        total, matches = _page(conn, conditions, count, offset)
    kept = [(k, v) for k, v in request.query if k in ("_type", "_since")]
    has_more = count > 0 and offset + count < total
    base = link_base(ctx, request)
    links = bundles.paging_links(base, path, kept, offset, count, has_more)
    return FhirResponse(200, bundles.searchset(base, matches, total, links))


def _page(
    conn: sa.Connection, conditions: list[sa.ColumnElement[bool]], count: int, offset: int
) -> tuple[int, list[tuple[str, str, bytes]]]:
    """The total and one page of matches.

    The member set is computed once: a narrow query orders it and counts it (window
    function) and returns the page's pids; only those rows' JSON is then read.
    """
    page = conn.execute(
        sa.select(resource.c.pid, sa.func.count().over().label("total"))
        .where(*conditions)
        .order_by(_PATIENTS_FIRST, resource.c.res_type, resource.c.pid)
        .limit(count)
        .offset(offset)
    ).all()
    if not page:  # _count=0 or past the end: the window saw no row, so count apart
        total = conn.execute(sa.select(sa.func.count()).select_from(resource).where(*conditions)).scalar_one()
        return total, []
    pids = [row.pid for row in page]
    report(pids)
    rows = conn.execute(
        sa.select(resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.content).where(
            pid_in(conn, resource.c.pid, pids)  # one array parameter on PostgreSQL
        )
    )
    by_pid = {
        r.pid: (r.res_type, r.res_id, open_content(_bytes(r.content), r.res_type, r.res_id))
        for r in rows
        if r.content is not None  # deleted by a commit between the two statements
    }
    return page[0].total, [by_pid[pid] for pid in pids if pid in by_pid]


def _bytes(content: str | bytes) -> bytes:
    return content if isinstance(content, bytes) else content.encode()


def patient_everything(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    if extra or res_id is None:
        raise not_found(f"No FHIR interaction at '{request.path}'")
    return _everything(router, request, [res_id], f"Patient/{res_id}/$everything", must_exist=res_id)


def all_patients_everything(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    if extra:
        raise not_found(f"No FHIR interaction at '{request.path}'")
    return _everything(router, request, compartment.all_patient_ids(), "Patient/$everything")
