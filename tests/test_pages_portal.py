"""The patient portal over real HTTP (hub.web.views.portal): whose record a page shows is
decided by the router on every request, consent changes need the CSRF token and take effect at
once, the hub's refusal of a proxy's sensitive grant is shown, the download holds exactly what
the FHIR API gives that person, the access log shows break-glass.

Runs on the shared ``web_hub`` (demo data and accounts). Tests that change consents do it on a
patient of their own (``citizen``), never on the demo people other tests look at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import WebHub, web_login

from hub.auth import users

pytestmark = pytest.mark.pages

HOA = "vn-demo-patient-1"
SON = "vn-demo-patient-5"  # Hoa's son; RelatedPerson-2 (hoa.proxy) is his proxy
ANKHE = "Organization/vn-demo-org-bvdk-ankhe"  # bs.khanh's hospital: nothing of Hoa by default
TYT = "Organization/vn-demo-org-tyt-iakrai"


def api_token(hub: WebHub, username: str, password: str) -> str:
    answer = httpx.post(
        f"{hub.url}/auth/token", data={"grant_type": "password", "username": username, "password": password}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def api(hub: WebHub, username: str, password: str) -> httpx.Client:
    return hub.client(api_token(hub, username, password))


def plain(html: str) -> str:
    """The page's text without tags, whitespace folded."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


