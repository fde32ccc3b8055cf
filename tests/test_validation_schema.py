"""Validation against the R4 JSON schema (hub/validation.py, fhir/r4/fhir.schema.json.gz).

Each defect is sent to a real server and must come back as a 4xx OperationOutcome whose issue
names the element (FHIRPath-like ``expression``) with the right issue code, and nothing may be
stored. The transaction cases check that one bad entry refuses the whole Bundle and that the
answer names the entry. The official examples and Synthea are covered by test_fhir_examples.py
and test_import.py; the schema's provenance by fhir/r4/README.md.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from hub.validation import is_resource_type, resource_types, validate_resource

CCCD = "https://vnhub.example/cccd"


def _observation(uid: str, **changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": CCCD, "value": uid}],
        "status": "final",
        "code": {"text": "weight"},
        "valueQuantity": {"value": 60, "unit": "kg"},
        **changes,
    }


def _patient(uid: str, **changes: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uid}], **changes}


def _count(http: httpx.Client, query: str) -> int:
    answer = http.get(f"/{query}")
    assert answer.status_code == 200, answer.text
    return len(answer.json().get("entry", []))


def _issue_at(response: httpx.Response, expression: str, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    matching = [i for i in outcome["issue"] if expression in i.get("expression", [])]
    assert matching, f"no issue at {expression}: {outcome}"
    assert expression in matching[0]["diagnostics"], outcome
    return matching[0]


@pytest.mark.parametrize(
    ("resource", "expression", "code"),
    [
        (lambda uid: _patient(uid, gender="mail"), "Patient.gender", "value"),
        (lambda uid: _patient(uid, birthDate="1990-13-45"), "Patient.birthDate", "value"),
        (lambda uid: _patient(uid, birthDate="1990-02-30"), "Patient.birthDate", "value"),
        (lambda uid: _patient(uid, favouriteColour="red"), "Patient.favouriteColour", "structure"),
        (lambda uid: _patient(uid, name=[{"given": ["An", 7]}]), "Patient.name[0].given[1]", "value"),
        (lambda uid: _patient(uid, multipleBirthInteger=1.5), "Patient.multipleBirthInteger", "value"),
        (lambda uid: _observation(uid, status="not-a-status"), "Observation.status", "value"),
        (lambda uid: _observation(uid, valueString="heavy"), "Observation.valueString", "structure"),
        (
            lambda uid: _observation(uid, subject={"reference": "Patient 12"}),
            "Observation.subject.reference",
            "value",
        ),
        (
            lambda uid: _observation(uid, subject={"reference": "patient/12"}),
            "Observation.subject.reference",
            "value",
        ),
        (
            lambda uid: {k: v for k, v in _observation(uid).items() if k != "status"},
            "Observation.status",
            "required",
        ),
        (
            lambda uid: {
                "resourceType": "MedicationRequest",
                "identifier": [{"system": CCCD, "value": uid}],
                "status": "active",
                "intent": "order",
                "subject": {"reference": "Patient/x"},
            },
            "MedicationRequest.medication[x]",
            "required",
        ),
    ],
    ids=[
        "gender-mail",
        "birthDate-month-13",
        "birthDate-feb-30",
        "unknown-element",
        "given-not-a-string",
        "integer-with-fraction",
        "status-not-a-code",
        "two-value-x",
        "reference-with-space",
        "reference-lowercase-type",
        "status-missing",
        "medication-x-missing",
    ],
)
def test_invalid_resource_is_422_at_the_element(
    http: httpx.Client, uid: str, resource: Any, expression: str, code: str
) -> None:
    body = resource(uid)
    res_type = body["resourceType"]
    issue = _issue_at(http.post(f"/{res_type}", json=body), expression)
    assert issue["code"] == code, issue
    assert issue["severity"] == "error"
    assert _count(http, f"{res_type}?identifier={CCCD}|{uid}") == 0


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/abc-1",
        "Patient/abc-1/_history/2",
        "#contained-1",
        "https://hub.example.vn/fhir/Patient/abc",
        f"urn:uuid:{uuid.UUID(int=7)}",
        "urn:oid:1.2.840.113619",
    ],
)
def test_well_formed_references_are_accepted(http: httpx.Client, uid: str, reference: str) -> None:
    body = _observation(uid, subject={"reference": reference})
    if reference.startswith("#"):
        body["contained"] = [{"resourceType": "Patient", "id": "contained-1"}]
    answer = http.post("/Observation", json=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["subject"]["reference"] == reference


def test_valid_edge_cases_are_accepted(http: httpx.Client, uid: str) -> None:
    # A required primitive present only as its extension, a primitive array aligned with its
    # _extensions by null, and a Unicode space (NBSP) inside a string.
    absent = {
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
        ]
    }
    observation = {k: v for k, v in _observation(uid).items() if k != "status"}
    observation["_status"] = absent
    assert http.post("/Observation", json=observation).status_code == 201
    name = {"family": "Nguyễn\u00a0Thị", "given": ["Hoa", None], "_given": [None, absent]}
    answer = http.post("/Patient", json=_patient(uid, name=[name]))
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == [name]


def test_bad_code_in_a_transaction_refuses_it_whole(http: httpx.Client, uid: str) -> None:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": _patient(uid),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": _observation(uid, status="not-a-status", subject={"reference": patient_url}),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    answer = http.post("", json=bundle)
    assert 400 <= answer.status_code < 500, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    text = " ".join(i["diagnostics"] + " ".join(i.get("expression", [])) for i in outcome["issue"])
    assert "entry[1]" in text and "status" in text, outcome
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 0
    assert _count(http, f"Observation?identifier={CCCD}|{uid}") == 0


def test_bad_code_in_a_batch_fails_that_entry_alone(http: httpx.Client, uid: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": _patient(uid), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": _observation(uid, status="not-a-status"),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    answer = http.post("", json=bundle)
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201", "422"]
    outcome = entries[1]["response"]["outcome"]
    assert any("Observation.status" in i.get("expression", []) for i in outcome["issue"]), outcome
    assert _count(http, f"Patient?identifier={CCCD}|{uid}") == 1
    assert _count(http, f"Observation?identifier={CCCD}|{uid}") == 0


def test_resource_types_are_r4() -> None:
    types = resource_types()
    assert len(types) == 146
    assert is_resource_type("Patient") and is_resource_type("MedicinalProduct")
    for not_r4 in ("SubscriptionTopic", "Project", "User", "Resource", "DomainResource", "patient", ""):
        assert not is_resource_type(not_r4), not_r4


def test_the_hubs_own_output_is_valid(http: httpx.Client, uid: str) -> None:
    """What the hub writes and serves itself passes the same schema: a searchset Bundle, its
    AuditEvents, an OperationOutcome, a batch-response and the CapabilityStatement."""
    assert http.post("/Patient", json=_patient(uid, gender="female")).status_code == 201
    served = [
        http.get("/Patient", params={"identifier": f"{CCCD}|{uid}"}),
        http.get("/AuditEvent", params={"_count": "5"}),
        http.get("/Patient/does-not-exist"),
        http.get("/metadata"),
        http.post(
            "",
            json={
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"request": {"method": "GET", "url": f"Patient?identifier={CCCD}|{uid}"}}],
            },
        ),
    ]
    audit_events = served[1].json().get("entry", [])
    assert audit_events, served[1].text
    documents = [answer.json() for answer in served] + [e["resource"] for e in audit_events]
    for document in documents:
        validate_resource(orjson.dumps(document), document["resourceType"], document)
