"""The clinician's pages over real HTTP (a running hub with the demo data): patient search,
the integrated record, break-glass; CSRF, escaping, and that a page never shows what the API
would hide. The facts each test checks are made here (own patients, facilities and accounts,
``uid``), so the shared ``web_hub`` and the demo data can change without breaking them.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from conftest import WebHub, web_login

from hub.auth import users

pytestmark = pytest.mark.pages

STATION = "vn-demo-org-tyt-iakrai"  # bs.tuan's facility, the demo patients' managing facility
LOINC = "http://loinc.org"


def _put(hub: WebHub, *bodies: dict[str, Any]) -> None:
    with hub.admin_client() as admin:
        for body in bodies:
            answer = admin.put(f"/{body['resourceType']}/{body['id']}", json=body)
            assert answer.status_code in (200, 201), answer.text


def _doctor(hub: WebHub, uid: str, org: str, name: str = "doc") -> httpx.Client:
    """A clinician account of ``org`` (its Practitioner made too), logged in through the form."""
    username = f"{name}-{uid}"
    _put(
        hub, {"resourceType": "Practitioner", "id": username, "name": [{"family": "Bác sĩ", "given": [name]}]}
    )
    users.add_user(
        hub.engine,
        username,
        "clinician",
        fhir_user=f"Practitioner/{username}",
        organizations=[org],
        password=f"pw-{uid}-long",
    )
    return web_login(hub, username, f"pw-{uid}-long")


def _person(hub: WebHub, uid: str, org: str, **extra: Any) -> str:
    """A patient managed by ``org`` with one visit there and a blood pressure; returns its id."""
    pid = f"p-{uid}"
    _put_nonempty(
        hub,
        {"resourceType": "Organization", "id": org, "name": f"Cơ sở {org}"} if org != STATION else {},
        {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"family": "Phan", "given": ["Thị", f"Mai{uid}"]}],
            "gender": "female",
            "birthDate": "1990-05-01",
            "managingOrganization": {"reference": f"Organization/{org}"},
            **extra,
        },
        {
            "resourceType": "Encounter",
            "id": f"e-{uid}",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"},
            "serviceProvider": {"reference": f"Organization/{org}"},
            "period": {"start": "2026-11-02T08:00:00+07:00"},
        },
        {
            "resourceType": "Observation",
            "id": f"o-{uid}",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "vital-signs",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}], "text": "Huyết áp"},
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/e-{uid}"},
            "effectiveDateTime": "2026-11-02T08:10:00+07:00",
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 141, "unit": "mmHg"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 92, "unit": "mmHg"},
                },
            ],
        },
    )
    return pid


def _put_nonempty(hub: WebHub, *bodies: dict[str, Any]) -> None:
    _put(hub, *[b for b in bodies if b])


@pytest.fixture()
def station_doctor(web_hub: WebHub) -> httpx.Client:
    client = web_login(web_hub, "bs.tuan")
    yield client  # type: ignore[misc]
    client.close()


def test_search_without_accents_finds_the_demo_patient(web_hub: WebHub, station_doctor: httpx.Client) -> None:
    page = station_doctor.get("/clinician", params={"q": "nguyen thi hoa"})
    assert page.status_code == 200 and "<html" in page.text
    assert 'href="/clinician/patients/vn-demo-patient-1"' in page.text
    assert "Nguyễn Thị Hoa" in page.text
    # htmx asks for the results region only.
    part = station_doctor.get("/clinician", params={"q": "hoa nguyen"}, headers={"HX-Request": "true"})
    assert part.status_code == 200 and "<html" not in part.text
    assert 'href="/clinician/patients/vn-demo-patient-1"' in part.text
    # CCCD and the facilities holding data.
    cccd = station_doctor.get("/clinician", params={"q": "064188001234"})
    assert 'href="/clinician/patients/vn-demo-patient-1"' in cccd.text
    assert "Trạm Y tế xã Ia Krái" in cccd.text


def test_record_page_shows_header_timeline_and_chart_table(
    web_hub: WebHub, station_doctor: httpx.Client
) -> None:
    page = station_doctor.get("/clinician/patients/vn-demo-patient-1")
    assert page.status_code == 200, page.text[:500]
    text = page.text
    assert '<h1 id="patient-name">Nguyễn Thị Hoa' in text
    assert "064188001234" in text and "DN4640123456789" in text
    assert 'class="timeline"' in text and "Trạm Y tế xã Ia Krái" in text
    assert 'class="chart" data-chart=' in text and 'class="trend-table"' in text
    assert re.search(r'data-v="\d', text), "the chart's table holds the values"
    assert "/static/charts.js" in text and "/static/vendor/uPlot.iife.min.js" in text
    assert "Server-Timing" in page.headers and page.headers["Server-Timing"].startswith("page;dur=")
    assert 'action="/clinician/patients/vn-demo-patient-1/break-glass"' in text
    # The consent state in words: the station manages this record.
    assert "Trạm Y tế xã Ia Krái" in text.split('id="access-title"')[1].split("</section>")[0]


def test_the_record_of_another_facility_is_absent(web_hub: WebHub, uid: str) -> None:
    pid = _person(web_hub, uid, STATION)
    with _doctor(web_hub, uid, f"elsewhere-{uid}") as other:
        page = other.get(f"/clinician/patients/{pid}")
        assert page.status_code == 404
        assert f"Mai{uid}" not in page.text and "141" not in page.text
        assert f'action="/clinician/patients/{pid}/break-glass"' in page.text  # offered
        missing = other.get(f"/clinician/patients/nobody-{uid}")
        assert missing.status_code == 404
        # The same page for hidden and missing, apart from the id in the form's URL.
        assert page.text.replace(pid, "X") == missing.text.replace(f"nobody-{uid}", "X")
        found = other.get("/clinician", params={"q": f"phan mai{uid}"})
        assert found.status_code == 200 and f"/clinician/patients/{pid}" not in found.text


def test_break_glass_needs_the_csrf_token(web_hub: WebHub, uid: str) -> None:
    pid = _person(web_hub, uid, STATION)
    with _doctor(web_hub, uid, f"elsewhere-{uid}") as other:
        token = other.headers.pop("X-CSRF-Token")
        refused = other.post(
            f"/clinician/patients/{pid}/break-glass", data={"reason": "Cấp cứu, bất tỉnh tại khoa"}
        )
        assert refused.status_code == 403 and f"Mai{uid}" not in refused.text
        forged = other.post(
            f"/clinician/patients/{pid}/break-glass",
            data={"reason": "Cấp cứu, bất tỉnh tại khoa", "csrf_token": token[:-2] + "xx"},
        )
        assert forged.status_code == 403
    assert _alerts(web_hub, pid) == []


def _alerts(hub: WebHub, pid: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=hub.url, headers=hub.auth) as admin:
        answer = admin.get("/access/break-glass")
        assert answer.status_code == 200, answer.text
        body = answer.json()
    alerts = body if isinstance(body, list) else body.get("alerts", body.get("items", []))
    return [a for a in alerts if pid in str(a.get("patient"))]


def test_break_glass_opens_the_record_and_leaves_audit_and_alert(web_hub: WebHub, uid: str) -> None:
    pid = _person(web_hub, uid, STATION)
    reason = f"Bệnh nhân hôn mê tại cấp cứu {uid}"
    with _doctor(web_hub, uid, f"elsewhere-{uid}", "bv") as other:
        short = other.post(f"/clinician/patients/{pid}/break-glass", data={"reason": "gấp"})
        assert short.status_code == 400 and 'aria-invalid="true"' in short.text
        assert _alerts(web_hub, pid) == []
        opened = other.post(f"/clinician/patients/{pid}/break-glass", data={"reason": reason})
        assert opened.status_code == 200, opened.text[:500]
        assert f"Mai{uid}" in opened.text and "141" in opened.text
        assert reason in opened.text and 'role="alert"' in opened.text
    (alert,) = _alerts(web_hub, pid)
    assert reason in str(alert)
    with web_hub.admin_client() as admin:
        events = admin.get("/AuditEvent", params={"patient": pid, "_count": "100"}).json()
    flagged = [
        e["resource"]
        for e in events.get("entry", [])
        if any(s.get("code") == "BTG" for s in e["resource"].get("meta", {}).get("security", []))
        or "BTG" in str(e["resource"].get("purposeOfEvent"))
        or reason in str(e["resource"])
    ]
    assert flagged, "the break-glass read is in the patient's audit trail"


def test_script_in_a_name_or_narrative_shows_as_text(
    web_hub: WebHub, uid: str, station_doctor: httpx.Client
) -> None:
    evil = "<script>alert(1)</script>"
    pid = _person(web_hub, uid, STATION, name=[{"family": evil, "given": [f"Mai{uid}"]}])
    _put(
        web_hub,
        {
            "resourceType": "Composition",
            "id": f"c-{uid}",
            "status": "final",
            "type": {"text": "Tóm tắt ra viện"},
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/e-{uid}"},
            "date": "2026-11-02",
            "author": [{"display": "BS"}],
            "title": f"Tóm tắt {evil}",
            "text": {
                "status": "generated",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>Ổn định</p><img src="x" onerror="alert(2)"/>{evil}</div>',
            },
        },
    )
    page = station_doctor.get(f"/clinician/patients/{pid}")
    assert page.status_code == 200, page.text[:300]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert" not in page.text and "onerror" not in page.text
    assert "<p>Ổn định</p>" in page.text  # the narrative's harmless markup stays
    found = station_doctor.get("/clinician", params={"q": f"mai{uid}"})
    assert "&lt;script&gt;" in found.text and "<script>alert" not in found.text


def test_not_for_other_roles(web_hub: WebHub) -> None:
    with web_login(web_hub, "hoa.nguyen") as patient:
        page = patient.get("/clinician/patients/vn-demo-patient-1")
        assert page.status_code == 403


def test_a_consent_opens_the_record_to_another_hospital_and_says_so(web_hub: WebHub, uid: str) -> None:
    pid = _person(web_hub, uid, STATION)
    hospital = f"bv-{uid}"
    _put(
        web_hub,
        {"resourceType": "Organization", "id": hospital, "name": f"Bệnh viện Đa khoa tỉnh {uid}"},
        {
            "resourceType": "Consent",
            "id": f"k-{uid}",
            "status": "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "dateTime": "2026-11-01T08:00:00+07:00",
            "provision": {
                "type": "permit",
                "period": {"start": "2026-01-01", "end": "2027-12-31"},
                "actor": [
                    {
                        "role": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "IRCP",
                                }
                            ]
                        },
                        "reference": {"reference": f"Organization/{hospital}"},
                    }
                ],
                "purpose": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
                ],
            },
        },
    )
    with _doctor(web_hub, uid, hospital, "bv") as doctor:
        page = doctor.get(f"/clinician/patients/{pid}")
        assert page.status_code == 200, page.text[:300]
        access = page.text.split('id="access-title"')[1].split("</section>")[0]
        assert f"Bệnh viện Đa khoa tỉnh {uid}" in access and "31/12/2027" in access
        assert "141" in page.text  # the blood pressure, ordinary data
    with _doctor(web_hub, uid, f"elsewhere-{uid}", "other") as other:
        assert other.get(f"/clinician/patients/{pid}").status_code == 404


def test_sensitive_data_stays_off_the_page_until_break_glass(web_hub: WebHub, uid: str) -> None:
    """The station manages the record (ordinary data for treatment), but a depression diagnosis
    (PSY) needs a consent naming it: the page leaves it out, exactly as the API does."""
    pid = _person(web_hub, uid, STATION)
    _put(
        web_hub,
        {
            "resourceType": "Condition",
            "id": f"psy-{uid}",
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "code": {
                "coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "F32.1"}],
                "text": f"Trầm cảm {uid}",
            },
            "subject": {"reference": f"Patient/{pid}"},
            "encounter": {"reference": f"Encounter/e-{uid}"},
        },
    )
    with _doctor(web_hub, uid, STATION, "tyt") as doctor:
        page = doctor.get(f"/clinician/patients/{pid}")
        assert page.status_code == 200 and f"Mai{uid}" in page.text
        assert f"Trầm cảm {uid}" not in page.text
        api = httpx.get(
            f"{web_hub.base}/Condition", params={"patient": pid}, headers=web_hub.auth
        ).json()  # the admin sees it: it exists
        assert any(e["resource"]["id"] == f"psy-{uid}" for e in api.get("entry", []))
        opened = doctor.post(
            f"/clinician/patients/{pid}/break-glass", data={"reason": "Ý định tự sát, cần tiền sử tâm thần"}
        )
        assert opened.status_code == 200 and f"Trầm cảm {uid}" in opened.text
