"""One page request of a logged-in person: who, in which language, with which access.

Owns: ``Page`` (the user, their ``FhirHandle``, locale, CSRF token, rendering), the FastAPI
dependencies ``page`` (login required) and ``page_for(*roles)`` (login and one of the roles),
the CSRF check of every state-changing page request (form field ``csrf_token`` or header
``X-CSRF-Token``, compared with the session's in constant time), and the exceptions the app
turns into redirects and error pages.
Calls: ``hub.web.session`` (the session), ``hub.web.fhir_handle``, ``hub.web.render``.
Called by: the views (``hub.web.views.*``) and ``hub.web.app``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool

from hub.web import i18n, render
from hub.web.fhir_handle import FhirHandle
from hub.web.session import COOKIE, WebUser, same_token

if TYPE_CHECKING:
    from hub.web.app import PagesRuntime

LANG_COOKIE = "hub_lang"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Which roles use which area; "/" sends each role to the first of its areas.
AREA_ROLES: dict[str, tuple[str, ...]] = {
    "clinician": ("clinician",),
    "portal": ("patient", "proxy"),
    "console": ("hub-admin", "facility-admin", "auditor"),
}


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class PageForbidden(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


class CsrfRefused(Exception):
    pass


def locale_of(request: Request) -> str:
    return i18n.pick_locale(request.cookies.get(LANG_COOKIE))


def local_path(target: str | None, default: str = "/") -> str:
    """A redirect target on this site only: a path, never ``//host`` or a scheme."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        # Browsers drop tabs and newlines from URLs ("/\t/host" becomes "//host"): a target
        # with control characters is never a page of ours, and is not echoed into a form.
        return default
    return target


def home_of(role: str) -> str:
    for area, roles in AREA_ROLES.items():
        if role in roles:
            return f"/{area}"
    return "/account"


@dataclass
class Page:
    request: Request
    user: WebUser
    fhir: FhirHandle
    locale: str
    csrf_token: str
    extra: dict[str, Any] = field(default_factory=dict)

    def gettext(self, message: str) -> str:
        return i18n.translations(self.locale).gettext(message)

    def ngettext(self, singular: str, plural: str, count: int) -> str:
        return i18n.translations(self.locale).ngettext(singular, plural, count)

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        values = base_context(self.request, self.locale, self.user, self.csrf_token)
        values.update(context)
        return HTMLResponse(render.render(template, self.locale, values), status_code=status)


def csrf_field_for(token: str) -> Callable[[], Markup]:
    def csrf_field() -> Markup:
        return Markup('<input type="hidden" name="%s" value="%s">') % (CSRF_FIELD, escape(token))

    return csrf_field


def base_context(request: Request, locale: str, user: WebUser | None, csrf_token: str) -> dict[str, Any]:
    path = request.url.path
    here = path + (f"?{request.url.query}" if request.url.query else "")
    return {
        "user": user,
        "area": path.strip("/").split("/", 1)[0],
        "here": here,
        "here_quoted": quote(here, safe=""),
        "csrf_token": csrf_token,
        "csrf_field": csrf_field_for(csrf_token),
        "other_locale": "en" if locale == "vi" else "vi",
    }


async def _check_csrf(request: Request, expected: str) -> None:
    if request.method in _SAFE_METHODS:
        return
    given = request.headers.get(CSRF_HEADER)
    if not given and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()  # starlette keeps it: the view reads the same form
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not same_token(expected, given):
        raise CsrfRefused()


async def _page(request: Request, roles: tuple[str, ...] | None) -> Page:
    runtime: PagesRuntime = request.app.state.pages
    user = await run_in_threadpool(runtime.sessions.load, request.cookies.get(COOKIE))
    if user is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(here if request.method in _SAFE_METHODS else "/")
    await _check_csrf(request, user.csrf)
    if roles is not None and user.role not in roles:
        raise PageForbidden("This page is not for your role")
    handle = FhirHandle(
        runtime.answer,
        user.principal,
        client_address=runtime.client_address(request),
        base_url=runtime.public_base.of(request.scope),
    )
    return Page(request, user, handle, locale_of(request), user.csrf)


async def page(request: Request) -> Page:
    """Dependency: the logged-in person's page (login required; CSRF checked on POSTs)."""
    return await _page(request, None)


def page_for(*roles: str) -> Callable[[Request], Awaitable[Page]]:
    """Dependency: like ``page``, and the person's role must be one of ``roles`` (else 403)."""
    allowed = tuple(roles)

    async def dependency(request: Request) -> Page:
        return await _page(request, allowed)

    return dependency
