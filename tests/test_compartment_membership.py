"""Issue 8, defects 1-3: every resource of a patient-compartment type belongs to its patient(s).

Over real HTTP with real tokens: patient A's resources of the types the search registry does
not cover (QuestionnaireResponse, MedicationAdministration, Specimen...), a Binary through its
securityContext and a document Bundle through its entries are A's only: patient B, B's proxy
and a clinician of another facility can neither read, search, $everything nor $export them,
nor overwrite them. Subjects written as identifier references, as absolute URLs of this hub
and as conditional references are resolved at write time; foreign URLs, contained Patients
and unknown identifiers leave a resource visible only to unrestricted roles (and a restricted
writer is refused). Membership follows the current version, and each version in history
keeps the patients it had.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import LiveServer, make_token

from consent.context import system_access
from hub.auth.principal import Role
from hub.crypto import is_sealed
from hub.db.schema import compartment, history_compartment, resource
from hub.ingest.pipeline import Importer
from hub.ops.compartment import NO_PATIENT
from hub.store.reindex import reindex

CCCD = "https://ehealth-hub.vn/sid/cccd"
LOINC = "http://loinc.org"
HIV_TEST = {"coding": [{"system": LOINC, "code": "7917-8", "display": "HIV 1+2 Ab"}]}
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


@dataclass
class World:
    server: LiveServer
    uid: str
    a: str = ""
    b: str = ""
    a_cccd: str = ""
    a_records: dict[str, str] = field(default_factory=dict)  # label -> Type/id, all A's
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def __getattr__(self, name: str) -> httpx.Client:
        clients = self.__dict__.get("clients", {})
        if name in clients:
            return clients[name]  # type: ignore[no-any-return]
        raise AttributeError(name)


def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return dict(response.json())


def _post(client: httpx.Client, body: dict[str, Any]) -> str:
    created = _created(client.post(f"/{body['resourceType']}", json=body))
    return f"{created['resourceType']}/{created['id']}"


def _a_records(a: str, observation: str) -> dict[str, dict[str, Any]]:
    subject = {"reference": f"Patient/{a}"}
    text = {"text": "x"}
    return {
        "QuestionnaireResponse": {
            "resourceType": "QuestionnaireResponse",
            "status": "completed",
            "subject": subject,
            "item": [{"linkId": "1", "text": "Smoker", "answer": [{"valueString": "no"}]}],
        },
        "MedicationAdministration": {
            "resourceType": "MedicationAdministration",
            "status": "completed",
            "medicationCodeableConcept": {"text": "paracetamol"},
            "subject": subject,
            "effectiveDateTime": "2026-01-02T10:00:00Z",
        },
        "Specimen": {"resourceType": "Specimen", "subject": subject, "type": {"text": "blood"}},
        "FamilyMemberHistory": {
            "resourceType": "FamilyMemberHistory",
            "status": "completed",
            "patient": subject,
            "relationship": {"text": "mother"},
        },
        "Flag": {"resourceType": "Flag", "status": "active", "code": {"text": "violent"}, "subject": subject},
        "Composition": {
            "resourceType": "Composition",
            "status": "final",
            "type": text,
            "date": "2026-01-02",
            "author": [{"reference": "Practitioner/dr-x"}],
            "title": "Discharge",
            "subject": subject,
        },
        "List": {"resourceType": "List", "status": "current", "mode": "working", "subject": subject},
        "Media": {
            "resourceType": "Media",
            "status": "completed",
            "subject": subject,
            "content": {"contentType": "image/png", "data": "iVBORw0KGgo="},
        },
        "Basic": {"resourceType": "Basic", "code": text, "subject": subject},
        "Binary": {
            "resourceType": "Binary",
            "contentType": "application/pdf",
            "securityContext": subject,
            "data": "JVBERi0=",
        },
        "Binary-of-observation": {
            "resourceType": "Binary",
            "contentType": "application/pdf",
            "securityContext": {"reference": observation},
            "data": "JVBERi0=",
        },
    }


def _document(a_cccd: str) -> dict[str, Any]:
    """A document Bundle whose Composition names its Patient entry, known by A's CCCD."""
    patient_url, composition_url = "urn:uuid:5f2a0c51-0d53-4a4c-9d5e-0a7e1b6f0c11", "urn:uuid:1b0e"
    return {
        "resourceType": "Bundle",
        "type": "document",
        "timestamp": "2026-01-02T10:00:00Z",
        "identifier": {
            "system": "urn:ietf:rfc:3986",
            "value": "urn:uuid:8e0d3c3a-1f6f-4d32-9b0b-0c3f1c6d9a10",
        },
        "entry": [
            {
                "fullUrl": composition_url,
                "resource": {
                    "resourceType": "Composition",
                    "status": "final",
                    "type": {"text": "Clinic letter"},
                    "date": "2026-01-02",
                    "author": [{"reference": "Practitioner/dr-x"}],
                    "title": "Letter",
                    "subject": {"reference": patient_url},
                },
            },
            {
                "fullUrl": patient_url,
                "resource": {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": a_cccd}]},
            },
        ],
    }


@pytest.fixture(scope="module")
def world(live_server: LiveServer) -> Iterator[World]:
    uid = str(time.time_ns())[-10:]
    w = World(live_server, uid)
    admin = live_server.admin_client()
    w.a_cccd = f"0790{uid}"
    w.a = _post(
        admin,
        {
            "resourceType": "Patient",
            "identifier": [{"system": CCCD, "value": w.a_cccd}],
            "managingOrganization": {"reference": f"Organization/home-{uid}"},
        },
    ).split("/")[1]
    w.b = _post(
        admin, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": f"0791{uid}"}]}
    ).split("/")[1]
    proxy = _post(
        admin, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{w.b}"}}
    )
    observation = _post(
        admin,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "weight"},
            "subject": {"reference": f"Patient/{w.a}"},
        },
    )
    for label, body in _a_records(w.a, observation).items():
        w.a_records[label] = _post(admin, body)
    w.a_records["document"] = _post(admin, _document(w.a_cccd))
    tokens = {
        "admin": live_server.admin_token,
        "patient_a": make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{w.a}"),
        "patient_b": make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{w.b}"),
        "proxy_b": make_token(live_server, role=Role.PROXY, fhir_user=proxy),
        "other_clinician": make_token(
            live_server,
            role=Role.CLINICIAN,
            fhir_user=f"Practitioner/o-{uid}",
            organizations=[f"other-{uid}"],
        ),
        "home_clinician": make_token(
            live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/h-{uid}", organizations=[f"home-{uid}"]
        ),
    }
    w.clients = {name: live_server.client(token) for name, token in tokens.items()}
    yield w
    for client in w.clients.values():
        client.close()
    admin.close()


