"""FHIR pull (connectors.fhirpull): a second hub instance is the facility.

The facility is a LiveServer with its own fresh database and auth on; the pull authenticates
with an integration-service token. Between puller and facility sits a small real HTTP proxy
(``_Proxy``) that forwards every request and, when a test says so, answers 500, hangs past the
poller's timeout, or drops the connection: outages on real sockets. The facility's BASE_URL is
the proxy's, so its next links and export file URLs lead through the proxy too.

The hub under test is another LiveServer; its inbox is processed by ``Pipeline.process_due``
and what arrived is read over its FHIR API.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import REPO, SHARED, LiveServer, _copy_database, make_token

from connectors import inbox, sources
from connectors.fhirpull import FORMAT, Poller, PullError, pull_order
from connectors.identifiers import CCCD, facility_system
from connectors.model import Rejected, Source, Transient
from connectors.pipeline import Pipeline
from connectors.worker import Intake
from hub.app_factory import build_router
from hub.auth.principal import Role
from hub.settings import Settings

FHIR_JSON = {"Content-Type": "application/fhir+json"}
Action = str | None  # None: forward; "500", "busy" (202), "hang", "drop"


class _Proxy:
    """A forwarding HTTP proxy on a real socket; ``plan(method, path)`` may inject a fault."""

    def __init__(self) -> None:
        self.target = ""
        self.plan: Callable[[str, str], Action] = lambda method, path: None
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                proxy.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                action = proxy.plan(self.command, self.path)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "hang":
                    time.sleep(1.5)
                    self.close_connection = True
                    return
                if action == "busy":  # an export status that says "still running"
                    self.send_response(202)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                answer = httpx.request(
                    self.command, proxy.target + self.path, headers=headers, content=body, timeout=30
                )
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "content-encoding",
                        "connection",
                    ):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Facility:
    """A facility's FHIR server (a hub instance) behind a proxy, with a service token."""

    def __init__(self, database_url: str) -> None:
        self.proxy = _Proxy()
        self.base = f"http://127.0.0.1:{self.proxy.port}/fhir"
        self.server = LiveServer(database_url, base_url=self.base, connector_workers=0).__enter__()
        self.proxy.target = f"http://127.0.0.1:{self.server.port}"
        self.token = make_token(self.server, role=Role.SERVICE)
        self.client = self.server.admin_client()

    def close(self) -> None:
        self.client.close()
        self.server.__exit__()
        self.proxy.close()

    def load_visit(self, cccd: str, observations: int) -> dict[str, Any]:
        """One patient (CCCD) with an Encounter and ``observations`` heart rates; the stored ids."""
        patient, encounter = "urn:uuid:" + _uuid(), "urn:uuid:" + _uuid()
        entries: list[dict[str, Any]] = [
            _post(patient, _patient(cccd)),
            _post(
                encounter,
                {
                    "resourceType": "Encounter",
                    "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": patient},
                },
            ),
        ]
        entries += [
            _post("urn:uuid:" + _uuid(), _heart_rate(patient, encounter, 60 + n)) for n in range(observations)
        ]
        answer = self.client.post(
            "", json={"resourceType": "Bundle", "type": "transaction", "entry": entries}, headers=FHIR_JSON
        )
        assert answer.status_code == 200, answer.text
        # "Type/id" of each (the location may be absolute and carries the version).
        ids = [
            "/".join(e["response"]["location"].split("/_history")[0].split("/")[-2:])
            for e in answer.json()["entry"]
        ]
        return {"patient": ids[0], "encounter": ids[1], "observations": ids[2:]}


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


