"""hub.web.record (the integrated record's view model) and hub.web.finder (the patient search box).

The builders are pure: fed with the demo data (demo/vn-demo.json), the Synthea bundles of
../shared and resources made here, odd ones included. What touches the database
(``fetch_record``, the finder's searches) runs through the real router on the test backend.
"""

from __future__ import annotations

import json
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, make_token

from hub.auth.principal import Role
from hub.web import finder, record
from hub.web.finder import find_patients, parse_patient_query
from hub.web.record import (
    BHYT_SYSTEM,
    CCCD_SYSTEM,
    POINTS_CAP,
    address_text,
    age_on,
    build_record,
    build_trends,
    consent_lines,
    fetch_record,
    human_name,
    ref_key,
)

REPO = Path(__file__).resolve().parent.parent
SYNTHEA = REPO.parent / "shared" / "data" / "synthea" / "bundles_r4_small"
TODAY = date(2026, 12, 7)
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def _demo() -> list[dict[str, Any]]:
    bundle = json.loads((REPO / "demo" / "vn-demo.json").read_text(encoding="utf-8"))
    return [e["resource"] for e in bundle["entry"]]


def _resolved(path: Path) -> list[dict[str, Any]]:
    """A Synthea transaction bundle's resources with ``urn:uuid`` references turned into
    ``Type/id``, as the import writes them."""
    bundle = json.loads(path.read_text(encoding="utf-8"))
    names = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    text = json.dumps([e["resource"] for e in bundle["entry"]])
    for urn, literal in names.items():
        text = text.replace(f'"{urn}"', f'"{literal}"')
    resources: list[dict[str, Any]] = json.loads(text)
    return resources


