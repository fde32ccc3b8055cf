"""The OAuth 2 side of the hub: token endpoint, JWKS, SMART discovery, bearer checking.

Owns: ``POST /auth/token`` (grant types ``password`` and ``client_credentials``, errors as
RFC 6749 section 5.2 JSON), ``GET /auth/jwks.json``, ``GET /.well-known/smart-configuration``
(also below ``/fhir``), and turning an ``Authorization: Bearer`` header into a Principal or
a 401 answer (RFC 6750).
Calls: the token service, users, settings, ``hub.api.proxies`` (discovery's base URL).
Called by: ``hub.api.app.create_app``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from hub.api.proxies import PublicBase, TrustedProxies
from hub.auth import users
from hub.auth.principal import Principal, system_principal
from hub.auth.tokens import AuthError, TokenService, auth_url
from hub.errors import FhirError, Issue
from hub.rest.messages import FhirResponse
from hub.settings import Settings

_FORM = "application/x-www-form-urlencoded"
NO_TOKEN = "This server needs a bearer token: send 'Authorization: Bearer <token>'"
# OAuth answers carrying tokens must not be cached (RFC 6749 section 5.1).
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SMART_CAPABILITIES = (
    "permission-v2",
    "permission-v1",
    "permission-patient",
    "permission-user",
    "client-confidential-symmetric",
    "context-standalone-patient",
)


class Bearer:
    """Who a FHIR request comes from, given its Authorization header."""

    def __init__(self, settings: Settings, tokens: TokenService) -> None:
        self.required = settings.auth_required
        self.tokens = tokens
        self.anonymous = system_principal("anonymous")

    def principal(self, authorization: str | None, public: bool = False) -> Principal | None:
        """The verified principal; AuthError when the token is missing (and required) or bad.

        ``public`` paths (the CapabilityStatement) never fail: without a valid token they
        get None when auth is required. With auth off, no token means the anonymous
        (unrestricted) principal.
        """
        if not authorization:
            if public and self.required:
                return None
            if self.required:
                raise AuthError(NO_TOKEN, None)
            return self.anonymous
        scheme, _, token = authorization.strip().partition(" ")
        try:
            if scheme.lower() != "bearer":  # another scheme: RFC 6750 wants no error code
                raise AuthError("The Authorization header must be 'Bearer <token>'", None)
            if not token.strip():
                raise AuthError("The Authorization header must be 'Bearer <token>'", "invalid_request")
            return self.tokens.verify(token.strip())
        except AuthError:
            if public:
                return None if self.required else self.anonymous
            raise


def unauthorized(error: AuthError) -> FhirResponse:
    """401 with an OperationOutcome about the credentials only, and an RFC 6750 challenge."""
    outcome = FhirError(401, [Issue("login", f"Authentication failed: {error.message}")]).outcome_bytes()
    return FhirResponse(401, outcome, {"WWW-Authenticate": challenge(error)})


def challenge(error: AuthError) -> str:
    if error.error is None:  # no credentials presented: RFC 6750 says no error code
        return 'Bearer realm="hub"'
    description = error.message.replace('"', "'").replace("\\", "/")
    return f'Bearer realm="hub", error="{error.error}", error_description="{description}"'


def smart_configuration(settings: Settings, base_url: str) -> dict[str, Any]:
    """SMART App Launch v2 discovery (what this hub does; no authorize endpoint yet). The
    endpoints are below ``base_url`` (where the client connected, or BASE_URL); ``issuer``
    is the ``iss`` the hub's tokens carry (AUTH_ISSUER), an identifier rather than a link."""
    return {
        "issuer": settings.auth_issuer,
        "jwks_uri": auth_url(base_url, "jwks.json"),
        "token_endpoint": auth_url(base_url, "token"),
        "grant_types_supported": ["client_credentials", "password"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": [
            "openid",
            "fhirUser",
            "launch/patient",
            "patient/*.cruds",
            "patient/*.rs",
            "user/*.cruds",
            "user/*.rs",
            "system/*.cruds",
            "system/*.rs",
        ],
        "response_types_supported": ["token"],
        "capabilities": list(SMART_CAPABILITIES),
    }