def _post(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def _patient(cccd: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": CCCD, "value": cccd}],
        "name": [{"family": "Nguyễn", "given": ["Văn", "An"]}],
        "gender": "male",
        "birthDate": f"19{cccd[4:6]}-03-02",
    }


def _heart_rate(patient: str, encounter: str, value: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": patient},
        "encounter": {"reference": encounter},
        "valueQuantity": {
            "value": value,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def _cccd() -> str:
    """A well-formed CCCD of a man born in 1975 in Gia Lai (064), unique per call."""
    return f"064075{random.randrange(10**6):06d}"


def _code() -> str:
    return f"F{random.randrange(10**4):04d}"


@pytest.fixture(scope="module")
def hub(fresh_database_url) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    # No in-process connector worker: each test polls and processes itself, step by step.
    with LiveServer(fresh_database_url("fhirpull_hub"), connector_workers=0) as server:
        yield server


@pytest.fixture(scope="module")
def facility_template(fresh_database_url) -> str:  # type: ignore[no-untyped-def]
    """One migrated, empty facility database; each test's facility is a copy (faster than
    migrating one per test). Never served itself."""
    return str(fresh_database_url("fhirpull_fac"))


@pytest.fixture()
def facility(
    facility_template: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Facility]:
    site = Facility(
        _copy_database(facility_template, f"fhirpull_fac_{request.node.name[5:25].lower()}", tmp_path_factory)
    )
    yield site
    site.close()


def _source(hub: LiveServer, facility: Facility, **settings: Any) -> Source:
    """A registered source of this facility (a setting given as None is left out)."""
    name = f"fac-{_code().lower()}"
    wanted = {
        "base_url": facility.base,
        "token": facility.token,
        "types": ["Encounter", "Observation"],
        **settings,
    }
    return sources.add(
        hub.app.state.router,
        Source(
            name,
            _code(),
            "Bệnh viện thử",
            "provincial",
            "fhir-pull",
            {k: v for k, v in wanted.items() if v is not None},
        ),
    )


def _replace(hub: LiveServer, source: Source, **settings: Any) -> Source:
    """The source registered again with these settings changed (sources.add, replace)."""
    changed = dataclasses.replace(source, settings={**source.settings, **settings})
    return sources.add(hub.app.state.router, changed, replace=True)


def _process(hub: LiveServer) -> None:
    pipeline = Pipeline(hub.app.state.router, retry_base_seconds=0)
    while pipeline.process_due():
        pass


def _rows(hub: LiveServer, source: Source) -> list[inbox.MessageSummary]:
    return inbox.messages(hub.engine, source=source.name, limit=1000)


def _search(hub: LiveServer, query: str) -> list[dict[str, Any]]:
    with hub.admin_client() as client:
        answer = client.get(query)
    assert answer.status_code == 200, answer.text
    return [
        e["resource"] for e in answer.json().get("entry", []) if e.get("search", {}).get("mode") != "include"
    ]


def _pulled_ids(hub: LiveServer, source: Source) -> list[str]:
    """Every facility resource ("Type/id") in the source's stored pages, with repeats."""
    found: list[str] = []
    for row in _rows(hub, source):
        document = orjson.loads(inbox.raw(hub.engine, row.id))
        if document["kind"] == "page":
            items = document["resources"]
        else:
            items = [orjson.loads(line) for line in document["ndjson"].splitlines() if line.strip()]
        found += [f"{r['resourceType']}/{r['id']}" for r in items]
    return found


def _assert_valid(resources: list[dict[str, Any]], folder: Path) -> None:
    """../shared/tools/validate_fhir.js over these resources (as tests/test_hl7v2_samples.py)."""
    node = shutil.which("node")
    assert node, "node is needed for the FHIR validator"
    path = folder / "pulled.ndjson"
    path.write_text("\n".join(orjson.dumps(r).decode() for r in resources), encoding="utf-8")
    done = subprocess.run(
        [node, str(SHARED / "tools" / "validate_fhir.js"), "--quiet", str(path)],
        cwd=REPO,
        env={**os.environ, "FHIRVAL_DIR": str(REPO / ".fhirval")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(resources)} valid, 0 invalid" in done.stdout


def _origin(source: Source, facility_id: str) -> str:
    return f"{facility_system('fhir-id', source.facility_code)}|{facility_id}"


# --- search path --------------------------------------------------------------------------------


def test_pull_resolves_patients_brings_nothing_twice_and_updates_in_place(
    hub: LiveServer, facility: Facility, tmp_path: Path
) -> None:
    known, new = _cccd(), _cccd()
    with hub.admin_client() as client:  # the citizen is already in the hub (another facility)
        answer = client.post("Patient", json=_patient(known), headers=FHIR_JSON)
        assert answer.status_code == 201, answer.text
        known_id = answer.json()["id"]
    first = facility.load_visit(known, observations=3)
    facility.load_visit(new, observations=2)
    source = _source(hub, facility, page_size=2, bulk=False)

    with Poller(hub.engine, source) as poller:
        assert poller.poll_once() == 1 + 1 + 3  # Patient page, Encounter page, 5 Observations by 2
        _process(hub)
        rows = _rows(hub, source)
        assert {r.state for r in rows} == {"processed"}, [
            (r.id, r.control_id, r.state, r.error) for r in rows
        ]
        assert {r.message_type for r in rows} == {"Bundle"}

        # One Patient per citizen: the known one is found by CCCD and now carries the MRN.
        patients = _search(hub, f"Patient?identifier={CCCD}|{known}")
        assert [p["id"] for p in patients] == [known_id]
        mrn = {
            "system": facility_system("mrn", source.facility_code),
            "value": first["patient"].split("/")[1],
        }
        assert mrn in patients[0]["identifier"]
        assert len(_search(hub, f"Patient?identifier={CCCD}|{new}")) == 1

        observations = _search(hub, f"Observation?subject=Patient/{known_id}")
        assert len(observations) == 3
        encounters = _search(hub, f"Encounter?subject=Patient/{known_id}")
        assert len(encounters) == 1
        assert {
            "system": facility_system("fhir-id", source.facility_code),
            "value": first["encounter"],
        } in encounters[0]["identifier"]
        for observation in observations:
            assert observation["encounter"] == {"reference": f"Encounter/{encounters[0]['id']}"}
            assert observation["valueQuantity"]["code"] == "/min"
        origin = facility_system("fhir-id", source.facility_code)
        pulled = {i["value"] for o in observations for i in o["identifier"] if i["system"] == origin}
        assert pulled == set(first["observations"])

        # What the hub stores (and serves) is valid FHIR R4 for an independent validator.
        _assert_valid([*patients, *encounters, *observations], tmp_path)

        # Nothing changed at the facility: nothing new is stored.
        assert poller.poll_once() == 0
        assert len(_rows(hub, source)) == len(rows)

        # A change at the facility arrives as an update of the same resource.
        changed = first["observations"][0]
        stored = facility.client.get(changed).json()
        stored["valueQuantity"]["value"] = 140
        assert facility.client.put(changed, json=stored, headers=FHIR_JSON).status_code == 200
        assert poller.poll_once() == 1
        _process(hub)
        after = _search(hub, f"Observation?identifier={_origin(source, changed)}")
        assert len(after) == 1 and after[0]["valueQuantity"]["value"] == 140
        assert after[0]["meta"]["versionId"] == "2"
        assert len(_search(hub, f"Observation?subject=Patient/{known_id}")) == 3
        assert poller.cursor()["search"]["Observation"]["since"] >= stored["meta"]["lastUpdated"]


def test_restart_resumes_from_the_cursor_without_loss_or_duplicates(
    hub: LiveServer, facility: Facility
) -> None:
    cccd = _cccd()
    visit = facility.load_visit(cccd, observations=7)
    source = _source(hub, facility, page_size=2, bulk=False)
    observation_pages = 0

    def die_on_third_page(method: str, path: str) -> Action:
        nonlocal observation_pages
        if path.startswith("/fhir/Observation"):
            observation_pages += 1
            if observation_pages == 3:
                return "drop"  # the facility goes away mid-walk (the process is "killed")
        return None

    facility.proxy.plan = die_on_third_page
    with Poller(hub.engine, source) as poller, pytest.raises(Transient):
        poller.poll_once()
    cursor = Poller(hub.engine, source).cursor()
    assert "next" in cursor["search"]["Observation"]  # the walk stopped after 2 stored pages
    assert len(_rows(hub, source)) == 1 + 1 + 2

    facility.proxy.plan = lambda method, path: None
    with Poller(hub.engine, source) as restarted:  # a new process: only the cursor survives
        assert restarted.poll_once() == 2  # the two remaining Observation pages
        assert restarted.poll_once() == 0
    pulled = _pulled_ids(hub, source)
    assert sorted(pulled) == sorted({*pulled})  # no resource stored twice
    assert set(visit["observations"]) <= set(pulled)
    _process(hub)
    patient = _search(hub, f"Patient?identifier={CCCD}|{cccd}")
    assert len(patient) == 1
    assert len(_search(hub, f"Observation?subject=Patient/{patient[0]['id']}")) == 7


def test_facility_errors_and_timeouts_are_transient_and_lose_nothing(
    hub: LiveServer, facility: Facility
) -> None:
    cccd = _cccd()
    facility.load_visit(cccd, observations=3)
    # A short read timeout, so that a hanging facility fails the poll quickly.
    source = _source(hub, facility, page_size=10, bulk=False, timeout=0.5)
    faults = ["500", "hang"]

    def plan(method: str, path: str) -> Action:
        if path.startswith("/fhir/Observation") and faults:
            return faults.pop(0)
        return None

    facility.proxy.plan = plan
    with Poller(hub.engine, source) as poller:
        with pytest.raises(Transient, match="500"):
            poller.poll_once()
        with pytest.raises(Transient):  # the read timed out
            poller.poll_once()
        assert poller.poll_once() == 1  # the Observation page, at last; Patient/Encounter were kept
    assert len(_rows(hub, source)) == 3
    _process(hub)
    patient = _search(hub, f"Patient?identifier={CCCD}|{cccd}")
    assert len(_search(hub, f"Observation?subject=Patient/{patient[0]['id']}")) == 3

    # Refusals that retrying cannot fix are not Transient.
    bad = _replace(hub, source, token="nonsense")
    with Poller(hub.engine, bad) as poller, pytest.raises(PullError, match="401"):
        poller.poll_once()


def test_unreachable_facility_is_transient(hub: LiveServer) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = {"base_url": f"http://127.0.0.1:{port}/fhir", "token": "t", "bulk": False}
    source = sources.add(
        hub.app.state.router, Source("fac-down", "F0000", "x", "commune", "fhir-pull", settings)
    )
    with Poller(hub.engine, source) as poller, pytest.raises(Transient):
        poller.poll_once()


def test_the_hubs_own_worker_pulls_at_the_source_interval(fresh_database_url, facility: Facility) -> None:  # type: ignore[no-untyped-def]
    """No hand-driven polls: ``hub serve``'s in-process worker pulls and processes by itself."""
    cccd = _cccd()
    visit = facility.load_visit(cccd, observations=2)
    url = fresh_database_url("fhirpull_worker")
    settings = {"base_url": facility.base, "token": facility.token, "types": ["Encounter", "Observation"]}
    source = Source(
        "fac-worker",
        _code(),
        "Trạm y tế",
        "commune",
        "fhir-pull",
        {**settings, "interval": 0.5, "bulk": False},
    )
    router = build_router(Settings(database_url=url))
    sources.add(router, source)  # before the hub starts, so its worker sees it at once
    router.ctx.store.engine.dispose()
    with LiveServer(url) as hub:

        def observations() -> int:
            patients = _search(hub, f"Patient?identifier={CCCD}|{cccd}")
            return len(_search(hub, f"Observation?subject=Patient/{patients[0]['id']}")) if patients else 0

        _wait_for(lambda: observations() == 2)
        facility.client.post(
            "Observation", json=_heart_rate(visit["patient"], visit["encounter"], 99), headers=FHIR_JSON
        )
        _wait_for(lambda: observations() == 3)
        assert {r.state for r in _rows(hub, source)} == {"processed"}


def _wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the pull did not arrive in time"
        time.sleep(0.2)


# --- Bulk $export path ---------------------------------------------------------------------------


def test_bulk_export_pull_then_nothing_new_then_update(hub: LiveServer, facility: Facility) -> None:
    cccd = _cccd()
    visit = facility.load_visit(cccd, observations=5)
    source = _source(hub, facility, page_size=2)  # no "bulk": the CapabilityStatement decides
    with Poller(hub.engine, source) as poller:
        assert poller.poll_once() == 1 + 1 + 3  # Patient, Encounter, Observations in chunks of 2
        assert any("$export?" in r for r in facility.proxy.requests)
        rows = _rows(hub, source)
        assert {r.message_type for r in rows} == {"NDJSON"}
        _process(hub)
        assert {r.state for r in _rows(hub, source)} == {"processed"}
        patient = _search(hub, f"Patient?identifier={CCCD}|{cccd}")
        assert len(patient) == 1
        observations = _search(hub, f"Observation?subject=Patient/{patient[0]['id']}")
        assert len(observations) == 5
        encounter = _search(hub, f"Encounter?subject=Patient/{patient[0]['id']}")[0]
        assert {o["encounter"]["reference"] for o in observations} == {f"Encounter/{encounter['id']}"}
        since = poller.cursor()["bulk"]["since"]
        assert since and "job" not in poller.cursor()["bulk"]

        assert poller.poll_once() == 0  # `_since` the last export: nothing changed

        changed = visit["observations"][2]
        stored = facility.client.get(changed).json()
        stored["valueQuantity"]["value"] = 33
        assert facility.client.put(changed, json=stored, headers=FHIR_JSON).status_code == 200
        assert poller.poll_once() == 1
        _process(hub)
        after = _search(hub, f"Observation?identifier={_origin(source, changed)}")
        assert len(after) == 1 and after[0]["valueQuantity"]["value"] == 33
        assert len(_search(hub, f"Observation?subject=Patient/{patient[0]['id']}")) == 5


def test_bulk_resumes_mid_file_after_a_restart(hub: LiveServer, facility: Facility) -> None:
    cccd = _cccd()
    facility.load_visit(cccd, observations=6)
    source = _source(hub, facility, page_size=2, bulk=True)
    file_reads = 0

    def drop_first_observation_file(method: str, path: str) -> Action:
        nonlocal file_reads
        if "$export-file" in path and path.endswith("Observation.ndjson"):
            file_reads += 1
            if file_reads == 1:
                return "drop"
        return None

    facility.proxy.plan = drop_first_observation_file
    with Poller(hub.engine, source) as poller, pytest.raises(Transient):
        poller.poll_once()
    job = Poller(hub.engine, source).cursor()["bulk"]["job"]
    assert job["file"] == 2 and job["line"] == 0  # Patient and Encounter files done
    with Poller(hub.engine, source) as restarted:
        assert restarted.poll_once() == 3
        kick_offs = [r for r in facility.proxy.requests if "/$export?" in r]
        assert len(kick_offs) == 1  # the same job went on
    pulled = _pulled_ids(hub, source)
    assert len(pulled) == len(set(pulled)) == 1 + 1 + 6
    _process(hub)
    patient = _search(hub, f"Patient?identifier={CCCD}|{cccd}")
    assert len(_search(hub, f"Observation?subject=Patient/{patient[0]['id']}")) == 6


def test_bulk_job_still_running_is_taken_up_by_the_next_poll(hub: LiveServer, facility: Facility) -> None:
    cccd = _cccd()
    facility.load_visit(cccd, observations=1)
    # A poll waits this long for the export; the facility says "still running" once.
    source = _source(hub, facility, bulk=True, bulk_wait_seconds=0)
    busy = ["busy"]
    facility.proxy.plan = lambda method, path: busy.pop() if "$export-status" in path and busy else None
    with Poller(hub.engine, source) as poller:
        assert poller.poll_once() == 0
        job = poller.cursor()["bulk"]["job"]
        assert job["file"] == 0
        with facility.server.client(facility.token) as puller:  # the job is its requester's
            _wait_for(lambda: puller.get(job["status"]).status_code == 200)
        assert poller.poll_once() == 3  # the same job, finished meanwhile
        assert len([r for r in facility.proxy.requests if "/$export?" in r]) == 1
    _process(hub)
    assert len(_search(hub, f"Patient?identifier={CCCD}|{cccd}")) == 1


def test_client_credentials_token_is_fetched_and_renewed(hub: LiveServer, facility: Facility) -> None:
    cccd = _cccd()
    facility.load_visit(cccd, observations=1)
    make_token(facility.server, role=Role.SERVICE, username="his-pull", password="a-long-client-secret-1")
    source = _source(
        hub,
        facility,
        bulk=False,
        token=None,
        token_url=f"http://127.0.0.1:{facility.proxy.port}/auth/token",
        client_id="his-pull",
        client_secret="a-long-client-secret-1",
    )
    with Poller(hub.engine, source) as poller:
        assert poller.poll_once() == 3
        grants = [r for r in facility.proxy.requests if r.startswith("POST /auth/token")]
        assert len(grants) == 1  # one token for the whole poll
        facility.load_visit(_cccd(), observations=1)
        poller._token = "revoked"  # the facility no longer accepts the token it gave
        assert poller.poll_once() == 3
        assert len([r for r in facility.proxy.requests if r.startswith("POST /auth/token")]) == 2


def test_a_replaced_source_is_pulled_with_its_new_settings(hub: LiveServer, facility: Facility) -> None:
    """The intake keeps a Poller per source; replacing the source (a new token here) gives
    it a fresh one, which reads the secret back from its sealed storage."""
    cccd = _cccd()
    facility.load_visit(cccd, observations=1)
    source = _source(hub, facility, bulk=False, token="not-the-facilitys-token")
    intake = Intake(hub.engine)
    intake.poll(force=True)  # refused (401): logged, the other sources go on
    first = intake._pollers[source.name]
    assert _rows(hub, source) == []
    fixed = _replace(hub, source, token=facility.token)
    assert intake.poll(force=True) >= 3  # Patient, Encounter and Observation pages
    assert intake._pollers[source.name] is not first and intake._pollers[source.name].source == fixed
    assert len(_rows(hub, source)) == 3
    _process(hub)
    assert len(_search(hub, f"Patient?identifier={CCCD}|{cccd}")) == 1


# --- the format on its own -----------------------------------------------------------------------

_SOURCE = Source(
    "fac-x",
    "64001",
    "x",
    "provincial",
    "fhir-pull",
    {"base_url": "http://fac.example/fhir", "types": ["Encounter", "Observation"]},
)


def test_map_skips_what_the_hub_does_not_take_and_links_what_it_cannot_reach() -> None:
    resources = [
        {"resourceType": "AuditEvent", "id": "a1"},
        {"resourceType": "Consent", "id": "c1"},
        {
            "resourceType": "Observation",
            "id": "o1",
            "meta": {
                "versionId": "4",
                "lastUpdated": "2026-01-01T00:00:00Z",
                "security": [{"system": "s", "code": "R"}],
            },
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "http://fac.example/fhir/Patient/p1"},
            "encounter": {"reference": "Encounter/e1/_history/2"},
            "hasMember": [{"reference": "Observation/o2", "display": "later"}],
            "performer": [{"reference": "Practitioner/d1"}],
            "specimen": {"reference": "https://elsewhere.example/fhir/Specimen/s1"},
        },
    ]
    raw = orjson.dumps(
        {
            "kind": "page",
            "url": "http://fac.example/fhir/Observation",
            "type": "Observation",
            "order": "k",
            "resources": resources,
        }
    )
    (mapped,) = FORMAT.map(raw, _SOURCE)
    assert mapped.patients == [] and len(mapped.entries) == 1
    assert [w.split(" ")[0] for w in mapped.warnings] == ["AuditEvent/a1", "Consent/c1"]
    entry = mapped.entries[0]
    origin = facility_system("fhir-id", "64001")
    assert entry["request"] == {"method": "PUT", "url": f"Observation?identifier={origin}|Observation/o1"}
    content = entry["resource"]
    assert "id" not in content and content["meta"] == {"security": [{"system": "s", "code": "R"}]}
    assert content["identifier"] == [{"system": origin, "value": "Observation/o1"}]
    assert content["subject"] == {"reference": f"Patient?identifier={facility_system('mrn', '64001')}|p1"}
    assert content["encounter"] == {
        "reference": f"Encounter?identifier={origin}|Encounter/e1"
    }  # pulled before
    # Observation/o2 may come on a later page, Practitioner is not pulled: logical references.
    assert content["hasMember"] == [
        {
            "display": "later",
            "type": "Observation",
            "identifier": {"system": origin, "value": "Observation/o2"},
        }
    ]
    assert content["performer"] == [
        {"type": "Practitioner", "identifier": {"system": origin, "value": "Practitioner/d1"}}
    ]
    assert content["specimen"] == {
        "reference": "https://elsewhere.example/fhir/Specimen/s1"
    }  # another server's


def test_map_drops_identifiers_of_other_facilities_and_conditional_references() -> None:
    """A facility's server speaks for that facility only: identifiers in another facility's
    namespace (its MRN, its filler numbers) never reach resolution or a conditional update,
    and a conditional reference in the content is not searched in the hub's whole record."""
    other_mrn = {"system": facility_system("mrn", "64999"), "value": "B-1"}
    own_mrn = {"system": facility_system("mrn", "64001"), "value": "A-1"}
    cccd = {"system": CCCD, "value": "064075001234"}
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [other_mrn, own_mrn, cccd]}
    page = orjson.dumps(
        {"kind": "page", "url": "http://fac.example/fhir/Patient", "type": "Patient", "order": "k",
         "resources": [patient]}
    )  # fmt: skip
    (mapped,) = FORMAT.map(page, _SOURCE)
    (facts,) = mapped.patients
    assert facts.resource["identifier"] == [own_mrn, cccd, {"system": own_mrn["system"], "value": "p1"}]
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "identifier": [{"system": facility_system("filler", "64999"), "value": "F-1"}],
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient?identifier={other_mrn['system']}|B-1"},
    }
    page = orjson.dumps(
        {"kind": "page", "url": "http://fac.example/fhir/Observation", "type": "Observation", "order": "k",
         "resources": [observation]}
    )  # fmt: skip
    (mapped,) = FORMAT.map(page, _SOURCE)
    content = mapped.entries[0]["resource"]
    assert content["identifier"] == [
        {"system": facility_system("fhir-id", "64001"), "value": "Observation/o1"}
    ]
    assert "reference" not in content["subject"] and content["subject"]["display"]
    assert any("another facility" in w for w in mapped.warnings)
    assert any("conditional reference" in w for w in mapped.warnings)
    assert all("B-1" not in w and "F-1" not in w for w in mapped.warnings)  # no values in warnings


def test_pull_order_puts_targets_before_what_refers_to_them() -> None:
    assert pull_order(["Flag", "DiagnosticReport", "Observation", "Encounter"]) == [
        "Patient",
        "Encounter",
        "Observation",
        "DiagnosticReport",
        "Flag",
    ]


def test_peek_names_page_chunk_and_bundle_and_refuses_garbage() -> None:
    page = orjson.dumps(
        {
            "kind": "page",
            "url": "http://f/fhir/Patient?_count=2",
            "type": "Patient",
            "order": "o|1",
            "resources": [],
        }
    )
    assert FORMAT.peek(page).control_id == "http://f/fhir/Patient?_count=2"
    assert FORMAT.peek(page).ordering_key == "o|1"
    chunk = orjson.dumps(
        {"kind": "ndjson", "type": "Observation", "since": None, "offset": 40, "order": "o|1", "ndjson": ""}
    )
    assert FORMAT.peek(chunk).control_id == "ndjson:Observation:-:40"
    bundle = orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Patient",
                        "id": "p",
                        "identifier": [
                            {"system": "x", "value": "1"},
                            {"system": CCCD, "value": "064075001234"},
                        ],
                    }
                }
            ],
        }
    )
    assert FORMAT.peek(bundle).ordering_key == f"{CCCD}|064075001234"
    for garbage in (b"<xml/>", b"[1]", b'{"kind": "other"}'):
        with pytest.raises(Rejected):
            FORMAT.peek(garbage)
    bad_line = orjson.dumps(
        {
            "kind": "ndjson",
            "type": "Observation",
            "since": None,
            "offset": 0,
            "order": "o",
            "ndjson": '{"resourceType": "Observation", "id": "1"}\n{oops',
        }
    )
    with pytest.raises(Rejected, match="line 2"):
        FORMAT.map(bad_line, _SOURCE)
