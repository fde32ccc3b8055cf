"""Bundle transactions (all or nothing) and batches (each entry alone)."""

from __future__ import annotations

import uuid

import httpx

CCCD = "https://vnhub.example/cccd"


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _bundle(kind: str, entries: list[dict[str, object]]) -> dict[str, object]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _post(full_url: str, resource: dict[str, object], **request: object) -> dict[str, object]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }


def _count(http: httpx.Client, query: str) -> int:
    return int(http.get(f"/{query}&_total=accurate").json()["total"])


def test_transaction_resolves_urn_uuid_references(http: httpx.Client, uid: str) -> None:
    patient_url, encounter_url = _urn(), _urn()
    bundle = _bundle(
        "transaction",
        [
            _post(
                encounter_url,
                {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": patient_url},
                },
            ),
            _post(patient_url, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]}),
            _post(
                _urn(),
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": patient_url},
                    "encounter": {"reference": encounter_url},
                },
            ),
        ],
    )
    response = http.post("", json=bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201", "201", "201"]
    patient_id = result["entry"][1]["response"]["location"].split("/")[-3]
    # The uuid of a urn:uuid fullUrl becomes the id when it is free.
    assert patient_id == patient_url.removeprefix("urn:uuid:")
    observation = http.get(
        "/" + result["entry"][2]["response"]["location"].split("/fhir/")[1].rsplit("/_history", 1)[0]
    )
    assert observation.json()["subject"]["reference"] == f"Patient/{patient_id}"
    found = http.get("/Observation", params={"subject": f"Patient/{patient_id}", "_total": "accurate"}).json()
    assert found["total"] == 1


def test_transaction_is_all_or_nothing(http: httpx.Client, uid: str) -> None:
    bundle = _bundle(
        "transaction",
        [
            _post(_urn(), {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]}),
            _post(_urn(), {"resourceType": "Patient", "birthDate": "not-a-date"}),
        ],
    )
    response = http.post("", json=bundle)
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[1]" in outcome["issue"][0]["diagnostics"]
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 0


def test_transaction_with_failing_put_rolls_back_posts(http: httpx.Client, uid: str) -> None:
    created = http.post("/Patient", json={"resourceType": "Patient"}).json()
    bundle = _bundle(
        "transaction",
        [
            _post(_urn(), {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]}),
            {
                "resource": {**created, "gender": "male"},
                "request": {"method": "PUT", "url": f"Patient/{created['id']}", "ifMatch": 'W/"7"'},
            },
        ],
    )
    assert http.post("", json=bundle).status_code == 412
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 0
    assert http.get(f"/Patient/{created['id']}").json()["meta"]["versionId"] == "1"


def test_conditional_references_and_if_none_exist(http: httpx.Client, uid: str) -> None:
    http.post("/Patient", json={"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]})
    bundle = _bundle(
        "transaction",
        [
            _post(
                _urn(),
                {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]},
                ifNoneExist=f"identifier={CCCD}|{uid}",
            ),
            _post(
                _urn(),
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": uid},
                    "subject": {"reference": f"Patient?identifier={CCCD}|{uid}"},
                },
            ),
        ],
    )
    result = http.post("", json=bundle).json()
    assert [e["response"]["status"] for e in result["entry"]] == ["200", "201"]
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 1
    patient_id = http.get("/Patient", params={"identifier": f"{CCCD}|{uid}"}).json()["entry"][0]["resource"][
        "id"
    ]
    assert _count(http, f"Observation?subject=Patient/{patient_id}") == 1


def test_unresolvable_conditional_reference_fails(http: httpx.Client, uid: str) -> None:
    bundle = _bundle(
        "transaction",
        [
            _post(
                _urn(),
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": uid},
                    "subject": {"reference": f"Patient?identifier={CCCD}|missing-{uid}"},
                },
            )
        ],
    )
    response = http.post("", json=bundle)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_processing_order_delete_post_put_get(http: httpx.Client, uid: str) -> None:
    doomed = http.post("/Patient", json={"resourceType": "Patient"}).json()
    kept = http.post("/Patient", json={"resourceType": "Patient"}).json()
    new_url = _urn()
    bundle = _bundle(
        "transaction",
        [
            {"request": {"method": "GET", "url": f"Patient/{kept['id']}"}},
            {
                "resource": {**kept, "link": [{"other": {"reference": new_url}, "type": "seealso"}]},
                "request": {"method": "PUT", "url": f"Patient/{kept['id']}"},
            },
            _post(new_url, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]}),
            {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}},
        ],
    )
    result = http.post("", json=bundle, headers={"Prefer": "return=representation"}).json()
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["200", "200", "201", "204"]
    # GET runs last, so it sees the PUT, whose reference points at the POSTed patient.
    read_back = result["entry"][0]["resource"]
    assert read_back["meta"]["versionId"] == "2"
    assert read_back["link"][0]["other"]["reference"] == f"Patient/{new_url.removeprefix('urn:uuid:')}"
    assert http.get(f"/Patient/{doomed['id']}").status_code == 410


def test_duplicate_target_in_transaction_is_400(http: httpx.Client) -> None:
    entry = {
        "resource": {"resourceType": "Patient", "id": "dup"},
        "request": {"method": "PUT", "url": "Patient/dup"},
    }
    assert http.post("", json=_bundle("transaction", [entry, entry])).status_code == 400


def test_batch_entries_succeed_or_fail_alone(http: httpx.Client, uid: str) -> None:
    bundle = _bundle(
        "batch",
        [
            _post(_urn(), {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}]}),
            _post(_urn(), {"resourceType": "Patient", "birthDate": "bad"}),
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        ],
    )
    result = http.post("", json=bundle).json()
    assert result["type"] == "batch-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201", "422", "404"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 1


def test_bundle_of_wrong_type_is_400(http: httpx.Client) -> None:
    assert http.post("", json={"resourceType": "Bundle", "type": "collection"}).status_code == 400
    assert http.post("", json={"resourceType": "Patient"}).status_code == 400
