"""The connectors' admin API, /metrics and the ``hub connectors`` commands (issue 11).

One real server (``LiveServer``) on a database of its own, with its in-process connector
worker: sources are registered, QĐ 130 files uploaded and processed, and what the API
says is checked against what happened. Who may call what is checked for every role that
matters (anonymous, patient, clinician, a facility admin of this facility and of another,
hub admin); every authenticated call leaves an AuditEvent. The CLI runs in-process
(typer's CliRunner) against the same database. Both backends.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from conftest import LiveServer, make_token
from typer.testing import CliRunner
from xml130_factory import envelope, episode

from connectors.identifiers import FACILITY
from hub.audit.events import HUB_OPERATIONS
from hub.auth.principal import Role

FACILITY_CODE = "64001"  # the synthetic files (xml130_factory) are from it
OTHER_CODE = "64020"
METRICS_TOKEN = "scrape-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def server(fresh_database_url: Callable[[str], str]) -> Iterator[LiveServer]:
    with LiveServer(fresh_database_url("connapi"), metrics_token=METRICS_TOKEN) as live:
        yield live


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=server.auth, timeout=60) as client:
        yield client


def _client(server: LiveServer, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers=headers, timeout=60)


def _source(name: str, code: str = FACILITY_CODE, kind: str = "xml130", **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "facility_code": code,
        "facility_name": f"Facility {code}",
        "facility_level": "district",
        "kind": kind,
        "settings": settings,
    }


@pytest.fixture(scope="module")
def sources(admin: httpx.Client) -> dict[str, str]:
    """One xml130 source of FACILITY_CODE, one hl7v2 source of OTHER_CODE; the id of each
    facility's Organization."""
    for body in (_source("api-xml"), _source("api-hl7", OTHER_CODE, "hl7v2-mllp", port=2598)):
        response = admin.post("/connectors", json=body)
        assert response.status_code == 201, response.text
    orgs = {}
    for code in (FACILITY_CODE, OTHER_CODE):
        found = admin.get("/fhir/Organization", params={"identifier": f"{FACILITY}|{code}"}).json()
        assert found["total"] == 1 if "total" in found else len(found["entry"]) == 1
        orgs[code] = found["entry"][0]["resource"]["id"]
    return orgs


