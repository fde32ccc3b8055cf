"""Race-free conditional operations (issue 8, defect 8): concurrent conditional creates and
conditional updates of one citizen make exactly one resource, over HTTP against the live
server, on PostgreSQL (transaction-scoped advisory lock per condition) and on SQLite (one
writer at a time). FHIR: the first creates (201); the others find it (200).
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable

import httpx
from conftest import ADMIN_AUTH, LiveServer

CCCD = "https://ehealth-hub.vn/fhir/NamingSystem/cccd"
THREADS = 20


def _race(live_server: LiveServer, send: Callable[[httpx.Client], httpx.Response]) -> list[httpx.Response]:
    """``send`` from THREADS clients at once (each its own connection)."""
    clients = [live_server.client(None) for _ in range(THREADS)]
    for client in clients:
        client.headers.update(ADMIN_AUTH)
    barrier = threading.Barrier(THREADS)
    responses: list[httpx.Response | BaseException] = [RuntimeError("not run")] * THREADS

    def run(index: int) -> None:
        barrier.wait()
        try:
            responses[index] = send(clients[index])
        except BaseException as exc:  # noqa: BLE001  (reported below)
            responses[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for client in clients:
        client.close()
    failures = [r for r in responses if not isinstance(r, httpx.Response)]
    assert not failures, failures
    return [r for r in responses if isinstance(r, httpx.Response)]


def _patients(http: httpx.Client, value: str) -> list[str]:
    bundle = http.get("/Patient", params={"identifier": f"{CCCD}|{value}", "_count": "100"}).json()
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def _patient(value: str, family: str) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": CCCD, "value": value}],
        "name": [{"family": family}],
    }


def test_concurrent_if_none_exist_creates_make_one_patient(
    http: httpx.Client, live_server: LiveServer
) -> None:
    value = uuid.uuid4().hex[:12]
    responses = _race(
        live_server,
        lambda c: c.post(
            "/Patient", json=_patient(value, "Trần"), headers={"If-None-Exist": f"identifier={CCCD}|{value}"}
        ),
    )
    assert Counter(r.status_code for r in responses) == {201: 1, 200: THREADS - 1}, [
        r.text for r in responses
    ]
    (only,) = _patients(http, value)
    assert {r.json()["id"] for r in responses} == {only}


def test_concurrent_conditional_updates_make_one_patient(http: httpx.Client, live_server: LiveServer) -> None:
    value = uuid.uuid4().hex[:12]
    responses = _race(
        live_server,
        lambda c: c.put("/Patient", params={"identifier": f"{CCCD}|{value}"}, json=_patient(value, "Lê")),
    )
    assert Counter(r.status_code for r in responses) == {201: 1, 200: THREADS - 1}, [
        r.text for r in responses
    ]
    (only,) = _patients(http, value)
    assert {r.json()["id"] for r in responses} == {only}


def test_concurrent_transactions_with_if_none_exist_make_one_patient(
    http: httpx.Client, live_server: LiveServer
) -> None:
    value = uuid.uuid4().hex[:12]

    def send(client: httpx.Client) -> httpx.Response:
        patient_url = f"urn:uuid:{uuid.uuid4()}"
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": patient_url,
                    "resource": _patient(value, "Phạm"),
                    "request": {
                        "method": "POST",
                        "url": "Patient",
                        "ifNoneExist": f"identifier={CCCD}|{value}",
                    },
                },
                {
                    "resource": {
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"text": "race"},
                        "subject": {"reference": patient_url},
                    },
                    "request": {"method": "POST", "url": "Observation"},
                },
            ],
        }
        return client.post("", json=bundle)

    responses = _race(live_server, send)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    statuses = Counter(r.json()["entry"][0]["response"]["status"].split()[0] for r in responses)
    assert statuses == {"201": 1, "200": THREADS - 1} or statuses == {"201": 1}, statuses
    (only,) = _patients(http, value)
    subjects = {
        e["resource"]["subject"]["reference"]
        for e in http.get("/Observation", params={"subject": f"Patient/{only}", "_count": "100"}).json()[
            "entry"
        ]
    }
    assert subjects == {f"Patient/{only}"}
    assert (
        http.get("/Observation", params={"subject": f"Patient/{only}", "_summary": "count"}).json()["total"]
        == THREADS
    )
