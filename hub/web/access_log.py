"""The patient's access log ("who looked at my record") in readable entries.

Owns: turning the AuditEvents a patient's ``AuditEvent?patient=me`` search returns (built by
``hub.audit.events.build_audit_event``: the requesting agent with role, fhirUser and purposes,
the subtype interaction, the data entity or query, break-glass as purpose ETREAT, label BTG and
a ``break-glass-reason`` detail) and the break-glass alerts (``consent.breakglass.Alert.as_json``)
into entries: who, which facility, when, what, why, whether it was break-glass, the outcome.
Pure: the caller looks up names (``people_to_name`` says which) and passes ``gettext`` and a
date-time formatter.
Calls: nothing outside the standard library.  Called by: hub.web.views.portal.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Gettext = Callable[[str], str]
DateTimeFormat = Callable[[str], str]  # a FHIR instant -> the locale's date and time

HUB_ROLES = "https://ehealth-hub.vn/fhir/CodeSystem/hub-roles"
HUB_OPERATIONS = "https://ehealth-hub.vn/fhir/CodeSystem/hub-operations"


def N_(message: str) -> str:
    """Marks an English message id for extraction; translated later with the page's gettext."""
    return message


# Record parts in plain words, by resource type; other types show their FHIR name.
PARTS: dict[str, str] = {
    "Patient": N_("personal details"),
    "Encounter": N_("visits"),
    "Observation": N_("test results and measurements"),
    "DiagnosticReport": N_("test reports"),
    "Condition": N_("diagnoses"),
    "Procedure": N_("procedures"),
    "MedicationRequest": N_("medicines"),
    "MedicationStatement": N_("medicines"),
    "MedicationDispense": N_("medicines"),
    "MedicationAdministration": N_("medicines"),
    "Immunization": N_("vaccinations"),
    "AllergyIntolerance": N_("allergies"),
    "DocumentReference": N_("documents"),
    "Composition": N_("documents"),
    "CarePlan": N_("care plans"),
    "CareTeam": N_("care team"),
    "ImagingStudy": N_("imaging"),
    "Consent": N_("consents"),
    "AuditEvent": N_("access log"),
    "Appointment": N_("appointments"),
    "RelatedPerson": N_("family members"),
    "Organization": N_("facilities"),
    "Practitioner": N_("health workers"),
    "PractitionerRole": N_("health workers"),
    "Provenance": N_("where the data came from"),
    "Claim": N_("insurance claims"),
    "ExplanationOfBenefit": N_("insurance claims"),
}

ACTIONS: dict[str, str] = {
    "read": N_("opened"),
    "vread": N_("opened an earlier version of"),
    "search-type": N_("searched"),
    "search-system": N_("searched"),
    "history-instance": N_("looked at the history of"),
    "history-type": N_("looked at the history of"),
    "history-system": N_("looked at the history of"),
    "create": N_("added to"),
    "update": N_("changed"),
    "patch": N_("changed"),
    "delete": N_("deleted from"),
    "transaction": N_("added or changed"),
    "batch": N_("added or changed"),
    "operation": N_("used"),
}
OPERATIONS: dict[str, str] = {
    "$everything": N_("opened the whole record"),
    "$export": N_("exported the record"),
}

PURPOSE_WORDS: dict[str, str] = {
    "TREAT": N_("treatment"),
    "ETREAT": N_("emergency treatment"),
    "HRESCH": N_("research"),
    "PUBHLTH": N_("public health"),
    "PATRQT": N_("your own request"),
    "FAMRQT": N_("a family member's request"),
    "HOPERAT": N_("running the health service"),
    "HSYSADMIN": N_("running the hub"),
    "HPAYMT": N_("payment"),
    "HDIRECT": N_("the directory"),
}

ROLE_WORDS: dict[str, str] = {
    "clinician": N_("health worker"),
    "patient": N_("patient"),
    "proxy": N_("family member"),
    "facility-admin": N_("facility administrator"),
    "integration-service": N_("facility system"),
    "auditor": N_("auditor"),
    "hub-admin": N_("hub administrator"),
}


