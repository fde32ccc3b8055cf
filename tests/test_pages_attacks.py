"""The pages attacked over real HTTP (``web_hub``: the demo data and accounts): what a patient,
a proxy, a clinician of another facility, a facility admin, an auditor, a guest or an anonymous
caller could read, infer, write or exhaust through the pages, their parameters, htmx partials,
forms, error pages, redirects, cookies and the audit trail.

Covers: CSRF on every state-changing page route (enumerated from the app, so a new route is
covered by itself) and no cookie-authenticated write outside the pages; the session (fixation,
cookie flags, absolute and idle expiry, logout everywhere, what the table holds); open
redirects and header injection; reflection in error pages; resources carrying markup shown
as text on every page that shows them; pages never showing what the API hides; hidden and
missing records answering alike; proxies and patients confined to their records; break-glass
from the page; every record view audited; facility admins' console without patient data;
htmx partials guarded like pages.
Calls: the running hub (pages and, for comparison, /fhir with the same account's token).
Called by: pytest (PostgreSQL run: ``pages`` marker).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from conftest import ADMIN_AUTH, DEMO_DIR, LiveServer, WebHub, auth_env, web_login
from fastapi.routing import APIRoute

from hub.auth import users
from hub.auth.tokens import AuthError
from hub.db.schema import web_session

pytestmark = pytest.mark.pages

PAGE_PREFIXES = ("/login", "/logout", "/lang", "/account", "/clinician", "/portal", "/console")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_TEXT = "did not come from this site"  # the English CSRF error page
HOA = "vn-demo-patient-1"


# --- helpers ----------------------------------------------------------------------------------


def _english(client: httpx.Client) -> httpx.Client:
    client.cookies.set("hub_lang", "en")
    return client


def _login(hub: WebHub, username: str, password: str | None = None) -> httpx.Client:
    return _english(web_login(hub, username, password))


def _fhir(hub: WebHub, token: str | None = None) -> httpx.Client:
    headers = {"Accept": "application/fhir+json"}
    headers["Authorization"] = f"Bearer {token}" if token else ADMIN_AUTH["Authorization"]
    return httpx.Client(base_url=f"{hub.url}/fhir", headers=headers, timeout=60)


def _token_of(hub: WebHub, username: str) -> str:
    """A bearer token of the same account a page session runs as."""
    user = users.get_user(hub.engine, username)
    assert user is not None
    return hub.tokens.issue(user)


def _api_routes(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every APIRoute with its full path, into included routers (FastAPI >= 0.165 keeps them
    as lazily expanded ``_IncludedRouter`` entries of ``app.routes``)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif hasattr(route, "original_router"):
            context = getattr(route, "include_context", None)
            yield from _api_routes(
                route.original_router.routes, prefix + (getattr(context, "prefix", "") or "")
            )


def _page_routes(hub: LiveServer) -> list[tuple[str, str]]:
    """(method, path) of every state-changing route of the app."""
    found = []
    for path, route in _api_routes(hub.app.routes):
        for method in sorted(route.methods or ()):
            if method in STATE_CHANGING:
                found.append((method, path))
    return found


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PREFIXES)


def _fill(path: str) -> str:
    """The route's path with harmless values (ids that exist nowhere)."""

    def value(match: re.Match[str]) -> str:
        name, convertor = match.group(1), match.group(2) or ""
        return "987654321" if convertor == ":int" else f"no-such-{name}-x"

    return re.sub(r"\{(\w+)(:\w+)?\}", value, path)


def _without_tokens(text: str) -> str:
    """A page with its per-session and per-request secrets blanked."""
    text = re.sub(r'"X-CSRF-Token": "[^"]+"', '"X-CSRF-Token": ""', text)
    return re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value=""', text)


def _where_browser_goes(hub: WebHub, location: str) -> str:
    """The host a browser would go to for this Location (WHATWG: tabs and newlines removed,
    backslashes as slashes, leading controls and spaces trimmed)."""
    cleaned = re.sub(r"[\t\n\r]", "", location).strip("\x00 \x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c")
    cleaned = cleaned.replace("\\", "/")
    return urlsplit(urljoin(hub.url + "/", cleaned)).netloc


def _session_row(hub: WebHub, cookie: str) -> Any:
    with hub.engine.connect() as conn:
        return conn.execute(
            sa.select(web_session).where(web_session.c.id_hash == hashlib.sha256(cookie.encode()).hexdigest())
        ).first()


@pytest.fixture(scope="module")
def sessions(web_hub: WebHub) -> Iterator[dict[str, httpx.Client]]:
    clients = {name: _login(web_hub, name) for name in ("bs.tuan", "hoa.nguyen", "admin")}
    yield clients
    for client in clients.values():
        client.close()


# --- CSRF -------------------------------------------------------------------------------------


def test_the_app_has_the_page_routes_this_file_attacks(web_hub: WebHub) -> None:
    paths = {(m, p) for m, p in _page_routes(web_hub) if _is_page(p)}
    for expected in (
        ("POST", "/login"),
        ("POST", "/logout"),
        ("POST", "/clinician/patients/{patient_id}/break-glass"),
        ("POST", "/portal/consents"),
        ("POST", "/console/users/{username}/disable"),
    ):
        assert expected in paths, (expected, sorted(paths))


def test_every_state_changing_page_route_refuses_a_request_without_the_sessions_token(
    web_hub: WebHub, sessions: dict[str, httpx.Client]
) -> None:
    routes = [(m, p) for m, p in _page_routes(web_hub) if _is_page(p)]
    other_token = sessions["hoa.nguyen"].headers["X-CSRF-Token"]
    checked = 0
    for method, path in routes:
        url = _fill(path)
        if path == "/login":
            continue  # a double-submit cookie, not a session: tests/test_pages_web.py and below
        for name, client in sessions.items():
            token = client.headers["X-CSRF-Token"]
            attempts: list[tuple[str, dict[str, Any]]] = [
                ("no token", {"headers": {"X-CSRF-Token": ""}}),
                ("another session's token", {"headers": {"X-CSRF-Token": other_token}}),
                ("forged token", {"headers": {"X-CSRF-Token": "A" * 43}}),
                (
                    "token in the query only",
                    {"headers": {"X-CSRF-Token": ""}, "params": {"csrf_token": token}},
                ),
                (
                    "a cross-site text/plain form",
                    {
                        "headers": {"X-CSRF-Token": "", "Content-Type": "text/plain"},
                        "content": f"csrf_token={token}",
                    },
                ),
            ]
            if name == "hoa.nguyen":
                attempts = attempts[:1] + attempts[2:]  # her own token is "another session's" for others
            for what, options in attempts:
                answer = client.request(method, url, **options)
                assert answer.status_code == 403 and CSRF_TEXT in answer.text, (
                    name,
                    method,
                    url,
                    what,
                    answer.status_code,
                    answer.text[:300],
                )
                checked += 1
        # Anonymous: sent to the login page, never served.
        with httpx.Client(base_url=web_hub.url) as anonymous:
            answer = anonymous.request(method, url, data={"csrf_token": "x"})
            assert answer.status_code in (303, 403), (method, url, answer.status_code)
            assert answer.status_code == 403 or answer.headers["location"].startswith("/login")
    assert checked >= 5 * 3 * 4


def test_with_the_sessions_token_the_same_requests_pass_the_csrf_check(
    web_hub: WebHub, sessions: dict[str, httpx.Client]
) -> None:
    """The refusals above are the CSRF check's, not an accident of the dummy ids."""
    for method, path in _page_routes(web_hub):
        if not _is_page(path) or path in ("/login", "/logout"):
            continue
        for client in sessions.values():
            answer = client.request(method, _fill(path))
            assert CSRF_TEXT not in answer.text, (method, path, answer.status_code)


def test_no_write_outside_the_pages_is_accepted_on_a_session_cookie_alone(
    web_hub: WebHub, sessions: dict[str, httpx.Client]
) -> None:
    """Cookies ride along on cross-site requests: every other state-changing route (the FHIR,
    auth, access and connector APIs) must want a bearer token, never the page session."""
    admin = sessions["admin"]
    cookies = {"hub_session": admin.cookies["hub_session"]}
    for method, path in _page_routes(web_hub):
        if _is_page(path) or path.startswith("/auth/"):
            continue
        url = _fill(path)
        with httpx.Client(base_url=web_hub.url, cookies=cookies, timeout=60) as client:
            answer = client.request(
                method, url, content=b"{}", headers={"Content-Type": "application/fhir+json"}
            )
        assert answer.status_code in (400, 401, 404, 405, 415), (method, path, answer.status_code)
        assert answer.status_code < 200 or answer.status_code >= 300


