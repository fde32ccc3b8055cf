"""`hub demo` and `hub serve` as a newcomer runs them: real processes, real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import REPO, _free_port, auth_env

from consent.context import system_access
from hub.app_factory import build_router
from hub.ingest.pipeline import Importer
from hub.settings import Settings

HUB = str(Path(sys.executable).parent / "hub")


def test_demo_loads_once_and_serve_answers(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("demo")
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": url, "BASE_URL": f"http://127.0.0.1:{port}/fhir", **auth_env()}
    first = subprocess.run(
        [HUB, "demo", "--no-serve"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert "No errors" in first.stdout
    assert "demo-hub-admin" in first.stdout and "vn-demo-practitioner-1" in first.stdout
    second = subprocess.run(
        [HUB, "demo", "--no-serve"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert "already loaded" in second.stdout
    assert "demo-clinician" in second.stdout  # the accounts are listed again, not added twice

    server = subprocess.Popen(
        [HUB, "serve", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/metadata").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "hub serve did not answer"
            time.sleep(0.2)
        assert httpx.get(f"{base}/Patient").status_code == 401
        # The demo accounts log in with the printed passwords.
        login = httpx.post(
            f"http://127.0.0.1:{port}/auth/token",
            data={"grant_type": "password", "username": "admin", "password": "demo-hub-admin"},
        )
        assert login.status_code == 200, login.text
        auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
        doctor = httpx.post(
            f"http://127.0.0.1:{port}/auth/token",
            data={"grant_type": "password", "username": "bs.tuan", "password": "demo-clinician"},
        ).json()
        assert doctor["fhirUser"] == "Practitioner/vn-demo-practitioner-1"
        # Vietnamese names are found without accents; citizens by CCCD.
        by_name = httpx.get(f"{base}/Patient", params={"name": "nguyen thi"}, headers=auth).json()
        assert [e["resource"]["id"] for e in by_name["entry"]] == ["vn-demo-patient-1"]
        by_cccd = httpx.get(
            f"{base}/Patient",
            params={"identifier": "https://ehealth-hub.vn/sid/cccd|064075009876"},
            headers=auth,
        )
        assert by_cccd.json()["entry"][0]["resource"]["name"][0]["family"] == "Trần"
        observations = httpx.get(
            f"{base}/Observation", params={"patient": "vn-demo-patient-2", "_total": "accurate"}, headers=auth
        ).json()
        assert observations["total"] == 4  # blood pressure, weight, PHQ-9, cholesterol
        # The clinician of the commune station treats patient 2 (managing organization), but
        # the PHQ-9 score is mental-health data: it needs the patient's explicit consent.
        as_doctor = {"Authorization": f"Bearer {doctor['access_token']}"}
        seen = httpx.get(
            f"{base}/Observation",
            params={"patient": "vn-demo-patient-2", "_total": "accurate"},
            headers=as_doctor,
        ).json()
        assert seen["total"] == 3
        assert "vn-demo-phq9-2" not in {e["resource"]["id"] for e in seen["entry"]}
        # Patient 4 is the provincial hospital's: not the commune doctor's to read...
        assert httpx.get(f"{base}/Patient/vn-demo-patient-4", headers=as_doctor).status_code == 404
        # ...unless they break the glass, which the patient sees in their access log.
        emergency = {**as_doctor, "X-Break-Glass-Reason": "unconscious on arrival, no relatives"}
        assert httpx.get(f"{base}/Patient/vn-demo-patient-4", headers=emergency).status_code == 200
        # The husband (proxy) sees his wife's record.
        proxy = httpx.post(
            f"http://127.0.0.1:{port}/auth/token",
            data={"grant_type": "password", "username": "proxy", "password": "demo-proxy"},
        ).json()
        as_proxy = {"Authorization": f"Bearer {proxy['access_token']}"}
        mine = httpx.get(f"{base}/Observation", headers=as_proxy).json()
        assert {e["resource"]["subject"]["reference"] for e in mine["entry"]} == {"Patient/vn-demo-patient-1"}
        alerts = httpx.get(
            f"http://127.0.0.1:{port}/access/break-glass",
            headers={
                "Authorization": "Bearer "
                + httpx.post(
                    f"http://127.0.0.1:{port}/auth/token",
                    data={
                        "grant_type": "password",
                        "username": "qtv.iakrai",
                        "password": "demo-facility-admin",
                    },
                ).json()["access_token"]
            },
        ).json()
        assert [a["patient"] for a in alerts] == ["Patient/vn-demo-patient-4"]
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_demo_reloads_a_database_holding_an_older_demo_file(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A database loaded from an earlier, thinner vn-demo.json (it has Hoa and Dr Tuấn, not the
    newer resources) gets the current file on the next `hub demo`, instead of "already loaded"."""
    url = fresh_database_url("demo_old")
    bundle = json.loads((REPO / "demo" / "vn-demo.json").read_text(encoding="utf-8"))
    wanted = {"Patient/vn-demo-patient-1", "Practitioner/vn-demo-practitioner-1"}
    # The first demo file's sentinels, and the Organizations they reference.
    old = [
        e
        for e in bundle["entry"]
        if e["request"]["url"] in wanted or e["resource"]["resourceType"] == "Organization"
    ]
    path = tmp_path / "old-demo.json"
    path.write_text(json.dumps({**bundle, "entry": old}), encoding="utf-8")
    router = build_router(Settings(database_url=url))
    with system_access("test-old-demo"):
        assert Importer(router, workers=1).run([path]).errors == []
    router.ctx.store.engine.dispose()
    env = {**os.environ, "DATABASE_URL": url, **auth_env()}
    again = subprocess.run(
        [HUB, "demo", "--no-serve"], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "already loaded" not in again.stdout
    assert "No errors" in again.stdout and "DocumentReference" in again.stdout
