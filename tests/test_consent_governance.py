"""Who may write which Consent (issue 8, defects 5, 6, 7, 17 and the Consent part of 21),
over real HTTP against the live test server.

Cast per test (ids carry a fresh suffix): clinic ``org-…`` with Dr A (the recorder), Dr B
(a colleague) and a nurse (the witness); a patient of the clinic with an HIV result and a
depression diagnosis; her husband as RelatedPerson (proxy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import LiveServer, make_token

from consent.governance import WITNESS_EXTENSION
from hub.auth.principal import Role

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10"


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


def actor(target: str) -> dict[str, Any]:
    role = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]
    }
    return {"role": role, "reference": ref(target)}


@dataclass
class World:
    server: LiveServer
    uid: str
    client_for: Callable[[str | None], httpx.Client]

    @property
    def org(self) -> str:
        return f"org-{self.uid}"

    @property
    def patient(self) -> str:
        return f"p-{self.uid}"

    def dr(self, name: str) -> str:
        return f"Practitioner/dr-{name}-{self.uid}"

    @property
    def rp(self) -> str:
        return f"RelatedPerson/rp-{self.uid}"

    def as_(self, role: Role, fhir_user: str | None = None, orgs: tuple[str, ...] = ()) -> httpx.Client:
        return self.client_for(make_token(self.server, role=role, fhir_user=fhir_user, organizations=orgs))

    @property
    def admin(self) -> httpx.Client:
        return self.client_for(self.server.admin_token)

    def clinician(self, name: str) -> httpx.Client:
        return self.as_(Role.CLINICIAN, self.dr(name), (self.org,))

    @property
    def me(self) -> httpx.Client:
        return self.as_(Role.PATIENT, f"Patient/{self.patient}")

    @property
    def husband(self) -> httpx.Client:
        return self.as_(Role.PROXY, self.rp)

    def alerts(self, client: httpx.Client) -> list[dict[str, Any]]:
        answer = client.get(self.server.base.removesuffix("/fhir") + "/access/consent-alerts")
        assert answer.status_code == 200, answer.text
        result: list[dict[str, Any]] = answer.json()
        return result


def consent(world: World, provision: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": ref(f"Patient/{world.patient}"),
        "provision": provision,
        **extra,
    }


def permit(grantee: str, *labels: str) -> dict[str, Any]:
    return {
        "type": "permit",
        "actor": [actor(grantee)],
        "securityLabel": [{"system": ACT_CODE, "code": code} for code in labels],
    }


def signed(world: World) -> dict[str, Any]:
    """The evidence a clinician's recording carries: the signed form and the witness."""
    return {
        "sourceAttachment": {"contentType": "application/pdf", "title": "signed consent form"},
        "extension": [{"url": WITNESS_EXTENSION, "valueReference": ref(world.dr("nurse"))}],
    }


@pytest.fixture()
def world(live_server: LiveServer, uid: str, client_for: Callable[[str | None], httpx.Client]) -> World:
    w = World(live_server, uid, client_for)
    admin = w.admin
    bodies: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": w.org, "name": w.org},
        *({"resourceType": "Practitioner", "id": w.dr(n).split("/")[1]} for n in ("a", "b", "nurse")),
        {"resourceType": "Patient", "id": w.patient, "managingOrganization": ref(f"Organization/{w.org}")},
        {"resourceType": "Observation", "id": f"hiv-{uid}", "status": "final",
         "code": {"coding": [{"system": LOINC, "code": "7917-8"}]}, "subject": ref(f"Patient/{w.patient}")},
        {"resourceType": "Observation", "id": f"hb-{uid}", "status": "final",
         "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": ref(f"Patient/{w.patient}")},
        {"resourceType": "Condition", "id": f"dep-{uid}", "subject": ref(f"Patient/{w.patient}"),
         "code": {"coding": [{"system": ICD10, "code": "F32.1"}]}},
        {"resourceType": "RelatedPerson", "id": w.rp.split("/")[1], "active": True,
         "patient": ref(f"Patient/{w.patient}")},
    ]  # fmt: skip
    for body in bodies:
        answer = admin.put(f"{body['resourceType']}/{body['id']}", json=body)
        assert answer.status_code in (200, 201), answer.text
    return w


def _diagnostics(answer: httpx.Response) -> str:
    return " ".join(i.get("diagnostics", "") for i in answer.json().get("issue", []))


