"""Facility admins write only their own facilities' directory (consent.governance, docs/access.md §1).

Owns: tests over real HTTP (LiveServer, make_token) that a facility admin creates, changes
and deletes Organization, PractitionerRole, Practitioner, Location, HealthcareService,
Endpoint, Schedule and Slot only when they belong to their organizations, checked on the
stored version and on the version written, on every write path (PUT, POST,
DELETE, conditional forms, transactions and batches), while reads and hub admins are
unrestricted; and that a proxy's consent alerts show only Consents the proxy could read.
Calls: the test server and its fixtures (tests/conftest.py).  Called by: pytest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import LiveServer, make_token

Client = Callable[[str | None], httpx.Client]


@dataclass
class World:
    """Two facilities (mine with a sub-organization, other) and their directory entries."""

    uid: str
    mine: str
    other: str

    def id(self, name: str) -> str:
        return f"dw-{name}-{self.uid}"


def _org(oid: str, part_of: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Organization", "id": oid, "name": f"Cơ sở {oid}"}
    if part_of:
        body["partOf"] = {"reference": f"Organization/{part_of}"}
    return body


def _role(rid: str, practitioner: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
        "organization": {"reference": f"Organization/{org}"},
    }


def _entries(w: World) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [_org(w.mine), _org(w.other), _org(w.id("sub"), w.mine)]
    for side, org in (("mine", w.mine), ("other", w.other)):
        doctor = w.id(f"doc-{side}")
        out += [
            {"resourceType": "Practitioner", "id": doctor, "name": [{"family": side, "given": [w.uid]}]},
            _role(w.id(f"role-{side}"), doctor, org),
            {
                "resourceType": "Location",
                "id": w.id(f"loc-{side}"),
                "name": side,
                "managingOrganization": {"reference": f"Organization/{org}"},
            },
            {
                "resourceType": "HealthcareService",
                "id": w.id(f"hs-{side}"),
                "name": side,
                "providedBy": {"reference": f"Organization/{org}"},
            },
            {
                "resourceType": "Endpoint",
                "id": w.id(f"ep-{side}"),
                "status": "active",
                "connectionType": {"code": "hl7-fhir-rest"},
                "payloadType": [{"text": "any"}],
                "address": f"https://{side}.example.vn/fhir",
                "managingOrganization": {"reference": f"Organization/{org}"},
            },
            {
                "resourceType": "Schedule",
                "id": w.id(f"sch-{side}"),
                "actor": [{"reference": f"PractitionerRole/{w.id(f'role-{side}')}"}],
            },
            {
                "resourceType": "Slot",
                "id": w.id(f"slot-{side}"),
                "schedule": {"reference": f"Schedule/{w.id(f'sch-{side}')}"},
                "status": "free",
                "start": "2027-01-04T08:00:00+07:00",
                "end": "2027-01-04T08:15:00+07:00",
            },
        ]
    # A doctor working at both facilities: the admin of one does not own them.
    shared = w.id("doc-shared")
    out += [
        {"resourceType": "Practitioner", "id": shared, "name": [{"family": "shared", "given": [w.uid]}]},
        _role(w.id("role-shared-mine"), shared, w.mine),
        _role(w.id("role-shared-other"), shared, w.other),
    ]
    return out


@pytest.fixture()
def world(live_server: LiveServer, uid: str) -> World:
    w = World(uid, f"dw-mine-{uid}", f"dw-other-{uid}")
    with live_server.admin_client() as admin:
        for body in _entries(w):
            answer = admin.put(f"{body['resourceType']}/{body['id']}", json=body)
            assert answer.status_code in (200, 201), answer.text
    return w


@pytest.fixture()
def fadmin(live_server: LiveServer, world: World) -> Iterator[httpx.Client]:
    token = make_token(live_server, role="facility-admin", organizations=[world.mine])
    with live_server.client(token) as client:
        yield client


def _refused(answer: httpx.Response) -> str:
    """A 403 with an OperationOutcome saying why; its text."""
    assert answer.status_code == 403, (answer.status_code, answer.text)
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    text = " ".join(i.get("diagnostics", "") for i in outcome["issue"])
    assert "facility admin" in text, text
    return text


def _current(live_server: LiveServer, ref: str) -> dict[str, Any]:
    with live_server.admin_client() as admin:
        answer = admin.get(ref)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


# --- the other facility's directory: every write path refused --------------------------------


OTHERS = ["Organization", "PractitionerRole", "Location", "HealthcareService", "Endpoint", "Schedule", "Slot"]


def _other_ref(w: World, res_type: str) -> str:
    short = {
        "PractitionerRole": "role",
        "Location": "loc",
        "HealthcareService": "hs",
        "Endpoint": "ep",
        "Schedule": "sch",
        "Slot": "slot",
    }
    return (
        f"Organization/{w.other}"
        if res_type == "Organization"
        else f"{res_type}/{w.id(short[res_type] + '-other')}"
    )


@pytest.mark.parametrize("res_type", OTHERS)
def test_a_facility_admin_cannot_put_or_delete_another_facilitys_entry(
    live_server: LiveServer, world: World, fadmin: httpx.Client, res_type: str
) -> None:
    ref = _other_ref(world, res_type)
    before = _current(live_server, ref)
    renamed = {**before, "name": "đã sửa"} if res_type != "Slot" else {**before, "status": "busy"}
    _refused(fadmin.put(ref, json=renamed))
    _refused(fadmin.delete(ref))
    after = _current(live_server, ref)
    assert after["meta"]["versionId"] == before["meta"]["versionId"]  # nothing was written


def test_the_attack_moving_another_facilitys_role_to_mine_is_refused(
    live_server: LiveServer, world: World, fadmin: httpx.Client
) -> None:
    ref = f"PractitionerRole/{world.id('role-other')}"
    moved = _role(world.id("role-other"), world.id("doc-other"), world.mine)
    why = _refused(fadmin.put(ref, json=moved))
    assert "change" in why
    assert _current(live_server, ref)["organization"]["reference"] == f"Organization/{world.other}"


def test_writing_my_entry_into_another_facility_is_refused(world: World, fadmin: httpx.Client) -> None:
    # The stored version is mine, the new one names the other facility: the new version decides.
    ref = f"Location/{world.id('loc-mine')}"
    body = fadmin.get(ref).json()
    body["managingOrganization"] = {"reference": f"Organization/{world.other}"}
    why = _refused(fadmin.put(ref, json=body))
    assert "managingOrganization" in why
    body["managingOrganization"] = {"reference": f"https://elsewhere.example/fhir/Organization/{world.mine}"}
    _refused(fadmin.put(ref, json=body))  # only literal references to their organizations count


def test_creates_outside_my_facilities_are_refused(world: World, fadmin: httpx.Client) -> None:
    _refused(fadmin.post("Organization", json={"resourceType": "Organization", "name": "mới, tự lập"}))
    under_other = _org("ignored", world.other)
    del under_other["id"]
    _refused(fadmin.post("Organization", json=under_other))
    _refused(fadmin.post("PractitionerRole", json={"resourceType": "PractitionerRole", "active": True}))
    _refused(
        fadmin.post(
            "HealthcareService",
            json={
                "resourceType": "HealthcareService",
                "providedBy": {"reference": f"Organization/{world.other}"},
            },
        )
    )
    _refused(
        fadmin.post(
            "Schedule",
            json={"resourceType": "Schedule", "actor": [{"reference": f"Location/{world.id('loc-other')}"}]},
        )
    )
    _refused(
        fadmin.post(
            "Slot",
            json={
                "resourceType": "Slot",
                "schedule": {"reference": f"Schedule/{world.id('sch-other')}"},
                "status": "free",
                "start": "2027-01-05T08:00:00+07:00",
                "end": "2027-01-05T08:15:00+07:00",
            },
        )
    )


def test_a_practitioner_with_any_role_elsewhere_is_not_theirs(
    live_server: LiveServer, world: World, fadmin: httpx.Client
) -> None:
    for name in ("doc-other", "doc-shared"):
        ref = f"Practitioner/{world.id(name)}"
        body = _current(live_server, ref)
        _refused(fadmin.put(ref, json={**body, "name": [{"family": "đổi tên"}]}))
        _refused(fadmin.delete(ref))
    # A person without any role yet is nobody's to change (but anyone's to create).
    created = fadmin.post("Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "Mới"}]})
    assert created.status_code == 201, created.text
    new_ref = f"Practitioner/{created.json()['id']}"
    _refused(fadmin.put(new_ref, json={**created.json(), "name": [{"family": "Sửa"}]}))


def test_conditional_forms_are_refused(live_server: LiveServer, world: World, fadmin: httpx.Client) -> None:
    role = _role(world.id("role-other"), world.id("doc-other"), world.mine)
    del role["id"]
    _refused(fadmin.put(f"PractitionerRole?_id={world.id('role-other')}", json=role))
    _refused(fadmin.delete(f"Location?_id={world.id('loc-other')}"))
    _refused(
        fadmin.post(
            "Location",
            json={
                "resourceType": "Location",
                "managingOrganization": {"reference": f"Organization/{world.other}"},
            },
            headers={"If-None-Exist": f"_id=nothing-{world.uid}"},
        )
    )
    # A conditional reference is resolved first, then checked: the other facility, refused.
    _refused(
        fadmin.post(
            "Location",
            json={
                "resourceType": "Location",
                "managingOrganization": {"reference": f"Organization?_id={world.other}"},
            },
        )
    )
    assert _current(live_server, f"Location/{world.id('loc-other')}").get("id")


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundles_are_refused_entry_by_entry(
    live_server: LiveServer, world: World, fadmin: httpx.Client, kind: str
) -> None:
    moved = _role(world.id("role-other"), world.id("doc-other"), world.mine)
    bundle = {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"resource": moved, "request": {"method": "PUT", "url": f"PractitionerRole/{moved['id']}"}},
            {"request": {"method": "DELETE", "url": f"Organization/{world.other}"}},
            {
                "resource": {"resourceType": "Organization", "name": "ngoài"},
                "request": {"method": "POST", "url": "Organization"},
            },
        ],
    }
    answer = fadmin.post("", json=bundle)
    if kind == "transaction":
        _refused(answer)
    else:
        assert answer.status_code == 200, answer.text
        statuses = [e["response"]["status"] for e in answer.json()["entry"]]
        assert all(s.startswith("403") for s in statuses), statuses
    assert _current(live_server, f"PractitionerRole/{moved['id']}")["organization"]["reference"] == (
        f"Organization/{world.other}"
    )
    assert _current(live_server, f"Organization/{world.other}")["name"] == f"Cơ sở {world.other}"


# --- my facilities' directory: allowed ----------------------------------------------------------


def test_a_facility_admin_manages_their_own_directory(
    live_server: LiveServer, world: World, fadmin: httpx.Client
) -> None:
    mine = fadmin.get(f"Organization/{world.mine}").json()
    assert fadmin.put(f"Organization/{world.mine}", json={**mine, "name": "đổi tên"}).status_code == 200
    # A department under their organization, and one under that (partOf chain).
    dept = fadmin.post(
        "Organization",
        json={
            "resourceType": "Organization",
            "name": "Khoa",
            "partOf": {"reference": f"Organization/{world.mine}"},
        },
    )
    assert dept.status_code == 201, dept.text
    ward = fadmin.post(
        "Organization",
        json={
            "resourceType": "Organization",
            "name": "Phòng",
            "partOf": {"reference": f"Organization/{dept.json()['id']}"},
        },
    )
    assert ward.status_code == 201, ward.text
    sub = fadmin.get(f"Organization/{world.id('sub')}").json()
    assert fadmin.put(f"Organization/{world.id('sub')}", json={**sub, "name": "trạm con"}).status_code == 200
    # A new doctor and their role here, then the doctor is theirs to change.
    doctor = fadmin.post(
        "Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "Mới"}]}
    ).json()
    role = _role("x", doctor["id"], world.mine)
    del role["id"]
    created_role = fadmin.post("PractitionerRole", json=role)
    assert created_role.status_code == 201, created_role.text
    renamed = fadmin.put(f"Practitioner/{doctor['id']}", json={**doctor, "name": [{"family": "Đã sửa"}]})
    assert renamed.status_code == 200, renamed.text
    for res_type, short in (
        ("PractitionerRole", "role"),
        ("Location", "loc"),
        ("HealthcareService", "hs"),
        ("Endpoint", "ep"),
        ("Schedule", "sch"),
        ("Slot", "slot"),
    ):
        ref = f"{res_type}/{world.id(short + '-mine')}"
        changed = fadmin.put(ref, json={**fadmin.get(ref).json(), "language": "vi"})
        assert changed.status_code == 200, (ref, changed.text)
        assert _current(live_server, ref)["language"] == "vi"
    assert fadmin.delete(f"Slot/{world.id('slot-mine')}").status_code in (200, 204)
    assert fadmin.delete(f"Practitioner/{world.id('doc-mine')}").status_code in (200, 204)
    # Reads stay open: the other facility's directory is readable, so refusals are 403, not 404.
    assert fadmin.get(f"PractitionerRole/{world.id('role-other')}").status_code == 200


def test_hub_admins_and_integration_services_are_not_restricted(
    live_server: LiveServer, world: World
) -> None:
    service = make_token(live_server, role="integration-service")
    with live_server.client(service) as client:
        moved = _role(world.id("role-other"), world.id("doc-other"), world.mine)
        assert client.put(f"PractitionerRole/{moved['id']}", json=moved).status_code == 200
    with live_server.admin_client() as admin:
        assert admin.delete(f"Location/{world.id('loc-other')}").status_code in (200, 204)


# --- consent alerts: a proxy sees only alerts about Consents they could read ---------------------

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def _consent(patient: str, grantee: str, *classes: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": grantee},
                }
            ],
            "securityLabel": [{"system": ACT_CODE, "code": c} for c in classes],
        },
    }


def test_a_proxy_sees_no_alert_about_a_sensitive_consent(live_server: LiveServer, world: World) -> None:
    patient, proxy = f"dw-pt-{world.uid}", f"dw-rp-{world.uid}"
    alerts_url = live_server.base.removesuffix("/fhir") + "/access/consent-alerts"
    with live_server.admin_client() as admin:
        for body in (
            {
                "resourceType": "Patient",
                "id": patient,
                "managingOrganization": {"reference": f"Organization/{world.mine}"},
            },
            {
                "resourceType": "RelatedPerson",
                "id": proxy,
                "active": True,
                "patient": {"reference": f"Patient/{patient}"},
            },
        ):
            assert admin.put(f"{body['resourceType']}/{body['id']}", json=body).status_code in (200, 201)
        # Written by the hub admin (not the patient), so each is alerted.
        created = admin.post("Consent", json=_consent(patient, f"Organization/{world.other}"))
        assert created.status_code == 201, created.text
        ordinary = created.json()["id"]
        psy = admin.post("Consent", json=_consent(patient, f"Organization/{world.other}", "PSY")).json()["id"]
        psy_deleted = admin.post(
            "Consent", json=_consent(patient, f"Organization/{world.mine}", "PSY")
        ).json()["id"]
        assert admin.delete(f"Consent/{psy_deleted}").status_code in (200, 204)
        everyone = admin.get(alerts_url).json()
    mine = [a for a in everyone if a["patient"] == f"Patient/{patient}"]
    assert {a["consent"] for a in mine} == {f"Consent/{c}" for c in (ordinary, psy, psy_deleted)}
    assert any("PSY" in a["detail"] for a in mine)
    token = make_token(live_server, role="proxy", fhir_user=f"RelatedPerson/{proxy}")
    with live_server.client(token) as husband:
        assert husband.get(f"Consent/{ordinary}").status_code == 200
        assert husband.get(f"Consent/{psy}").status_code == 404
        answer = husband.get(alerts_url)
        assert answer.status_code == 200, answer.text
        seen = answer.json()
    assert [a["consent"] for a in seen] == [f"Consent/{ordinary}"]
    assert not any("PSY" in a["detail"] for a in seen)
    # The patient sees every alert about their Consents.
    me = make_token(live_server, role="patient", fhir_user=f"Patient/{patient}")
    with live_server.client(me) as patient_client:
        assert {a["consent"] for a in patient_client.get(alerts_url).json()} == {a["consent"] for a in mine}


def test_a_transaction_creates_a_department_with_its_staff_and_schedule(
    live_server: LiveServer, world: World, fadmin: httpx.Client
) -> None:
    # Entries refer to one another before they are stored: each is checked against the
    # versions the transaction already wrote.
    dept, doctor, role, schedule = (f"urn:uuid:{n}{world.uid}aaaaaaaaaaaaaaaaaaaa"[:45] for n in "abcd")
    entries = [
        (
            dept,
            {
                "resourceType": "Organization",
                "name": "Khoa mới",
                "partOf": {"reference": f"Organization/{world.mine}"},
            },
        ),
        (doctor, {"resourceType": "Practitioner", "name": [{"family": "Mới"}]}),
        (
            role,
            {
                "resourceType": "PractitionerRole",
                "practitioner": {"reference": doctor},
                "organization": {"reference": dept},
            },
        ),
        (schedule, {"resourceType": "Schedule", "actor": [{"reference": role}]}),
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": body, "request": {"method": "POST", "url": body["resourceType"]}}
            for url, body in entries
        ],
    }
    answer = fadmin.post("", json=bundle)
    assert answer.status_code == 200, answer.text
    # "http://host/fhir/Type/id/_history/1" -> "Type/id"
    refs = [
        "/".join(e["response"]["location"].split("/_history")[0].split("/")[-2:])
        for e in answer.json()["entry"]
    ]
    assert [r.split("/")[0] for r in refs] == ["Organization", "Practitioner", "PractitionerRole", "Schedule"]
    stored_role = _current(live_server, refs[2])
    assert stored_role["organization"]["reference"] == refs[0]
    assert _current(live_server, refs[3])["actor"] == [{"reference": refs[2]}]
    # The same with a department under the other facility: the whole transaction is refused.
    entries[0][1]["partOf"] = {"reference": f"Organization/{world.other}"}
    _refused(fadmin.post("", json=bundle))


def test_a_clinician_cannot_move_another_facilitys_role_either(live_server: LiveServer, uid: str) -> None:
    """A clinician (user/*.cruds) is held to the same rule: moving another facility's
    PractitionerRole to their own organization would take over whatever names that role."""
    with live_server.admin_client() as admin:
        for org in (f"cl-mine-{uid}", f"cl-other-{uid}"):
            assert admin.put(
                f"/Organization/{org}", json={"resourceType": "Organization", "id": org, "name": org}
            ).status_code in (200, 201)
        role = {
            "resourceType": "PractitionerRole",
            "id": f"cl-role-{uid}",
            "organization": {"reference": f"Organization/cl-other-{uid}"},
        }
        assert admin.put(f"/PractitionerRole/cl-role-{uid}", json=role).status_code in (200, 201)
    token = make_token(
        live_server, role="clinician", fhir_user=f"Practitioner/cl-{uid}", organizations=[f"cl-mine-{uid}"]
    )
    with live_server.client(token) as clinician:
        moved = {**role, "organization": {"reference": f"Organization/cl-mine-{uid}"}}
        answer = clinician.put(f"/PractitionerRole/cl-role-{uid}", json=moved)
        assert answer.status_code == 403, answer.text
        assert "directory only" in answer.json()["issue"][0]["diagnostics"]
        assert clinician.delete(f"/PractitionerRole/cl-role-{uid}").status_code == 403
    with live_server.admin_client() as admin:
        kept = admin.get(f"/PractitionerRole/cl-role-{uid}").json()
        assert (
            kept["organization"]["reference"] == f"Organization/cl-other-{uid}"
            and kept["meta"]["versionId"] == "1"
        )
