"""The patient portal: a patient's (or a family proxy's) own record, family, consents, access log
and download, under ``/portal``.

Owns: the routes ``/portal`` (my record), ``/portal/family`` (the patients a proxy may see, to
switch between), ``/portal/consents`` (list in plain words; ``POST`` grants, ``POST
/portal/consents/{id}/withdraw`` withdraws), ``/portal/access-log`` ("who looked at my record":
``AuditEvent?patient=``, newest first, paged, break-glass highlighted, and the break-glass
alerts) and ``/portal/download`` (``Patient/{id}/$everything`` as a FHIR Bundle attachment).
Whose record a page shows is the ``patient`` query parameter (default: the patient themself, or
a proxy's first family member); it is never trusted: every page reads ``Patient/{id}`` through
the page's FHIR handle first, so the router's access decision says whether this person may see
that record (404 otherwise, the same as a record that does not exist).
Calls: hub.web.context (Page, page_for), the page's FhirHandle (every read and write of citizens'
data: consent, audit and the hub's consent governance apply), hub.web.record (the record's view
model), hub.web.consent_words, hub.web.access_log, consent.breakglass.list_alerts (with the
page's principal, as ``GET /access/break-glass`` does).
Called by: hub.web.app (includes ``router``).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from consent import breakglass
from hub.errors import FhirError
from hub.web import access_log, consent_words, i18n
from hub.web.context import Page, page_for
from hub.web.fhir_handle import PageFhirError
from hub.web.record import build_record, concept_text, fetch_record, human_name
from hub.web.render import parse_fhir_moment

router = APIRouter(include_in_schema=False)  # pages, not API: kept out of the OpenAPI document
portal_page = page_for("patient", "proxy")

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_LOG_PAGE = 20  # access-log entries per page
_LOG_PAGE_FILTERED = 100  # per page when the reader's own accesses are left out
_DOWNLOAD_PAGE = 1000  # the router's max _count: the download follows `next` links
_DOWNLOAD_PAGES = 50  # a record of more than 50,000 resources is for $export, not a page


class NotVisible(Exception):
    """The requested record does not exist or this person may not see it (one answer)."""


def _fmt_date(page: Page) -> consent_words.DateFormat:
    def fmt(value: str) -> str:
        try:
            return i18n.display_date(date.fromisoformat(value[:10]), page.locale)
        except ValueError:
            return value

    return fmt


def _fmt_datetime(page: Page) -> access_log.DateTimeFormat:
    def fmt(value: str) -> str:
        moment = parse_fhir_moment(value)
        if isinstance(moment, datetime):
            return i18n.display_datetime(moment, page.locale)
        if moment is None:
            return value
        return i18n.display_date(moment, page.locale)

    return fmt


def _me(page: Page) -> str:
    return page.user.principal.fhir_user or ""


def _family(page: Page) -> list[dict[str, Any]]:
    """The patients this person may see: the router's row filter decides (a patient: themself;
    a proxy: the family members their RelatedPerson, or a consent, gives them)."""
    return page.fhir.search_resources("Patient", [("_count", "50")])


def _subject(page: Page, patient: str | None) -> dict[str, Any]:
    """The Patient a portal page is about, read through the router (never from a cookie)."""
    if patient is None:
        principal = page.user.principal
        if principal.fhir_user_type == "Patient" and principal.fhir_user_id:
            patient = principal.fhir_user_id
        else:
            family = _family(page)
            if not family:
                raise NotVisible()
            return family[0]
    if not _FHIR_ID.fullmatch(patient):
        raise NotVisible()
    found = page.fhir.read("Patient", patient)
    if found is None:
        raise NotVisible()
    return found


def _not_visible(page: Page) -> HTMLResponse:
    return page.render("portal/not_found.html", status=404)


def _common(page: Page, subject: dict[str, Any], section: str) -> dict[str, Any]:
    me = _me(page)
    return {
        "section": section,
        "subject": subject,
        "subject_id": subject.get("id", ""),
        "subject_name": human_name(subject.get("name")),
        "is_self": me == f"Patient/{subject.get('id')}",
        "is_proxy": page.user.role == "proxy",
    }


@router.get("/portal", include_in_schema=False)
def my_record(patient: str | None = None, page: Page = Depends(portal_page)) -> Response:
    try:
        subject = _subject(page, patient)
    except NotVisible:
        if patient is None and page.user.role == "proxy":
            return RedirectResponse("/portal/family", 303)
        return _not_visible(page)
    started = time.perf_counter()
    fetched = fetch_record(page.fhir, str(subject["id"]))
    if fetched.patient is None:
        return _not_visible(page)
    record = build_record(
        fetched.patient,
        fetched.resources,
        fetched.organizations,
        fetched.practitioners,
        observations_capped=fetched.observations_capped,
    )
    results = [t for t in record.trends if t.category != "vital-signs"]
    vitals = [t for t in record.trends if t.category == "vital-signs"]
    response = page.render(
        "portal/record.html",
        record=record,
        results=results,
        vitals=vitals,
        **_common(page, fetched.patient, "record"),
    )
    # Server time of the page (fetch + build + render), as the clinician's record page reports it.
    response.headers["Server-Timing"] = f"page;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


@router.get("/portal/family", include_in_schema=False)
def family(page: Page = Depends(portal_page)) -> Response:
    members = _family(page)
    me = _me(page)
    people = [
        {
            "id": p.get("id", ""),
            "name": human_name(p.get("name")),
            "birth_date": p.get("birthDate", ""),
            "gender": p.get("gender", ""),
            "is_self": me == f"Patient/{p.get('id')}",
        }
        for p in members
    ]
    relationship = ""
    if page.user.role == "proxy" and page.user.principal.fhir_user_type == "RelatedPerson":
        person = page.fhir.read("RelatedPerson", page.user.principal.fhir_user_id or "")
        if person:
            relationship = ", ".join(
                filter(None, (concept_text(c) for c in person.get("relationship") or []))
            )
    return page.render(
        "portal/family.html",
        section="family",
        people=people,
        relationship=relationship,
        is_proxy=page.user.role == "proxy",
    )


def _names(page: Page, references: list[str]) -> dict[str, str]:
    """Display names of Organizations, Practitioners, RelatedPersons and CareTeams, read
    through the router with one ``_id`` search per type (what the reader may not see stays
    unnamed)."""
    by_type: dict[str, list[str]] = {}
    for ref in references:
        kind, _, rid = ref.partition("/")
        if _FHIR_ID.fullmatch(rid) and kind in ("Organization", "Practitioner", "RelatedPerson", "CareTeam"):
            by_type.setdefault(kind, []).append(rid)
    names: dict[str, str] = {}
    for kind, ids in by_type.items():
        unique = sorted(set(ids))[:100]
        try:
            found = page.fhir.search_resources(kind, [("_id", ",".join(unique)), ("_count", "100")])
        except PageFhirError:
            continue
        for resource in found:
            name = resource.get("name")
            text = name if isinstance(name, str) else human_name(name)
            if text and resource.get("id"):
                names[f"{kind}/{resource['id']}"] = text
    return names


def _facilities(page: Page, people: list[str], alerts: list[dict[str, Any]]) -> dict[str, str]:
    """fhirUser -> the name of their facility: a break-glass alert names the clinician's
    organizations; otherwise their PractitionerRole's organization."""
    orgs: dict[str, list[str]] = {}
    for alert in alerts:
        clinician = str(alert.get("clinician", ""))
        orgs.setdefault(clinician, []).extend(f"Organization/{o}" for o in alert.get("organizations") or [])
    practitioners = sorted(
        {r.partition("/")[2] for r in people if r.startswith("Practitioner/") and not orgs.get(r)}
    )
    practitioners = [p for p in practitioners if _FHIR_ID.fullmatch(p)][:100]
    if practitioners:
        try:
            roles = page.fhir.search_resources(
                "PractitionerRole", [("practitioner", ",".join(practitioners)), ("_count", "200")]
            )
        except PageFhirError:
            roles = []
        for role in roles:
            who = str((role.get("practitioner") or {}).get("reference", ""))
            org = str((role.get("organization") or {}).get("reference", ""))
            if who and org:
                orgs.setdefault(who, []).append(org)
    names = _names(page, sorted({o for found in orgs.values() for o in found}))
    return {
        who: ", ".join(dict.fromkeys(names.get(o, o.partition("/")[2]) for o in found))
        for who, found in orgs.items()
        if found
    }


