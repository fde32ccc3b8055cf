"""Abuse limits and no plain-text 500s (issue 8, defects 10, 15, 16, 20), over real HTTP.

Body size (checked on Content-Length and while streaming, before authentication), login
limits keyed on the identity the token endpoint authenticates, search size limits, JSON
depth, the per-transaction time limit, cancelling a request's statements when its client
goes away, and OperationOutcome (503 transient / 500 exception) for unexpected failures.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import PG_URL, LiveServer

from hub.db.engine import RequestGuard, create_engine, guarded

FHIR_JSON = "application/fhir+json"
SMALL_BODY = 1024 * 1024  # the limit of the body-limit server below


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[LiveServer]:
    with LiveServer(database_url, max_body_bytes=SMALL_BODY) as live:
        yield live


@pytest.fixture(scope="module")
def populated_url(fresh_database_url: Any) -> str:
    """A database of its own holding 1,000 Patients (two names each)."""
    url: str = fresh_database_url("limits")
    with LiveServer(url) as live, live.admin_client() as http:
        for batch in range(2):
            entries = [
                {
                    "resource": {
                        "resourceType": "Patient",
                        "name": [
                            {"family": f"Fam{batch}-{n % 97}", "given": [f"G{n % 13}", f"H{n % 7}"]},
                            {"family": f"Alt{n % 31}"},
                        ],
                    },
                    "request": {"method": "POST", "url": "Patient"},
                }
                for n in range(500)
            ]
            response = http.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
            assert response.status_code == 200, response.text[:500]
    return url


def raw_request(port: int, head: str, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode("latin-1"))
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_outcome(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith(FHIR_JSON)
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [issue["code"] for issue in outcome["issue"]] == [code]
    return outcome


# --- defect 16: body size ------------------------------------------------------------------


def test_declared_oversized_body_is_refused_before_it_is_read(server: LiveServer) -> None:
    # 300 MB announced, nothing sent: the answer must come without waiting for the body.
    for auth in ("Bearer forged", f"Bearer {server.admin_token}"):
        sock = raw_request(
            server.port,
            "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
            f"Authorization: {auth}\r\nContent-Length: 300000000\r\n\r\n",
        )
        with sock:
            status, headers, body = read_response(sock)
        assert status == 413
        assert headers["content-type"].startswith(FHIR_JSON)
        assert json.loads(body)["issue"][0]["code"] == "too-long"

    sock = raw_request(
        server.port,
        "POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "Content-Length: 300000000\r\n\r\n",
    )
    with sock:
        status, headers, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["error"] == "invalid_request"  # the OAuth endpoint's error shape


def test_streamed_body_is_refused_as_soon_as_it_passes_the_limit(server: LiveServer) -> None:
    sock = raw_request(
        server.port,
        "POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        "Authorization: Bearer forged\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    chunk = b"x" * 65536
    with sock:
        # A little past the limit, and no final chunk: the 413 must not wait for the rest.
        for _ in range(SMALL_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["issue"][0]["code"] == "too-long"


def test_login_form_has_a_small_limit(server: LiveServer) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
        form = {"grant_type": "password", "username": "a", "password": "x" * 70_000}
        response = http.post("/auth/token", data=form)
        assert response.status_code == 413
        assert response.json()["error"] == "invalid_request"
        small = http.post("/auth/token", data={**form, "password": "x" * 1000})
        assert small.status_code == 400  # read and answered by the endpoint: wrong password
        assert small.json()["error"] == "invalid_grant"


def test_body_within_the_limit_is_served(server: LiveServer) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Big", "given": ["x" * 100] * 500}]}
    assert 50_000 < len(json.dumps(patient)) < SMALL_BODY
    with server.admin_client() as http:
        assert http.post("Patient", json=patient).status_code == 201


# --- defect 15: login limit on the real identity ---------------------------------------------


def test_login_limit_keys_on_the_identity_the_endpoint_checks(database_url: str) -> None:
    with (
        LiveServer(database_url, rate_limit_login="3/hour", trusted_proxies=["127.0.0.1"]) as live,
        httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=30) as http,
    ):
        ips = (f"203.0.113.{n}" for n in range(1, 250))

        def attempt(data: dict[str, str], **kwargs: Any) -> int:
            headers = {"X-Forwarded-For": next(ips)}
            return http.post("/auth/token", data=data, headers=headers, **kwargs).status_code

        # client_credentials over HTTP Basic with a fresh decoy `username` each time.
        client = f"svc-{uuid.uuid4().hex[:8]}"
        decoys = [{"grant_type": "client_credentials", "username": uuid.uuid4().hex} for _ in range(4)]
        statuses = [attempt(d, auth=(client, "wrong")) for d in decoys]
        assert statuses[:3] == [401, 401, 401] and statuses[3] == 429

        # The same with client_id in the form.
        client = f"svc-{uuid.uuid4().hex[:8]}"
        form = {"grant_type": "client_credentials", "client_id": client, "client_secret": "wrong"}
        statuses = [attempt({**form, "username": uuid.uuid4().hex}) for _ in range(4)]
        assert statuses[:3] == [401, 401, 401] and statuses[3] == 429

        # A password grant padded past any peek window still counts for its user name.
        user = f"user-{uuid.uuid4().hex[:8]}"
        padded = {"padding": "p" * 40_000, "grant_type": "password", "username": user, "password": "g"}
        statuses = [attempt(padded) for _ in range(4)]
        assert statuses[:3] == [400, 400, 400] and statuses[3] == 429


def test_nul_in_basic_client_id_is_an_oauth_error(server: LiveServer) -> None:
    credentials = base64.b64encode(b"svc%00x:secret").decode()
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
        response = http.post(
            "/auth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {credentials}"},
        )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


# --- defects 10 and 20: search limits -------------------------------------------------------


def test_search_size_limits(server: LiveServer) -> None:
    with server.admin_client() as http:
        assert http.get("Patient", params={"_sort": "name,given,-family"}).status_code == 200
        assert_outcome(http.get("Patient", params={"_sort": "name,given,family,birthdate"}), 400, "invalid")
        assert http.get("Patient", params={"_id": ",".join(f"p{n}" for n in range(100))}).status_code == 200
        for count in (101, 1000, 5000):  # 1,000 was a plain 500 on SQLite
            values = ",".join(f"v{n}" for n in range(count))
            assert_outcome(http.get("Patient", params={"name": values}), 400, "invalid")
            assert_outcome(http.get("Observation", params={"subject:Patient.name": values}), 400, "invalid")
        many = [("_id", f"p{n}") for n in range(51)]
        assert_outcome(http.get("Patient", params=many), 400, "invalid")
        form = http.post("Patient/_search", data={"name": ",".join(str(n) for n in range(1000))})
        assert_outcome(form, 400, "invalid")


def test_sort_on_strings_orders_correctly(populated_url: str) -> None:
    with LiveServer(populated_url) as live, live.admin_client() as http:
        response = http.get("Patient", params={"_sort": "-family,given", "_count": "1000"})
        assert response.status_code == 200
        rows = [entry["resource"] for entry in response.json()["entry"]]
        assert len(rows) == 1000
        keys = [max(name["family"].casefold() for name in p["name"]) for p in rows]
        assert keys == sorted(keys, reverse=True)


# --- defect 20: JSON depth ------------------------------------------------------------------


def nested_extension(depth: int) -> str:
    """A Patient whose extension nests ``depth`` extensions deep (2 JSON levels each)."""
    leaf = '{"url": "http://example.org/e", "valueString": "leaf"}'
    text = '{"url": "http://example.org/e", "extension": [' * (depth - 1) + leaf + "]}" * (depth - 1)
    return '{"resourceType": "Patient", "extension": [' + text + "]}"


def test_deeply_nested_json_is_refused_with_an_outcome(server: LiveServer) -> None:
    with server.admin_client() as http:
        for depth in (126, 300, 2000):
            response = http.post("Patient", content=nested_extension(depth))
            assert_outcome(response, 400, "invalid")
        shallow = http.post("Patient", content=nested_extension(20))
        assert shallow.status_code == 201, shallow.text[:500]


# --- defects 10 and 20: time limit, cancellation, unexpected failures ----------------------


def test_request_past_its_time_limit_answers_503_timeout(populated_url: str) -> None:
    with LiveServer(populated_url, request_timeout_seconds=0.001) as live, live.admin_client() as http:
        params = {"_sort": "name,given,family", "name:contains": "a", "_count": "1000"}
        outcome = assert_outcome(http.get("Patient", params=params), 503, "timeout")
        assert "Traceback" not in json.dumps(outcome)


def test_unexpected_exception_is_a_500_outcome_without_internals(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(_request: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.app.state.router, "handle", boom)
    with server.admin_client() as http:
        response = http.get("Patient")
    outcome = assert_outcome(response, 500, "exception")
    assert "secret internals" not in json.dumps(outcome)


def test_sqlite_statement_is_interrupted_by_its_guard(tmp_path: Any) -> None:
    """The SQLite side of cancellation and the deadline (PostgreSQL's is tested over HTTP)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'g.sqlite3'}")
    endless = sa.text("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c")
    try:
        for cancel in (True, False):
            guard = RequestGuard(None if cancel else 0.3)
            errors: list[BaseException] = []

            def run(guard: RequestGuard = guard, errors: list[BaseException] = errors) -> None:
                with guarded(guard), engine.connect() as conn, conn.begin():
                    try:
                        conn.execute(endless)
                    except sa.exc.OperationalError as error:
                        errors.append(error)

            started = time.monotonic()
            worker = threading.Thread(target=run)
            worker.start()
            if cancel:
                time.sleep(0.3)
                guard.cancel()
            worker.join(timeout=10)
            assert not worker.is_alive()
            assert time.monotonic() - started < 5
            assert errors and "interrupt" in str(errors[0])
            assert guard.cancelled is cancel and guard.timed_out is not cancel
    finally:
        engine.dispose()


def _server_statements(admin: sa.Connection, database: str) -> list[tuple[int, str]]:
    rows = admin.execute(
        sa.text(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid() "
            "AND query ILIKE '%FROM resource%' AND state = 'active'"
        ),
        {"db": database},
    ).all()
    return [(int(r[0]), str(r[1])) for r in rows]


def _start(http: httpx.Client, path: str, result: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            result.append(http.get(path))
        except httpx.HTTPError as error:
            result.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL: cancelling a running statement of a request")
def test_postgres_statements_stop_when_the_client_goes_away_or_the_connection_dies(
    fresh_database_url: Any,
) -> None:
    url: str = fresh_database_url("limits_cancel")
    database = sa.engine.make_url(url).database or ""
    engine = create_engine(url)
    try:
        with LiveServer(url) as live, engine.connect() as locker, engine.connect() as watcher:
            watcher.execution_options(isolation_level="AUTOCOMMIT")
            with live.admin_client() as http:  # warm up: the account check, the pool
                assert http.get("Patient").status_code == 200
            transaction = locker.begin()
            locker.execute(sa.text("LOCK TABLE resource IN ACCESS EXCLUSIVE MODE"))

            # 1. The client disconnects: the waiting statement is cancelled within a second or two.
            sock = raw_request(
                live.port,
                f"GET /fhir/Patient?name=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live.admin_token}\r\n\r\n",
            )
            assert _wait_for(lambda: _server_statements(watcher, database), 10), "the search never ran"
            sock.close()  # the client goes away under the running request
            assert _wait_for(lambda: not _server_statements(watcher, database), 3), (
                "the statement kept running after the client left"
            )

            # 2. The server's connection is killed mid-request: 503 transient with Retry-After.
            result = []
            with live.admin_client(timeout=60) as http:
                thread = _start(http, "Patient?name=y", result)
                assert _wait_for(lambda: _server_statements(watcher, database), 10)
                for pid, _ in _server_statements(watcher, database):
                    watcher.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                thread.join(timeout=10)
            transaction.rollback()
            response = result[0]
            assert isinstance(response, httpx.Response)
            assert_outcome(response, 503, "transient")
            assert int(response.headers["retry-after"]) >= 1

            # And the hub serves again afterwards.
            with live.admin_client() as http:
                assert http.get("Patient").status_code == 200
    finally:
        engine.dispose()