OUTSIDERS = ("patient_b", "proxy_b", "other_clinician")


def _search_ids(client: httpx.Client, res_type: str, params: dict[str, str]) -> set[str] | None:
    """Ids of a search's matches; None when the search itself is refused (no data either)."""
    response = client.get(f"/{res_type}", params=params)
    if response.status_code >= 400:
        return None
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", []) if "resource" in e}


def _export_ids(client: httpx.Client) -> set[str]:
    """Ids in every file of a Patient-level $export by ``client`` (empty when refused)."""
    kick = client.get("/Patient/$export", headers=ASYNC)
    if kick.status_code != 202:
        assert kick.status_code in (401, 403), kick.text
        return set()
    status_url = kick.headers["Content-Location"]
    try:
        deadline = time.monotonic() + 30
        while (status := client.get(status_url)).status_code == 202:
            assert time.monotonic() < deadline, "the export did not finish"
            time.sleep(0.05)
        assert status.status_code == 200, status.text
        found: set[str] = set()
        for output in status.json()["output"]:
            for line in client.get(output["url"]).content.splitlines():
                found.add(httpx.Response(200, content=line).json()["id"])
        return found
    finally:
        client.delete(status_url)


def test_resources_of_unindexed_compartment_types_are_their_patients_only(world: World) -> None:
    for label, key in world.a_records.items():
        assert world.admin.get(f"/{key}").status_code == 200, label
        assert world.patient_a.get(f"/{key}").status_code == 200, label  # the patient's own
        assert world.home_clinician.get(f"/{key}").status_code == 200, label  # treating facility
        for outsider in OUTSIDERS:
            client = world.clients[outsider]
            assert client.get(f"/{key}").status_code == 404, (outsider, label)
            res_type, res_id = key.split("/")
            found = _search_ids(client, res_type, {"_id": res_id})
            assert not found or res_id not in found, (outsider, label)
    # $everything of A, as the admin, now lists them (they are in A's compartment)...
    everything = world.admin.get(f"/Patient/{world.a}/$everything", params={"_count": "1000"}).json()
    listed = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything["entry"]}
    assert {
        k for label, k in world.a_records.items() if label[0].isupper() and "Binary" not in label
    } <= listed
    # ... and B's own $everything does not.
    theirs = world.patient_b.get(f"/Patient/{world.b}/$everything", params={"_count": "1000"}).json()
    assert not {e["resource"]["id"] for e in theirs.get("entry", [])} & {
        k.split("/")[1] for k in world.a_records.values()
    }