def _wait_for(check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _audits(admin: httpx.Client, operation: str) -> list[dict[str, Any]]:
    bundle = admin.get(
        "/fhir/AuditEvent", params={"subtype": f"{HUB_OPERATIONS}|connectors-{operation}", "_count": "500"}
    ).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def _audited_by(events: list[dict[str, Any]], subject: str) -> list[dict[str, Any]]:
    return [e for e in events if any(a.get("name") == subject for a in e.get("agent", []))]


# --- who may call ---------------------------------------------------------------------------


def test_anonymous_gets_401_everywhere(server: LiveServer, sources: dict[str, str]) -> None:
    with _client(server, None) as anonymous:
        for method, path in [
            ("GET", "/connectors"),
            ("GET", "/connectors/api-xml"),
            ("POST", "/connectors"),
            ("POST", "/connectors/api-xml/pause"),
            ("GET", "/connectors/api-xml/messages"),
            ("POST", "/connectors/replay"),
            ("POST", "/connectors/api-xml/xml130"),
            ("GET", "/metrics"),
        ]:
            response = anonymous.request(method, path, content=b"<x/>" if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["resourceType"] == "OperationOutcome"
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_roles_other_than_admins_get_403(
    server: LiveServer, admin: httpx.Client, sources: dict[str, str]
) -> None:
    patient = make_token(server, role=Role.PATIENT, fhir_user=f"Patient/p-{uuid.uuid4().hex[:8]}")
    clinician = make_token(
        server, role=Role.CLINICIAN, fhir_user="Practitioner/dr-conn", organizations=[sources[FACILITY_CODE]]
    )
    for token in (patient, clinician):
        with _client(server, token) as client:
            for method, path in [
                ("GET", "/connectors"),
                ("GET", "/connectors/api-xml"),
                ("POST", "/connectors/api-xml/pause"),
                ("GET", "/connectors/api-xml/messages"),
                ("POST", "/connectors/api-xml/xml130"),
                ("GET", "/metrics"),
            ]:
                response = client.request(method, path, content=b"<x/>" if method == "POST" else None)
                assert response.status_code == 403, (method, path, response.text)
                assert response.json()["issue"][0]["code"] == "forbidden"
    # The refusals are audited too, with their outcome (4: minor failure).
    refused = [e for e in _audits(admin, "status") if e["outcome"] == "4"]
    assert refused, "a refused status call leaves an AuditEvent"


def test_facility_admin_reads_only_own_facility(server: LiveServer, sources: dict[str, str]) -> None:
    own = make_token(server, role=Role.FACILITY_ADMIN, organizations=[sources[FACILITY_CODE]])
    other = make_token(server, role=Role.FACILITY_ADMIN, organizations=[sources[OTHER_CODE]])
    with _client(server, own) as client:
        listed = client.get("/connectors")
        assert listed.status_code == 200, listed.text
        assert [s["name"] for s in listed.json()] == ["api-xml"]
        assert client.get("/connectors/api-xml").status_code == 200
        assert client.get("/connectors/api-hl7").status_code == 403
        # Status only: no managing, no messages, no metrics.
        assert client.post("/connectors/api-xml/pause").status_code == 403
        assert client.get("/connectors/api-xml/messages").status_code == 403
        assert client.post("/connectors", json=_source("api-sneaky")).status_code == 403
    with _client(server, other) as client:
        assert client.get("/connectors/api-xml").status_code == 403
        assert [s["name"] for s in client.get("/connectors").json()] == ["api-hl7"]


# --- managing sources ---------------------------------------------------------------------------


def test_add_validates_and_refuses_duplicates(admin: httpx.Client, sources: dict[str, str]) -> None:
    again = admin.post("/connectors", json=_source("api-xml"))
    assert again.status_code == 400 and "already exists" in again.text
    replaced = admin.post("/connectors?replace=true", json=_source("api-xml", interval=30))
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["settings"] == {"interval": 30}
    for bad in (
        {**_source("api-bad"), "facility_code": "12"},  # MA_CSKCB has 5 characters
        {**_source("api-bad"), "kind": "dicom"},
        {**_source("api-bad"), "facility_level": "galactic"},
        {**_source("Bad Name!")},
        {**_source("api-bad"), "settings": "port=1"},
        {**_source("api-bad"), "color": "blue"},
        {"name": "api-bad"},
    ):
        response = admin.post("/connectors", json=bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    not_json = admin.post("/connectors", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    assert admin.get("/connectors/api-bad").status_code == 404


def test_pause_and_resume(admin: httpx.Client, sources: dict[str, str]) -> None:
    paused = admin.post("/connectors/api-hl7/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert admin.get("/connectors/api-hl7").json()["paused"] is True
    resumed = admin.post("/connectors/api-hl7/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert admin.post("/connectors/nope/pause").status_code == 404
    assert len(_audits(admin, "pause")) >= 2  # the 404 too
    assert _audits(admin, "resume")


# --- upload, processing, status, messages, replay, metrics ------------------------------------------


def _messages(admin: httpx.Client, source: str, **params: str) -> list[dict[str, Any]]:
    response = admin.get(f"/connectors/{source}/messages", params=params)
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["messages"]
    return listed


def test_upload_process_status_metrics(
    server: LiveServer, admin: httpx.Client, sources: dict[str, str]
) -> None:
    good = envelope([episode(901), episode(902)])
    broken = b"<GIAMDINHHS><THONGTINDONVI>"  # not even well-formed: rejected at receipt

    first = admin.post(
        "/connectors/api-xml/xml130", content=good, headers={"Content-Type": "application/xml"}
    )
    assert first.status_code == 202, first.text
    (good_id,) = first.json()["messages"]
    assert first.json()["receipts"][0]["duplicate"] is False
    again = admin.post("/connectors/api-xml/xml130", content=good)
    assert again.json()["messages"] == [good_id] and again.json()["receipts"][0]["duplicate"] is True
    bad = admin.post("/connectors/api-xml/xml130", content=broken)
    assert bad.status_code == 202
    (bad_id,) = bad.json()["messages"]

    # An ADT message into the HL7 source (as its listener would store it): processed too.
    from test_mllp import adt_a01, cccd

    from connectors import inbox
    from connectors import sources as registry

    hl7 = registry.get(server.engine, "api-hl7")
    assert hl7 is not None
    tag = uuid.uuid4().hex[:8]
    (adt,) = inbox.receive(server.engine, hl7, [adt_a01(f"A{tag}", cccd(), visit=f"V{tag}")])
    server.app.state.connectors.wake()

    # The server's in-process worker takes them at once.
    def states(source: str) -> dict[int, str]:
        return {m["id"]: m["state"] for m in _messages(admin, source)}

    final = ("processed", "rejected", "dead")
    _wait_for(lambda: states("api-xml").get(good_id) in final and states("api-hl7").get(adt.id) in final)
    listed = {m["id"]: m for m in _messages(admin, "api-xml")}
    # What the QĐ 130 mapping makes of the file is tests/test_xml130*'s business; here,
    # that the upload reached a final state through the worker, with its reason if refused.
    good_state = listed[good_id]["state"]
    assert good_state == "processed" or listed[good_id]["error"], listed[good_id]
    assert listed[bad_id]["state"] == "rejected" and listed[bad_id]["error"]
    assert all("raw" not in m and "raw_base64" not in m for m in listed.values())
    rejected = [m["id"] for m in _messages(admin, "api-xml", state="rejected")]
    assert bad_id in rejected
    (processed_adt,) = _messages(admin, "api-hl7", state="processed")
    assert processed_adt["id"] == adt.id and processed_adt["message_type"] == "ADT^A01"
    assert processed_adt["resources"], "the processed message names what it wrote"

    xml_status = admin.get("/connectors/api-xml").json()
    assert sum(xml_status["counts"].values()) == 2 and xml_status["counts"]["rejected"] == len(rejected)
    assert xml_status["backlog"] == 0 and xml_status["failures"] == len(rejected)
    assert xml_status["last_received_at"] and xml_status["last_error"] and xml_status["last_error_at"]
    status = admin.get("/connectors/api-hl7").json()
    assert status["counts"]["processed"] == 1 and status["backlog"] == 0 and status["failures"] == 0
    assert status["last_received_at"] and status["last_processed_at"]
    assert status["messages_per_second"] > 0  # processed within the last minute
    everyone = {s["name"]: s for s in admin.get("/connectors").json()}
    assert everyone["api-hl7"] == status and everyone["api-xml"] == xml_status

    # The raw bodies only on request, exactly as received, and the reading is audited.
    raw = {m["id"]: m for m in _messages(admin, "api-xml", include="raw")}
    assert base64.b64decode(raw[good_id]["raw_base64"]) == good
    assert base64.b64decode(raw[bad_id]["raw_base64"]) == broken
    assert _audits(admin, "messages-raw")

    # Prometheus: with a hub-admin token and with the METRICS_TOKEN secret; the figures are
    # the status's.
    text = admin.get("/metrics").text
    with _client(server, METRICS_TOKEN) as scraper:
        scraped = scraper.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    for body in (text, scraped.text):
        assert 'hub_connector_messages_received_total{source="api-xml"} 2.0' in body
        assert f'hub_connector_failures{{source="api-xml",state="rejected"}} {len(rejected)}.0' in body
        assert 'hub_connector_backlog{source="api-xml"} 0.0' in body
        assert 'hub_connector_messages_received_total{source="api-hl7"} 1.0' in body
        assert 'hub_connector_messages_processed_total{source="api-hl7"} 1.0' in body
        assert 'hub_connector_messages{source="api-hl7",state="processed"} 1.0' in body
        assert 'hub_connector_paused{source="api-hl7"} 0.0' in body
        assert 'hub_connector_last_message_timestamp_seconds{source="api-xml"}' in body
        assert 'hub_connector_last_processed_timestamp_seconds{source="api-hl7"}' in body
        assert 'hub_connector_batch_seconds_count{mode="in-process"}' in body
    with _client(server, "not-" + METRICS_TOKEN) as wrong:
        assert wrong.get("/metrics").status_code == 401
    assert _audited_by(_audits(admin, "metrics"), "metrics-scraper")

    # Replay: by id, and by filter; bad requests refused.
    replayed = admin.post("/connectors/replay", json={"ids": [bad_id]})
    assert replayed.status_code == 200 and replayed.json() == {"replayed": 1}
    _wait_for(lambda: states("api-xml")[bad_id] == "rejected")
    by_filter = admin.post("/connectors/replay", json={"state": "rejected", "source": "api-xml"})
    assert by_filter.json() == {"replayed": len(rejected)}
    for body in ({}, {"ids": "1"}, {"state": "lost"}, {"source": "nope"}, {"ids": [True]}, {"ids": [2**70]}):
        response = admin.post("/connectors/replay", json=body)
        assert response.status_code in (400, 404), (body, response.text)
    assert _audits(admin, "replay")
    _wait_for(lambda: admin.get("/connectors/api-xml").json()["backlog"] == 0)


def test_upload_refusals(admin: httpx.Client, sources: dict[str, str]) -> None:
    assert admin.post("/connectors/api-hl7/xml130", content=b"<x/>").status_code == 400  # not xml130
    assert admin.post("/connectors/nope/xml130", content=b"<x/>").status_code == 404
    assert admin.post("/connectors/api-xml/xml130", content=b"").status_code == 400
    assert admin.get("/connectors/api-xml/messages", params={"state": "lost"}).status_code == 400
    assert admin.get("/connectors/api-xml/messages", params={"limit": "x"}).status_code == 400
    uploads = _audits(admin, "upload")
    assert uploads and all(e["subtype"][1]["code"] == "connectors-upload" for e in uploads)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.fixture()
def cli(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    from hub.cli import app
    from hub.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", str(server.settings.database_url))
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["connectors", *args], env={"COLUMNS": "250"})
        assert result.exit_code == code, result.output
        return result.output

    yield run
    get_settings.cache_clear()


def test_cli(
    cli: Callable[..., str], server: LiveServer, admin: httpx.Client, sources: dict[str, str]
) -> None:
    import json

    cli(
        "add", "cli-his", "--facility-code", "64030", "--facility-name", "TYT Ia Kha", "--level", "commune",
        "--kind", "hl7v2-mllp", "--setting", "port=2599", "--setting", "host=127.0.0.1",
    )  # fmt: skip
    listed = json.loads(cli("list", "--json"))
    his = next(s for s in listed if s["name"] == "cli-his")
    assert his["settings"] == {"port": 2599, "host": "127.0.0.1"} and his["facility_level"] == "commune"
    assert "already exists" in cli("add", "cli-his", "--facility-code", "64030", "--facility-name", "x",
                                   "--level", "commune", "--kind", "hl7v2-mllp", code=1)  # fmt: skip
    assert "Source cli-his paused" in cli("pause", "cli-his")
    status = json.loads(cli("status", "cli-his", "--json"))
    assert status[0]["paused"] is True and status[0]["backlog"] == 0
    cli("resume", "cli-his")
    table = cli("status")
    assert "backlog" in table and all(name in table for name in ("cli-his", "api-xml", "api-hl7"))
    cli("pause", "nope", code=1)
    from connectors import inbox
    from connectors import sources as registry

    hl7 = registry.get(server.engine, "api-hl7")
    assert hl7 is not None
    (poison,) = inbox.receive(server.engine, hl7, [b"not HL7 at all " + uuid.uuid4().hex.encode()])
    messages = json.loads(cli("messages", "--source", "api-hl7", "--state", "rejected", "--json"))
    assert poison.id in [m["id"] for m in messages] and all("raw" not in m for m in messages)
    assert "1 message queued again" in cli("replay", "--id", str(poison.id))
    assert "0 messages queued again" in cli("replay", "--state", "dead", "--source", "cli-his")
    cli("replay", code=2)  # nothing to select
    cli("worker", code=1)  # no REDIS_URL
    # The organisation of the facility was made, and the commands were audited.
    found = admin.get("/fhir/Organization", params={"identifier": f"{FACILITY}|64030"}).json()
    assert found["entry"][0]["resource"]["name"] == "TYT Ia Kha"
    ops = admin.get(
        "/fhir/AuditEvent", params={"subtype": f"{HUB_OPERATIONS}|hub-connectors-add", "_count": "50"}
    ).json()
    assert ops.get("entry")


def test_secrets_are_sealed_at_rest_and_never_shown(
    server: LiveServer, admin: httpx.Client, sources: dict[str, str], cli: Callable[..., str]
) -> None:
    import sqlalchemy as sa

    from connectors import sources as registry
    from hub.db.schema import connector_source

    token, secret = "tok-" + uuid.uuid4().hex, "sec-" + uuid.uuid4().hex
    pull = _source("api-pull", kind="fhir-pull", base_url="http://127.0.0.1:9/fhir", token=token)
    oauth = _source(
        "api-oauth",
        OTHER_CODE,
        "fhir-pull",
        base_url="http://127.0.0.1:9/fhir",
        token_url="http://127.0.0.1:9/auth/token",
        client_id="hub",
        client_secret=secret,
    )
    shown = []
    for body in (pull, oauth):
        added = admin.post("/connectors", json=body)
        assert added.status_code == 201, added.text
        shown.append(added.text)
    assert orjson.loads(shown[0])["settings"]["token"] == registry.MASK
    assert orjson.loads(shown[1])["settings"]["client_secret"] == registry.MASK
    # A replace that sends the mask back (settings as read) keeps the secret.
    again = admin.post(
        "/connectors?replace=true",
        json={**pull, "settings": {**pull["settings"], "token": registry.MASK, "interval": 120}},
    )
    assert again.status_code == 200, again.text
    shown += [again.text, admin.post("/connectors/api-pull/pause").text]
    shown += [admin.post("/connectors/api-pull/resume").text, admin.get("/connectors").text]
    shown += [admin.get("/connectors/api-oauth").text, admin.get("/connectors/api-pull/messages").text]
    shown += [admin.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text]
    shown += [cli("list", "--json"), cli("list"), cli("status", "--json"), cli("status")]
    assert [text for text in shown if token in text or secret in text] == []
    # A new source cannot be given the mask for a secret.
    masked_new = admin.post(
        "/connectors",
        json={**pull, "name": "api-pull-2", "settings": {**pull["settings"], "token": registry.MASK}},
    )
    assert masked_new.status_code == 400 and "mask" in masked_new.text
    # The poller gets the secrets back; the table holds them sealed.
    stored_pull, stored_oauth = (
        registry.get(server.engine, "api-pull"),
        registry.get(server.engine, "api-oauth"),
    )
    assert stored_pull is not None and stored_pull.settings["token"] == token
    assert stored_pull.settings["interval"] == 120
    assert stored_oauth is not None and stored_oauth.settings["client_secret"] == secret
    with server.engine.connect() as conn:
        at_rest = (
            conn.execute(
                sa.select(connector_source.c.settings).where(
                    connector_source.c.name.in_(["api-pull", "api-oauth"])
                )
            )
            .scalars()
            .all()
        )
    text = orjson.dumps(at_rest).decode()
    assert token not in text and secret not in text and text.count("$sealed:") == 2
    for name in ("api-pull", "api-oauth"):  # nothing listens there: the hub's worker leaves them be
        registry.set_paused(server.engine, name, True)
