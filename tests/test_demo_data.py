"""The demo world (demo/vn-demo.json) as the pages show it: who sees what of Nguyễn Thị Hoa.

Loads the demo folder as `hub demo` does (the Importer under a named system access, then the demo
accounts of hub.cli), twice, serves it with a real uvicorn server and logs in with the demo
accounts' passwords (real tokens from /auth/token). Checks that the file is valid and idempotent,
that the station doctor sees Hoa's visits at all three facilities, that the An Khê doctor sees
nothing of her, that Hoa sees her own sensitive condition while the proxy and the doctors do not,
and that the committed JSON is what demo/build_vn_demo.py writes.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import REPO, LiveServer

from consent.context import system_access
from hub.app_factory import build_router
from hub.cli import DEMO_DIR, DEMO_USERS, _demo_users
from hub.ingest.pipeline import Importer, ImportReport
from hub.settings import Settings

HOA = "vn-demo-patient-1"
CHILD = "vn-demo-patient-5"
STATION = "Organization/vn-demo-org-tyt-iakrai"
DISTRICT = "Organization/vn-demo-org-ttyt-iagrai"
PROVINCIAL = "Organization/vn-demo-org-bvdk-gialai"
SENSITIVE = {"Condition/vn-demo-hoa-cond-psy", "Observation/vn-demo-hoa-phq9"}
# The types of Hoa's record in the demo file, each searchable by `patient`.
RECORD_TYPES = (
    "Encounter",
    "Observation",
    "Condition",
    "Procedure",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "CarePlan",
    "DocumentReference",
    "ImagingStudy",
    "DiagnosticReport",
)
DEMO_FILE = DEMO_DIR / "vn-demo.json"


class DemoHub:
    def __init__(self, server: LiveServer, reports: list[ImportReport]) -> None:
        self.server = server
        self.reports = reports
        self.root = server.base.removesuffix("/fhir")

    def login(self, username: str) -> httpx.Client:
        role = next(u[1] for u in DEMO_USERS if u[0] == username)
        answer = httpx.post(
            f"{self.root}/auth/token",
            data={"grant_type": "password", "username": username, "password": f"demo-{role}"},
        )
        assert answer.status_code == 200, answer.text
        return self.server.client(answer.json()["access_token"])


@pytest.fixture(scope="module")
def demo(fresh_database_url) -> Iterator[DemoHub]:  # type: ignore[no-untyped-def]
    url = fresh_database_url("demodata")
    router = build_router(Settings(database_url=url))
    reports = []
    for _ in range(2):  # loadable twice: the second load must change nothing
        with system_access("test-demo"):
            reports.append(Importer(router, workers=1).run([DEMO_DIR]))
    with system_access("test-demo-users"):
        _demo_users(router.ctx.store.engine)
    router.ctx.store.engine.dispose()
    with LiveServer(url) as server:
        yield DemoHub(server, reports)


def ids(client: httpx.Client, res_type: str, **params: str) -> set[str]:
    answer = client.get(f"/{res_type}", params={"_count": "500", **params})
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert not any(link["relation"] == "next" for link in bundle.get("link", []))
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])}


def record(client: httpx.Client, patient: str = HOA) -> set[str]:
    found: set[str] = set()
    for res_type in RECORD_TYPES:
        found |= ids(client, res_type, patient=patient)
    return found


def encounters(client: httpx.Client, patient: str = HOA) -> list[dict[str, Any]]:
    answer = client.get("/Encounter", params={"patient": patient, "_count": "500"})
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def test_committed_json_is_what_the_script_writes() -> None:
    spec = importlib.util.spec_from_file_location("build_vn_demo", REPO / "demo" / "build_vn_demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds the entries; main() (writing the file) is not called
    assert module.bundle() == json.loads(DEMO_FILE.read_text(encoding="utf-8"))


def test_every_resource_validates_and_a_second_load_changes_nothing(demo: DemoHub) -> None:
    bundle = json.loads(DEMO_FILE.read_text(encoding="utf-8"))
    entries = bundle["entry"]
    assert all(
        e["request"]["method"] == "PUT" and e["resource"]["id"].startswith("vn-demo-") for e in entries
    )
    first, second = demo.reports
    assert first.errors == [] and first.rejected == 0
    assert second.errors == [] and second.rejected == 0
    with demo.server.admin_client() as admin:
        for entry in entries:
            url = entry["request"]["url"]
            answer = admin.get(f"/{url}")
            assert answer.status_code == 200, url
            assert answer.json()["meta"]["versionId"] == "1", f"{url} was rewritten by the second load"


def test_station_doctor_sees_hoa_at_all_three_facilities_but_not_the_sensitive_condition(
    demo: DemoHub,
) -> None:
    with demo.login("bs.tuan") as doctor, demo.server.admin_client() as admin:
        visits = encounters(doctor)
        assert len(visits) >= 10
        assert {v["serviceProvider"]["reference"] for v in visits} == {STATION, DISTRICT, PROVINCIAL}
        assert [v["class"]["code"] for v in visits].count("IMP") == 1  # the provincial admission
        # Everything of Hoa's record but the mental-health data (no consent names PSY).
        assert record(admin) - record(doctor) == SENSITIVE
        assert doctor.get("/Condition/vn-demo-hoa-cond-psy").status_code == 404
        # Trends: 8 or more HbA1c results, each with its reference range.
        hba1c = doctor.get("/Observation", params={"patient": HOA, "code": "http://loinc.org|4548-4"}).json()
        assert len(hba1c["entry"]) >= 8
        assert all(e["resource"]["referenceRange"][0]["high"]["value"] == 5.6 for e in hba1c["entry"])


def test_provincial_doctor_sees_hoa_through_her_consent(demo: DemoHub) -> None:
    with demo.login("bs.ha") as doctor:
        assert doctor.get(f"/Patient/{HOA}").status_code == 200
        assert len(encounters(doctor)) >= 10
        assert doctor.get("/Observation/vn-demo-hoa-phq9").status_code == 404


def test_other_hospital_doctor_sees_nothing_of_hoa(demo: DemoHub) -> None:
    with demo.login("bs.khanh") as doctor:
        assert doctor.get(f"/Patient/{HOA}").status_code == 404
        assert doctor.get("/Encounter/vn-demo-hoa-enc-07").status_code == 404
        assert record(doctor) == set()
        assert ids(doctor, "Patient", name="hoa") == set()
        assert ids(doctor, "Patient", identifier="https://ehealth-hub.vn/sid/cccd|064188001234") == set()


def test_hoa_sees_her_whole_record_including_the_sensitive_condition(demo: DemoHub) -> None:
    with demo.login("hoa.nguyen") as hoa, demo.server.admin_client() as admin:
        mine = record(hoa)
        assert mine >= SENSITIVE
        assert mine == record(admin)
        assert hoa.get("/Condition/vn-demo-hoa-cond-psy").status_code == 200


def test_husband_proxy_sees_hoas_ordinary_data_only(demo: DemoHub) -> None:
    with demo.login("proxy") as proxy, demo.server.admin_client() as admin:
        seen = record(proxy)
        assert len(seen) > 100
        assert record(admin) - seen == SENSITIVE
        assert proxy.get("/Condition/vn-demo-hoa-cond-psy").status_code == 404
        assert proxy.get("/Observation/vn-demo-hoa-phq9").status_code == 404
        assert proxy.get(f"/Patient/{CHILD}").status_code == 404  # his account represents Hoa only


def test_hoa_as_proxy_of_her_son_sees_his_record(demo: DemoHub) -> None:
    with demo.login("hoa.proxy") as mother:
        assert mother.get(f"/Patient/{CHILD}").status_code == 200
        assert len(ids(mother, "Immunization", patient=CHILD)) >= 5
        assert mother.get(f"/Patient/{HOA}").status_code == 404


def test_other_citizens_have_data_at_several_facilities(demo: DemoHub) -> None:
    with demo.server.admin_client() as admin:
        for patient in ("vn-demo-patient-2", "vn-demo-patient-3", "vn-demo-patient-4"):
            places = {v["serviceProvider"]["reference"] for v in encounters(admin, patient)}
            assert len(places) >= 2, patient
