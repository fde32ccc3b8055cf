"""Break-glass: emergency access a clinician opens by stating a reason.

Owns: which patient a break-glass request is about (exactly one, and one that exists),
opening the time-limited grant (a ``break_glass`` row, which is also the alert, plus an
``access_grant`` row with pid = -id so no resource write removes it), listing alerts for
the people who must see them (the patient, the clinician's facility admins, auditors) and
appending their reviews (``break_glass_review``: every review is kept, none overwritten;
an alert's status is derived from them).
Calls: the schema.  Called by: the access gate (opening), the web adapter (alerts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from consent import labels
from hub.auth.principal import Principal, Role
from hub.db.schema import access_grant, break_glass, break_glass_review, compartment, resource
from hub.errors import FhirError, Issue

HEADER = "x-break-glass-reason"
VERDICTS = ("justified", "not-justified")
# Search parameters whose value names the patient a request is about (a break-glass search
# names its patient with one of them, bare or with ``:Patient``; ``_id`` on Patient too). The
# one list: the gate's "me" parameters (``hub.rest.gate``) are these and the person ones.
PATIENT_PARAMS = frozenset({"patient", "subject", "beneficiary"})
_MAX_ID = 64  # no FHIR id is longer


def _bad(message: str) -> FhirError:
    return FhirError(400, [Issue("invalid", message)])


def patients_of_request(
    conn: sa.Connection, res_type: str | None, res_id: str | None, query: list[tuple[str, str]]
) -> list[str]:
    """The patient a request is about: ``Patient/{id}...``, ``?patient=``/``?subject=``, or
    the compartment of ``Type/{id}``; at most one. ``res_type`` and ``res_id`` are those
    of the request's parsed target (``hub.rest.target``). Break-glass opens access to that
    one record only: a request naming several patients is refused (400), so one request can
    never open many records."""
    found: list[str] = []
    if res_type == "Patient" and res_id is not None:
        found.append(res_id)
    for key, value in query:
        name, _, modifier = key.partition(":")
        names_patient = name in PATIENT_PARAMS and modifier in ("", "Patient")
        if names_patient or (key == "_id" and res_type == "Patient"):
            for item in value.split(","):
                ref = item.strip().rstrip("/")
                if ref and (ref.startswith("Patient/") or "/" not in ref):
                    found.append(ref.split("/")[-1])
    found = [p for p in found if len(p) <= _MAX_ID]  # no FHIR id is longer: no such patient
    if not found and res_type is not None and res_id is not None:
        rows = conn.execute(
            sa.select(compartment.c.patient_id)
            .join(resource, resource.c.pid == compartment.c.pid)
            .where(resource.c.res_type == res_type, resource.c.res_id == res_id[:_MAX_ID])
            .distinct()
        ).all()
        found = [r[0] for r in rows if r[0]]  # "": a resource of no resolvable patient
    patients = list(dict.fromkeys(p for p in found if p))
    if len(patients) > 1:
        raise _bad(
            f"Break-glass opens one patient's record per request: this request names {len(patients)} patients"
        )
    return patients


def _patient_exists(conn: sa.Connection, patient: str) -> bool:
    return (
        conn.execute(
            sa.select(resource.c.pid).where(
                resource.c.res_type == "Patient",
                resource.c.res_id == patient,
                resource.c.deleted.is_(False),
            )
        ).first()
        is not None
    )


def open_access(
    conn: sa.Connection, principal: Principal, patients: list[str], reason: str, minutes: int
) -> list[int]:
    """Open break-glass access to the one patient of the request; its alert id (in a list).

    An open alert is reused only while it is unexpired and nobody has reviewed it yet: a
    break-glass after a review is a new emergency, with a new alert to review."""
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
    if len(patients) > 1:
        raise _bad("Break-glass opens one patient's record per request")
    (patient,) = patients
    if not _patient_exists(conn, patient):
        raise FhirError(404, [Issue("not-found", f"Break-glass: no such patient Patient/{patient}")])
    started = datetime.now(UTC)
    expires = started + timedelta(minutes=minutes)
    reviewed = sa.exists().where(break_glass_review.c.alert_id == break_glass.c.id)
    existing = conn.execute(
        sa.select(break_glass.c.id)
        .where(
            break_glass.c.fhir_user == principal.fhir_user,
            break_glass.c.patient_id == patient,
            break_glass.c.expires > started,
            ~reviewed,
        )
        .order_by(break_glass.c.id.desc())
    ).first()
    if existing is not None:
        return [int(existing[0])]
    inserted = conn.execute(
        break_glass.insert().values(
            subject=principal.subject,
            fhir_user=principal.fhir_user,
            organizations=list(principal.organizations),
            patient_id=patient,
            reason=reason,
            started=started,
            expires=expires,
        )
    ).inserted_primary_key
    assert inserted is not None
    new_id = int(inserted[0])
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
    return [new_id]


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


@dataclass(frozen=True)
class Review:
    reviewer: str
    role: str
    verdict: str | None
    note: str
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "reviewer": self.reviewer,
            "role": self.role,
            "verdict": self.verdict,
            "note": self.note,
            "at": _iso(self.at),
        }


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
    reviews: list[Review] = field(default_factory=list)  # oldest first

    @property
    def status(self) -> str:
        """open (no review yet), reviewed (every verdict agrees) or disputed (reviewers
        disagree: one said justified, another not)."""
        if not self.reviews:
            return "open"
        verdicts = {r.verdict for r in self.reviews if r.verdict is not None}
        return "disputed" if len(verdicts) > 1 else "reviewed"

    def as_json(self) -> dict[str, Any]:
        last = self.reviews[-1] if self.reviews else None
        return {
            "id": self.id,
            "clinician": self.fhir_user,
            "user": self.subject,
            "organizations": self.organizations,
            "patient": f"Patient/{self.patient}",
            "reason": self.reason,
            "started": _iso(self.started),
            "expires": _iso(self.expires),
            "status": self.status,
            "reviews": [r.as_json() for r in self.reviews],
            # The latest review, for clients of the single-review format.
            "reviewedAt": _iso(last.at) if last else None,
            "reviewedBy": last.reviewer if last else None,
            "reviewNote": last.note if last else None,
        }


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


def list_alerts(
    conn: sa.Connection, principal: Principal, *, open_only: bool = False, alert_id: int | None = None
) -> list[Alert]:
    query = sa.select(break_glass).order_by(break_glass.c.id.desc())
    condition = _who_sees(principal)
    if condition is not None:
        query = query.where(condition)
    if alert_id is not None:
        query = query.where(break_glass.c.id == alert_id)
    if open_only:
        query = query.where(~sa.exists().where(break_glass_review.c.alert_id == break_glass.c.id))
    rows = conn.execute(query).all()
    reviews: dict[int, list[Review]] = {}
    ids = [row.id for row in rows]
    for start in range(0, len(ids), 900):
        for r in conn.execute(
            sa.select(break_glass_review)
            .where(break_glass_review.c.alert_id.in_(ids[start : start + 900]))
            .order_by(break_glass_review.c.id)
        ):
            reviews.setdefault(r.alert_id, []).append(Review(r.reviewer, r.role, r.verdict, r.note, r.at))
    return [
        Alert(
            row.id,
            row.subject,
            row.fhir_user,
            list(row.organizations or []),
            row.patient_id,
            row.reason,
            row.started,
            row.expires,
            reviews.get(row.id, []),
        )  # fmt: skip
        for row in rows
    ]


def review(conn: sa.Connection, principal: Principal, alert_id: int, note: str, verdict: str) -> Alert:
    """A facility admin (of the clinician's organization), auditor or hub admin adds a
    review (justified or not-justified). Reviews are appended, never replaced."""
    if principal.role not in (Role.FACILITY_ADMIN, Role.AUDITOR, Role.ADMIN):
        raise FhirError(403, [Issue("forbidden", "Only facility admins and auditors review break-glass")])
    if verdict not in VERDICTS:
        raise FhirError(
            400,
            [
                Issue(
                    "invalid",
                    f"A review needs a verdict: one of {', '.join(VERDICTS)}",
                    expression=("verdict",),
                )
            ],
        )
    if not list_alerts(conn, principal, alert_id=alert_id):
        raise FhirError(404, [Issue("not-found", f"No break-glass alert {alert_id}")])
    conn.execute(
        break_glass_review.insert().values(
            alert_id=alert_id,
            reviewer=principal.subject,
            role=principal.role.value,
            verdict=verdict,
            note=note,
            at=datetime.now(UTC),
        )
    )
    return list_alerts(conn, principal, alert_id=alert_id)[0]
