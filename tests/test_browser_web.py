"""The login page and the shell every page shares, in real Chromium: axe-core (no serious
or critical violation), keyboard access, the language switch, a phone-sized viewport, and
that the page runs under its Content-Security-Policy without a violation."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import WebHub, axe_check, login_page, new_page, screenshot

pytestmark = pytest.mark.pages


def _csp_violations(page: Any) -> list[str]:
    found: list[str] = []
    page.on(
        "console",
        lambda message: found.append(message.text) if "Content Security Policy" in message.text else None,
    )
    return found


def test_login_page_is_accessible_and_switches_language(browser: Any, web_hub: WebHub) -> None:
    page = new_page(browser)
    violations = _csp_violations(page)
    page.goto(f"{web_hub.url}/login")
    assert page.locator("h1").inner_text() == "Đăng nhập"
    axe_check(page)
    screenshot(page, "login")
    page.click("a.lang")
    page.wait_for_load_state("networkidle")
    assert page.locator("h1").inner_text() == "Log in"
    assert page.locator("html").get_attribute("lang") == "en"
    axe_check(page)
    page.click("a.lang")  # back to Vietnamese for whoever uses this context next
    assert not violations, violations
    page.context.close()


def test_wrong_password_is_announced_and_keyboard_login_works(browser: Any, web_hub: WebHub) -> None:
    page = new_page(browser)
    page.goto(f"{web_hub.url}/login")
    page.fill("#username", "bs.tuan")
    page.fill("#password", "wrong")
    page.keyboard.press("Enter")
    page.wait_for_load_state("networkidle")
    assert page.locator("[role=alert]").is_visible()
    axe_check(page)
    page.fill("#password", "demo-clinician")
    page.keyboard.press("Enter")
    page.wait_for_url("**/clinician**")
    page.context.close()


def test_shell_on_a_phone_viewport_logs_out(browser: Any, web_hub: WebHub) -> None:
    page = new_page(browser, viewport=(390, 844))
    violations = _csp_violations(page)
    login_page(page, web_hub, "hoa.nguyen")
    page.goto(f"{web_hub.url}/account")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    axe_check(page)
    screenshot(page, "account-phone")
    page.click("form[action='/logout'] button")
    page.wait_for_url("**/login")
    page.goto(f"{web_hub.url}/account")
    assert "/login" in page.url
    assert not violations, violations
    page.context.close()
