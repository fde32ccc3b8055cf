"""Who may write which Consent: consent cannot be granted by the people it protects against.

Owns: the strict validation of a Consent's codes (``status``, ``provision.type`` at every
level, a literal ``patient`` and actor references), the write rules per role (below and
in docs/access.md, "Who may write consent"), and the consent alerts (``consent_alert``):
every Consent written, changed or deleted by someone other than its patient is recorded
there for the patient, their facility's admins and auditors to see.

The rules compare the grants a write makes (``consent.derive.grant_rows`` of the new
version) with those of the version it replaces (its ``access_grant`` rows):

- a patient writes Consents for themselves only;
- a proxy (RelatedPerson) may add denies and grant or withdraw permits of NORMAL data only:
  no permit of a sensitive class that the replaced version did not already hold, and no
  write (status no longer active, delete, an update that drops or narrows it) that leaves a
  sensitive permit of the replaced version uncovered;
- a clinician records a patient's signed consent only with its evidence
  (``sourceAttachment`` or ``sourceReference``) and a witnessing staff member (extension
  ``WITNESS_EXTENSION``, a Practitioner or PractitionerRole other than themselves), and
  never one that newly permits a sensitive class to themselves: their Practitioner, a
  PractitionerRole of theirs or of their organizations, their organizations, a care team
  they are (or were) on, or anyone (no actor);
- a deny in force is removed or weakened (delete, status no longer active, an update that
  drops or narrows it) only by the patient, or by a hub admin stating ``X-Access-Reason``
  (kept in the alert), or by the hub's own named system access (CLI);
- integration services may import Consents: validated and alerted like everyone else.

Also owns the rule that a facility admin creates, changes and deletes only their own
facilities' directory entries (``check_directory_stored``/``check_directory_new``, see
docs/access.md §1), and which Consents a reader could read in every version
(``readable_consents``: the consent alerts a proxy is shown).
Calls: consent.derive (grant rows, references), consent.labels, consent.decision (the care
teams of a principal, role ceilings), hub.store.reader (stored directory entries), the schema.
Called by: consent.context's write hooks (the store, on every create/update/delete),
hub.api.access_routes (``GET /access/consent-alerts``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from consent import labels
from consent.decision import care_teams_of
from consent.derive import ANY, GrantRow, _ref, grant_rows
from hub.auth.principal import Principal, Role
from hub.db.schema import access_grant, compartment, consent_alert, idx_reference, resource
from hub.errors import FhirError, Issue

if TYPE_CHECKING:
    from consent.decision import Access

STATUSES = frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"})
PROVISION_TYPES = frozenset({"permit", "deny"})
WITNESS_EXTENSION = "https://ehealth-hub.vn/fhir/StructureDefinition/consent-witness"
_WITNESS_TYPES = ("Practitioner", "PractitionerRole")
_SYSTEM_PREFIX = "system:"
_FAR = 2**62


def _unprocessable(message: str, expression: str) -> FhirError:
    return FhirError(422, [Issue("code-invalid", message, expression=(expression,))])


def _forbidden(message: str) -> FhirError:
    return FhirError(403, [Issue("forbidden", message)])


# --- validation (every writer) ---------------------------------------------------------------


def validate(body: dict[str, Any]) -> None:
    """422 unless the Consent's codes are ones the access layer acts on exactly: a deny
    written ``"Deny"`` or a status it does not know must never be stored and ignored."""
    status = body.get("status")
    if status not in STATUSES:
        raise _unprocessable(
            f"Consent.status must be one of {', '.join(sorted(STATUSES))}, not {status!r}", "Consent.status"
        )
    patient = _ref(body.get("patient"))
    if patient is None or not patient.startswith("Patient/"):
        raise _unprocessable(
            "Consent.patient must be a literal reference to a Patient (Patient/{id})", "Consent.patient"
        )
    provision = body.get("provision")
    if provision is not None:
        _validate_provision(provision, "Consent.provision")


def _validate_provision(provision: Any, where: str) -> None:
    if not isinstance(provision, dict):
        raise _unprocessable("A Consent provision must be an object", where)
    kind = provision.get("type")
    if kind is not None and kind not in PROVISION_TYPES:
        raise _unprocessable(f"provision.type must be 'permit' or 'deny', not {kind!r}", f"{where}.type")
    actors = provision.get("actor", [])
    if not isinstance(actors, list):
        raise _unprocessable("provision.actor must be a list", f"{where}.actor")
    for index, actor in enumerate(actors):
        reference = actor.get("reference") if isinstance(actor, dict) else None
        if _ref(reference) is None:
            # Unresolvable, a permit would silently apply to anyone and a deny to no one named.
            raise _unprocessable(
                "provision.actor.reference must be a literal reference (Type/id)",
                f"{where}.actor[{index}].reference",
            )
    children = provision.get("provision", [])
    if not isinstance(children, list):
        raise _unprocessable("Nested provisions must be a list", f"{where}.provision")
    for index, child in enumerate(children):
        _validate_provision(child, f"{where}.provision[{index}]")


# --- grants compared -------------------------------------------------------------------------


def _covers(wide: GrantRow, narrow: GrantRow) -> bool:
    """Whether grant ``wide`` (same effect) says at least what ``narrow`` says: same
    patient, the same grantee or anyone, the same purpose or any, every label, the whole period."""
    return (
        wide[0] == narrow[0]
        and wide[1] in (narrow[1], ANY)
        and wide[2] in (narrow[2], ANY)
        and wide[4] & narrow[4] == narrow[4]
        and (wide[6] if wide[6] is not None else -_FAR) <= (narrow[6] if narrow[6] is not None else -_FAR)
        and (wide[7] if wide[7] is not None else _FAR) >= (narrow[7] if narrow[7] is not None else _FAR)
    )


def _uncovered(grants: Iterable[GrantRow], by: list[GrantRow]) -> list[GrantRow]:
    return [g for g in grants if not any(_covers(w, g) for w in by)]


def _of(grants: Iterable[GrantRow], effect: str) -> list[GrantRow]:
    return [g for g in grants if g[3] == effect and g[5] == "consent"]


def _old_grants(conn: sa.Connection, pid: int | None) -> list[GrantRow]:
    if pid is None:
        return []
    g = access_grant
    rows = conn.execute(
        sa.select(
            g.c.patient_id, g.c.grantee, g.c.purpose, g.c.effect, g.c.labels, g.c.basis, g.c.starts, g.c.ends
        ).where(g.c.pid == pid, g.c.basis == "consent")
    ).all()
    return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]


def _describe(grants: Iterable[GrantRow], what: str) -> list[str]:
    return [f"{what} {','.join(labels.names(g[4]))} to {g[1]} for {g[2]}" for g in grants]


# --- the write rules -------------------------------------------------------------------------


def check_write(
    conn: sa.Connection,
    access: Access,
    body: dict[str, Any],
    replaced_pid: int | None,
    new_grants: list[GrantRow] | None = None,
) -> None:
    """422 unless its codes are valid; 403 unless the principal may write this version of a
    Consent (over ``replaced_pid``, None for a create). Records the alert when it is not the
    patient's own write."""
    validate(body)  # conditional references are resolved by now
    principal = access.principal
    if new_grants is None:
        new_grants = grant_rows("Consent", str(body.get("id", "")), body)
    old = _old_grants(conn, replaced_pid)
    patient = (_ref(body.get("patient")) or "/").split("/", 1)[1]
    role = principal.role
    witness: str | None = None
    if role == Role.PATIENT and not _is_patient(principal, patient):
        raise _forbidden("A patient writes Consents for themselves only")
    if replaced_pid is not None and role == Role.PATIENT:
        earlier = {g[0] for g in old}
        if earlier - {principal.fhir_user_id}:
            raise _forbidden("A patient changes their own Consents only")
    new_permits = _uncovered(_of(new_grants, "permit"), _of(old, "permit"))
    sensitive = [g for g in new_permits if g[4] & labels.SENSITIVE]
    if role == Role.PROXY and sensitive:
        raise _forbidden(
            "A proxy may grant access to ordinary data only: sensitive categories"
            f" ({_sensitive_names(sensitive)}) need the patient's own consent"
        )
    if role == Role.PROXY:
        _proxy_keeps_sensitive_permits(old, _of(new_grants, "permit"))
    if role == Role.CLINICIAN:
        witness = _evidence(conn, principal, body)
        selves = _selves(conn, access)
        to_self = [g for g in sensitive if g[1] in selves]
        if to_self:
            raise _forbidden(
                "A clinician may not record a Consent that grants sensitive categories to"
                f" themselves, their organization, role or care team, or to anyone ({to_self[0][1]})"
            )
    removed = _uncovered(_of(old, "deny"), _of(new_grants, "deny"))
    _may_remove_denies(access, removed)
    if _is_patient(principal, patient):
        return
    detail = (
        _describe(sensitive, "permits")
        + _describe([g for g in new_permits if not g[4] & labels.SENSITIVE], "permits")
        + _describe(removed, "removes deny of")
        + _describe(_uncovered(_of(new_grants, "deny"), _of(old, "deny")), "denies")
    )
    patients = [patient, *(g[0] for g in old)]
    _alert(
        conn,
        access,
        str(body.get("id", "")),
        patients,
        "update" if replaced_pid else "create",
        witness,
        detail,
    )


