"""The operator console: account administration (hub/auth/users.py ``manage_*``) and the
console's pages (hub/web/views/console.py).

Part 1 runs on both backends: the account functions against a real server's database and
audit trail (who may list, add, disable, change which account; each change and each refusal
an AuditEvent naming the actor, read back through /fhir/AuditEvent).
Part 2 (marked ``pages``: PostgreSQL + Redis runs only) drives the pages over HTTP.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from conftest import LiveServer

from hub.audit.events import HUB_OPERATIONS
from hub.auth import users
from hub.auth.principal import Principal, Role
from hub.auth.scopes import ScopeSet
from hub.auth.users import AccountForbidden, UserError


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
    ours = users.manage_add(
        engine, qtv, f"ours-{uid}", "clinician", fhir_user="Practitioner/x", organizations=[own], password="p"
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

    refusals: list[tuple[str, Any]] = [
        ("another organization's account", lambda: users.manage_disable(engine, qtv, theirs, trail=trail)),
        ("an account shared with another", lambda: users.manage_disable(engine, qtv, both, trail=trail)),
        ("their own account", lambda: users.manage_disable(engine, qtv, f"qtv-{uid}", trail=trail)),
        ("a hub admin", lambda: users.manage_disable(engine, qtv, "test-admin", trail=trail)),
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


def _unused() -> tuple[type[httpx.Client], str]:  # keeps the imports of part 2 while it is written
    return httpx.Client, uuid.uuid4().hex