@dataclass(frozen=True)
class AccessEntry:
    """One line of "who looked at my record"."""

    id: str
    when: str  # formatted date and time
    recorded: str  # the FHIR instant, for sorting and <time datetime>
    who: str
    role: str  # plain words
    facility: str  # "" when unknown
    what: str  # "opened test results and measurements"
    why: str  # plain words, "" when none was recorded
    break_glass: bool
    reason: str  # the break-glass reason, "" when none
    ok: bool
    outcome: str  # plain words
    mine: bool = False  # the reader's own access (the page can hide these)


@dataclass(frozen=True)
class AlertEntry:
    """One break-glass alert as the patient sees it."""

    id: int
    who: str
    facility: str
    when: str
    until: str
    reason: str
    status: str  # plain words: not reviewed yet / reviewed: justified ...


def _requestor(event: Mapping[str, Any]) -> Mapping[str, Any]:
    for agent in event.get("agent", ()) or ():
        if isinstance(agent, Mapping) and agent.get("requestor") is True:
            return agent
    return {}


def _codes(concepts: Iterable[Any]) -> list[str]:
    found: list[str] = []
    for concept in concepts:
        for coding in (concept or {}).get("coding", ()) if isinstance(concept, Mapping) else ():
            code = coding.get("code") if isinstance(coding, Mapping) else None
            if isinstance(code, str) and code not in found:
                found.append(code)
    return found


def who_of(event: Mapping[str, Any]) -> str | None:
    """The fhirUser reference of whoever made the request (Practitioner/…), if it has one."""
    who = _requestor(event).get("who") or {}
    ref = who.get("reference") if isinstance(who, Mapping) else None
    return ref if isinstance(ref, str) else None


def people_to_name(
    events: Iterable[Mapping[str, Any]], alerts: Iterable[Mapping[str, Any]] = ()
) -> list[str]:
    """The fhirUser references the page should look up names (and facilities) for."""
    refs = [r for e in events if (r := who_of(e))]
    refs += [a["clinician"] for a in alerts if isinstance(a.get("clinician"), str)]
    return list(dict.fromkeys(refs))


def _role(agent: Mapping[str, Any]) -> str:
    for concept in agent.get("role", ()) or ():
        for coding in concept.get("coding", ()) if isinstance(concept, Mapping) else ():
            if isinstance(coding, Mapping) and coding.get("system") == HUB_ROLES:
                return str(coding.get("code", ""))
    return ""


def _target_types(event: Mapping[str, Any]) -> list[str]:
    """The resource types the event read or wrote: the data entity's reference or query, then
    the other entities (not the patient entity, role 1, which names whose record it was)."""
    types: list[str] = []
    for entity in event.get("entity", ()) or ():
        if not isinstance(entity, Mapping):
            continue
        role = (entity.get("role") or {}).get("code") if isinstance(entity.get("role"), Mapping) else None
        ref = (entity.get("what") or {}).get("reference") if isinstance(entity.get("what"), Mapping) else None
        if role == "1":
            continue
        text = ref
        if not text and isinstance(entity.get("query"), str):
            try:
                text = base64.b64decode(entity["query"]).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                text = None
        text = text or entity.get("description")
        if isinstance(text, str) and text:
            kind = text.split("?", 1)[0].split("/", 1)[0]
            if kind and kind[0].isupper() and kind not in types:
                types.append(kind)
    return types


def _detail(event: Mapping[str, Any], name: str) -> str:
    for entity in event.get("entity", ()) or ():
        for detail in entity.get("detail", ()) if isinstance(entity, Mapping) else ():
            if isinstance(detail, Mapping) and detail.get("type") == name:
                return str(detail.get("valueString", ""))
    return ""


def is_break_glass(event: Mapping[str, Any]) -> bool:
    """Purpose ETREAT, the BTG security label or a stated break-glass reason."""
    security = ((event.get("meta") or {}).get("security")) or ()
    if any(isinstance(s, Mapping) and s.get("code") == "BTG" for s in security):
        return True
    if "ETREAT" in _codes(event.get("purposeOfEvent", ()) or ()):
        return True
    return bool(_detail(event, "break-glass-reason"))


