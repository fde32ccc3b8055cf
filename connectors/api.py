"""The connectors' admin API and ``/metrics``.

Owns the routes (JSON, errors as OperationOutcome):

* ``GET /connectors``: per-source status (``inbox.status``); ``GET /connectors/{name}``: one;
* ``POST /connectors``: register a source (``{"name", "facility_code", "facility_name",
  "facility_level", "kind", "settings", "paused"}``; ``?replace=true`` to change one), 201;
* ``POST /connectors/{name}/pause`` and ``/resume``;
* ``GET /connectors/{name}/messages?state=&limit=&before_id=``: the inbox rows (metadata,
  errors), never their bodies unless ``include=raw`` (base64, hub admins, audited);
* ``POST /connectors/replay``: ``{"ids": [...]}`` or ``{"state": "failed", "source": "x"}``;
* ``POST /connectors/{name}/xml130``: upload one QĐ 130 XML file (the body, up to the
  body limit) into an ``xml130`` source's inbox: 202 ``{"messages": [ids], "receipts": [...]}``;
* ``GET /metrics``: Prometheus text (``connectors.metrics``).

Who may call: hub admins (role ``hub-admin``) everything; a facility admin reads the status
of the sources of their own facilities (an Organization they act for that carries the
source's MA_CSKCB identifier); everyone else 403, no token 401. ``/metrics`` also answers
the METRICS_TOKEN bearer secret (what Prometheus is configured with). Every authenticated
call writes one AuditEvent (operation ``connectors-<action>``, purpose HSYSADMIN), as the
CLI's commands do, whatever its outcome.
Calls: ``connectors.sources``, ``connectors.inbox``, ``connectors.metrics``,
``connectors.worker.ConnectorRuntime`` (woken after an upload), the audit trail, the bearer
verifier.  Called by: ``hub.api.app.create_app``.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from connectors import inbox, sources
from connectors.identifiers import FACILITY
from connectors.metrics import CONTENT_TYPE, STATES, exposition, registry_for
from connectors.model import Source
from connectors.worker import ConnectorRuntime
from consent.context import system_access
from hub.api.auth_routes import unauthorized
from hub.audit.events import AccessEvent
from hub.auth.principal import Principal, Role, system_principal
from hub.auth.tokens import AuthError
from hub.errors import FhirError, Issue
from hub.rest.messages import FHIR_JSON

if TYPE_CHECKING:
    from hub.rest import FhirRouter
    from hub.settings import Settings
    from hub.store import Store

TAG = "connectors"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_ID = 2**63 - 1  # BIGINT
MAX_LIMIT = 1000
METRICS_SUBJECT = "metrics-scraper"


class _Unauthenticated(Exception):
    def __init__(self, error: AuthError) -> None:
        self.error = error


def _error(status: int, code: str, message: str) -> FhirError:
    return FhirError(status, [Issue(code, message)])


def _forbidden(message: str = "Only hub admins manage connectors") -> FhirError:
    return _error(403, "forbidden", message)


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses (``as_json`` when they have one), times as ISO 8601."""
    if hasattr(value, "as_json"):
        return value.as_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _json(status: int, body: Any) -> Response:
    return Response(json.dumps(_plain(body), ensure_ascii=False), status, media_type="application/json")


def source_json(source: Source) -> dict[str, Any]:
    """A source as the API shows it: secrets masked (``sources.masked``)."""
    return {
        **dataclasses.asdict(source),
        "settings": sources.masked(source.settings),
        "format": source.format,
    }


