"""The interceptor around every FHIR interaction: admission before, audit after.

Owns: turning a request's principal and headers (purpose of use, break-glass reason) into
the ``Access`` the store applies, opening break-glass access, and writing exactly one
AuditEvent per request once its answer is known, naming every patient whose data it
disclosed or changed. What is allowed is decided in ``consent.decision``, not here.
Calls: consent (decision, break-glass), the audit trail.  Called by: the router.
"""

from __future__ import annotations

import logging
import re
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
from hub.store.pids import pid_in

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
                    target = request.target
                    patients = breakglass.patients_of_request(
                        write_conn, target.resource_type, target.resource_id, request.query
                    )
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
        access.reason = request.header("x-access-reason")  # consent.governance: removing a deny
        return access

    def audit(self, request: FhirRequest, access: Access | None, interaction: str, status: int) -> None:
        """The audit record of a request in a transaction of its own (reads, failures): one
        AuditEvent per patient whose data it disclosed or changed (IHE BALP), each naming
        only that patient's resources, so no patient reads in their own access log who else
        was looked at; one AuditEvent when it touched no patient's data (or failed)."""
        if self.trail is None or request.principal is None:
            return
        touched = _touched(access)
        if touched:
            with self.store.read() as conn:
                described = self._described(conn, touched)
        else:  # nothing to look up: no transaction (failures, metadata, empty searches)
            described = ({}, [])
        # Through the group commit writer while the app runs (hub.audit.trail): this returns
        # once the AuditEvents are committed, so the answer still leaves after its record.
        self.trail.record(self._events_described(request, access, interaction, status, described))

    def audit_in(
        self, conn: sa.Connection, request: FhirRequest, access: Access | None, interaction: str, status: int
    ) -> None:
        """The same record, written inside the caller's open write transaction (a write and
        its AuditEvent commit or roll back together). Call it last before commit: on
        PostgreSQL the trail then holds the chain lock until the transaction ends."""
        if self.trail is None or request.principal is None:
            return
        self.trail.record_in(conn, self._events(conn, request, access, interaction, status))

    def _events(
        self,
        conn: sa.Connection,
        request: FhirRequest,
        access: Access | None,
        interaction: str,
        status: int,
    ) -> list[AccessEvent]:
        """The AccessEvents of a request, its touched resources looked up through ``conn``."""
        described = self._described(conn, _touched(access))
        return self._events_described(request, access, interaction, status, described)

    def _events_described(
        self,
        request: FhirRequest,
        access: Access | None,
        interaction: str,
        status: int,
        described: tuple[dict[str, list[str]], list[str]],
    ) -> list[AccessEvent]:
        """The AccessEvents of a request, given its touched resources as ``_described``
        grouped them."""
        target = request.target
        by_patient, shared = described
        opened = request.break_glass
        bg_patients = set(access.break_glass_patients) if access is not None else set()

        def event(patients: list[str], entities: list[str]) -> AccessEvent:
            used_break_glass = opened is not None or bool(bg_patients & set(patients))
            reason = opened[1] if opened else ("open break-glass access" if used_break_glass else None)
            return AccessEvent(
                principal=request.principal,  # type: ignore[arg-type]
                interaction=interaction,
                action=_ACTIONS.get(interaction, "R"),
                resource_type=target.resource_type,
                resource_id=target.resource_id,
                query=_recorded_query(request),
                operation=f"${target.operation}" if target.operation else None,
                patients=patients,
                entities=entities,
                outcome_status=status,
                purpose="ETREAT" if used_break_glass else (access.purpose if access else "UNKNOWN"),
                break_glass_reason=reason,
                break_glass_id=opened[0][0] if opened and opened[0] else None,
                access_reason=access.reason if access is not None else None,
                client_address=request.client_address,
            )

        if len(by_patient) <= 1:
            return [event(sorted(by_patient), [e for es in by_patient.values() for e in es] + shared)]
        return [event([patient], entities) for patient, entities in sorted(by_patient.items())]

    def disclosed(self, access: Access, what: str) -> None:
        """Audit work that ran detached from its request (an $export job): per patient too."""
        if self.trail is None:
            return
        with self.store.read() as conn:
            by_patient, shared = self._described(conn, _touched(access))
        groups: list[tuple[str | None, list[str]]] = [*sorted(by_patient.items())] or [(None, shared)]
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

    @staticmethod
    def _described(conn: sa.Connection, pids: list[int]) -> tuple[dict[str, list[str]], list[str]]:
        """The touched resources as references, grouped by the patient whose record holds
        them, and those in no patient's record (at most ``_MAX_ENTITIES`` of each group).
        Read through ``conn``: inside a write it sees the rows the write made."""
        by_patient: dict[str, list[str]] = {}
        shared: list[str] = []
        for chunk in _chunks(pids):
            rows = conn.execute(
                sa.select(resource.c.res_type, resource.c.res_id, compartment.c.patient_id)
                .select_from(resource.outerjoin(compartment, compartment.c.pid == resource.c.pid))
                .where(pid_in(conn, resource.c.pid, chunk))  # one array parameter on PostgreSQL
            )
            for res_type, res_id, patient in rows:
                group = shared if not patient else by_patient.setdefault(patient, [])
                if len(group) < _MAX_ENTITIES:
                    group.append(f"{res_type}/{res_id}")
        return by_patient, shared