def _consents_page(
    page: Page,
    subject: dict[str, Any],
    *,
    status: int = 200,
    error: str = "",
    done: str = "",
) -> HTMLResponse:
    patient_id = str(subject["id"])
    consents = page.fhir.search_resources(
        "Consent", [("patient", patient_id), ("_sort", "-_lastUpdated"), ("_count", "100")]
    )
    organizations = page.fhir.search_resources("Organization", [("_count", "200"), ("_sort", "name")])
    try:
        care_teams = page.fhir.search_resources("CareTeam", [("patient", patient_id), ("_count", "50")])
    except PageFhirError:
        care_teams = []  # a proxy whose scopes leave CareTeam out: the policy words say less
    wanted = [r for c in consents for r in consent_words.consent_actors(c)]
    wanted += [
        str(r.get("reference")) for r in [subject.get("managingOrganization") or {}] if r.get("reference")
    ]
    wanted += [
        str(r.get("reference")) for r in subject.get("generalPractitioner") or [] if r.get("reference")
    ]
    names = _names(page, wanted)
    for org in organizations:
        if isinstance(org.get("name"), str) and org.get("id"):
            names.setdefault(f"Organization/{org['id']}", org["name"])
    fmt = _fmt_date(page)
    items = [
        {
            "id": c.get("id", ""),
            "state": consent_words.consent_state(c),
            "sentences": consent_words.describe_consent(c, names, page.gettext, fmt),
            "date": c.get("dateTime") or (c.get("meta") or {}).get("lastUpdated", ""),
            "sensitive": consent_words.grants_sensitive(c),
            "has_deny": consent_words.has_deny(c),
        }
        for c in consents
    ]
    is_proxy = page.user.role == "proxy"
    categories = [c for c in consent_words.CATEGORIES if not is_proxy or c.code == "N"]
    return page.render(
        "portal/consents.html",
        status=status,
        policy=consent_words.policy_reasons(subject, care_teams, names, page.gettext),
        consents=[i for i in items if i["state"] == "active"],
        past=[i for i in items if i["state"] != "active"],
        organizations=[
            {"ref": f"Organization/{o['id']}", "name": o.get("name") or o["id"]}
            for o in organizations
            if o.get("id")
        ],
        categories=categories,
        purposes=consent_words.PURPOSES,
        error=error,
        done=done,
        **_common(page, subject, "consents"),
    )


