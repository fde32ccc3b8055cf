"""Fail closed, structurally (issue 8): no store or search path reads or writes without an
Access; unrestricted work is an explicit, named, audited system access; an $export job
decides its requester's Access again from what the job row stores; and on write paths a
resource the caller cannot see answers exactly as one that does not exist (defect 11),
for a clinician, a patient and a proxy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import ADMIN_AUTH, REPO, LiveServer, make_token

from consent.context import system_access
from hub.auth.principal import Role
from hub.db.schema import export_job
from hub.errors import FhirError
from hub.ops import export as export_ops
from hub.rest import FhirRouter
from hub.search import engine as search_engine
from hub.store import reader
from hub.store.records import now

CCCD = "https://ehealth-hub.vn/fhir/NamingSystem/cccd"
TAG = "urn:test:fail-closed"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


# --- no Access, no data ---------------------------------------------------------------------


def _fails_closed(call: Callable[[], object]) -> None:
    with pytest.raises(FhirError) as refused:
        call()
    assert refused.value.status == 500 and "fail closed" in str(refused.value)


def test_store_and_search_without_an_access_raise(router: FhirRouter, uid: str) -> None:
    store, registry = router.ctx.store, router.ctx.registry
    body = {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": f"fc{uid}"}]}
    with store.write() as conn:
        _fails_closed(lambda: store.create(conn, dict(body)))
    with store.read() as conn:
        query = search_engine.parse(registry, "Patient", [("identifier", f"{CCCD}|fc{uid}")], base_url="")
        _fails_closed(lambda: search_engine.execute(conn, registry, query))
        _fails_closed(lambda: search_engine.find_ids(conn, registry, "Patient", [("_id", "x")], ""))
        _fails_closed(lambda: store.get(conn, "Patient", "anything"))
        _fails_closed(lambda: store.history(conn, res_type="Patient"))
        _fails_closed(lambda: reader.resolve_bare_ids(conn, ["anything"]))
    # The same calls inside an explicit, named system access work, unfiltered.
    with system_access("test-fail-closed") as access:
        assert access.principal.subject == "system:test-fail-closed" and access.unrestricted
        with store.write() as conn:
            created = store.create(conn, dict(body))
        with store.read() as conn:
            assert [m.res_id for m in search_engine.execute(conn, registry, query).matches] == [
                created.res_id
            ]
        with store.write() as conn:
            store.delete(conn, "Patient", created.res_id)
    with store.write() as conn:
        _fails_closed(lambda: store.update(conn, "Patient", created.res_id, {**body, "id": created.res_id}))
        _fails_closed(lambda: store.delete(conn, "Patient", created.res_id))


def test_cli_import_runs_as_a_named_system_access_and_is_audited(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("fc-cli")
    value = uuid.uuid4().hex[:10]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": value}]},
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    path = tmp_path / "one.json"
    path.write_bytes(orjson.dumps(bundle))
    hub = str(Path(sys.executable).parent / "hub")
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run([hub, "import", str(path)], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    with LiveServer(url) as server, server.client(None) as client:
        client.headers.update(ADMIN_AUTH)
        events = client.get("/AuditEvent", params={"_count": "200"}).json().get("entry", [])
        assert (
            client.get("/Patient", params={"identifier": f"{CCCD}|{value}", "_total": "accurate"}).json()[
                "total"
            ]
            == 1
        )
    commands = [
        e["resource"]
        for e in events
        if any(c.get("code") == "hub-import" for c in e["resource"].get("subtype", []))
    ]
    assert len(commands) == 1, [e["resource"].get("subtype") for e in events]
    (event,) = commands
    assert "system:cli-import" in {a.get("name") for a in event["agent"]}, event["agent"]
    assert event["outcome"] == "0"


# --- $export: the job decides its requester's access again ------------------------------------


def _post(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post(f"/{body['resourceType']}", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _observation(patient: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": TAG, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _wait(client: httpx.Client, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.get(status_url)
        if status.status_code != 202:
            assert status.status_code == 200, status.text
            return dict(status.json())
        time.sleep(0.05)
    raise AssertionError("the export did not finish within 30 s")


def test_export_job_rebuilds_the_requesters_access_from_the_job_row(
    http: httpx.Client,
    live_server: LiveServer,
    client_for: Callable[[str | None], httpx.Client],
    router: FhirRouter,
    tmp_path: Path,
    uid: str,
) -> None:
    mine, other = (_post(http, {"resourceType": "Patient", "name": [{"family": f"X{uid}{k}"}]}) for k in "ab")
    own_obs = _post(http, _observation(mine, f"own-{uid}"))
    other_obs = _post(http, _observation(other, f"other-{uid}"))
    token = make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{mine}")
    client = client_for(token)
    kicked = client.get("/Patient/$export", params={"_type": "Observation"}, headers=ASYNC)
    assert kicked.status_code == 202, kicked.text
    job_id = kicked.headers["Content-Location"].rsplit("/", 1)[1]
    manifest = _wait(client, kicked.headers["Content-Location"])
    exported = {
        orjson.loads(line)["id"]
        for output in manifest["output"]
        for line in client.get(output["url"]).content.splitlines()
    }
    assert own_obs in exported and other_obs not in exported

    # The job row names its requester: another process can run a copy of it later.
    with router.ctx.store.read() as conn:
        parameters = dict(
            conn.execute(sa.select(export_job.c.parameters).where(export_job.c.id == job_id)).scalar_one()
        )
    requester = parameters["requester"]
    assert requester["role"] == "patient" and requester["fhir_user"] == f"Patient/{mine}"
    assert requester["purpose"] and requester["scopes"]

    def copy_of_job(label: str) -> str:
        new_id = uuid.uuid4().hex
        spec = {**parameters, "directory": str(tmp_path / label), "types": ["Observation"]}
        with router.ctx.store.write() as conn:
            conn.execute(
                export_job.insert().values(
                    id=new_id,
                    status="accepted",
                    request_url="copy",
                    parameters=spec,
                    created=now(),
                )
            )
        return new_id

    # No Access in this thread: the job decides the patient's Access from the stored requester.
    rerun = copy_of_job("rerun")
    export_ops._run_as_requester(router.ctx, rerun)
    ids = {
        orjson.loads(line)["id"]
        for line in (tmp_path / "rerun" / "Observation.ndjson").read_bytes().splitlines()
    }
    assert own_obs in ids and other_obs not in ids

    # Run without any Access (nor a requester), a job fails closed: it exports nothing.
    bare = copy_of_job("bare")
    export_ops.run_job(router.ctx, bare)
    orphan = copy_of_job("orphan")
    with router.ctx.store.write() as conn:
        conn.execute(
            export_job.update()
            .where(export_job.c.id == orphan)
            .values(parameters={k: v for k, v in parameters.items() if k != "requester"})
        )
    export_ops._run_as_requester(router.ctx, orphan)
    with router.ctx.store.read() as conn:
        states = dict(
            conn.execute(
                sa.select(export_job.c.id, export_job.c.status).where(export_job.c.id.in_([bare, orphan]))
            ).all()
        )
    assert states == {bare: "failed", orphan: "failed"}
    assert not (tmp_path / "bare" / "Observation.ndjson").exists()
    assert not (tmp_path / "orphan" / "Observation.ndjson").exists()


# --- hidden is unknown on every write path (defect 11) ----------------------------------------


def _answer(response: httpx.Response, *ids: str) -> tuple[int, str]:
    """Status and OperationOutcome text, with the ids that differ between the two cases masked."""
    text = response.text
    for value in ids:
        text = text.replace(value, "<id>")
    text = re.sub(r'"id":"[^"]*"', '"id":"<x>"', text)
    return response.status_code, text


def _roles(http: httpx.Client, live_server: LiveServer, uid: str) -> dict[str, tuple[str, str, str]]:
    """role -> (token, a type it writes, a patient whose record it may write into)."""
    org = f"org-fc-{uid}"
    assert http.put(f"/Organization/{org}", json={"resourceType": "Organization", "id": org}).status_code in (
        200,
        201,
    )
    treated = _post(
        http, {"resourceType": "Patient", "managingOrganization": {"reference": f"Organization/{org}"}}
    )
    me = _post(http, {"resourceType": "Patient", "name": [{"family": f"Me{uid}"}]})
    ward = _post(http, {"resourceType": "Patient", "name": [{"family": f"Ward{uid}"}]})
    related = _post(
        http, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{ward}"}}
    )
    return {
        "clinician": (
            make_token(
                live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/dr-{uid}", organizations=[org]
            ),
            "Observation",
            treated,
        ),
        "patient": (make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/{me}"), "Appointment", me),
        "proxy": (
            make_token(live_server, role=Role.PROXY, fhir_user=f"RelatedPerson/{related}"),
            "Appointment",
            ward,
        ),
    }


def _body(res_type: str, patient: str, marker: str) -> dict[str, Any]:
    if res_type == "Observation":
        body = _observation(patient, marker)
        body["identifier"] = [{"system": TAG, "value": marker}]
        return body
    return {
        "resourceType": "Appointment",
        "status": "proposed",
        "identifier": [{"system": TAG, "value": marker}],
        "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}],
    }


@pytest.mark.parametrize("role", ["clinician", "patient", "proxy"])
def test_writes_answer_hidden_exactly_as_unknown(
    role: str,
    http: httpx.Client,
    live_server: LiveServer,
    client_for: Callable[[str | None], httpx.Client],
    uid: str,
) -> None:
    token, res_type, own = _roles(http, live_server, uid)[role]
    client = client_for(token)
    stranger = _post(http, {"resourceType": "Patient", "name": [{"family": f"Stranger{uid}"}]})
    hidden_marker = f"hidden-{uid}"
    hidden = _post(http, _body(res_type, stranger, hidden_marker))
    assert client.get(f"/{res_type}/{hidden}").status_code == 404  # a read: hidden is unknown
    # The caller can write into its own patient's record (so the answers below are about the
    # target, not a blanket refusal).
    mine = client.post(f"/{res_type}", json=_body(res_type, own, f"mine-{uid}"))
    assert mine.status_code == 201, mine.text

    def both(make: Callable[[str, str], httpx.Response]) -> tuple[tuple[int, str], tuple[int, str]]:
        unknown = str(uuid.uuid4())
        return _answer(make(hidden, hidden_marker), hidden, hidden_marker), _answer(
            make(unknown, f"unknown-{uid}"), unknown, f"unknown-{uid}"
        )

    def put(res_id: str, marker: str, **headers: str) -> httpx.Response:
        return client.put(
            f"/{res_type}/{res_id}", json={**_body(res_type, own, "x"), "id": res_id}, headers=headers
        )

    # PUT with If-Match, plain PUT, DELETE.
    hidden_answer, unknown_answer = both(lambda i, m: put(i, m, **{"If-Match": 'W/"1"'}))
    assert hidden_answer == unknown_answer and hidden_answer[0] == 404
    hidden_answer, unknown_answer = both(lambda i, m: put(i, m))
    assert hidden_answer == unknown_answer and hidden_answer[0] == 404
    hidden_answer, unknown_answer = both(lambda i, m: client.delete(f"/{res_type}/{i}"))
    assert hidden_answer == unknown_answer and hidden_answer[0] == 404

    # A conditional PUT that matches nothing, with the id in its body.
    def conditional_put(res_id: str, marker: str) -> httpx.Response:
        return client.put(
            f"/{res_type}",
            params={"identifier": f"{TAG}|nothing-{uid}"},
            json={**_body(res_type, own, "y"), "id": res_id},
        )

    hidden_answer, unknown_answer = both(conditional_put)
    assert hidden_answer == unknown_answer and hidden_answer[0] == 404

    # A conditional delete whose criteria match only the hidden resource: no match.
    hidden_answer, unknown_answer = both(
        lambda i, m: client.delete(f"/{res_type}", params={"identifier": f"{TAG}|{m}"})
    )
    assert hidden_answer == unknown_answer and hidden_answer[0] == 204

    # A transaction referring to urn:uuid:<id>.
    def transaction(res_id: str, marker: str) -> httpx.Response:
        body = _body(res_type, own, "z")
        if res_type == "Observation":
            body["derivedFrom"] = [{"reference": f"urn:uuid:{res_id}"}]
        else:
            body["supportingInformation"] = [{"reference": f"urn:uuid:{res_id}"}]
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": body, "request": {"method": "POST", "url": res_type}}],
        }
        return client.post("", json=bundle)

    hidden_answer, unknown_answer = both(transaction)
    assert hidden_answer == unknown_answer and hidden_answer[0] == 400

    # A transaction's conditional PUT with the id in its body, and a PUT of the id itself.
    def transaction_put(res_id: str, marker: str) -> httpx.Response:
        entry = {
            "resource": {**_body(res_type, own, "w"), "id": res_id},
            "request": {"method": "PUT", "url": f"{res_type}?identifier={TAG}|nothing-{uid}"},
        }
        return client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry]})

    hidden_answer, unknown_answer = both(transaction_put)
    assert hidden_answer == unknown_answer and hidden_answer[0] == 404

    # A conditional create whose criteria match only the hidden resource creates, as for an
    # unknown one (the caller's own resource; the hidden one is untouched).
    def conditional_create(res_id: str, marker: str) -> httpx.Response:
        return client.post(
            f"/{res_type}",
            json=_body(res_type, own, marker),
            headers={"If-None-Exist": f"identifier={TAG}|{marker}", "Prefer": "return=minimal"},
        )

    hidden_answer, unknown_answer = both(conditional_create)
    assert hidden_answer == unknown_answer and hidden_answer[0] == 201
    assert http.get(f"/{res_type}/{hidden}").json()["identifier"][0]["value"] == hidden_marker
    assert http.get(f"/{res_type}/{hidden}").json()["meta"]["versionId"] == "1"  # never changed