def test_a_clinician_cannot_record_a_consent_granting_themselves_sensitive_data(world: World) -> None:
    dr_a = world.clinician("a")
    # Defect 5: a consent granting the recorder mental-health and HIV access, even with evidence.
    for grantee in (world.dr("a"), f"Organization/{world.org}"):
        answer = dr_a.post("Consent", json=consent(world, permit(grantee, "PSY", "HIV"), **signed(world)))
        assert answer.status_code == 403, answer.text
    anyone = {"type": "permit", "securityLabel": [{"system": ACT_CODE, "code": "HIV"}]}
    assert dr_a.post("Consent", json=consent(world, anyone, **signed(world))).status_code == 403
    assert dr_a.get(f"Observation/hiv-{world.uid}").status_code == 404
    # Without evidence or witness, not even for a colleague.
    to_b = permit(world.dr("b"), "PSY")
    assert dr_a.post("Consent", json=consent(world, to_b)).status_code == 403
    unwitnessed = {"sourceAttachment": {"title": "form"}}
    self_witness = {
        **signed(world),
        "extension": [{"url": WITNESS_EXTENSION, "valueReference": ref(world.dr("a"))}],
    }
    for evidence in (unwitnessed, self_witness):
        assert dr_a.post("Consent", json=consent(world, to_b, **evidence)).status_code == 403
    # With its evidence, for a colleague: recorded, and the patient is alerted.
    created = dr_a.post("Consent", json=consent(world, to_b, **signed(world)))
    assert created.status_code == 201, created.text
    consent_id = created.json()["id"]
    assert world.clinician("b").get(f"Condition/dep-{world.uid}").status_code == 200
    (alert,) = [a for a in world.alerts(world.me) if a["consent"] == f"Consent/{consent_id}"]
    assert alert["recordedBy"] == world.dr("a") and alert["witness"] == world.dr("nurse")
    assert alert["action"] == "create" and "PSY" in alert["detail"] and world.dr("b") in alert["detail"]
    facility_admin = world.as_(Role.FACILITY_ADMIN, orgs=(world.org,))
    assert f"Consent/{consent_id}" in {a["consent"] for a in world.alerts(facility_admin)}
    stranger = world.as_(Role.PATIENT, f"Patient/other-{world.uid}")
    assert world.alerts(stranger) == []
    # The patient's own consents raise no alert.
    mine = world.me.post("Consent", json=consent(world, permit(world.dr("b"), "HIV")))
    assert mine.status_code == 201, mine.text
    assert f"Consent/{mine.json()['id']}" not in {a["consent"] for a in world.alerts(world.me)}


def test_a_proxy_cannot_grant_himself_sensitive_categories(world: World) -> None:
    husband = world.husband
    assert husband.get(f"Observation/hb-{world.uid}").status_code == 200
    for labels in (("SEX",), ("HIV",), ("PSY",), ("HIV", "PSY", "SEX")):
        answer = husband.post("Consent", json=consent(world, permit(world.rp, *labels)))
        assert answer.status_code == 403, answer.text
        assert "sensitive" in _diagnostics(answer)
    # Not to anyone else either: only the patient names sensitive classes.
    assert husband.post("Consent", json=consent(world, permit(world.dr("b"), "HIV"))).status_code == 403
    assert husband.get(f"Observation/hiv-{world.uid}").status_code == 404
    assert husband.get(f"Condition/dep-{world.uid}").status_code == 404
    # Ordinary data and denies: allowed, and the patient sees that he did it.
    normal = husband.post("Consent", json=consent(world, permit(world.dr("b"))))
    assert normal.status_code == 201, normal.text
    deny = {"type": "deny", "actor": [actor(world.dr("a"))]}
    assert husband.post("Consent", json=consent(world, deny)).status_code == 201
    recorded = {a["consent"] for a in world.alerts(world.me) if a["recordedBy"] == world.rp}
    assert f"Consent/{normal.json()['id']}" in recorded