@router.get("/portal/consents", include_in_schema=False)
def consents(patient: str | None = None, done: str = "", page: Page = Depends(portal_page)) -> Response:
    try:
        subject = _subject(page, patient)
    except NotVisible:
        return _not_visible(page)
    return _consents_page(page, subject, done=done if done in ("granted", "withdrawn") else "")


def _refusal(page: Page, error: PageFhirError) -> str:
    if error.status == 403:
        return page.gettext("The hub refused this change: {reason}").format(reason=error.message)
    return page.gettext("The change could not be saved: {reason}").format(reason=error.message)


@router.post("/portal/consents", include_in_schema=False)
async def grant(request: Request, page: Page = Depends(portal_page)) -> Response:
    form = await request.form()
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    categories = [v for k, v in form.multi_items() if k == "category" and isinstance(v, str)]
    return await run_in_threadpool(_grant, page, fields, categories)


def _grant(page: Page, fields: dict[str, str], categories: list[str]) -> Response:
    try:
        subject = _subject(page, fields.get("patient") or None)
    except NotVisible:
        return _not_visible(page)
    actor = fields.get("actor", "")
    purpose = fields.get("purpose", "")
    end = fields.get("end", "").strip() or None
    problem = ""
    if not actor.startswith("Organization/") or not _FHIR_ID.fullmatch(actor.partition("/")[2]):
        problem = page.gettext("Choose the facility you want to share with.")
    elif purpose not in consent_words.PURPOSE_BY_CODE:
        problem = page.gettext("Choose what the sharing is for.")
    elif not categories or any(c not in consent_words.CATEGORY_BY_CODE for c in categories):
        problem = page.gettext("Choose at least one kind of data.")
    elif end is not None:
        try:
            if date.fromisoformat(end) < date.today():
                problem = page.gettext("The end date is in the past.")
        except ValueError:
            problem = page.gettext("The end date is not a date.")
    if problem:
        return _consents_page(page, subject, status=400, error=problem)
    resource = consent_words.grant_consent(str(subject["id"]), actor, purpose, categories, end)
    try:
        page.fhir.create(resource)
    except PageFhirError as error:
        # Shown as the hub said it (a proxy granting a sensitive category: 403), never hidden.
        return _consents_page(page, subject, status=error.status, error=_refusal(page, error))
    return RedirectResponse(f"/portal/consents?patient={subject['id']}&done=granted", 303)


