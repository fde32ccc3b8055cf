"""Rate limits: per client IP, per bearer token, and on the login endpoint.

Owns: which counters a request spends (every request: its client IP; with a bearer token:
that token; ``POST /auth/token``: the login counters of its IP and of the account it tries:
the ``username`` of a password grant, the client id of client_credentials (HTTP Basic or
form), read from the whole form by the token endpoint's own parser), where the counters live (Redis when ``REDIS_URL`` is set, process memory
otherwise), the 429 answer and the RateLimit-* / Retry-After headers. Memory counters
are per process: run ``hub serve --workers N`` (or several hosts) with Redis, or each
process grants the full allowance.
Calls: the ``limits`` library (storages and the sliding-window-counter strategy), settings,
``hub.api.proxies`` (whose X-Forwarded-For is believed), ``hub.api.auth_routes``
(``parse_token_form``, ``login_identity``).
Called by: ``hub.api.app.create_app``, which installs :class:`RateLimitMiddleware` inside
``hub.api.limits.BodyLimitMiddleware`` (so the login form it reads is size-limited).

It is a pure ASGI middleware rather than a FastAPI dependency or ``BaseHTTPMiddleware``:
it must run before routing and authentication (an unauthenticated flood is what it is for),
and ``BaseHTTPMiddleware`` costs a task and a stream per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import limits
import orjson
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from hub.api.auth_routes import TokenFormError, login_identity, parse_token_form
from hub.api.limits import LOGIN_PATHS
from hub.api.proxies import TrustedProxies
from hub.errors import FhirError, Issue
from hub.rest.messages import FHIR_JSON
from hub.settings import Settings, get_settings

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]

EXEMPT_PATHS = frozenset({"/healthz"})  # load balancers probe it; it must never be throttled
# A Redis call slower than this counts as Redis being down (see fail-open below).
_REDIS_TIMEOUT_SECONDS = 0.5
# After a Redis failure, requests pass unlimited for this long before Redis is tried again,
# so an outage costs one failed call per interval rather than one per request.
_REDIS_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    """One counter a request spends: which limit, and whose."""

    item: limits.RateLimitItem
    kind: str  # "ip", "token", "login-ip", "login-user": keeps the namespaces apart
    key: str


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int  # of the binding check: the one refused, or else the one nearest exhaustion
    remaining: int
    reset_seconds: int  # until the binding counter frees a request


class Limiter:
    """The hub's limits over one storage. Returns ``None`` when the storage is down."""

    def __init__(self, settings: Settings) -> None:
        # Parse now, so a malformed setting fails at startup rather than on the first request.
        self.per_ip = limits.parse(settings.rate_limit_per_ip)
        self.per_token = limits.parse(settings.rate_limit_per_token)
        self.login = limits.parse(settings.rate_limit_login)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.storage: MemoryStorage | RedisStorage
        if settings.redis_url:
            url = settings.redis_url
            self.storage = RedisStorage(
                url if url.startswith("async+") else f"async+{url}",
                # The client from the ``redis`` package (not coredis), and its errors wrapped
                # in StorageError so one except clause covers every Redis failure.
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=settings.rate_limit_key_prefix,
                socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
                socket_timeout=_REDIS_TIMEOUT_SECONDS,
            )
        else:
            self.storage = MemoryStorage()
        # Sliding window counter: two integers per key (a moving window keeps one timestamp
        # per request, 2400 per busy IP) and no double burst at window edges (fixed window).
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._redis_down_until = 0.0

    @property
    def backend(self) -> str:
        return "redis" if isinstance(self.storage, RedisStorage) else "memory"

    async def spend(self, checks: list[Check]) -> Verdict | None:
        if time.monotonic() < self._redis_down_until:
            return None
        try:
            hits = await asyncio.gather(*(self.strategy.hit(c.item, c.kind, c.key) for c in checks))
            stats = await asyncio.gather(
                *(self.strategy.get_window_stats(c.item, c.kind, c.key) for c in checks)
            )
        except StorageError as error:
            # Fail open: a Redis outage must not take the FHIR API down with it (a 500 on
            # every request); the hub runs unthrottled, loudly, until Redis is back.
            self._redis_down_until = time.monotonic() + _REDIS_RETRY_SECONDS
            log.warning(
                "rate limiting suspended for %.0fs: Redis storage failed: %s", _REDIS_RETRY_SECONDS, error
            )
            return None
        now = time.time()
        rows = [
            (hit, check.item.amount, s.remaining, max(0, math.ceil(s.reset_time - now)))
            for hit, check, s in zip(hits, checks, stats, strict=True)
        ]
        refused = [r for r in rows if not r[0]]
        if refused:
            # The caller may retry only when every exhausted counter has freed a slot.
            _, limit, _, reset = max(refused, key=lambda r: r[3])
            return Verdict(False, limit, 0, max(1, reset))
        _, limit, remaining, reset = min(rows, key=lambda r: (r[2], -r[3]))
        return Verdict(True, limit, remaining, reset)

    def client_ip(self, scope: Scope) -> str:
        """The address limited as "the client": the peer, or what trusted proxies report."""
        address = self.proxies.client_address(scope)
        if isinstance(address, str):
            return address
        if address.version == 6:
            # One IPv6 subscriber usually holds a whole /64; per-address limits would be
            # one new address away from void.
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)


