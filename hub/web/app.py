"""Mounting the pages on the hub's FastAPI app.

Owns: the routes every person uses (``/`` sends each role to its area, ``/login``,
``/logout``, ``/lang/{locale}``, ``/account``), static files (``/static``: ours from
``hub/web/static``, the npm libraries from ``node_modules`` under ``/static/vendor``), the
security headers of every response (``hub.web.security``), and turning the pages'
exceptions into redirects and HTML error pages. Includes each area's router
(``hub.web.views``: clinician, portal, console).
Calls: ``hub.web.session``, ``hub.web.context``, ``hub.web.render``, the views.
Called by: ``hub.api.app.create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from hub.api.proxies import PublicBase
from hub.auth.tokens import TokenService
from hub.settings import Settings
from hub.web import render
from hub.web.context import (
    CSRF_FIELD,
    LANG_COOKIE,
    CsrfRefused,
    LoginRequired,
    PageForbidden,
    base_context,
    home_of,
    local_path,
    locale_of,
    page,
)
from hub.web.fhir_handle import Answer, PageFhirError
from hub.web.i18n import LOCALES
from hub.web.security import SecurityHeadersMiddleware
from hub.web.session import COOKIE, LOGIN_CSRF_COOKIE, Sessions, new_token, same_token

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# npm's node_modules at the repository root (``make setup``: ``npm ci``); the hub serves
# these files itself, so pages work offline and load nothing from a CDN.
NODE_MODULES = Path(__file__).resolve().parents[2] / "node_modules"
VENDOR_FILES = {
    "htmx.min.js": "htmx.org/dist/htmx.min.js",
    "alpine.min.js": "@alpinejs/csp/dist/cdn.min.js",
    "uPlot.iife.min.js": "uplot/dist/uPlot.iife.min.js",
    "uPlot.min.css": "uplot/dist/uPlot.min.css",
}
_YEAR = 365 * 24 * 3600


@dataclass
class PagesRuntime:
    sessions: Sessions
    answer: Answer
    public_base: PublicBase
    client_address: Callable[[Request], str | None]
    secure_cookies: Callable[[Request], bool]


def html_error(request: Request, status: int, message: str) -> HTMLResponse:
    locale = locale_of(request)
    context = base_context(request, locale, None, "")
    context.update(status=status, message=message)
    return HTMLResponse(render.render("error.html", locale, context), status_code=status)


def wants_html(request: Request) -> bool:
    """A page path (not the FHIR or JSON APIs) asked by a browser."""
    path = request.url.path
    if path.startswith(("/fhir", "/auth", "/access", "/connectors", "/metrics", "/healthz", "/.well-known")):
        return False
    return "text/html" in request.headers.get("accept", "") or path == "/"


def mount_pages(
    app: FastAPI,
    settings: Settings,
    tokens: TokenService,
    public_base: PublicBase,
    answer: Answer,
    client_address: Callable[[Request], str | None],
) -> PagesRuntime:
    engine = tokens.engine
    if engine is None:
        raise RuntimeError("The pages need the token service's database")
    sessions = Sessions(engine, tokens, settings)

    def secure_cookies(request: Request) -> bool:
        return public_base.of(request.scope).startswith("https://")

    runtime = PagesRuntime(sessions, answer, public_base, client_address, secure_cookies)
    app.state.pages = runtime

    def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            httponly=True,
            samesite="lax",  # sent on top-level navigation to the hub, never on cross-site posts
            secure=secure_cookies(request),
            path="/",
        )

    def login_form(
        request: Request, status: int = 200, error: str | None = None, username: str = ""
    ) -> Response:
        locale = locale_of(request)
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or new_token()
        context = base_context(request, locale, None, token)
        context.update(error=error, username=username, next=local_path(request.query_params.get("next"), ""))
        response = HTMLResponse(render.render("login.html", locale, context), status_code=status)
        set_cookie(response, request, LOGIN_CSRF_COOKIE, token, None)
        return response

    @app.get("/", include_in_schema=False)
    async def home(request: Request) -> Response:
        user = await run_in_threadpool(sessions.load, request.cookies.get(COOKIE))
        if user is None:
            return RedirectResponse("/login", 303)
        return RedirectResponse(home_of(user.role), 303)

    @app.get("/login", include_in_schema=False)
    async def login_page(request: Request) -> Response:
        return login_form(request)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not same_token(request.cookies.get(LOGIN_CSRF_COOKIE), fields.get(CSRF_FIELD)):
            return html_error(request, 403, "csrf")
        username = fields.get("username", "").strip()
        cookie = await run_in_threadpool(sessions.login, username, fields.get("password", ""))
        if cookie is None:
            return login_form(request, 400, "credentials", username)
        # The session this browser had (another account, or a cookie planted before login)
        # ends here: one browser, one live session, and nothing left behind to replay.
        await run_in_threadpool(sessions.end, request.cookies.get(COOKIE))
        user = await run_in_threadpool(sessions.load, cookie)
        target = local_path(fields.get("next"), home_of(user.role) if user else "/")
        response = RedirectResponse(target, 303)
        set_cookie(response, request, COOKIE, cookie, None)  # a browser-session cookie
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        await page(request)  # logged in, CSRF checked
        await run_in_threadpool(sessions.end, request.cookies.get(COOKIE))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/lang/{locale}", include_in_schema=False)
    async def switch_language(request: Request, locale: str) -> Response:
        # A preference, not an action on anyone's data: a plain link, no form or CSRF token.
        response = RedirectResponse(local_path(request.query_params.get("next")), 303)
        if locale in LOCALES:
            set_cookie(response, request, LANG_COOKIE, locale, _YEAR)
        return response

    @app.get("/account", include_in_schema=False)
    async def account(request: Request) -> Response:
        current = await page(request)
        return await run_in_threadpool(current.render, "account.html")

    @app.get("/static/vendor/{name}", include_in_schema=False)
    async def vendor_file(name: str) -> Response:
        relative = VENDOR_FILES.get(name)
        path = NODE_MODULES / relative if relative else None
        if path is None or not path.is_file():
            if relative:
                log.warning("%s is missing: run `make setup` (npm ci)", path)
            return Response("Not found", 404, media_type="text/plain")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    from hub.web.views import clinician, console, portal  # the areas' routes

    for area in (clinician, portal, console):
        app.include_router(area.router)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        target = "/login?next=" + _quote(exc.next_url)
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"HX-Redirect": target})
        return RedirectResponse(target, 303)

    @app.exception_handler(PageForbidden)
    async def forbidden(request: Request, exc: PageForbidden) -> Response:
        return html_error(request, 403, "forbidden")

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused) -> Response:
        return html_error(request, 403, "csrf")

    @app.exception_handler(PageFhirError)
    async def fhir_refused(request: Request, exc: PageFhirError) -> Response:
        status = exc.status if exc.status in (400, 403, 404, 409, 410, 412, 422, 429, 503) else 502
        return html_error(request, status, exc.message)

    app.add_middleware(SecurityHeadersMiddleware)
    return runtime


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="/")


__all__ = ["mount_pages", "PagesRuntime", "html_error", "wants_html", "VENDOR_FILES"]
