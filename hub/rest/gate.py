"""The interceptor around every FHIR interaction: admission before, audit after.

Owns: turning a request's principal and headers (purpose of use, break-glass reason) into
the ``Access`` the store applies, opening break-glass access, and writing exactly one
AuditEvent per request once its answer is known, naming every patient whose data it
disclosed or changed. What is allowed is decided in ``consent.decision``, not here.
Calls: consent (decision, break-glass), the audit trail.  Called by: the router.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlencode

import sqlalchemy as sa

from consent import breakglass
from consent.decision import Access, decide
from hub.audit.events import AccessEvent
from hub.audit.trail import AuditTrail
from hub.db.schema import compartment, resource
from hub.errors import FhirError, Issue
from hub.rest.messages import FhirRequest
from hub.store import Store

log = logging.getLogger(__name__)
PURPOSE_HEADER = "x-purpose-of-use"
_CHUNK = 900
_MAX_ENTITIES = 100
_ACTIONS = {
    "create": "C", "update": "U", "patch": "U", "delete": "D", "transaction": "E", "batch": "E",
    "operation": "E",
}  # fmt: skip


@dataclass
class Gate:
    store: Store
    trail: AuditTrail | None
    policy: str = "moh"
    break_glass_minutes: int = 60

    def admit(self, request: FhirRequest) -> Access:
        """The Access of a request; 403 if it states a purpose its role may not use."""
        assert request.principal is not None
        _resolve_me(request)
        reason = request.header(breakglass.HEADER)
        with self.store.read() as conn:
            if reason is not None:
                # Opening needs a write; the patients are looked up unfiltered on purpose:
                # break-glass is exactly access to what the clinician could not see.
                with self.store.write() as write_conn:
                    patients = breakglass.patients_of_request(write_conn, request.path, request.query)
                    ids = breakglass.open_access(
                        write_conn, request.principal, patients, reason, self.break_glass_minutes
                    )
                request.break_glass = (ids, reason)
            access = decide(
                conn,
                request.principal,
                self.store.registry,
                purpose=request.header(PURPOSE_HEADER),
                policy=self.policy,
            )
        return access

    def audit(self, request: FhirRequest, access: Access | None, interaction: str, status: int) -> None:
        """The audit record of a request: one AuditEvent per patient whose data it disclosed
        or changed (IHE BALP), each naming only that patient's resources, so no patient reads
        in their own access log who else was looked at; one AuditEvent when it touched no
        patient's data (or failed)."""
        if self.trail is None or request.principal is None:
            return
        parts = [p for p in request.path.strip("/").split("/") if p]
        touched = list(dict.fromkeys(access.touched)) if access is not None else []
        by_patient, shared = self._described(touched)
        opened = request.break_glass
        bg_patients = set(access.break_glass_patients) if access is not None else set()

        def event(patients: list[str], entities: list[str]) -> AccessEvent:
            used_break_glass = opened is not None or bool(bg_patients & set(patients))
            reason = opened[1] if opened else ("open break-glass access" if used_break_glass else None)
            return AccessEvent(
                principal=request.principal,  # type: ignore[arg-type]
                interaction=interaction,
                action=_ACTIONS.get(interaction, "R"),
                resource_type=parts[0] if parts and not parts[0].startswith(("$", "_")) else None,
                resource_id=parts[1] if len(parts) >= 2 and not parts[1].startswith(("$", "_")) else None,
                query=urlencode(_redacted(request.query)) if request.query else None,
                operation=next((p for p in parts if p.startswith("$")), None),
                patients=patients,
                entities=entities,
                outcome_status=status,
                purpose="ETREAT" if used_break_glass else (access.purpose if access else "UNKNOWN"),
                break_glass_reason=reason,
                break_glass_id=opened[0][0] if opened and opened[0] else None,
                client_address=request.client_address,
            )

        if len(by_patient) <= 1:
            events = [event(sorted(by_patient), [e for es in by_patient.values() for e in es] + shared)]
        else:
            events = [event([patient], entities) for patient, entities in sorted(by_patient.items())]
        self.trail.record(events)

    def disclosed(self, access: Access, what: str) -> None:
        """Audit work that ran detached from its request (an $export job): per patient too."""
        if self.trail is None:
            return
        by_patient, shared = self._described(list(dict.fromkeys(access.touched)))
        groups = sorted(by_patient.items()) or [(None, shared)]
        self.trail.record(
            [
                AccessEvent(
                    principal=access.principal,
                    interaction="operation",
                    action="E",
                    operation="$export",
                    query=what,
                    patients=[patient] if patient else [],
                    entities=entities,
                    purpose=access.purpose,
                )
                for patient, entities in groups
            ]
        )

    def _described(self, pids: list[int]) -> tuple[dict[str, list[str]], list[str]]:
        """The touched resources as references, grouped by the patient whose record holds
        them, and those in no patient's record (at most ``_MAX_ENTITIES`` of each group)."""
        by_patient: dict[str, list[str]] = {}
        shared: list[str] = []
        if not pids:
            return by_patient, shared
        with self.store.read() as conn:
            for chunk in _chunks(pids):
                rows = conn.execute(
                    sa.select(resource.c.res_type, resource.c.res_id, compartment.c.patient_id)
                    .select_from(resource.outerjoin(compartment, compartment.c.pid == resource.c.pid))
                    .where(resource.c.pid.in_(chunk))
                )
                for res_type, res_id, patient in rows:
                    group = shared if patient is None else by_patient.setdefault(patient, [])
                    if len(group) < _MAX_ENTITIES:
                        group.append(f"{res_type}/{res_id}")
        return by_patient, shared


# Search values that are themselves protected identifiers (encrypted at rest): the audit
# trail keeps which system was searched, not the number.
_PROTECTED_PARAMS = frozenset({"identifier", "phone", "telecom", "email"})


def _redacted(query: list[tuple[str, str]]) -> list[tuple[str, str]]:
    def mask(value: str) -> str:
        return ",".join(
            f"{item.rsplit('|', 1)[0]}|***" if "|" in item else "***" for item in value.split(",")
        )

    return [
        (key, mask(value) if key.split(":")[0].rsplit(".", 1)[-1] in _PROTECTED_PARAMS else value)
        for key, value in query
    ]


def _resolve_me(request: FhirRequest) -> None:
    """``AuditEvent?patient=me``: "me" in a reference parameter is the caller's own
    fhirUser (a patient's Patient id, a clinician's Practitioner id)."""
    principal = request.principal
    if principal is None or principal.fhir_user is None or not any(v == "me" for _, v in request.query):
        return
    request.query = [
        (key, principal.fhir_user if value == "me" and key.split(":")[0] in _ME_PARAMS else value)
        for key, value in request.query
    ]


_ME_PARAMS = frozenset(
    {"patient", "subject", "agent", "beneficiary", "performer", "requester", "actor", "who"}
)


def _chunks(items: list[int]) -> Iterable[list[int]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def audit_failure(error: Exception) -> FhirError:
    return FhirError(500, [Issue("exception", f"The access could not be audited: {error}")])