def _split(resources: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    orgs = {r["id"]: r for r in resources if r["resourceType"] == "Organization"}
    practitioners = {r["id"]: r for r in resources if r["resourceType"] == "Practitioner"}
    return patient, orgs, practitioners


def _of(resources: list[dict[str, Any]], patient_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in resources
        if r.get("subject", {}).get("reference") == f"Patient/{patient_id}"
        or r.get("patient", {}).get("reference") == f"Patient/{patient_id}"
    ]


def test_small_readers() -> None:
    assert human_name([{"family": "Nguyễn", "given": ["Thị", "Hoa"]}]) == "Nguyễn Thị Hoa"
    assert (
        human_name([{"use": "old", "text": "Cũ"}, {"use": "official", "text": " Lê  Văn Minh "}])
        == "Lê Văn Minh"
    )
    assert human_name("nonsense") == "" and human_name([]) == ""
    assert (
        address_text([{"line": ["Thôn 1"], "district": "Ia Grai", "state": "Gia Lai"}])
        == "Thôn 1, Ia Grai, Gia Lai"
    )
    assert ref_key({"reference": "http://x/fhir/Organization/a/_history/2"}) == "Organization/a"
    assert ref_key({"reference": "#contained"}) == "" and ref_key(None) == ""
    assert age_on("1988-03-14", TODAY) == 38 and age_on("1988-12-08", TODAY) == 37
    assert age_on("1988", TODAY) == 38 and age_on("garbage", TODAY) is None


def test_demo_patient_header_timeline_and_blood_pressure() -> None:
    resources = _demo()
    patient = next(r for r in resources if r["id"] == "vn-demo-patient-1")
    orgs = {r["id"]: r for r in resources if r["resourceType"] == "Organization"}
    view = build_record(patient, [patient, *_of(resources, "vn-demo-patient-1")], orgs, {}, today=TODAY)
    header = view.header
    assert header.name == "Nguyễn Thị Hoa" and header.sex == "female" and header.age == 38
    assert header.cccd == next(i["value"] for i in patient["identifier"] if i["system"] == CCCD_SYSTEM)
    assert header.bhyt == next(i["value"] for i in patient["identifier"] if i["system"] == BHYT_SYSTEM)
    assert header.address.startswith("Thôn 1") and "Gia Lai" in header.address
    assert header.managing_facility == orgs["vn-demo-org-tyt-iakrai"]["name"]
    assert view.timeline, "the demo patient has an encounter"
    assert all(e.facility for e in view.timeline)
    assert view.timeline == sorted(view.timeline, key=lambda e: e.start, reverse=True)
    results = [i for e in view.timeline for i in e.items if i.kind == "result"]
    # The demo data grows (another helper enriches it): compare with what it holds.
    demo_bp = [r for r in _of(resources, "vn-demo-patient-1") if r.get("code", {}).get("text") == "Huyết áp"]
    systolic = {
        c["valueQuantity"]["value"]
        for r in demo_bp
        for c in r["component"]
        if c["code"]["coding"][0]["code"] == "8480-6"
    }
    shown = {q.value for i in results if i.text == "Huyết áp" for q in i.values}
    assert systolic <= shown
    trend = next(t for t in view.trends if t.key == "http://loinc.org|85354-9")
    assert {s.key for s in trend.series} == {"8480-6", "8462-4"}
    assert trend.category == "vital-signs"


@pytest.mark.parametrize("path", sorted(SYNTHEA.glob("*.json"))[:6], ids=lambda p: p.name[:20])
def test_synthea_record(path: Path) -> None:
    resources = _resolved(path)
    patient, orgs, practitioners = _split(resources)
    view = build_record(patient, resources, orgs, practitioners, today=TODAY)
    encounters = [r for r in resources if r["resourceType"] == "Encounter"]
    assert len(view.timeline) == len(encounters)
    starts = [e.start for e in view.timeline]
    assert starts == sorted(starts, reverse=True)
    assert all(e.facility for e in view.timeline), "every Synthea encounter names its provider"
    # Every Observation with an encounter is in that encounter, once.
    placed = [i.id for e in view.timeline for i in e.items if i.resource_type == "Observation"]
    linked = [r["id"] for r in resources if r["resourceType"] == "Observation" and "encounter" in r]
    assert sorted(placed) == sorted(linked)
    assert view.header.name and view.header.birth_date
    assert len(view.immunizations) == sum(r["resourceType"] == "Immunization" for r in resources)
    bp = next(t for t in view.trends if t.key == "http://loinc.org|55284-4")
    assert {s.key for s in bp.series} == {"8480-6", "8462-4"}
    for series in bp.series:
        times = [p.time for p in series.points]
        assert times == sorted(times) and all(isinstance(p.value, float) for p in series.points)
    active = {
        r["id"]
        for r in resources
        if r["resourceType"] == "Condition" and r["clinicalStatus"]["coding"][0]["code"] == "active"
    }
    assert {e.id for e in view.header.problems} == active


def _obs(
    oid: str, when: str, value: float, low: float | None = None, high: float | None = None
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mmol/L"},
    }
    if low is not None or high is not None:
        obs["referenceRange"] = [{"low": {"value": low}, "high": {"value": high}}]
    return obs


def test_trend_reference_range_newest_and_order() -> None:
    trends = build_trends(
        [
            _obs("c", "2026-03-01", 7.2, 3.9, 6.4),
            _obs("a", "2025-01-01", 5.1, 4.0, 6.0),
            _obs("b", "2025-06-01", 6.0),
            {**_obs("x", "2026-04-01", 99), "status": "entered-in-error"},
            {**_obs("y", "2026-05-01", 1), "effectiveDateTime": None},  # no time: no point
        ]
    )
    assert len(trends) == 1 and trends[0].category == "laboratory"
    series = trends[0].series[0]
    assert [p.value for p in series.points] == [5.1, 6.0, 7.2]
    assert (series.low, series.high, series.unit) == (3.9, 6.4, "mmol/L")
    assert trends[0].times == ["2025-01-01", "2025-06-01", "2026-03-01"] and not trends[0].truncated
    many = build_trends(
        [_obs(f"m{i}", f"2020-01-01T00:{i // 60:02d}:{i % 60:02d}Z", i) for i in range(POINTS_CAP + 5)]
    )
    assert many[0].truncated and [p.value for p in many[0].series[0].points][:1] == [5.0]
    assert len(many[0].series[0].points) == POINTS_CAP


def test_odd_data_does_not_break_the_view() -> None:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": "p", "name": "oops", "address": [{}]}
    odd: list[Any] = [
        {"resourceType": "Encounter", "id": "e1"},  # no period, class, provider
        {"resourceType": "Encounter", "id": "e2", "period": "x", "class": "y", "serviceProvider": "z"},
        {"resourceType": "Observation", "id": "o1", "encounter": {"reference": "Encounter/e1"}},
        {"resourceType": "Observation", "id": "o2", "code": "x", "valueQuantity": {"value": "12"}},
        {"resourceType": "Condition", "id": "c1", "code": {"coding": "bad"}, "clinicalStatus": "active"},
        {"resourceType": "Immunization", "id": "i1", "vaccineCode": {"text": "BCG"}},
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "content": [{"attachment": {"title": "Giấy ra viện"}}],
        },
        {"resourceType": "ImagingStudy", "id": "s1", "series": [{"modality": {"code": "CT"}}]},
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active"},
        {"noType": True},
    ]
    view = build_record(patient, odd, {}, {}, today=TODAY)
    assert view.header.name == "" and view.header.age is None and view.header.address == ""
    assert {e.id for e in view.timeline} == {"e1", "e2"}
    assert [i.id for i in next(e for e in view.timeline if e.id == "e1").items] == ["o1"]
    assert view.trends == []  # "12" as a string is not a number
    assert [i.text for i in view.immunizations] == ["BCG"]
    assert view.documents[0].text == "Giấy ra viện" and view.documents[0].attachments == ["Giấy ra viện"]
    assert view.imaging[0].detail == "CT"
    assert [m.id for m in view.header.medications] == ["m1"]