def test_patient_b_cannot_export_as_resources(world: World) -> None:
    a_ids = {k.split("/")[1] for k in world.a_records.values()}
    exported = _export_ids(world.patient_b)
    assert world.b in exported  # B's own record is exported...
    assert not exported & a_ids  # ... and nothing of A's


def test_patient_b_cannot_overwrite_as_questionnaire_response(world: World) -> None:
    key = world.a_records["QuestionnaireResponse"]
    before = world.admin.get(f"/{key}").json()
    forged = {**before, "subject": {"reference": f"Patient/{world.b}"}, "status": "amended"}
    forged.pop("meta", None)
    response = world.patient_b.put(f"/{key}", json=forged)
    assert response.status_code in (403, 404), response.text
    after = world.admin.get(f"/{key}").json()
    assert after["meta"]["versionId"] == before["meta"]["versionId"] and after["status"] == "completed"


def _hiv_observation(subject: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": HIV_TEST, "subject": subject, **extra}


def test_identifier_absolute_and_conditional_subjects_resolve_to_the_patient(world: World) -> None:
    own_base = str(world.server.base).rstrip("/")
    subjects = {
        "identifier": {"identifier": {"system": CCCD, "value": world.a_cccd}},
        "typed identifier": {"type": "Patient", "identifier": {"system": CCCD, "value": world.a_cccd}},
        "own absolute URL": {"reference": f"{own_base}/Patient/{world.a}"},
        "versioned": {"reference": f"Patient/{world.a}/_history/1"},
        "conditional": {"reference": f"Patient?identifier={CCCD}|{world.a_cccd}"},
    }
    for form, subject in subjects.items():
        key = _post(world.admin, _hiv_observation(subject))
        assert world.patient_a.get(f"/{key}").status_code == 200, form
        for outsider in (*OUTSIDERS, "home_clinician"):  # HIV: not even the treating facility
            assert world.clients[outsider].get(f"/{key}").status_code == 404, (form, outsider)
    # A Binary is as sensitive as the resource of its securityContext.
    pdf = {"resourceType": "Binary", "contentType": "application/pdf", "securityContext": {"reference": key}}
    binary = _post(world.admin, pdf)
    assert world.patient_a.get(f"/{binary}").status_code == 200
    for name in (*OUTSIDERS, "home_clinician"):
        assert world.clients[name].get(f"/{binary}").status_code == 404, name
    with world.server.engine.connect() as conn:  # ... and sealed at rest like it
        stored = conn.execute(
            sa.select(resource.c.content).where(resource.c.res_id == binary.split("/")[1])
        ).scalar_one()
    assert is_sealed(stored if isinstance(stored, bytes) else stored.encode())
    # A conditional reference is stored as the literal reference it resolved to.
    key = _post(world.admin, _hiv_observation(subjects["conditional"]))
    assert world.admin.get(f"/{key}").json()["subject"] == {"reference": f"Patient/{world.a}"}
    # ... and one that matches no Patient is refused, as in a transaction.
    missing = _hiv_observation({"reference": f"Patient?identifier={CCCD}|nobody-{world.uid}"})
    assert world.admin.post("/Observation", json=missing).status_code == 412


def test_unresolvable_subjects_are_for_unrestricted_roles_only(world: World) -> None:
    unresolvable = {
        "foreign URL": {"reference": f"https://other-hub.example/fhir/Patient/{world.a}"},
        "unknown identifier": {"identifier": {"system": CCCD, "value": f"nobody-{world.uid}"}},
        "contained": {"reference": "#p1"},
        "no subject": None,
    }
    for form, subject in unresolvable.items():
        body = _hiv_observation(subject)
        body["code"] = {"text": "weight"}  # ordinary data: only the missing patient hides it
        if subject is None:
            del body["subject"]
        if form == "contained":
            body["contained"] = [{"resourceType": "Patient", "id": "p1", "name": [{"family": "X"}]}]
        key = _post(world.admin, body)
        assert world.admin.get(f"/{key}").status_code == 200, form
        for name in ("patient_a", "home_clinician", *OUTSIDERS):
            assert world.clients[name].get(f"/{key}").status_code == 404, (form, name)
        # A restricted writer is told, rather than storing what it could not read back.
        refused = world.home_clinician.post("/Observation", json=body)
        assert refused.status_code == 422, (form, refused.text)
        assert refused.json()["resourceType"] == "OperationOutcome"
    # The treating clinician's QuestionnaireResponse whose subject the hub cannot resolve:
    qr = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "subject": {"identifier": {"system": CCCD, "value": f"nobody-{world.uid}"}},
    }
    assert world.home_clinician.post("/QuestionnaireResponse", json=qr).status_code == 422
    # ... while with the patient's identifier it is stored and is the patient's.
    qr["subject"] = {"identifier": {"system": CCCD, "value": world.a_cccd}}
    key = _post(world.home_clinician, qr)
    assert world.patient_a.get(f"/{key}").status_code == 200
    assert world.patient_b.get(f"/{key}").status_code == 404


