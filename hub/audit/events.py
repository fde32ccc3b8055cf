"""What one access to the hub was, and the R4 AuditEvent that records it.

Owns: ``AccessEvent`` (the facts the access layer knows about one request) and its
translation into an AuditEvent following IHE Basic Audit Log Patterns (BALP): type ``rest``,
subtype the restful interaction, agents for the user, the client application and the hub,
one entity per patient whose data was touched (so ``AuditEvent?patient=`` is an accounting
of disclosures) and one for the data or the query.
Calls: nothing but the standard library.  Called by: ``hub.audit.trail`` (and tests).

The builder is a template, not a validator: the trail stores its output without running
fhir.resources over it (one AuditEvent per request; see ``hub.store.records.finalize``), so
``tests/test_audit_chain.py`` validates every shape it can produce instead.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from hub.auth.principal import Principal, Role

HUB_TAGS = "https://ehealth-hub.vn/fhir/CodeSystem/hub-tags"
HUB_ROLES = "https://ehealth-hub.vn/fhir/CodeSystem/hub-roles"
HUB_OPERATIONS = "https://ehealth-hub.vn/fhir/CodeSystem/hub-operations"
# Identifier systems for who cannot be named by a reference: token subjects and OAuth clients.
HUB_USERS = "https://ehealth-hub.vn/fhir/NamingSystem/hub-user"
OAUTH_CLIENTS = "https://ehealth-hub.vn/fhir/NamingSystem/oauth-client"

AUDIT_TAG = {"system": HUB_TAGS, "code": "audit", "display": "Audit trail entry"}

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

INTERACTIONS = frozenset(
    {
        "read", "vread", "update", "patch", "delete", "history-instance", "history-type",
        "history-system", "create", "search-type", "search-system", "capabilities",
        "transaction", "batch", "operation",
    }
)  # fmt: skip
ACTIONS = frozenset({"C", "R", "U", "D", "E"})

# v3 ActReason displays of the purposes the hub's tokens and consents use.
PURPOSES: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "Emergency Treatment",
    "HRESCH": "healthcare research",
    "PUBHLTH": "public health",
    "PATRQT": "patient requested",
    "FAMRQT": "family requested",
    "HOPERAT": "healthcare operations",
    "HPAYMT": "healthcare payment",
    "HSYSADMIN": "health system administration",
    "HDIRECT": "directory",
}

# Caps on what one AuditEvent lists, so a search over a large population does not write a
# multi-megabyte audit record per page. Patients are capped far higher than other
# references because AuditEvent?patient= is the accounting of disclosures to a patient;
# what is left off is counted in an entity.detail.
MAX_PATIENTS = 1000
MAX_ENTITIES = 100


@dataclass
class AccessEvent:
    """One request, as the access layer saw it: who, what, why, and how it ended."""

    principal: Principal
    interaction: str  # http://hl7.org/fhir/restful-interaction code
    action: str  # C R U D E
    resource_type: str | None = None
    resource_id: str | None = None
    query: str | None = None  # the query string as received, without "?"
    operation: str | None = None  # "$everything", "$export"...
    patients: list[str] = field(default_factory=list)  # Patient ids whose data was touched
    entities: list[str] = field(default_factory=list)  # "Observation/1" references touched
    outcome_status: int = 200
    purpose: str = "TREAT"  # v3 ActReason code
    break_glass_reason: str | None = None
    break_glass_id: int | None = None
    access_reason: str | None = None  # X-Access-Reason: why a privileged change was made
    client_address: str | None = None
    recorded: datetime = field(default_factory=lambda: datetime.now(UTC))


def outcome_code(status: int) -> str:
    """AuditEvent.outcome: 0 success (2xx, 3xx), 4 minor failure (4xx), 8 serious (5xx)."""
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "8"


def _outcome_desc(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _instant(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _purpose(code: str) -> dict[str, Any]:
    coding = {"system": ACT_REASON, "code": code}
    if code in PURPOSES:
        coding["display"] = PURPOSES[code]
    return {"coding": [coding]}


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _user_agent(event: AccessEvent, purposes: list[dict[str, Any]]) -> dict[str, Any]:
    principal = event.principal
    who: dict[str, Any] = {
        "identifier": {"system": principal.issuer or HUB_USERS, "value": principal.subject}
    }
    if principal.fhir_user:
        who["reference"] = principal.fhir_user
        who["type"] = principal.fhir_user_type
    # BALP user agent types: the recipient of what was read or searched, the author of a
    # change; a patient acting for themself is also marked as such.
    if event.action in ("R", "E"):
        codings = [{"system": PARTICIPATION_TYPE, "code": "IRCP", "display": "information recipient"}]
    else:
        codings = [{"system": PARTICIPATION_TYPE, "code": "AUT", "display": "author (originator)"}]
    agent: dict[str, Any] = {
        "type": {"coding": codings},
        "role": [{"coding": [{"system": HUB_ROLES, "code": principal.role.value}]}],
        "who": who,
        "name": principal.subject,
        "requestor": True,
    }
    if purposes:
        agent["purposeOfUse"] = purposes
    if principal.role is Role.PATIENT:
        agent["role"].append(
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PAT"}]}
        )
    if principal.token_id:
        # BALP (IUA/OAuth token use): the token's jti goes in agent.policy.
        agent["policy"] = [principal.token_id]
    if event.client_address:
        agent["network"] = {"address": event.client_address, "type": "2"}
    return agent


def _client_agent(event: AccessEvent) -> dict[str, Any] | None:
    client_id = event.principal.client_id
    if not client_id:
        return None
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DICOM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": OAUTH_CLIENTS, "value": client_id}, "display": client_id},
        "requestor": False,
    }
    if event.client_address:
        agent["network"] = {"address": event.client_address, "type": "2"}
    return agent


def _hub_reference(base_url: str, observer: str) -> dict[str, Any]:
    # There is no Device resource for the hub; an identifier (its FHIR base) names it.
    return {
        "type": "Device",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": base_url},
        "display": observer,
    }


def _hub_agent(base_url: str, observer: str) -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": DICOM, "code": "110152", "display": "Destination Role ID"}]},
        "role": [{"coding": [{"system": PARTICIPATION_TYPE, "code": "CST", "display": "custodian"}]}],
        "who": _hub_reference(base_url, observer),
        "requestor": False,
        "network": {"address": base_url, "type": "5"},  # 5 = URI
    }


def _data_entity(event: AccessEvent, total_entities: int) -> dict[str, Any]:
    """The resource acted on, or the query that was run (BALP entity:data / entity:query)."""
    entity: dict[str, Any] = {}
    if event.resource_type and event.resource_id:
        entity["what"] = {"reference": f"{event.resource_type}/{event.resource_id}"}
    path = "/".join(p for p in (event.resource_type, event.resource_id, event.operation) if p)
    request = f"{path}?{event.query}" if event.query else path
    if event.interaction.startswith(("search", "history")) or event.operation:
        # BALP Query: the request as asked, base64 in entity.query; readable in description.
        request = request or "/"
        entity["query"] = base64.b64encode(request.encode()).decode()
    if "query" in entity or "what" not in entity:
        # A batch or transaction lists its entries as further entities; this one names it.
        entity["description"] = request or event.interaction
    query_like = "query" in entity and "what" not in entity
    entity["type"] = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
    entity["role"] = (
        {"system": OBJECT_ROLE, "code": "24", "display": "Query"}
        if query_like
        else {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
    )
    details: list[dict[str, Any]] = []
    if total_entities:
        details.append({"type": "entities-touched", "valueString": str(total_entities)})
    if event.break_glass_reason is not None:
        details.append({"type": "break-glass-reason", "valueString": event.break_glass_reason})
    if event.break_glass_id is not None:
        details.append({"type": "break-glass-id", "valueString": str(event.break_glass_id)})
    if event.access_reason is not None:
        details.append({"type": "access-reason", "valueString": event.access_reason})
    if details:
        entity["detail"] = details
    return entity


def build_audit_event(event: AccessEvent, base_url: str, observer: str) -> dict[str, Any]:
    """The R4 AuditEvent (without id and meta.versionId/lastUpdated) for one access.

    ``observer`` is the display name of the hub, which is both the source that recorded the
    event and the custodian agent; ``base_url`` identifies it.
    """
    if event.interaction not in INTERACTIONS:
        raise ValueError(f"not a restful-interaction code: {event.interaction!r}")
    if event.action not in ACTIONS:
        raise ValueError(f"not an AuditEvent action: {event.action!r}")
    base_url = base_url.rstrip("/")
    break_glass = event.break_glass_reason is not None or event.break_glass_id is not None
    purpose_codes = _unique([event.purpose, "ETREAT" if break_glass else ""])
    purposes = [_purpose(code) for code in purpose_codes]

    subtype = [{"system": RESTFUL_INTERACTION, "code": event.interaction, "display": event.interaction}]
    if event.operation:
        subtype.append({"system": HUB_OPERATIONS, "code": event.operation})

    meta: dict[str, Any] = {"tag": [AUDIT_TAG]}
    if break_glass:
        meta["security"] = [{"system": ACT_REASON, "code": "BTG", "display": "break the glass"}]

    agents = [_user_agent(event, purposes)]
    client = _client_agent(event)
    if client is not None:
        agents.append(client)
    agents.append(_hub_agent(base_url, observer))

    patients = _unique([p.removeprefix("Patient/") for p in event.patients])
    references = _unique(event.entities)
    data = _data_entity(event, len(references))
    entities: list[dict[str, Any]] = [data]
    single = data["what"]["reference"] if "what" in data else None
    for reference in references[:MAX_ENTITIES]:
        if reference != single:
            # Only `what`: enough for AuditEvent?entity=, and a page of search results
            # would otherwise add ~200 bytes of codings per resource to every audit record.
            entities.append({"what": {"reference": reference}})
    for patient_id in patients[:MAX_PATIENTS]:
        entities.append(
            {
                "what": {"reference": f"Patient/{patient_id}"},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if len(patients) > MAX_PATIENTS:
        data.setdefault("detail", []).append(
            {"type": "patients-omitted", "valueString": str(len(patients) - MAX_PATIENTS)}
        )
    if len(references) > MAX_ENTITIES:
        data.setdefault("detail", []).append(
            {"type": "entities-omitted", "valueString": str(len(references) - MAX_ENTITIES)}
        )

    audit: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "meta": meta,
        "type": {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": subtype,
        "action": event.action,
        "recorded": _instant(event.recorded),
        "outcome": outcome_code(event.outcome_status),
        "outcomeDesc": _outcome_desc(event.outcome_status),
        "agent": agents,
        "source": {
            "site": base_url,
            "observer": _hub_reference(base_url, observer),
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
    if purposes:
        audit["purposeOfEvent"] = purposes
    return audit