def test_encounter_joins_diagnoses_procedures_reports_and_notes() -> None:
    patient = {"resourceType": "Patient", "id": "p", "managingOrganization": {"reference": "Organization/h"}}
    enc = {
        "resourceType": "Encounter",
        "id": "e",
        "period": {"start": "2026-10-01T08:00:00+07:00"},
        "serviceProvider": {"reference": "Organization/h"},
        "diagnosis": [{"condition": {"reference": "Condition/c"}}],
    }
    resources: list[dict[str, Any]] = [
        enc,
        {"resourceType": "Condition", "id": "c", "code": {"text": "Viêm phổi"}},  # linked only by Encounter
        {
            "resourceType": "Procedure",
            "id": "pr",
            "code": {"text": "Chụp X-quang"},
            "encounter": {"reference": "Encounter/e"},
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "dr",
            "code": {"text": "X-quang ngực"},
            "conclusion": "Mờ đáy phổi phải",
            "encounter": {"reference": "Encounter/e"},
        },
        {
            "resourceType": "DocumentReference",
            "id": "doc",
            "description": "Giấy ra viện",
            "context": {"encounter": [{"reference": "Encounter/e"}]},
        },
        {
            "resourceType": "Composition",
            "id": "comp",
            "title": "Tóm tắt",
            "encounter": {"reference": "Encounter/e"},
            "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
        },
        {
            "resourceType": "ClinicalImpression",
            "id": "ci",
            "summary": "Ổn định",
            "encounter": {"reference": "Encounter/e"},
        },
    ]
    orgs = {"h": {"resourceType": "Organization", "id": "h", "name": "Bệnh viện Đa khoa tỉnh"}}
    view = build_record(patient, resources, orgs, {}, today=TODAY)
    (encounter,) = view.timeline
    assert encounter.facility == "Bệnh viện Đa khoa tỉnh" and encounter.facility_id == "h"
    kinds = {i.id: i.kind for i in encounter.items}
    assert kinds == {
        "c": "diagnosis",
        "pr": "procedure",
        "dr": "report",
        "doc": "document",
        "comp": "document",
        "ci": "note",
    }
    assert next(i for i in encounter.items if i.id == "dr").detail == "Mờ đáy phổi phải"
    assert next(i for i in encounter.items if i.id == "comp").narrative is not None
    assert view.header.managing_facility == "Bệnh viện Đa khoa tỉnh"
    assert [p.id for p in view.header.problems] == ["c"]  # no clinicalStatus, no abatement: in force
    assert view.facilities == ["Bệnh viện Đa khoa tỉnh"] and view.unlinked == []


