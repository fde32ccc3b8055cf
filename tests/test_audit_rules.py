"""The audit trail's rules of issue 8 (defects 12, 13, 14), over HTTP against a live server.

- 14: a write and its AuditEvent commit together: when the audit cannot be written, the
  write answers 500 and nothing is stored (create, update, delete, transaction).
- 13: identifiers are masked in every search form the trail records (chains, reverse
  chains, modifiers, ``POST _search`` forms), and AuditEvents are stored encrypted.
- 12: AuditEvents naming no patient, or another patient, are for auditors and admins; a
  patient reads their own access log without the IP addresses and token ids of the
  clinicians who accessed it.

One server on a database of its own: the tests rename ``audit_chain`` to make audit
writes fail, which must not disturb other modules.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import LiveServer, backend, make_token

from hub.auth.principal import Role
from hub.crypto import keys
from hub.crypto.envelope import is_sealed, open_content
from hub.db.schema import audit_chain, resource

CCCD = "https://ehealth-hub.vn/sid/cccd"


@pytest.fixture(scope="module")
def server(fresh_database_url) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    with LiveServer(fresh_database_url("audit_rules")) as live:
        yield live


@pytest.fixture()
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.admin_client() as client:
        yield client


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _seq(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(audit_chain.c.seq), 0))).scalar_one())


def _events_since(engine: sa.Engine, seq: int) -> list[tuple[bytes, dict[str, Any]]]:
    """(stored bytes, opened AuditEvent) of the events after ``seq``, oldest first."""
    query = (
        sa.select(resource.c.res_id, resource.c.content)
        .join(audit_chain, audit_chain.c.res_id == resource.c.res_id)
        .where(resource.c.res_type == "AuditEvent", audit_chain.c.seq > seq)
        .order_by(audit_chain.c.seq)
    )
    with keys.bound(engine), engine.connect() as conn:
        out = []
        for res_id, content in conn.execute(query):
            raw = content.encode() if isinstance(content, str) else bytes(content)
            out.append((raw, orjson.loads(open_content(raw, "AuditEvent", res_id))))
        return out


def _outcome(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(issue.get("diagnostics", "") for issue in body["issue"])


# --- 14: no write without its audit record --------------------------------------------------


@contextmanager
def audit_unwritable(engine: sa.Engine) -> Iterator[None]:
    """The audit chain table is gone for the duration: every audit write fails."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE audit_chain RENAME TO audit_chain_away"))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE audit_chain_away RENAME TO audit_chain"))


def test_a_write_that_cannot_be_audited_is_not_stored(server: LiveServer, admin: httpx.Client) -> None:
    kept, fresh, created_mark, bundle_id = f"kept-{_uid()}", f"fresh-{_uid()}", _uid(), f"tx-{_uid()}"
    patient = {"resourceType": "Patient", "id": kept, "gender": "female"}
    assert admin.put(f"Patient/{kept}", json=patient).status_code == 201
    before = _seq(server.engine)
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:" + str(uuid.uuid4()),
                "resource": {"resourceType": "Patient", "id": bundle_id, "gender": "male"},
                "request": {"method": "PUT", "url": f"Patient/{bundle_id}"},
            }
        ],
    }
    marked = {"resourceType": "Patient", "name": [{"family": created_mark}]}
    attempts: list[tuple[str, httpx.Response]] = []
    with audit_unwritable(server.engine):
        attempts.append(("create", admin.post("Patient", json=marked)))
        attempts.append(("update-as-create", admin.put(f"Patient/{fresh}", json={**patient, "id": fresh})))
        attempts.append(("update", admin.put(f"Patient/{kept}", json={**patient, "gender": "male"})))
        attempts.append(("delete", admin.delete(f"Patient/{kept}")))
        attempts.append(("transaction", admin.post("", json=transaction)))
    for what, response in attempts:
        assert response.status_code == 500, (what, response.text)
        assert "could not be audited" in _outcome(response), what
    # Nothing of it was stored: read as admin (the audit works again).
    assert admin.get(f"Patient/{fresh}").status_code == 404
    assert admin.get(f"Patient/{bundle_id}").status_code == 404
    current = admin.get(f"Patient/{kept}")
    assert current.status_code == 200
    assert current.json()["meta"]["versionId"] == "1" and current.json()["gender"] == "female"
    found = admin.get("Patient", params={"family": created_mark, "_total": "accurate"})
    assert found.status_code == 200 and found.json()["total"] == 0
    # ...and the chain holds no AuditEvent of the refused writes.
    subtypes = [event["subtype"][0]["code"] for _, event in _events_since(server.engine, before)]
    assert not {"create", "update", "delete", "transaction"} & set(subtypes), subtypes