def check_delete(conn: sa.Connection, access: Access, pid: int) -> None:
    """403 unless the principal may delete this Consent (a deny in force: the patient only)."""
    principal = access.principal
    old = _old_grants(conn, pid)
    patients = [g[0] for g in old] or [
        r[0]
        for r in conn.execute(sa.select(compartment.c.patient_id).where(compartment.c.pid == pid))
        if r[0]
    ]
    if principal.role == Role.PATIENT and set(patients) - {principal.fhir_user_id}:
        raise _forbidden("A patient deletes their own Consents only")
    if principal.role == Role.PROXY:
        _proxy_keeps_sensitive_permits(old, [])
    removed = _of(old, "deny")
    _may_remove_denies(access, removed)
    if patients and all(_is_patient(principal, p) for p in patients):
        return
    res_id = conn.execute(sa.select(resource.c.res_id).where(resource.c.pid == pid)).scalar_one_or_none()
    detail = _describe(removed, "removes deny of") + _describe(_of(old, "permit"), "withdraws permit of")
    _alert(conn, access, str(res_id or ""), patients, "delete", None, detail)


def _sensitive_names(grants: Iterable[GrantRow]) -> str:
    return ", ".join(sorted({n for g in grants for n in labels.names(g[4] & labels.SENSITIVE)}))