def _what(event: Mapping[str, Any], gettext: Gettext) -> str:
    subtypes = event.get("subtype", ()) or ()
    interaction = next(
        (s.get("code") for s in subtypes if isinstance(s, Mapping) and s.get("system") != HUB_OPERATIONS),
        None,
    )
    operation = next(
        (s.get("code") for s in subtypes if isinstance(s, Mapping) and s.get("system") == HUB_OPERATIONS),
        None,
    )
    if isinstance(operation, str) and operation in OPERATIONS:
        return gettext(OPERATIONS[operation])
    parts = [gettext(PARTS[t]) if t in PARTS else t for t in _target_types(event)]
    parts = list(dict.fromkeys(parts))
    verb = gettext(ACTIONS.get(str(interaction), N_("used")))
    if not parts:
        return gettext("{verb} your record").format(verb=verb)
    return f"{verb} {', '.join(parts)}"  # verb before object in Vietnamese and English alike


def describe_event(
    event: Mapping[str, Any],
    me: str,
    names: Mapping[str, str],
    facilities: Mapping[str, str],
    gettext: Gettext,
    fmt_datetime: DateTimeFormat,
) -> AccessEntry:
    """One AuditEvent as an entry. ``me`` is the reader's fhirUser ("Patient/1", "RelatedPerson/4"),
    shown as "You"; ``names`` and ``facilities`` map fhirUser references to a person's name and
    their facility's name (what the page could look up)."""
    agent = _requestor(event)
    ref = who_of(event)
    role = _role(agent)
    if ref and ref == me:
        who = gettext("You")
    elif ref and ref in names:
        who = names[ref]
    else:
        who = str(agent.get("name") or ref or gettext("Unknown"))
    purposes = _codes(event.get("purposeOfEvent", ()) or agent.get("purposeOfUse", ()) or ())
    why = ", ".join(gettext(PURPOSE_WORDS[p]) if p in PURPOSE_WORDS else p for p in purposes)
    ok = event.get("outcome") == "0"
    recorded = str(event.get("recorded", ""))
    return AccessEntry(
        id=str(event.get("id", "")),
        when=fmt_datetime(recorded) if recorded else "",
        recorded=recorded,
        who=who,
        role=gettext(ROLE_WORDS[role]) if role in ROLE_WORDS else role,
        facility=facilities.get(ref, "") if ref else "",
        what=_what(event, gettext),
        why=why,
        break_glass=is_break_glass(event),
        reason=_detail(event, "break-glass-reason"),
        ok=ok,
        outcome=gettext("Done") if ok else gettext("Refused or failed"),
        mine=bool(ref) and ref == me,
    )


def describe_events(
    events: Sequence[Mapping[str, Any]],
    me: str,
    names: Mapping[str, str],
    facilities: Mapping[str, str],
    gettext: Gettext,
    fmt_datetime: DateTimeFormat,
) -> list[AccessEntry]:
    """Entries newest first (the search is asked for ``_sort=-date``; sorted again so a caller's
    order never matters)."""
    entries = [describe_event(e, me, names, facilities, gettext, fmt_datetime) for e in events]
    return sorted(entries, key=lambda e: e.recorded, reverse=True)


def describe_alert(
    alert: Mapping[str, Any],
    names: Mapping[str, str],
    facilities: Mapping[str, str],
    gettext: Gettext,
    fmt_datetime: DateTimeFormat,
) -> AlertEntry:
    """A break-glass alert (``Alert.as_json()``): who, when, until when, why, review state."""
    clinician = str(alert.get("clinician", ""))
    status = str(alert.get("status", "open"))
    reviews = alert.get("reviews") or []
    verdict = reviews[-1].get("verdict") if reviews and isinstance(reviews[-1], Mapping) else None
    if status == "open":
        state = gettext("Not reviewed yet")
    elif status == "disputed":
        state = gettext("Reviewers disagree")
    elif verdict == "justified":
        state = gettext("Reviewed: justified")
    else:
        state = gettext("Reviewed: not justified")
    return AlertEntry(
        id=int(alert.get("id", 0)),
        who=names.get(clinician) or str(alert.get("user") or clinician),
        facility=facilities.get(clinician, ""),
        when=fmt_datetime(str(alert.get("started", ""))),
        until=fmt_datetime(str(alert.get("expires", ""))),
        reason=str(alert.get("reason", "")),
        status=state,
    )
