"""hub.web.record (the integrated record's view model) and hub.web.finder (the patient search box).

The builders are pure: fed with the demo data (demo/vn-demo.json), the Synthea bundles of
../shared and resources made here, odd ones included. What touches the database
(``fetch_record``, the finder's searches) runs through the real router on the test backend.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from hub.web.record import (
    BHYT_SYSTEM,
    CCCD_SYSTEM,
    address_text,
    age_on,
    build_record,
    build_trends,
    consent_lines,
    human_name,
    ref_key,
)

REPO = Path(__file__).resolve().parent.parent
SYNTHEA = REPO.parent / "shared" / "data" / "synthea" / "bundles_r4_small"
TODAY = date(2026, 12, 7)


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
    bp = next(i for i in results if i.text == "Huyết áp")
    assert sorted(q.value or 0 for q in bp.values)[-1] == 125
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
    assert trends[0].times == ["2025-01-01", "2025-06-01", "2026-03-01"]


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
