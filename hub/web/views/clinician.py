"""Pages of the clinician: the patient search and one citizen's integrated record.

Owns: ``GET /clinician`` (search form; the results alone for htmx, the whole page without
JS), ``GET /clinician/patients/{id}`` (the record: header, timeline, trend charts with their
tables, lists, the consent state in words for this clinician, the break-glass form) and
``POST /clinician/patients/{id}/break-glass`` (reason required: one request with the
``x-break-glass-reason`` header, then the record). A record the clinician may not see is the
same "not found or no access" page as a missing one, with the break-glass form.
Calls: ``hub.web.finder`` and ``hub.web.record`` through the page's FHIR handle (the router:
access decision, consent filter, audit, break-glass), ``hub.web.consent_words`` (the words).
Called by: ``hub.web.app`` (``mount_pages`` includes ``router``).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Form
from fastapi.responses import HTMLResponse

from hub.web import consent_words, i18n
from hub.web.context import Page, page_for
from hub.web.finder import find_patients
from hub.web.record import Fetched, build_record, consent_lines, fetch_record, human_name, ref_key
from hub.web.render import parse_fhir_moment

router = APIRouter(include_in_schema=False)  # pages, not API: kept out of the OpenAPI document
clinician_page = page_for("clinician")

BREAK_GLASS_HEADER = "x-break-glass-reason"
_REASON_MIN = 10  # a reason a reviewer can judge, not "x"
_REASON_MAX = 500


@router.get("/clinician", response_class=HTMLResponse)
def search(q: str = "", cursor: str = "", page: Page = Depends(clinician_page)) -> HTMLResponse:
    """The search form; with ``q`` its results (only the results region for htmx)."""
    text = q.strip()[:200]
    results = find_patients(page.fhir, text, cursor) if text else None
    template = (
        "clinician/_results.html" if page.request.headers.get("hx-request") else "clinician/search.html"
    )
    return page.render(template, q=text, results=results)


@router.get("/clinician/patients/{patient_id}", response_class=HTMLResponse)
def record(patient_id: str, page: Page = Depends(clinician_page)) -> HTMLResponse:
    return _record_page(page, patient_id, reason="")


@router.post("/clinician/patients/{patient_id}/break-glass", response_class=HTMLResponse)
def break_glass(
    patient_id: str, reason: str = Form(""), page: Page = Depends(clinician_page)
) -> HTMLResponse:
    """Emergency access: the clinician's reason goes with the request as ``x-break-glass-reason``
    (the router opens the record, flags the AuditEvent and raises the alert)."""
    text = " ".join(reason.split())
    if len(text) < _REASON_MIN or len(text) > _REASON_MAX:
        return page.render(
            "clinician/not_found.html",
            status=400,
            patient_id=patient_id,
            reason=text,
            reason_error=True,
            reason_min=_REASON_MIN,
        )
    return _record_page(page, patient_id, reason=text)


def _record_page(page: Page, patient_id: str, reason: str) -> HTMLResponse:
    started = time.perf_counter()
    headers = {BREAK_GLASS_HEADER: reason} if reason else None
    fetched = fetch_record(page.fhir, patient_id, headers)
    if fetched.patient is None:
        return page.render("clinician/not_found.html", status=404, patient_id=patient_id, reason="")
    read = time.perf_counter()
    view = build_record(
        fetched.patient,
        fetched.resources,
        fetched.organizations,
        fetched.practitioners,
        observations_capped=fetched.observations_capped,
    )
    sentences = _consent_sentences(page, fetched)
    built = time.perf_counter()
    response = page.render(
        "clinician/record.html",
        record=view,
        patient_id=patient_id,
        consent_sentences=sentences,
        break_glass_reason=reason,
        reason="",
        reason_min=_REASON_MIN,
    )
    done = time.perf_counter()
    # Where the page's server time goes (the FHIR requests, the view model, the template), for
    # the bench and the browser's devtools.
    response.headers["Server-Timing"] = ", ".join(
        f"{name};dur={ms * 1000:.1f}"
        for name, ms in (
            ("page", done - started),
            ("fhir", read - started),
            ("build", built - read),
            ("render", done - built),
        )
    )
    return response


def _consent_sentences(page: Page, fetched: Fetched) -> list[str]:
    """Why THIS clinician may see the record, in words: the default-policy reasons that apply
    to them (managing facility, family doctor, care team) and the Consents in force that name
    them, one of their facilities, a team they are on, or anyone."""
    assert fetched.patient is not None
    principal = page.user.principal
    practitioner = principal.fhir_user or ""
    organizations = list(principal.organizations)
    lines = consent_lines(
        fetched.patient,
        fetched.resources,
        fetched.organizations,
        fetched.practitioners,
        reader_practitioner=practitioner,
        reader_organizations=organizations,
    )
    names = _names(fetched)
    gettext = page.gettext
    bases = {line.basis for line in lines}
    refs = {line.ref for line in lines if line.ref}
    # The patient as far as it concerns this clinician: policy_reasons then names only them.
    patient: dict[str, Any] = {"resourceType": "Patient"}
    if "managing" in bases:
        patient["managingOrganization"] = fetched.patient.get("managingOrganization")
    patient["generalPractitioner"] = [
        g for g in fetched.patient.get("generalPractitioner") or [] if ref_key(g) in refs
    ]
    teams = [
        r
        for r in fetched.resources
        if r.get("resourceType") == "CareTeam" and f"CareTeam/{r.get('id')}" in refs
    ]
    sentences = consent_words.policy_reasons(patient, teams, names, gettext)
    consent_ids = [line.consent_id for line in lines if line.consent_id]
    fmt = _fmt_date(page)
    for consent in fetched.resources:
        if consent.get("resourceType") == "Consent" and consent.get("id") in consent_ids:
            sentences.extend(consent_words.describe_consent(consent, names, gettext, fmt))
    return sentences


def _names(fetched: Fetched) -> dict[str, str]:
    names = {f"Organization/{k}": str(v.get("name") or "") for k, v in fetched.organizations.items()}
    names.update({f"Practitioner/{k}": human_name(v.get("name")) for k, v in fetched.practitioners.items()})
    return {k: v for k, v in names.items() if v}


def _fmt_date(page: Page) -> consent_words.DateFormat:
    def fmt(value: str) -> str:
        moment = parse_fhir_moment(value)
        if moment is None:
            return value
        if isinstance(moment, datetime):
            moment = moment.astimezone(i18n.DISPLAY_ZONE).date()
        return i18n.display_date(moment, page.locale)

    return fmt
