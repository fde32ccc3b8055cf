"""The pages' foundation over real HTTP: login, session cookie, CSRF, security headers,
language switch, logout, static files, error pages; on SQLite (the embedded default's smoke
test) and PostgreSQL.

The hub runs with the demo data and accounts (``web_hub``); the areas' own pages have their
own tests (test_pages_clinician/portal/console).
"""

from __future__ import annotations

import re

import httpx
import pytest
import sqlalchemy as sa
from conftest import WebHub, web_login

from hub.auth import users
from hub.db.schema import web_session


def _login_form(client: httpx.Client) -> str:
    assert client.get("/login").status_code == 200
    return client.cookies.get("hub_login_csrf") or ""


def test_login_sets_a_hardened_session_cookie_and_sends_each_role_home(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        token = _login_form(client)
        answer = client.post(
            "/login", data={"username": "bs.tuan", "password": "demo-clinician", "csrf_token": token}
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/clinician"
        cookie = answer.headers["set-cookie"]
        assert "hub_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Secure" not in cookie  # served over http here; https sets Secure (below)
        # The table holds the cookie's hash, never the cookie.
        value = client.cookies["hub_session"]
        with web_hub.engine.connect() as conn:
            hashes = conn.execute(sa.select(web_session.c.id_hash)).scalars().all()
        assert value not in hashes and len(hashes) >= 1
    for username, home in (("hoa.nguyen", "/portal"), ("admin", "/console"), ("auditor", "/console")):
        with web_login(web_hub, username) as client:
            assert client.get("/").headers["location"] == home


def test_wrong_password_unknown_user_and_disabled_account_get_one_answer(web_hub: WebHub, uid: str) -> None:
    users.add_user(
        web_hub.engine, f"off-{uid}", "clinician", fhir_user="Practitioner/x", password="pw-123456"
    )
    users.disable_user(web_hub.engine, f"off-{uid}")
    answers = []
    for username, password in (("bs.tuan", "wrong"), (f"nobody-{uid}", "x"), (f"off-{uid}", "pw-123456")):
        with httpx.Client(base_url=web_hub.url) as client:
            token = _login_form(client)
            answer = client.post(
                "/login", data={"username": username, "password": password, "csrf_token": token}
            )
            assert answer.status_code == 400 and "hub_session" not in answer.headers.get("set-cookie", "")
            answers.append(re.sub(r"[A-Za-z0-9_-]{43}|value=\"[^\"]*\"", "", answer.text))
    assert answers[0].count('role="alert"') == 1
    assert answers[1] == answers[2]  # unknown user and disabled account: the same page


def test_login_without_its_csrf_token_is_refused(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        _login_form(client)
        answer = client.post("/login", data={"username": "bs.tuan", "password": "demo-clinician"})
        assert answer.status_code == 403 and "hub_session" not in client.cookies
        answer = client.post(
            "/login", data={"username": "bs.tuan", "password": "demo-clinician", "csrf_token": "forged"}
        )
        assert answer.status_code == 403 and "hub_session" not in client.cookies


def test_state_changing_page_requests_need_the_sessions_csrf_token(web_hub: WebHub) -> None:
    with web_login(web_hub, "bs.tuan") as client:
        token = client.headers.pop("X-CSRF-Token")
        assert client.post("/logout").status_code == 403  # no token: still logged in
        assert client.post("/logout", data={"csrf_token": "x" * 43}).status_code == 403
        assert client.get("/account").status_code == 200
        # Another session's token does not work in this one.
        with web_login(web_hub, "hoa.nguyen") as other:
            assert (
                client.post("/logout", headers={"X-CSRF-Token": other.headers["X-CSRF-Token"]}).status_code
                == 403
            )
        answer = client.post("/logout", data={"csrf_token": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
        assert client.get("/account").status_code == 303  # the session is gone server-side


def test_logout_ends_the_session_even_for_a_stolen_cookie(web_hub: WebHub) -> None:
    with web_login(web_hub, "bs.tuan") as client:
        stolen = client.cookies["hub_session"]
        client.post("/logout")
    with httpx.Client(base_url=web_hub.url, cookies={"hub_session": stolen}) as thief:
        answer = thief.get("/clinician")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


def test_a_disabled_account_loses_its_open_session(web_hub: WebHub, uid: str) -> None:
    name = f"web-{uid}"
    users.add_user(web_hub.engine, name, "auditor", password="pw-123456")
    with web_login(web_hub, name, "pw-123456") as client:
        assert client.get("/account").status_code == 200
        users.disable_user(web_hub.engine, name)  # in this process: the verifier knows at once
        answer = client.get("/account")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


def test_pages_send_a_strict_content_security_policy_and_no_inline_script(web_hub: WebHub) -> None:
    with web_login(web_hub, "bs.tuan") as client:
        answer = client.get("/account")
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"
    html = answer.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert not re.search(r"\sstyle=", html), "inline style"


def test_language_switch_changes_the_texts_and_only_redirects_locally(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        assert "Đăng nhập" in client.get("/login").text  # Vietnamese by default
        answer = client.get("/lang/en", params={"next": "/login"})
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
        page = client.get("/login").text
        assert "Log in" in page and "Đăng nhập" not in page and '<html lang="en">' in page
        for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            assert client.get("/lang/en", params={"next": evil}).headers["location"] == "/"
        assert client.get("/lang/xx").status_code == 303  # an unknown language changes nothing
        assert "Log in" in client.get("/login").text


def test_login_next_parameter_cannot_send_the_user_elsewhere(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        token = _login_form(client)
        answer = client.post(
            "/login",
            data={
                "username": "bs.tuan",
                "password": "demo-clinician",
                "csrf_token": token,
                "next": "//evil.example/x",
            },
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/clinician"


def test_pages_need_a_login_and_say_so_without_data(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        for path in ("/clinician", "/portal", "/console", "/account"):
            answer = client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"] == "/login?next=" + path
        # htmx requests are sent to the login page with HX-Redirect.
        answer = client.get("/account", headers={"HX-Request": "true"})
        assert answer.status_code == 204 and answer.headers["hx-redirect"].startswith("/login")


def test_unknown_pages_answer_html_and_the_api_keeps_operation_outcome(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url, headers={"Accept": "text/html"}) as client:
        answer = client.get("/no-such-page")
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
        api = client.get("/fhir/Patient", headers={"Accept": "application/fhir+json"})
        assert api.status_code == 401 and api.json()["resourceType"] == "OperationOutcome"


def test_front_end_libraries_are_served_by_the_hub(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        for name in ("htmx.min.js", "alpine.min.js", "uPlot.iife.min.js", "uPlot.min.css"):
            answer = client.get(f"/static/vendor/{name}")
            assert answer.status_code == 200 and len(answer.content) > 1000, name
        assert client.get("/static/vendor/../package.json").status_code == 404
        assert client.get("/static/vendor/axe.min.js").status_code == 404  # test-only library
        assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("role_user", ["bs.tuan", "hoa.nguyen", "admin"])
def test_each_role_reaches_only_its_area(web_hub: WebHub, role_user: str) -> None:
    areas = {"bs.tuan": "/clinician", "hoa.nguyen": "/portal", "admin": "/console"}
    with web_login(web_hub, role_user) as client:
        for area in areas.values():
            answer = client.get(area)
            if area == areas[role_user]:
                assert answer.status_code == 200, (role_user, area, answer.text[:200])
            else:
                assert answer.status_code == 403, (role_user, area)