def test_consent_lines_name_the_reasons_for_this_reader() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "managingOrganization": {"reference": "Organization/tyt"},
        "generalPractitioner": [{"reference": "Practitioner/bs"}],
    }
    orgs = {
        "tyt": {"resourceType": "Organization", "id": "tyt", "name": "Trạm Y tế xã"},
        "bv": {"resourceType": "Organization", "id": "bv", "name": "Bệnh viện Đa khoa tỉnh"},
    }
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "k",
        "status": "active",
        "provision": {
            "type": "permit",
            "period": {"start": "2026-01-01", "end": "2027-12-31"},
            "actor": [{"reference": {"reference": "Organization/bv"}}],
            "purpose": [{"code": "TREAT"}],
            "provision": [
                {
                    "type": "deny",
                    "securityLabel": [{"code": "PSY"}],
                    "actor": [{"reference": {"reference": "Organization/bv"}}],
                }
            ],
        },
    }
    expired = {
        **consent,
        "id": "old",
        "provision": {**consent["provision"], "period": {"end": "2020-01-01"}, "provision": []},
    }
    inactive = {**consent, "id": "off", "status": "inactive"}
    hospital = consent_lines(
        patient,
        [consent, expired, inactive],
        orgs,
        {},
        reader_practitioner="Practitioner/x",
        reader_organizations=["bv"],
        today=TODAY,
    )
    assert [(line.basis, line.actor, line.end, line.labels) for line in hospital] == [
        ("consent-permit", "Bệnh viện Đa khoa tỉnh", "2027-12-31", []),
        ("consent-deny", "Bệnh viện Đa khoa tỉnh", "2027-12-31", ["PSY"]),
    ]
    station = consent_lines(
        patient,
        [consent],
        orgs,
        {},
        reader_practitioner="Practitioner/bs",
        reader_organizations=["tyt"],
        today=TODAY,
    )
    assert [line.basis for line in station] == ["managing", "gp"]
    assert station[0].actor == "Trạm Y tế xã"


# --------------------------------------------------------------------------- through the router