def test_standalone_types_without_a_patient_stay_directory_data(world: World) -> None:
    schedule = _post(
        world.admin, {"resourceType": "Schedule", "actor": [{"reference": f"Practitioner/h-{world.uid}"}]}
    )
    for name in ("patient_b", "other_clinician"):
        assert world.clients[name].get(f"/{schedule}").status_code == 200
    group = _post(
        world.admin,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{world.a}"}}],
        },
    )
    assert world.patient_b.get(f"/{group}").status_code == 404  # a Group listing A is A's
    # Data whose subject is explicitly no patient (a market's water) is about no one.
    water = _post(
        world.admin,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "water sample"},
            "subject": {"reference": "Location/market"},
        },
    )
    assert world.patient_b.get(f"/{water}").status_code == 200


def test_a_moved_result_follows_its_current_patient(world: World) -> None:
    a_client, b_client = world.patient_a, world.patient_b
    key = _post(world.admin, _hiv_observation({"reference": f"Patient/{world.a}"}, code={"text": "weight"}))
    assert a_client.get(f"/{key}").status_code == 200
    body = world.admin.get(f"/{key}").json()
    body["subject"] = {"reference": f"Patient/{world.b}"}  # filed to the wrong patient: corrected
    assert world.admin.put(f"/{key}", json=body).status_code == 200
    # The first patient loses it: no read, no search match...
    assert a_client.get(f"/{key}").status_code == 404
    assert key.split("/")[1] not in (
        _search_ids(a_client, "Observation", {"_id": key.split("/")[1]}) or set()
    )
    # ... but the version that was in their record stays theirs (they saw it then), and it
    # never was the second patient's: B sees version 2 only.
    assert a_client.get(f"/{key}/_history/1").status_code == 200
    assert a_client.get(f"/{key}/_history/2").status_code == 404
    assert b_client.get(f"/{key}").status_code == 200
    assert b_client.get(f"/{key}/_history/1").status_code == 404
    history = b_client.get(f"/{key}/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2"]
    # Deleting keeps the last patients: the deleted resource's history stays B's.
    assert world.admin.delete(f"/{key}").status_code == 204
    assert b_client.get(f"/{key}/_history/2").status_code == 200
    assert a_client.get(f"/{key}/_history/2").status_code == 404


