"""The OpenAPI document and the URL grammar it is generated from (issue 9).

The FastAPI routes are generated from ``hub.rest.target.FORMS`` and the registered
operations (``hub.app_factory.operations``): one route, hence one operationId, per method
and path. Checked on the live server's ``/openapi.json``, on building the app (FastAPI warns
"Duplicate Operation ID" otherwise), and by requests through the generated routes. The
parser's answers for each form are pinned too: the router, the gate, break-glass and the
audit all read them.
"""

from __future__ import annotations

import warnings
from collections import Counter

import httpx
import pytest
from conftest import LiveServer, auth_settings

from hub.api.app import create_app
from hub.app_factory import operations
from hub.rest.target import parse, routes


def _openapi(live_server: LiveServer) -> dict[str, object]:
    response = httpx.get(f"http://127.0.0.1:{live_server.port}/openapi.json", timeout=30)
    assert response.status_code == 200
    document = response.json()
    assert isinstance(document, dict)
    return document


def test_every_operation_id_is_unique(live_server: LiveServer) -> None:
    paths = _openapi(live_server)["paths"]
    assert isinstance(paths, dict)
    ids = [(path, method, op.get("operationId")) for path, ops in paths.items() for method, op in ops.items()]
    assert all(operation_id for _, _, operation_id in ids), [i for i in ids if not i[2]]
    repeated = {k: n for k, n in Counter(i for _, _, i in ids).items() if n > 1}
    assert repeated == {}, repeated
    # Every interaction of the grammar and every registered operation is served, under its id.
    served = {(path, method.upper()): operation_id for path, method, operation_id in ids}
    expected = [*routes(), *(r for op in operations() for r in op.routes())]
    for route in expected:
        assert served.get((f"/fhir{route.template}", route.method)) == route.operation_id, route
    assert served[("/fhir/{resource_type}/{resource_id}/_history/{version_id}", "GET")] == "vread"
    assert served[("/fhir/Patient/{resource_id}/$everything", "GET")] == "everything_instance_Patient_get"
    assert served[("/fhir/$export-status/{job_id}", "DELETE")] == "export_status_system_delete"


def test_building_the_app_raises_no_duplicate_operation_id_warning(database_url: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = create_app(auth_settings(database_url))
        document = app.openapi()
    duplicates = [str(w.message) for w in caught if "Duplicate Operation ID" in str(w.message)]
    assert duplicates == []
    assert "/fhir/{resource_type}/{resource_id}" in document["paths"]


def test_generated_routes_answer_through_the_router(live_server: LiveServer, uid: str) -> None:
    with live_server.admin_client() as client:
        created = client.post("/Patient", json={"resourceType": "Patient", "identifier": [{"value": uid}]})
        assert created.status_code == 201
        pid = created.json()["id"]
        assert client.get(f"/Patient/{pid}").json()["id"] == pid
        assert client.get(f"/Patient/{pid}/_history/1").json()["meta"]["versionId"] == "1"
        searched = client.post(
            "/Patient/_search",
            content=f"identifier={uid}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert [e["resource"]["id"] for e in searched.json().get("entry", [])] == [pid]
        everything = client.get(f"/Patient/{pid}/$everything")
        assert everything.status_code == 200
        assert pid in {e["resource"]["id"] for e in everything.json()["entry"]}
        # Not in the grammar, or not served: the router's OperationOutcome, not the framework's.
        for method, path, status in [
            ("PATCH", f"/Patient/{pid}", 405),
            ("GET", f"/Patient/{pid}/_history/1/x", 404),
            ("GET", "/Patient/$no-such-operation", 404),
            ("PUT", "/Patient/$everything", 405),
            ("GET", "/$export-status/no-such-job", 404),
            ("GET", "/Nope/1", 404),
        ]:
            answer = client.request(method, path, json={"resourceType": "Parameters"})
            assert answer.status_code == status, (method, path, answer.text)
            assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "", ("system", "transaction", None, None, None, None, ())),
        ("GET", "metadata", ("system", "capabilities", None, None, None, None, ())),
        ("GET", "_history", ("system", "history-system", None, None, None, None, ())),
        ("GET", "Patient", ("type", "search-type", "Patient", None, None, None, ())),
        ("POST", "Patient", ("type", "create", "Patient", None, None, None, ())),
        ("PUT", "Patient", ("type", "update", "Patient", None, None, None, ())),
        ("POST", "Patient/_search", ("type", "search-type", "Patient", None, None, None, ())),
        ("GET", "Patient/_history", ("type", "history-type", "Patient", None, None, None, ())),
        ("GET", "Patient/$everything", ("type", "operation", "Patient", None, None, "everything", ())),
        ("HEAD", "Patient/1", ("instance", "read", "Patient", "1", None, None, ())),
        ("DELETE", "Patient/1", ("instance", "delete", "Patient", "1", None, None, ())),
        ("PATCH", "Patient/1", ("instance", "patch", "Patient", "1", None, None, ())),
        ("GET", "Patient/1/_history", ("instance", "history-instance", "Patient", "1", None, None, ())),
        ("GET", "/Patient/1/_history/2/", ("instance", "vread", "Patient", "1", "2", None, ())),
        ("GET", "Group/g/$export", ("instance", "operation", "Group", "g", None, "export", ())),
        ("DELETE", "$export-status/j1", ("system", "operation", None, None, None, "export-status", ("j1",))),
    ],
)
def test_the_grammar_parses_each_form(method: str, path: str, expected: tuple[object, ...]) -> None:
    target = parse(method, path)
    assert target.form is not None
    got = (
        target.level,
        target.interaction,
        target.resource_type,
        target.resource_id,
        target.version,
        target.operation,
        target.arguments,
    )
    assert got == expected


def test_the_grammar_names_bundles_compartments_and_unknown_paths() -> None:
    assert parse("POST", "", "batch").interaction == "batch"
    assert parse("POST", "").bundle and not parse("GET", "").bundle
    assert parse("GET", "Patient/p1/$everything").compartment == "p1"
    assert parse("GET", "Observation/o1").compartment is None
    unknown = parse("GET", "Patient/p1/_history/1/x")
    assert unknown.form is None and not unknown.served
    assert (unknown.resource_type, unknown.resource_id) == ("Patient", "p1")  # still audited
    assert parse("GET", "_search").form is None
