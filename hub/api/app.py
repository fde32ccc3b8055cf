"""The FastAPI application.

Owns: HTTP concerns only: routes (declared for OpenAPI), content types, turning framework
errors and any unexpected exception into OperationOutcome (database unavailable or
connection lost: 503 ``transient`` with Retry-After; request past its time limit: 503
``timeout``; anything else: 500 ``exception`` without internals), refusing JSON bodies
nested too deep, and running each FHIR request under a ``hub.db.engine.RequestGuard``
(time limit per transaction; its statements cancelled when the client disconnects).
All FHIR semantics live in ``hub.rest``.
Calls: the router, the store, the audit trail (its group commit writer runs with the app),
settings, ``hub.api.limits``, ``hub.api.ratelimit``,
``hub.api.proxies`` (each request's base URL, set on its ``FhirRequest``).
The pages (``hub.web``) are mounted here too, with a function answering their FHIR requests
through the same router under the same guard.
Called by: ``hub serve``, uvicorn, tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

import anyio
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub import __version__
from hub.api.access_routes import mount_access_routes
from hub.api.auth_routes import NO_TOKEN, Bearer, mount_auth_routes, unauthorized
from hub.api.limits import BodyLimitMiddleware, too_deep
from hub.api.proxies import PublicBase, TrustedProxies
from hub.api.ratelimit import add_rate_limits
from hub.app_factory import build_router
from hub.auth.tokens import AuthError, TokenService
from hub.db.engine import RequestCancelled, RequestGuard, guarded
from hub.errors import FhirError, Issue
from hub.ops.export import NDJSON, export_file_path, purge_expired_at_start
from hub.rest import FhirRequest, FhirResponse
from hub.rest.messages import FHIR_JSON
from hub.rest.target import routes as target_routes
from hub.settings import Settings, get_settings
from hub.web.app import html_error, mount_pages, wants_html

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
_FORM = "application/x-www-form-urlencoded"
_RETRY_AFTER_SECONDS = 5  # after a lost database connection
log = logging.getLogger(__name__)


def _is_public(path: str) -> bool:
    """The CapabilityStatement and discovery documents are readable without a token."""
    return path == "metadata" or path.startswith(".well-known/")


def _outcome_response(status: int, code: str, message: str) -> Response:
    return Response(FhirError(status, [Issue(code, message)]).outcome_bytes(), status, media_type=FHIR_JSON)


def _to_http(response: FhirResponse) -> Response:
    return Response(response.body or b"", response.status, headers=response.headers, media_type=FHIR_JSON)


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)


def failure_response(exc: BaseException, guard: RequestGuard | None = None) -> FhirResponse:
    """The OperationOutcome for an exception nothing else answered: never a plain 500."""
    if isinstance(exc, FhirError):
        return FhirResponse(exc.status, exc.outcome_bytes())
    if guard is not None and guard.cancelled or isinstance(exc, RequestCancelled):
        # The client is gone; this answer is for the log only.
        return FhirResponse(
            503, FhirError(503, [Issue("transient", "The client disconnected")]).outcome_bytes()
        )
    if guard is not None and (guard.timed_out or _sqlstate(exc) == "57014"):  # 57014: query_canceled
        message = (
            f"The request's database work took longer than {guard.timeout or 0:g} s and was stopped; "
            "narrow the search (fewer sort keys, more selective parameters, smaller pages)"
        )
        return FhirResponse(503, FhirError(503, [Issue("timeout", message)]).outcome_bytes())
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)) or (
        isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    ):
        log.warning("database unavailable: %s", exc)
        outcome = FhirError(503, [Issue("transient", "The database is unavailable; retry later")])
        return FhirResponse(503, outcome.outcome_bytes(), {"Retry-After": str(_RETRY_AFTER_SECONDS)})
    log.error("unexpected error", exc_info=exc)
    outcome = FhirError(500, [Issue("exception", "Internal server error")])
    return FhirResponse(500, outcome.outcome_bytes())


async def _watching_disconnect(request: Request, guard: RequestGuard) -> None:
    """Wait for the client to go away (the body has been read), then cancel the request's
    database work."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            guard.cancel()
            return


