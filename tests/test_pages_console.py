"""The operator console: account administration (hub/auth/users.py ``manage_*``) and the
console's pages (hub/web/views/console.py).

Part 1 runs on both backends: the account functions against a real server's database and
audit trail (who may list, add, disable, change which account; each change and each refusal
an AuditEvent naming the actor, read back through /fhir/AuditEvent).
Part 2 (marked ``pages``: PostgreSQL + Redis runs only) drives the pages over HTTP.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import LiveServer, WebHub, make_token, web_login

from hub.audit.events import HUB_OPERATIONS
from hub.auth import users
from hub.auth.principal import Principal, Role
from hub.auth.scopes import ScopeSet
from hub.auth.users import AccountForbidden, UserError
from hub.db.schema import connector_message


def _principal(role: Role, subject: str, organizations: tuple[str, ...] = ()) -> Principal:
    return Principal(
        subject=subject,
        role=role,
        scopes=ScopeSet.parse(users.DEFAULT_SCOPES[role]),
        organizations=organizations,
    )


def _audits(server: LiveServer, operation: str, username: str) -> list[dict[str, Any]]:
    """AuditEvents of one users-* operation about one account (newest first)."""
    with server.admin_client() as admin:
        bundle = admin.get(
            "AuditEvent",
            params={"subtype": f"{HUB_OPERATIONS}|{operation}", "_count": "500", "_sort": "-date"},
        ).json()
    events = [entry["resource"] for entry in bundle.get("entry", [])]
    return [e for e in events if f"username={username}" in _query(e)]


def _query(event: dict[str, Any]) -> str:
    import base64

    for entity in event.get("entity", []):
        if "query" in entity:
            return base64.b64decode(entity["query"]).decode()
    return ""


def _agent(event: dict[str, Any]) -> str:
    return str(event["agent"][0].get("name") or event["agent"][0].get("who", {}).get("display"))


# --- part 1: the account functions (both backends) -------------------------------------------


def test_hub_admin_adds_disables_enables_and_changes(live_server: LiveServer, uid: str) -> None:
    engine, trail = live_server.engine, live_server.app.state.router.gate.trail
    admin = _principal(Role.ADMIN, f"root-{uid}")
    name = f"bs.{uid}"
    user = users.manage_add(
        engine,
        admin,
        name,
        "clinician",
        fhir_user=f"Practitioner/pr-{uid}",
        organizations=[f"org-a-{uid}"],
        password="mat-khau-1",
        trail=trail,
        client_address="10.0.0.9",
    )
    assert user.role is Role.CLINICIAN and user.organizations == (f"org-a-{uid}",)
    assert user.scopes == users.DEFAULT_SCOPES[Role.CLINICIAN]
    assert users.authenticate(engine, name, "mat-khau-1") is not None

    disabled = users.manage_disable(engine, admin, name, trail=trail)
    assert disabled.disabled
    assert users.authenticate(engine, name, "mat-khau-1") is None  # logins stop at once
    assert not users.manage_disable(engine, admin, name, False, trail=trail).disabled
    assert users.authenticate(engine, name, "mat-khau-1") is not None

    changed = users.manage_change(
        engine, admin, name, role="food-safety-inspector", organizations=[f"org-b-{uid}"], trail=trail
    )
    assert changed.role is Role.INSPECTOR
    assert changed.organizations == (f"org-b-{uid}",)
    assert changed.scopes == users.DEFAULT_SCOPES[Role.INSPECTOR]  # a new role brings its scopes
    assert changed.fhir_user == f"Practitioner/pr-{uid}"

    for operation in ("users-add", "users-disable", "users-enable", "users-change"):
        events = _audits(live_server, operation, name)
        assert len(events) == 1, operation
        assert events[0]["outcome"] == "0"
        assert _agent(events[0]) == f"root-{uid}"
        assert "password" not in _query(events[0])
    added = _audits(live_server, "users-add", name)[0]
    assert any(n.get("address") == "10.0.0.9" for a in added["agent"] if (n := a.get("network")))


def test_the_checks_of_hub_users_add(live_server: LiveServer, uid: str) -> None:
    engine = live_server.engine
    admin = _principal(Role.ADMIN, f"root-{uid}")
    with pytest.raises(UserError, match="needs a fhirUser"):
        users.manage_add(engine, admin, f"a-{uid}", "clinician", password="x")
    with pytest.raises(UserError, match="must be 1-200"):
        users.manage_add(engine, admin, "<script>", "auditor", password="x")
    with pytest.raises(UserError, match="Unknown role"):
        users.manage_add(engine, admin, f"b-{uid}", "superuser", password="x")
    with pytest.raises(UserError, match="needs a password"):
        users.manage_add(engine, admin, f"c-{uid}", "auditor", password="")
    service = users.manage_add(engine, admin, f"svc-{uid}", "integration-service")
    assert not service.has_password  # a service account: tokens from `hub token` only
    with pytest.raises(UserError, match="already exists"):
        users.manage_add(engine, admin, f"svc-{uid}", "integration-service")


def test_facility_admin_manages_own_organizations_only(live_server: LiveServer, uid: str) -> None:
    engine, trail = live_server.engine, live_server.app.state.router.gate.trail
    root = _principal(Role.ADMIN, f"root-{uid}")
    own, other = f"org-own-{uid}", f"org-other-{uid}"
    qtv = _principal(Role.FACILITY_ADMIN, f"qtv-{uid}", (own,))
    users.manage_add(engine, root, f"qtv-{uid}", "facility-admin", organizations=[own], password="p")
    # Where each practitioner holds PractitionerRoles (the console reads them through the FHIR
    # router; the page tests use the demo directory's).
    directory = {"x": {own}, "y": {other}, "shared": {own, other}}
    ours = users.manage_add(
        engine,
        qtv,
        f"ours-{uid}",
        "clinician",
        fhir_user="Practitioner/x",
        organizations=[own],
        password="p",
        practitioner_organizations=directory.get,
    )
    assert ours.organizations == (own,)
    theirs = f"theirs-{uid}"
    users.manage_add(
        engine, root, theirs, "clinician", fhir_user="Practitioner/y", organizations=[other], password="p"
    )
    both = f"both-{uid}"
    users.manage_add(
        engine, root, both, "clinician", fhir_user="Practitioner/z", organizations=[own, other], password="p"
    )

    listed = {u.username for u in users.visible_accounts(engine, qtv)}
    assert {f"ours-{uid}", both, f"qtv-{uid}"} <= listed
    assert theirs not in listed and "test-admin" not in listed
    assert {u.username for u in users.visible_accounts(engine, qtv, role="clinician")} >= {
        f"ours-{uid}",
        both,
    }
    assert f"qtv-{uid}" not in {u.username for u in users.visible_accounts(engine, qtv, role="clinician")}

    # Accounts out of their view are answered as missing ones: no oracle of who exists.
    for hidden in (theirs, "test-admin", f"nobody-{uid}"):
        with pytest.raises(UserError, match="No user"):
            users.manage_disable(engine, qtv, hidden, trail=trail)

    def doctor(name: str, practitioner: str, lookup: Any = directory.get) -> Any:
        return lambda: users.manage_add(
            engine,
            qtv,
            f"{name}-{uid}",
            "clinician",
            fhir_user=f"Practitioner/{practitioner}",
            organizations=[own],
            password="p",
            practitioner_organizations=lookup,
        )

    refusals: list[tuple[str, Any]] = [
        ("an account shared with another", lambda: users.manage_disable(engine, qtv, both, trail=trail)),
        ("their own account", lambda: users.manage_disable(engine, qtv, f"qtv-{uid}", trail=trail)),
        ("another facility's doctor", doctor("d1", "y")),
        ("a doctor also of another facility", doctor("d2", "shared")),
        ("a practitioner of no facility", doctor("d3", "unknown")),
        ("a doctor when the directory cannot be read", doctor("d4", "x", None)),
        (
            "a patient account (a citizen's record, their password)",
            lambda: users.manage_add(
                engine, qtv, f"p-{uid}", "patient", fhir_user="Patient/p", organizations=[own], password="p"
            ),
        ),
        (
            "a proxy account",
            lambda: users.manage_add(
                engine,
                qtv,
                f"r-{uid}",
                "proxy",
                fhir_user="RelatedPerson/r",
                organizations=[own],
                password="p",
            ),
        ),
        (
            "a hub-admin account",
            lambda: users.manage_add(
                engine, qtv, f"h-{uid}", "hub-admin", organizations=[own], password="p", trail=trail
            ),
        ),
        (
            "an auditor account",
            lambda: users.manage_add(
                engine, qtv, f"au-{uid}", "auditor", organizations=[own], password="p", trail=trail
            ),
        ),
        (
            "an integration account",
            lambda: users.manage_add(engine, qtv, f"i-{uid}", "integration-service", organizations=[own]),
        ),
        (
            "an account of another organization",
            lambda: users.manage_add(
                engine,
                qtv,
                f"o-{uid}",
                "clinician",
                fhir_user="Practitioner/o",
                organizations=[other],
                password="p",
            ),
        ),
        (
            "an account of no organization",
            lambda: users.manage_add(engine, qtv, f"n-{uid}", "patient", fhir_user="Patient/n", password="p"),
        ),
        (
            "a promotion to facility admin",
            lambda: users.manage_change(engine, qtv, f"ours-{uid}", role="facility-admin", trail=trail),
        ),
        (
            "a move to another organization",
            lambda: users.manage_change(engine, qtv, f"ours-{uid}", organizations=[own, other]),
        ),
        (
            "another person behind the account",
            lambda: users.manage_change(engine, qtv, f"ours-{uid}", fhir_user="Practitioner/vip"),
        ),
    ]
    for what, attempt in refusals:
        with pytest.raises(AccountForbidden):
            attempt()
            pytest.fail(f"a facility admin was allowed {what}")
    assert not users.get_user(engine, theirs).disabled  # type: ignore[union-attr]
    assert users.get_user(engine, f"h-{uid}") is None

    # What is theirs to manage, they manage.
    assert users.manage_disable(engine, qtv, f"ours-{uid}", trail=trail).disabled
    moved = users.manage_change(engine, qtv, f"ours-{uid}", role="food-safety-inspector", trail=trail)
    assert moved.role is Role.INSPECTOR
    refused = [e for e in _audits(live_server, "users-disable", theirs) if _agent(e) == f"qtv-{uid}"]
    assert refused and refused[0]["outcome"] == "4"  # the refusal is audited too
    assert all(users.get_user(engine, f"{n}-{uid}") is None for n in ("d1", "d2", "d3", "d4", "p", "r"))


def test_other_roles_read_or_change_nothing(live_server: LiveServer, uid: str) -> None:
    engine = live_server.engine
    auditor = _principal(Role.AUDITOR, f"aud-{uid}")
    assert any(u.username == "test-admin" for u in users.visible_accounts(engine, auditor))
    with pytest.raises(AccountForbidden):
        users.manage_disable(engine, auditor, "test-admin")
    with pytest.raises(AccountForbidden):
        users.manage_add(engine, auditor, f"x-{uid}", "auditor", password="p")
    for role in (Role.CLINICIAN, Role.PATIENT, Role.PROXY, Role.SERVICE, Role.INSPECTOR):
        someone = _principal(role, f"{role.value}-{uid}")
        with pytest.raises(AccountForbidden):
            users.visible_accounts(engine, someone)
        with pytest.raises(AccountForbidden):
            users.manage_disable(engine, someone, "test-admin")
    admin = _principal(Role.ADMIN, f"root-{uid}")
    with pytest.raises(UserError, match="No user"):
        users.manage_disable(engine, admin, f"nobody-{uid}")
    disabled = {u.username for u in users.visible_accounts(engine, admin, disabled=True)}
    assert "test-admin" not in disabled


def test_accounts_json_api(live_server: LiveServer, uid: str) -> None:
    """/admin/users: the same functions with bearer tokens (both backends)."""
    base = live_server.base.removesuffix("/fhir")
    org = f"org-api-{uid}"
    qtv = make_token(live_server, role=Role.FACILITY_ADMIN, organizations=[org], username=f"qtv-api-{uid}")
    with httpx.Client(base_url=base, headers=live_server.auth) as admin:
        added = admin.post(
            "/admin/users",
            json={
                "username": f"api-{uid}",
                "role": "clinician",
                "fhirUser": "Practitioner/api",
                "organizations": [org],
                "password": "pw-api",
            },
        )
        assert added.status_code == 201, added.text
        assert added.json()["organizations"] == [org] and "password" not in added.text.lower().replace(
            "haspassword", ""
        )
        again = admin.post(
            "/admin/users", json={"username": f"api-{uid}", "role": "auditor", "password": "p"}
        )
        assert again.status_code == 409 and again.json()["resourceType"] == "OperationOutcome"
        bad = admin.post("/admin/users", json={"username": "a b", "role": "auditor", "password": "p"})
        assert bad.status_code == 400
        assert admin.post("/admin/users", content=b"[1]").status_code == 400
        assert admin.post("/admin/users", json={"username": "x\u0000", "role": "auditor"}).status_code == 400
        assert admin.post("/admin/users/no%00body/disable").status_code == 404
        listed = admin.get("/admin/users", params={"org": org}).json()
        assert [u["username"] for u in listed] == [f"api-{uid}", f"qtv-api-{uid}"]
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {qtv}"}) as facility:
        changed = facility.patch(f"/admin/users/api-{uid}", json={"role": "food-safety-inspector"})
        assert changed.status_code == 200 and changed.json()["role"] == "food-safety-inspector"
        assert facility.patch(f"/admin/users/api-{uid}", json={"role": "hub-admin"}).status_code == 403
        assert facility.post(f"/admin/users/api-{uid}/disable").json()["disabled"] is True
        assert facility.post("/admin/users/test-admin/disable").status_code == 404  # out of view
        assert [u["username"] for u in facility.get("/admin/users").json()] == [
            f"api-{uid}",
            f"qtv-api-{uid}",
        ]
    with httpx.Client(base_url=base) as anonymous:
        assert anonymous.get("/admin/users").status_code == 401
    patient = make_token(live_server, role=Role.PATIENT, fhir_user=f"Patient/p-{uid}")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {patient}"}) as other:
        assert other.get("/admin/users").status_code == 403
    assert [e["outcome"] for e in _audits(live_server, "users-disable", f"api-{uid}")] == ["0"]


# --- part 2: the pages (PostgreSQL + Redis runs) ---------------------------------------------

PAGES = [
    "/console",
    "/console/users",
    "/console/facilities",
    "/console/break-glass",
    "/console/audit",
    "/console/connectors",
    "/console/health",
]
IAKRAI = "vn-demo-org-tyt-iakrai"
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _english(client: httpx.Client) -> httpx.Client:
    client.cookies.set("hub_lang", "en")
    return client


def _no_csrf(client: httpx.Client) -> httpx.Client:
    """The same session without the CSRF header: what a forged cross-site form sends."""
    other = httpx.Client(base_url=client.base_url, cookies=client.cookies, headers={"Accept": "text/html"})
    return other


@pytest.mark.pages
@pytest.mark.parametrize(
    ("username", "allowed"),
    [
        ("admin", set(PAGES)),
        ("qtv.iakrai", set(PAGES) - {"/console/health"}),
        ("auditor", set(PAGES) - {"/console/health", "/console/connectors"}),
        ("bs.tuan", set()),
        ("hoa.nguyen", set()),
    ],
)
def test_each_role_sees_only_its_part(web_hub: WebHub, username: str, allowed: set[str]) -> None:
    with web_login(web_hub, username) as client:
        for path in PAGES:
            answer = client.get(path)
            expected = 200 if path in allowed else 403
            assert answer.status_code == expected, (username, path, answer.status_code, answer.text[:300])
            if expected == 200:
                assert "text/html" in answer.headers["content-type"]
                assert "<h1>" in answer.text
        # The nav offers what the role may open (base.html, per role).
        home = client.get("/console")
        if allowed:
            assert ('href="/console/health"' in home.text) == ("/console/health" in allowed)


@pytest.mark.pages
def test_facility_admin_lists_and_disables_only_their_organizations_accounts(
    web_hub: WebHub, uid: str
) -> None:
    engine = web_hub.engine
    ours = users.add_user(
        engine,
        f"ours-{uid}",
        "clinician",
        fhir_user="Practitioner/o",
        organizations=[IAKRAI],
        password="pw-1",
    )
    theirs = users.add_user(
        engine,
        f"theirs-{uid}",
        "clinician",
        fhir_user="Practitioner/t",
        organizations=[f"org-{uid}"],
        password="pw-1",
    )
    with web_login(web_hub, "qtv.iakrai") as client:
        listed = client.get("/console/users").text
        assert ours.username in listed and "bs.tuan" in listed
        assert theirs.username not in listed and "hoa.nguyen" not in listed and "test-admin" not in listed
        assert client.get(f"/console/users/{theirs.username}").status_code == 404
        refused = client.post(f"/console/users/{theirs.username}/disable")
        assert refused.status_code == 404  # as a missing account: out of view
        assert not users.get_user(engine, theirs.username).disabled  # type: ignore[union-attr]
        # htmx: the row's cells come back, disabled, with a text for the live region.
        done = client.post(f"/console/users/{ours.username}/disable", headers={"HX-Request": "true"})
        assert done.status_code == 200, done.text[:300]
        assert "<th" in done.text and "<tr" not in done.text and "data-announce=" in done.text
        assert users.get_user(engine, ours.username).disabled  # type: ignore[union-attr]
        # Without htmx the form posts and comes back to the list.
        back = client.post(f"/console/users/{ours.username}/enable")
        assert back.status_code == 303 and back.headers["location"] == "/console/users"
        assert not users.get_user(engine, ours.username).disabled  # type: ignore[union-attr]
        # Adding: own organization yes, a hub-only role or another organization no.
        form = {
            "username": f"new-{uid}",
            "role": "clinician",
            "fhir_user": "Practitioner/vn-demo-practitioner-1",  # the station's doctor in the demo directory
            "password": "pw-2",
        }
        other_doctor = {**form, "fhir_user": "Practitioner/vn-demo-practitioner-2", "organizations": IAKRAI}
        assert client.post("/console/users", data=other_doctor).status_code == 403  # the province's doctor
        assert client.post("/console/users", data={**form, "organizations": f"org-{uid}"}).status_code == 403
        assert (
            client.post("/console/users", data={**form, "role": "auditor", "fhir_user": ""}).status_code
            == 403
        )
        assert users.get_user(engine, f"new-{uid}") is None
        assert client.post("/console/users", data={**form, "organizations": IAKRAI}).status_code == 201
        assert users.get_user(engine, f"new-{uid}").organizations == (IAKRAI,)  # type: ignore[union-attr]


@pytest.mark.pages
def test_auditor_reads_accounts_but_changes_none(web_hub: WebHub, uid: str) -> None:
    target = users.add_user(
        web_hub.engine,
        f"t-{uid}",
        "clinician",
        fhir_user="Practitioner/a",
        organizations=[IAKRAI],
        password="pw",
    )
    with web_login(web_hub, "auditor") as client:
        page = client.get("/console/users")
        assert page.status_code == 200 and target.username in page.text
        assert 'action="/console/users"' not in page.text.replace('method="get" action="/console/users"', "")
        assert "/disable" not in page.text
        assert client.post(f"/console/users/{target.username}/disable").status_code == 403
        assert (
            client.post(
                "/console/users", data={"username": f"x-{uid}", "role": "auditor", "password": "p"}
            ).status_code
            == 403
        )
        assert (
            client.post(
                "/console/facilities", data={"name": "X", "code": "99999", "level": "other"}
            ).status_code
            == 403
        )
    assert not users.get_user(web_hub.engine, target.username).disabled  # type: ignore[union-attr]
    assert users.get_user(web_hub.engine, f"x-{uid}") is None


@pytest.mark.pages
def test_posts_without_the_csrf_token_are_refused(web_hub: WebHub, uid: str) -> None:
    target = users.add_user(
        web_hub.engine,
        f"c-{uid}",
        "clinician",
        fhir_user="Practitioner/c",
        organizations=[IAKRAI],
        password="pw",
    )
    with web_login(web_hub, "admin") as client, _no_csrf(client) as forged:
        for path, data in [
            (f"/console/users/{target.username}/disable", {}),
            ("/console/users", {"username": f"f-{uid}", "role": "auditor", "password": "p"}),
            (f"/console/users/{target.username}", {"role": "auditor"}),
            ("/console/facilities", {"name": "Forged", "code": uid[:5], "level": "other"}),
            ("/console/break-glass/1/review", {"verdict": "justified"}),
            ("/console/audit/verify", {}),
            ("/console/connectors/replay", {"source": "x"}),
        ]:
            answer = forged.post(path, data=data)
            assert answer.status_code == 403, (path, answer.status_code)
            wrong = forged.post(path, data={**data, "csrf_token": "not-the-token"})
            assert wrong.status_code == 403, path
    assert not users.get_user(web_hub.engine, target.username).disabled  # type: ignore[union-attr]
    assert users.get_user(web_hub.engine, f"f-{uid}") is None


@pytest.mark.pages
def test_a_disabled_account_cannot_log_in_and_its_session_stops(web_hub: WebHub, uid: str) -> None:
    name = f"gone-{uid}"
    users.add_user(
        web_hub.engine,
        name,
        "clinician",
        fhir_user="Practitioner/g",
        organizations=[IAKRAI],
        password="pw-gone",
    )
    with web_login(web_hub, name, "pw-gone") as victim, web_login(web_hub, "admin") as admin:
        assert victim.get("/account").status_code == 200
        assert admin.post(f"/console/users/{name}/disable", headers={"HX-Request": "true"}).status_code == 200
        stopped = victim.get("/account")
        assert stopped.status_code == 303 and stopped.headers["location"].startswith("/login")
    with httpx.Client(base_url=web_hub.url) as client:
        client.get("/login")
        answer = client.post(
            "/login",
            data={
                "username": name,
                "password": "pw-gone",
                "csrf_token": client.cookies.get("hub_login_csrf") or "",
            },
        )
        assert answer.status_code == 400


@pytest.mark.pages
def test_user_supplied_strings_show_as_text(web_hub: WebHub, uid: str) -> None:
    from connectors import inbox, sources
    from connectors.model import Source
    from consent.context import system_access

    code = uid[:5].upper()
    name = f"esc-{uid}"
    with system_access("test-console"):
        source = sources.add(
            web_hub.app.state.router,
            Source(
                name=name,
                facility_code=code,
                facility_name=f"BV {SCRIPT}",
                facility_level="district",
                kind="xml130",
                paused=True,
            ),
        )
    [received] = inbox.receive(web_hub.engine, source, [f"<GIAMDINHHS>{uid}</GIAMDINHHS>".encode()])
    with web_hub.engine.begin() as conn:  # a dead letter whose error quotes what the facility sent
        conn.execute(
            sa.update(connector_message)
            .where(connector_message.c.id == received.id)
            .values(state="dead", attempts=5, error=f"HOSO[1]/XML1/HO_TEN: {SCRIPT}")
        )
    with web_login(web_hub, "admin") as admin:
        page = admin.get("/console/connectors")
        assert page.status_code == 200
        assert SCRIPT not in page.text
        assert f"BV {ESCAPED}" in page.text and f"HO_TEN: {ESCAPED}" in page.text
        # A user name that is not one: refused, and the refusal quotes it as text.
        answer = admin.post("/console/users", data={"username": SCRIPT, "role": "auditor", "password": "p"})
        assert answer.status_code == 400
        assert SCRIPT not in answer.text and ESCAPED in answer.text
        # A facility's name typed into the console.
        added = admin.post(
            "/console/facilities", data={"name": f"TYT {SCRIPT}", "code": code[::-1], "level": "commune"}
        )
        assert added.status_code in (201, 409), added.text[:300]
        listed = admin.get("/console/facilities").text
        assert SCRIPT not in listed
        # Replay of the dead letter: queued again, audited.
        replayed = admin.post("/console/connectors/replay", data={"source": name, "id": str(received.id)})
        assert replayed.status_code == 200
    with web_hub.engine.connect() as conn:
        state = conn.execute(
            sa.select(connector_message.c.state).where(connector_message.c.id == received.id)
        ).scalar_one()
    assert state != "dead"


@pytest.mark.pages
def test_break_glass_alert_is_reviewed_from_the_console(web_hub: WebHub, uid: str) -> None:
    token = make_token(
        web_hub,
        role=Role.CLINICIAN,
        fhir_user="Practitioner/vn-demo-practitioner-1",
        organizations=[IAKRAI],
        username=f"bg-{uid}",
    )
    with web_hub.client(token) as clinician:
        opened = clinician.get(
            "Patient/vn-demo-patient-2", headers={"X-Break-Glass-Reason": f"{SCRIPT} unconscious {uid}"}
        )
        assert opened.status_code == 200, opened.text[:300]
    with web_login(web_hub, "qtv.iakrai") as qtv:
        page = qtv.get("/console/break-glass?status=open")
        assert uid in page.text and SCRIPT not in page.text and ESCAPED in page.text
        alert_id = _alert_id(web_hub, f"bg-{uid}")
        reviewed = qtv.post(
            f"/console/break-glass/{alert_id}/review", data={"verdict": "justified", "note": f"ok {SCRIPT}"}
        )
        assert reviewed.status_code == 200
        assert SCRIPT not in reviewed.text
        bad = qtv.post(f"/console/break-glass/{alert_id}/review", data={"verdict": "maybe"})
        assert bad.status_code == 400
    with httpx.Client(base_url=web_hub.url, headers=web_hub.auth) as api:
        [alert] = [a for a in api.get("/access/break-glass").json() if a["id"] == alert_id]
    assert alert["status"] == "reviewed"
    assert alert["reviews"][0]["reviewer"] == "qtv.iakrai" and alert["reviews"][0]["verdict"] == "justified"


def _alert_id(hub: WebHub, subject: str) -> int:
    from hub.db.schema import break_glass

    with hub.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(break_glass.c.id)
                .where(break_glass.c.subject == subject)
                .order_by(break_glass.c.id.desc())
            )
            .scalars()
            .first()
        )


@pytest.mark.pages
def test_audit_chain_verify_on_demand(web_hub: WebHub) -> None:
    with web_login(web_hub, "auditor") as auditor:
        before = _english(auditor).get("/console/audit")
        assert before.status_code == 200
        assert "No verification recorded yet" in before.text or "entries verified at" in before.text
        ran = auditor.post("/console/audit/verify")
        assert ran.status_code == 200
        assert "Intact" in ran.text and "entries verified at" in ran.text and "by auditor" in ran.text
        # Another worker (or this one after a restart) reads the result from its AuditEvent.
        from hub.web.views import console

        console._last_verify = None
        again = auditor.get("/console/audit")
        assert "Intact" in again.text and "by auditor" in again.text
    with web_login(web_hub, "admin") as admin:
        overview = _english(admin).get("/console").text
        assert "Intact" in overview and "last verified" in overview
    with web_login(web_hub, "qtv.iakrai") as qtv:
        assert qtv.post("/console/audit/verify").status_code == 403
        assert "Verify the chain now" not in _english(qtv).get("/console/audit").text


@pytest.mark.pages
def test_facilities_added_by_a_hub_admin(web_hub: WebHub, uid: str) -> None:
    code = uid[-5:].upper()
    with web_login(web_hub, "admin") as admin:
        _english(admin)
        added = admin.post(
            "/console/facilities", data={"name": f"TYT xã {uid}", "code": code, "level": "commune"}
        )
        assert added.status_code == 201, added.text[:300]
        assert f"TYT xã {uid}" in added.text and code in added.text
        again = admin.post("/console/facilities", data={"name": "Other", "code": code, "level": "commune"})
        assert again.status_code == 409
        assert (
            admin.post(
                "/console/facilities", data={"name": "X", "code": "12", "level": "commune"}
            ).status_code
            == 400
        )
    with web_hub.admin_client() as api:
        found = api.get(
            "Organization", params={"identifier": f"https://ehealth-hub.vn/sid/cskcb|{code}"}
        ).json()
    assert len(found.get("entry", [])) == 1
    with web_login(web_hub, "qtv.iakrai") as qtv:
        assert (
            qtv.post(
                "/console/facilities", data={"name": "Y", "code": "ZZZZZ", "level": "commune"}
            ).status_code
            == 403
        )


@pytest.mark.pages
def test_health_details_json_for_hub_admins_only(web_hub: WebHub) -> None:
    with httpx.Client(base_url=web_hub.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}  # unchanged
        assert anonymous.get("/healthz/details").status_code == 401
    clinician = make_token(web_hub, role=Role.CLINICIAN, fhir_user="Practitioner/h", organizations=[IAKRAI])
    with httpx.Client(base_url=web_hub.url, headers={"Authorization": f"Bearer {clinician}"}) as other:
        assert other.get("/healthz/details").status_code == 403
    with httpx.Client(base_url=web_hub.url, headers=web_hub.auth) as admin:
        details = admin.get("/healthz/details")
    assert details.status_code == 200 and details.headers["cache-control"] == "no-store"
    body = details.json()
    assert [c["name"] for c in body["checks"]] == ["database", "redis", "disk", "audit"]
    assert body["checks"][0]["status"] == "ok"
    with web_login(web_hub, "admin") as session:  # a page session works too
        assert session.get("/healthz/details").status_code == 200
        page = _english(session).get("/console/health")
        assert "Database" in page.text and "Audit writer" in page.text
    with web_login(web_hub, "qtv.iakrai") as qtv:
        assert qtv.get("/healthz/details").status_code == 403


@pytest.mark.pages
def test_account_changed_from_its_page(web_hub: WebHub, uid: str) -> None:
    name = f"chg-{uid}"
    users.add_user(
        web_hub.engine,
        name,
        "clinician",
        fhir_user="Practitioner/c",
        organizations=[IAKRAI],
        password="pw-chg",
    )
    with web_login(web_hub, name, "pw-chg") as person, web_login(web_hub, "qtv.iakrai") as qtv:
        assert qtv.get(f"/console/users/{name}").status_code == 200
        # Saving what is already there changes nothing and keeps the person logged in.
        same = qtv.post(f"/console/users/{name}", data={"role": "clinician", "organizations": IAKRAI})
        assert same.status_code == 200
        assert person.get("/account").status_code == 200
        promoted = qtv.post(
            f"/console/users/{name}", data={"role": "facility-admin", "organizations": IAKRAI}
        )
        assert promoted.status_code == 403
        assert users.get_user(web_hub.engine, name).role is Role.CLINICIAN  # type: ignore[union-attr]
        moved = qtv.post(
            f"/console/users/{name}", data={"role": "food-safety-inspector", "organizations": IAKRAI}
        )
        assert moved.status_code == 200
        assert users.get_user(web_hub.engine, name).role is Role.INSPECTOR  # type: ignore[union-attr]
        # The old role's session is over.
        assert person.get("/account").status_code == 303