def test_only_the_patient_removes_her_deny(world: World) -> None:
    dr_a, dr_b, me = world.clinician("a"), world.clinician("b"), world.me
    hb = f"Observation/hb-{world.uid}"
    assert dr_b.get(hb).status_code == 200  # the clinic's patient: the policy grant
    deny = consent(world, {"type": "deny", "actor": [actor(world.dr("b"))]})
    created = me.post("Consent", json=deny)
    assert created.status_code == 201, created.text
    stored = created.json()
    key = f"Consent/{stored['id']}"
    assert dr_b.get(hb).status_code == 404
    # Defect 7: a colleague of the same station cannot lift it, in any form.
    assert dr_a.get(key).status_code == 200
    assert dr_a.delete(key).status_code == 403
    for status in ("inactive", "rejected", "entered-in-error"):
        answer = dr_a.put(key, json={**stored, **signed(world), "status": status})
        assert answer.status_code == 403, answer.text
        assert "deny" in _diagnostics(answer)
    narrowed = {**stored["provision"], "securityLabel": [{"system": ACT_CODE, "code": "HIV"}]}
    assert dr_a.put(key, json={**stored, **signed(world), "provision": narrowed}).status_code == 403
    to_permit = {**stored["provision"], "type": "permit"}
    assert dr_a.put(key, json={**stored, **signed(world), "provision": to_permit}).status_code == 403
    assert dr_b.get(hb).status_code == 404
    # Nor a hub admin without a stated reason; with one, it is recorded in the alert.
    admin = world.admin
    assert admin.put(key, json={**stored, "status": "inactive"}).status_code == 403
    # The patient can.
    assert me.delete(key).status_code == 204
    assert dr_b.get(hb).status_code == 200


def test_a_hub_admin_lifts_a_deny_only_with_a_recorded_reason(world: World) -> None:
    deny = consent(world, {"type": "deny", "actor": [actor(world.dr("b"))]})
    stored = world.me.post("Consent", json=deny).json()
    key = f"Consent/{stored['id']}"
    reason = "Court order 12/2026: patient record transfer"
    answer = world.admin.put(key, json={**stored, "status": "inactive"}, headers={"X-Access-Reason": reason})
    assert answer.status_code == 200, answer.text
    (alert,) = [a for a in world.alerts(world.me) if a["consent"] == key]
    assert alert["reason"] == reason and "removes deny" in alert["detail"]
    assert world.clinician("b").get(f"Observation/hb-{world.uid}").status_code == 200
    # The reason is in the audit trail too, on the AuditEvent of the update.
    events = world.admin.get("AuditEvent", params={"entity": key, "action": "U"}).json().get("entry", [])
    details = [
        d
        for e in events
        for entity in e["resource"].get("entity", [])
        for d in entity.get("detail", [])
        if d.get("type") == "access-reason"
    ]
    assert [d["valueString"] for d in details] == [reason]