async def _fhir_request(
    request: Request, path: str, settings: Settings, public_base: PublicBase
) -> FhirRequest | Response:
    query = parse_qsl(request.url.query, keep_blank_values=True)
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and content_type.startswith(_FORM) and path.endswith("_search"):
        try:
            query += parse_qsl(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            return _outcome_response(400, "invalid", "The form is not UTF-8")
        body = b""
    elif body and content_type and content_type not in _JSON_TYPES:
        return _outcome_response(
            415, "not-supported", f"Content-Type {content_type} is not supported; send JSON"
        )
    if body and too_deep(body, settings.max_json_depth):
        return _outcome_response(
            400, "invalid", f"The JSON body nests deeper than {settings.max_json_depth} levels"
        )
    accepted = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    if any(accepted) and not any(a in _JSON_TYPES or a in ("*/*", "application/*") for a in accepted):
        return _outcome_response(406, "not-supported", "This server answers in application/fhir+json only")
    if "\x00" in path or any("\x00" in k or "\x00" in v for k, v in query):
        # PostgreSQL text cannot hold NUL, and no FHIR id, type or parameter has one.
        return _outcome_response(400, "invalid", "The URL contains a NUL character (%00)")
    formats = [v for k, v in query if k == "_format"]
    if formats and not any("json" in f for f in formats):
        return _outcome_response(406, "not-supported", "_format must be json")
    headers = {k.lower(): v for k, v in request.headers.items()}
    fhir_request = FhirRequest(request.method, path, query, headers, body or None)
    fhir_request.base_url = public_base.of(request.scope)
    return fhir_request


def create_app(settings: Settings | None = None, engine: sa.Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    router = build_router(settings, engine)
    engine = router.ctx.store.engine
    purge_expired_at_start(router.ctx)  # $export jobs past their retention, and their files
    tokens = TokenService(settings, engine)
    # Links follow BASE_URL, else where each request reached us (proxies as for rate limits).
    public_base = PublicBase(settings.base_url, TrustedProxies(settings.trusted_proxies))
    bearer = Bearer(settings, tokens)
    trail = router.gate.trail

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # One audit writer per process for as long as it serves (group commit, hub.audit.trail).
        if trail is not None:
            trail.start_group_commit(settings.request_timeout_seconds)
        await connectors.start()  # in-process connector worker, MLLP listeners (CONNECTORS_LISTEN)
        try:
            yield
        finally:
            await connectors.stop()
            if trail is not None:
                await run_in_threadpool(trail.stop_group_commit)  # writes what is queued

    app = FastAPI(
        title="Vietnam e-health integration hub",
        version=__version__,
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.router = router
    app.state.engine = engine
    app.state.settings = settings
    app.state.tokens = tokens

    def authenticated(fhir_request: FhirRequest, guard: RequestGuard) -> FhirResponse:
        # In the worker thread with the interaction: verifying is cheap (an LRU of verified
        # tokens), but the periodic "is the account still enabled" read is a query.
        with guarded(guard):
            try:
                try:
                    fhir_request.principal = bearer.principal(
                        fhir_request.header("authorization"), public=_is_public(fhir_request.path)
                    )
                except AuthError as error:
                    return unauthorized(error)
                return router.handle(fhir_request)
            except Exception as exc:  # noqa: BLE001  (every failure answers an OperationOutcome)
                return failure_response(exc, guard)

    async def guarded_call(request: Request, fhir_request: FhirRequest) -> FhirResponse:
        """Run the request in the thread pool; cancel its statements if the client leaves."""
        guard = RequestGuard(settings.request_timeout_seconds)
        async with anyio.create_task_group() as group:
            group.start_soon(_watching_disconnect, request, guard)
            try:  # authenticated() never raises: no exception group to unwrap
                response = await run_in_threadpool(authenticated, fhir_request, guard)
            finally:
                group.cancel_scope.cancel()
        return response

    async def dispatch(request: Request, path: str) -> Response:
        if settings.auth_required and not request.headers.get("authorization") and not _is_public(path):
            # Refused before the body is read: an anonymous caller gets nothing but the 401.
            return _to_http(unauthorized(AuthError(NO_TOKEN, None)))
        fhir_request = await _fhir_request(request, path, settings, public_base)
        if isinstance(fhir_request, Response):
            return fhir_request
        fhir_request.client_address = request.client.host if request.client else None
        return _to_http(await guarded_call(request, fhir_request))

    def route(
        template: str, methods: list[str], name: str, summary: str = "", in_schema: bool = True
    ) -> None:
        """One route below /fhir; every route answers through the router (``dispatch``)."""

        async def endpoint(request: Request) -> Response:
            return await dispatch(request, request.url.path.removeprefix("/fhir").strip("/"))

        endpoint.__name__ = name
        app.add_api_route(
            f"/fhir{template}",
            endpoint,
            methods=methods,
            name=name,
            operation_id=name,
            summary=summary or None,
            response_class=Response,
            include_in_schema=in_schema,
        )

    # First: /fhir/.well-known/smart-configuration would otherwise match /fhir/{type}/{id}.
    mount_auth_routes(app, settings, engine, tokens, public_base)
    mount_access_routes(app, router, bearer)
    from connectors.api import mount_connector_routes  # late: connectors import hub

    connectors = mount_connector_routes(app, router, settings, bearer)  # /connectors, /metrics
    app.state.connectors = connectors

    def answer_page_request(fhir_request: FhirRequest) -> FhirResponse:
        """A page's FHIR request (principal from its session): the router, as for /fhir."""
        guard = RequestGuard(settings.request_timeout_seconds)
        with guarded(guard):
            try:
                return router.handle(fhir_request)
            except Exception as exc:  # noqa: BLE001  (every failure answers an OperationOutcome)
                return failure_response(exc, guard)

    proxies = TrustedProxies(settings.trusted_proxies)
    mount_pages(
        app,
        settings,
        tokens,
        public_base,
        answer_page_request,
        lambda request: str(proxies.client_address(request.scope)),
    )
    # The FHIR routes, generated from the URL grammar (hub.rest.target) and the registered
    # operations: one route, hence one OpenAPI operationId, per method and path.
    for spec in [*target_routes(), *(r for op in router.operations for r in op.routes())]:
        route(spec.template, [spec.method], spec.operation_id, spec.summary)
    route("/", ["POST"], "transaction_or_batch_slash", in_schema=False)  # [base]/ as [base]

    # Bulk Data files are streamed from disk, which a FhirResponse (bytes) cannot do.
    @app.get("/fhir/$export-file/{job_id}/{file_name}", include_in_schema=False)
    async def export_file(request: Request, job_id: str, file_name: str) -> Response:
        try:
            principal = await run_in_threadpool(bearer.principal, request.headers.get("authorization"))
        except AuthError as error:
            return _to_http(unauthorized(error))
        if "\x00" in job_id + file_name:  # PostgreSQL text cannot hold NUL; no job or file has one
            return _outcome_response(404, "not-found", "No such export file")
        try:
            path = await run_in_threadpool(export_file_path, router.ctx.store, job_id, file_name, principal)
        except FhirError as error:
            return Response(error.outcome_bytes(), error.status, media_type=FHIR_JSON)
        return FileResponse(path, media_type=NDJSON)

    # Anything else (unknown paths, operations and methods): the router decides, so they get
    # an OperationOutcome too.
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        route("/{path:path}", [method], f"fallback_{method.lower()}", "any other path: the router answers")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"status": "ok"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if wants_html(request):
            return html_error(request, exc.status_code, str(exc.detail))
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return _outcome_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _outcome_response(400, "invalid", str(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        # Any route outside the guarded FHIR path (auth, access routes, health, files, pages).
        if wants_html(request):
            log.error("unexpected error on a page", exc_info=exc)
            return html_error(request, 500, "")
        return _to_http(failure_response(exc))

    # Added last so they run first: throttling comes before authentication and routing, and
    # the body limit before the throttle (which reads the login form) and anything else.
    add_rate_limits(app, settings)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        login_max_bytes=settings.max_login_body_bytes,
    )
    return app