def ids_of(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry") or []}


def everything(client: httpx.Client, patient: str) -> set[str]:
    """Every resource of ``Patient/{id}/$everything`` as this client sees it (all pages)."""
    found: set[str] = set()
    url: str | None = f"Patient/{patient}/$everything?_count=1000"
    while url:
        answer = client.get(url)
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        found |= ids_of(bundle)
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return found


@dataclass
class Citizen:
    patient: str
    username: str
    password: str


def make_citizen(web_hub: WebHub, uid: str) -> Citizen:
    """A patient of the Ia Krái station with a blood pressure and a depression diagnosis (PSY),
    and a patient account: consents changed by a test are this person's alone."""
    with web_hub.admin_client() as admin:
        patient = admin.post(
            "Patient",
            json={
                "resourceType": "Patient",
                "name": [{"family": "Đoàn", "given": ["Thị", f"Thử{uid}"]}],
                "gender": "female",
                "birthDate": "1990-02-03",
                "managingOrganization": {"reference": TYT},
            },
        ).json()["id"]
        observation = {
            "resourceType": "Observation",
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
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": "2026-03-01",
            "valueQuantity": {
                "value": 141,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        }
        assert admin.post("Observation", json=observation).status_code == 201
        condition = {
            "resourceType": "Condition",
            "subject": {"reference": f"Patient/{patient}"},
            "code": {
                "coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "F32.0"}],
                "text": "Trầm cảm nhẹ",
            },
        }
        assert admin.post("Condition", json=condition).status_code == 201
    username, password = f"bn-{uid}", f"pw-{uid}"
    users.add_user(web_hub.engine, username, "patient", fhir_user=f"Patient/{patient}", password=password)
    return Citizen(patient, username, password)


@pytest.fixture()
def citizen(web_hub: WebHub, uid: str) -> Citizen:
    return make_citizen(web_hub, uid)


def consents_of(hub: WebHub, patient: str) -> list[dict[str, Any]]:
    with hub.admin_client() as admin:
        bundle = admin.get(f"Consent?patient={patient}&_count=100").json()
    return [e["resource"] for e in bundle.get("entry") or []]


def test_a_patient_sees_their_record_and_no_one_else_s(web_hub: WebHub) -> None:
    with web_login(web_hub, "hoa.nguyen") as client:
        mine = client.get("/portal")
        assert mine.status_code == 200
        assert "Nguyễn Thị Hoa" in mine.text and "Trầm cảm" in mine.text or "trầm cảm" in mine.text
        for target in (SON, "vn-demo-patient-2", "no-such-patient", "..%2F..%2Fetc", "a" * 80):
            for path in ("/portal", "/portal/consents", "/portal/access-log", "/portal/download"):
                answer = client.get(path, params={"patient": target})
                assert answer.status_code == 404, (path, target, answer.status_code)
                assert "Trần Văn Đức" not in answer.text and "Gia Bảo" not in answer.text
        # The family page of a patient lists only the records the router lets them open: their own.
        family = client.get("/portal/family")
        assert family.status_code == 200 and f"patient={HOA}" in family.text and SON not in family.text


def test_a_proxy_sees_the_family_member_s_ordinary_data_only(web_hub: WebHub) -> None:
    with web_login(web_hub, "proxy") as client:
        family = client.get("/portal/family")
        assert f"/portal?patient={HOA}" in family.text
        record = client.get("/portal", params={"patient": HOA})
        assert record.status_code == 200 and "Nguyễn Thị Hoa" in record.text
        assert "Đái tháo đường" in record.text  # ordinary data
        assert "trầm cảm" not in record.text.lower()  # PSY: the patient's own consent needed
        # Without a parameter the proxy lands on their family member.
        assert "Nguyễn Thị Hoa" in client.get("/portal").text
        # Another family's child, by editing the URL: the same 404 as a record that does not exist.
        assert client.get("/portal", params={"patient": SON}).status_code == 404
    with web_login(web_hub, "hoa.proxy") as client:  # Hoa as her son's proxy
        assert "Gia Bảo" in client.get("/portal", params={"patient": SON}).text


def test_consent_posts_need_the_csrf_token(web_hub: WebHub, citizen: Citizen) -> None:
    client = web_login(web_hub, citizen.username, citizen.password)
    token = client.headers.pop("X-CSRF-Token")
    form = {"patient": citizen.patient, "actor": ANKHE, "purpose": "TREAT", "category": "N"}
    refused = client.post("/portal/consents", data=form)
    assert refused.status_code == 403
    assert consents_of(web_hub, citizen.patient) == []
    granted = client.post("/portal/consents", data={**form, "csrf_token": token})
    assert granted.status_code == 303
    (consent,) = consents_of(web_hub, citizen.patient)
    withdraw = f"/portal/consents/{consent['id']}/withdraw"
    assert client.post(withdraw, data={"patient": citizen.patient}).status_code == 403
    assert client.post(withdraw, data={"patient": citizen.patient, "csrf_token": "x" * 43}).status_code == 403
    assert consents_of(web_hub, citizen.patient)[0]["status"] == "active"
    assert client.post(withdraw, data={"patient": citizen.patient, "csrf_token": token}).status_code == 303
    assert consents_of(web_hub, citizen.patient)[0]["status"] == "inactive"
    client.close()


def test_grant_and_withdraw_take_effect_at_once_with_evidence(web_hub: WebHub, citizen: Citizen) -> None:
    khanh = api(web_hub, "bs.khanh", "demo-clinician")
    seen = lambda: khanh.get(f"Observation?patient={citizen.patient}").json().get("entry", [])  # noqa: E731
    assert seen() == []
    with web_login(web_hub, citizen.username, citizen.password) as client:
        page = client.get("/portal/consents")
        assert "An Khê" in page.text and 'value="HIV"' in page.text  # the patient may share sensitive data
        answer = client.post(
            "/portal/consents",
            data={
                "patient": citizen.patient,
                "actor": ANKHE,
                "purpose": "TREAT",
                "category": "N",
                "end": "2030-12-31",
            },
            follow_redirects=True,
        )
        assert answer.status_code == 200
        assert (
            "Bệnh viện Đa khoa khu vực An Khê (demo) được xem dữ liệu thông thường để khám, chữa bệnh"
            in answer.text
        )
        assert "đến hết 31/12/2030" in answer.text
        assert len(seen()) == 1
        (consent,) = consents_of(web_hub, citizen.patient)
        # The hub's governance stamped the evidence of an electronic consent by the patient.
        assert consent["dateTime"]
        assert any(
            x.get("valueCode") == "electronic" or "electronic" in json.dumps(x)
            for x in consent.get("extension", [])
        )
        # Ordinary data only: the depression diagnosis stays hidden from An Khê.
        assert khanh.get(f"Condition?patient={citizen.patient}").json().get("entry") is None
        answer = client.post(
            f"/portal/consents/{consent['id']}/withdraw",
            data={"patient": citizen.patient},
            follow_redirects=True,
        )
        assert answer.status_code == 200 and "Đã rút lại" in answer.text
        assert seen() == []
    khanh.close()


def test_a_proxy_is_not_offered_and_cannot_grant_sensitive_data(web_hub: WebHub) -> None:
    before = consents_of(web_hub, HOA)
    with web_login(web_hub, "proxy") as client:
        page = client.get("/portal/consents", params={"patient": HOA})
        assert 'value="HIV"' not in page.text and 'value="PSY"' not in page.text
        assert "chỉ có thể chia sẻ dữ liệu thông thường" in page.text
        # A hand-made form anyway: the hub refuses (403) and the page says so.
        answer = client.post(
            "/portal/consents", data={"patient": HOA, "actor": ANKHE, "purpose": "TREAT", "category": "HIV"}
        )
        assert answer.status_code == 403
        assert 'role="alert"' in answer.text and "Hệ thống từ chối thay đổi này" in answer.text
    assert consents_of(web_hub, HOA) == before


def test_download_holds_what_the_api_gives_that_person(web_hub: WebHub, citizen: Citizen) -> None:
    with web_login(web_hub, citizen.username, citizen.password) as client:
        answer = client.get("/portal/download")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/fhir+json")
        assert answer.headers["content-disposition"].startswith("attachment;")
        bundle = answer.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    with api(web_hub, citizen.username, citizen.password) as own:
        assert ids_of(bundle) == everything(own, citizen.patient)
    assert any(i.startswith("Condition/") for i in ids_of(bundle))
    # The proxy's download of Hoa is the proxy's view: no PSY condition.
    with web_login(web_hub, "proxy") as client:
        proxied = ids_of(client.get("/portal/download", params={"patient": HOA}).json())
    with api(web_hub, "proxy", "demo-proxy") as proxy_api:
        assert proxied == everything(proxy_api, HOA)
    with api(web_hub, "hoa.nguyen", "demo-patient") as hoa_api:
        assert proxied < everything(hoa_api, HOA)


def test_break_glass_shows_in_who_looked(web_hub: WebHub, citizen: Citizen) -> None:
    with api(web_hub, "bs.khanh", "demo-clinician") as khanh:
        assert khanh.get(f"Patient/{citizen.patient}").status_code == 404
        opened = khanh.get(
            f"Patient/{citizen.patient}", headers={"X-Break-Glass-Reason": "Bat tinh khi nhap vien (cap cuu)"}
        )
        assert opened.status_code == 200
    with web_login(web_hub, citizen.username, citizen.password) as client:
        page = client.get("/portal/access-log")
        assert page.status_code == 200
        text = page.text
        assert "Truy cập khẩn cấp (phá kính)" in text  # the alert section
        assert text.count('class="break-glass notice"') >= 2  # the alert and the audited read
        assert "Hồ Văn Khánh" in text and "Bệnh viện Đa khoa khu vực An Khê (demo)" in text
        assert "Bat tinh khi nhap vien (cap cuu)" in text
        # The refused read before the break-glass is in the log too, marked as refused.
        assert "Bị từ chối hoặc không thành công" in text
        # Others' accesses only by default; the patient's own views on request.
        assert "Bạn (người bệnh)" not in plain(text)
        assert "Bạn (người bệnh)" in plain(client.get("/portal/access-log", params={"mine": "1"}).text)


def test_names_from_resources_are_escaped(web_hub: WebHub, citizen: Citizen, uid: str) -> None:
    evil = f"<script>alert('{uid}')</script>"
    with web_hub.admin_client() as admin:
        org = admin.post("Organization", json={"resourceType": "Organization", "name": evil}).json()["id"]
    with web_login(web_hub, citizen.username, citizen.password) as client:
        page = client.get("/portal/consents")
        assert evil not in page.text
        assert "&lt;script&gt;" in page.text and f"Organization/{org}" in page.text
        assert not re.search(r"<script>alert", page.text)


def test_consents_page_explains_the_default_policy_and_the_consents_in_force(web_hub: WebHub) -> None:
    with web_login(web_hub, "hoa.nguyen") as client:
        text = plain(client.get("/portal/consents").text)
    assert "Trạm Y tế xã Ia Krái (demo) quản lý hồ sơ này" in text
    assert "Bác sĩ gia đình Phạm Minh Tuấn được xem dữ liệu thông thường" in text
    # The demo's consent to the provincial hospital, in words, with its end date.
    assert "Bệnh viện Đa khoa tỉnh Gia Lai (demo) được xem dữ liệu thông thường để khám, chữa bệnh" in text
    assert "31/12/2027" in text


def test_a_proxy_cannot_lift_a_deny_and_sees_the_hub_s_refusal(
    web_hub: WebHub, citizen: Citizen, uid: str
) -> None:
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{citizen.patient}"},
        # A deny of everything to An Khê: one naming a sensitive class (PSY) is itself that class,
        # hidden from the proxy (tests/test_pages_attacks.py).
        "provision": {
            "type": "deny",
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
                    "reference": {"reference": ANKHE},
                }
            ],
        },
    }
    with web_hub.admin_client() as admin:
        consent_id = admin.post("Consent", json=consent).json()["id"]
        person = admin.post(
            "RelatedPerson",
            json={
                "resourceType": "RelatedPerson",
                "active": True,
                "patient": {"reference": f"Patient/{citizen.patient}"},
            },
        ).json()["id"]
    users.add_user(
        web_hub.engine, f"px-{uid}", "proxy", fhir_user=f"RelatedPerson/{person}", password=f"pw-{uid}"
    )
    with web_login(web_hub, f"px-{uid}", f"pw-{uid}") as client:
        page = client.get("/portal/consents", params={"patient": citizen.patient})
        assert "An Khê (demo) không được xem bất kỳ dữ liệu nào" in plain(page.text)
        assert f"/portal/consents/{consent_id}/withdraw" not in page.text  # not offered
        assert "chỉ người bệnh mới rút lại được" in page.text
        answer = client.post(f"/portal/consents/{consent_id}/withdraw", data={"patient": citizen.patient})
        assert answer.status_code == 403 and "Hệ thống từ chối thay đổi này" in answer.text
    assert consents_of(web_hub, citizen.patient)[0]["status"] == "active"
    # The patient can.
    with web_login(web_hub, citizen.username, citizen.password) as client:
        page = client.get("/portal/consents")
        assert f"/portal/consents/{consent_id}/withdraw" in page.text


def test_access_log_pages_newest_first(web_hub: WebHub, citizen: Citizen) -> None:
    with web_login(web_hub, citizen.username, citizen.password) as client:
        for _ in range(15):  # each record page is two audited requests ($everything, Observations)
            assert client.get("/portal").status_code == 200
        first = client.get("/portal/access-log", params={"mine": "1"}).text
        times = re.findall(r'<time datetime="([^"]+)"', first)
        assert len(times) == 20 and times == sorted(times, reverse=True)
        older = re.search(r'href="(/portal/access-log\?[^"]*cursor=[^"]+)"', first)
        assert older, "no link to older entries"
        second = client.get(older.group(1).replace("&amp;", "&")).text
        more = re.findall(r'<time datetime="([^"]+)"', second)
        assert more and max(more) <= min(times)
        # The oldest entries are the admin's writes that created this person's record.
        assert "Newest" in second or "Mới nhất" in second
