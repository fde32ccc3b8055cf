"""Bulk Data $export over HTTP: kick-off, polling, manifest, NDJSON files, filters, Group, cancel.

Most tests run against their own fresh database so that whole-database exports can be
checked exactly; one runs on the shared server and narrows the export to its own data.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import LiveServer

from hub.settings import get_settings

CCCD = "https://ehealth-hub.vn/sid/cccd"
LOINC = "http://loinc.org"
HEART_RATE, RESP_RATE = "8867-4", "9279-1"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


@dataclass
class World:
    patients: dict[str, str] = field(default_factory=dict)  # "a" | "b" | "c" -> id
    by_type: dict[str, set[str]] = field(default_factory=dict)  # every live resource
    observations: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (patient key, code)
    encounters: dict[str, str] = field(default_factory=dict)  # id -> patient key
    group: str = ""
    deleted: str = ""


class Exports:
    """A client for one server that deletes every job it started when the test is over."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.jobs: list[str] = []

    def kick_off(
        self, path: str, params: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        response = self.client.get(path, params=params, headers=ASYNC if headers is None else headers)
        if response.status_code == 202:
            self.jobs.append(response.headers["Content-Location"])
        return response

    def run(self, path: str, params: Any = None) -> dict[str, Any]:
        """Kick off, poll until done (30 s at most), return the manifest."""
        response = self.kick_off(path, params)
        assert response.status_code == 202, response.text
        status_url = response.headers["Content-Location"]
        assert status_url.startswith(str(self.client.base_url).rstrip("/") + "/$export-status/")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.client.get(status_url)
            if status.status_code != 202:
                break
            assert status.headers["X-Progress"]
            time.sleep(0.05)
        else:
            raise AssertionError("the export did not finish within 30 s")
        assert status.status_code == 200, status.text
        assert status.headers["content-type"].startswith("application/json")
        return dict(status.json())

    def files(self, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Download every file of a manifest: type -> parsed resources (checking counts)."""
        result: dict[str, list[dict[str, Any]]] = {}
        for output in manifest["output"]:
            response = self.client.get(output["url"])
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/fhir+ndjson")
            lines = response.content.splitlines()
            resources = [orjson.loads(line) for line in lines]
            assert response.content.endswith(b"\n") and all(lines)
            assert len(resources) == output["count"]
            assert {r["resourceType"] for r in resources} == {output["type"]}
            assert output["type"] not in result
            result[output["type"]] = resources
        return result

    def ids(self, path: str, params: Any = None) -> dict[str, set[str]]:
        files = self.files(self.run(path, params))
        return {t: {r["id"] for r in resources} for t, resources in files.items()}

    def close(self) -> None:
        for status_url in self.jobs:
            self.client.delete(status_url)


def _post(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post(f"/{body['resourceType']}", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _build(client: httpx.Client) -> World:
    w = World()
    practitioner = _post(client, {"resourceType": "Practitioner", "name": [{"family": "Nguyễn"}]})
    w.by_type["Practitioner"] = {practitioner}
    for key in ("a", "b", "c"):
        patient = _post(client, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": key}]})
        w.patients[key] = patient
        encounter = _post(
            client,
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": f"Patient/{patient}"},
                "participant": [{"individual": {"reference": f"Practitioner/{practitioner}"}}],
            },
        )
        w.encounters[encounter] = key
        for code in (HEART_RATE, RESP_RATE) if key == "a" else (HEART_RATE,):
            observation = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/{patient}"},
                "encounter": {"reference": f"Encounter/{encounter}"},
            }
            w.observations[_post(client, observation)] = (key, code)
    w.deleted = _post(
        client,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "gone"},
            "subject": {"reference": f"Patient/{w.patients['a']}"},
        },
    )
    assert client.delete(f"/Observation/{w.deleted}").status_code == 204
    w.group = _post(
        client,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{w.patients[k]}"}} for k in ("a", "b")],
        },
    )
    w.by_type.update(
        Patient=set(w.patients.values()),
        Encounter=set(w.encounters),
        Observation=set(w.observations),
        Group={w.group},
    )
    return w


@pytest.fixture(scope="module")
def hub(fresh_database_url: Any) -> Iterator[tuple[Exports, World]]:
    with (
        LiveServer(fresh_database_url("export")) as server,
        server.admin_client() as client,
    ):
        exports = Exports(client)
        world = _build(client)
        yield exports, world
        exports.close()


@pytest.fixture()
def shared_exports(http: httpx.Client) -> Iterator[Exports]:
    exports = Exports(http)
    yield exports
    exports.close()


def _observations(w: World, *, keys: str = "abc", code: str | None = None) -> set[str]:
    return {i for i, (k, c) in w.observations.items() if k in keys and (code is None or c == code)}


def test_system_export_writes_every_type(hub: tuple[Exports, World]) -> None:
    exports, w = hub
    manifest = exports.run("/$export")
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["request"] == str(exports.client.base_url).rstrip("/") + "/$export"
    assert manifest["transactionTime"].endswith("Z")
    assert [o["type"] for o in manifest["output"]] == sorted(w.by_type)
    assert {o["type"]: o["count"] for o in manifest["output"]} == {t: len(i) for t, i in w.by_type.items()}
    files = exports.files(manifest)
    assert {t: {r["id"] for r in rs} for t, rs in files.items()} == w.by_type
    assert w.deleted not in {r["id"] for r in files["Observation"]}


def test_type_and_type_filter(hub: tuple[Exports, World]) -> None:
    exports, w = hub
    heart = f"Observation?code={LOINC}|{HEART_RATE}"
    ids = exports.ids("/$export", {"_type": "Observation,Patient", "_typeFilter": heart})
    assert ids == {"Observation": _observations(w, code=HEART_RATE), "Patient": w.by_type["Patient"]}
    # Several filters for one type are ORed, whether comma-separated or repeated.
    resp = f"Observation?code={LOINC}|{RESP_RATE}"
    of_c = f"Observation?subject=Patient/{w.patients['c']}"
    expected = {"Observation": _observations(w, code=RESP_RATE) | _observations(w, keys="c")}
    assert exports.ids("/$export", {"_type": "Observation", "_typeFilter": f"{resp},{of_c}"}) == expected
    repeated = [("_type", "Observation"), ("_typeFilter", resp), ("_typeFilter", of_c)]
    assert exports.ids("/$export", repeated) == expected
    # Criteria that match nothing: no file at all.
    assert (
        exports.run("/$export", {"_type": "Observation", "_typeFilter": "Observation?code=none"})["output"]
        == []
    )
    bad = exports.kick_off("/$export", {"_typeFilter": "Observation?no-such-param=1"})
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    outside = exports.kick_off("/$export", {"_type": "Patient", "_typeFilter": heart})
    assert outside.status_code == 400


def test_since(hub: tuple[Exports, World]) -> None:
    exports, w = hub
    time.sleep(0.01)  # lastUpdated has millisecond precision
    target = sorted(_observations(w, keys="b"))[0]
    observation = exports.client.get(f"/Observation/{target}").json()
    observation["status"] = "amended"
    updated = exports.client.put(f"/Observation/{target}", json=observation)
    assert updated.status_code == 200, updated.text
    stamp = updated.json()["meta"]["lastUpdated"]
    assert exports.ids("/$export", {"_since": stamp}) == {"Observation": {target}}
    assert exports.ids("/Patient/$export", {"_since": stamp, "_type": "Observation,Patient"}) == {
        "Observation": {target}
    }
    assert exports.kick_off("/$export", {"_since": "not-a-date"}).status_code == 400


def test_patient_export_is_the_compartment_of_all_patients(hub: tuple[Exports, World]) -> None:
    exports, w = hub
    ids = exports.ids("/Patient/$export")
    assert ids == {t: i for t, i in w.by_type.items() if t != "Practitioner"}
    assert exports.ids("/Patient/$export", {"_type": "Encounter"}) == {"Encounter": w.by_type["Encounter"]}
    refused = exports.kick_off("/Patient/$export", {"_type": "Practitioner"})
    assert refused.status_code == 400 and refused.json()["resourceType"] == "OperationOutcome"


def test_group_export_holds_only_members_data(hub: tuple[Exports, World]) -> None:
    exports, w = hub
    ids = exports.ids(f"/Group/{w.group}/$export")
    assert ids == {
        "Patient": {w.patients["a"], w.patients["b"]},
        "Encounter": {e for e, k in w.encounters.items() if k in "ab"},
        "Observation": _observations(w, keys="ab"),
        "Group": {w.group},
    }
    heart = exports.ids(
        f"/Group/{w.group}/$export",
        {"_type": "Observation", "_typeFilter": f"Observation?code={LOINC}|{HEART_RATE}"},
    )
    assert heart == {"Observation": _observations(w, keys="ab", code=HEART_RATE)}
    assert exports.kick_off(f"/Group/{uuid.uuid4()}/$export").status_code == 404


def test_kick_off_errors(hub: tuple[Exports, World]) -> None:
    exports, _ = hub
    no_async = exports.kick_off("/$export", headers={"Accept": "application/fhir+json"})
    assert no_async.status_code == 400 and no_async.json()["resourceType"] == "OperationOutcome"
    assert exports.kick_off("/$export", {"_outputFormat": "text/csv"}).status_code == 400
    assert exports.kick_off("/$export", {"includeAssociatedData": "x"}).status_code == 400
    assert exports.kick_off("/$export", {"_type": "NotAType"}).status_code == 400
    for output_format in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        assert (
            exports.kick_off("/$export", {"_outputFormat": output_format, "_type": "Group"}).status_code
            == 202
        )
    assert exports.client.get(f"/$export-status/{uuid.uuid4().hex}").status_code == 404
    assert exports.client.delete(f"/$export-status/{uuid.uuid4().hex}").status_code == 404


def test_cancel_removes_the_job_and_its_files(hub: tuple[Exports, World]) -> None:
    exports, _ = hub
    started = exports.kick_off("/$export")
    assert started.status_code == 202
    status_url = started.headers["Content-Location"]
    cancelled = exports.client.delete(status_url)
    assert cancelled.status_code == 202
    assert exports.client.get(status_url).status_code == 404
    assert exports.client.delete(status_url).status_code == 404

    manifest = exports.run("/$export", {"_type": "Patient"})
    status_url = exports.jobs[-1]
    file_url = manifest["output"][0]["url"]
    assert exports.client.get(file_url).status_code == 200
    job_dir = Path(get_settings().export_dir) / status_url.rsplit("/", 1)[1]
    assert (job_dir / "Patient.ndjson").is_file()
    assert exports.client.delete(status_url).status_code == 202
    assert exports.client.get(status_url).status_code == 404
    assert exports.client.get(file_url).status_code == 404
    assert not job_dir.exists()


def test_files_are_only_those_of_the_manifest(hub: tuple[Exports, World]) -> None:
    exports, _ = hub
    manifest = exports.run("/$export", {"_type": "Patient"})
    job = exports.jobs[-1].rsplit("/", 1)[1]
    assert exports.client.get(f"/$export-file/{job}/Observation.ndjson").status_code == 404
    assert exports.client.get(f"/$export-file/{job}/..%2F..%2Fhub.sqlite3").status_code == 404
    assert exports.client.get(f"/$export-file/{uuid.uuid4().hex}/Patient.ndjson").status_code == 404
    assert manifest["output"][0]["url"].endswith(f"/$export-file/{job}/Patient.ndjson")


def test_shared_database_export_narrowed_to_own_patient(
    http: httpx.Client, shared_exports: Exports, uid: str
) -> None:
    patient = _post(http, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": f"x{uid}"}]})
    ids = shared_exports.ids(
        "/$export", {"_type": "Patient", "_typeFilter": f"Patient?identifier={CCCD}|x{uid}"}
    )
    assert ids == {"Patient": {patient}}


# --- private files, deletion and expiry (issue 8, defect 22) -------------------------------


@pytest.fixture(scope="module")
def export_database(fresh_database_url: Any) -> str:
    url: str = fresh_database_url("export_private")
    return url


def _export_patient(client: httpx.Client) -> Exports:
    _post(client, {"resourceType": "Patient", "identifier": [{"system": CCCD, "value": uuid.uuid4().hex}]})
    return Exports(client)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_export_files_are_private_and_deleted_with_the_job(export_database: str, tmp_path: Path) -> None:
    root = tmp_path / "exports"
    previous = os.umask(0o022)  # the usual umask: without care, 0644 files in 0755 folders
    try:
        with LiveServer(export_database, export_dir=root) as server, server.admin_client() as client:
            exports = _export_patient(client)
            manifest = exports.run("/$export", {"_type": "Patient"})
            status_url = exports.jobs[-1]
            job_dir = root / status_url.rsplit("/", 1)[1]
            files = list(job_dir.iterdir())
            assert [f.name for f in files] == ["Patient.ndjson"]
            assert _mode(root) == 0o700 and _mode(job_dir) == 0o700
            assert _mode(files[0]) == 0o600
            file_url = manifest["output"][0]["url"]
            assert client.get(file_url).status_code == 200
            # DELETE on the status URL removes the job's files at once.
            assert client.delete(status_url).status_code == 202
            assert not job_dir.exists()
            assert client.get(file_url).status_code == 404
            assert client.get(status_url).status_code == 404
    finally:
        os.umask(previous)


def test_expired_exports_answer_410_and_their_files_are_removed(export_database: str, tmp_path: Path) -> None:
    root = tmp_path / "exports"
    retention_seconds = 3.0
    settings = {"export_dir": root, "export_retention_hours": retention_seconds / 3600}
    with LiveServer(export_database, **settings) as server, server.admin_client() as client:
        exports = _export_patient(client)
        jobs = []
        for _ in range(3):
            manifest = exports.run("/$export", {"_type": "Patient"})
            status_url = exports.jobs[-1]
            jobs.append((status_url, manifest["output"][0]["url"], root / status_url.rsplit("/", 1)[1]))
        assert all(directory.is_dir() for _, _, directory in jobs)
        time.sleep(retention_seconds + 0.5)
        # Asked for a file of an expired job: 410, the files go; then the job is unknown.
        status_url, file_url, directory = jobs[0]
        gone = client.get(file_url)
        assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
        assert not directory.exists()
        assert client.get(status_url).status_code == 404
        # Polled after expiry: 410 with an OperationOutcome, files removed, then 404.
        status_url, file_url, directory = jobs[1]
        expired = client.get(status_url)
        assert expired.status_code == 410 and "expired" in expired.json()["issue"][0]["diagnostics"]
        assert not directory.exists()
        assert client.get(status_url).status_code == 404
        assert client.get(file_url).status_code == 404
    # Never asked about again: removed by the sweep when the server starts.
    status_url, file_url, directory = jobs[2]
    assert directory.is_dir()
    with LiveServer(export_database, **settings) as server, server.admin_client() as client:
        assert not directory.exists()
        assert client.get(status_url.replace(str(exports.client.base_url).rstrip("/"), "")).status_code == 404