@router.post("/portal/consents/{consent_id}/withdraw", include_in_schema=False)
async def withdraw(consent_id: str, request: Request, page: Page = Depends(portal_page)) -> Response:
    form = await request.form()
    patient = form.get("patient")
    return await run_in_threadpool(_withdraw, page, consent_id, patient if isinstance(patient, str) else None)


def _withdraw(page: Page, consent_id: str, patient: str | None) -> Response:
    try:
        subject = _subject(page, patient or None)
    except NotVisible:
        return _not_visible(page)
    consent = page.fhir.read("Consent", consent_id) if _FHIR_ID.fullmatch(consent_id) else None
    if consent is None or (consent.get("patient") or {}).get("reference") != f"Patient/{subject['id']}":
        return _not_visible(page)
    consent["status"] = "inactive"
    try:
        page.fhir.update(consent)
    except PageFhirError as error:
        return _consents_page(page, subject, status=error.status, error=_refusal(page, error))
    return RedirectResponse(f"/portal/consents?patient={subject['id']}&done=withdrawn", 303)


def _cursor_of(bundle: dict[str, Any]) -> str:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            values = parse_qs(urlsplit(str(link.get("url", ""))).query).get("_cursor")
            if values:
                return values[0]
    return ""


@router.get("/portal/access-log", include_in_schema=False)
def access_log_page(
    request: Request,
    patient: str | None = None,
    cursor: str = "",
    mine: str = "",
    page: Page = Depends(portal_page),
) -> Response:
    """Others' accesses by default (the reader's own reads would drown them: every portal page
    is audited too); ``mine=1`` shows every access."""
    try:
        subject = _subject(page, patient)
    except NotVisible:
        return _not_visible(page)
    patient_id = str(subject["id"])
    show_mine = mine == "1"
    count = _LOG_PAGE if show_mine else _LOG_PAGE_FILTERED
    params = [("patient", patient_id), ("_sort", "-date"), ("_count", str(count))]
    if cursor:
        params.append(("_cursor", cursor[:2000]))
    try:
        bundle = page.fhir.search("AuditEvent", params)
    except PageFhirError:
        if not cursor:
            raise
        return RedirectResponse(f"/portal/access-log?patient={patient_id}", 303)  # a stale cursor
    events = [e["resource"] for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]
    alerts: list[dict[str, Any]] = []
    if page.user.role == "patient" and not cursor:
        store = request.app.state.router.ctx.store
        try:
            with store.read() as conn:
                alerts = [a.as_json() for a in breakglass.list_alerts(conn, page.user.principal)]
        except FhirError:
            alerts = []
    people = access_log.people_to_name(events, alerts)
    names = _names(page, people)
    facilities = _facilities(page, people, alerts)
    fmt = _fmt_datetime(page)
    entries = access_log.describe_events(events, _me(page), names, facilities, page.gettext, fmt)
    shown = entries if show_mine else [e for e in entries if not e.mine]
    return page.render(
        "portal/access_log.html",
        entries=shown,
        hidden_mine=len(entries) - len(shown),
        show_mine=show_mine,
        alerts=[access_log.describe_alert(a, names, facilities, page.gettext, fmt) for a in alerts],
        next_cursor=_cursor_of(bundle),
        first_page=not cursor,
        **_common(page, subject, "access-log"),
    )


@router.get("/portal/download", include_in_schema=False)
def download(patient: str | None = None, page: Page = Depends(portal_page)) -> Response:
    try:
        subject = _subject(page, patient)
    except NotVisible:
        return _not_visible(page)
    patient_id = str(subject["id"])
    entries: list[dict[str, Any]] = []
    params: list[tuple[str, str]] = [("_count", str(_DOWNLOAD_PAGE))]
    for _ in range(_DOWNLOAD_PAGES):
        answer = page.fhir.request("GET", f"Patient/{patient_id}/$everything", params)
        if answer.status != 200:
            return _not_visible(page)
        bundle = json.loads(answer.body or b"{}")
        entries.extend(e for e in bundle.get("entry") or [] if isinstance(e, dict))
        following = next(
            (str(link.get("url")) for link in bundle.get("link") or [] if link.get("relation") == "next"), ""
        )
        if not following:
            break
        params = [(k, v) for k, vs in parse_qs(urlsplit(following).query).items() for v in vs]
    body = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "entry": [{k: v for k, v in e.items() if k in ("fullUrl", "resource")} for e in entries],
    }
    filename = f"ho-so-suc-khoe-{patient_id}-{date.today().isoformat()}.json"
    return Response(
        json.dumps(body, ensure_ascii=False).encode(),
        media_type="application/fhir+json",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )
