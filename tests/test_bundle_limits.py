"""Bundle limits and batch processing (issue 8, defect 23 and "maximum Bundle entries").

- A transaction or batch over MAX_BUNDLE_ENTRIES is refused with 413 before any entry is
  looked at (even malformed entries) and nothing is stored.
- A batch runs in one database transaction with a SAVEPOINT per entry: each entry succeeds
  or fails on its own, also when one create in a run of creates fails (the bulk insert is
  abandoned and the entries are taken one by one, none twice).
- A batch is audited with grouped AuditEvents written in one chain append: a batch of 200
  creates for two patients writes two AuditEvents (one per patient, each naming only that
  patient's 100 resources), not 200 (the old per-entry audit); the chain still verifies.
- A clinician's batch uses the clinician's access for every entry.

Each test module runs its own server on a fresh database with a small entry limit.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import LiveServer, make_token

from hub.audit.verify import verify_chain
from hub.auth.principal import Role
from hub.db.schema import resource

LIMIT = 200
CCCD = "https://ehealth-hub.vn/sid/cccd"
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def server(fresh_database_url: Any) -> Iterator[LiveServer]:
    with LiveServer(fresh_database_url("bundle_limits"), max_bundle_entries=LIMIT) as live:
        yield live


@pytest.fixture()
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with server.admin_client() as client:
        yield client


def _bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _observation(patient: str, marker: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}], "text": marker},
        "subject": {"reference": f"Patient/{patient}"},
        "valueQuantity": {"value": 72, "unit": "/min"},
        **extra,
    }


def _post(resource: dict[str, Any]) -> dict[str, Any]:
    return {"request": {"method": "POST", "url": resource["resourceType"]}, "resource": resource}


def _patient(client: httpx.Client, org: str | None = None) -> str:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": CCCD, "value": uuid.uuid4().hex[:12]}],
    }
    if org:
        body["managingOrganization"] = {"reference": f"Organization/{org}"}
    response = client.post("/Patient", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _count_by_marker(client: httpx.Client, patient: str, marker: str) -> int:
    response = client.get(
        "/Observation", params={"subject": f"Patient/{patient}", "_count": 1000, "_elements": "code"}
    )
    assert response.status_code == 200, response.text
    return sum(1 for e in response.json().get("entry", []) if e["resource"]["code"].get("text") == marker)


def _audit_event_ids(server: LiveServer) -> set[str]:
    with server.engine.connect() as conn:
        return set(conn.scalars(sa.select(resource.c.res_id).where(resource.c.res_type == "AuditEvent")))


def _audit_events(server: LiveServer) -> int:
    with server.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(resource).where(resource.c.res_type == "AuditEvent")
            ).scalar_one()
        )


# --- maximum Bundle entries ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundle_over_the_entry_limit_is_refused_before_any_entry(
    server: LiveServer, admin: httpx.Client, kind: str
) -> None:
    patient = _patient(admin)
    marker = f"limit-{uuid.uuid4().hex[:8]}"
    entries = [_post(_observation(patient, marker)) for _ in range(LIMIT + 1)]
    before = _audit_events(server)
    response = admin.post("", json=_bundle(kind, entries))
    assert response.status_code == 413, response.text
    # The refused Bundle is audited once, as a failed request (a batch too).
    assert _audit_events(server) - before == 1
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["code"] == "too-costly"
    assert str(LIMIT) in issue["diagnostics"] and "MAX_BUNDLE_ENTRIES" in issue["diagnostics"]
    assert _count_by_marker(admin, patient, marker) == 0
    # Checked before the entries are read: malformed entries get the same 413, not a 400.
    malformed = admin.post("", json=_bundle(kind, [{"request": {}}] * (LIMIT + 1)))
    assert malformed.status_code == 413, malformed.text
    # At the limit: accepted.
    at_limit = admin.post("", json=_bundle(kind, entries[:LIMIT]))
    assert at_limit.status_code == 200, at_limit.text
    assert _count_by_marker(admin, patient, marker) == LIMIT


# --- batch: each entry on its own --------------------------------------------------------


def test_batch_entries_fail_alone_within_a_run_of_creates(admin: httpx.Client) -> None:
    patient = _patient(admin)
    marker = f"alone-{uuid.uuid4().hex[:8]}"
    bad = _observation(patient, marker, effectiveDateTime="not-a-date")
    entries = [
        _post(_observation(patient, marker)),
        _post(_observation(patient, marker)),
        _post(bad),  # fails validation: the bulk insert of this run is abandoned
        _post(_observation(patient, marker)),
        {"request": {"method": "GET", "url": f"Patient/{patient}"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {
            "request": {"method": "PUT", "url": f"Patient/{patient}", "ifMatch": 'W/"99"'},
            "resource": {"resourceType": "Patient", "id": patient, "gender": "female"},
        },
        _post(_observation(patient, marker)),
        {"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{patient}/$everything"}},
    ]
    response = admin.post("", json=_bundle("batch", entries))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"].split()[0] for e in result["entry"]]
    assert statuses == ["201", "201", "422", "201", "200", "404", "412", "201", "400", "200"]
    for failed in (2, 5, 6, 8):
        assert result["entry"][failed]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    created = {e["resource"]["id"] for i, e in enumerate(result["entry"]) if statuses[i] == "201"}
    assert len(created) == 4
    # Each create exactly once (the abandoned bulk insert left nothing behind).
    assert _count_by_marker(admin, patient, marker) == 4
    assert admin.get(f"/Patient/{patient}").json().get("gender") is None  # the 412 PUT changed nothing
    everything = result["entry"][9]["resource"]
    assert everything["resourceType"] == "Bundle"
    assert created <= {e["resource"]["id"] for e in everything.get("entry", [])}


def test_batch_is_audited_grouped_in_one_append(server: LiveServer, admin: httpx.Client) -> None:
    a, b = _patient(admin), _patient(admin)
    marker = f"audit-{uuid.uuid4().hex[:8]}"
    entries = [_post(_observation(a if i % 2 == 0 else b, marker)) for i in range(LIMIT)]
    before = _audit_events(server)
    earlier = _audit_event_ids(server)
    response = admin.post("", json=_bundle("batch", entries), headers={"Prefer": "return=minimal"})
    assert response.status_code == 200, response.text
    statuses = {e["response"]["status"].split()[0] for e in response.json()["entry"]}
    assert statuses == {"201"}
    created = {e["response"]["location"].split("/")[-3] for e in response.json()["entry"]}
    assert len(created) == LIMIT
    # Old code: one AuditEvent (and one chain append) per entry, 200. Now: one per patient,
    # each naming 100 resources (the most one grouped event names).
    # The batch's events are among the ones that were not there before (not the highest
    # pids: PostgreSQL's sequence gives each connection its own block of pids); they are the
    # ones naming what the batch created (the full suite's other servers share the trail).
    assert _audit_events(server) - before >= 2
    named: list[str] = []
    seen: set[str] = set()
    batch_events = 0
    for event_id in sorted(_audit_event_ids(server) - earlier):
        event = admin.get(f"/AuditEvent/{event_id}").json()
        refs = set(
            re.findall(
                r'"reference":"((?:Observation|Patient)/[^"]+)"', orjson.dumps(event["entity"]).decode()
            )
        )
        patients = {r.split("/")[1] for r in refs if r.startswith("Patient/")}
        observations = {r.split("/")[1] for r in refs if r.startswith("Observation/")}
        if not observations & created:
            continue
        batch_events += 1
        assert len(patients) == 1, refs  # each event names only its own patient
        assert len(observations) == LIMIT // 2
        assert event["outcome"] == "0" and event["subtype"][0]["code"] == "create"
        named.extend(patients)
        seen |= observations
    assert batch_events == 2
    assert sorted(named) == sorted([a, b])
    assert seen == created
    report = verify_chain(server.engine)
    assert report.ok, report.problems[:3]


def test_clinician_batch_uses_the_clinicians_access(server: LiveServer, admin: httpx.Client) -> None:
    org, other = f"org-{uuid.uuid4().hex[:8]}", f"org-{uuid.uuid4().hex[:8]}"
    for name in (org, other):
        assert admin.put(
            f"/Organization/{name}", json={"resourceType": "Organization", "id": name}
        ).is_success
    mine, theirs = _patient(admin, org), _patient(admin, other)
    token = make_token(server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-{org}", organizations=[org])
    marker = f"clin-{uuid.uuid4().hex[:8]}"
    entries = [
        _post(_observation(mine, marker)),
        _post(_observation(theirs, marker)),
        _post(_observation(mine, marker)),
        {"request": {"method": "GET", "url": f"Patient/{theirs}"}},
        {"request": {"method": "GET", "url": f"Patient/{mine}"}},
    ]
    with server.client(token) as clinician:
        response = clinician.post("", json=_bundle("batch", entries))
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"].split()[0] for e in response.json()["entry"]]
    assert statuses[0] == statuses[2] == "201" and statuses[4] == "200"
    assert statuses[1] in ("403", "404") and statuses[3] == "404"  # hidden is unknown
    assert _count_by_marker(admin, mine, marker) == 2
    assert _count_by_marker(admin, theirs, marker) == 0