def _int(value: str | None, name: str, *, low: int = 0, high: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise _error(400, "invalid", f"{name} must be an integer") from None
    if number < low or (high is not None and number > high):
        raise _error(400, "invalid", f"{name} must be between {low} and {high or 'any'}")
    return number


def _state(value: str | None) -> str | None:
    if value is not None and value not in STATES:
        raise _error(400, "invalid", f"state must be one of {', '.join(STATES)}")
    return value or None


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        parsed = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _error(400, "invalid", "The body must be a JSON object") from None
    if not isinstance(parsed, dict):
        raise _error(400, "invalid", "The body must be a JSON object")
    if _has_nul(parsed):  # PostgreSQL text cannot hold NUL, and no name or setting has one
        raise _error(400, "invalid", "The body contains a NUL character")
    return parsed


def _known_name(name: str) -> bool:
    """Could be a source's name (anything else is not one: 404 without a query)."""
    return _NAME.fullmatch(name) is not None


def source_from_json(body: dict[str, Any]) -> Source:
    """A Source from the POST /connectors body (sources.add checks the values)."""
    required = ("name", "facility_code", "facility_name", "facility_level", "kind")
    missing = [key for key in required if not isinstance(body.get(key), str) or not body[key]]
    if missing:
        raise _error(400, "required", f"Missing or not a string: {', '.join(missing)}")
    settings = body.get("settings", {})
    if not isinstance(settings, dict):
        raise _error(400, "invalid", "settings must be a JSON object")
    paused = body.get("paused", False)
    if not isinstance(paused, bool):
        raise _error(400, "invalid", "paused must be true or false")
    unknown = set(body) - {*required, "settings", "paused"}
    if unknown:
        raise _error(400, "invalid", f"Unknown fields: {', '.join(sorted(unknown))}")
    return Source(
        name=body["name"],
        facility_code=body["facility_code"],
        facility_name=body["facility_name"],
        facility_level=body["facility_level"],
        kind=body["kind"],
        settings=settings,
        paused=paused,
    )


def facilities_of(store: Store, principal: Principal) -> set[str]:
    """The MA_CSKCB codes of the Organizations a facility admin acts for."""
    codes: set[str] = set()
    with system_access("connectors-facility-of-admin"), store.read() as conn:
        for org_id in principal.organizations:
            try:
                organization = store.get(conn, "Organization", org_id).parsed()
            except FhirError:  # not known (or deleted): no facility
                continue
            for identifier in organization.get("identifier", []):
                if identifier.get("system") == FACILITY and identifier.get("value"):
                    codes.add(str(identifier["value"]))
    return codes


def statuses_visible_to(
    store: Store, principal: Principal, name: str | None = None
) -> list[inbox.SourceStatus]:
    """The status of every source (or of ``name``) the principal may read: a hub admin every
    source, a facility admin their own facilities' (403 for another's), anyone else 403.
    Shared by ``GET /connectors`` and the operator console."""
    engine = store.engine
    if name is not None and not _known_name(name):
        return []
    if principal.role is Role.ADMIN:
        return list(inbox.status(engine, name))
    if principal.role is not Role.FACILITY_ADMIN:
        raise _forbidden("Only hub admins and the facility's admins read a connector's status")
    codes = facilities_of(store, principal)
    own = {s.name for s in sources.all_sources(engine) if s.facility_code in codes}
    if name is not None and name not in own:
        raise _forbidden("A facility admin reads the status of their own facility's sources only")
    return [s for s in inbox.status(engine, name) if s.name in own]


def mount_connector_routes(
    app: FastAPI, router: FhirRouter, settings: Settings, bearer: Any
) -> ConnectorRuntime:
    """Add the routes; returns the runtime the app's lifespan starts and stops."""
    store = router.ctx.store
    engine = store.engine
    trail = router.gate.trail
    runtime = ConnectorRuntime(router, settings)
    metrics_registry = registry_for(engine)

    def principal_of(request: Request) -> Principal:
        try:
            principal: Principal | None = bearer.principal(request.headers.get("authorization"))
        except AuthError as error:
            raise _Unauthenticated(error) from None
        if principal is None:  # only for public paths; none of ours is
            raise _Unauthenticated(AuthError("A bearer token is required", None))
        return principal

    def require_admin(principal: Principal) -> None:
        if principal.role is not Role.ADMIN:
            raise _forbidden()

    def audit(
        request: Request, principal: Principal, action: str, operation: str, detail: str, status: int
    ) -> None:
        if trail is None:
            return
        trail.record(
            [
                AccessEvent(
                    principal=principal,
                    interaction="operation",
                    action=action,
                    operation=f"connectors-{operation}",
                    query=detail or None,
                    outcome_status=status,
                    purpose="HSYSADMIN",
                    client_address=request.client.host if request.client else None,
                )
            ]
        )

    async def answer(
        request: Request,
        operation: str,
        action: str,
        work: Callable[[Principal], Response],
        *,
        principal: Callable[[Request], Principal] | None = None,
    ) -> Response:
        """Authenticate, run ``work`` in the thread pool, audit, and turn refusals into
        OperationOutcomes."""
        detail = request.url.path + (f"?{request.url.query}" if request.url.query else "")

        def run() -> Response:
            who = (principal or principal_of)(request)
            status = 500
            try:
                response = work(who)
                status = response.status_code
                return response
            except FhirError as error:
                status = error.status
                raise
            finally:
                audit(request, who, action, operation, detail, status)

        try:
            return await run_in_threadpool(run)
        except _Unauthenticated as error:
            answer_401 = unauthorized(error.error)
            return Response(answer_401.body, 401, headers=answer_401.headers, media_type=FHIR_JSON)
        except FhirError as error:
            return Response(error.outcome_bytes(), error.status, media_type=FHIR_JSON)

    async def authenticated(request: Request) -> Principal | Response:
        """Who calls, before a body is read: an anonymous caller gets only the 401."""
        try:
            return await run_in_threadpool(principal_of, request)
        except _Unauthenticated as error:
            answer_401 = unauthorized(error.error)
            return Response(answer_401.body, 401, headers=answer_401.headers, media_type=FHIR_JSON)

    async def admin_json(request: Request) -> tuple[Principal | Response, dict[str, Any] | FhirError]:
        """The caller and, for a hub admin only, the JSON body (or why it is refused)."""
        who = await authenticated(request)
        if isinstance(who, Response) or who.role is not Role.ADMIN:
            return who, {}
        try:
            return who, await _json_body(request)
        except FhirError as error:
            return who, error

    def statuses_for(principal: Principal, name: str | None = None) -> list[Any]:
        return list(statuses_visible_to(store, principal, name))

    def existing(name: str) -> Source:
        source = sources.get(engine, name) if _known_name(name) else None
        if source is None:
            raise _error(404, "not-found", f"No connector source named {name!r}")
        return source

    @app.get("/connectors", tags=[TAG], summary="Status of every connector source")
    async def list_status(request: Request) -> Response:
        return await answer(request, "status", "R", lambda who: _json(200, statuses_for(who)))

    @app.post("/connectors", tags=[TAG], summary="Register (or with replace=true change) a source")
    async def add_source(request: Request) -> Response:
        replace = request.query_params.get("replace", "false").lower() in ("1", "true", "yes")
        who, body = await admin_json(request)
        if isinstance(who, Response):
            return who

        def work(who: Principal) -> Response:
            require_admin(who)
            if isinstance(body, FhirError):
                raise body
            source = source_from_json(body)
            try:
                with system_access("connectors-add"):
                    stored = sources.add(router, source, replace=replace)
            except (ValueError, KeyError) as error:
                raise _error(400, "invalid", str(error).strip("'\"")) from None
            return _json(201 if not replace else 200, source_json(stored))

        return await answer(request, "add", "C", work, principal=lambda _request: who)

    @app.post("/connectors/replay", tags=[TAG], summary="Queue messages again (by id or filter)")
    async def replay(request: Request) -> Response:
        who, body = await admin_json(request)
        if isinstance(who, Response):
            return who

        def work(who: Principal) -> Response:
            require_admin(who)
            if isinstance(body, FhirError):
                raise body
            ids = body.get("ids")
            if ids is not None and (
                not isinstance(ids, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids)
            ):
                raise _error(400, "invalid", "ids must be a list of message ids (positive integers)")
            state = body.get("state")
            source = body.get("source")
            if not isinstance(state, (str, type(None))) or not isinstance(source, (str, type(None))):
                raise _error(400, "invalid", "state and source must be strings")
            _state(state)
            if ids is None and state is None and source is None:
                raise _error(400, "required", "Give ids, or a state and/or a source")
            if source is not None:
                existing(source)
            count = inbox.replay(engine, ids=ids, state=state, source=source)
            runtime.wake()
            return _json(200, {"replayed": count})

        return await answer(request, "replay", "E", work, principal=lambda _request: who)

    @app.get("/connectors/{name}", tags=[TAG], summary="Status of one connector source")
    async def one_status(request: Request, name: str) -> Response:
        def work(who: Principal) -> Response:
            found = statuses_for(who, name)
            if not found:
                raise _error(404, "not-found", f"No connector source named {name!r}")
            return _json(200, found[0])

        return await answer(request, "status", "R", work)

    def pause_route(paused: bool) -> Callable[[Request, str], Any]:
        async def endpoint(request: Request, name: str) -> Response:
            def work(who: Principal) -> Response:
                require_admin(who)
                try:
                    if not _known_name(name):
                        raise KeyError(name)
                    source = sources.set_paused(engine, name, paused)
                except KeyError:
                    raise _error(404, "not-found", f"No connector source named {name!r}") from None
                return _json(200, source_json(source))

            return await answer(request, "pause" if paused else "resume", "U", work)

        return endpoint

    app.add_api_route(
        "/connectors/{name}/pause", pause_route(True), methods=["POST"], tags=[TAG], summary="Pause a source"
    )
    app.add_api_route(
        "/connectors/{name}/resume",
        pause_route(False),
        methods=["POST"],
        tags=[TAG],
        summary="Resume a source",
    )

    @app.get("/connectors/{name}/messages", tags=[TAG], summary="A source's inbox messages (newest first)")
    async def list_messages(request: Request, name: str) -> Response:
        query = request.query_params
        include_raw = "raw" in query.getlist("include")

        def work(who: Principal) -> Response:
            require_admin(who)
            state = _state(query.get("state"))
            limit = _int(query.get("limit"), "limit", low=1, high=MAX_LIMIT) or 100
            before_id = _int(query.get("before_id"), "before_id", low=1, high=MAX_ID)
            existing(name)
            rows = inbox.messages(engine, source=name, state=state, limit=limit, before_id=before_id)
            listed = [_plain(row) for row in rows]
            if include_raw:
                for row in listed:
                    row["raw_base64"] = base64.b64encode(inbox.raw(engine, int(row["id"]))).decode()
            return _json(200, {"messages": listed})

        return await answer(request, "messages-raw" if include_raw else "messages", "R", work)

    @app.post(
        "/connectors/{name}/xml130",
        tags=[TAG],
        summary="Upload a QĐ 130 XML file into an xml130 source's inbox",
        status_code=202,
    )
    async def upload_xml130(request: Request, name: str) -> Response:
        who_first = await authenticated(request)
        if isinstance(who_first, Response):
            return who_first
        body = await request.body() if who_first.role is Role.ADMIN else b""

        def work(who: Principal) -> Response:
            require_admin(who)
            source = existing(name)
            if source.kind != "xml130":
                raise _error(400, "invalid", f"Source {name!r} is {source.kind}, not xml130")
            if not body.strip():
                raise _error(400, "required", "The body must be a QĐ 130 XML file")
            receipts = inbox.receive(engine, source, [body])
            runtime.wake()
            return _json(
                202,
                {
                    "messages": [r.id for r in receipts],
                    "receipts": [
                        {"id": r.id, "state": r.state, "duplicate": r.duplicate, "error": r.error}
                        for r in receipts
                    ],
                },
            )

        return await answer(request, "upload", "C", work, principal=lambda _request: who_first)

    def metrics_principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.strip().partition(" ")
        token = settings.metrics_token
        if (
            token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(secret.strip().encode(), token.encode())
        ):
            return system_principal(METRICS_SUBJECT)
        return principal_of(request)

    # Not in the OpenAPI document: Prometheus text, not a JSON API.
    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        def work(who: Principal) -> Response:
            if who.role is not Role.ADMIN:
                raise _forbidden("Only hub admins (or the METRICS_TOKEN) read /metrics")
            return Response(exposition(metrics_registry), 200, media_type=CONTENT_TYPE)

        return await answer(request, "metrics", "R", work, principal=metrics_principal)

    return runtime