class HttpFhir:
    """The page's FHIR handle over the real API (same router, access decision, consent filter
    and audit), for the modules' database paths on both backends."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        params: list[tuple[str, str | int | float | bool | None]] = list(query or [])
        answer = self.client.request(method, f"/{path}", params=params, json=body, headers=headers or {})
        answer.status = answer.status_code  # type: ignore[attr-defined]
        answer.body = answer.content  # type: ignore[attr-defined]
        return answer

    def search(self, type_: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        query: list[tuple[str, str | int | float | bool | None]] = list(params)
        answer = self.client.get(f"/{type_}", params=query)
        assert answer.status_code == 200, answer.text
        bundle: dict[str, Any] = answer.json()
        return bundle

    def search_resources(self, type_: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.search(type_, params).get("entry", [])]


@pytest.fixture(scope="module")
def world(live_server: LiveServer) -> dict[str, Any]:
    """Three facilities, a station doctor, two citizens named alike (one managed elsewhere),
    encounters at each facility, blood pressure with a reference range, a diagnosis."""
    tag = uuid.uuid4().hex[:8]
    orgs = {"tyt": "Trạm Y tế xã", "ttyt": "Trung tâm Y tế huyện", "bv": "Bệnh viện Đa khoa tỉnh"}
    ids = {key: f"{key}-{tag}" for key in orgs}
    bodies: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": ids[k], "name": f"{v} {tag}"} for k, v in orgs.items()
    ]
    hoa, other = f"hoa-{tag}", f"hoa2-{tag}"
    word = f"x{tag}"  # a name word of this run only
    bodies += [
        {
            "resourceType": "Patient",
            "id": hoa,
            "name": [{"family": "Nguyễn", "given": ["Thị", "Hoà", word.upper()]}],
            "gender": "female",
            "birthDate": "1988-03-14",
            "identifier": [
                {"system": CCCD_SYSTEM, "value": f"0641{int(tag, 16) % 10**8:08d}"},
                {"system": BHYT_SYSTEM, "value": f"DN464{int(tag, 16) % 10**10:010d}"},
            ],
            "address": [{"line": ["Thôn 1"], "state": "Gia Lai"}],
            "managingOrganization": {"reference": f"Organization/{ids['tyt']}"},
        },
        {
            "resourceType": "Patient",
            "id": other,
            "name": [{"family": "Nguyễn", "given": ["Văn", "An", word]}],
            "birthDate": "1990-01-01",
            "managingOrganization": {"reference": f"Organization/{ids['bv']}"},
        },
    ]
    for number, key in enumerate(("tyt", "ttyt", "bv")):
        enc = f"enc-{key}-{tag}"
        bodies.append(
            {
                "resourceType": "Encounter",
                "id": enc,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": f"Patient/{hoa}"},
                "serviceProvider": {"reference": f"Organization/{ids[key]}"},
                "period": {"start": f"2026-0{number + 1}-10T08:00:00+07:00"},
            }
        )
        bodies.append(
            {
                "resourceType": "Observation",
                "id": f"bp-{key}-{tag}",
                "status": "final",
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}], "text": "Huyết áp"},
                "subject": {"reference": f"Patient/{hoa}"},
                "encounter": {"reference": f"Encounter/{enc}"},
                "effectiveDateTime": f"2026-0{number + 1}-10T08:10:00+07:00",
                "component": [
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                        "valueQuantity": {"value": 120 + 10 * number, "unit": "mmHg"},
                        "referenceRange": [{"low": {"value": 90}, "high": {"value": 139}}],
                    },
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                        "valueQuantity": {"value": 80, "unit": "mmHg"},
                    },
                ],
            }
        )
    bodies.append(
        {
            "resourceType": "Condition",
            "id": f"cond-{tag}",
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
            "code": {"text": "Tăng huyết áp"},
            "subject": {"reference": f"Patient/{hoa}"},
            "encounter": {"reference": f"Encounter/enc-bv-{tag}"},
        }
    )
    with live_server.admin_client() as admin:
        for body in bodies:
            answer = admin.put(f"/{body['resourceType']}/{body['id']}", json=body)
            assert answer.status_code in (200, 201), answer.text
    return {"tag": tag, "ids": ids, "hoa": hoa, "other": other, "word": word}


def _clinician(live_server: LiveServer, org: str) -> httpx.Client:
    token = make_token(
        live_server, role=Role.CLINICIAN, fhir_user=f"Practitioner/doc-{org}", organizations=[org]
    )
    return live_server.client(token)


def test_fetch_record_through_the_router(live_server: LiveServer, world: dict[str, Any]) -> None:
    with _clinician(live_server, world["ids"]["tyt"]) as client:
        fetched = fetch_record(HttpFhir(client), world["hoa"])
    assert fetched.status == 200 and fetched.patient is not None
    view = build_record(
        fetched.patient, fetched.resources, fetched.organizations, fetched.practitioners, today=TODAY
    )
    tag = world["tag"]
    assert view.facilities == [
        f"Bệnh viện Đa khoa tỉnh {tag}",
        f"Trung tâm Y tế huyện {tag}",
        f"Trạm Y tế xã {tag}",
    ]
    assert [i.text for i in view.timeline[0].of_kind("diagnosis")] == ["Tăng huyết áp"]
    bp = next(t for t in view.trends if t.key == "http://loinc.org|85354-9")
    systolic = next(s for s in bp.series if s.key == "8480-6")
    assert [p.value for p in systolic.points] == [120.0, 130.0, 140.0]
    assert (systolic.low, systolic.high) == (90.0, 139.0)
    assert view.header.managing_facility == f"Trạm Y tế xã {tag}"
    assert not fetched.observations_capped


def test_fetch_record_of_a_hidden_patient_is_not_found(
    live_server: LiveServer, world: dict[str, Any]
) -> None:
    outsider = f"elsewhere-{world['tag']}"
    with _clinician(live_server, outsider) as client:
        hidden = fetch_record(HttpFhir(client), world["hoa"])
        missing = fetch_record(HttpFhir(client), f"nobody-{world['tag']}")
    assert hidden.patient is None and hidden.resources == [] and hidden.status == 404
    assert missing.patient is None and missing.status == 404


def test_finder_queries(live_server: LiveServer, world: dict[str, Any]) -> None:
    tag, word = world["tag"], world["word"]
    with _clinician(live_server, world["ids"]["tyt"]) as client:
        fhir = HttpFhir(client)
        # Accent-free, case-free, any order; the other person (managed by the hospital) is not
        # visible to the station's doctor, so only Hoà is found.
        page = find_patients(fhir, f"{word} hoa NGUYEN thi", today=TODAY)
        assert [r.id for r in page.rows] == [world["hoa"]]
        row = page.rows[0]
        assert row.name == f"Nguyễn Thị Hoà {word.upper()}" and row.age == 38 and row.sex == "female"
        assert row.facilities[0] == f"Trạm Y tế xã {tag}"
        assert set(row.facilities) == {
            f"{n} {tag}" for n in ("Trạm Y tế xã", "Trung tâm Y tế huyện", "Bệnh viện Đa khoa tỉnh")
        }
        assert [r.id for r in find_patients(fhir, f"nguyen {word} 14/03/1988").rows] == [world["hoa"]]
        assert find_patients(fhir, f"nguyen {word} 1990").rows == []
        assert [r.id for r in find_patients(fhir, row.cccd).rows] == [world["hoa"]]
        assert [r.id for r in find_patients(fhir, row.bhyt.lower()).rows] == [world["hoa"]]
    with live_server.admin_client() as admin:  # an unrestricted reader sees both
        found = find_patients(HttpFhir(admin), f"nguyen {word}")
        assert {r.id for r in found.rows} == {world["hoa"], world["other"]}


def test_finder_pages(
    live_server: LiveServer, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finder, "PAGE_SIZE", 1)  # two people, one per page
    with live_server.admin_client() as admin:
        fhir = HttpFhir(admin)
        first = find_patients(fhir, f"nguyen {world['word']}")
        assert len(first.rows) == 1 and first.next_cursor
        second = find_patients(fhir, f"nguyen {world['word']}", cursor=first.next_cursor)
        assert len(second.rows) == 1 and {first.rows[0].id, second.rows[0].id} == {
            world["hoa"],
            world["other"],
        }


@pytest.mark.parametrize(
    ("text", "params"),
    [
        ("nguyen van an", [("name", "nguyen van an")]),
        ("064188001234", [("identifier", f"{CCCD_SYSTEM}|064188001234")]),
        ("dn4640123456789", [("identifier", f"{BHYT_SYSTEM}|DN4640123456789")]),
        ("14/03/1988", [("birthdate", "1988-03-14")]),
        ("1988-03-14", [("birthdate", "1988-03-14")]),
        ("nguyen hoa 1988", [("birthdate", "1988"), ("name", "nguyen hoa")]),
        ("Ksor H'Bia, 064188001234", [("identifier", f"{CCCD_SYSTEM}|064188001234"), ("name", "Ksor H'Bia")]),
        ("31/02/1988", []),
        ("   ", []),
    ],
)
def test_parse_patient_query(text: str, params: list[tuple[str, str]]) -> None:
    assert parse_patient_query(text) == params


def test_fetch_record_of_a_record_bigger_than_one_page(
    live_server: LiveServer, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the page size (here 10 for a record of 11), the record is read as its types without
    Observations plus the newest Observations, and the page says the list may be capped."""
    monkeypatch.setattr(record, "_RECORD_CAP", 10)
    with _clinician(live_server, world["ids"]["tyt"]) as client:
        fetched = fetch_record(HttpFhir(client), world["hoa"])
    assert fetched.patient is not None and fetched.observations_capped
    view = build_record(fetched.patient, fetched.resources, fetched.organizations, fetched.practitioners)
    assert len(view.timeline) == 3 and len(view.facilities) == 3
    bp = next(t for t in view.trends if t.key == "http://loinc.org|85354-9")
    assert [len(s.points) for s in bp.series] == [3, 3]


