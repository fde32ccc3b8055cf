"""Break-glass: emergency access a clinician opens by stating a reason.

Owns: which patients a break-glass request is about, opening the time-limited grant
(a ``break_glass`` row, which is also the alert, plus an ``access_grant`` row with pid =
-id so no resource write removes it), listing alerts for the people who must see them
(the patient, the clinician's facility admins, auditors) and recording their review.
Calls: the schema.  Called by: the router (opening), the web adapter (alerts).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from consent import labels
from hub.auth.principal import Principal, Role
from hub.db.schema import access_grant, break_glass, compartment, resource
from hub.errors import FhirError, Issue

HEADER = "x-break-glass-reason"
# Patient-pointing search parameters a break-glass search may name its patient with.
_PATIENT_PARAMS = ("patient", "subject", "subject:Patient", "beneficiary", "_id")


def _bad(message: str) -> FhirError:
    return FhirError(400, [Issue("invalid", message)])


def patients_of_request(conn: sa.Connection, path: str, query: list[tuple[str, str]]) -> list[str]:
    """The patients a request is about: ``Patient/{id}...``, ``?patient=``/``?subject=``, or
    the compartment of ``Type/{id}``. Break-glass opens access to these only."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "Patient":
        return [parts[1]] if len(parts[1]) <= 64 else []  # no FHIR id is longer
    found = []
    for key, value in query:
        if key in _PATIENT_PARAMS and (key != "_id" or parts[:1] == ["Patient"]):
            for item in value.split(","):
                ref = item.strip().rstrip("/")
                if (ref.startswith("Patient/") or "/" not in ref) and len(ref.split("/")[-1]) <= 64:
                    found.append(ref.split("/")[-1])
    if found:
        return list(dict.fromkeys(found))
    if len(parts) >= 2 and not parts[1].startswith(("$", "_")):
        rows = conn.execute(
            sa.select(compartment.c.patient_id)
            .join(resource, resource.c.pid == compartment.c.pid)
            .where(resource.c.res_type == parts[0], resource.c.res_id == parts[1])
            .distinct()
        ).all()
        return [r[0] for r in rows]
    return []


def open_access(
    conn: sa.Connection, principal: Principal, patients: list[str], reason: str, minutes: int
) -> list[int]:
    """Open (or reuse, while still open) break-glass access to each patient; the ids."""
    if principal.role != Role.CLINICIAN or not principal.fhir_user:
        raise FhirError(403, [Issue("forbidden", "Only clinicians can break the glass")])
    reason = reason.strip()
    if len(reason) < 5:
        raise _bad("Break-glass needs a stated reason (X-Break-Glass-Reason), at least 5 characters")
    if not patients:
        raise _bad(
            "Break-glass needs a patient: read Patient/{id}, Patient/{id}/$everything, a resource"
            " of that patient, or search with patient=/subject="
        )
    started = datetime.now(UTC)
    expires = started + timedelta(minutes=minutes)
    ids = []
    for patient in patients:
        existing = conn.execute(
            sa.select(break_glass.c.id).where(
                break_glass.c.fhir_user == principal.fhir_user,
                break_glass.c.patient_id == patient,
                break_glass.c.expires > started,
            )
        ).first()
        if existing is not None:
            ids.append(existing[0])
            continue
        new_id = conn.execute(
            break_glass.insert().values(
                subject=principal.subject,
                fhir_user=principal.fhir_user,
                organizations=list(principal.organizations),
                patient_id=patient,
                reason=reason,
                started=started,
                expires=expires,
            )
        ).inserted_primary_key[0]
        conn.execute(
            access_grant.insert().values(
                pid=-new_id,
                patient_id=patient,
                grantee=principal.fhir_user,
                purpose="*",
                effect="permit",
                labels=labels.NORMAL | labels.SENSITIVE,
                basis="break-glass",
                starts=int(started.timestamp()),
                ends=int(expires.timestamp()),
            )
        )
        ids.append(new_id)
    return ids


@dataclass(frozen=True)
class Alert:
    id: int
    subject: str
    fhir_user: str
    organizations: list[str]
    patient: str
    reason: str
    started: datetime
    expires: datetime
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None

    def as_json(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            if moment is None:
                return None
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()

        return {
            "id": self.id,
            "clinician": self.fhir_user,
            "user": self.subject,
            "organizations": self.organizations,
            "patient": f"Patient/{self.patient}",
            "reason": self.reason,
            "started": iso(self.started),
            "expires": iso(self.expires),
            "status": "reviewed" if self.reviewed_at else "open",
            "reviewedAt": iso(self.reviewed_at),
            "reviewedBy": self.reviewed_by,
            "reviewNote": self.review_note,
        }


def _alert(row: Any) -> Alert:
    return Alert(
        row.id, row.subject, row.fhir_user, list(row.organizations or []), row.patient_id, row.reason,
        row.started, row.expires, row.reviewed_at, row.reviewed_by, row.review_note,
    )  # fmt: skip


def _who_sees(principal: Principal) -> sa.ColumnElement[bool] | None:
    """Which alerts a principal may list: None = all (auditor, hub admin)."""
    if principal.role in (Role.AUDITOR, Role.ADMIN):
        return None
    if principal.role == Role.PATIENT and principal.fhir_user_type == "Patient":
        return break_glass.c.patient_id == principal.fhir_user_id
    if principal.role == Role.FACILITY_ADMIN and principal.organizations:
        # organizations is a JSON list; match each of the admin's organizations textually.
        text = sa.cast(break_glass.c.organizations, sa.Text)
        return sa.or_(*(text.contains(f'"{org}"') for org in principal.organizations))
    if principal.role == Role.CLINICIAN and principal.fhir_user:
        return break_glass.c.fhir_user == principal.fhir_user
    raise FhirError(403, [Issue("forbidden", "Your role does not see break-glass alerts")])


def list_alerts(conn: sa.Connection, principal: Principal, *, open_only: bool = False) -> list[Alert]:
    query = sa.select(break_glass).order_by(break_glass.c.id.desc())
    condition = _who_sees(principal)
    if condition is not None:
        query = query.where(condition)
    if open_only:
        query = query.where(break_glass.c.reviewed_at.is_(None))
    return [_alert(r) for r in conn.execute(query)]


def review(conn: sa.Connection, principal: Principal, alert_id: int, note: str) -> Alert:
    """A facility admin (of the clinician's organization), auditor or hub admin reviews."""
    if principal.role not in (Role.FACILITY_ADMIN, Role.AUDITOR, Role.ADMIN):
        raise FhirError(403, [Issue("forbidden", "Only facility admins and auditors review break-glass")])
    visible = [a for a in list_alerts(conn, principal) if a.id == alert_id]
    if not visible:
        raise FhirError(404, [Issue("not-found", f"No break-glass alert {alert_id}")])
    conn.execute(
        break_glass.update()
        .where(break_glass.c.id == alert_id)
        .values(reviewed_at=datetime.now(UTC), reviewed_by=principal.subject, review_note=note)
    )
    return next(a for a in list_alerts(conn, principal) if a.id == alert_id)
