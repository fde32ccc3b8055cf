"""Sessions of the pages: login, the session cookie, CSRF tokens, logout.

Owns: the ``web_session`` table (docs/storage.md): a login checks the password
(``hub.auth.users.authenticate``: Argon2, one answer for unknown, wrong and disabled),
issues a hub access token for the account exactly as ``POST /auth/token`` would, and keeps
it server-side under the SHA-256 of a random cookie value, encrypted (AES-GCM) with a key
derived from that cookie value: the table alone yields neither cookies nor usable tokens. Every page request loads the row
and verifies its token with the bearer verifier, so a disabled account or a changed role
stops the session as it stops the account's API tokens. A session ends at logout, after
``WEB_SESSION_IDLE_MINUTES`` unused, or ``WEB_SESSION_HOURS`` after login.
Calls: ``hub.auth.users``, ``hub.auth.tokens.TokenService``, the database.
Called by: ``hub.web.app`` (login, logout), ``hub.web.context`` (every page request),
``hub.cli`` (``end_sessions_of`` after ``hub users passwd`` and ``disable``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hub.auth import users
from hub.auth.principal import Principal
from hub.auth.tokens import AuthError, TokenService
from hub.db.schema import web_session
from hub.settings import Settings

COOKIE = "hub_session"
# The login form has no session yet: its CSRF token is a double-submit cookie.
LOGIN_CSRF_COOKIE = "hub_login_csrf"
# last_seen is written at most this often per session (not on every page).
_TOUCH_INTERVAL = timedelta(minutes=1)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _key(cookie: str) -> bytes:
    # Domain-separated from the row's id hash, so the id says nothing about the key.
    return hashlib.sha256(b"hub-web-session-token-key\x00" + cookie.encode()).digest()


def _seal(cookie: str, token: str) -> str:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(_key(cookie)).encrypt(nonce, token.encode(), None)).decode()


def _open(cookie: str, sealed: str) -> str | None:
    try:
        raw = base64.b64decode(sealed)
        return AESGCM(_key(cookie)).decrypt(raw[:12], raw[12:], None).decode()
    except (InvalidTag, ValueError):
        return None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


@dataclass(frozen=True)
class WebUser:
    """The person behind a page request."""

    username: str
    role: str
    principal: Principal
    session_hash: str
    csrf: str

    @property
    def display_name(self) -> str:
        return self.username


class Sessions:
    def __init__(self, engine: sa.Engine, tokens: TokenService, settings: Settings) -> None:
        self.engine = engine
        self.tokens = tokens
        self.lifetime = timedelta(hours=settings.web_session_hours)
        self.idle = timedelta(minutes=settings.web_session_idle_minutes)

    def login(self, username: str, password: str) -> str | None:
        """A new session's cookie value, or None when the credentials are not accepted.
        Slow (Argon2): call from a worker thread."""
        user = users.authenticate(self.engine, username.strip(), password)
        if user is None:
            return None
        try:
            issued = self.tokens.issue_token(user, None, ttl=int(self.lifetime.total_seconds()))
        except AuthError:
            return None
        cookie = new_token()
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            # Expired sessions of anyone are dropped here, so the table never grows unbounded.
            conn.execute(sa.delete(web_session).where(web_session.c.expires < now))
            conn.execute(
                sa.insert(web_session).values(
                    id_hash=_hash(cookie),
                    username=user.username,
                    token=_seal(cookie, issued.token),
                    csrf=new_token(),
                    created=now,
                    last_seen=now,
                    expires=now + self.lifetime,
                )
            )
        return cookie

    def load(self, cookie: str | None) -> WebUser | None:
        """The session's user, or None (no cookie, unknown, expired, idle, account stopped)."""
        if not cookie or len(cookie) > 200:
            return None
        id_hash = _hash(cookie)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(web_session).where(web_session.c.id_hash == id_hash)).first()
        if row is None:
            return None
        now = datetime.now(UTC)
        expires, last_seen = _aware(row.expires), _aware(row.last_seen)
        if now >= expires or now - last_seen > self.idle:
            self.end(cookie)
            return None
        token = _open(cookie, row.token)
        try:
            if token is None:
                raise AuthError("The session's token cannot be opened")
            principal = self.tokens.verify(token)
        except AuthError:  # disabled, role changed, key rotated: the session is over
            self.end(cookie)
            return None
        if now - last_seen > _TOUCH_INTERVAL:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(web_session).where(web_session.c.id_hash == id_hash).values(last_seen=now)
                )
        return WebUser(row.username, principal.role.value, principal, id_hash, row.csrf)

    def end(self, cookie: str | None) -> None:
        if cookie:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(web_session).where(web_session.c.id_hash == _hash(cookie)))

    def end_all(self, username: str) -> int:
        """Log an account out everywhere (an admin disabled it, or its password changed)."""
        return end_sessions_of(self.engine, username)


def end_sessions_of(engine: sa.Engine, username: str) -> int:
    """Every page session of an account ends (the console, and ``hub users passwd|disable``:
    a new password is the answer to a stolen session, so no session outlives it)."""
    with engine.begin() as conn:
        return conn.execute(sa.delete(web_session).where(web_session.c.username == username)).rowcount


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