def test_refused_writes_change_nothing(web_hub: WebHub, sessions: dict[str, httpx.Client], uid: str) -> None:
    name = f"csrf-victim-{uid}"
    users.add_user(web_hub.engine, name, "auditor", password="pw-123456")
    admin = sessions["admin"]
    answer = admin.post(f"/console/users/{name}/disable", headers={"X-CSRF-Token": ""})
    assert answer.status_code == 403
    victim = users.get_user(web_hub.engine, name)
    assert victim is not None and not victim.disabled
    hoa = sessions["hoa.nguyen"]
    with _fhir(web_hub) as api:
        before = api.get("Consent", params={"patient": HOA, "_summary": "count"}).json()["total"]
        answer = hoa.post(
            "/portal/consents",
            data={"actor": "Organization/vn-demo-org-bvdk-ankhe", "purpose": "TREAT", "category": "N"},
            headers={"X-CSRF-Token": ""},
        )
        assert answer.status_code == 403
        assert api.get("Consent", params={"patient": HOA, "_summary": "count"}).json()["total"] == before


def test_the_login_form_needs_its_own_double_submit_token(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as client:
        client.get("/login")
        good = client.cookies["hub_login_csrf"]
        # The cookie alone, the field alone, or two different values: refused.
        for cookie, field in ((good, ""), ("", good), (good, "B" * 43)):
            client.cookies.set("hub_login_csrf", cookie)
            answer = client.post(
                "/login", data={"username": "bs.tuan", "password": "demo-clinician", "csrf_token": field}
            )
            assert answer.status_code == 403 and "hub_session" not in answer.headers.get("set-cookie", "")


# --- session ----------------------------------------------------------------------------------


def test_a_session_cookie_planted_before_login_is_never_adopted(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as attacker:  # the attacker's own valid session
        token = attacker.get("/login") and attacker.cookies["hub_login_csrf"]
        attacker.post("/login", data={"username": "proxy", "password": "demo-proxy", "csrf_token": token})
        attackers_cookie = attacker.cookies["hub_session"]
    for planted in ("attacker-chosen-value-" + "x" * 30, attackers_cookie):
        with httpx.Client(base_url=web_hub.url) as victim:
            victim.cookies.set("hub_session", planted)
            token = victim.get("/login") and victim.cookies["hub_login_csrf"]
            answer = victim.post(
                "/login", data={"username": "hoa.nguyen", "password": "demo-patient", "csrf_token": token}
            )
            assert answer.status_code == 303
            issued = re.search(r"hub_session=([^;]+)", answer.headers["set-cookie"])
            assert issued and issued.group(1) != planted
        # The planted value never becomes Hoa's session: the login retired it.
        with httpx.Client(base_url=web_hub.url, cookies={"hub_session": planted}) as later:
            account = later.get("/account")
            assert account.status_code == 303 and "hoa.nguyen" not in account.text


def test_cookies_are_secure_when_the_hub_is_served_over_https(web_hub: WebHub) -> None:
    with LiveServer(web_hub.settings.database_url, base_url="https://hub.example.vn/fhir") as https_hub:
        base = f"http://127.0.0.1:{https_hub.port}"
        with httpx.Client(base_url=base) as client:
            form = client.get("/login")
            login_cookie = form.headers["set-cookie"]
            assert (
                "hub_login_csrf=" in login_cookie and "Secure" in login_cookie and "HttpOnly" in login_cookie
            )
            token = re.search(r"hub_login_csrf=([^;]+)", login_cookie)
            assert token
            answer = client.post(
                "/login",
                data={"username": "auditor", "password": "demo-auditor", "csrf_token": token.group(1)},
                headers={"Cookie": f"hub_login_csrf={token.group(1)}"},
            )
            assert answer.status_code == 303
            session = [c for c in answer.headers.get_list("set-cookie") if c.startswith("hub_session=")]
            assert session and "Secure" in session[0] and "HttpOnly" in session[0]
            assert "samesite=lax" in session[0].lower() or "samesite=strict" in session[0].lower()
            lang = client.get("/lang/en", params={"next": "/login"}).headers["set-cookie"]
            assert "hub_lang=en" in lang and "Secure" in lang


def test_a_session_ends_at_its_absolute_expiry_and_when_idle(web_hub: WebHub) -> None:
    settings = web_hub.settings
    for column in ("expires", "last_seen"):
        with _login(web_hub, "auditor") as client:
            cookie = client.cookies["hub_session"]
            row = _session_row(web_hub, cookie)
            assert row is not None
            lifetime = _aware(row.expires) - _aware(row.created)
            assert abs(lifetime - timedelta(hours=settings.web_session_hours)) < timedelta(seconds=5)
            assert client.get("/account").status_code == 200
            now = datetime.now(UTC)
            moved = (
                {"expires": now - timedelta(seconds=1)}
                if column == "expires"
                else {"last_seen": now - timedelta(minutes=settings.web_session_idle_minutes, seconds=5)}
            )
            with web_hub.engine.begin() as conn:
                conn.execute(
                    sa.update(web_session).where(web_session.c.id_hash == row.id_hash).values(**moved)
                )
            answer = client.get("/account")
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login"), column
            assert _session_row(web_hub, cookie) is None, column  # the row is gone, not just refused


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_disabling_an_account_in_the_console_logs_it_out_everywhere(
    web_hub: WebHub, sessions: dict[str, httpx.Client], uid: str
) -> None:
    name = f"two-browsers-{uid}"
    users.add_user(web_hub.engine, name, "auditor", password="pw-123456")
    browsers = [_login(web_hub, name, "pw-123456") for _ in range(2)]
    try:
        assert all(b.get("/account").status_code == 200 for b in browsers)
        answer = sessions["admin"].post(f"/console/users/{name}/disable")
        assert answer.status_code in (200, 303)
        with web_hub.engine.connect() as conn:
            left = conn.execute(sa.select(sa.func.count()).where(web_session.c.username == name)).scalar()
        assert left == 0
        for browser in browsers:
            assert browser.get("/account").status_code == 303
        # And the login form refuses it.
        with httpx.Client(base_url=web_hub.url) as again:
            token = again.get("/login") and again.cookies["hub_login_csrf"]
            answer = again.post(
                "/login", data={"username": name, "password": "pw-123456", "csrf_token": token}
            )
            assert answer.status_code == 400
    finally:
        for browser in browsers:
            browser.close()


def test_the_session_table_holds_neither_cookies_nor_usable_tokens(web_hub: WebHub) -> None:
    with _login(web_hub, "bs.tuan") as client:
        cookie = client.cookies["hub_session"]
        row = _session_row(web_hub, cookie)
        assert row is not None
        with web_hub.engine.connect() as conn:
            everything = [str(v) for r in conn.execute(sa.select(web_session)) for v in r]
        assert not any(cookie in value for value in everything)
        # A database reader cannot act as the user with what the row holds.
        with pytest.raises(AuthError):
            web_hub.tokens.verify(row.token)
        with _fhir(web_hub, row.token) as api:
            assert api.get("Patient", params={"_count": "1"}).status_code == 401
        with httpx.Client(base_url=web_hub.url, cookies={"hub_session": row.id_hash}) as thief:
            assert thief.get("/account").status_code == 303


def test_oversized_or_odd_session_cookies_are_simply_no_session(web_hub: WebHub) -> None:
    for value in ("x" * 5000, "", "'; DROP TABLE web_session; --", "\u00e9" * 10):
        with httpx.Client(base_url=web_hub.url) as client:
            client.headers["Cookie"] = f"hub_session={value}".encode("utf-8", "replace").decode("latin-1")
            answer = client.get("/account")
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")


# --- redirects and reflection -----------------------------------------------------------------

EVIL_TARGETS = [
    "//evil.example/",
    "https://evil.example/",
    "http:evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    " //evil.example",
    "/%2F/evil.example",
    "/%5Cevil.example",
    "javascript:alert(1)",
    "/\r\nSet-Cookie: injected=1",
    "/%0d%0aSet-Cookie:%20injected=1",
    "/\x00//evil.example",
]


@pytest.mark.parametrize("evil", EVIL_TARGETS, ids=[f"t{i}" for i in range(len(EVIL_TARGETS))])
def test_no_redirect_leaves_the_hub_or_injects_a_header(web_hub: WebHub, evil: str) -> None:
    host = urlsplit(web_hub.url).netloc
    with httpx.Client(base_url=web_hub.url) as client:
        answers = [client.get("/lang/en", params={"next": evil})]
        token = client.get("/login") and client.cookies["hub_login_csrf"]
        answers.append(
            client.post(
                "/login",
                data={"username": "auditor", "password": "demo-auditor", "csrf_token": token, "next": evil},
            )
        )
        # Logged in, a page that needs another role, and the login page's own next field.
        answers.append(client.get("/login", params={"next": evil}))
    for answer in answers:
        assert "injected" not in answer.headers.get("set-cookie", "")
        assert not any(name.lower() == "injected" for name in answer.headers)
        location = answer.headers.get("location")
        if location is not None:
            assert "\r" not in location and "\n" not in location
            assert _where_browser_goes(web_hub, location) == host, (evil, location)
    # The login page keeps no foreign target in its form.
    kept = re.search(r'name="next" value="([^"]*)"', answers[2].text)
    assert kept is None or _where_browser_goes(web_hub, html.unescape(kept.group(1))) == host


def test_the_login_redirect_after_a_timeout_keeps_the_user_on_the_hub(web_hub: WebHub) -> None:
    host = urlsplit(web_hub.url).netloc
    with httpx.Client(base_url=web_hub.url) as client:
        answer = client.get("/clinician", params={"q": "//evil.example/"})
        assert answer.status_code == 303
        assert _where_browser_goes(web_hub, answer.headers["location"]) == host
        next_value = answer.headers["location"].split("next=", 1)[1]
        login = client.get("/login?next=" + next_value)
        assert 'name="next" value="/clinician?q=%2F%2Fevil.example%2F"' in login.text
        token = client.cookies["hub_login_csrf"]
        done = client.post(
            "/login",
            data={
                "username": "bs.tuan",
                "password": "demo-clinician",
                "csrf_token": token,
                "next": "/clinician?q=%2F%2Fevil.example%2F",
            },
        )
        assert done.headers["location"] == "/clinician?q=%2F%2Fevil.example%2F"


XSS = '"><script>alert(1)</script><img src=x onerror=alert(1)>'
RAW_MARKERS = ("<script>alert(1)", "<img src=x onerror", "onerror=alert(1)>")


def _no_raw_markup(text: str, where: str) -> None:
    for marker in RAW_MARKERS:
        assert marker not in text, (where, marker, text[max(0, text.find(marker) - 200) :][:400])


def test_error_pages_and_forms_do_not_reflect_markup(
    web_hub: WebHub, sessions: dict[str, httpx.Client]
) -> None:
    from urllib.parse import quote

    with httpx.Client(base_url=web_hub.url, headers={"Accept": "text/html"}) as anonymous:
        for path in (
            "/no-such/" + quote(XSS, safe=""),
            "/login?next=/" + quote(XSS, safe=""),
            "/login?next=" + quote(XSS, safe=""),
            "/clinician/patients/" + quote(XSS, safe="") + "?x=" + quote(XSS, safe=""),
            "/static/" + quote(XSS, safe=""),
        ):
            answer = anonymous.get(path)
            _no_raw_markup(answer.text, path)
            _no_raw_markup(answer.headers.get("location", ""), path)
        token = anonymous.get("/login") and anonymous.cookies["hub_login_csrf"]
        answer = anonymous.post("/login", data={"username": XSS, "password": "x", "csrf_token": token})
        assert answer.status_code == 400
        _no_raw_markup(answer.text, "login username")
    q = quote(XSS, safe="")
    per_user = {
        "bs.tuan": [
            f"/clinician?q={q}",
            f"/clinician?q=hoa&cursor={q}",
            f"/clinician/patients/{q}",
        ],
        "hoa.nguyen": [
            f"/portal?patient={q}",
            f"/portal/consents?patient={q}&done={q}",
            f"/portal/access-log?patient={q}&cursor={q}&mine={q}",
            f"/portal/access-log?cursor={q}",
            f"/portal/download?patient={q}",
            f"/portal/family?patient={q}",
        ],
        "admin": [
            f"/console/users?role={q}&org={q}&disabled={q}",
            f"/console/users/{q}",
            f"/console/break-glass?status={q}",
            f"/console/facilities?x={q}",
        ],
    }
    for username, paths in per_user.items():
        client = sessions[username]
        for path in paths:
            answer = client.get(path)
            assert answer.status_code < 500, (path, answer.status_code)
            _no_raw_markup(answer.text, path)
    # Form fields shown back after a refusal.
    tuan = sessions["bs.tuan"]
    # Too long a reason: refused (no break-glass) and shown back in its textarea.
    reason = "</textarea>" + XSS + "x" * 500
    answer = tuan.post(f"/clinician/patients/{HOA}/break-glass", data={"reason": reason})
    assert answer.status_code == 400 and "</textarea><script>" not in answer.text
    admin = sessions["admin"]
    for path, data in (
        ("/console/users", {"username": XSS, "role": "auditor", "organizations": XSS, "fhir_user": XSS}),
        ("/console/facilities", {"name": XSS, "code": "12", "level": "commune"}),
        ("/console/break-glass/987654321/review", {"verdict": XSS, "note": XSS}),
        ("/console/connectors/replay", {"source": XSS, "id": XSS}),
    ):
        answer = admin.post(path, data=data)
        assert answer.status_code in (400, 403, 404, 409, 422), (path, answer.status_code)
        _no_raw_markup(answer.text, path)
    hoa = sessions["hoa.nguyen"]
    answer = hoa.post("/portal/consents", data={"actor": XSS, "purpose": XSS, "category": XSS, "end": XSS})
    assert answer.status_code == 400
    _no_raw_markup(answer.text, "portal grant")


def _demo_resources() -> dict[tuple[str, str], dict[str, Any]]:
    bundle = json.loads((DEMO_DIR / "vn-demo.json").read_text(encoding="utf-8"))
    return {
        (e["resource"]["resourceType"], e["resource"]["id"]): e["resource"] for e in bundle.get("entry") or []
    }


def _uid() -> str:
    return uuid.uuid4().hex[:12]


# --- what pages show is what the API shows ----------------------------------------------------

CLINICIANS = ("bs.tuan", "bs.ha", "bs.khanh")
PORTAL_USERS = ("hoa.nguyen", "proxy", "hoa.proxy")
DEMO_PATIENTS = [f"vn-demo-patient-{n}" for n in range(1, 6)]
PSY_TEXT = "Giai đoạn trầm cảm nhẹ"  # Hoa's PSY-labelled Condition (demo/README.md)


def _texts(resource: dict[str, Any]) -> set[str]:
    """The words of a resource a page could show: names, coded texts and displays, notes,
    narratives (as text), string values, identifiers' values."""
    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            if key == "meta":
                return
            if "family" in value or "given" in value:
                from hub.web.render import human_name

                found.add(human_name([value]))
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if key == "div":
                found.update(t.strip() for t in re.split(r"<[^>]+>", value) if t.strip())
            elif key in ("text", "display", "valueString", "name", "description", "title", "line", "value"):
                found.add(value.strip())

    walk(resource)
    return {t for t in found if len(t) >= 8 and not t.startswith(("http", "urn:"))}


def _visible(hub: WebHub, token: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The demo resources this token reads through /fhir, and those it does not."""
    seen, hidden = set(), set()
    with _fhir(hub, token) as api:
        for key in _demo_resources():
            answer = api.get(f"{key[0]}/{key[1]}")
            assert answer.status_code in (200, 403, 404), (key, answer.status_code)
            (seen if answer.status_code == 200 else hidden).add(key)
    return seen, hidden


def _pages_of(username: str) -> list[str]:
    if username in CLINICIANS:
        pages = ["/clinician?q=nguyen", "/clinician?q=tran", "/clinician?q=ksor", "/clinician?q=le van"]
        return pages + [f"/clinician/patients/{p}" for p in DEMO_PATIENTS]
    pages = ["/portal", "/portal/family", "/portal/consents", "/portal/access-log?mine=1"]
    for patient in DEMO_PATIENTS:
        pages += [f"/portal?patient={patient}", f"/portal/consents?patient={patient}"]
    return pages


@pytest.mark.parametrize("username", CLINICIANS + PORTAL_USERS)
def test_pages_never_show_what_the_api_hides_from_the_same_person(web_hub: WebHub, username: str) -> None:
    resources = _demo_resources()
    seen, hidden = _visible(web_hub, _token_of(web_hub, username))
    shown_anyway = set().union(*(_texts(resources[k]) for k in seen)) if seen else set()
    secret = set().union(*(_texts(resources[k]) for k in hidden)) - shown_anyway if hidden else set()
    assert secret, "the demo world hides something from everyone but the admin"
    with _login(web_hub, username) as client:
        # The pages' own words (the search help names "Nguyễn Thị Hoa" as an example) are not a leak.
        chrome = html.unescape(
            client.get("/clinician?q=zzqxzzqx" if username in CLINICIANS else "/account").text
        )
        secret = {t for t in secret if t not in chrome}
        for path in _pages_of(username):
            for headers in ({}, {"HX-Request": "true"}):
                answer = client.get(path, headers=headers)
                assert answer.status_code in (200, 303, 404), (path, answer.status_code)
                text = html.unescape(answer.text)
                leaked = sorted(t for t in secret if t in text)
                assert not leaked, (username, path, leaked[:5])


def test_the_psy_condition_is_shown_to_hoa_and_to_nobody_else(web_hub: WebHub) -> None:
    """The positive control of the test above: the page does show the sensitive Condition to
    the one person the API shows it to."""
    with _login(web_hub, "hoa.nguyen") as hoa:
        assert PSY_TEXT in html.unescape(hoa.get("/portal").text)
    for username, path in (
        ("bs.tuan", f"/clinician/patients/{HOA}"),
        ("bs.ha", f"/clinician/patients/{HOA}"),
    ):
        with _login(web_hub, username) as client:
            page = client.get(path)
            assert page.status_code == 200 and "Nguyễn Thị Hoa" in html.unescape(page.text)
            assert PSY_TEXT not in html.unescape(page.text) and "F32" not in page.text
    with _login(web_hub, "proxy") as proxy:
        page = proxy.get(f"/portal?patient={HOA}")
        assert page.status_code == 200 and PSY_TEXT not in html.unescape(page.text)


@pytest.mark.parametrize("username", PORTAL_USERS)
def test_the_download_holds_only_what_the_api_lets_the_same_person_read(
    web_hub: WebHub, username: str
) -> None:
    token = _token_of(web_hub, username)
    with _login(web_hub, username) as client, _fhir(web_hub, token) as api:
        for patient in DEMO_PATIENTS:
            answer = client.get("/portal/download", params={"patient": patient})
            readable = api.get(f"Patient/{patient}").status_code == 200
            if not readable:
                assert answer.status_code == 404, (username, patient)
                assert "application/fhir+json" not in answer.headers.get("content-type", "")
                continue
            assert answer.status_code == 200
            entries = answer.json()["entry"]
            assert entries
            for entry in entries:
                resource = entry["resource"]
                key = f"{resource['resourceType']}/{resource['id']}"
                assert api.get(key).status_code == 200, (username, patient, key)


# --- markup in resources is shown as text -----------------------------------------------------

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"  # how the payload must appear in a page


class World:
    """A citizen (managed by bs.tuan's station) whose every field carries markup, with an
    Organization, a Practitioner, an Encounter, a Condition, an Observation, a CarePlan, a
    Composition (its narrative shown through the sanitiser), a Consent to the Organization; a patient account."""

    def __init__(self, hub: WebHub) -> None:
        uid = _uid()
        self.uid = uid
        self.payload = f'"><script>alert(1)</script><img src=x onerror=alert(1)> {uid}'
        self.patient = f"atk-{uid}"
        self.org = f"atk-org-{uid}"
        self.practitioner = f"atk-pr-{uid}"
        self.cccd = "0" + str(uuid.uuid4().int)[:11]
        self.username = f"atk-pt-{uid}"
        narrative = {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>Ghi chú <a href="javascript:alert(1)">{uid}</a>'
            f"<b>ok-{uid}</b></p></div>",
        }
        p = self.payload
        resources: list[dict[str, Any]] = [
            {
                "resourceType": "Organization",
                "id": self.org,
                "name": f"Phòng khám {p}",
                "identifier": [{"system": "https://ehealth-hub.vn/sid/cskcb", "value": uid[:5]}],
            },
            {
                "resourceType": "Practitioner",
                "id": self.practitioner,
                "name": [{"family": p, "given": ["BS"]}],
            },
            {
                "resourceType": "Patient",
                "id": self.patient,
                "text": narrative,
                "identifier": [{"system": "https://ehealth-hub.vn/sid/cccd", "value": self.cccd}],
                "name": [{"use": "official", "family": f"Atk{uid}", "given": [p], "text": f"Atk{uid} {p}"}],
                "gender": "female",
                "birthDate": "1990-01-01",
                "address": [{"line": [p], "city": p, "text": f"{p}, Gia Lai"}],
                "managingOrganization": {"reference": "Organization/vn-demo-org-tyt-iakrai"},
                "generalPractitioner": [{"reference": f"Practitioner/{self.practitioner}"}],
            },
            {
                "resourceType": "Encounter",
                "id": f"atk-enc-{uid}",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [{"text": f"Khám {p}"}],
                "subject": {"reference": f"Patient/{self.patient}"},
                "period": {"start": "2026-01-05T08:00:00+07:00", "end": "2026-01-05T08:30:00+07:00"},
                "reasonCode": [{"text": f"Lý do {p}"}],
                "serviceProvider": {"reference": f"Organization/{self.org}"},
            },
            {
                "resourceType": "Condition",
                "id": f"atk-cond-{uid}",
                "text": narrative,
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "code": {
                    "coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": p}],
                    "text": p,
                },
                "subject": {"reference": f"Patient/{self.patient}"},
                "encounter": {"reference": f"Encounter/atk-enc-{uid}"},
                "recordedDate": "2026-01-05",
                "note": [{"text": f"Ghi chú {p}"}],
            },
            {
                "resourceType": "Observation",
                "id": f"atk-obs-{uid}",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": "2345-7"}],
                    "text": f"Glucose {p}",
                },
                "subject": {"reference": f"Patient/{self.patient}"},
                "encounter": {"reference": f"Encounter/atk-enc-{uid}"},
                "effectiveDateTime": "2026-01-05T08:10:00+07:00",
                "valueQuantity": {
                    "value": 6.1,
                    "unit": p,
                    "system": "http://unitsofmeasure.org",
                    "code": "mmol/L",
                },
                "referenceRange": [{"text": p, "low": {"value": 3.9}, "high": {"value": 6.4}}],
                "note": [{"text": f"Ghi chú {p}"}],
            },
            {
                "resourceType": "CarePlan",
                "id": f"atk-cp-{uid}",
                "text": narrative,
                "status": "active",
                "intent": "plan",
                "title": f"Kế hoạch {p}",
                "description": p,
                "subject": {"reference": f"Patient/{self.patient}"},
                "period": {"start": "2026-01-05"},
            },
            {
                "resourceType": "Composition",
                "id": f"atk-comp-{uid}",
                "text": narrative,
                "status": "final",
                "type": {"text": f"Tóm tắt {p}"},
                "subject": {"reference": f"Patient/{self.patient}"},
                "encounter": {"reference": f"Encounter/atk-enc-{uid}"},
                "date": "2026-01-05T09:00:00+07:00",
                "author": [{"reference": f"Practitioner/{self.practitioner}"}],
                "title": f"Tóm tắt {p}",
            },
            {
                "resourceType": "Consent",
                "id": f"atk-consent-{uid}",
                "status": "active",
                "scope": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "patient-privacy",
                        }
                    ]
                },
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}], "text": p}],
                "patient": {"reference": f"Patient/{self.patient}"},
                "dateTime": "2026-01-05T09:00:00+07:00",
                "policyRule": {"text": p},
                "provision": {
                    "type": "permit",
                    "period": {"start": "2026-01-05", "end": "2027-12-31"},
                    "actor": [
                        {
                            "role": {"text": p},
                            "reference": {"reference": f"Organization/{self.org}", "display": p},
                        }
                    ],
                    "purpose": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                            "code": "TREAT",
                            "display": p,
                        }
                    ],
                },
            },
        ]
        with _fhir(hub) as api:
            for resource in resources:
                answer = api.put(f"{resource['resourceType']}/{resource['id']}", json=resource)
                assert answer.status_code in (200, 201), (resource["resourceType"], answer.text[:500])
        users.add_user(
            hub.engine, self.username, "patient", fhir_user=f"Patient/{self.patient}", password="pw-123456"
        )


@pytest.fixture(scope="module")
def world(web_hub: WebHub) -> World:
    return World(web_hub)


def _shows_as_text(answer: httpx.Response, world: World, where: str) -> None:
    assert answer.status_code == 200, (where, answer.status_code, answer.text[:300])
    _no_raw_markup(answer.text, where)
    assert "javascript:" not in answer.text, where
    assert ESCAPED in answer.text and world.uid in answer.text, (
        where,
        "the payload is not on the page at all",
    )


def test_markup_in_a_patients_data_is_text_on_the_clinicians_pages(web_hub: WebHub, world: World) -> None:
    with _login(web_hub, "bs.tuan") as client:
        for headers in ({}, {"HX-Request": "true"}):
            for q in (world.cccd, f"atk{world.uid}"):
                _shows_as_text(
                    client.get("/clinician", params={"q": q}, headers=headers), world, f"search {q}"
                )
        record = client.get(f"/clinician/patients/{world.patient}")
        _shows_as_text(record, world, "record")
        text = html.unescape(record.text)
        for part in ("Phòng khám", "Lý do", "Glucose", "Kế hoạch"):
            assert f"{part} {world.payload}" in text, (part, "not shown")
        assert f"<b>ok-{world.uid}</b>" in record.text  # the narrative itself, sanitised, is shown


def test_markup_in_a_patients_data_is_text_in_the_portal(web_hub: WebHub, world: World) -> None:
    with _login(web_hub, "bs.tuan") as clinician:
        clinician.get(f"/clinician/patients/{world.patient}")  # so the access log names someone
    with _login(web_hub, world.username, "pw-123456") as client:
        _shows_as_text(client.get("/portal"), world, "portal record")
        for path in ("/portal/family", "/portal/consents", "/portal/access-log", "/portal/access-log?mine=1"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            _no_raw_markup(answer.text, path)
            assert "javascript:" not in answer.text
        # The facility with markup in its name is offered for consent: as text.
        _shows_as_text(client.get("/portal/consents"), world, "portal consents")
        download = client.get("/portal/download")
        assert download.headers["content-type"].startswith("application/fhir+json")
        assert "attachment" in download.headers["content-disposition"]
        assert download.headers.get("x-content-type-options") == "nosniff"


def test_markup_in_directory_data_is_text_in_the_console(web_hub: WebHub, world: World) -> None:
    with _login(web_hub, "admin") as client:
        _shows_as_text(client.get("/console/facilities"), world, "console facilities")
        answer = client.post(
            "/console/users",
            data={"username": f"x{world.uid}<script>", "role": "auditor", "password": "pw-123456"},
        )
        assert answer.status_code in (201, 400)
        _no_raw_markup(answer.text, "console add user")
        assert "<script>" not in answer.text.replace("<script src=", "")


# --- hidden and missing answer alike; people stay in their records -----------------------------


def _same_page(first: httpx.Response, second: httpx.Response, replace: tuple[str, str]) -> None:
    assert first.status_code == second.status_code, (first.status_code, second.status_code)
    assert first.headers.get("content-type") == second.headers.get("content-type")
    one = _without_tokens(first.text).replace(replace[0], "ID")
    two = _without_tokens(second.text).replace(replace[1], "ID")
    assert one == two, "a hidden record and a missing one give different pages"


def test_a_hidden_record_and_a_missing_one_give_the_same_clinician_page(web_hub: WebHub) -> None:
    hidden, missing = HOA, "vn-demo-patient-9"  # same length: the pages must be byte-identical
    with _login(web_hub, "bs.khanh") as client:
        for headers in ({}, {"HX-Request": "true"}):
            _same_page(
                client.get(f"/clinician/patients/{hidden}", headers=headers),
                client.get(f"/clinician/patients/{missing}", headers=headers),
                (hidden, missing),
            )
            # Hoa's CCCD and one nobody has: the same empty result.
            _same_page(
                client.get("/clinician", params={"q": "064188001234"}, headers=headers),
                client.get("/clinician", params={"q": "064188009999"}, headers=headers),
                ("064188001234", "064188009999"),
            )
        for reason in ("", "short"):
            _same_page(
                client.post(f"/clinician/patients/{hidden}/break-glass", data={"reason": reason}),
                client.post(f"/clinician/patients/{missing}/break-glass", data={"reason": reason}),
                (hidden, missing),
            )


PORTAL_PAGES = ("/portal", "/portal/consents", "/portal/access-log", "/portal/download")


@pytest.mark.parametrize(
    ("username", "hidden"), [("hoa.nguyen", "vn-demo-patient-2"), ("proxy", "vn-demo-patient-5")]
)
def test_a_hidden_record_and_a_missing_one_give_the_same_portal_page(
    web_hub: WebHub, username: str, hidden: str
) -> None:
    missing = "vn-demo-patient-9"
    with _login(web_hub, username) as client:
        for path in PORTAL_PAGES:
            first = client.get(path, params={"patient": hidden})
            assert first.status_code == 404, (path, first.status_code)
            _same_page(first, client.get(path, params={"patient": missing}), (hidden, missing))


NAMES = {
    "vn-demo-patient-1": "Nguyễn Thị Hoa",
    "vn-demo-patient-2": "Trần Văn Đức",
    "vn-demo-patient-3": "Ksor H'Bia",
    "vn-demo-patient-4": "Lê Văn Minh",
    "vn-demo-patient-5": "Rơ Mah Gia Bảo",
}


@pytest.mark.parametrize(
    ("username", "own"), [("hoa.nguyen", {HOA}), ("proxy", {HOA}), ("hoa.proxy", {"vn-demo-patient-5"})]
)
def test_a_patient_or_proxy_reaches_no_other_record_through_any_portal_url(
    web_hub: WebHub, username: str, own: set[str]
) -> None:
    others = [p for p in NAMES if p not in own]
    cccd = {
        r["id"]: i["value"]
        for (kind, _), r in _demo_resources().items()
        if kind == "Patient"
        for i in r.get("identifier") or []
        if i.get("system", "").endswith("/cccd")
    }
    with _login(web_hub, username) as client:
        for other in others:
            # hoa.proxy is Hoa herself (her son's proxy): her own name is on her RelatedPerson.
            name = cccd[other] if (username, other) == ("hoa.proxy", HOA) else NAMES[other]
            tricks = [
                {"patient": other},
                {"patient": f"Patient/{other}"},
                {"patient": f"{other},{next(iter(own))}"},
                {"patient": f"{next(iter(own))},{other}"},
                {"patient": other.upper()},
                {"patient": f" {other}"},
            ]
            for path in (*PORTAL_PAGES, "/portal/family"):
                for params in tricks:
                    answer = client.get(path, params=params)
                    assert name not in html.unescape(answer.text), (username, path, params)
                    assert answer.status_code in (200, 303, 404), (path, params, answer.status_code)
                # A repeated parameter: whichever the app takes, never the other's record.
                for order in ((next(iter(own)), other), (other, next(iter(own)))):
                    answer = client.get(path + f"?patient={order[0]}&patient={order[1]}")
                    assert name not in html.unescape(answer.text), (username, path, order)
            # Writes on another's record: refused as "not found", nothing written.
            with _fhir(web_hub) as api:
                before = api.get("Consent", params={"patient": other, "_summary": "count"}).json()["total"]
                answer = client.post(
                    "/portal/consents",
                    data={
                        "patient": other,
                        "actor": "Organization/vn-demo-org-bvdk-ankhe",
                        "purpose": "TREAT",
                        "category": "N",
                    },
                )
                assert answer.status_code == 404, (username, other, answer.status_code)
                assert (
                    api.get("Consent", params={"patient": other, "_summary": "count"}).json()["total"]
                    == before
                )
        # Hoa's own consent, withdrawn by someone who does not represent her, or through a record
        # they do represent: not found, and still active.
        if HOA not in own:
            for patient in (HOA, next(iter(own))):
                answer = client.post(
                    "/portal/consents/vn-demo-hoa-consent-bvdk/withdraw", data={"patient": patient}
                )
                assert answer.status_code == 404, (username, patient, answer.status_code)
            with _fhir(web_hub) as api:
                assert api.get("Consent/vn-demo-hoa-consent-bvdk").json()["status"] == "active"


# --- break-glass and the audit trail ----------------------------------------------------------


def _audit_events(hub: WebHub, patient: str) -> list[dict[str, Any]]:
    """The patient's AuditEvents, but those of this test reading the trail (test-admin)."""
    with _fhir(hub) as api:
        bundle = api.get("AuditEvent", params={"patient": patient, "_count": "200", "_sort": "-date"}).json()
    events = [e["resource"] for e in bundle.get("entry") or []]
    return [e for e in events if '"test-admin"' not in _agents(e)]


def _agents(event: dict[str, Any]) -> str:
    return json.dumps(event.get("agent") or [], ensure_ascii=False)


def _alerts_for(hub: WebHub, patient: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=hub.url, headers=ADMIN_AUTH, timeout=60) as client:
        answer = client.get("/access/break-glass")
        assert answer.status_code == 200
        return [a for a in answer.json() if a.get("patient") == f"Patient/{patient}"]


def test_break_glass_from_the_page_needs_a_reason_and_is_audited_and_alerted(web_hub: WebHub) -> None:
    uid = _uid()
    patient = f"atk-bg-{uid}"
    with _fhir(web_hub) as api:
        answer = api.put(
            f"Patient/{patient}",
            json={
                "resourceType": "Patient",
                "id": patient,
                "name": [{"family": f"Bg{uid}", "given": ["Khẩn"]}],
                "managingOrganization": {"reference": "Organization/vn-demo-org-bvdk-gialai"},
            },
        )
        assert answer.status_code in (200, 201)
    users.add_user(
        web_hub.engine, f"bg-{uid}", "patient", fhir_user=f"Patient/{patient}", password="pw-123456"
    )
    reason = f"Bệnh nhân hôn mê tại cấp cứu, cần tiền sử dị ứng {uid}"
    with _login(web_hub, "bs.khanh") as khanh:
        assert khanh.get(f"/clinician/patients/{patient}").status_code == 404
        for refused in ("", "   ", "too short", " ".join(["x"] * 4), "y" * 501):
            answer = khanh.post(f"/clinician/patients/{patient}/break-glass", data={"reason": refused})
            assert answer.status_code == 400 and f"Bg{uid}" not in answer.text, repr(refused)
        # Other roles cannot break the glass from the page at all.
        for username in ("hoa.nguyen", "proxy", "qtv.iakrai", "auditor"):
            with _login(web_hub, username) as other:
                answer = other.post(f"/clinician/patients/{patient}/break-glass", data={"reason": reason})
                assert answer.status_code == 403 and f"Bg{uid}" not in answer.text, username
        assert _alerts_for(web_hub, patient) == []
        assert not [e for e in _audit_events(web_hub, patient) if "BTG" in json.dumps(e.get("meta"))]
        # With a reason: the record opens, flagged in the trail and alerted.
        answer = khanh.post(f"/clinician/patients/{patient}/break-glass", data={"reason": reason})
        assert answer.status_code == 200 and f"Bg{uid}" in answer.text
    flagged = [e for e in _audit_events(web_hub, patient) if "BTG" in json.dumps(e.get("meta"))]
    assert flagged, "no AuditEvent flagged BTG"
    for event in flagged:
        purposes = json.dumps(event.get("purposeOfEvent"))
        assert "ETREAT" in purposes and "Practitioner/vn-demo-practitioner-4" in _agents(event)
    alerts = _alerts_for(web_hub, patient)
    assert len(alerts) == 1 and alerts[0]["reason"] == reason and alerts[0]["user"] == "bs.khanh"
    # The patient sees it in "who looked", with the reason.
    with _login(web_hub, f"bg-{uid}", "pw-123456") as owner:
        log = html.unescape(owner.get("/portal/access-log").text)
        assert reason in log


def test_every_record_page_view_leaves_an_audit_event_naming_the_clinician(
    web_hub: WebHub, world: World
) -> None:
    with _login(web_hub, "bs.tuan") as client:
        before = {e["id"] for e in _audit_events(web_hub, world.patient)}
        assert client.get(f"/clinician/patients/{world.patient}").status_code == 200
        after = _audit_events(web_hub, world.patient)
        new = [e for e in after if e["id"] not in before]
        assert new, "the record page left no AuditEvent"
        assert all("Practitioner/vn-demo-practitioner-1" in _agents(e) for e in new)
        assert all("TREAT" in json.dumps(e.get("purposeOfEvent")) for e in new)
        # The search page is audited too (a Patient search by this clinician).
        before = {e["id"] for e in after}
        assert client.get("/clinician", params={"q": world.cccd}).status_code == 200
        new = [e for e in _audit_events(web_hub, world.patient) if e["id"] not in before]
        assert new and all("Practitioner/vn-demo-practitioner-1" in _agents(e) for e in new)
    with _login(web_hub, world.username, "pw-123456") as owner:
        before = {e["id"] for e in _audit_events(web_hub, world.patient)}
        assert owner.get("/portal").status_code == 200
        new = [e for e in _audit_events(web_hub, world.patient) if e["id"] not in before]
        assert new and all(f"Patient/{world.patient}" in _agents(e) for e in new)


# --- the console and the htmx partials --------------------------------------------------------


def _get_routes(hub: WebHub, prefix: str) -> list[str]:
    paths = set()
    for path, route in _api_routes(hub.app.routes):
        if "GET" in (route.methods or ()) and path.startswith(prefix):
            paths.add(path)
    return sorted(paths)


@pytest.mark.parametrize("username", ["qtv.iakrai", "qtv.bvdk", "auditor"])
def test_the_console_of_a_facility_admin_or_auditor_shows_no_patient_data(
    web_hub: WebHub, world: World, username: str
) -> None:
    resources = _demo_resources()
    directory = ("Organization", "Practitioner", "PractitionerRole")
    clinical = set().union(*(_texts(r) for (kind, _), r in resources.items() if kind not in directory))
    clinical -= set().union(*(_texts(r) for (kind, _), r in resources.items() if kind in directory))
    identifiers = {
        i["value"]
        for (kind, _), r in resources.items()
        if kind == "Patient"
        for i in r.get("identifier") or []
    }
    token = _token_of(web_hub, username)
    with httpx.Client(base_url=web_hub.url, headers={"Authorization": f"Bearer {token}"}) as api:
        alerts = api.get("/access/break-glass")
        allowed_refs = {a["patient"] for a in alerts.json()} if alerts.status_code == 200 else set()
    with _login(web_hub, username) as client:
        chrome = html.unescape(client.get("/account").text)
        paths = [p.replace("{username}", username) for p in _get_routes(web_hub, "/console")]
        assert "/console/break-glass" in paths and "/console/users/" + username in paths
        for path in paths:
            if "{" in path:
                continue
            answer = client.get(path)
            assert answer.status_code in (200, 403), (path, answer.status_code)
            text = html.unescape(answer.text)
            leaked = sorted(
                t for t in clinical | set(NAMES.values()) | identifiers if t in text and t not in chrome
            )
            assert not leaked, (username, path, leaked[:5])
            assert world.payload not in text or "Phòng khám" in text  # only the directory's markup
            if path.startswith("/console/users"):
                continue  # an account's fhirUser (Patient/...) is the account, not health data
            for ref in re.findall(r"Patient/[A-Za-z0-9.-]+", text):
                assert ref in allowed_refs, (username, path, ref)


def test_htmx_partials_are_guarded_exactly_like_pages(web_hub: WebHub) -> None:
    pages = [p for p in _get_routes(web_hub, "/") if _is_page(p) and p not in ("/login", "/lang/{locale}")]
    assert "/clinician" in pages and "/portal" in pages and "/console/users" in pages
    filled = [_fill(p) for p in pages]
    with httpx.Client(base_url=web_hub.url) as anonymous:
        for path in filled:
            answer = anonymous.get(path, headers={"HX-Request": "true"})
            assert answer.status_code in (204, 303), (path, answer.status_code)
            assert answer.status_code == 303 or answer.headers["hx-redirect"].startswith("/login")
            assert len(answer.content) < 100 or "/login" in answer.headers.get("location", ""), path
    # A role's partials are refused to other roles, with no data.
    with _login(web_hub, "hoa.nguyen") as hoa, _login(web_hub, "qtv.iakrai") as facility:
        for client, path in (
            (hoa, "/clinician?q=nguyen"),
            (facility, "/clinician?q=nguyen"),
            (facility, f"/portal?patient={HOA}"),
            (hoa, "/console/users"),
        ):
            answer = client.get(path, headers={"HX-Request": "true"})
            assert answer.status_code == 403, (path, answer.status_code)
            assert "Nguyễn Thị Hoa" not in html.unescape(answer.text) and "qtv.bvdk" not in answer.text
        # A facility admin's htmx disable of another facility's account: refused, nothing swapped.
        answer = facility.post("/console/users/qtv.bvdk/disable", headers={"HX-Request": "true"})
        assert answer.status_code in (403, 404) and "qtv.bvdk" not in answer.text
        account = users.get_user(web_hub.engine, "qtv.bvdk")
        assert account is not None and not account.disabled


def test_the_login_form_is_rate_limited_per_address_and_account(web_hub: WebHub) -> None:
    """Password guessing through the form meets the same limits as ``POST /auth/token``."""
    with (
        LiveServer(web_hub.settings.database_url) as hub,
        httpx.Client(base_url=f"http://127.0.0.1:{hub.port}") as client,
    ):
        client.get("/login")
        token = client.cookies["hub_login_csrf"]
        statuses = []
        for attempt in range(25):
            answer = client.post(
                "/login", data={"username": "bs.tuan", "password": f"guess-{attempt}", "csrf_token": token}
            )
            statuses.append(answer.status_code)
        assert 429 in statuses and statuses[0] == 400, statuses
        answer = client.post(
            "/login", data={"username": "bs.tuan", "password": "demo-clinician", "csrf_token": token}
        )
        assert answer.status_code == 429 and "hub_session" not in answer.headers.get("set-cookie", "")
        assert answer.headers.get("retry-after")


# --- holes this file found, closed in hub/auth/users.py (d569fc2) -------------------------------


def test_a_facility_admin_cannot_mint_an_account_that_reads_a_citizens_record(web_hub: WebHub) -> None:
    """qtv.iakrai (the station's facility admin) must not become Hoa, her husband, or the
    provincial hospital's doctor by creating an account with a password of their choosing."""
    uid = _uid()
    attempts = {
        f"fa-patient-{uid}": ("patient", f"Patient/{HOA}"),
        f"fa-proxy-{uid}": ("proxy", "RelatedPerson/vn-demo-relatedperson-1"),
        f"fa-doctor-{uid}": ("clinician", "Practitioner/vn-demo-practitioner-2"),
    }
    statuses: dict[str, int] = {}
    try:
        with _login(web_hub, "qtv.iakrai") as facility:
            for username, (role, who) in attempts.items():
                answer = facility.post(
                    "/console/users",
                    data={
                        "username": username,
                        "role": role,
                        "fhir_user": who,
                        "organizations": "vn-demo-org-tyt-iakrai",
                        "password": "pw-chosen-by-attacker",
                    },
                )
                statuses[username] = answer.status_code
        if users.get_user(web_hub.engine, f"fa-patient-{uid}") is not None:
            with _login(web_hub, f"fa-patient-{uid}", "pw-chosen-by-attacker") as stolen:
                assert PSY_TEXT not in html.unescape(stolen.get("/portal").text), "Hoa's PSY data read"
        assert all(status == 403 for status in statuses.values()), statuses
        assert all(users.get_user(web_hub.engine, name) is None for name in attempts)
    finally:
        for username in attempts:  # nothing usable left behind in the shared hub
            if users.get_user(web_hub.engine, username) is not None:
                users.disable_user(web_hub.engine, username)


def test_a_proxy_cannot_grant_a_sensitive_category_through_the_form(web_hub: WebHub) -> None:
    """The portal offers proxies ordinary data only; a hand-made form asking for PSY is refused
    by the hub's consent governance and writes nothing."""
    with _login(web_hub, "proxy") as proxy, _fhir(web_hub) as api:
        before = api.get("Consent", params={"patient": HOA, "_summary": "count"}).json()["total"]
        answer = proxy.post(
            "/portal/consents",
            data={
                "patient": HOA,
                "actor": "Organization/vn-demo-org-bvdk-ankhe",
                "purpose": "TREAT",
                "category": ["N", "PSY"],
            },
        )
        assert answer.status_code == 403, answer.status_code
        assert api.get("Consent", params={"patient": HOA, "_summary": "count"}).json()["total"] == before


# --- more parameter tricks --------------------------------------------------------------------


def test_odd_record_ids_open_nothing_the_clinician_may_not_see(web_hub: WebHub) -> None:
    """The record id goes into the FHIR path (``Patient/{id}/$everything``) and a search value:
    no id can widen what is read."""
    minh = NAMES["vn-demo-patient-4"]  # not bs.tuan's (managed by the provincial hospital)
    tricks = [
        "vn-demo-patient-4",
        "vn-demo-patient-1,vn-demo-patient-4",
        "vn-demo-patient-4%3F_type%3DPatient",
        "vn-demo-patient-4%23",
        "..",
        "%2e%2e",
        "$everything",
        "_history",
        "_search",
        "*",
        "vn-demo-patient-4%00",
        "vn-demo-patient-1%2F..%2Fvn-demo-patient-4",
        "x" * 300,
    ]
    with _login(web_hub, "bs.tuan") as client:
        for trick in tricks:
            for path in (f"/clinician/patients/{trick}", f"/clinician?q={trick}"):
                answer = client.get(path)
                assert answer.status_code in (200, 400, 404), (path, answer.status_code)
                assert minh not in html.unescape(answer.text), path
                assert "Traceback" not in answer.text and "sqlalchemy" not in answer.text.lower(), path
        answer = client.get("/clinician", params={"q": "nguyen", "cursor": "not-a-cursor' OR 1=1 --"})
        assert answer.status_code in (200, 400, 404) and "Traceback" not in answer.text


def test_a_facility_admin_reviews_only_its_own_staffs_break_glass(web_hub: WebHub) -> None:
    uid = _uid()
    patient = f"atk-bg2-{uid}"
    with _fhir(web_hub) as api:
        answer = api.put(
            f"Patient/{patient}",
            json={
                "resourceType": "Patient",
                "id": patient,
                "name": [{"family": f"Rv{uid}"}],
                "managingOrganization": {"reference": "Organization/vn-demo-org-bvdk-gialai"},
            },
        )
        assert answer.status_code in (200, 201)
    with _login(web_hub, "bs.khanh") as khanh:  # An Khê: neither demo facility admin's staff
        reason = f"Cấp cứu, bệnh nhân bất tỉnh, cần tiền sử {uid}"
        assert (
            khanh.post(f"/clinician/patients/{patient}/break-glass", data={"reason": reason}).status_code
            == 200
        )
    (alert,) = _alerts_for(web_hub, patient)
    for username in ("qtv.iakrai", "qtv.bvdk"):
        with _login(web_hub, username) as facility:
            page = facility.get("/console/break-glass")
            assert page.status_code == 200 and reason not in html.unescape(page.text), username
            answer = facility.post(
                f"/console/break-glass/{alert['id']}/review", data={"verdict": "justified", "note": "ok"}
            )
            assert answer.status_code == 404, (username, answer.status_code)
    (after,) = _alerts_for(web_hub, patient)
    assert after["status"] == "open" and after["reviews"] == []


def test_a_facility_admin_cannot_tell_other_facilities_accounts_from_missing_ones(web_hub: WebHub) -> None:
    with _login(web_hub, "qtv.iakrai") as facility:
        listing = facility.get("/console/users").text
        assert "bs.ha" not in listing and "qtv.bvdk" not in listing and "hoa.nguyen" not in listing
        assert "bs.tuan" in listing
        other, missing = facility.get("/console/users/qtv.bvdk"), facility.get("/console/users/qtv.xxxx")
        _same_page(other, missing, ("qtv.bvdk", "qtv.xxxx"))
        assert other.status_code == 404
        for action in ("disable", "enable"):
            one = facility.post(f"/console/users/qtv.bvdk/{action}")
            two = facility.post(f"/console/users/qtv.xxxx/{action}")
            assert one.status_code in (403, 404) and two.status_code in (403, 404)
        account = users.get_user(web_hub.engine, "qtv.bvdk")
        assert account is not None and not account.disabled


def test_disabling_an_account_out_of_view_answers_like_a_missing_one(web_hub: WebHub) -> None:
    with _login(web_hub, "qtv.iakrai") as facility:
        for hidden in ("qtv.bvdk", "hoa.nguyen"):
            for headers in ({}, {"HX-Request": "true"}):
                one = facility.post(f"/console/users/{hidden}/disable", headers=headers)
                two = facility.post("/console/users/qtv.xxxx/disable", headers=headers)
                assert one.status_code == two.status_code, (hidden, one.status_code, two.status_code)


def test_logging_in_again_ends_the_browsers_previous_session(web_hub: WebHub) -> None:
    """Switching accounts in one browser (a shared clinic computer) leaves no live session
    behind for whoever copied the first cookie."""
    with httpx.Client(base_url=web_hub.url) as browser:
        cookies = []
        for username, password in (("auditor", "demo-auditor"), ("bs.tuan", "demo-clinician")):
            token = browser.get("/login") and browser.cookies["hub_login_csrf"]
            answer = browser.post(
                "/login", data={"username": username, "password": password, "csrf_token": token}
            )
            assert answer.status_code == 303
            cookies.append(browser.cookies["hub_session"])
        assert cookies[0] != cookies[1] and _session_row(web_hub, cookies[0]) is None
        with httpx.Client(base_url=web_hub.url, cookies={"hub_session": cookies[0]}) as copy:
            assert copy.get("/account").status_code == 303
        assert browser.get("/clinician").status_code == 200


def test_a_break_glass_reason_with_markup_is_text_wherever_the_trail_shows_it(web_hub: WebHub) -> None:
    """The reason a clinician types travels through the audit trail and the alerts to the
    patient's "who looked" page and the console: shown as text there."""
    uid = _uid()
    patient = f"atk-bg3-{uid}"
    with _fhir(web_hub) as api:
        answer = api.put(
            f"Patient/{patient}",
            json={
                "resourceType": "Patient",
                "id": patient,
                "name": [{"family": f"Tr{uid}"}],
                "managingOrganization": {"reference": "Organization/vn-demo-org-bvdk-gialai"},
            },
        )
        assert answer.status_code in (200, 201)
    users.add_user(
        web_hub.engine, f"bg3-{uid}", "patient", fhir_user=f"Patient/{patient}", password="pw-123456"
    )
    reason = f"Cấp cứu {XSS} {uid}"
    with _login(web_hub, "bs.khanh") as khanh:
        assert (
            khanh.post(f"/clinician/patients/{patient}/break-glass", data={"reason": reason}).status_code
            == 200
        )
    with _login(web_hub, f"bg3-{uid}", "pw-123456") as owner:
        log = owner.get("/portal/access-log")
        assert log.status_code == 200 and ESCAPED in log.text and uid in log.text
        _no_raw_markup(log.text, "portal access log")
    (alert,) = _alerts_for(web_hub, patient)
    with _login(web_hub, "admin") as admin:
        review = admin.post(
            f"/console/break-glass/{alert['id']}/review",
            data={"verdict": "justified", "note": f"{XSS} note-{uid}"},
        )
        assert review.status_code == 200
        page = admin.get("/console/break-glass")
        assert page.status_code == 200 and ESCAPED in page.text and f"note-{uid}" in page.text
        _no_raw_markup(page.text, "console break-glass")
    with _login(web_hub, f"bg3-{uid}", "pw-123456") as owner:
        _no_raw_markup(owner.get("/portal/access-log").text, "portal access log after the review")


def test_no_other_origin_may_read_a_page_or_the_static_tree_outside_its_folder(
    web_hub: WebHub, sessions: dict[str, httpx.Client]
) -> None:
    """No CORS grant (an attacker's page cannot read a page with the visitor's cookie), no
    framing, and the static routes serve their folders only."""
    hoa = sessions["hoa.nguyen"]
    for method in ("GET", "OPTIONS"):
        answer = hoa.request(
            method,
            "/portal",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-csrf-token",
            },
        )
        assert "access-control-allow-origin" not in answer.headers, method
        assert "access-control-allow-credentials" not in answer.headers, method
    page = hoa.get("/portal")
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    with httpx.Client(base_url=web_hub.url) as anonymous:
        for path in (
            "/static/../hub/settings.py",
            "/static/%2e%2e/%2e%2e/hub/settings.py",
            "/static/..%2f..%2fpyproject.toml",
            "/static/vendor/..%2f..%2fpackage.json",
            "/static/vendor/%2e%2e%2fhtmx.org%2fpackage.json",
            "/static/app.js%00.html",
        ):
            answer = anonymous.get(path)
            assert answer.status_code in (400, 404), (path, answer.status_code)
            assert "database_url" not in answer.text and '"name"' not in answer.text, path


def _hub_cli(hub: WebHub, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": hub.settings.database_url, "COLUMNS": "300", **auth_env()}
    return subprocess.run(
        [str(Path(sys.executable).parent / "hub"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_password_reset_or_disable_from_the_cli_ends_the_accounts_page_sessions(web_hub: WebHub) -> None:
    """The answer to a stolen session is a new password: the old sessions must not outlive it."""
    name = f"reset-{_uid()}"
    users.add_user(web_hub.engine, name, "auditor", password="pw-old-123")
    with _login(web_hub, name, "pw-old-123") as stolen:
        assert stolen.get("/account").status_code == 200
        done = _hub_cli(web_hub, "users", "passwd", name, "--password-stdin", stdin="pw-new-456\n")
        assert done.returncode == 0, done.stderr + done.stdout
        assert stolen.get("/account").status_code == 303, "the session outlived the password reset"
    with _login(web_hub, name, "pw-new-456") as again:
        assert again.get("/account").status_code == 200
        done = _hub_cli(web_hub, "users", "disable", name)
        assert done.returncode == 0, done.stderr + done.stdout
        assert again.get("/account").status_code == 303


def test_an_auditor_reads_accounts_but_changes_none(web_hub: WebHub) -> None:
    name = f"aud-target-{_uid()}"
    users.add_user(
        web_hub.engine,
        name,
        "clinician",
        fhir_user="Practitioner/x",
        organizations=["o1"],
        password="pw-123456",
    )
    with _login(web_hub, "auditor") as auditor:
        assert auditor.get("/console/users").status_code == 200
        for path, data in (
            (f"/console/users/{name}/disable", {}),
            (f"/console/users/{name}", {"role": "facility-admin", "organizations": "o1"}),
            ("/console/users", {"username": f"aud-new-{_uid()}", "role": "auditor", "password": "pw-123456"}),
        ):
            answer = auditor.post(path, data=data)
            assert answer.status_code == 403, (path, answer.status_code)
    account = users.get_user(web_hub.engine, name)
    assert account is not None and not account.disabled and account.role.value == "clinician"


class Family:
    """The markup world's patient with a husband (an active RelatedPerson and his proxy
    account) and a mental-health (PSY) sharing the patient gave through the portal."""

    def __init__(self, hub: WebHub, world: World) -> None:
        self.world = world
        self.proxy = f"px-{world.uid}"
        related = f"atk-rp-{world.uid}"
        with _fhir(hub) as api:
            answer = api.put(
                f"RelatedPerson/{related}",
                json={
                    "resourceType": "RelatedPerson",
                    "id": related,
                    "active": True,
                    "patient": {"reference": f"Patient/{world.patient}"},
                    "name": [{"family": "Chồng"}],
                },
            )
            assert answer.status_code in (200, 201)
        users.add_user(
            hub.engine, self.proxy, "proxy", fhir_user=f"RelatedPerson/{related}", password="pw-123456"
        )
        with _login(hub, world.username, "pw-123456") as patient, _fhir(hub) as api:
            before = {
                e["resource"]["id"]
                for e in api.get("Consent", params={"patient": world.patient}).json()["entry"]
            }
            answer = patient.post(
                "/portal/consents",
                data={
                    "actor": "Organization/vn-demo-org-bvdk-ankhe",
                    "purpose": "TREAT",
                    "category": ["PSY"],
                },
            )
            assert answer.status_code == 303
            after = api.get("Consent", params={"patient": world.patient}).json()["entry"]
            (self.psy_consent,) = [e["resource"]["id"] for e in after if e["resource"]["id"] not in before]


@pytest.fixture(scope="module")
def family(web_hub: WebHub, world: World) -> Family:
    return Family(web_hub, world)


def test_a_proxy_does_not_learn_that_the_patient_shares_sensitive_data(
    web_hub: WebHub, family: Family
) -> None:
    """Hoa's PSY data is hidden from her husband; so must be the fact that she shares it."""
    with _login(web_hub, family.proxy, "pw-123456") as proxy:
        page = proxy.get("/portal/consents", params={"patient": family.world.patient})
        assert page.status_code == 200 and family.world.uid in page.text  # the record is theirs to see
        text = html.unescape(page.text)
        assert family.psy_consent not in text and "mental-health" not in text, "the PSY sharing is shown"
    with _fhir(web_hub, _token_of(web_hub, family.proxy)) as api:
        assert api.get(f"Consent/{family.psy_consent}").status_code == 404


def test_a_proxy_cannot_withdraw_the_patients_sensitive_sharing(web_hub: WebHub, family: Family) -> None:
    with _login(web_hub, family.proxy, "pw-123456") as proxy:
        answer = proxy.post(
            f"/portal/consents/{family.psy_consent}/withdraw", data={"patient": family.world.patient}
        )
        assert answer.status_code in (403, 404), answer.status_code
    with _fhir(web_hub) as api:
        assert api.get(f"Consent/{family.psy_consent}").json()["status"] == "active"


def test_a_facility_admin_cannot_rewrite_another_facilitys_doctor_to_mint_their_account(
    web_hub: WebHub,
) -> None:
    uid = _uid()
    org, doctor, role = f"atk-far-org-{uid}", f"atk-far-pr-{uid}", f"atk-far-role-{uid}"
    with _fhir(web_hub) as api:
        for resource in (
            {"resourceType": "Organization", "id": org, "name": f"Bệnh viện khác {uid}"},
            {"resourceType": "Practitioner", "id": doctor, "name": [{"family": "Khác", "given": [uid]}]},
            {
                "resourceType": "PractitionerRole",
                "id": role,
                "active": True,
                "practitioner": {"reference": f"Practitioner/{doctor}"},
                "organization": {"reference": f"Organization/{org}"},
            },
        ):
            assert api.put(f"{resource['resourceType']}/{resource['id']}", json=resource).status_code in (
                200,
                201,
            )
    account = f"far-{uid}"
    try:
        with _fhir(web_hub, _token_of(web_hub, "qtv.iakrai")) as facility_api:
            moved = facility_api.put(
                f"PractitionerRole/{role}",
                json={
                    "resourceType": "PractitionerRole",
                    "id": role,
                    "active": True,
                    "practitioner": {"reference": f"Practitioner/{doctor}"},
                    "organization": {"reference": "Organization/vn-demo-org-tyt-iakrai"},
                },
            )
            renamed = facility_api.put(
                f"Organization/{org}", json={"resourceType": "Organization", "id": org, "name": "renamed"}
            )
        with _login(web_hub, "qtv.iakrai") as facility:
            facility.post(
                "/console/users",
                data={
                    "username": account,
                    "role": "clinician",
                    "fhir_user": f"Practitioner/{doctor}",
                    "organizations": "vn-demo-org-tyt-iakrai",
                    "password": "pw-chosen-by-attacker",
                },
            )
        assert users.get_user(web_hub.engine, account) is None, "the other facility's doctor was minted"
        assert moved.status_code in (403, 404), moved.status_code
        assert renamed.status_code in (403, 404), renamed.status_code
    finally:
        if users.get_user(web_hub.engine, account) is not None:
            users.disable_user(web_hub.engine, account)
