"""The operator console in real Chromium (Playwright, Debian's chromium): an admin disables a
user with the htmx button, and that user can no longer log in (the login page says so) and
their open session stops; a facility admin reviews a break-glass alert; every console page
passes axe-core (no serious or critical violation) and runs under the Content-Security-Policy
without a violation. Screenshots: console-users, console-connectors, console-health,
console-audit (var/screenshots, not committed)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from conftest import WebHub, axe_check, login_page, make_token, new_page, screenshot

from hub.auth import users
from hub.auth.principal import Role

pytestmark = pytest.mark.pages

IAKRAI = "vn-demo-org-tyt-iakrai"


def _csp_violations(page: Any) -> list[str]:
    found: list[str] = []
    page.on(
        "console",
        lambda message: found.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return found


def test_admin_disables_a_user_who_then_cannot_log_in(browser: Any, web_hub: WebHub, uid: str) -> None:
    name = f"bs.off-{uid}"
    users.add_user(
        web_hub.engine, name, "clinician", fhir_user="Practitioner/vn-demo-practitioner-1",
        organizations=[IAKRAI], password="mat-khau-off",
    )  # fmt: skip
    victim = new_page(browser)
    login_page(victim, web_hub, name, "mat-khau-off")
    victim.goto(f"{web_hub.url}/account")
    assert "/login" not in victim.url

    admin = new_page(browser)
    violations = _csp_violations(admin)
    login_page(admin, web_hub, "admin")
    admin.goto(f"{web_hub.url}/console/users?role=clinician")
    axe_check(admin)
    admin.on("dialog", lambda dialog: dialog.accept())  # "Disable …? Their logins … stop at once."
    row = admin.locator("tr", has=admin.locator(f"a:text-is('{name}')"))
    row.locator("button.danger").click()
    # htmx swapped the row: it now says disabled and offers to enable; the live region speaks.
    row.locator("button:not(.danger)").wait_for()
    assert row.locator(".badge.danger").inner_text() == "Đã khóa"
    admin.wait_for_function("() => document.getElementById('live').textContent.includes('Đã khóa')")
    assert users.get_user(web_hub.engine, name).disabled  # type: ignore[union-attr]
    screenshot(admin, "console-users")

    # The open session is over: the next page sends the victim to the login page.
    victim.goto(f"{web_hub.url}/account")
    assert "/login" in victim.url
    victim.fill("#username", name)
    victim.fill("#password", "mat-khau-off")
    victim.click("form[action='/login'] button[type=submit]")
    victim.wait_for_load_state("networkidle")
    assert "/login" in victim.url
    assert "bị khóa" in victim.locator("[role=alert]").inner_text()  # wrong password or disabled
    assert not violations, violations
    victim.context.close()
    admin.context.close()


def test_facility_admin_reviews_a_break_glass_alert(browser: Any, web_hub: WebHub, uid: str) -> None:
    token = make_token(
        web_hub, role=Role.CLINICIAN, fhir_user="Practitioner/vn-demo-practitioner-1",
        organizations=[IAKRAI], username=f"bs.bg-{uid}",
    )  # fmt: skip
    with web_hub.client(token) as clinician:
        opened = clinician.get(
            "Patient/vn-demo-patient-2", headers={"X-Break-Glass-Reason": f"unconscious on arrival {uid}"}
        )
        assert opened.status_code == 200, opened.text[:300]
    page = new_page(browser)
    violations = _csp_violations(page)
    login_page(page, web_hub, "qtv.iakrai")
    page.goto(f"{web_hub.url}/console/break-glass?status=open")
    card = page.locator("section.card", has_text=uid)
    card.wait_for()
    axe_check(page)
    card.locator("input[value=justified]").check()
    card.locator("textarea").fill("Bệnh nhân bất tỉnh, đúng quy trình cấp cứu")
    card.locator("button[type=submit]").click()
    page.wait_for_load_state("networkidle")
    assert page.locator("p.success").is_visible()
    reviewed = page.locator("section.card", has_text=uid)
    assert "Đã xem xét" in reviewed.locator("h2").inner_text()
    assert "Bệnh nhân bất tỉnh" in reviewed.inner_text()
    assert not violations, violations
    page.context.close()


def _source_with_a_dead_letter(hub: WebHub, uid: str) -> str:
    """A paused QĐ 130 source of a facility with one message dead-lettered (its error as the
    pipeline writes them), for the connectors page to show and replay."""
    from connectors import inbox, sources
    from connectors.model import Source
    from consent.context import system_access
    from hub.db.schema import connector_message

    name = f"ttyt-demo-{uid[:6]}"
    with system_access("test-console"):
        source = sources.add(
            hub.app.state.router,
            Source(
                name=name,
                facility_code=uid[:5].upper(),
                facility_name="Trung tâm Y tế huyện Ia Grai",
                facility_level="district",
                kind="xml130",
                paused=True,
            ),
        )
    received = inbox.receive(
        hub.engine, source, [f"<GIAMDINHHS>{n}-{uid}</GIAMDINHHS>".encode() for n in (1, 2)]
    )
    with hub.engine.begin() as conn:
        conn.execute(
            sa.update(connector_message)
            .where(connector_message.c.id == received[0].id)
            .values(
                state="dead",
                attempts=5,
                error="OperationalError (SQLSTATE 40P01): deadlock detected",
                error_where=None,
            )
        )
    return name


def test_console_pages_are_accessible(browser: Any, web_hub: WebHub, uid: str) -> None:
    source = _source_with_a_dead_letter(web_hub, uid)
    page = new_page(browser)
    violations = _csp_violations(page)
    login_page(page, web_hub, "admin")
    for path, shot in [
        ("/console", "console-overview"),
        ("/console/facilities", "console-facilities"),
        ("/console/break-glass", "console-break-glass"),
        ("/console/users/bs.tuan", "console-user"),
        ("/console/connectors", "console-connectors"),
        ("/console/health", "console-health"),
    ]:
        page.goto(f"{web_hub.url}{path}")
        assert page.locator("h1").count() == 1
        axe_check(page)
        if shot:
            screenshot(page, shot)
    # Replay the dead letter with its button: queued again, said so.
    page.goto(f"{web_hub.url}/console/connectors")
    section = page.locator("section.card", has_text=source)
    section.locator("form[action='/console/connectors/replay'] button").first.click()
    page.wait_for_load_state("networkidle")
    assert page.locator("p.success").is_visible()
    axe_check(page)
    page.goto(f"{web_hub.url}/console/audit")
    page.click("form[action='/console/audit/verify'] button")
    page.wait_for_load_state("networkidle")
    assert "Nguyên vẹn" in page.locator("#verify-result").inner_text()
    axe_check(page)
    screenshot(page, "console-audit")
    # A phone-sized screen: the tables scroll inside their wrapper, nothing is cut off.
    phone = new_page(browser, viewport=(390, 844))
    login_page(phone, web_hub, "qtv.iakrai")
    phone.goto(f"{web_hub.url}/console/users")
    axe_check(phone)
    screenshot(phone, "console-users-phone")
    for path in ("/console", "/console/break-glass", "/console/connectors", "/console/audit"):
        phone.goto(f"{web_hub.url}{path}")
        axe_check(phone)
    auditor = new_page(browser)
    login_page(auditor, web_hub, "auditor")
    for path in ("/console", "/console/users", "/console/facilities", "/console/audit"):
        auditor.goto(f"{web_hub.url}{path}")
        axe_check(auditor)
    auditor.context.close()
    assert not violations, violations
    phone.context.close()
    page.context.close()