def test_a_write_and_its_audit_record_commit_together(server: LiveServer, admin: httpx.Client) -> None:
    before = _seq(server.engine)
    created = admin.post("Patient", json={"resourceType": "Patient", "gender": "other"})
    assert created.status_code == 201
    res_id = created.json()["id"]
    (raw, event), *rest = _events_since(server.engine, before)
    assert not rest
    assert event["subtype"][0]["code"] == "create" and event["outcome"] == "0"
    assert {"reference": f"Patient/{res_id}"} in [e.get("what") for e in event["entity"]]
    assert is_sealed(raw)


# --- 13: identifiers masked everywhere, AuditEvents encrypted --------------------------------


def test_identifier_searches_are_masked_in_every_form(server: LiveServer, admin: httpx.Client) -> None:
    number = str(uuid.uuid4().int)[:12]
    phone = "09" + str(uuid.uuid4().int)[:8]
    created = admin.post(
        "Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": CCCD, "value": number}],
            "telecom": [{"system": "phone", "value": phone}],
        },
    )
    assert created.status_code == 201
    before = _seq(server.engine)
    token = f"{CCCD}|{number}"
    searches: list[tuple[str, dict[str, str]]] = [
        ("Observation", {"subject:Patient.identifier": token}),
        ("Observation", {"patient.identifier": token}),
        ("Observation", {"subject:identifier": token}),
        ("Patient", {"_has:Observation:patient:identifier": token}),
        ("Patient", {"identifier:of-type": f"http://terminology.hl7.org/CodeSystem/v2-0203|NI|{number}"}),
        ("Patient", {"identifier:text": number}),
        ("Patient", {"identifier": f"{token},{CCCD}|1{number}"}),
        ("Patient", {"phone": phone}),
        ("Encounter", {"patient:Patient.telecom": phone}),
        ("Patient", {"_content": number}),
    ]
    for path, params in searches:
        admin.get(path, params=params)  # found or refused (400): audited either way
    posted = admin.post(
        "Patient/_search",
        content=f"identifier={CCCD}%7C{number}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 200 and posted.json()["type"] == "searchset"
    events = _events_since(server.engine, before)
    assert len(events) == len(searches) + 1
    queries = []
    for raw, event in events:
        assert is_sealed(raw) and number.encode() not in raw and phone.encode() not in raw
        text = orjson.dumps(event).decode()
        assert number not in text and phone not in text, text
        (query,) = [base64.b64decode(e["query"]).decode() for e in event["entity"] if "query" in e]
        queries.append(query)
    # What was asked stays readable, the number does not.
    assert (
        queries[0]
        == f"Observation?subject%3APatient.identifier={CCCD.replace(':', '%3A').replace('/', '%2F')}%7C%2A%2A%2A"
    )
    assert queries[-1] == queries[6].split("%2C")[0]  # the POST _search form, as the GET
    assert queries[5] == "Patient?identifier%3Atext=%2A%2A%2A"
    # Nothing stored holds the number in clear: the Patient and the trail are sealed.
    with server.engine.connect() as conn:
        clear = conn.execute(
            sa.select(sa.func.count())
            .select_from(resource)
            .where(sa.cast(resource.c.content, sa.Text).contains(number))
        ).scalar_one()
    assert clear == 0


# --- 12: who reads which AuditEvents -----------------------------------------------------------


def test_audit_events_naming_no_or_another_patient_are_for_auditors(
    server: LiveServer, admin: httpx.Client
) -> None:
    uid = _uid()
    mine, theirs, org = f"a-{uid}", f"b-{uid}", f"org-{uid}"
    for pid in (mine, theirs):
        body = {
            "resourceType": "Patient",
            "id": pid,
            "managingOrganization": {"reference": f"Organization/{org}"},
        }
        assert admin.put(f"Patient/{pid}", json=body).status_code == 201
    related = {
        "resourceType": "RelatedPerson",
        "id": f"rp-{uid}",
        "active": True,
        "patient": {"reference": f"Patient/{mine}"},
    }
    assert admin.put(f"RelatedPerson/{related['id']}", json=related).status_code == 201

    before = _seq(server.engine)
    assert admin.get("Organization", params={"name": f"nobody-{uid}"}).status_code == 200  # names no patient
    assert admin.get(f"Patient/{theirs}").status_code == 200  # names the other patient
    assert admin.get(f"Patient/{mine}").status_code == 200  # names mine
    (no_patient, _), (other_patient, _), (own, _) = [
        (event["id"], event) for _, event in _events_since(server.engine, before)
    ]

    clinician = make_token(
        server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-{uid}", organizations=[org]
    )
    patient = make_token(server, role=Role.PATIENT, fhir_user=f"Patient/{mine}")
    proxy = make_token(server, role=Role.PROXY, fhir_user=f"RelatedPerson/{related['id']}")
    auditor = make_token(server, role=Role.AUDITOR)
    with server.client(clinician) as c:  # the clinician does see the patient's data
        assert c.get(f"Patient/{theirs}").status_code == 200
    for name, token in (("clinician", clinician), ("patient", patient), ("proxy", proxy)):
        with server.client(token) as client:
            for event_id in (no_patient, other_patient):
                read = client.get(f"AuditEvent/{event_id}")
                assert read.status_code in (403, 404), (name, event_id, read.text)
                found = client.get("AuditEvent", params={"_id": event_id})
                assert found.status_code == 403 or not found.json().get("entry"), (name, found.text)
            listed = client.get("AuditEvent", params={"_count": "1000"})
            if listed.status_code == 200:
                ids = {e["resource"]["id"] for e in listed.json().get("entry", [])}
                assert not ids & {no_patient, other_patient}, name
    with server.client(auditor) as client:
        for event_id in (no_patient, other_patient, own):
            assert client.get(f"AuditEvent/{event_id}").status_code == 200

    # The patient's own access log: who accessed, not the session's address and token id.
    with server.client(patient) as client:
        log = client.get("AuditEvent", params={"patient": "me", "_count": "1000"})
        assert log.status_code == 200
        entries = {e["resource"]["id"]: e["resource"] for e in log.json().get("entry", [])}
        assert own in entries and other_patient not in entries and no_patient not in entries
        seen = entries[own]
        read = client.get(f"AuditEvent/{own}").json()
    with server.client(auditor) as client:
        full = client.get(f"AuditEvent/{own}").json()
    requestor = next(a for a in full["agent"] if a["requestor"])
    assert requestor.get("policy") and requestor["network"]["type"] == "2"  # kept for auditors
    for shown in (seen, read):
        user = next(a for a in shown["agent"] if a["requestor"])
        assert user["who"] == requestor["who"] and user["name"] == requestor["name"]
        assert "policy" not in user and "network" not in user
        assert all(a.get("network", {}).get("type") not in ("1", "2") for a in shown["agent"])


def test_backend(server: LiveServer) -> None:
    assert backend() in ("sqlite", "postgresql")