def test_reindex_rebuilds_current_and_history_membership(world: World) -> None:
    key = _post(world.admin, _hiv_observation({"reference": f"Patient/{world.a}"}))
    body = world.admin.get(f"/{key}").json()
    body["subject"] = {"identifier": {"system": CCCD, "value": world.a_cccd}}
    assert world.admin.put(f"/{key}", json=body).status_code == 200
    store = world.server.app.state.router.ctx.store
    engine = world.server.engine
    with engine.begin() as conn:
        pid = conn.execute(
            sa.select(resource.c.pid).where(resource.c.res_id == key.split("/")[1])
        ).scalar_one()
        before = _membership(conn, pid)
        conn.execute(compartment.delete().where(compartment.c.pid == pid))
        conn.execute(history_compartment.delete().where(history_compartment.c.pid == pid))
    assert before == ({world.a}, {(1, world.a)})
    with system_access("test-compartment-reindex"):
        reindex(store, "Observation")
    with engine.begin() as conn:
        assert _membership(conn, pid) == before
    assert world.patient_b.get(f"/{key}").status_code == 404
    assert world.patient_a.get(f"/{key}/_history/1").status_code == 200


def test_bulk_import_makes_the_same_membership_as_the_store(world: World, tmp_path: Path) -> None:
    """NDJSON import: an identifier subject is resolved against the database at write time,
    also to a Patient of the same batch, and a QuestionnaireResponse is its patient's."""
    cccd = f"0792{world.uid}"
    patient_id, obs_id, qr_id = f"imp-p-{world.uid}", f"imp-o-{world.uid}", f"imp-q-{world.uid}"
    lines = [
        {"resourceType": "Patient", "id": patient_id, "identifier": [{"system": CCCD, "value": cccd}]},
        _hiv_observation({"identifier": {"system": CCCD, "value": cccd}}, id=obs_id),
        {
            "resourceType": "QuestionnaireResponse",
            "id": qr_id,
            "status": "completed",
            "subject": {"reference": f"Patient/{patient_id}"},
        },
    ]
    data = tmp_path / "mixed.ndjson"
    data.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    with system_access("test-compartment-import"):
        report = Importer(world.server.app.state.router, workers=1).run([data])
    assert report.rejected == 0, report.errors
    with world.server.engine.begin() as conn:
        for res_id in (obs_id, qr_id):
            pid = conn.execute(sa.select(resource.c.pid).where(resource.c.res_id == res_id)).scalar_one()
            assert _membership(conn, pid)[0] == {patient_id}, res_id
    mine = world.server.client(make_token(world.server, role=Role.PATIENT, fhir_user=f"Patient/{patient_id}"))
    with mine:
        assert mine.get(f"/Observation/{obs_id}").status_code == 200
    assert world.patient_b.get(f"/Observation/{obs_id}").status_code == 404
    assert world.patient_b.get(f"/QuestionnaireResponse/{qr_id}").status_code == 404


def _membership(conn: sa.Connection, pid: int) -> tuple[set[str], set[tuple[int, str]]]:
    current = {
        r[0] for r in conn.execute(sa.select(compartment.c.patient_id).where(compartment.c.pid == pid))
    }
    past = {
        (r[0], r[1])
        for r in conn.execute(
            sa.select(history_compartment.c.version, history_compartment.c.patient_id).where(
                history_compartment.c.pid == pid
            )
        )
    }
    return current, past


def test_no_patient_is_the_empty_id() -> None:
    assert NO_PATIENT == ""
