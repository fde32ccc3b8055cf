"""Security headers of every response the hub sends.

Owns: ``Server-Timing: app;dur=<ms>`` on every response (the server time of a page, read by
bench/pages.py and the browser's devtools), the Content-Security-Policy of the pages (scripts, styles, images, connections from the
hub itself only; no inline script or style, no eval, no framing, forms post only to the hub),
``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy``, and ``Cache-Control:
no-store`` on HTML (pages hold health data: no browser or proxy keeps a copy).
Calls: nothing.  Called by: ``hub.web.app.mount_pages`` (installed as ASGI middleware).
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'; object-src 'none'"
)
_ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]
_HTML = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"cache-control", b"no-store"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={elapsed_ms:.1f}".encode()))
                present = {name.lower() for name, _ in headers}
                content_type = next((v for n, v in headers if n.lower() == b"content-type"), b"")
                added = [h for h in _ALWAYS if h[0] not in present]
                if content_type.startswith(b"text/html"):
                    added += [h for h in _HTML if h[0] not in present]
                message["headers"] = headers + added
            await send(message)

        await self.app(scope, receive, with_headers)
