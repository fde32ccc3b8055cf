"""Who is asking: the authenticated principal of one request.

Owns: the roles the hub knows and what a verified token says about its bearer.
Calls: scopes.  Called by: token verification (``hub.auth.tokens``), the access decision
(``consent.decision``), audit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hub.auth.scopes import ScopeSet


class Role(StrEnum):
    CLINICIAN = "clinician"  # a Practitioner acting for one or more Organizations
    PATIENT = "patient"  # a citizen, fhirUser Patient/...
    PROXY = "proxy"  # a family member, fhirUser RelatedPerson/... whose patient they act for
    FACILITY_ADMIN = "facility-admin"  # runs an Organization's directory; sees break-glass alerts
    INSPECTOR = "food-safety-inspector"  # food-safety registry; never patient data
    SERVICE = "integration-service"  # connectors (HIS/LIS/PACS feeds)
    AUDITOR = "auditor"  # reads the audit trail and consents
    ADMIN = "hub-admin"  # runs the hub


@dataclass(frozen=True)
class Principal:
    subject: str  # JWT sub: a user name or a service account's client id
    role: Role
    scopes: ScopeSet
    fhir_user: str | None = None  # "Practitioner/123", "Patient/9", "RelatedPerson/4"
    organizations: tuple[str, ...] = ()  # Organization ids the user acts for
    # SMART launch context: the patient that patient/ scopes are about (defaults to the
    # fhirUser for the patient role).
    patient: str | None = None
    token_id: str | None = None  # jti, for audit
    client_id: str | None = None
    issuer: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def fhir_user_id(self) -> str | None:
        return self.fhir_user.split("/", 1)[1] if self.fhir_user and "/" in self.fhir_user else None

    @property
    def fhir_user_type(self) -> str | None:
        return self.fhir_user.split("/", 1)[0] if self.fhir_user and "/" in self.fhir_user else None


def system_principal(subject: str = "hub-system") -> Principal:
    """The hub itself (CLI import, demo loading, background jobs): unrestricted."""
    return Principal(subject=subject, role=Role.ADMIN, scopes=ScopeSet.parse("system/*.cruds"))