def mount_auth_routes(
    app: FastAPI,
    settings: Settings,
    engine: sa.Engine,
    tokens: TokenService,
    public_base: PublicBase | None = None,
) -> None:
    """Add the OAuth routes; call before any catch-all /fhir route so they win."""
    bases = public_base or PublicBase(settings.base_url, TrustedProxies(settings.trusted_proxies))

    async def well_known(request: Request) -> Response:
        discovery = orjson.dumps(smart_configuration(settings, bases.of(request.scope)))
        return Response(discovery, media_type="application/json")

    app.add_api_route("/.well-known/smart-configuration", well_known, methods=["GET"], name="smart_config")
    app.add_api_route(
        "/fhir/.well-known/smart-configuration", well_known, methods=["GET"], name="smart_config_fhir"
    )

    @app.get("/auth/jwks.json", name="jwks")
    async def jwks() -> Response:
        return Response(orjson.dumps(tokens.jwks()), media_type="application/json")

    @app.post("/auth/token", name="token")
    async def token(request: Request) -> Response:
        try:
            form = parse_token_form(request.headers.get("content-type"), await request.body())
        except TokenFormError as error:
            return _oauth_error(400, "invalid_request", error.description)
        grant_type = form.get("grant_type")
        if grant_type == "password":
            return await _password_grant(form)
        if grant_type == "client_credentials":
            return await _client_credentials_grant(form, request.headers.get("authorization"))
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is missing")
        return _oauth_error(
            400, "unsupported_grant_type", "grant_type must be password or client_credentials"
        )

    async def _password_grant(form: dict[str, str]) -> Response:
        username, password = form.get("username"), form.get("password")
        if not username or not password:
            return _oauth_error(400, "invalid_request", "username and password are required")
        # Argon2 takes tens of ms of CPU: keep it off the event loop.
        user = await run_in_threadpool(users.authenticate, engine, username, password)
        if user is None:
            # One answer for unknown user, wrong password, disabled account.
            return _oauth_error(400, "invalid_grant", "Wrong username or password")
        return _issue(user, form.get("scope"), None)

    async def _client_credentials_grant(form: dict[str, str], authorization: str | None) -> Response:
        try:
            basic = _basic_credentials(authorization)
        except ValueError:
            return _oauth_error(401, "invalid_client", "Malformed Basic authorization", basic_challenge=True)
        if basic is not None and ("client_id" in form or "client_secret" in form):
            return _oauth_error(400, "invalid_request", "Authenticate the client one way only")
        client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
        if not client_id or not secret:
            return _oauth_error(
                401, "invalid_client", "client_id and client_secret are required", basic_challenge=True
            )
        user = await run_in_threadpool(users.authenticate, engine, client_id, secret)
        if user is None:
            return _oauth_error(401, "invalid_client", "Client authentication failed", basic_challenge=True)
        if user.role not in users.SERVICE_ROLES:
            return _oauth_error(
                400, "unauthorized_client", f"A {user.role.value} account may not use client_credentials"
            )
        return _issue(user, form.get("scope"), client_id)

    def _issue(user: users.User, scope: str | None, client_id: str | None) -> Response:
        try:
            issued = tokens.issue_token(user, scope, client_id=client_id)
        except AuthError as error:
            code = error.error if error.error in ("invalid_scope", "invalid_grant") else "invalid_grant"
            return _oauth_error(400, code, error.message)
        answer: dict[str, Any] = {
            "access_token": issued.token,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.scope,
        }
        for claim in ("patient", "fhirUser"):
            if claim in issued.claims:
                answer[claim] = issued.claims[claim]
        return Response(orjson.dumps(answer), 200, headers=_NO_STORE, media_type="application/json")


class TokenFormError(Exception):
    """The token request's form cannot be read (answered 400 invalid_request)."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def parse_token_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """The fields of a ``POST /auth/token`` form, exactly as the token endpoint reads them.

    One function for the endpoint and the login rate limit (``hub.api.ratelimit``), so the
    limiter keys on the very identity the endpoint will authenticate.
    """
    if (content_type or "").split(";")[0].strip().lower() != _FORM:
        raise TokenFormError(f"Send the parameters as {_FORM}")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise TokenFormError("The form is not UTF-8") from None
    if any("\x00" in name + value for name, value in pairs):  # PostgreSQL text cannot hold NUL
        raise TokenFormError("The form contains a NUL character")
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 section 3.2: no parameter more than once
            raise TokenFormError(f"Parameter {name} is repeated")
        form[name] = value
    return form


def login_identity(form: dict[str, str], authorization: str | None) -> str | None:
    """The account a token request tries to authenticate as: ``username`` for the password
    grant, the client id (HTTP Basic, else the form) for client_credentials; None when the
    endpoint will refuse the request before checking any secret."""
    grant_type = form.get("grant_type")
    if grant_type == "password":
        return form.get("username") or None
    if grant_type == "client_credentials":
        try:
            basic = _basic_credentials(authorization)
        except ValueError:
            return None
        return (basic[0] if basic else form.get("client_id")) or None
    return None


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(client_id, secret) from HTTP Basic; None without it; ValueError when malformed."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise ValueError("Basic credentials without a colon")
    # RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
    client_id, secret = unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
    if "\x00" in client_id + secret:  # also once decoded: '%00' (PostgreSQL text cannot hold NUL)
        raise ValueError("Basic credentials with a NUL character")
    return client_id, secret


def _oauth_error(status: int, error: str, description: str, basic_challenge: bool = False) -> Response:
    headers = dict(_NO_STORE)
    if basic_challenge:
        headers["WWW-Authenticate"] = 'Basic realm="hub"'
    body = orjson.dumps({"error": error, "error_description": description})
    return Response(body, status, headers=headers, media_type="application/json")
