"""The clinician's pages in a real browser (Playwright driving Debian's Chromium) against a
running hub with the demo data: find a patient without accents, open the integrated record
(timeline across facilities, a drawn chart), break-glass by a doctor of another hospital;
axe-core on each page; screenshots ``clinician-search``, ``clinician-record``,
``clinician-record-phone`` and ``clinician-break-glass`` in var/screenshots (not committed).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import WebHub, axe_check, login_page, new_page, screenshot

from hub.auth import users

pytestmark = pytest.mark.pages

HOA = "vn-demo-patient-1"  # Nguyễn Thị Hoa: visits at the station, the district centre, the hospital


def test_station_doctor_finds_hoa_and_reads_her_record(web_hub: WebHub, browser: Any) -> None:
    page = new_page(browser)
    try:
        login_page(page, web_hub, "bs.tuan")
        page.goto(f"{web_hub.url}/clinician")
        axe_check(page)
        page.fill("#q", "nguyen thi hoa")
        page.press("#q", "Enter")
        link = page.locator(f"#results a[href='/clinician/patients/{HOA}']")
        link.wait_for()
        assert "Nguyễn Thị Hoa" in link.inner_text()
        assert "q=nguyen" in page.url  # htmx pushed the search into the address bar
        live = page.locator("#live")
        live.filter(has_text="1").wait_for(state="attached")  # "Tìm thấy 1 người" announced
        axe_check(page)
        screenshot(page, "clinician-search")

        link.click()
        page.wait_for_url(f"**/clinician/patients/{HOA}")
        assert page.locator("h1#patient-name").inner_text().startswith("Nguyễn Thị Hoa")
        facilities = {f.strip() for f in page.locator(".timeline .facility").all_inner_texts()}
        assert len(facilities) >= 3, facilities
        chart = page.locator(".chart[data-drawn='true'] canvas").first
        chart.wait_for()
        # Drawn: the table moved behind its toggle, which shows it again.
        toggle = page.locator(".chart-toggle").first
        assert toggle.is_visible() and toggle.get_attribute("aria-expanded") == "false"
        toggle.click()
        assert toggle.get_attribute("aria-expanded") == "true"
        assert page.locator(".trend-table").first.is_visible()
        axe_check(page)
        screenshot(page, "clinician-record")
    finally:
        page.context.close()

    phone = new_page(browser, viewport=(390, 844))
    try:
        login_page(phone, web_hub, "bs.tuan")
        phone.goto(f"{web_hub.url}/clinician/patients/{HOA}")
        phone.locator(".chart[data-drawn='true'] canvas").first.wait_for()
        width = phone.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390 + 1, f"the record page scrolls sideways on a phone ({width}px)"
        axe_check(phone)
        screenshot(phone, "clinician-record-phone")
    finally:
        phone.context.close()


def test_break_glass_by_a_doctor_of_another_hospital(web_hub: WebHub, browser: Any, uid: str) -> None:
    pid = f"bg-{uid}"
    with web_hub.admin_client() as admin:
        for body in (
            {"resourceType": "Organization", "id": f"bv-{uid}", "name": f"Bệnh viện khác {uid}"},
            {"resourceType": "Practitioner", "id": f"bs-{uid}", "name": [{"family": "Đỗ", "given": ["Lan"]}]},
            {
                "resourceType": "Patient",
                "id": pid,
                "name": [{"family": "Rơ Mah", "given": [f"Plơi{uid}"]}],
                "birthDate": "1975-02-01",
                "gender": "male",
                "managingOrganization": {"reference": "Organization/vn-demo-org-tyt-iakrai"},
            },
            {
                "resourceType": "AllergyIntolerance",
                "id": f"al-{uid}",
                "patient": {"reference": f"Patient/{pid}"},
                "code": {"text": "Penicillin"},
                "criticality": "high",
            },
        ):
            assert admin.put(f"/{body['resourceType']}/{body['id']}", json=body).status_code in (200, 201)
    username = f"bs-bv-{uid}"
    users.add_user(
        web_hub.engine,
        username,
        "clinician",
        fhir_user=f"Practitioner/bs-{uid}",
        organizations=[f"bv-{uid}"],
        password=f"pw-{uid}-long",
    )
    page = new_page(browser)
    try:
        login_page(page, web_hub, username, f"pw-{uid}-long")
        page.goto(f"{web_hub.url}/clinician/patients/{pid}")
        assert page.locator("h1").inner_text() != f"Rơ Mah Plơi{uid}"
        assert f"Plơi{uid}" not in page.content()
        axe_check(page)
        page.fill("#reason", "Bệnh nhân hôn mê tại khoa cấp cứu, cần tiền sử dị ứng")
        page.click("form.break-glass button[type=submit]")
        page.wait_for_load_state("networkidle")
        assert page.locator("h1#patient-name").inner_text().startswith(f"Rơ Mah Plơi{uid}")
        assert page.locator("[role=alert]").is_visible()
        assert "Penicillin" in page.locator("#allergies-title + ul").inner_text()
        axe_check(page)
        screenshot(page, "clinician-break-glass")
    finally:
        page.context.close()
