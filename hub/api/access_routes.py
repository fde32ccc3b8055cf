"""HTTP routes of the access layer that are not FHIR interactions: break-glass and consent alerts.

Owns: ``GET /access/break-glass`` (alerts the caller may see: a patient their own, a
facility admin those raised by clinicians of their organizations, auditors and hub admins
all), ``POST /access/break-glass/{id}/review`` (appends a review: ``{"verdict":
"justified"|"not-justified", "note": ...}``) and ``GET /access/consent-alerts`` (Consents
written by someone other than the patient: the patient, their proxies (only alerts about
Consents the proxy could read, every version: not one naming a sensitive class), the
recorder's facility admins, auditors and hub admins). Who sees and who reviews is decided in
``consent.breakglass`` and ``consent.governance``.
Calls: consent.breakglass, consent.governance, consent.decision (a proxy's Access), the bearer
verifier.  Called by: ``create_app``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from consent import breakglass, governance
from consent.context import serving
from consent.decision import decide, proxied_patients
from hub.api.auth_routes import unauthorized
from hub.auth.principal import Principal, Role
from hub.auth.tokens import AuthError
from hub.errors import FhirError
from hub.rest import FhirRouter
from hub.rest.messages import FHIR_JSON


class _Unauthenticated(Exception):
    def __init__(self, error: AuthError) -> None:
        self.error = error


def mount_access_routes(app: FastAPI, router: FhirRouter, bearer: Any) -> None:
    store = router.ctx.store

    def principal_of(request: Request) -> Principal:
        try:
            principal: Principal = bearer.principal(request.headers.get("authorization"))
        except AuthError as error:
            raise _Unauthenticated(error) from None
        return principal

    def as_response(error: FhirError | _Unauthenticated) -> Response:
        if isinstance(error, _Unauthenticated):
            answer = unauthorized(error.error)
            return Response(answer.body, 401, headers=answer.headers, media_type=FHIR_JSON)
        return Response(error.outcome_bytes(), error.status, media_type=FHIR_JSON)

    @app.get("/access/break-glass", tags=["access"], summary="Break-glass alerts the caller may see")
    async def list_break_glass(request: Request, status: str | None = None) -> Any:
        def run() -> list[dict[str, Any]]:
            principal = principal_of(request)
            with store.read() as conn:
                alerts = breakglass.list_alerts(conn, principal, open_only=status == "open")
            return [a.as_json() for a in alerts]

        try:
            return await run_in_threadpool(run)
        except (FhirError, _Unauthenticated) as error:
            return as_response(error)

    @app.post(
        "/access/break-glass/{alert_id}/review", tags=["access"], summary="Record the review of an alert"
    )
    async def review_break_glass(request: Request, alert_id: int) -> Any:
        form: dict[str, Any] = {}
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                form = await request.json()
            except ValueError:
                form = {}
        if not isinstance(form, dict):
            form = {}
        note = str(form.get("note", "")).replace("\x00", "")  # PostgreSQL text cannot hold NUL
        verdict = str(form.get("verdict", ""))

        def run() -> dict[str, Any]:
            principal = principal_of(request)
            with store.write() as conn:
                return breakglass.review(conn, principal, alert_id, note, verdict).as_json()

        try:
            return await run_in_threadpool(run)
        except (FhirError, _Unauthenticated) as error:
            return as_response(error)

    @app.get("/access/consent-alerts", tags=["access"], summary="Consents written for a patient by others")
    async def list_consent_alerts(request: Request) -> Any:
        def run() -> list[dict[str, Any]]:
            principal = principal_of(request)
            with store.read() as conn:
                if principal.role != Role.PROXY:
                    return governance.list_alerts(conn, principal)
                alerts = governance.list_alerts(conn, principal, proxied_patients(conn, principal))
                # An alert says what a Consent grants ("permits PSY to ..."): a proxy sees
                # only those about Consents they could read (not a sensitive class's).
                access = decide(conn, principal, store.registry, purpose=None, policy=router.gate.policy)
                with serving(access):
                    readable = governance.readable_consents(
                        conn, access, (a["consent"].split("/", 1)[1] for a in alerts)
                    )
                return [a for a in alerts if a["consent"].split("/", 1)[1] in readable]

        try:
            return await run_in_threadpool(run)
        except (FhirError, _Unauthenticated) as error:
            return as_response(error)