# Search values that are themselves protected identifiers (encrypted at rest): the audit
# trail keeps which system was searched, not the number. A parameter is protected when any
# element of its name is one of these (the token search parameters over Identifier and
# ContactPoint elements, see fhir/search-parameters.json), wherever it sits: ``identifier``,
# ``identifier:of-type``, ``identifier:text``, the reference modifier ``subject:identifier``,
# chains (``subject:Patient.identifier``, ``patient.identifier``) and reverse chains
# (``_has:Observation:patient:identifier``).
_PROTECTED_PARAMS = frozenset({"identifier", "group-identifier", "phone", "telecom", "email"})
# Free-text parameters can carry anything, an identifier included: never kept.
_FREE_TEXT_PARAMS = frozenset({"_content", "_text", "_filter", "_query"})
_NAME_ELEMENTS = re.compile(r"[.:]")


def _protected(key: str) -> bool:
    elements = _NAME_ELEMENTS.split(key.strip().lower())
    return any(element in _PROTECTED_PARAMS for element in elements) or elements[0] in _FREE_TEXT_PARAMS


def _redacted(query: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query with every protected value masked (``system|***``, else ``***``); the
    parameter names and the other values are kept as asked."""

    def mask(key: str, value: str) -> str:
        if key.strip().lower().split(":")[0] in _FREE_TEXT_PARAMS:
            return "***"
        return ",".join(
            f"{item.rsplit('|', 1)[0]}|***" if "|" in item else "***" for item in value.split(",")
        )

    return [(key, mask(key, value) if _protected(key) else value) for key, value in query]


def _recorded_query(request: FhirRequest) -> str | None:
    """What the audit trail keeps of a request's parameters: the URL query, and for
    ``POST [type]/_search`` the form parameters the web adapter merged into it, masked."""
    return urlencode(_redacted(request.query)) if request.query else None


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


# Reference parameters "me" may stand in: the patient ones and those naming a person acting.
_ME_PARAMS = breakglass.PATIENT_PARAMS | {"agent", "performer", "requester", "actor", "who"}


def _touched(access: Access | None) -> list[int]:
    """The pids the request's answer disclosed or changed, once each, in order."""
    return list(dict.fromkeys(access.touched)) if access is not None else []


def _chunks(items: list[int]) -> Iterable[list[int]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def audit_failure(error: Exception) -> FhirError:
    return FhirError(500, [Issue("exception", f"The access could not be audited: {error}")])