def _proxy_keeps_sensitive_permits(old: list[GrantRow], new_permits: list[GrantRow]) -> None:
    """403 when a proxy's write withdraws or narrows what a permit of a sensitive class said:
    the patient alone decides who sees those classes, both ways. Only the sensitive part of
    each old permit must stay covered; its NORMAL part the proxy may withdraw."""
    held = [(g[0], g[1], g[2], g[3], g[4] & labels.SENSITIVE, *g[5:]) for g in _of(old, "permit")]
    dropped = _uncovered([g for g in held if g[4]], new_permits)
    if dropped:
        raise _forbidden(
            "A proxy may withdraw access to ordinary data only: a permit of sensitive categories"
            f" ({_sensitive_names(dropped)}) is withdrawn or narrowed by the patient alone"
        )


def _is_patient(principal: Principal, patient: str) -> bool:
    return principal.role == Role.PATIENT and principal.fhir_user == f"Patient/{patient}"


def _may_remove_denies(access: Access, removed: list[GrantRow]) -> None:
    if not removed:
        return
    principal = access.principal
    if principal.role == Role.PATIENT and all(_is_patient(principal, g[0]) for g in removed):
        return
    if principal.role == Role.ADMIN:
        if principal.subject.startswith(_SYSTEM_PREFIX) or stated_reason(access):
            return
        raise _forbidden(
            "Removing or weakening a patient's deny needs a stated reason (X-Access-Reason header),"
            " recorded in the patient's consent alerts"
        )
    raise _forbidden(
        "Only the patient may remove or weaken their deny"
        f" ({', '.join(labels.names(removed[0][4]))} to {removed[0][1]})"
    )


def stated_reason(access: Access) -> str | None:
    """The request's X-Access-Reason (set on the Access by the gate), trimmed; None if absent."""
    reason = getattr(access, "reason", None)
    return reason.strip() or None if isinstance(reason, str) else None


