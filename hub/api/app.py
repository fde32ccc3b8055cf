"""The FastAPI application.

Owns: HTTP concerns only: routes (declared for OpenAPI), content types, turning framework
errors into OperationOutcome. All FHIR semantics live in ``hub.rest``.
Calls: the router, the store, settings.  Called by: ``hub serve``, uvicorn, tests.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub import __version__
from hub.api.ratelimit import add_rate_limits
from hub.app_factory import build_router
from hub.errors import FhirError, Issue
from hub.ops.export import NDJSON, export_file_path
from hub.rest import FhirRequest, FhirResponse
from hub.rest.messages import FHIR_JSON
from hub.settings import Settings

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
_FORM = "application/x-www-form-urlencoded"


def _outcome_response(status: int, code: str, message: str) -> Response:
    return Response(FhirError(status, [Issue(code, message)]).outcome_bytes(), status, media_type=FHIR_JSON)


def _to_http(response: FhirResponse) -> Response:
    return Response(response.body or b"", response.status, headers=response.headers, media_type=FHIR_JSON)


async def _fhir_request(request: Request, path: str) -> FhirRequest | Response:
    query = parse_qsl(request.url.query, keep_blank_values=True)
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and content_type.startswith(_FORM) and path.endswith("_search"):
        query += parse_qsl(body.decode(), keep_blank_values=True)
        body = b""
    elif body and content_type and content_type not in _JSON_TYPES:
        return _outcome_response(
            415, "not-supported", f"Content-Type {content_type} is not supported; send JSON"
        )
    accepted = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    if any(accepted) and not any(a in _JSON_TYPES or a in ("*/*", "application/*") for a in accepted):
        return _outcome_response(406, "not-supported", "This server answers in application/fhir+json only")
    formats = [v for k, v in query if k == "_format"]
    if formats and not any("json" in f for f in formats):
        return _outcome_response(406, "not-supported", "_format must be json")
    headers = {k.lower(): v for k, v in request.headers.items()}
    return FhirRequest(request.method, path, query, headers, body or None)


def create_app(settings: Settings | None = None, engine: sa.Engine | None = None) -> FastAPI:
    router = build_router(settings, engine)
    engine = router.ctx.store.engine
    app = FastAPI(title="Vietnam e-health integration hub", version=__version__, redirect_slashes=False)
    app.state.router = router
    app.state.engine = engine

    async def dispatch(request: Request, path: str) -> Response:
        fhir_request = await _fhir_request(request, path)
        if isinstance(fhir_request, Response):
            return fhir_request
        return _to_http(await run_in_threadpool(router.handle, fhir_request))

    def route(path: str, methods: list[str], name: str) -> None:
        async def endpoint(request: Request) -> Response:
            return await dispatch(request, request.url.path.removeprefix("/fhir").strip("/"))

        endpoint.__name__ = name
        app.add_api_route(f"/fhir{path}", endpoint, methods=methods, name=name, response_class=Response)

    route("/metadata", ["GET"], "capabilities")
    route("", ["POST"], "transaction_or_batch")
    route("/", ["POST"], "transaction_or_batch_slash")
    route("/_history", ["GET"], "history_system")
    route("/{resource_type}", ["GET", "POST", "PUT", "DELETE"], "type_level")
    route("/{resource_type}/_search", ["POST"], "search_post")
    route("/{resource_type}/_history", ["GET"], "history_type")
    route("/{resource_type}/{resource_id}", ["GET", "PUT", "DELETE"], "instance")
    route("/{resource_type}/{resource_id}/_history", ["GET"], "history_instance")
    route("/{resource_type}/{resource_id}/_history/{version_id}", ["GET"], "vread")

    # Bulk Data files are streamed from disk, which a FhirResponse (bytes) cannot do.
    @app.get("/fhir/$export-file/{job_id}/{file_name}", include_in_schema=False)
    async def export_file(job_id: str, file_name: str) -> Response:
        try:
            path = await run_in_threadpool(export_file_path, router.ctx.store, job_id, file_name)
        except FhirError as error:
            return Response(error.outcome_bytes(), error.status, media_type=FHIR_JSON)
        return FileResponse(path, media_type=NDJSON)

    # Operations ($everything, $export, its status) and anything else: the router
    # decides, so unknown paths and methods get an OperationOutcome too.
    route("/{path:path}", ["GET", "POST", "PUT", "DELETE", "PATCH"], "operations_and_fallback")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return {"status": "ok"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        return _outcome_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _outcome_response(400, "invalid", str(exc.errors()))

    # Added last so it runs first: throttling comes before authentication and routing.
    add_rate_limits(app, settings)
    return app
