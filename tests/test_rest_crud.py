"""Read, vread, create, update, delete and history over real HTTP."""

from __future__ import annotations

import time

import httpx


def _patient(uid: str, **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "https://vnhub.example/cccd", "value": f"0790{uid}"}],
        "name": [{"family": "Nguyễn", "given": [f"An{uid}"]}],
        **extra,
    }


def test_create_assigns_id_and_version(http: httpx.Client, uid: str) -> None:
    response = http.post("/Patient", json={**_patient(uid), "id": "client-chosen"})
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != "client-chosen"  # POST ignores the client's id
    assert body["meta"]["versionId"] == "1"
    assert response.headers["etag"] == 'W/"1"'
    assert "last-modified" in response.headers


def test_update_makes_versions_and_vread_returns_each(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid)).json()
    pid = created["id"]
    changed = {**created, "gender": "female"}
    updated = http.put(f"/Patient/{pid}", json=changed)
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] == "2"
    assert http.get(f"/Patient/{pid}/_history/1").json().get("gender") is None
    assert http.get(f"/Patient/{pid}/_history/2").json()["gender"] == "female"
    assert http.get(f"/Patient/{pid}/_history/9").status_code == 404


def test_update_with_same_content_keeps_version(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid)).json()
    again = http.put(f"/Patient/{created['id']}", json=created)
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "1"


def test_put_with_client_id_creates(http: httpx.Client, uid: str) -> None:
    response = http.put(f"/Patient/vn-{uid}", json={**_patient(uid), "id": f"vn-{uid}"})
    assert response.status_code == 201
    assert response.json()["id"] == f"vn-{uid}"


def test_put_requires_matching_id(http: httpx.Client, uid: str) -> None:
    response = http.put(f"/Patient/a-{uid}", json={**_patient(uid), "id": f"b-{uid}"})
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_if_match_conflict_gives_412(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid)).json()
    pid = created["id"]
    ok = http.put(f"/Patient/{pid}", json={**created, "gender": "male"}, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = http.put(f"/Patient/{pid}", json={**created, "gender": "other"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["issue"][0]["code"] == "conflict"


def test_delete_then_read_is_gone_and_history_keeps_all(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid)).json()
    pid = created["id"]
    assert http.delete(f"/Patient/{pid}").status_code == 204
    gone = http.get(f"/Patient/{pid}")
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"
    assert http.delete(f"/Patient/{pid}").status_code == 204  # idempotent
    history = http.get(f"/Patient/{pid}/_history").json()
    assert history["type"] == "history"
    assert history["total"] == 2
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert http.get(f"/Patient/{pid}/_history/1").status_code == 200
    # Undelete by update: a new version after the deletion.
    revived = http.put(f"/Patient/{pid}", json=created)
    assert revived.status_code == 201
    assert revived.json()["meta"]["versionId"] == "3"


def test_type_and_system_history_with_since_and_count(http: httpx.Client, uid: str) -> None:
    before = http.post("/Observation", json=_obs(uid)).json()["meta"]["lastUpdated"]
    time.sleep(0.01)
    ids = [http.post("/Observation", json=_obs(uid)).json()["id"] for _ in range(3)]
    page = http.get("/Observation/_history", params={"_since": before, "_count": 2})
    body = page.json()
    assert page.status_code == 200 and body["type"] == "history"
    assert len(body["entry"]) == 2
    assert body["total"] >= 3
    assert any(link["relation"] == "next" for link in body["link"])
    newest = [e["resource"]["id"] for e in body["entry"]]
    assert newest == ids[::-1][:2]
    system = http.get("/_history", params={"_since": before, "_count": 50}).json()
    assert set(ids) <= {e["resource"]["id"] for e in system["entry"] if "resource" in e}


def _obs(uid: str) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": uid},
    }


def test_prefer_return(http: httpx.Client, uid: str) -> None:
    minimal = http.post("/Patient", json=_patient(uid), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"]
    outcome = http.post("/Patient", json=_patient(uid), headers={"Prefer": "return=OperationOutcome"})
    assert outcome.json()["resourceType"] == "OperationOutcome"


def test_invalid_resource_gives_422_with_locations(http: httpx.Client) -> None:
    bad = {
        "resourceType": "Patient",
        "birthDate": "2020-13-45",
        "name": [{"given": "An"}],
        "favouriteColour": "red",
    }
    response = http.post("/Patient", json=bad)
    assert response.status_code == 422
    issues = response.json()["issue"]
    locations = {i["expression"][0] for i in issues}
    assert {"Patient.birthDate", "Patient.name[0].given", "Patient.favouriteColour"} <= locations


def test_error_statuses_are_operation_outcomes(http: httpx.Client) -> None:
    cases = [
        (http.post("/Patient", content=b"{not json", headers={"Content-Type": "application/fhir+json"}), 400),
        (http.post("/Patient", json={"resourceType": "Observation", "status": "final", "code": {}}), 400),
        (http.get("/NoSuchType/1"), 404),
        (http.get("/Patient/does-not-exist"), 404),
        (http.patch("/Patient/x", json={}), 405),
        (http.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"}), 415),
        (http.get("/Patient", headers={"Accept": "application/fhir+xml"}), 406),
        (http.get("/Patient/x/_history/abc"), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.headers["content-type"].startswith("application/fhir+json")


def test_conditional_read_not_modified(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json=_patient(uid))
    pid = created.json()["id"]
    again = http.get(f"/Patient/{pid}", headers={"If-None-Match": created.headers["etag"]})
    assert again.status_code == 304


def test_metadata_states_what_works(http: httpx.Client) -> None:
    statement = http.get("/metadata").json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    names = {p["name"] for p in patient["searchParam"]}
    assert {"_id", "_lastUpdated", "identifier", "name", "birthdate"} <= names
    assert {"read", "vread", "update", "delete", "create", "search-type"} <= {
        i["code"] for i in patient["interaction"]
    }
    assert patient["conditionalDelete"] == "single"