def _evidence(conn: sa.Connection, principal: Principal, body: dict[str, Any]) -> str:
    """A clinician's Consent carries its evidence and a witness; the witness reference."""
    source = body.get("sourceAttachment") or _ref(body.get("sourceReference"))
    if not source:
        raise _forbidden(
            "A clinician records a patient's consent with its evidence: sourceAttachment (the signed"
            " form) or sourceReference"
        )
    witnesses = [
        r
        for e in body.get("extension", ())
        if isinstance(e, dict) and e.get("url") == WITNESS_EXTENSION
        if (r := _ref(e.get("valueReference")))
    ]
    witness = next(
        (w for w in witnesses if w.split("/")[0] in _WITNESS_TYPES and w != principal.fhir_user), None
    )
    if witness is None:
        raise _forbidden(
            f"A clinician records a patient's consent with a witnessing staff member: extension {WITNESS_EXTENSION}"
            " with valueReference to a Practitioner or PractitionerRole other than the recorder"
        )
    res_type, res_id = witness.split("/", 1)
    exists = conn.execute(
        sa.select(resource.c.pid).where(
            resource.c.res_type == res_type, resource.c.res_id == res_id, resource.c.deleted.is_(False)
        )
    ).first()
    if exists is None:
        raise _forbidden(f"The witness {witness} is not known to the hub")
    return witness


def _selves(conn: sa.Connection, access: Access) -> set[str]:
    """Every grantee through which a grant would reach this clinician."""
    principal = access.principal
    selves = {ANY, *access.identities, *(f"Organization/{o}" for o in principal.organizations)}
    if not principal.fhir_user:
        return selves
    selves.add(principal.fhir_user)
    selves |= set(care_teams_of(conn, principal.fhir_user, None))  # on, were or will be: any period
    mine = [
        sa.and_(
            idx_reference.c.target_type == "Practitioner", idx_reference.c.target_id == principal.fhir_user_id
        )
    ]
    if principal.organizations:
        mine.append(
            sa.and_(
                idx_reference.c.target_type == "Organization",
                idx_reference.c.target_id.in_(list(principal.organizations)),
            )
        )
    roles = conn.execute(
        sa.select(resource.c.res_id)
        .join(idx_reference, idx_reference.c.pid == resource.c.pid)
        .where(resource.c.res_type == "PractitionerRole", sa.or_(*mine))
        .distinct()
    ).all()
    selves |= {f"PractitionerRole/{r[0]}" for r in roles}
    return selves


# --- alerts ------------------------------------------------------------------------------------


def _alert(
    conn: sa.Connection,
    access: Access,
    consent_id: str,
    patients: list[str],
    action: str,
    witness: str | None,
    detail: list[str],
) -> None:
    principal = access.principal
    moment = datetime.now(UTC)
    rows = [
        {
            "consent_id": consent_id[:64],
            "patient_id": patient,
            "action": action,
            "subject": principal.subject[:200],
            "fhir_user": principal.fhir_user,
            "role": principal.role.value,
            "organizations": list(principal.organizations),
            "witness": witness,
            "reason": stated_reason(access),
            "detail": "; ".join(detail) or "no change to who may see what",
            "at": moment,
        }
        for patient in dict.fromkeys(p for p in patients if p)
    ]
    if rows:
        conn.execute(consent_alert.insert(), rows)