def _render_record(view: Any, locale: str) -> str:
    from markupsafe import Markup

    from hub.web import render

    context = {
        "user": None,
        "area": "clinician",
        "here": "/",
        "here_quoted": "%2F",
        "csrf_token": "t",
        "csrf_field": lambda: Markup(""),
        "other_locale": "en",
        "record": view,
        "patient_id": "p",
        "consent_sentences": [],
        "break_glass_reason": "",
        "reason": "",
        "reason_min": 10,
    }
    return render.render("clinician/record.html", locale, context)


@pytest.mark.parametrize("locale", ["vi", "en"])
def test_record_page_template_renders_odd_and_synthea_records(locale: str) -> None:
    """The record templates (clinician/record.html and the shared record/ partials) with odd,
    empty and real-world views: no template error, values escaped, every chart has its table."""
    odd = build_record(
        {"resourceType": "Patient", "id": "p", "name": [{"text": "<b>x</b>"}]}, [], {}, {}, today=TODAY
    )
    html = _render_record(odd, locale)
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    for path in sorted(SYNTHEA.glob("*.json"))[:3]:
        resources = _resolved(path)
        patient, orgs, practitioners = _split(resources)
        view = build_record(patient, resources, orgs, practitioners, today=TODAY)
        html = _render_record(view, locale)
        assert (
            html.count('class="chart" data-chart=') == len(view.trends) == html.count('class="trend-table"')
        )
        assert html.count('class="encounter"') == len(view.timeline)