def test_a_proxy_loses_access_when_the_relationship_period_ends(world: World) -> None:
    today = datetime.now(UTC).date()
    ended = {
        "resourceType": "RelatedPerson",
        "id": world.rp.split("/")[1],
        "active": True,
        "patient": ref(f"Patient/{world.patient}"),
        "period": {"start": str(today - timedelta(days=400)), "end": str(today - timedelta(days=2))},
    }
    assert world.admin.put(world.rp, json=ended).status_code == 200
    husband = world.husband
    assert husband.get(f"Observation/hb-{world.uid}").status_code == 404
    assert husband.get(f"Patient/{world.patient}").status_code == 404
    found = husband.get("Observation", params={"patient": world.patient})
    assert found.status_code in (200, 403) and not found.json().get("entry")
    answer = husband.post("Consent", json=consent(world, {"type": "deny"}))
    assert answer.status_code in (403, 404)
    # A current period (open end) opens it again.
    current = {**ended, "period": {"start": str(today - timedelta(days=1))}}
    assert world.admin.put(world.rp, json=current).status_code == 200
    assert husband.get(f"Observation/hb-{world.uid}").status_code == 200


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"status": "whatever"}, "Consent.status"),
        ({"provision": {"type": "Deny"}}, "Consent.provision.type"),
        ({"provision": {"type": "permit", "provision": [{"type": "DENY"}]}}, "Consent.provision.provision[0].type"),
        ({"patient": {"reference": "Group/g1"}}, "Consent.patient"),
        ({"patient": {"identifier": {"value": "064075009876"}}}, "Consent.patient"),
        ({"provision": {"type": "permit", "actor": [{**actor("x/y"), "reference": {"display": "Dr B"}}]}},
         "Consent.provision.actor[0].reference"),
    ],
)  # fmt: skip
def test_consent_codes_are_validated(world: World, change: dict[str, Any], where: str) -> None:
    body = {**consent(world, {"type": "deny"}), **change}
    answer = world.admin.post("Consent", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["issue"][0]["expression"] == [where]
    # The patient too (an unresolvable patient reference may be refused earlier, as data of no patient).
    assert world.me.post("Consent", json=body).status_code == 422
    assert world.admin.get("Consent", params={"patient": world.patient}).json().get("entry") is None


def test_an_integration_service_imports_consents_validated_and_alerted(world: World) -> None:
    cccd = f"0{world.uid[:11]}"
    patient = {
        "resourceType": "Patient",
        "id": world.patient,
        "identifier": [{"system": "https://ehealth-hub.vn/sid/cccd", "value": cccd}],
        "managingOrganization": ref(f"Organization/{world.org}"),
    }
    assert world.admin.put(f"Patient/{world.patient}", json=patient).status_code == 200
    feed = world.as_(Role.SERVICE)
    deny = consent(world, {"type": "deny", "actor": [actor(world.dr("b"))]})
    deny["patient"] = ref(f"Patient?identifier=https://ehealth-hub.vn/sid/cccd|{cccd}")
    imported = feed.post("Consent", json=deny)
    assert imported.status_code == 201, imported.text
    stored = imported.json()
    assert stored["patient"] == ref(f"Patient/{world.patient}")
    assert world.clinician("b").get(f"Observation/hb-{world.uid}").status_code == 404
    alerts = [a for a in world.alerts(world.me) if a["consent"] == f"Consent/{stored['id']}"]
    assert [a["role"] for a in alerts] == ["integration-service"]
    # Validated like any writer, and it cannot lift the patient's deny.
    assert feed.post("Consent", json={**deny, "status": "whatever"}).status_code == 422
    key = f"Consent/{stored['id']}"
    assert feed.put(key, json={**stored, "status": "inactive"}).status_code == 403
    assert feed.delete(key).status_code == 403


def _ids(client: httpx.Client, world: World) -> set[str]:
    answer = client.get("Consent", params={"patient": world.patient})
    assert answer.status_code == 200, answer.text
    return {e["resource"]["id"] for e in answer.json().get("entry", [])}


def test_a_consent_naming_a_sensitive_class_is_seen_only_with_that_class(world: World) -> None:
    """A Consent is labelled with the classes its provisions name (permit or deny, nested too):
    that the patient shares mental-health data is itself mental-health data."""
    me = world.me
    psy = me.post("Consent", json=consent(world, permit(world.dr("b"), "PSY"))).json()["id"]
    plain = me.post("Consent", json=consent(world, permit(world.dr("b")))).json()["id"]
    nested = {**permit(world.dr("b")), "provision": [{"type": "deny", "securityLabel": permit("x", "HIV")["securityLabel"]}]}  # fmt: skip
    hiv = me.post("Consent", json=consent(world, nested)).json()["id"]
    everything = {psy, plain, hiv}
    assert _ids(me, world) == everything  # the patient sees all her Consents
    assert _ids(world.admin, world) == everything
    assert _ids(world.as_(Role.AUDITOR), world) == everything
    # The proxy and a clinician with the ordinary policy grant: only the ordinary one.
    for client in (world.husband, world.clinician("a")):
        assert _ids(client, world) == {plain}
        assert client.get(f"Consent/{psy}").status_code == 404
        assert client.get(f"Consent/{hiv}").status_code == 404
    # The grantee holds PSY through the Consent: he sees it (and the data), not the HIV one.
    dr_b = world.clinician("b")
    assert dr_b.get(f"Condition/dep-{world.uid}").status_code == 200
    assert _ids(dr_b, world) == {psy, plain}
    assert dr_b.get(f"Consent/{hiv}").status_code == 404
    # Governance and grants keep working on labelled Consents: the patient withdraws it.
    stored = me.get(f"Consent/{psy}").json()
    assert me.put(f"Consent/{psy}", json={**stored, "status": "inactive"}).status_code == 200
    assert dr_b.get(f"Condition/dep-{world.uid}").status_code == 404
    assert dr_b.get(f"Consent/{psy}").status_code == 404
    assert me.get(f"Consent/{psy}").json()["status"] == "inactive"
    # A clinician records a signed PSY consent for a colleague he cannot read himself.
    recorded = world.clinician("a").post(
        "Consent", json=consent(world, permit(world.dr("b"), "PSY"), **signed(world))
    )
    assert recorded.status_code == 201, recorded.text
    assert dr_b.get(f"Condition/dep-{world.uid}").status_code == 200
    assert world.clinician("a").get(f"Consent/{recorded.json()['id']}").status_code == 404
    assert f"Consent/{recorded.json()['id']}" in {a["consent"] for a in world.alerts(me)}


def test_a_proxy_cannot_withdraw_a_sensitive_permit(world: World) -> None:
    """docs/access.md: proxies grant or withdraw permits of ordinary data only. Hidden from him,
    the Consent is unknown (404); seen (the patient shares PSY with him too), governance refuses
    (403) every way of withdrawing or narrowing it, and lets him withdraw ordinary permits."""
    me, husband, base = world.me, world.husband, world.server.base
    body = consent(world, {**permit(world.dr("b"), "PSY", "N"), "period": {"start": "2020-01-01"}})
    created = me.post("Consent", json=body)
    assert created.status_code == 201, created.text
    stored = created.json()
    key = f"Consent/{stored['id']}"
    inactive = {**stored, "status": "inactive"}
    assert husband.put(key, json=inactive).status_code in (403, 404)
    assert husband.delete(key).status_code in (403, 404)
    # The patient shares PSY with her husband as well: he now sees the Consent.
    to_him = me.post("Consent", json=consent(world, permit(world.rp, "PSY")))
    assert to_him.status_code == 201, to_him.text
    assert husband.get(key).status_code == 200
    narrowed = [
        inactive,
        {**stored, "status": "rejected"},
        {**stored, "provision": {**stored["provision"], "securityLabel": [{"system": ACT_CODE, "code": "N"}]}},
        {**stored, "provision": {**stored["provision"], "actor": [actor(world.dr("a"))]}},
        {**stored, "provision": {**stored["provision"], "purpose": [{"system": ACT_CODE, "code": "HRESCH"}]}},
        {**stored, "provision": {**stored["provision"], "period": {"start": "2020-01-01", "end": "2020-12-31"}}},
        {**stored, "provision": {**stored["provision"], "type": "deny"}},
    ]  # fmt: skip
    for version in narrowed:
        answer = husband.put(key, json=version)
        assert answer.status_code == 403, (version, answer.text)
        assert "sensitive" in _diagnostics(answer) and "PSY" in _diagnostics(answer)
    deleted = husband.delete(key)
    assert deleted.status_code == 403 and "PSY" in _diagnostics(deleted), deleted.text
    conditional = husband.put("Consent", params={"_id": stored["id"]}, json=inactive)
    assert conditional.status_code == 403 and "PSY" in _diagnostics(conditional), conditional.text
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": inactive, "request": {"method": "PUT", "url": key}},
            {"request": {"method": "DELETE", "url": f"Consent/{to_him.json()['id']}"}},
        ],
    }
    answer = husband.post(base, json=transaction)
    assert answer.status_code == 403 and "PSY" in _diagnostics(answer), answer.text
    patched = husband.patch(
        key,
        json=[{"op": "replace", "path": "/status", "value": "inactive"}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert patched.status_code >= 400
    # His own PSY permit he cannot withdraw either: the patient gave it.
    assert husband.delete(f"Consent/{to_him.json()['id']}").status_code == 403
    # Unchanged: still active, Dr B still reads the PSY data.
    assert me.get(key).json()["status"] == "active"
    assert world.clinician("b").get(f"Condition/dep-{world.uid}").status_code == 200
    # The ordinary part of it he may withdraw, and an ordinary permit altogether.
    psy_only = {**stored, "provision": {**stored["provision"], "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}}  # fmt: skip
    answer = husband.put(key, json=psy_only)
    assert answer.status_code == 200, answer.text
    ordinary = me.post("Consent", json=consent(world, permit(world.dr("b")))).json()
    assert (
        husband.put(f"Consent/{ordinary['id']}", json={**ordinary, "status": "inactive"}).status_code == 200
    )
    assert husband.delete(f"Consent/{ordinary['id']}").status_code == 204
    assert {a["consent"] for a in world.alerts(me) if a["recordedBy"] == world.rp} >= {key}
