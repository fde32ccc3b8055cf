"""The consent-matrix leak test of issue 4: a random world, every principal, every way in.

A seeded random world (organizations, practitioners, 8-12 patients with managing
organizations and general practitioners, care teams, related persons, clinical data with
random NORMAL or sensitive labels given by ``meta.security`` or by codes, and consents in
random states: granted, denied, withdrawn, expired, not yet valid, sensitive-category
grants, nested denies, for random actors and purposes) is written by the hub admin. Then
each principal (clinicians of various organizations, care teams, purposes and SMART scopes,
patients, proxies, auditor, facility admin, food-safety inspector, integration service)
reads it every way the hub offers: read, vread, history (instance and type), search with
``_total=accurate`` and paging, ``_include``/``_revinclude`` (``:iterate``), chains and
``_has``, ``Patient/{id}/$everything``, ``$export`` (system, Patient, Group; NDJSON files
read back) and transaction Bundles with GET entries and writes. Every answer is compared
with an oracle written here from the rules of issues 4 and 8 alone (it does not import
``consent.decision`` or ``consent.derive``; issue 8: a Patient is in its own compartment only,
AuditEvents naming no patient are for auditors and admins, a write to a hidden resource
answers as for an unknown id; ``test_consent_matrix_world.py`` widens the world): the set of ids returned, totals, status codes,
and the body of a hidden read, which must be that of an unknown id. Consents are then
withdrawn, re-granted, deleted and added, care teams and proxies deactivated, a clinician
breaks the glass, and every change must take effect on the very next request.

Two runs: through the router with principals set directly (the bulk of the matrix, once
per backend: ``HUB_TEST_DATABASE_URL`` selects PostgreSQL) and a smaller world over real
HTTP with real bearer tokens against a LiveServer.

``HUB_MATRIX_SEED`` replays a run (the seed is printed); ``HUB_MATRIX_SCALE`` (default 1)
multiplies the number of operations per principal. The summary line ("consent matrix:
seed=..., N checks, 0 leaks") goes to stderr and to ``var/consent-matrix.log``.
A "check" is one (principal, operation, resource) decision compared with the oracle: a
search over a type counts one per resource of that type in the world, a read counts one.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import REPO, LiveServer, backend, make_token

from hub.app_factory import build_router
from hub.auth.principal import Principal, Role, system_principal
from hub.auth.scopes import ScopeSet
from hub.crypto import keys
from hub.crypto.envelope import open_content
from hub.db.engine import create_engine
from hub.db.schema import audit_chain, break_glass
from hub.db.schema import resource as resource_table
from hub.rest.messages import FhirRequest
from hub.settings import Settings

SEED = int(os.environ.get("HUB_MATRIX_SEED") or random.SystemRandom().randrange(1, 1_000_000))
SCALE = float(os.environ.get("HUB_MATRIX_SCALE") or 1)
LOG_FILE = REPO / "var" / "consent-matrix.log"

# --- vocabulary -----------------------------------------------------------------------------

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IDENTIFIER_SYSTEM = "https://ehealth-hub.vn/test/consent-matrix"

NORMAL, AUDIT, ANY = "NORMAL", "AUDIT", "*"
SENSITIVE = ("HIV", "PSY", "SEX", "ETH", "STD", "GDIS")
EVERY_LABEL = frozenset({NORMAL, *SENSITIVE, "V"})  # what a deny without securityLabel hides
TREAT, HRESCH = "TREAT", "HRESCH"
DEFAULT_PURPOSE = {Role.CLINICIAN: TREAT, Role.PROXY: "FAMRQT", Role.PATIENT: "PATRQT"}

# The codes the fixture writes and the labels issue 4 gives them; checked against
# fhir/sensitive-categories.json by test_fixture_codes_follow_the_category_file.
OBSERVATION_CODES: list[tuple[str, str, frozenset[str]]] = [
    (LOINC, "718-7", frozenset()),  # hemoglobin
    (LOINC, "2345-7", frozenset()),  # glucose
    (LOINC, "8867-4", frozenset()),  # heart rate
    (LOINC, "7917-8", frozenset({"HIV"})),  # HIV 1 Ab
    (LOINC, "44249-1", frozenset({"PSY"})),  # PHQ-9
    (LOINC, "51969-4", frozenset({"GDIS"})),  # genetic analysis
]
CONDITION_CODES: list[tuple[str, str, frozenset[str]]] = [
    (ICD10, "J06.9", frozenset()),
    (ICD10, "E11.9", frozenset()),
    (ICD10, "I10", frozenset()),
    (ICD10, "F32.1", frozenset({"PSY"})),  # depression
    (ICD10, "F10.2", frozenset({"PSY", "ETH"})),  # alcohol dependence: mental health and substance use
    (ICD10, "B20", frozenset({"HIV"})),
    (ICD10, "A51.0", frozenset({"STD"})),
    (ICD10, "O09.9", frozenset({"SEX"})),
    (ICD10, "Q90.9", frozenset({"GDIS"})),
]
CODE_LABELS = {(s, c): labels for s, c, labels in OBSERVATION_CODES + CONDITION_CODES}
NORMAL_OBSERVATION_CODES = [c for c in OBSERVATION_CODES if not c[2]]

# R4 Patient compartment: the reference paths of the fixture's types that put a resource in
# a patient's compartment (CompartmentDefinition "patient"), by hand.
COMPARTMENT_PATHS = {
    "Patient": [],  # its own compartment only: Patient.link joins no records (issue 8, docs/access.md)
    "Observation": ["subject", "performer"],
    "Condition": ["subject", "asserter"],
    "Encounter": ["subject"],
    "Consent": ["patient"],
    "CareTeam": ["subject", "participant.member"],
    "RelatedPerson": ["patient"],
    "AuditEvent": ["agent.who", "entity.what"],
    "Provenance": ["target"],
    "Group": ["member.entity"],
}
# References held by R4 search parameters (what $everything follows to shared resources).
# CareTeam.managingOrganization and nested Consent provisions have no search parameter.
REFERENCE_PATHS = {
    "Patient": ["managingOrganization", "generalPractitioner", "link.other"],
    "Observation": ["subject", "performer"],
    "Condition": ["subject", "asserter"],
    "Encounter": ["subject", "participant.individual", "serviceProvider", "location.location"],
    "CareTeam": ["subject", "participant.member"],
    "Consent": ["patient", "provision.actor.reference", "organization", "performer"],
    "RelatedPerson": ["patient"],
    "AuditEvent": ["agent.who", "entity.what"],
    "Provenance": ["target", "agent.who"],
    "Group": ["member.entity"],
}
SHARED_TYPES = frozenset({"Organization", "Practitioner", "Location"})
DIRECTORY_TYPES = frozenset({
    "Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService",
    "Endpoint", "Schedule", "Slot",
})  # fmt: skip
ROLE_CEILING: dict[Role, frozenset[str]] = {
    Role.AUDITOR: frozenset({"AuditEvent", "Consent", "Provenance"}),
    Role.FACILITY_ADMIN: DIRECTORY_TYPES,
}
SEARCHED_TYPES = (
    "Patient", "Observation", "Condition", "Encounter", "Consent", "CareTeam", "RelatedPerson",
    "Provenance", "Group", "AuditEvent", "Organization", "Practitioner", "Location",
)  # fmt: skip
PATIENT_SCOPES = (
    "patient/*.rs patient/Consent.cruds patient/Appointment.cruds patient/QuestionnaireResponse.cru "
    "patient/AuditEvent.rs"
)
FACILITY_SCOPES = " ".join(f"user/{t}.cruds" for t in sorted(DIRECTORY_TYPES))
INSPECTOR_SCOPES = "user/Organization.rs user/Location.cruds user/Observation.cruds"
AUDITOR_SCOPES = "user/AuditEvent.rs user/Consent.rs user/Provenance.rs"


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def values_at(node: Any, path: str) -> list[Any]:
    items = [node]
    for part in path.split("."):
        found: list[Any] = []
        for item in items:
            value = item.get(part) if isinstance(item, dict) else None
            if isinstance(value, list):
                found.extend(value)
            elif value is not None:
                found.append(value)
        items = found
    return items


def refs_at(body: dict[str, Any], path: str) -> list[str]:
    return [v["reference"] for v in values_at(body, path) if isinstance(v, dict) and "reference" in v]


def codings(value: Any) -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        if isinstance(value.get("system"), str) and isinstance(value.get("code"), str):
            yield value["system"], value["code"]
        for key, item in value.items():
            if key != "meta":
                yield from codings(item)
    elif isinstance(value, list):
        for item in value:
            yield from codings(item)


def labels_of(body: dict[str, Any]) -> frozenset[str]:
    """Issue 4's labels: AUDIT for AuditEvents; else meta.security, coded categories and a Consent's
    provision.securityLabel; else NORMAL."""
    if body["resourceType"] == "AuditEvent":
        return frozenset({AUDIT})
    found: set[str] = set()
    for label in (body.get("meta") or {}).get("security", []):
        if label.get("system") == ACT_CODE and label.get("code") in SENSITIVE:
            found.add(label["code"])
        if label.get("system") == CONFIDENTIALITY and label.get("code") == "V":
            found.add("V")
    for pair in codings(body):
        found |= CODE_LABELS.get(pair, frozenset())
    if body["resourceType"] == "Consent":  # and the sensitive classes its provisions name, at any level
        provisions = [body.get("provision") or {}]
        while provisions:
            provision = provisions.pop()
            found |= {
                lab["code"] for lab in provision.get("securityLabel", []) if lab["code"] in (*SENSITIVE, "V")
            }
            provisions += provision.get("provision", [])
    return frozenset(found) or frozenset({NORMAL})


def compartments_of(body: dict[str, Any]) -> frozenset[str]:
    found = {body["id"]} if body["resourceType"] == "Patient" else set()
    for path in COMPARTMENT_PATHS.get(body["resourceType"], ()):
        found |= {r.split("/", 1)[1] for r in refs_at(body, path) if r.startswith("Patient/")}
    return frozenset(found)


def shared_references(body: dict[str, Any]) -> set[str]:
    return {
        r
        for path in REFERENCE_PATHS.get(body["resourceType"], ())
        for r in refs_at(body, path)
        if r.split("/", 1)[0] in SHARED_TYPES
    }


def body_of(item: Item) -> dict[str, Any]:
    assert item.body is not None, f"{item.key} is deleted"
    return item.body


def parse_day(text: str | None) -> date | None:
    return date.fromisoformat(text[:10]) if text else None


def today() -> date:
    return datetime.now(UTC).date()


# --- the world and the oracle ---------------------------------------------------------------


@dataclass
class Item:
    type: str
    id: str
    body: dict[str, Any] | None  # None once deleted
    version: int
    versions: list[tuple[int, bool]]  # (version, is a deletion)
    labels: frozenset[str]  # every version's: a later version never makes an earlier one readable
    comps: frozenset[str]  # every version's compartments: a record's history stays its patients'
    current_comps: frozenset[str]  # the compartments of the current (or last live) version

    @property
    def key(self) -> str:
        return f"{self.type}/{self.id}"

    @property
    def deleted(self) -> bool:
        return self.body is None


@dataclass(frozen=True)
class Grant:
    patient: str
    grantee: str  # "*" = anyone
    purpose: str  # "*" = any
    effect: str  # permit | deny
    labels: frozenset[str]
    basis: str  # policy | consent | proxy
    start: date | None = None
    end: date | None = None

    def in_force(self, day: date) -> bool:
        return (self.start is None or self.start <= day) and (self.end is None or day <= self.end)


@dataclass(frozen=True)
class Scope:
    context: str
    type: str
    perms: frozenset[str]
    query: tuple[tuple[str, str], ...]


_SCOPE_RE = re.compile(r"^(patient|user|system)/(\*|[A-Za-z]+)\.([cruds]+)(?:\?(.*))?$")


def parse_scopes(text: str) -> list[Scope]:
    found = []
    for item in text.split():
        match = _SCOPE_RE.match(item)
        if match:
            context, res_type, perms, query = match.groups()
            found.append(Scope(context, res_type, frozenset(perms), tuple(parse_qsl(query or ""))))
    return found


@dataclass
class Who:
    """A principal, as the oracle knows it."""

    name: str
    role: Role
    scopes: str
    fhir_user: str | None = None
    orgs: tuple[str, ...] = ()
    patient: str | None = None  # SMART launch patient
    purpose: str | None = None  # stated with X-Purpose-Of-Use
    policy: str = "moh"

    def __post_init__(self) -> None:
        self.parsed = parse_scopes(self.scopes)

    @property
    def principal(self) -> Principal:
        if self.role is Role.ADMIN:
            return system_principal(self.name)
        patient = self.patient
        if patient is None and self.role is Role.PATIENT and self.fhir_user:
            patient = self.fhir_user.split("/", 1)[1]
        return Principal(
            self.name,
            self.role,
            ScopeSet.parse(self.scopes),
            fhir_user=self.fhir_user,
            organizations=self.orgs,
            patient=patient,
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"x-purpose-of-use": self.purpose} if self.purpose else {}

    @property
    def used_purpose(self) -> str:
        return self.purpose or DEFAULT_PURPOSE.get(self.role, "HOPERAT")

    def __str__(self) -> str:
        return self.name


class World:
    """Everything stored, as the test wrote it (AuditEvents as the hub wrote them)."""

    def __init__(self) -> None:
        self.items: dict[str, Item] = {}
        self.by_type: dict[str, dict[str, Item]] = {}
        self.break_glass: dict[tuple[str, str], float] = {}  # (fhirUser, patient) -> expiry
        self.generation = 0
        self._grants: list[Grant] | None = None
        self._memo: dict[tuple[Any, ...], Any] = {}

    def changed(self) -> None:
        self.generation += 1
        self._grants = None
        self._memo.clear()

    def record(self, body: dict[str, Any], version: int | None = None) -> Item:
        key = f"{body['resourceType']}/{body['id']}"
        item = self.items.get(key)
        body = orjson.loads(orjson.dumps(body))
        comps, labels = compartments_of(body), labels_of(body)
        if item is not None and version is not None and version == item.version:
            item.body = body  # the hub kept the version: nothing changed
            return item
        if item is None:
            item = Item(body["resourceType"], body["id"], body, 1, [(1, False)], labels, comps, comps)
            self.items[key] = item
            self.by_type.setdefault(item.type, {})[key] = item
        else:
            item.version = version or item.version + 1
            item.versions.append((item.version, False))
            item.body = body
            item.labels |= labels
            item.comps |= comps
            item.current_comps = comps
        if body["resourceType"] != "AuditEvent":
            self.changed()
        return item

    def deleted(self, key: str) -> None:
        item = self.items[key]
        item.version += 1
        item.versions.append((item.version, True))
        item.body = None
        self.changed()

    def of_type(self, res_type: str) -> list[Item]:
        return list(self.by_type.get(res_type, {}).values())

    def live(self, res_type: str | None = None) -> list[Item]:
        items = self.items.values() if res_type is None else self.by_type.get(res_type, {}).values()
        return [i for i in items if not i.deleted]

    def get(self, key: str) -> Item | None:
        return self.items.get(key)

    # --- grants, from the rules of issue 4 ---

    def grants(self) -> list[Grant]:
        if self._grants is None:
            self._grants = [g for item in self.live() for g in _grants_of(item)]
        return self._grants

    def identities(self, who: Who) -> set[str]:
        memo = ("identities", who.name)
        if memo not in self._memo:
            self._memo[memo] = self._identities(who)
        return self._memo[memo]  # type: ignore[no-any-return]

    def _identities(self, who: Who) -> set[str]:
        found = {ANY}
        if who.role in (Role.CLINICIAN, Role.PROXY) and who.fhir_user:
            found.add(who.fhir_user)
        if who.role is Role.CLINICIAN:
            found |= {f"Organization/{o}" for o in who.orgs}
            found |= {
                team.key
                for team in self.live("CareTeam")
                if team.body is not None
                and team.body.get("status") == "active"
                and who.fhir_user in refs_at(team.body, "participant.member")
            }
        return found

    def granted(self, who: Who, patient: str, labels: frozenset[str]) -> bool:
        """Some permit grant for the patient covers every label, and no deny touches one."""
        memo = ("granted", who.name, patient, labels)
        if memo in self._memo:
            return self._memo[memo]
        ids, day, purpose = self.identities(who), today(), who.used_purpose
        applicable = [
            g
            for g in self.grants()
            if g.patient == patient
            and g.grantee in ids
            and g.purpose in (purpose, ANY)
            and g.in_force(day)
            and (g.basis != "policy" or who.policy == "moh")
        ]
        permitted = any(g.effect == "permit" and labels <= g.labels for g in applicable)
        denied = any(g.effect == "deny" and labels & g.labels for g in applicable)
        self._memo[memo] = answer = permitted and not denied
        return answer

    def glass_open(self, who: Who, patient: str) -> bool:
        expiry = self.break_glass.get((who.fhir_user or "", patient))
        return expiry is not None and expiry > time.time()

    def context(self, who: Who) -> set[str] | None:
        """The patients patient/ scopes confine a principal to (None: not confined)."""
        readable = [s for s in who.parsed if s.perms & {"r", "s"}]
        if not readable or any(s.context != "patient" for s in readable):
            return None
        if who.role is Role.PATIENT:
            return {(who.fhir_user or "/").split("/", 1)[1]}
        if who.patient:
            return {who.patient}
        if who.role is Role.PROXY:
            return {
                rp.body["patient"]["reference"].split("/", 1)[1]
                for rp in self.live("RelatedPerson")
                if rp.key == who.fhir_user
                and rp.body is not None
                and rp.body.get("active", True) is not False
                and _in_period(rp.body.get("period"))  # an ended RelatedPerson represents no one (D17)
            }
        return set()

    def record_open(self, who: Who, patient: str, labels: frozenset[str]) -> bool:
        if who.role is Role.PATIENT:
            return who.fhir_user == f"Patient/{patient}"
        if who.role is Role.CLINICIAN and self.glass_open(who, patient) and AUDIT not in labels:
            return True
        if who.role not in (Role.CLINICIAN, Role.PROXY):
            return False
        return self.granted(who, patient, labels)

    def sees(self, who: Who, item: Item) -> bool:
        memo = ("sees", who.name, item.key, item.version)
        if memo not in self._memo:
            self._memo[memo] = self._sees(who, item)
        return self._memo[memo]

    def _sees(self, who: Who, item: Item) -> bool:
        if not scope_admits(who, item):
            return False
        if who.role in (Role.ADMIN, Role.SERVICE, Role.AUDITOR):
            return True
        if not item.comps:  # issue 8: an AuditEvent naming no patient is for auditors and admins
            return item.type != "AuditEvent"
        if who.role in (Role.FACILITY_ADMIN, Role.INSPECTOR):
            return False
        context = self.context(who)
        if context is not None and not item.comps & context:
            return False
        return any(self.record_open(who, patient, item.labels) for patient in item.comps)

    def may_write(self, who: Who, patients: set[str]) -> bool:
        """A write into these records: allowed when the writer could read NORMAL data of each."""
        if who.role in (Role.ADMIN, Role.SERVICE):
            return True
        if who.role in (Role.FACILITY_ADMIN, Role.INSPECTOR, Role.AUDITOR):
            return not patients
        context = self.context(who)
        if context is not None and not patients <= context:
            return False
        return all(self.record_open(who, p, frozenset({NORMAL})) for p in patients)


def _grants_of(item: Item) -> list[Grant]:
    body = item.body
    assert body is not None
    normal = frozenset({NORMAL})
    if item.type == "Patient":
        refs = refs_at(body, "managingOrganization") + refs_at(body, "generalPractitioner")
        return [Grant(item.id, r, TREAT, "permit", normal, "policy") for r in refs]
    if item.type == "CareTeam" and body.get("status") == "active":
        patient = body["subject"]["reference"].split("/", 1)[1]
        members = [item.key, *refs_at(body, "participant.member"), *refs_at(body, "managingOrganization")]
        return [Grant(patient, m, TREAT, "permit", normal, "policy") for m in members]
    if item.type == "RelatedPerson" and body.get("active", True) is not False:
        patient = body["patient"]["reference"].split("/", 1)[1]
        return [Grant(patient, item.key, ANY, "permit", normal, "proxy")]
    if item.type == "Consent" and body.get("status") == "active":
        return list(_consent_grants(body))
    return []


def _consent_grants(consent: dict[str, Any]) -> Iterable[Grant]:
    patient = consent["patient"]["reference"].split("/", 1)[1]

    def walk(provision: dict[str, Any], inherited: dict[str, Any]) -> Iterable[Grant]:
        effect = provision.get("type") or inherited["type"] or "permit"
        actors = [a["reference"]["reference"] for a in provision.get("actor", [])] or inherited["actors"]
        purposes = [p["code"] for p in provision.get("purpose", [])] or inherited["purposes"]
        if "period" in provision:
            period = (parse_day(provision["period"].get("start")), parse_day(provision["period"].get("end")))
        else:
            period = inherited["period"]
        codes = [label["code"] for label in provision.get("securityLabel", [])]
        if codes:
            labels = frozenset(NORMAL if c in ("N", "L", "U", "NORMAL") else c for c in codes)
        else:
            labels = frozenset({NORMAL}) if effect == "permit" else EVERY_LABEL
        for actor in actors:
            for purpose in purposes:
                yield Grant(patient, actor, purpose, effect, labels, "consent", *period)
        context = {"type": effect, "actors": actors, "purposes": purposes, "period": period}
        for child in provision.get("provision", []):
            yield from walk(child, context)

    yield from walk(
        consent["provision"], {"type": None, "actors": [ANY], "purposes": [ANY], "period": (None, None)}
    )


def may(who: Who, res_type: str, permission: str) -> bool:
    """May the principal attempt this interaction on the type at all (else 403)?"""
    ceiling = ROLE_CEILING.get(who.role)
    if ceiling is not None and res_type not in ceiling:
        return False
    return any(permission in s.perms and s.type in ("*", res_type) for s in who.parsed)


def may_system(who: Who, permission: str) -> bool:
    return any(permission in s.perms and s.type == "*" for s in who.parsed)


def scope_admits(who: Who, item: Item) -> bool:
    ceiling = ROLE_CEILING.get(who.role)
    if ceiling is not None and item.type not in ceiling:
        return False
    for scope in who.parsed:
        if not scope.perms & {"r", "s"} or scope.type not in ("*", item.type):
            continue
        if not scope.query:
            return True
        # Granular scopes of the fixture: category=<code>. A deleted version has no index
        # rows, so no granular scope admits it.
        if item.body is not None and all(
            key == "category" and value in {c for _, c in codings(item.body.get("category", []))}
            for key, value in scope.query
        ):
            return True
    return False


# --- building the world ---------------------------------------------------------------------


def consent(cid: str, patient: str, provision: dict[str, Any], status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": ref(f"Patient/{patient}"),
        "provision": provision,
    }


def actor(target: str) -> dict[str, Any]:
    return {"role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]}, "reference": ref(target)}


def security(*codes: str) -> list[dict[str, str]]:
    return [
        {"system": CONFIDENTIALITY, "code": c} if c in ("N", "V") else {"system": ACT_CODE, "code": c}
        for c in codes
    ]


@dataclass
class Fixture:
    """The names the generator used, for picking principals and operations."""

    orgs: list[str]
    practitioners: list[str]
    patients: list[str]
    care_teams: dict[str, str] = field(default_factory=dict)  # patient -> CareTeam id
    team_members: dict[str, list[str]] = field(default_factory=dict)  # active CareTeam -> practitioners
    related: dict[str, str] = field(default_factory=dict)  # RelatedPerson id -> patient
    group: str = "grp-1"


def generate(rng: random.Random, n_patients: int) -> tuple[Fixture, list[dict[str, Any]]]:
    orgs = ["org-1", "org-2", "org-3"]
    practitioners = [f"dr-{k}" for k in range(1, 7)]
    patients = [f"pat-{k}" for k in range(1, n_patients + 1)]
    fx = Fixture(orgs, practitioners, patients)
    day = today()
    periods = {
        "current": {"start": str(day - timedelta(days=30)), "end": str(day + timedelta(days=30))},
        "expired": {"start": str(day - timedelta(days=90)), "end": str(day - timedelta(days=3))},
        "future": {"start": str(day + timedelta(days=3)), "end": str(day + timedelta(days=90))},
    }
    out: list[dict[str, Any]] = []
    out += [{"resourceType": "Organization", "id": o, "name": f"Bệnh viện {o}"} for o in orgs]
    out += [
        {"resourceType": "Practitioner", "id": d, "name": [{"family": "Bác sĩ", "given": [d]}]}
        for d in practitioners
    ]
    out += [{"resourceType": "Location", "id": loc, "name": loc} for loc in ("loc-1", "loc-2")]
    families = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Vũ"]
    for k, p in enumerate(patients):
        body: dict[str, Any] = {
            "resourceType": "Patient",
            "id": p,
            "name": [{"family": rng.choice(families), "given": [f"Bệnh nhân {k + 1}"]}],
            "gender": rng.choice(["male", "female"]),
            "birthDate": f"{rng.randint(1940, 2015)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
        }
        org = rng.choice([*orgs, None])
        if org:
            body["managingOrganization"] = ref(f"Organization/{org}")
        if rng.random() < 0.5:
            body["generalPractitioner"] = [ref(f"Practitioner/{rng.choice(practitioners[:5])}")]
        if rng.random() < 0.1:
            body["meta"] = {"security": security("V")}
        if k and rng.random() < 0.1:
            body["link"] = [{"other": ref(f"Patient/{patients[k - 1]}"), "type": "seealso"}]
        out.append(body)
    for p in patients:
        if rng.random() < 0.55:
            team = f"ct-{p}"
            fx.care_teams[p] = team
            members = rng.sample(practitioners[:5], rng.randint(1, 2))
            status = rng.choice(["active", "active", "active", "inactive", "proposed"])
            if status == "active":
                fx.team_members[team] = members
            body = {
                "resourceType": "CareTeam",
                "id": team,
                "status": status,
                "subject": ref(f"Patient/{p}"),
                "participant": [{"member": ref(f"Practitioner/{m}")} for m in members],
            }
            if rng.random() < 0.3:
                body["participant"].append({"member": ref(f"Organization/{rng.choice(orgs)}")})
            if rng.random() < 0.3:
                body["managingOrganization"] = [ref(f"Organization/{rng.choice(orgs)}")]
            out.append(body)
        if rng.random() < 0.45:
            rp = f"rp-{p}"
            fx.related[rp] = p
            out.append(
                {
                    "resourceType": "RelatedPerson",
                    "id": rp,
                    "active": rng.random() < 0.75,
                    "patient": ref(f"Patient/{p}"),
                    "name": [{"family": "Người nhà", "given": [rp]}],
                }
            )
    for p in patients:
        for n in range(rng.randint(3, 6)):
            out.append(_clinical(rng, p, n, patients))
        if rng.random() < 0.35:
            target = next(b for b in out if b.get("subject") == ref(f"Patient/{p}"))
            out.append(
                {
                    "resourceType": "Provenance",
                    "id": f"prov-{p}",
                    "target": [ref(f"{target['resourceType']}/{target['id']}"), ref(f"Patient/{p}")],
                    "recorded": "2026-01-02T03:04:05Z",
                    "agent": [{"who": ref(f"Practitioner/{rng.choice(practitioners)}")}],
                }
            )
        for n in range(rng.choice([0, 1, 1, 2, 3])):
            out.append(_random_consent(rng, f"cons-{p}-{n}", p, fx, periods))
    for n in range(2):  # food-safety data: in no patient's compartment
        out.append(
            {
                "resourceType": "Observation",
                "id": f"env-{n}",
                "status": "final",
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "survey"}]}],
                "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
                "subject": ref(f"Location/loc-{n + 1}"),
            }
        )
    out.append(
        {
            "resourceType": "Group",
            "id": fx.group,
            "type": "person",
            "actual": True,
            "member": [{"entity": ref(f"Patient/{p}")} for p in rng.sample(patients, 3)],
        }
    )
    return fx, out


def _clinical(rng: random.Random, patient: str, n: int, patients: list[str]) -> dict[str, Any]:
    kind = rng.choices(["Observation", "Condition", "Encounter"], [5, 3, 2])[0]
    how = rng.choices(["normal", "code", "security"], [6, 2.5, 1.5])[0]
    body: dict[str, Any] = {"resourceType": kind, "id": f"{kind[:3].lower()}-{patient}-{n}"}
    codes = OBSERVATION_CODES if kind == "Observation" else CONDITION_CODES
    normal_codes = [c for c in codes if not c[2]]
    system, code, _ = rng.choice([c for c in codes if c[2]] if how == "code" else normal_codes)
    if how == "security":
        body["meta"] = {"security": security(rng.choice([*SENSITIVE, "V"]))}
    subject = ref(f"Patient/{patient}")
    if kind == "Observation":
        body |= {
            "status": "final",
            "category": [
                {"coding": [{"system": OBS_CATEGORY, "code": rng.choice(["laboratory", "vital-signs"])}]}
            ],
            "code": {"coding": [{"system": system, "code": code}]},
            "subject": subject,
        }
        performer = rng.choices(["dr", "org", "patient", "none"], [6, 1, 1, 2])[0]
        if performer == "dr":
            body["performer"] = [ref(f"Practitioner/dr-{rng.randint(1, 6)}")]
        elif performer == "org":
            body["performer"] = [ref(f"Organization/org-{rng.randint(1, 3)}")]
        elif performer == "patient":
            body["performer"] = [ref(f"Patient/{rng.choice(patients)}")]  # a second compartment
    elif kind == "Condition":
        body |= {"code": {"coding": [{"system": system, "code": code}]}, "subject": subject}
        if rng.random() < 0.5:
            body["asserter"] = ref(f"Practitioner/dr-{rng.randint(1, 6)}")
    else:
        body |= {
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": subject,
            "participant": [{"individual": ref(f"Practitioner/dr-{rng.randint(1, 6)}")}],
            "serviceProvider": ref(f"Organization/org-{rng.randint(1, 3)}"),
            "location": [{"location": ref(f"Location/loc-{rng.randint(1, 2)}")}],
        }
        if how != "security":
            body["reasonCode"] = [{"coding": [{"system": system, "code": code}]}]
    return body


def _random_actor(rng: random.Random, patient: str, fx: Fixture) -> list[str]:
    choice = rng.choices(["none", "dr", "org", "team", "rp", "pair"], [2, 3, 2, 3, 1, 2])[0]
    if choice == "none":
        return []
    if choice == "dr":
        return [f"Practitioner/{rng.choice(fx.practitioners[:5])}"]
    if choice == "org":
        return [f"Organization/{rng.choice(fx.orgs)}"]
    if choice == "team" and patient in fx.care_teams:
        return [f"CareTeam/{fx.care_teams[patient]}"]
    if choice == "rp" and fx.related:
        return [f"RelatedPerson/{rng.choice(sorted(fx.related))}"]
    # A practitioner and some care team together, preferably an active team of another
    # patient the practitioner is not on: naming both must not make them a member.
    doctor = rng.choice(fx.practitioners[:5])
    teams = sorted(t for t, members in fx.team_members.items() if doctor not in members) or sorted(
        fx.care_teams.values()
    )
    return [f"Practitioner/{doctor}"] + ([f"CareTeam/{rng.choice(teams)}"] if teams else [])


def _random_consent(
    rng: random.Random, cid: str, patient: str, fx: Fixture, periods: dict[str, dict[str, str]]
) -> dict[str, Any]:
    kind = rng.choices(["permit", "sensitive", "deny", "deny-sensitive", "nested"], [3, 3, 1.5, 1.5, 2])[0]
    status = rng.choices(["active", "inactive", "rejected", "draft"], [6, 2, 1, 1])[0]
    provision: dict[str, Any] = {"type": "deny" if kind.startswith("deny") else "permit"}
    actors = _random_actor(rng, patient, fx)
    if actors:
        provision["actor"] = [actor(a) for a in actors]
    purpose = rng.choice([None, None, TREAT, HRESCH])
    if purpose:
        provision["purpose"] = [{"system": ACT_REASON, "code": purpose}]
    period = rng.choice([None, None, "current", "expired", "future"])
    if period:
        provision["period"] = periods[period]
    if kind in ("sensitive", "nested") and rng.random() < 0.8:
        codes = rng.choice([["HIV"], ["PSY"], ["PSY", "ETH"], ["N", "HIV"], ["N", "PSY"], [*SENSITIVE, "V"]])
        provision["securityLabel"] = security(*codes)
    elif kind == "deny-sensitive":
        provision["securityLabel"] = security(*rng.choice([["HIV"], ["PSY"], ["N"], ["SEX", "STD"]]))
    if kind == "nested":
        child: dict[str, Any] = {"type": "deny"}
        if rng.random() < 0.5:
            child["securityLabel"] = security(rng.choice(["PSY", "HIV", "N"]))
        if rng.random() < 0.3:
            child["actor"] = [actor(f"Practitioner/{rng.choice(fx.practitioners[:5])}")]
        provision["provision"] = [child]
    return consent(cid, patient, provision, status)


def principals(rng: random.Random, fx: Fixture) -> list[Who]:
    def orgs() -> tuple[str, ...]:
        return tuple(sorted(rng.sample(fx.orgs, rng.choice([0, 1, 1, 2]))))

    who = [
        Who("service", Role.SERVICE, "system/*.cruds"),
        Who("auditor", Role.AUDITOR, AUDITOR_SCOPES),
        Who("facility-admin", Role.FACILITY_ADMIN, FACILITY_SCOPES, orgs=("org-1",)),
        Who("inspector", Role.INSPECTOR, INSPECTOR_SCOPES),
    ]
    doctors = {d: orgs() for d in fx.practitioners[:5]}
    who += [Who(d, Role.CLINICIAN, "user/*.cruds", f"Practitioner/{d}", o) for d, o in doctors.items()]
    who += [
        Who("dr-1.research", Role.CLINICIAN, "user/*.cruds", "Practitioner/dr-1", doctors["dr-1"], purpose=HRESCH),
        Who("dr-2.obs", Role.CLINICIAN, "user/Observation.rs", "Practitioner/dr-2", doctors["dr-2"]),
        Who("dr-3.lab", Role.CLINICIAN, "user/Observation.rs?category=laboratory", "Practitioner/dr-3", doctors["dr-3"]),
        Who(
            "dr-4.launch",
            Role.CLINICIAN,
            "patient/*.rs",
            "Practitioner/dr-4",
            doctors["dr-4"],
            patient=rng.choice(fx.patients),
        ),
        Who("dr-5.consent-only", Role.CLINICIAN, "user/*.cruds", "Practitioner/dr-5", doctors["dr-5"], policy="consent-only"),
        Who("dr-2.consent-only", Role.CLINICIAN, "user/*.cruds", "Practitioner/dr-2", doctors["dr-2"], policy="consent-only"),
    ]  # fmt: skip
    for p in rng.sample(fx.patients, 2):
        who.append(Who(f"{p}.self", Role.PATIENT, PATIENT_SCOPES, f"Patient/{p}"))
    related = sorted(fx.related)
    rng.shuffle(related)
    for n, rp in enumerate(related[:2]):
        scopes = PATIENT_SCOPES if n == 0 else "user/*.rs"
        who.append(Who(f"{rp}.proxy", Role.PROXY, scopes, f"RelatedPerson/{rp}"))
    return who


ADMIN = Who("admin", Role.ADMIN, "system/*.cruds")
# The admin changes the world for the patients: withdrawing a deny needs a stated reason.
ADMIN_REASON = {"x-access-reason": "consent-matrix world change"}


# --- transports -----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    raw: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return orjson.loads(self.raw) if self.raw else None


ROUTER_BASE = "http://hub.test/fhir"


def _in_period(period: Any) -> bool:
    """Whether today lies within a RelatedPerson.period (dates or dateTimes; open ends)."""
    if not isinstance(period, dict):
        return True
    today = datetime.now(UTC).date().isoformat()
    start, end = str(period.get("start", ""))[:10], str(period.get("end", ""))[:10]
    return (not start or start <= today) and (not end or today <= end)


class RouterHub:
    """Requests straight into the FHIR router, with the principal set."""

    def __init__(self, url: str, export_dir: Path) -> None:
        self.engine = create_engine(url)
        self.export_dir = export_dir
        self.routers = {
            policy: build_router(
                # A configured BASE_URL: absolute references under it are the hub's own
                # (without one only relative references are, docs/access.md).
                Settings(
                    database_url=url, export_dir=export_dir, consent_policy=policy, base_url=ROUTER_BASE
                ),
                self.engine,
            )
            for policy in ("moh", "consent-only")
        }
        self.requests = 0

    def call(
        self,
        who: Who | None,
        method: str,
        path: str,
        query: Iterable[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        self.requests += 1
        request = FhirRequest(
            method,
            path,
            list(query),
            {**(who.headers if who else {}), **(headers or {})},
            body=orjson.dumps(body) if body is not None else None,
            principal=who.principal if who else None,
        )
        response = self.routers[who.policy if who else "moh"].handle(request)
        return Answer(response.status, response.body or b"", dict(response.headers))

    def export_file(self, who: Who, url: str) -> bytes:
        job, name = urlsplit(url).path.split("/")[-2:]
        return (self.export_dir / job / name).read_bytes()


class HttpHub:
    """Requests over HTTP with bearer tokens minted for each principal's account."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.engine = server.engine
        self.client = httpx.Client(timeout=60)
        self.tokens: dict[str, str] = {}
        self.requests = 0

    def token(self, who: Who) -> str:
        if who.name not in self.tokens:
            self.tokens[who.name] = (
                self.server.admin_token
                if who.role is Role.ADMIN
                else make_token(
                    self.server,
                    role=who.role,
                    fhir_user=who.fhir_user,
                    organizations=who.orgs,
                    scopes=who.scopes,
                    username=f"matrix-{who.name}",
                )
            )
        return self.tokens[who.name]

    def call(
        self,
        who: Who | None,
        method: str,
        path: str,
        query: Iterable[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        self.requests += 1
        sent = {"accept": "application/fhir+json", **(who.headers if who else {}), **(headers or {})}
        if who is not None:
            sent["authorization"] = f"Bearer {self.token(who)}"
        if body is not None:
            sent["content-type"] = "application/fhir+json"
        url = f"{self.server.base}/{path}" if path else self.server.base
        response = self.client.request(
            method,
            url,
            params=list(query),
            headers=sent,
            content=orjson.dumps(body) if body is not None else None,
        )
        return Answer(
            response.status_code, response.content, {k.title(): v for k, v in response.headers.items()}
        )

    def export_file(self, who: Who, url: str) -> bytes:
        response = self.client.get(url, headers={"authorization": f"Bearer {self.token(who)}"})
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        return response.content

    def export_file_status(self, who: Who | None, url: str) -> int:
        headers = {"authorization": f"Bearer {self.token(who)}"} if who is not None else {}
        return self.client.get(url, headers=headers).status_code


# --- the matrix -----------------------------------------------------------------------------


def entry_keys(bundle: dict[str, Any], mode: str | None = "match") -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if "resource" in e
        and e["resource"]["resourceType"] != "OperationOutcome"
        and (mode is None or e.get("search", {}).get("mode") == mode)
    ]


def history_keys(bundle: dict[str, Any]) -> list[tuple[str, int]]:
    found = []
    for e in bundle.get("entry", []):
        res_type, res_id = e["fullUrl"].split("/")[-2:]
        version = int(e["response"]["etag"].strip('W/"'))
        found.append((f"{res_type}/{res_id}", version))
    return found


class Matrix:
    def __init__(self, hub: RouterHub | HttpHub, world: World, rng: random.Random, label: str) -> None:
        self.hub, self.world, self.rng, self.label = hub, world, rng, label
        self.checks = 0
        self.failures: list[tuple[str, str]] = []  # (kind, description)
        self.audit_seq = 0
        self.templates: dict[str, bytes] = {}

    # --- bookkeeping ---

    def fail(self, kind: str, who: Who, what: str, detail: str) -> None:
        self.failures.append((kind, f"[{kind}] {who} {what}: {detail}"))

    @property
    def leaks(self) -> int:
        return sum(1 for kind, _ in self.failures if kind == "LEAK")

    def compare(
        self,
        who: Who,
        what: str,
        got: list[str],
        expected: set[str],
        universe: int,
        *,
        total: int | None = None,
        complete: bool = True,
    ) -> None:
        """Returned ids against the oracle's. ``complete=False`` when the answer is one page
        of more than the page size: then only leaks and the total are checked."""
        self.checks += max(universe, len(got), 1)
        if len(set(got)) != len(got):
            dupes = sorted({g for g in got if got.count(g) > 1})
            self.fail("DUPLICATE", who, what, f"returned twice: {dupes[:5]}")
        leaked = set(got) - expected
        if leaked:
            self.fail("LEAK", who, what, f"returned hidden {sorted(leaked)[:8]} ({len(leaked)})")
        missing = expected - set(got)
        if complete and missing:
            self.fail("MISSING", who, what, f"withheld visible {sorted(missing)[:8]} ({len(missing)})")
        if total is not None and total != len(expected):
            kind = "LEAK" if total > len(expected) else "MISSING"
            self.fail(kind, who, what, f"total {total}, oracle {len(expected)}")

    def status(self, who: Who, what: str, answer: Answer, expected: int) -> bool:
        self.checks += 1
        if answer.status != expected:
            kind = (
                "LEAK"
                if answer.status < 300 <= expected or (expected == 404 and answer.status == 410)
                else "STATUS"
            )
            self.fail(kind, who, what, f"status {answer.status}, oracle {expected}: {answer.raw[:300]!r}")
            return False
        if expected >= 400:
            body = answer.json
            if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
                self.fail(
                    "STATUS", who, what, f"{expected} without an OperationOutcome: {answer.raw[:200]!r}"
                )
        return True

    def refresh_audit(self) -> None:
        """AuditEvents the hub wrote since the last look, straight from the tables (no request),
        in the audit chain's order: the order they committed in (pids are allocated in blocks
        per connection, so an $export job's event may have a lower pid than earlier ones)."""
        with self.hub.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit_chain.c.seq, audit_chain.c.res_id, resource_table.c.content)
                .join(
                    resource_table,
                    sa.and_(
                        resource_table.c.res_type == "AuditEvent",
                        resource_table.c.res_id == audit_chain.c.res_id,
                    ),
                )
                .where(audit_chain.c.seq > self.audit_seq)
                .order_by(audit_chain.c.seq)
            ).all()
        # Sealed at rest (issue 8): opened with this database's own keyring, bound explicitly
        # (no process-wide keyring stands in for it).
        with keys.bound(self.hub.engine):
            for seq, res_id, content in rows:
                self.audit_seq = seq
                # PostgreSQL hands the JSON back parsed, SQLite as text.
                raw = content.encode() if isinstance(content, str) else content
                raw = raw if isinstance(raw, bytes) else orjson.dumps(raw)
                self.world.record(orjson.loads(open_content(raw, "AuditEvent", res_id)))

    def call(
        self, who: Who | None, method: str, path: str, query: Iterable[tuple[str, str]] = (), **kw: Any
    ) -> Answer:
        self.refresh_audit()
        return self.hub.call(who, method, path, query, **kw)

    # --- writes by the admin ---

    def put(self, body: dict[str, Any]) -> None:
        path = f"{body['resourceType']}/{body['id']}"
        answer = self.call(ADMIN, "PUT", path, headers=ADMIN_REASON, body=body)
        assert answer.status in (200, 201), answer.raw[:500]
        version = int(answer.json["meta"]["versionId"])
        self.world.record(body, version)

    def delete(self, key: str) -> None:
        answer = self.call(ADMIN, "DELETE", key, headers=ADMIN_REASON)
        assert answer.status == 204, answer.raw[:300]
        self.world.deleted(key)

    def load(self, bodies: list[dict[str, Any]]) -> None:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": b, "request": {"method": "PUT", "url": f"{b['resourceType']}/{b['id']}"}}
                for b in bodies
            ],
        }
        answer = self.call(ADMIN, "POST", "", body=bundle)
        assert answer.status == 200, answer.raw[:1000]
        for body in bodies:
            self.world.record(body)

    # --- the operations ---

    def expected(self, who: Who, res_type: str) -> set[str]:
        return {i.key for i in self.world.live(res_type) if self.world.sees(who, i)}

    def search(self, who: Who, res_type: str) -> None:
        what = f"GET {res_type}?_total=accurate"
        answer = self.call(who, "GET", res_type, [("_total", "accurate"), ("_count", "1000")])
        if (
            not self.status(who, what, answer, 200 if may(who, res_type, "s") else 403)
            or answer.status != 200
        ):
            return
        expected = self.expected(who, res_type)
        self.compare(
            who, what, entry_keys(answer.json), expected, len(self.world.of_type(res_type)),
            total=answer.json.get("total"), complete=len(expected) <= 1000,
        )  # fmt: skip

    def paging(self, who: Who, res_type: str) -> None:
        expected = self.expected(who, res_type)
        count = max(2, len(expected) // 3)
        query = [("_total", "accurate"), ("_count", str(count))]
        what = f"GET {res_type}?_count={count} (paged)"
        got: list[str] = []
        for _ in range(20):
            answer = self.call(who, "GET", res_type, query)
            if not self.status(who, what, answer, 200):
                return
            bundle = answer.json
            if bundle.get("total") != len(expected):
                self.fail("LEAK" if (bundle.get("total") or 0) > len(expected) else "MISSING", who, what,
                          f"page total {bundle.get('total')}, oracle {len(expected)}")  # fmt: skip
            got += entry_keys(bundle)
            following = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
            if not following:
                break
            query = parse_qsl(urlsplit(following[0]).query)
        self.compare(who, what, got, expected, len(self.world.of_type(res_type)))

    def not_found_template(self, who: Who, res_type: str, suffix: str = "") -> bytes:
        key = f"{res_type}{suffix}"
        if key not in self.templates:
            unknown = f"zz-unknown-{uuid.uuid4().hex[:8]}"
            answer = self.call(who, "GET", f"{res_type}/{unknown}{suffix}")
            assert answer.status == 404, answer.raw[:300]
            self.templates[key] = answer.raw.replace(unknown.encode(), b"{id}")
        return self.templates[key]

    def read(self, who: Who, item: Item) -> None:
        what = f"GET {item.key}"
        answer = self.call(who, "GET", item.key)
        if not may(who, item.type, "r"):
            self.status(who, what, answer, 403)
            return
        visible = self.world.sees(who, item)
        expected = (410 if item.deleted else 200) if visible else 404
        if not self.status(who, what, answer, expected):
            return
        if expected == 200 and answer.json.get("id") != item.id:
            self.fail("STATUS", who, what, f"body is {answer.json.get('id')}")
        if expected == 404:
            self.same_as_unknown(who, what, answer, item, "")

    def same_as_unknown(self, who: Who, what: str, answer: Answer, item: Item, suffix: str) -> None:
        template = self.not_found_template(who, item.type, suffix)
        self.checks += 1
        if answer.raw.replace(item.id.encode(), b"{id}") != template:
            self.fail(
                "LEAK",
                who,
                what,
                f"404 body differs from an unknown id's: {answer.raw[:300]!r} vs {template[:300]!r}",
            )

    def vread(self, who: Who, item: Item) -> None:
        version, deletion = self.rng.choice(item.versions)
        what = f"GET {item.key}/_history/{version}"
        answer = self.call(who, "GET", f"{item.key}/_history/{version}")
        if not may(who, item.type, "r"):
            self.status(who, what, answer, 403)
            return
        visible = self.world.sees(who, item)
        if self.status(who, what, answer, (410 if deletion else 200) if visible else 404) and not visible:
            # The unknown-id template is for version 1; compare with the version swapped in.
            template = self.not_found_template(who, item.type, "/_history/1")
            self.checks += 1
            mine = answer.raw.replace(item.id.encode(), b"{id}").replace(
                f"/_history/{version}".encode(), b"/_history/1"
            )
            if mine != template:
                self.fail("LEAK", who, what, f"404 body differs from an unknown id's: {answer.raw[:300]!r}")

    def history_instance(self, who: Who, item: Item) -> None:
        what = f"GET {item.key}/_history"
        answer = self.call(who, "GET", f"{item.key}/_history")
        if not may(who, item.type, "s"):
            self.status(who, what, answer, 403)
            return
        visible = self.world.sees(who, item)
        if not self.status(who, what, answer, 200 if visible else 404) or not visible:
            if answer.status == 404:
                self.same_as_unknown(who, what, answer, item, "/_history")
            return
        got = [f"{k}@{v}" for k, v in history_keys(answer.json)]
        expected = {f"{item.key}@{v}" for v, _ in item.versions}
        self.compare(who, what, got, expected, len(item.versions), total=answer.json.get("total"))

    def history_system(self, who: Who) -> None:
        what = "GET _history"
        answer = self.call(who, "GET", "_history", [("_count", "1000")])
        if not self.status(who, what, answer, 200 if may_system(who, "s") else 403) or answer.status != 200:
            return
        items = list(self.world.items.values())
        expected = {f"{i.key}@{v}" for i in items if self.world.sees(who, i) for v, _ in i.versions}
        got = [f"{k}@{v}" for k, v in history_keys(answer.json)]
        universe = sum(len(i.versions) for i in items)
        self.compare(
            who, what, got, expected, universe, total=answer.json.get("total"), complete=len(expected) <= 1000
        )

    def everything_all(self, who: Who) -> None:
        """``Patient/$everything``: every patient's record, as far as the principal may see it."""
        what = "GET Patient/$everything"
        answer = self.call(who, "GET", "Patient/$everything", [("_count", "1000")])
        if (
            not self.status(who, what, answer, 200 if may(who, "Patient", "s") else 403)
            or answer.status != 200
        ):
            return
        expected: set[str] = set()
        for patient in self.world.live("Patient"):
            expected |= self.everything_expected(who, patient.id)
        universe = len([i for i in self.world.items.values() if i.comps or i.type in SHARED_TYPES])
        self.compare(
            who, what, entry_keys(answer.json), expected, universe,
            total=answer.json.get("total"), complete=len(expected) <= 1000,
        )  # fmt: skip

    def history_type(self, who: Who, res_type: str) -> None:
        what = f"GET {res_type}/_history"
        answer = self.call(who, "GET", f"{res_type}/_history", [("_count", "1000")])
        if (
            not self.status(who, what, answer, 200 if may(who, res_type, "s") else 403)
            or answer.status != 200
        ):
            return
        items = self.world.of_type(res_type)
        expected = {f"{i.key}@{v}" for i in items if self.world.sees(who, i) for v, _ in i.versions}
        got = [f"{k}@{v}" for k, v in history_keys(answer.json)]
        universe = sum(len(i.versions) for i in items)
        self.compare(
            who, what, got, expected, universe, total=answer.json.get("total"), complete=len(expected) <= 1000
        )

    def includes(self, who: Who) -> None:
        query = [
            ("_include", "Observation:subject"), ("_include", "Observation:performer"),
            ("_total", "accurate"), ("_count", "1000"),
        ]  # fmt: skip
        what = "GET Observation?_include=Observation:subject&_include=Observation:performer"
        answer = self.call(who, "GET", "Observation", query)
        if (
            not self.status(who, what, answer, 200 if may(who, "Observation", "s") else 403)
            or answer.status != 200
        ):
            return
        matches = self.expected(who, "Observation")
        included: set[str] = set()
        for key in matches:
            body = self.world.items[key].body
            assert body is not None
            for target in refs_at(body, "subject") + refs_at(body, "performer"):
                item = self.world.get(target)
                if item and not item.deleted and self.world.sees(who, item) and target not in matches:
                    included.add(target)
        universe = len(self.world.of_type("Observation")) + len(self.world.live("Patient")) + 12
        self.compare(who, what, entry_keys(answer.json), matches, universe, total=answer.json.get("total"))
        self.compare(who, what + " (included)", entry_keys(answer.json, "include"), included, universe)

    def revincludes(self, who: Who) -> None:
        specs = [
            ("Observation", "subject", False),
            ("Consent", "patient", False),
            ("Provenance", "target", True),
        ]
        query = [
            ("_revinclude", "Observation:subject"), ("_revinclude", "Consent:patient"),
            ("_revinclude:iterate", "Provenance:target"), ("_count", "1000"),
        ]  # fmt: skip
        what = "GET Patient?_revinclude=Observation:subject&_revinclude=Consent:patient&_revinclude:iterate=Provenance:target"
        answer = self.call(who, "GET", "Patient", query)
        if (
            not self.status(who, what, answer, 200 if may(who, "Patient", "s") else 403)
            or answer.status != 200
        ):
            return
        matches = self.expected(who, "Patient")
        seen, frontier, found = set(matches), set(matches), set()
        for round_number in range(4):
            fresh = set()
            for source_type, path, iterate in specs:
                if round_number and not iterate:
                    continue
                for item in self.world.live(source_type):
                    assert item.body is not None
                    if (
                        item.key not in seen
                        and set(refs_at(item.body, path)) & frontier
                        and self.world.sees(who, item)
                    ):
                        fresh.add(item.key)
            if not fresh:
                break
            seen |= fresh
            found |= fresh
            frontier = fresh
        universe = sum(
            len(self.world.of_type(t)) for t in ("Patient", "Observation", "Consent", "Provenance")
        )
        self.compare(who, what, entry_keys(answer.json), matches, universe)
        self.compare(who, what + " (included)", entry_keys(answer.json, "include"), found, universe)

    def chain(self, who: Who, org: str) -> None:
        query = [
            ("subject:Patient.organization", f"Organization/{org}"),
            ("_total", "accurate"),
            ("_count", "1000"),
        ]
        what = f"GET Observation?subject:Patient.organization=Organization/{org}"
        answer = self.call(who, "GET", "Observation", query)
        if (
            not self.status(who, what, answer, 200 if may(who, "Observation", "s") else 403)
            or answer.status != 200
        ):
            return
        expected = set()
        for key in self.expected(who, "Observation"):
            body = self.world.items[key].body
            assert body is not None
            for target in refs_at(body, "subject"):
                patient = self.world.get(target)
                if (
                    patient is not None
                    and patient.type == "Patient"
                    and patient.body is not None
                    and self.world.sees(who, patient)
                    and refs_at(patient.body, "managingOrganization") == [f"Organization/{org}"]
                ):
                    expected.add(key)
        self.compare(who, what, entry_keys(answer.json), expected, len(self.world.of_type("Observation")),
                     total=answer.json.get("total"))  # fmt: skip

    def has(self, who: Who, code: str) -> None:
        query = [
            ("_has:Observation:subject:code", f"{LOINC}|{code}"),
            ("_total", "accurate"),
            ("_count", "1000"),
        ]
        what = f"GET Patient?_has:Observation:subject:code={code}"
        answer = self.call(who, "GET", "Patient", query)
        if (
            not self.status(who, what, answer, 200 if may(who, "Patient", "s") else 403)
            or answer.status != 200
        ):
            return
        with_code = set()
        for key in self.expected(who, "Observation"):
            body = self.world.items[key].body
            assert body is not None
            if (LOINC, code) in set(codings(body.get("code"))):
                with_code |= set(refs_at(body, "subject"))
        expected = self.expected(who, "Patient") & with_code
        self.compare(who, what, entry_keys(answer.json), expected, len(self.world.of_type("Patient")),
                     total=answer.json.get("total"))  # fmt: skip

    def everything_expected(self, who: Who, patient: str, types: set[str] | None = None) -> set[str]:
        """The patient's compartment and the shared resources its visible members reference,
        as far as the principal may see them; the audit trail only when ``_type`` names it, and
        what AuditEvents point at never (the access log is not part of the record)."""
        members = [i for i in self.world.live() if patient in i.current_comps]
        visible = [i for i in members if self.world.sees(who, i)]
        expected = {i.key for i in visible}
        for item in visible:
            assert item.body is not None
            if item.key.startswith("AuditEvent/"):
                continue
            for target in shared_references(item.body):
                shared = self.world.get(target)
                if shared is not None and not shared.deleted and self.world.sees(who, shared):
                    expected.add(target)
        if types is None:
            return {k for k in expected if not k.startswith("AuditEvent/")}
        return {k for k in expected if k.split("/", 1)[0] in types}

    def everything(self, who: Who, patient: str, count: int = 1000, types: set[str] | None = None) -> None:
        what = f"GET Patient/{patient}/$everything?_count={count}"
        item = self.world.items[f"Patient/{patient}"]
        if not may(who, "Patient", "s"):
            self.status(who, what, self.call(who, "GET", f"Patient/{patient}/$everything"), 403)
            return
        visible = self.world.sees(who, item)
        got: list[str] = []
        query = [("_count", str(count))]
        if types is not None:
            query.append(("_type", ",".join(sorted(types))))
            what += f"&_type={','.join(sorted(types))}"
        for _ in range(30):
            answer = self.call(who, "GET", f"Patient/{patient}/$everything", query)
            # Paging requests are audited too: the patient's own AuditEvents grow page by page.
            expected = self.everything_expected(who, patient, types) if visible else set()
            if not self.status(who, what, answer, 200 if visible else 404) or not visible:
                return
            if answer.json.get("total") != len(expected):
                kind = "LEAK" if (answer.json.get("total") or 0) > len(expected) else "MISSING"
                self.fail(kind, who, what, f"total {answer.json.get('total')}, oracle {len(expected)}")
            got += entry_keys(answer.json)
            following = [link["url"] for link in answer.json.get("link", []) if link["relation"] == "next"]
            if not following:
                break
            query = parse_qsl(urlsplit(following[0]).query)
        universe = sum(1 for i in self.world.items.values() if patient in i.comps) + 12
        moving = {k for k in expected if k.startswith("AuditEvent/")} if count < 1000 else set()
        self.compare(who, what, [g for g in got if g not in moving], expected - moving, universe)

    def export(self, who: Who, level: str) -> None:
        path = {"system": "$export", "patient": "Patient/$export", "group": "Group/grp-1/$export"}[level]
        what = f"GET {path}"
        answer = self.call(who, "GET", path, headers={"prefer": "respond-async"})
        group = self.world.items["Group/grp-1"]
        if level == "system":
            allowed, found = may_system(who, "s"), True
        else:
            allowed = may(who, level.title(), "s")
            found = level != "group" or self.world.sees(who, group)
        if (
            not self.status(who, what, answer, (202 if found else 404) if allowed else 403)
            or answer.status != 202
        ):
            return
        job = answer.headers["Content-Location"].rstrip("/").split("/")[-1]
        for _ in range(600):
            answer = self.call(who, "GET", f"$export-status/{job}")
            if answer.status != 202:
                break
            time.sleep(0.05)
        if not self.status(who, what + " (status)", answer, 200):
            return
        # Someone else polling the job: as if it did not exist.
        other = ADMIN if who.role is not Role.ADMIN else None
        if other is not None:
            self.status(
                other,
                f"{what} (status, not the owner)",
                self.hub.call(other, "GET", f"$export-status/{job}"),
                404,
            )
        if isinstance(self.hub, HttpHub) and answer.json["output"]:
            url = answer.json["output"][0]["url"]
            for stranger, status in ((None, 401), (ADMIN if who.role is not Role.ADMIN else None, 404)):
                if stranger is not None or status == 401:
                    self.checks += 1
                    got_status = self.hub.export_file_status(stranger, url)
                    if got_status != status:
                        kind = "LEAK" if got_status == 200 else "STATUS"
                        self.fail(
                            kind,
                            stranger or who,
                            f"GET {url} (someone else's file)",
                            f"status {got_status}, oracle {status}",
                        )
        got: dict[str, list[str]] = {}
        for output in answer.json["output"]:
            for line in self.hub.export_file(who, output["url"]).splitlines():
                if line.strip():
                    body = orjson.loads(line)
                    got.setdefault(body["resourceType"], []).append(f"{body['resourceType']}/{body['id']}")
        self.wait_for_audit(job)
        if level == "system":
            candidates = self.world.live()
        else:
            patients = (
                {r.split("/", 1)[1] for r in refs_at(group.body or {}, "member.entity")}
                if level == "group"
                else {p.id for p in self.world.live("Patient")}
            )
            candidates = [i for i in self.world.live() if i.current_comps & patients]
        expected: dict[str, set[str]] = {}
        for item in candidates:
            # The audit trail is not part of the record: left out unless _type names it.
            if item.type != "AuditEvent" and self.world.sees(who, item):
                expected.setdefault(item.type, set()).add(item.key)
        for res_type in sorted(set(expected) | set(got)):
            universe = len(self.world.of_type(res_type))
            self.compare(
                who,
                f"{what} {res_type}.ndjson",
                got.get(res_type, []),
                expected.get(res_type, set()),
                universe,
            )

    def wait_for_audit(self, job: str) -> None:
        """The job's own AuditEvent is written after it completes; let it land first."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.refresh_audit()
            marker = f"$export job {job}"
            if any(marker in orjson.dumps(i.body).decode() for i in self.world.of_type("AuditEvent")[-100:]):
                return
            time.sleep(0.05)
        raise AssertionError(f"no AuditEvent for export job {job}")

    def transaction(self, who: Who) -> None:
        """A transaction with a read, a search and maybe a write (create or update)."""
        world, rng = self.world, self.rng
        target = rng.choice([i for i in world.items.values() if i.type in ("Observation", "Condition")])
        patient = rng.choice(world.live("Patient")).id
        # Half the time a patient who denied this principal something: writes must respect it.
        denying = sorted(
            {g.patient for g in world.grants() if g.effect == "deny" and g.grantee in world.identities(who)}
        )
        if denying and rng.random() < 0.5:
            patient = rng.choice(denying)
        write = rng.choice(["none", "create", "create", "update"])
        new_id = str(uuid.uuid4())
        entries: list[dict[str, Any]] = []
        new_body: dict[str, Any] | None = None
        if write == "create":
            system, code, _ = rng.choice(NORMAL_OBSERVATION_CODES)
            new_body = {
                "resourceType": "Observation",
                "status": "final",
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": new_id}],
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
                "code": {"coding": [{"system": system, "code": code}]},
                "subject": ref(f"Patient/{patient}"),
            }
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{new_id}",
                    "resource": new_body,
                    "request": {"method": "POST", "url": "Observation"},
                }
            )
        elif write == "update" and not target.deleted:
            new_body = orjson.loads(orjson.dumps(target.body))
            new_body.setdefault("note", []).append({"text": f"matrix update {new_id}"})
            entries.append({"resource": new_body, "request": {"method": "PUT", "url": target.key}})
        else:
            write = "none"
        entries.append({"request": {"method": "GET", "url": target.key}})
        entries.append(
            {"request": {"method": "GET", "url": f"Observation?subject=Patient/{patient}&_count=1000"}}
        )
        what = f"transaction[{write} {patient if write == 'create' else target.key}; GET {target.key}; GET Observation?subject={patient}]"
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        answer = self.call(who, "POST", "", headers={"prefer": "return=representation"}, body=bundle)
        # The oracle, in the hub's processing order: POST, PUT, then the GET entries.
        if write == "create":
            write_ok = may(who, "Observation", "c") and world.may_write(who, {patient})
        elif write == "update":
            write_ok = (
                may(who, target.type, "u")
                and world.sees(who, target)
                and world.may_write(who, set(target.current_comps))
            )
        else:
            write_ok = True
        if write == "update" and may(who, target.type, "u") and not world.sees(who, target):
            expected = 404  # issue 8: a write to a hidden resource answers as for an unknown id
        elif not write_ok or not may(who, target.type, "r"):
            expected = 403
        else:
            # Neither write changes who may read the target: same labels, same record.
            expected = 404 if not world.sees(who, target) else 410 if target.deleted else 200
            if expected == 200 and not may(who, "Observation", "s"):
                expected = 403
        if answer.status == 200 and write == "create":
            # The hub names what a transaction creates (urn:uuid is the Bundle's name for it).
            new_id = answer.json["entry"][0]["response"]["location"].split("/_history")[0].rsplit("/", 1)[-1]
        if not self.status(who, what, answer, expected):
            if answer.status == 200 and write != "none":
                self.apply_write(write, new_id, new_body, target)
            return
        if expected != 200:
            self.checks += 1
            if write == "create" and self.created_by_identifier(new_id):
                self.fail("STATUS", who, what, "failed, yet its POST entry was written")
            if write == "update" and self.stored_version(target) != target.version:
                self.fail("STATUS", who, what, "failed, yet its PUT entry was written")
            return
        if write != "none":
            self.apply_write(write, new_id, new_body, target)
        results = answer.json["entry"]
        read_entry, search_entry = results[-2], results[-1]
        self.checks += 1
        if read_entry["resource"]["id"] != target.id:
            self.fail("STATUS", who, what, f"GET entry returned {read_entry['resource'].get('id')}")
        expected_ids = {
            i.key
            for i in world.live("Observation")
            if i.body is not None
            and refs_at(i.body, "subject") == [f"Patient/{patient}"]
            and world.sees(who, i)
        }
        self.compare(who, what + " search entry", entry_keys(search_entry["resource"]), expected_ids,
                     len(world.of_type("Observation")), total=search_entry["resource"].get("total"))  # fmt: skip

    def apply_write(self, write: str, new_id: str, body: dict[str, Any] | None, target: Item) -> None:
        assert body is not None
        if write == "create":
            self.world.record({**body, "id": new_id})
        else:
            self.world.record(body)

    def created_by_identifier(self, value: str) -> bool:
        """Was an Observation with this fixture identifier stored (under whatever id)?"""
        query = [("identifier", f"{IDENTIFIER_SYSTEM}|{value}"), ("_total", "accurate")]
        answer = self.hub.call(ADMIN, "GET", "Observation", query)
        assert answer.status == 200, answer.raw[:300]
        return bool(answer.json.get("total"))

    def stored(self, res_type: str, res_id: str) -> bool:
        with self.hub.engine.connect() as conn:
            return (
                conn.execute(
                    sa.select(resource_table.c.pid).where(
                        resource_table.c.res_type == res_type, resource_table.c.res_id == res_id
                    )
                ).first()
                is not None
            )

    def stored_version(self, item: Item) -> int:
        with self.hub.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(resource_table.c.version).where(
                        resource_table.c.res_type == item.type, resource_table.c.res_id == item.id
                    )
                ).scalar_one()
            )

    def unauthenticated(self) -> None:
        for method, path in (
            ("GET", "Patient"),
            ("GET", "Observation/obs-x"),
            ("GET", "Patient/pat-1/$everything"),
        ):
            answer = self.hub.call(None, method, path)
            self.status(ADMIN, f"{method} {path} without a token", answer, 401)

    # --- one principal's round ---

    def pick_reads(self, who: Who, k: int) -> list[Item]:
        pool = [i for i in self.world.items.values() if i.type != "AuditEvent"]
        hidden = [i for i in pool if not self.world.sees(who, i)]
        shown = [i for i in pool if self.world.sees(who, i)]
        deleted = [i for i in pool if i.deleted]
        picked = self.rng.sample(hidden, min(len(hidden), (k + 1) // 2)) + self.rng.sample(
            shown, min(len(shown), k // 2)
        )
        picked += self.rng.sample(deleted, min(len(deleted), 1))
        self.rng.shuffle(picked)
        return picked

    def round(self, who: Who, full: bool) -> None:
        rng, world = self.rng, self.world
        k = max(1, round(2 * SCALE))
        types = SEARCHED_TYPES if full else ("Patient", "Observation", "Condition", "Consent", "CareTeam")
        # Types the principal may not search: one 403 is checked, the rest would say the same.
        forbidden = [t for t in types if not may(who, t, "s")]
        for res_type in [t for t in types if t not in forbidden] + forbidden[:1]:
            self.search(who, res_type)
        for item in self.pick_reads(who, 2 * k):
            self.read(who, item)
        patients = [p.id for p in world.live("Patient")]
        shown = [p for p in patients if world.sees(who, world.items[f"Patient/{p}"])]
        self.everything(who, rng.choice(shown or patients) if full else rng.choice(patients))
        self.transaction(who)
        if full:
            for item in self.pick_reads(who, k)[:k]:
                self.vread(who, item)
                self.history_instance(who, item)
            self.everything(who, rng.choice(patients))
            if who.role in (Role.PATIENT, Role.ADMIN) or rng.random() < 0.2:
                self.everything(who, rng.choice(shown or patients), types={"AuditEvent", "Observation"})
            readable = [t for t in ("Observation", "Condition", "Patient", "Consent") if may(who, t, "s")]
            if readable:
                res_type = rng.choice(readable)
                if len(self.expected(who, res_type)) >= 3:
                    self.paging(who, res_type)
                self.history_type(who, rng.choice(readable))
            self.includes(who)
            self.revincludes(who)
            if rng.random() < 0.4:
                self.history_system(who)
            if rng.random() < 0.3:
                self.everything_all(who)
            self.chain(who, rng.choice(["org-1", "org-2", "org-3"]))
            self.has(who, rng.choice(["7917-8", "44249-1", "51969-4", "718-7"]))
            # Paged $everything only where the record does not grow while it is paged (each
            # page's own AuditEvent joins the record of whoever may read AuditEvents).
            if shown and rng.random() < 0.3 and who.role not in (Role.ADMIN, Role.SERVICE, Role.PATIENT):
                self.everything(who, rng.choice(shown), count=rng.randint(2, 5))

    def summary(self, seconds: float) -> str:
        others = len(self.failures) - self.leaks
        return (
            f"consent matrix ({self.label}, {backend()}): seed={SEED}, {self.checks} checks, "
            f"{self.leaks} leaks, {others} other mismatches, {self.hub.requests} requests, {seconds:.1f} s"
        )


# --- mutations between rounds -----------------------------------------------------------------


def mutate_and_check(m: Matrix, fx: Fixture, people: list[Who]) -> int:
    """Change consents, care teams, proxies, a patient; each change must show on the next
    request. Returns how many immediate checks were made."""
    world, rng = m.world, m.rng
    immediate = 0

    def snapshot() -> dict[tuple[str, str], bool]:
        return {
            (w.name, i.key): world.sees(w, i)
            for w in people
            for i in world.items.values()
            if i.type not in ("AuditEvent",) and i.comps
        }

    def change(description: str, action: Any) -> None:
        nonlocal immediate
        before = snapshot()
        action()
        after = snapshot()
        flipped = [key for key in after if before.get(key) != after[key]]
        rng.shuffle(flipped)
        by_name = {w.name: w for w in people}
        for name, key in flipped[:3]:
            who, item = by_name[name], world.items[key]
            if may(who, item.type, "r"):
                m.read(who, item)
                immediate += 1

    consents = world.live("Consent")
    active = [c for c in consents if body_of(c)["status"] == "active"]
    inactive = [c for c in consents if body_of(c)["status"] != "active"]
    for item in rng.sample(active, min(2, len(active))):
        change(f"withdraw {item.key}", lambda item=item: m.put({**body_of(item), "status": "inactive"}))
    for item in rng.sample(inactive, min(2, len(inactive))):
        change(f"grant {item.key}", lambda item=item: m.put({**body_of(item), "status": "active"}))
    if active:
        victim = rng.choice([c for c in world.live("Consent")])
        change(f"delete {victim.key}", lambda: m.delete(victim.key))
    teams = [t for t in world.live("CareTeam") if body_of(t)["status"] == "active"]
    if teams:
        team = rng.choice(teams)
        change(f"deactivate {team.key}", lambda: m.put({**body_of(team), "status": "inactive"}))
    proxies = [r for r in world.live("RelatedPerson") if body_of(r).get("active", True)]
    if proxies:
        rp = rng.choice(proxies)
        change(f"deactivate {rp.key}", lambda: m.put({**body_of(rp), "active": False}))
    patient = rng.choice(world.live("Patient"))
    current = refs_at(body_of(patient), "managingOrganization")
    org = rng.choice([o for o in fx.orgs if f"Organization/{o}" not in current])
    moved = {**body_of(patient), "managingOrganization": ref(f"Organization/{org}")}
    change(f"move {patient.key}", lambda: m.put(moved))
    observation = rng.choice([o for o in world.live("Observation") if o.comps])
    change(f"delete {observation.key}", lambda: m.delete(observation.key))

    # A deterministic grant-then-withdraw: an HIV grant for one clinician, checked at once.
    doctor = next(w for w in people if w.name == "dr-1")
    hiv = [
        i
        for i in world.live()
        if i.comps and i.labels == frozenset({"HIV"}) and not world.sees(doctor, i) and len(i.comps) == 1
    ]
    if hiv:
        target = rng.choice(hiv)
        (owner,) = target.comps
        grant = consent(
            f"cons-matrix-{owner}",
            owner,
            {"type": "permit", "actor": [actor("Practitioner/dr-1")], "securityLabel": security("HIV")},
        )
        m.put(grant)
        m.read(doctor, target)  # visible now, unless a deny of the patient still applies
        m.put({**grant, "status": "inactive"})
        assert not world.sees(doctor, target)
        m.read(doctor, target)  # withdrawn: hidden again on the very next request
        immediate += 2

    # Break-glass: a clinician opens a record they cannot see; the next reads see it all.
    doctor = next(w for w in people if w.name == "dr-2")
    closed = [
        i
        for i in world.live()
        if i.comps and AUDIT not in i.labels and not world.sees(doctor, i) and i.type != "AuditEvent"
    ]
    # A resource in several patients' records cannot open break-glass (one named patient per
    # request, issue 9): refused, nothing opened.
    shared = [i for i in closed if len(i.comps) > 1]
    if shared:
        target = rng.choice(shared)
        answer = m.call(
            doctor, "GET", target.key, headers={"x-break-glass-reason": "Unconscious patient in the ER"}
        )
        m.status(doctor, f"GET {target.key} (break-glass, {len(target.comps)} patients)", answer, 400)
        with m.hub.engine.connect() as conn:
            opened_rows = conn.execute(sa.select(break_glass.c.patient_id)).all()
        m.checks += 1
        if opened_rows:
            m.fail(
                "STATUS",
                doctor,
                "break-glass",
                f"a refused request opened {sorted(r[0] for r in opened_rows)}",
            )
    closed = [i for i in closed if len(i.comps) == 1]
    if closed:
        target = rng.choice(closed)
        answer = m.call(
            doctor, "GET", target.key, headers={"x-break-glass-reason": "Unconscious patient in the ER"}
        )
        m.status(doctor, f"GET {target.key} (break-glass)", answer, 200)
        # The grant is opened for every patient whose record holds the resource.
        with m.hub.engine.connect() as conn:
            rows = conn.execute(sa.select(break_glass.c.patient_id, break_glass.c.expires)).all()
        expected_patients = set(target.comps)
        opened = {r[0] for r in rows}
        m.checks += 1
        if opened != expected_patients:
            m.fail(
                "STATUS",
                doctor,
                "break-glass",
                f"opened for {sorted(opened)}, oracle {sorted(expected_patients)}",
            )
        for patient_id in expected_patients:
            world.break_glass[("Practitioner/dr-2", patient_id)] = time.time() + 55 * 60
        world.changed()
        for item in rng.sample(sorted(world.items.values(), key=lambda i: i.key), 8):
            if item.type != "AuditEvent":
                m.read(doctor, item)
                immediate += 1
    return immediate


# --- fixture checks -------------------------------------------------------------------------


def _category_file_labels(system: str, code: str) -> frozenset[str]:
    bundle = orjson.loads((REPO / "fhir" / "sensitive-categories.json").read_bytes())
    found = set()
    for entry in bundle["entry"]:
        value_set = entry["resource"]
        label = value_set["extension"][0]["valueCoding"]["code"]
        for include in value_set["compose"]["include"]:
            if include["system"] != system:
                continue
            if any(c["code"] == code for c in include.get("concept", ())) or any(
                re.match(f["value"], code) for f in include.get("filter", ())
            ):
                found.add(label)
    return frozenset(found)


def test_fixture_codes_follow_the_category_file() -> None:
    for system, code, labels in OBSERVATION_CODES + CONDITION_CODES:
        assert _category_file_labels(system, code) == labels, (system, code)


# --- the runs -------------------------------------------------------------------------------


def _report(m: Matrix, seconds: float) -> str:
    line = m.summary(seconds)
    print(line, file=sys.stderr)
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        with LOG_FILE.open("a") as log:
            log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}\n")
    except OSError:
        pass
    return line


def _assert_clean(m: Matrix, line: str) -> None:
    details = "\n".join(d for _, d in m.failures[:60])
    if m.failures:
        try:
            with (LOG_FILE.parent / "consent-matrix-failures.log").open("w") as out:
                out.write(line + "\n" + "\n".join(d for _, d in m.failures) + "\n")
        except OSError:
            pass
    assert not m.failures, f"{line}\nreplay with HUB_MATRIX_SEED={SEED}\n{details}"


def test_consent_matrix_through_the_router(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    print(f"consent matrix seed={SEED} (HUB_MATRIX_SEED replays it)", file=sys.stderr)
    rng = random.Random(SEED)
    hub = RouterHub(fresh_database_url("consent_matrix"), tmp_path / "exports")
    world = World()
    m = Matrix(hub, world, rng, "router")
    fx, bodies = generate(rng, rng.randint(8, 12))
    m.load(bodies)
    people = principals(rng, fx)
    everyone = [ADMIN, *people]

    m.unauthenticated()
    for who in everyone:
        m.round(who, full=True)
    exporters = [w for w in everyone if w.name in ("dr-1", "dr-4.launch", "auditor", "inspector")]
    exporters += [w for w in everyone if w.role in (Role.PATIENT, Role.PROXY)][:2]
    for who in exporters:
        m.export(who, "system")
    for who in rng.sample(people, 2):
        m.export(who, "patient")
    m.export(next(w for w in people if w.name == "dr-3"), "group")

    immediate = mutate_and_check(m, fx, people)
    assert immediate >= 3, "the mutations changed too little to check"
    # After the changes: everyone whose view depends on consents, care teams and proxies.
    for who in people:
        if who.role in (Role.CLINICIAN, Role.PROXY, Role.PATIENT):
            m.round(who, full=False)
    for who in rng.sample([w for w in people if w.role is Role.CLINICIAN], 2):
        m.export(who, "system")

    line = _report(m, time.monotonic() - started)
    assert m.checks >= 5000, line
    _assert_clean(m, line)


def test_consent_matrix_over_http(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A smaller world through uvicorn with real bearer tokens: 401/403, searches, reads,
    $everything, $export with its files downloaded over HTTP, transactions."""
    started = time.monotonic()
    rng = random.Random(SEED + 1)
    url = fresh_database_url("consent_matrix_http")
    with LiveServer(url, export_dir=tmp_path / "exports") as server:
        hub = HttpHub(server)
        world = World()
        m = Matrix(hub, world, rng, "http")
        fx, bodies = generate(rng, 6)
        m.load(bodies)
        people = [w for w in principals(rng, fx) if w.patient is None and w.policy == "moh"]
        m.unauthenticated()
        # A token without the scope or role for the interaction: 403, as an OperationOutcome.
        for who, path in (
            (next(w for w in people if w.role is Role.INSPECTOR), "Patient"),
            (next(w for w in people if w.role is Role.AUDITOR), "Observation"),
            (next(w for w in people if w.name == "dr-2.obs"), "Condition"),
            (next(w for w in people if w.role is Role.FACILITY_ADMIN), "Encounter"),
        ):
            m.status(who, f"GET {path}", m.call(who, "GET", path), 403)
        for who in [ADMIN, *people]:
            for res_type in ("Patient", "Observation", "Condition", "Consent"):
                m.search(who, res_type)
            for item in m.pick_reads(who, 4):
                m.read(who, item)
            patients = [p.id for p in world.live("Patient")]
            m.everything(who, rng.choice(patients))
            m.transaction(who)
            if who.role in (Role.CLINICIAN, Role.PROXY):
                m.revincludes(who)
                m.has(who, "7917-8")
                m.chain(who, rng.choice(fx.orgs))
        for who in [w for w in people if w.role in (Role.CLINICIAN, Role.PATIENT)][:3]:
            m.export(who, "system")
        hub.client.close()
    line = _report(m, time.monotonic() - started)
    assert m.checks >= 500, line
    _assert_clean(m, line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
