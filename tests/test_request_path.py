"""The request path (issue 10): stored bytes go out as they are, reads share one connection,
the PostgreSQL time limit and connection checks cost no round trip per transaction, and
``hub serve`` picks its worker count from the backend.

Over HTTP against the shared live server where the behaviour is the client's to see (bytes,
status codes); against a real database engine where it is the pool's (which connection,
which session setting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from conftest import PG_URL, LiveServer, make_token

from consent.context import system_access
from hub.auth.principal import Role
from hub.cli import worker_count
from hub.db import engine as db_engine
from hub.db.engine import RequestGuard, create_engine, guarded

pg_only = pytest.mark.skipif(not PG_URL, reason="PostgreSQL connection behaviour")


def _entry_resource_bytes(bundle: bytes, resource: bytes) -> bool:
    """Whether ``resource`` sits in ``bundle`` byte for byte as an entry's resource."""
    return b'"resource":' + resource + b',"search":' in bundle


def test_read_and_search_answer_the_same_stored_bytes(
    live_server: LiveServer, http: httpx.Client, client_for: Callable[[str | None], httpx.Client], uid: str
) -> None:
    """A resource reaches a clinician byte for byte as stored, in a read and in a search
    Bundle alike: no parse and dump on the way out (a Patient with an identifier is sealed
    at rest: opened once, then spliced; an Observation is stored plain)."""
    org = f"req-org-{uid}"
    assert (
        http.put(f"/Organization/{org}", json={"resourceType": "Organization", "id": org}).status_code == 201
    )
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "https://ehealth-hub.vn/sid/cccd", "value": f"0790{uid[:8]}"}],
        "name": [{"family": f"Trần{uid}", "given": ["Thị", "Ánh"]}],
        "managingOrganization": {"reference": f"Organization/{org}"},
    }
    patient_id = http.post("/Patient", json=patient).json()["id"]
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Nhịp tim"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    observation_id = http.post("/Observation", json=observation).json()["id"]
    token = make_token(
        live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/req-{uid}", organizations=[org]
    )
    clinician = client_for(token)
    for res_type, res_id, search in (
        ("Patient", patient_id, f"Patient?_id={patient_id}"),
        ("Observation", observation_id, f"Observation?patient={patient_id}"),
    ):
        read = clinician.get(f"/{res_type}/{res_id}")
        assert read.status_code == 200, read.text
        found = clinician.get(f"/{search}")
        assert found.status_code == 200, found.text
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [res_id]
        assert _entry_resource_bytes(found.content, read.content), (read.content, found.content)
        assert orjson.loads(read.content)["meta"]["versionId"] == "1"


def test_read_errors_stay_outcomes(live_server: LiveServer, http: httpx.Client, uid: str) -> None:
    """One transaction for admission and read changes no answer: unknown is 404, deleted
    410, an id the caller may not see is unknown, each an OperationOutcome."""
    assert http.get(f"/Patient/none-{uid}").status_code == 404
    created = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": uid}]}).json()["id"]
    assert http.delete(f"/Patient/{created}").status_code == 204
    gone = http.get(f"/Patient/{created}")
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    hidden = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": uid}]}).json()["id"]
    token = make_token(
        live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/x-{uid}", organizations=["nowhere"]
    )
    with live_server.client(token) as clinician:
        answer = clinician.get(f"/Patient/{hidden}")
    assert answer.status_code == 404 and answer.json()["resourceType"] == "OperationOutcome"


def test_reads_in_a_shared_read_join_it(router: Any) -> None:
    store = router.ctx.store
    with system_access("test"):
        with store.shared_read() as shared, store.read() as inner:
            assert inner is shared
            assert inner.execute(sa.text("SELECT 1")).scalar() == 1
        with store.read() as alone, store.read() as other:
            assert alone is not other


def test_worker_count() -> None:
    """SQLite: one process (one writer). PostgreSQL: as asked, else one per usable core."""
    assert worker_count("sqlite:///var/x.sqlite3", 0) == 1
    assert worker_count("sqlite:///var/x.sqlite3", 4) == 1
    assert worker_count("postgresql://u@h/db", 3) == 3
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert worker_count("postgresql://u@h/db", 0) == cores


@pg_only
def test_statement_timeout_follows_the_guard(database_url: str) -> None:
    """Guarded work runs under the request time limit, unguarded work under the server's
    default, on the same pooled connection, also after a transaction that rolled back."""
    engine = create_engine(database_url)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    def timeout(autocommit: bool = False) -> str:
        with engine.connect() as conn:
            if autocommit:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            with conn.begin():
                return str(conn.exec_driver_sql("SHOW statement_timeout").scalar())

    try:
        with guarded(RequestGuard(30)):
            assert timeout() == "30s"
            assert timeout(autocommit=True) == "30s"
        sets = [s for s in statements if s.startswith("SET")]
        assert len(sets) == 1, "the second guarded transaction must not set it again"
        assert timeout() == "0"
        with guarded(RequestGuard(2)):
            assert timeout(autocommit=True) == "2s"
        with guarded(RequestGuard(5)), engine.connect() as conn:
            conn.begin().rollback()  # its SET is undone with it
        assert timeout() == "0"
        with (
            guarded(RequestGuard(5)),
            engine.connect() as conn,
            conn.begin(),
            pytest.raises(sa.exc.DBAPIError),
        ):
            conn.exec_driver_sql("SELECT 1/0")
        assert timeout(autocommit=True) == "0"
        with guarded(RequestGuard(30)):
            assert timeout() == "30s"
    finally:
        engine.dispose()


@pg_only
def test_a_connection_that_died_while_idle_is_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ping per checkout, but a pooled connection idle past the threshold is pinged
    and, if its server process is gone, replaced before the caller sees it."""
    engine = create_engine(database_url)
    killer = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with killer.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        monkeypatch.setattr(db_engine, "_PING_AFTER_IDLE_SECONDS", 0.0)
        with engine.connect() as conn:
            second = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert second != first
    finally:
        engine.dispose()
        killer.dispose()