def list_alerts(
    conn: sa.Connection, principal: Principal, proxied: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Consent alerts the principal may see: a patient their own, a proxy those of the
    patients they represent (``proxied``), a facility admin those recorded by staff of their
    organizations, a clinician those they recorded, auditors and hub admins all."""
    a = consent_alert
    query = sa.select(a).order_by(a.c.id.desc())
    role = principal.role
    if role in (Role.AUDITOR, Role.ADMIN):
        pass
    elif role == Role.PATIENT and principal.fhir_user_type == "Patient":
        query = query.where(a.c.patient_id == principal.fhir_user_id)
    elif role == Role.PROXY:
        query = query.where(a.c.patient_id.in_([p for p in proxied if p]))
    elif role == Role.FACILITY_ADMIN and principal.organizations:
        text = sa.cast(a.c.organizations, sa.Text)
        query = query.where(sa.or_(*(text.contains(f'"{org}"') for org in principal.organizations)))
    elif role == Role.CLINICIAN and principal.fhir_user:
        query = query.where(a.c.fhir_user == principal.fhir_user)
    else:
        raise _forbidden("Your role does not see consent alerts")

    def iso(moment: datetime) -> str:
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()

    return [
        {
            "id": r.id,
            "consent": f"Consent/{r.consent_id}",
            "patient": f"Patient/{r.patient_id}",
            "action": r.action,
            "recordedBy": r.fhir_user or r.subject,
            "user": r.subject,
            "role": r.role,
            "organizations": list(r.organizations or []),
            "witness": r.witness,
            "reason": r.reason,
            "detail": r.detail,
            "at": iso(r.at),
        }
        for r in conn.execute(query)
    ]


def readable_consents(conn: sa.Connection, access: Access, consent_ids: Iterable[str]) -> set[str]:
    """The ids among ``consent_ids`` of Consents ``access`` could read in every version that
    had content (the current one and those in history): an alert describes what a version
    granted ("permits PSY to ..."), and a deleted Consent has no current version to go by.
    A Consent naming a sensitive class carries it (consent.labels), so a proxy or an
    ordinary-grant reader does not get it here; an unknown id is not readable."""
    from hub.db.schema import resource_history

    wanted = sorted({c for c in consent_ids if c})
    if not wanted:
        return set()
    found: dict[str, list[bool]] = {}
    r, h = resource, resource_history
    for start in range(0, len(wanted), 400):  # under SQLite's bound-parameter limit
        chunk = wanted[start : start + 400]
        current_visible = access.visible(r)
        current = sa.select(
            r.c.res_id, (current_visible if current_visible is not None else sa.true()).label("ok")
        ).where(r.c.res_type == "Consent", r.c.res_id.in_(chunk), r.c.deleted.is_(False))
        history_visible = access.visible(h)
        past = sa.select(
            h.c.res_id, (history_visible if history_visible is not None else sa.true()).label("ok")
        ).where(h.c.res_type == "Consent", h.c.res_id.in_(chunk), h.c.content.is_not(None))
        for query in (current, past):
            for res_id, ok in conn.execute(query):
                found.setdefault(str(res_id), []).append(bool(ok))
    return {res_id for res_id, seen in found.items() if seen and all(seen)}


# --- directory writes by facility admins ---------------------------------------------------------

# How far up an Organization's partOf chain (or into a Schedule's actors) ownership is
# followed: a facility's tree is a few levels deep; a longer (or cyclic) chain is not theirs.
_MAX_PART_OF_DEPTH = 8
# The element of each directory type that says which organization it belongs to.
_ORGANIZATION_ELEMENT = {
    "PractitionerRole": "organization",
    "Location": "managingOrganization",
    "HealthcareService": "providedBy",
    "Endpoint": "managingOrganization",
}
_SCHEDULE_ACTORS = ("PractitionerRole", "Location", "HealthcareService", "Practitioner")


def restricts_directory(access: Access, res_type: str) -> bool:
    """Whether ``check_directory_*`` applies: a facility admin or a clinician writing a
    directory resource. Clinicians too: a clinician who could move another facility's
    PractitionerRole to their own organization would take over whatever names that role
    (hub admins and integration services write any facility's directory)."""
    from consent.decision import ROLE_TYPES

    role = access.principal.role
    directory = ROLE_TYPES.get(Role.FACILITY_ADMIN)
    return role in (Role.FACILITY_ADMIN, Role.CLINICIAN) and directory is not None and res_type in directory


def check_directory_stored(conn: sa.Connection, access: Access, res_type: str, pid: int) -> None:
    """403 unless the stored version a facility admin changes or deletes is their facilities'."""
    row = conn.execute(sa.select(resource.c.res_id, resource.c.deleted).where(resource.c.pid == pid)).first()
    if row is None:
        return
    if row.deleted:
        # Restoring a deleted entry is choosing an id whose last owner the admin cannot show.
        raise _forbidden(f"{res_type}/{row.res_id} was deleted: a hub admin restores it")
    owner = _Ownership(conn, access.principal.organizations, access.directory_written)
    why = owner.refusal(res_type, str(row.res_id), owner.body(res_type, str(row.res_id)), stored=True)
    if why:
        raise _forbidden(
            f"A facility admin or clinician changes or deletes their own facilities' directory only: {why}"
        )


def check_directory_new(conn: sa.Connection, access: Access, res_type: str, body: dict[str, Any]) -> None:
    """403 unless the version a facility admin writes (create or update) is their facilities'."""
    owner = _Ownership(conn, access.principal.organizations, access.directory_written)
    res_id = str(body.get("id", ""))
    why = owner.refusal(res_type, res_id, body, stored=False)
    if why:
        raise _forbidden(f"A facility admin or clinician writes their own facilities' directory only: {why}")
    if res_id:
        access.directory_written[(res_type, res_id)] = body


def _local(reference: Any, res_type: str) -> str | None:
    """The id of a literal relative reference ``res_type/id`` (or ``.../_history/n``); None
    for any other form (absolute, conditional, contained): such a reference is never theirs."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str):
        return None
    parts = ref.split("/")
    if parts[0] != res_type or len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "_history"):
        return None
    return parts[1] or None


class _Ownership:
    """Whether directory resources belong to a facility admin's organizations (or to
    organizations part of theirs), reading the stored versions they reference."""

    def __init__(
        self,
        conn: sa.Connection,
        organizations: Iterable[str],
        written: dict[tuple[str, str], dict[str, Any]] | None = None,
    ) -> None:
        self.conn = conn
        self.organizations = frozenset(organizations)
        # Versions this request already wrote (and were found theirs), maybe not inserted yet.
        self._bodies: dict[tuple[str, str], dict[str, Any] | None] = dict(written or {})

    def body(self, res_type: str, res_id: str) -> dict[str, Any] | None:
        key = (res_type, res_id)
        if key not in self._bodies:
            from hub.store import reader  # the store imports this package's users

            row = reader.current_row(self.conn, res_type, res_id)
            stored = reader.to_stored(row) if row is not None else None
            self._bodies[key] = stored.parsed() if stored is not None and not stored.deleted else None
        return self._bodies[key]

    def organization(self, org_id: str | None, depth: int = 0) -> bool:
        """One of theirs, or (stored) part of one of theirs, up the partOf chain."""
        if org_id is None or depth > _MAX_PART_OF_DEPTH:
            return False
        if org_id in self.organizations:
            return True
        body = self.body("Organization", org_id)
        return body is not None and self.organization(_local(body.get("partOf"), "Organization"), depth + 1)

    def practitioner(self, practitioner_id: str) -> bool:
        """Every PractitionerRole naming this Practitioner (at least one) is at theirs."""
        roles = self.conn.execute(
            sa.select(resource.c.res_id)
            .join(idx_reference, idx_reference.c.pid == resource.c.pid)
            .where(
                resource.c.res_type == "PractitionerRole",
                resource.c.deleted.is_(False),
                idx_reference.c.target_type == "Practitioner",
                idx_reference.c.target_id == practitioner_id,
            )
            .distinct()
        ).all()
        return bool(roles) and all(self.owned("PractitionerRole", str(r[0])) for r in roles)

    def owned(self, res_type: str, res_id: str) -> bool:
        """A stored directory resource of theirs."""
        if res_type == "Practitioner":
            return self.practitioner(res_id)
        body = self.body(res_type, res_id)
        return body is not None and not self.refusal(res_type, res_id, body, stored=True)

    def refusal(self, res_type: str, res_id: str, body: dict[str, Any] | None, *, stored: bool) -> str | None:
        """Why this version is not theirs (None: it is)."""
        name = f"{res_type}/{res_id}" if res_id else f"the new {res_type}"
        if body is None:
            return f"{name} is not known"
        if res_type == "Organization":
            if res_id in self.organizations or self.organization(_local(body.get("partOf"), "Organization")):
                return None
            return f"{name} is neither one of your organizations nor part of one"
        if res_type in _ORGANIZATION_ELEMENT:
            element = _ORGANIZATION_ELEMENT[res_type]
            if self.organization(_local(body.get(element), "Organization")):
                return None
            return f"{name}.{element} is not one of your organizations"
        if res_type == "Practitioner":
            # A new person has no roles yet; an existing one is theirs when all their roles are.
            if not stored or self.practitioner(res_id):
                return None
            return f"{name} holds a PractitionerRole outside your organizations (or none)"
        if res_type == "Schedule":
            actors = body.get("actor")
            refs = [
                (kind, ident)
                for actor in (actors if isinstance(actors, list) else [])
                for kind in _SCHEDULE_ACTORS
                if (ident := _local(actor, kind))
            ]
            if refs and len(refs) == len(actors or []) and all(self.owned(k, i) for k, i in refs):
                return None
            return f"{name}.actor is not a PractitionerRole, Location or HealthcareService of yours"
        if res_type == "Slot":
            schedule = _local(body.get("schedule"), "Schedule")
            if schedule is not None and self.owned("Schedule", schedule):
                return None
            return f"{name}.schedule is not a Schedule of yours"
        return f"{res_type} is not a directory type"