def _digest(value: str) -> str:
    # Keys hold digests, not secrets: a bearer token or a user name never reaches Redis.
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _bearer(scope: Scope) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


async def _peek_login(scope: Scope, receive: Receive, cap: int) -> tuple[str | None, Receive]:
    """The account a login form tries, and a ``receive`` that replays the body to the app.

    The whole form is read (``BodyLimitMiddleware`` has bounded it; ``cap`` guards a limiter
    installed without it) and parsed by the token endpoint's own function, so no decoy field
    or padding makes the limiter key on something other than what the endpoint checks.
    """
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: replayed to the app like the rest
        size += len(message.get("body", b""))
        if not message.get("more_body", False) or size > cap:
            break

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    if size > cap:
        return None, replay
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
    try:
        form = parse_token_form(_header(scope, b"content-type"), body)
    except TokenFormError:
        return None, replay  # the endpoint refuses it before checking any secret
    return login_identity(form, _header(scope, b"authorization")), replay


def _too_many(path: str, verdict: Verdict) -> tuple[bytes, str]:
    message = f"Too many requests; retry after {verdict.reset_seconds} s"
    if path.rstrip("/") == "/login":  # a person at the login page: words, not JSON
        return message.encode(), "text/plain; charset=utf-8"
    if path.startswith("/auth/"):
        # RFC 6749 error shape, which OAuth clients parse; it has no code for rate limits,
        # and "temporarily_unavailable" (section 4.1.2.1) is the nearest.
        body = {"error": "temporarily_unavailable", "error_description": message}
        return orjson.dumps(body), "application/json"
    return FhirError(429, [Issue("throttled", message)]).outcome_bytes(), FHIR_JSON


def _rate_headers(verdict: Verdict) -> list[tuple[bytes, bytes]]:
    # The RateLimit-* fields of draft-ietf-httpapi-ratelimit-headers (Reset in seconds).
    return [
        (b"ratelimit-limit", str(verdict.limit).encode()),
        (b"ratelimit-remaining", str(verdict.remaining).encode()),
        (b"ratelimit-reset", str(verdict.reset_seconds).encode()),
    ]


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: Limiter, login_body_cap: int = 64 * 1024) -> None:
        self.app = app
        self.limiter = limiter
        self.login_body_cap = login_body_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        ip = self.limiter.client_ip(scope)
        checks = [Check(self.limiter.per_ip, "ip", ip)]
        # Keyed by a digest of the raw token, not by its (unverified) subject: verification
        # happens later, and a forged token naming someone else's subject must not be able
        # to spend that user's allowance. A real token's digest is as unique as its jti.
        token = _bearer(scope)
        if token:
            checks.append(Check(self.limiter.per_token, "token", _digest(token)))
        is_login = scope["method"] == "POST" and path.rstrip("/") in LOGIN_PATHS
        if is_login:
            # Brute-force guard: per IP (one attacker, many names) and per user name (many
            # attackers, one name; a distributed guess at one password).
            checks.append(Check(self.limiter.login, "login-ip", ip))
            username, receive = await _peek_login(scope, receive, self.login_body_cap)
            if username:
                checks.append(Check(self.limiter.login, "login-user", _digest(username.strip().casefold())))

        verdict = await self.limiter.spend(checks)
        if verdict is None:
            await self.app(scope, receive, send)
            return
        if not verdict.allowed:
            body, media_type = _too_many(path, verdict)
            headers = [
                (b"content-type", media_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(verdict.reset_seconds).encode()),
                *_rate_headers(verdict),
            ]
            if is_login:
                headers.append((b"cache-control", b"no-store"))  # RFC 6749 section 5.2
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        extra = _rate_headers(verdict)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_rate_limits(app: Starlette, settings: Settings | None = None) -> Limiter:
    """Install the limits on a Starlette/FastAPI app; the last middleware added runs first."""
    settings = settings or get_settings()
    limiter = Limiter(settings)
    app.add_middleware(RateLimitMiddleware, limiter=limiter, login_body_cap=settings.max_login_body_bytes)
    return limiter


__all__ = ["RateLimitMiddleware", "Limiter", "add_rate_limits"]
