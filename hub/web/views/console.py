"""The operator console under ``/console``: accounts, facilities, break-glass review, the audit
chain, connectors and the hub's health, for hub admins, facility admins and auditors.

Owns the routes (HTML; POSTs need the session's CSRF token, ``hub.web.context``):

* ``/console``: an overview of what the person's role may see;
* ``/console/users`` (``?role=&org=&disabled=``): accounts; ``POST`` adds one;
  ``POST /console/users/{name}/disable|enable`` (htmx: the row is swapped), ``GET|POST
  /console/users/{name}``: an account and the change of its role, organizations, fhirUser;
* ``/console/facilities``: Organizations (through the page's FHIR handle, as the person);
  ``POST`` adds one (a hub admin; a conditional create on its MA_CSKCB code);
* ``/console/break-glass``: alerts (``consent.breakglass.list_alerts`` with the person's
  principal) and ``POST /console/break-glass/{id}/review`` (``consent.breakglass.review``,
  as ``POST /access/break-glass/{id}/review``);
* ``/console/audit``: the chain's head (cheap) and the last ``hub audit verify`` result of
  this process; ``POST /console/audit/verify`` runs it (hub admins, auditors; audited);
* ``/console/connectors``: per source status (``connectors.api.statuses_visible_to``: the
  rules of ``GET /connectors``), and for hub admins the dead letters with their errors and
  ``POST /console/connectors/replay`` (audited as ``connectors-replay``, as the API);
* ``/console/health``: ``hub.ops.health.health_report`` (hub admins); the same as JSON at
  ``/healthz/details`` (hub admins, by bearer token or page session; ``/healthz`` unchanged);
* ``/admin/users`` (JSON, bearer tokens only, OperationOutcome errors): ``GET`` (``?role=&org=
  &disabled=true|false``), ``POST`` (``{"username", "role", "fhirUser", "organizations",
  "password"}``), ``PATCH /admin/users/{name}`` (``{"role", "organizations", "fhirUser"}``),
  ``POST /admin/users/{name}/disable|enable``: the console's account functions for scripts.

Who may do what is decided by the functions called (``hub.auth.users.manage_*``,
``consent.breakglass``, ``connectors.api``), never by what the page shows; the page only
leaves out what the role cannot use.
Calls: hub.web.context (Page, page_for), hub.auth.users, consent.breakglass, hub.audit.verify,
connectors.api/inbox, hub.ops.health, the audit trail (AccessEvent for verify and replay).
Called by: hub.web.app (includes ``router``).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from connectors import inbox
from connectors.api import statuses_visible_to
from connectors.identifiers import FACILITY
from connectors.model import FACILITY_LEVELS, Source
from connectors.sources import organization_of
from consent import breakglass
from hub.api.auth_routes import Bearer, unauthorized
from hub.audit.events import HUB_OPERATIONS, AccessEvent
from hub.audit.verify import Problem, VerifyReport, head, verify_chain
from hub.auth import users
from hub.auth.principal import Principal, Role
from hub.auth.tokens import AuthError
from hub.errors import FhirError, Issue
from hub.ops.health import Check, HealthReport, health_report
from hub.rest.messages import FHIR_JSON
from hub.web import i18n, render
from hub.web.context import Page, base_context, page_for
from hub.web.fhir_handle import FhirHandle, PageFhirError
from hub.web.i18n import N_
from hub.web.session import COOKIE

router = APIRouter()
log = logging.getLogger(__name__)

ADMIN, FACILITY_ADMIN, AUDITOR = Role.ADMIN.value, Role.FACILITY_ADMIN.value, Role.AUDITOR.value
console_page = page_for(ADMIN, FACILITY_ADMIN, AUDITOR)
account_page = page_for(ADMIN, FACILITY_ADMIN, AUDITOR)
connectors_page = page_for(ADMIN, FACILITY_ADMIN)
admin_page = page_for(ADMIN)

DEAD_LETTERS_SHOWN = 20  # per source; the rest through `hub connectors messages`
FACILITIES_SHOWN = 200
_FACILITY_CODE = re.compile(r"^[0-9A-Za-z]{5}$")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ALERT_VERDICTS = ("justified", "not-justified")
# The role names as the pages show them (message ids; translated in console.po).
ROLE_LABELS = {
    "clinician": N_("Clinician"),
    "patient": N_("Patient"),
    "proxy": N_("Family member (proxy)"),
    "facility-admin": N_("Facility admin"),
    "food-safety-inspector": N_("Food-safety inspector"),
    "integration-service": N_("Integration service"),
    "auditor": N_("Auditor"),
    "hub-admin": N_("Hub admin"),
}
LEVEL_LABELS = {
    "commune": N_("Commune health station"),
    "district": N_("District or regional centre"),
    "provincial": N_("Provincial hospital"),
    "other": N_("Other facility"),
}
CHECK_LABELS = {
    "database": N_("Database"),
    "redis": "Redis",  # a name: the same in every language
    "disk": N_("Disk"),
    "audit": N_("Audit writer"),
}
STATUS_LABELS = {"ok": N_("OK"), "warn": N_("Warning"), "fail": N_("Failing")}
# Every text hub.ops.health writes (``Check.text``), so the page shows it translated
# (tests/test_health.py checks that each text a check produces is listed here).
HEALTH_MESSAGES = (
    N_("The check failed: {error}"),
    N_("The database is unreachable"),
    N_("The database schema is not at the code's migration head: run `hub db upgrade`"),
    N_("The database answers slowly ({ms} ms)"),
    N_("Reachable in {ms} ms, schema at the head"),
    N_("Not configured: rate limits and connector work stay in this process"),
    N_("Redis does not answer"),
    N_("Redis answers slowly ({ms} ms)"),
    N_("PING answered in {ms} ms"),
    N_("Free disk space: {summary}"),
    N_("Little free disk space: {summary}"),
    N_("Auditing is off in this process"),
    N_("The group commit writer is not running in this process"),
    N_("{waiting} requests wait for their audit and nothing was committed for {seconds} s or more"),
    N_("{waiting} requests wait for their audit records"),
    N_("Group commit running, {waiting} waiting, no batch yet"),
    N_("Group commit running, {waiting} waiting, last batch {age} s ago"),
)


# --- shared state of this process -------------------------------------------------------------


@dataclass(frozen=True)
class VerifyRun:
    """The last ``hub audit verify`` run from the console in this process."""

    at: datetime
    by: str
    report: VerifyReport
    seconds: float


@dataclass(frozen=True)
class VerifyJob:
    """A verification under way (one at a time per process: it walks the whole chain)."""

    started: datetime
    by: str
    done: threading.Event


VERIFY_WAIT_SECONDS = 20.0  # how long the verify button's request waits for the result
_last_verify: VerifyRun | None = None
_running_verify: VerifyJob | None = None
_verify_lock = threading.Lock()  # guards _running_verify


def _state(request: Request) -> Any:
    return request.app.state


def _client(page: Page) -> str | None:
    return page.fhir.client_address


def _audit(page: Page, operation: str, action: str, detail: str | None, status: int) -> None:
    """One AuditEvent for an operator action that is not a FHIR interaction (as the
    connectors' admin API writes them)."""
    trail = _state(page.request).router.gate.trail
    if trail is None:
        return
    trail.record(
        [
            AccessEvent(
                principal=page.user.principal,
                interaction="operation",
                action=action,
                operation=operation,
                query=detail,
                outcome_status=status,
                purpose="HSYSADMIN",
                client_address=_client(page),
            )
        ]
    )


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


async def _form(request: Request) -> dict[str, list[str]]:
    form = await request.form()
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields.setdefault(key, []).append(value.replace("\x00", ""))
    return fields


def _one(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name) or [""]
    return values[0].strip()


def practitioner_organizations(handle: FhirHandle) -> users.PractitionerOrganizations:
    """The organizations of a Practitioner's PractitionerRoles, read through the FHIR router
    as the person (``hub.auth.users.manage_add`` checks a facility admin's fhirUser with it)."""

    def held(practitioner_id: str) -> set[str] | None:
        if not _FHIR_ID.fullmatch(practitioner_id):
            return None
        try:
            roles = handle.search_resources(
                "PractitionerRole", [("practitioner", f"Practitioner/{practitioner_id}"), ("_count", "100")]
            )
        except PageFhirError:
            return None
        return {
            str(reference).removeprefix("Organization/")
            for role in roles
            if (reference := (role.get("organization") or {}).get("reference"))
        }

    return held


def _split(text: str) -> list[str]:
    """Organization ids typed in one field, separated by commas or spaces."""
    return [part for part in re.split(r"[\s,]+", text.strip()) if part]


# --- overview ---------------------------------------------------------------------------------


@router.get("/console", include_in_schema=False)
def overview(page: Page = Depends(console_page)) -> HTMLResponse:
    state = _state(page.request)
    principal = page.user.principal
    cards: dict[str, Any] = {}
    accounts = users.visible_accounts(state.engine, principal)  # every console role reads some
    cards["accounts"] = {"total": len(accounts), "disabled": sum(1 for u in accounts if u.disabled)}
    with state.router.ctx.store.read() as conn:
        alerts = breakglass.list_alerts(conn, principal, open_only=True)
    cards["open_alerts"] = len(alerts)
    seq, chain = head(state.engine)
    cards["audit"] = {"seq": seq, "head": chain, "last": _last_result(page)}
    if principal.role in (Role.ADMIN, Role.FACILITY_ADMIN):
        statuses = statuses_visible_to(state.router.ctx.store, principal)
        cards["connectors"] = {
            "sources": len(statuses),
            "backlog": sum(s.backlog for s in statuses),
            "dead": sum(s.counts.get("dead", 0) for s in statuses),
        }
    if principal.role is Role.ADMIN:
        cards["health"] = _health(page.request).status
    return page.render(
        "console/overview.html",
        cards=cards,
        status_labels=STATUS_LABELS,
        role_label=ROLE_LABELS.get(page.user.role, page.user.role),
    )


# --- accounts ---------------------------------------------------------------------------------


def _account_filters(request: Request) -> dict[str, Any]:
    query = request.query_params
    role = query.get("role") or None
    disabled = {"yes": True, "no": False}.get(query.get("disabled") or "")
    return {
        "role": role if role in ROLE_LABELS else None,
        "organization": (query.get("org") or "").strip() or None,
        "disabled": disabled,
    }


def _creatable_roles(principal: Principal) -> list[str]:
    if principal.role is Role.ADMIN:
        return list(ROLE_LABELS)
    if principal.role is Role.FACILITY_ADMIN:
        return [r for r in ROLE_LABELS if Role(r) in users.FACILITY_CREATABLE_ROLES]
    return []


def _users_page(
    page: Page,
    status: int = 200,
    *,
    message: str | None = None,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    engine = _state(page.request).engine
    principal = page.user.principal
    filters = _account_filters(page.request)
    accounts = users.visible_accounts(engine, principal, **filters)
    return page.render(
        "console/users.html",
        status,
        accounts=accounts,
        manageable_names={u.username for u in accounts if users.may_manage(principal, u)},
        filters=filters,
        role_labels=ROLE_LABELS,
        creatable_roles=_creatable_roles(principal),
        own_orgs=principal.organizations,
        message=message,
        error=error,
        form=form or {},
    )


@router.get("/console/users", include_in_schema=False)
def users_list(page: Page = Depends(account_page)) -> HTMLResponse:
    return _users_page(page)


@router.post("/console/users", include_in_schema=False)
async def users_add(request: Request, page: Page = Depends(account_page)) -> Response:
    fields = await _form(request)
    return await run_in_threadpool(_add_account, page, fields)


def _add_account(page: Page, fields: dict[str, list[str]]) -> HTMLResponse:
    state = _state(page.request)
    username, role = _one(fields, "username"), _one(fields, "role")
    fhir_user = _one(fields, "fhir_user") or None
    organizations = [org for value in fields.get("organizations", []) for org in _split(value)]
    password = (fields.get("password") or [""])[0]
    shown = {
        "username": username,
        "role": role,
        "fhir_user": fhir_user or "",
        "organizations": " ".join(organizations),
    }
    try:
        user = users.manage_add(
            state.engine,
            page.user.principal,
            username,
            role,
            fhir_user=fhir_user,
            organizations=organizations,
            password=password or None,
            trail=state.router.gate.trail,
            client_address=_client(page),
            practitioner_organizations=practitioner_organizations(page.fhir),
        )
    except users.AccountForbidden as error:
        return _users_page(page, 403, error=str(error), form=shown)
    except users.UserError as error:
        return _users_page(page, 400, error=str(error), form=shown)
    return _users_page(page, 201, message=page.gettext("Account %(name)s added.") % {"name": user.username})


@router.post("/console/users/{username}/disable", include_in_schema=False)
async def users_disable(username: str, request: Request, page: Page = Depends(account_page)) -> Response:
    return await run_in_threadpool(_set_disabled, page, username, True)


@router.post("/console/users/{username}/enable", include_in_schema=False)
async def users_enable(username: str, request: Request, page: Page = Depends(account_page)) -> Response:
    return await run_in_threadpool(_set_disabled, page, username, False)


def _set_disabled(page: Page, username: str, disabled: bool) -> Response:
    state = _state(page.request)
    principal = page.user.principal
    try:
        user = users.manage_disable(
            state.engine,
            principal,
            username,
            disabled,
            trail=state.router.gate.trail,
            client_address=_client(page),
        )
    except users.AccountForbidden as error:
        return _refused(page, 403, str(error))
    except users.UserError as error:
        return _refused(page, 404 if "No user" in str(error) else 400, str(error))
    if disabled:
        # Its page sessions end in every process at once (the token check would end them
        # within the re-check interval in other processes).
        state.pages.sessions.end_all(username)
    if not _is_htmx(page.request):
        return RedirectResponse("/console/users", 303)
    text = page.gettext("%(name)s disabled.") if disabled else page.gettext("%(name)s enabled.")
    return page.render(
        "console/_user_cells.html",
        account=user,
        manageable=users.may_manage(principal, user),
        role_labels=ROLE_LABELS,
        announce=text % {"name": user.username},
    )


def _refused(page: Page, status: int, message: str) -> HTMLResponse:
    if _is_htmx(page.request):
        # htmx swaps nothing on an error status: the message goes to the live region (app.js).
        return HTMLResponse(status_code=status, headers={"HX-Reswap": "none"})
    return _error_page(page, status, message)


def _error_page(page: Page, status: int, message: str) -> HTMLResponse:
    """The foundation's error page, with the person's header and nav."""
    values = base_context(page.request, page.locale, page.user, page.csrf_token)
    values.update(status=status, message=message)
    return HTMLResponse(render.render("error.html", page.locale, values), status_code=status)


@router.get("/console/users/{username}", include_in_schema=False)
def user_detail(username: str, page: Page = Depends(account_page)) -> HTMLResponse:
    return _user_page(page, username)


def _user_page(
    page: Page, username: str, status: int = 200, *, message: str | None = None, error: str | None = None
) -> HTMLResponse:
    engine = _state(page.request).engine
    principal = page.user.principal
    user = users.get_user(engine, username) if users.looks_like_username(username) else None
    if user is None or not users.account_in_view(principal, user):
        return _error_page(page, 404, "")
    manageable = users.may_manage(principal, user)
    if principal.role is Role.ADMIN:
        roles = list(ROLE_LABELS)
    else:
        roles = [r for r in ROLE_LABELS if Role(r) in users.FACILITY_ASSIGNABLE_ROLES or r == user.role.value]
    return page.render(
        "console/user.html",
        status,
        account=user,
        manageable=manageable,
        roles=roles,
        role_labels=ROLE_LABELS,
        may_change_person=principal.role is Role.ADMIN,
        message=message,
        error=error,
    )


@router.post("/console/users/{username}", include_in_schema=False)
async def user_change(username: str, request: Request, page: Page = Depends(account_page)) -> Response:
    fields = await _form(request)
    return await run_in_threadpool(_change_account, page, username, fields)


def _change_account(page: Page, username: str, fields: dict[str, list[str]]) -> HTMLResponse:
    state = _state(page.request)
    organizations = [org for value in fields.get("organizations", []) for org in _split(value)]
    fhir_user = _one(fields, "fhir_user") or None
    before = users.get_user(state.engine, username) if users.looks_like_username(username) else None
    try:
        after = users.manage_change(
            state.engine,
            page.user.principal,
            username,
            role=_one(fields, "role") or None,
            organizations=organizations,
            fhir_user=fhir_user if page.user.principal.role is Role.ADMIN else None,
            trail=state.router.gate.trail,
            client_address=_client(page),
        )
    except users.AccountForbidden as error:
        return _user_page(page, username, 403, error=str(error))
    except users.UserError as error:
        return _user_page(page, username, 400, error=str(error))
    if before is not None and (before.role, before.organizations, before.fhir_user) != (
        after.role,
        after.organizations,
        after.fhir_user,
    ):
        state.pages.sessions.end_all(username)  # its sessions act as the old account: they end
    return _user_page(page, username, message=page.gettext("The account was changed."))


# --- facilities -------------------------------------------------------------------------------


def _facilities_page(
    page: Page,
    status: int = 200,
    *,
    message: str | None = None,
    error: str | None = None,
    form: dict[str, str] | None = None,
) -> HTMLResponse:
    refused = False
    organizations: list[dict[str, Any]] = []
    try:
        organizations = page.fhir.search_resources(
            "Organization", [("_count", str(FACILITIES_SHOWN)), ("_sort", "name")]
        )
    except PageFhirError as failure:
        if failure.status != 403:
            raise
        refused = True  # a role without Organization scopes (auditors): said plainly
    rows = []
    for organization in organizations:
        codes = [i.get("value") for i in organization.get("identifier", []) if i.get("system") == FACILITY]
        levels = [
            c.get("code")
            for t in organization.get("type", [])
            for c in t.get("coding", [])
            if c.get("system", "").endswith("/facility-level")
        ]
        rows.append(
            {
                "id": organization.get("id"),
                "name": organization.get("name") or "",
                "code": codes[0] if codes else "",
                "level": levels[0] if levels else "",
                "active": organization.get("active", True),
                "part_of": (organization.get("partOf") or {}).get("reference", ""),
            }
        )
    return page.render(
        "console/facilities.html",
        status,
        facilities=rows,
        refused=refused,
        may_add=page.user.role == ADMIN,
        levels=FACILITY_LEVELS,
        level_labels=LEVEL_LABELS,
        message=message,
        error=error,
        form=form or {},
    )


@router.get("/console/facilities", include_in_schema=False)
def facilities(page: Page = Depends(console_page)) -> HTMLResponse:
    return _facilities_page(page)


@router.post("/console/facilities", include_in_schema=False)
async def facilities_add(request: Request, page: Page = Depends(admin_page)) -> Response:
    fields = await _form(request)
    return await run_in_threadpool(_add_facility, page, fields)


def _add_facility(page: Page, fields: dict[str, list[str]]) -> HTMLResponse:
    name, code, level = _one(fields, "name"), _one(fields, "code"), _one(fields, "level")
    shown = {"name": name, "code": code, "level": level}
    if not name or len(name) > 200:
        return _facilities_page(page, 400, error=page.gettext("Give the facility's name."), form=shown)
    if not _FACILITY_CODE.match(code):
        return _facilities_page(
            page, 400, error=page.gettext("The MA_CSKCB code has 5 letters or digits."), form=shown
        )
    if level not in FACILITY_LEVELS:
        return _facilities_page(page, 400, error=page.gettext("Choose the facility's level."), form=shown)
    source = Source(
        name="console", facility_code=code, facility_name=name, facility_level=level, kind="xml130"
    )
    # A conditional create: one Organization per MA_CSKCB code, whoever registers it first.
    response = page.fhir.request(
        "POST",
        "Organization",
        body=organization_of(source),
        headers={"if-none-exist": f"identifier={FACILITY}|{code}"},
    )
    if response.status == 200:
        return _facilities_page(
            page,
            409,
            error=page.gettext("A facility with this MA_CSKCB code is already registered."),
            form=shown,
        )
    if response.status != 201:
        raise PageFhirError(response.status, {})
    return _facilities_page(page, 201, message=page.gettext("Facility %(name)s added.") % {"name": name})


# --- break-glass ------------------------------------------------------------------------------


def _alerts_page(
    page: Page, status: int = 200, *, message: str | None = None, error: str | None = None
) -> HTMLResponse:
    store = _state(page.request).router.ctx.store
    open_only = page.request.query_params.get("status") == "open"
    with store.read() as conn:
        alerts = [a.as_json() for a in breakglass.list_alerts(conn, page.user.principal, open_only=open_only)]
    return page.render(
        "console/break_glass.html",
        status,
        alerts=alerts,
        open_only=open_only,
        verdicts=_ALERT_VERDICTS,
        message=message,
        error=error,
    )


@router.get("/console/break-glass", include_in_schema=False)
def break_glass(page: Page = Depends(console_page)) -> HTMLResponse:
    return _alerts_page(page)


@router.post("/console/break-glass/{alert_id}/review", include_in_schema=False)
async def break_glass_review(alert_id: int, request: Request, page: Page = Depends(console_page)) -> Response:
    fields = await _form(request)
    return await run_in_threadpool(_review, page, alert_id, _one(fields, "verdict"), _one(fields, "note"))


def _review(page: Page, alert_id: int, verdict: str, note: str) -> HTMLResponse:
    store = _state(page.request).router.ctx.store
    try:
        with store.write() as conn:
            breakglass.review(conn, page.user.principal, alert_id, note, verdict)
    except FhirError as failure:
        return _alerts_page(page, failure.status, error=str(failure))
    return _alerts_page(
        page, message=page.gettext("Your review of alert %(id)s is recorded.") % {"id": alert_id}
    )


# --- audit chain ------------------------------------------------------------------------------


@router.get("/console/audit", include_in_schema=False)
def audit(page: Page = Depends(console_page)) -> HTMLResponse:
    return _audit_page(page)


@dataclass(frozen=True)
class VerifyResult:
    """The last verification as the pages show it: this process's own run (with its problems)
    or, from another worker or before a restart, the one its AuditEvent records."""

    at: datetime
    by: str
    ok: bool
    verified: int
    head: str
    head_seq: int
    problem_count: int
    seconds: float | None
    problems: tuple[Problem, ...] = ()


def _from_run(run: VerifyRun) -> VerifyResult:
    report = run.report
    problems = sorted(report.problems, key=lambda p: (p.seq is None, p.seq or 0))[:50]
    return VerifyResult(
        run.at,
        run.by,
        report.ok,
        report.verified,
        report.head,
        report.head_seq,
        report.problem_count,
        run.seconds,
        tuple(problems),
    )


def _verify_detail(run: VerifyRun) -> str:
    """What the audit-verify AuditEvent records of the result (its query), read back by
    ``_recorded_verify``."""
    report = run.report
    return urlencode(
        {
            "result": "intact" if report.ok else "broken",
            "verified": report.verified,
            "head_seq": report.head_seq,
            "head": report.head,
            "problems": report.problem_count,
            "seconds": f"{run.seconds:.3f}",
            "started": run.at.isoformat(),
        }
    )


def _recorded_verify(page: Page) -> VerifyResult | None:
    """The newest audit-verify AuditEvent, read as the person (auditors and hub admins read
    AuditEvents; for anyone else, or without one, None)."""
    try:
        events = page.fhir.search_resources(
            "AuditEvent",
            [("subtype", f"{HUB_OPERATIONS}|audit-verify"), ("_sort", "-date"), ("_count", "1")],
        )
    except PageFhirError:
        return None
    for event in events:
        query = next((e["query"] for e in event.get("entity", []) if e.get("query")), None)
        if not query:
            continue
        try:
            # The recorded query is "<operation>?<detail>".
            fields = dict(parse_qsl(base64.b64decode(query).decode().partition("?")[2]))
            return VerifyResult(
                datetime.fromisoformat(fields["started"]),
                str(event["agent"][0].get("name") or ""),
                fields["result"] == "intact",
                int(fields["verified"]),
                fields["head"],
                int(fields["head_seq"]),
                int(fields["problems"]),
                float(fields["seconds"]),
            )
        except (KeyError, ValueError, IndexError, UnicodeDecodeError):
            continue  # an older or foreign record: not ours to read
    return None


def _last_result(page: Page) -> VerifyResult | None:
    """This process's last run, unless the trail records a newer one (another worker's)."""
    local = _last_verify
    recorded = _recorded_verify(page) if page.user.role in (ADMIN, AUDITOR) else None
    if local is not None and (recorded is None or recorded.at <= local.at):
        return _from_run(local)
    return recorded


def _audit_page(page: Page, status: int = 200, *, error: str | None = None) -> HTMLResponse:
    seq, chain = head(_state(page.request).engine)
    return page.render(
        "console/audit.html",
        status,
        head_seq=seq,
        head=chain,
        last=_last_result(page),
        may_verify=page.user.role in (ADMIN, AUDITOR),
        running=_running_verify,
        error=error,
    )


@router.post("/console/audit/verify", include_in_schema=False)
def audit_verify(page: Page = Depends(page_for(ADMIN, AUDITOR))) -> HTMLResponse:
    """Start a verification (or join the one running) and wait a little for its result: a
    small chain answers at once, a large one (about 1 ms per event) keeps running in the
    background and the page says so; reloading shows the result when it is there."""
    with _verify_lock:
        job = _running_verify or _start_verify(page)
    job.done.wait(VERIFY_WAIT_SECONDS)
    return _audit_page(page)


def _start_verify(page: Page) -> VerifyJob:
    global _running_verify
    job = VerifyJob(datetime.now(UTC), page.user.username, threading.Event())
    engine = _state(page.request).engine

    def run() -> None:
        global _last_verify, _running_verify
        status, detail = 500, None
        try:
            report = verify_chain(engine)
            elapsed = (datetime.now(UTC) - job.started).total_seconds()
            finished = VerifyRun(job.started, job.by, report, elapsed)
            status, detail = 200, _verify_detail(finished)
            _last_verify = finished
        except Exception:  # noqa: BLE001  (logged; the page shows no new result)
            log.exception("audit chain verification failed")
        finally:
            try:  # recorded before the waiting page reads the result back
                _audit(page, "audit-verify", "E", detail, status)
            except Exception:  # noqa: BLE001  (the audit writer's own failure is logged there)
                log.exception("the audit-verify run could not be audited")
            with _verify_lock:
                _running_verify = None
            job.done.set()

    _running_verify = job
    threading.Thread(target=run, name="console-audit-verify", daemon=True).start()
    return job


# --- connectors -------------------------------------------------------------------------------


def _connectors_page(
    page: Page, status: int = 200, *, message: str | None = None, error: str | None = None
) -> HTMLResponse:
    state = _state(page.request)
    principal = page.user.principal
    statuses = statuses_visible_to(state.router.ctx.store, principal)
    dead: dict[str, list[inbox.MessageSummary]] = {}
    if principal.role is Role.ADMIN:  # the inbox rows are for hub admins, as in the API
        for source in statuses:
            if source.counts.get("dead", 0) or source.counts.get("failed", 0):
                dead[source.name] = inbox.messages(
                    state.engine, source=source.name, state="dead", limit=DEAD_LETTERS_SHOWN
                )
    return page.render(
        "console/connectors.html",
        status,
        statuses=statuses,
        dead=dead,
        may_replay=principal.role is Role.ADMIN,
        level_labels=LEVEL_LABELS,
        message=message,
        error=error,
    )


@router.get("/console/connectors", include_in_schema=False)
def connectors(page: Page = Depends(connectors_page)) -> HTMLResponse:
    return _connectors_page(page)


@router.post("/console/connectors/replay", include_in_schema=False)
async def connectors_replay(request: Request, page: Page = Depends(admin_page)) -> Response:
    fields = await _form(request)
    return await run_in_threadpool(_replay, page, fields)


def _replay(page: Page, fields: dict[str, list[str]]) -> HTMLResponse:
    state = _state(page.request)
    source = _one(fields, "source") or None
    ids: list[int] = []
    for value in fields.get("id", []):
        if value.strip().isdigit() and 0 < int(value) < 2**63:
            ids.append(int(value))
    known = {s.name for s in statuses_visible_to(state.router.ctx.store, page.user.principal)}
    detail = f"source={source or ''}&ids={','.join(map(str, ids))}&state=dead"
    if source not in known:
        _audit(page, "connectors-replay", "E", detail, 404)
        return _connectors_page(page, 404, error=page.gettext("There is no such connector source."))
    count = inbox.replay(state.engine, ids=ids or None, state=None if ids else "dead", source=source)
    _audit(page, "connectors-replay", "E", detail, 200)
    runtime = getattr(state, "connectors", None)
    if runtime is not None:
        runtime.wake()
    text = page.gettext("Messages queued again: %(count)s.")
    return _connectors_page(page, message=text % {"count": count})


# --- health -----------------------------------------------------------------------------------


def _health(request: Request) -> HealthReport:
    state = _state(request)
    settings = state.settings
    return health_report(state.engine, settings, settings.redis_url, state.router.gate.trail)


@router.get("/console/health", include_in_schema=False)
def health(page: Page = Depends(admin_page)) -> HTMLResponse:
    report = _health(page.request)
    messages = {check.name: _health_message(page, check) for check in report.checks}
    return page.render(
        "console/health.html",
        report=report,
        messages=messages,
        check_labels=CHECK_LABELS,
        status_labels=STATUS_LABELS,
    )


def _health_message(page: Page, check: Check) -> str:
    """A check's sentence in the page's language, its numbers written the locale's way."""
    params = {
        key: i18n.display_number(value, page.locale) if isinstance(value, int | float) else value
        for key, value in check.params.items()
    }
    return page.gettext(check.text).format(**params)


@router.get("/healthz/details", include_in_schema=False)
def health_details(request: Request) -> Response:
    """The health report as JSON, for hub admins: a bearer token (monitoring) or a page
    session (a browser). Anonymous 401, other roles 403, as the admin APIs answer."""
    state = _state(request)
    principal: Principal | None = None
    authorization = request.headers.get("authorization")
    if authorization:
        try:
            principal = Bearer(state.settings, state.tokens).principal(authorization)
        except AuthError as error:
            answer = unauthorized(error)
            return Response(answer.body, 401, headers=answer.headers, media_type=FHIR_JSON)
    else:
        user = state.pages.sessions.load(request.cookies.get(COOKIE))
        principal = user.principal if user is not None else None
    if principal is None:
        answer = unauthorized(AuthError("A bearer token is required", None))
        return Response(answer.body, 401, headers=answer.headers, media_type=FHIR_JSON)
    if principal.role is not Role.ADMIN:
        forbidden = FhirError(403, [Issue("forbidden", "Only hub admins read the health details")])
        return Response(forbidden.outcome_bytes(), 403, media_type=FHIR_JSON)
    return JSONResponse(_health(request).as_json(), headers={"Cache-Control": "no-store"})


# --- the accounts as a JSON API (bearer tokens; the same functions and rules as the pages) ------


def _api_error(status: int, code: str, message: str) -> Response:
    return Response(FhirError(status, [Issue(code, message)]).outcome_bytes(), status, media_type=FHIR_JSON)


def _api_principal(request: Request) -> Principal | Response:
    """The bearer token's principal, or the 401 answer. No session cookie: a cookie-borne
    JSON call would need the pages' CSRF token, and scripts have tokens."""
    state = _state(request)
    authorization = request.headers.get("authorization")
    try:
        principal = Bearer(state.settings, state.tokens).principal(authorization)
    except AuthError as error:
        answer = unauthorized(error)
        return Response(answer.body, 401, headers=answer.headers, media_type=FHIR_JSON)
    if principal is None:
        answer = unauthorized(AuthError("A bearer token is required", None))
        return Response(answer.body, 401, headers=answer.headers, media_type=FHIR_JSON)
    return principal


def account_json(user: users.User, actor: Principal) -> dict[str, Any]:
    """An account as the API shows it (never its password hash)."""
    return {
        "username": user.username,
        "role": user.role.value,
        "fhirUser": user.fhir_user,
        "organizations": list(user.organizations),
        "scopes": user.scopes,
        "disabled": user.disabled,
        "hasPassword": user.has_password,
        "created": user.created.isoformat() if user.created else None,
        "manageable": users.may_manage(actor, user),
    }


def _api_call(request: Request, work: Any, status: int = 200) -> Response:
    principal = _api_principal(request)
    if isinstance(principal, Response):
        return principal
    try:
        result = work(principal)
    except users.AccountForbidden as error:
        return _api_error(403, "forbidden", str(error))
    except users.UserError as error:
        text = str(error)
        if text.startswith("No user"):
            return _api_error(404, "not-found", text)
        if text.endswith("already exists"):
            return _api_error(409, "duplicate", text)
        return _api_error(400, "invalid", text)
    return JSONResponse(result, status_code=status, headers={"Cache-Control": "no-store"})


async def _api_body(request: Request) -> dict[str, Any] | Response:
    import json

    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _api_error(400, "invalid", "The body must be a JSON object")
    if not isinstance(body, dict) or _has_nul(body):
        return _api_error(400, "invalid", "The body must be a JSON object without NUL characters")
    return body


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _strings(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise users.UserError(f"{name} must be a list of strings")
    return list(value)


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise users.UserError(f"{name} must be a string")
    return value


@router.get("/admin/users", tags=["admin"], summary="Accounts the caller may see")
def api_users(request: Request) -> Response:
    state = _state(request)
    query = request.query_params
    disabled = {"true": True, "false": False}.get(query.get("disabled", ""))

    def work(actor: Principal) -> list[dict[str, Any]]:
        role = query.get("role") or None
        if role is not None and role not in ROLE_LABELS:
            raise users.UserError(f"Unknown role {role!r}")
        found = users.visible_accounts(
            state.engine, actor, role=role, organization=query.get("org") or None, disabled=disabled
        )
        return [account_json(u, actor) for u in found]

    return _api_call(request, work)


@router.post("/admin/users", tags=["admin"], summary="Add an account (as `hub users add`)")
async def api_users_add(request: Request) -> Response:
    body = await _api_body(request)
    if isinstance(body, Response):
        return body
    state = _state(request)

    def work(actor: Principal) -> dict[str, Any]:
        user = users.manage_add(
            state.engine,
            actor,
            _string(body, "username") or "",
            _string(body, "role") or "",
            fhir_user=_string(body, "fhirUser"),
            organizations=_strings(body, "organizations") or [],
            password=_string(body, "password"),
            trail=state.router.gate.trail,
            client_address=state.pages.client_address(request),
            practitioner_organizations=practitioner_organizations(
                FhirHandle(state.pages.answer, actor, client_address=state.pages.client_address(request))
            ),
        )
        return account_json(user, actor)

    return await run_in_threadpool(_api_call, request, work, 201)


@router.patch(
    "/admin/users/{username}", tags=["admin"], summary="Change an account's role, organizations, fhirUser"
)
async def api_users_change(username: str, request: Request) -> Response:
    body = await _api_body(request)
    if isinstance(body, Response):
        return body
    state = _state(request)

    def work(actor: Principal) -> dict[str, Any]:
        before = users.get_user(state.engine, username) if users.looks_like_username(username) else None
        user = users.manage_change(
            state.engine,
            actor,
            username,
            role=_string(body, "role"),
            organizations=_strings(body, "organizations"),
            fhir_user=_string(body, "fhirUser"),
            trail=state.router.gate.trail,
            client_address=state.pages.client_address(request),
        )
        if before is not None and (before.role, before.organizations, before.fhir_user) != (
            user.role,
            user.organizations,
            user.fhir_user,
        ):
            state.pages.sessions.end_all(username)
        return account_json(user, actor)

    return await run_in_threadpool(_api_call, request, work)


def _api_disable_route(disabled: bool) -> Any:
    def endpoint(username: str, request: Request) -> Response:
        state = _state(request)

        def work(actor: Principal) -> dict[str, Any]:
            user = users.manage_disable(
                state.engine,
                actor,
                username,
                disabled,
                trail=state.router.gate.trail,
                client_address=state.pages.client_address(request),
            )
            if disabled:
                state.pages.sessions.end_all(username)
            return account_json(user, actor)

        return _api_call(request, work)

    return endpoint


router.add_api_route(
    "/admin/users/{username}/disable",
    _api_disable_route(True),
    methods=["POST"],
    tags=["admin"],
    summary="Disable an account (logins, tokens and page sessions stop)",
)
router.add_api_route(
    "/admin/users/{username}/enable",
    _api_disable_route(False),
    methods=["POST"],
    tags=["admin"],
    summary="Enable an account again",
)
