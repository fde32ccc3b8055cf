"""The patient portal in a real browser (Playwright driving Debian's Chromium against a running
hub): the cross-facility consent scenario, break-glass shown to the patient, a proxy's view of
the family member, axe-core on every portal page, and the screenshots ``portal-record``,
``portal-consents``, ``portal-access-log`` and ``portal-record-phone`` (var/screenshots/).

The scenario runs on a patient of its own (``make_citizen``), so the consents it grants and
withdraws are nobody else's; the screenshots of the record show the demo's Hoa (read only).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import WebHub, axe_check, login_page, new_page, screenshot
from test_pages_portal import ANKHE, HOA, api, make_citizen

pytestmark = pytest.mark.pages


def _khanh_sees(hub: WebHub, patient: str) -> int:
    """How many Observations of the patient bs.khanh (An Khê hospital) gets from the FHIR API."""
    with api(hub, "bs.khanh", "demo-clinician") as khanh:
        answer: httpx.Response = khanh.get(f"Observation?patient={patient}")
        return len(answer.json().get("entry") or [])


def _open_as_clinician(page: Any, hub: WebHub, patient: str) -> int:
    answer = page.goto(f"{hub.url}/clinician/patients/{patient}")
    return int(answer.status)


def test_cross_facility_consent_then_break_glass(web_hub: WebHub, browser: Any, uid: str) -> None:
    person = make_citizen(web_hub, uid)
    patient = new_page(browser)
    clinician = new_page(browser)
    try:
        login_page(patient, web_hub, person.username, person.password)
        login_page(clinician, web_hub, "bs.khanh")

        # Another facility's clinician sees nothing of the patient: page and API alike.
        assert _open_as_clinician(clinician, web_hub, person.patient) == 404
        assert _khanh_sees(web_hub, person.patient) == 0

        # The patient shares ordinary data with An Khê hospital for treatment.
        patient.goto(f"{web_hub.url}/portal/consents")
        axe_check(patient)
        patient.select_option("#actor", ANKHE)
        patient.check("#purpose-TREAT")
        assert patient.is_checked("#category-N")
        patient.fill("#end", "2030-12-31")
        patient.click("form[action='/portal/consents'] button[type=submit]")
        patient.wait_for_load_state("networkidle")
        assert patient.locator(".success").is_visible()
        granted = patient.locator("li[id^='consent-']")
        assert granted.count() == 1
        assert "Bệnh viện Đa khoa khu vực An Khê (demo) được xem dữ liệu thông thường" in granted.inner_text()
        axe_check(patient)
        screenshot(patient, "portal-consents")

        # At once: the clinician's page opens the record, and the API gives the data.
        assert _open_as_clinician(clinician, web_hub, person.patient) == 200
        assert f"Thử{uid}" in clinician.content()
        assert _khanh_sees(web_hub, person.patient) == 1

        # The patient withdraws; the clinician sees nothing again.
        patient.click("li[id^='consent-'] button[type=submit]")
        patient.wait_for_load_state("networkidle")
        assert "Đã rút lại việc chia sẻ" in patient.locator(".success").inner_text()
        assert patient.locator("li[id^='consent-']").count() == 0
        assert _open_as_clinician(clinician, web_hub, person.patient) == 404
        assert _khanh_sees(web_hub, person.patient) == 0

        # Break-glass with a reason opens the record ...
        clinician.fill("#reason", "Bệnh nhân bất tỉnh tại phòng cấp cứu, cần tiền sử thuốc")
        clinician.click("form.break-glass button[type=submit]")
        clinician.wait_for_load_state("networkidle")
        assert f"Thử{uid}" in clinician.content()

        # ... and the patient sees it in "who looked", highlighted, with the alert.
        patient.goto(f"{web_hub.url}/portal/access-log")
        highlighted = patient.locator(".break-glass")
        assert highlighted.count() >= 2  # the alert and the audited reads
        text = highlighted.first.inner_text()
        assert "Hồ Văn Khánh" in text and "Bệnh nhân bất tỉnh tại phòng cấp cứu" in text
        assert "An Khê" in text
        axe_check(patient)
        screenshot(patient, "portal-access-log")
    finally:
        patient.context.close()
        clinician.context.close()


def test_record_pages_on_desktop_and_phone(web_hub: WebHub, browser: Any) -> None:
    for viewport, name in (((1280, 900), "portal-record"), ((390, 844), "portal-record-phone")):
        page = new_page(browser, viewport=viewport)
        try:
            login_page(page, web_hub, "hoa.nguyen")
            page.goto(f"{web_hub.url}/portal")
            page.wait_for_load_state("networkidle")
            assert page.locator("h1").inner_text() == "Hồ sơ sức khỏe của tôi"
            assert "Nguyễn Thị Hoa" in page.content()
            assert page.locator("table.trend-table").count() >= 1  # every chart has its table
            axe_check(page)
            screenshot(page, name)
            if name == "portal-record":
                for path in ("/portal/family", "/portal/access-log", "/portal/access-log?mine=1"):
                    page.goto(f"{web_hub.url}{path}")
                    axe_check(page)
            else:  # a phone never scrolls sideways
                width = page.evaluate("() => document.documentElement.scrollWidth")
                assert width <= 390, width
        finally:
            page.context.close()


def test_a_proxy_switches_to_the_family_member_s_record(web_hub: WebHub, browser: Any) -> None:
    page = new_page(browser)
    try:
        login_page(page, web_hub, "proxy")
        page.goto(f"{web_hub.url}/portal/family")
        axe_check(page)
        page.click(f"a[href='/portal?patient={HOA}']")
        page.wait_for_load_state("networkidle")
        assert "Hồ sơ sức khỏe của Nguyễn Thị Hoa" in page.locator("h1").inner_text()
        content = page.content()
        assert "Đái tháo đường" in content and "trầm cảm" not in content.lower()
        axe_check(page)
        page.goto(f"{web_hub.url}/portal/consents?patient={HOA}")
        assert page.locator("#category-HIV").count() == 0  # a proxy grants ordinary data only
        assert page.locator(".notice").first.is_visible()
        axe_check(page)
    finally:
        page.context.close()
