"""Bearer tokens: the hub's own ES256 JWTs, and those of an external identity provider.

Owns: the hub's signing key (created at first use), its JWKS, issuing access tokens for
``hub_user`` accounts, and turning any presented token into a Principal or an AuthError.
Calls: PyJWT, users, principal, scopes, settings.  Called by: the web adapter (every
request), ``/auth/token``, ``hub token``, tests.

Token claims (the hub's and an external IdP's alike): ``iss aud sub exp iat nbf jti``,
``scope`` (space-separated SMART v2 scopes), ``fhirUser`` ("Practitioner/123"),
``hub_role`` (a Role), ``hub_orgs`` (Organization ids), ``patient`` (SMART launch
context) and, for client_credentials, ``client_id``.

Trust: a token is verified with the key its ``kid`` names: the hub's own key (then ``iss``
must be ``auth_issuer`` and the account must still exist, be enabled and keep its role) or
a key of the JWKS document at ``auth_jwks_file`` (then ``iss`` is the IdP's, and must not
be the hub's: only the hub's key speaks for the hub's accounts). Only ES256 and RS256 are
accepted; ``aud`` must include ``auth_audience``.

Scope narrowing at login (``intersect_scopes``): each requested scope is met with each
allowed one; the meet keeps the narrower context (patient < user < system), the concrete
type over ``*``, the common permissions, and the narrower granular query. So a clinician
allowed ``user/*.cruds`` who asks for ``patient/Observation.rs`` gets exactly that, and a
patient who asks for ``user/*.cruds`` gets ``patient/*.rs`` and the rest of its own.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from hub.auth import users
from hub.auth.principal import Principal, Role
from hub.auth.scopes import Scope, ScopeSet, parse_scope
from hub.settings import Settings

ALGORITHMS = ("ES256", "RS256")  # never "none", never HS* (a shared secret is not a signature)
LEEWAY_SECONDS = 30  # clock skew tolerated on exp/nbf/iat, mostly for external IdPs
USER_RECHECK_SECONDS = 30  # how long "this account is enabled" is believed
CACHE_SIZE = 10_000  # verified tokens kept, by their raw text
# Non-resource scopes a login may ask for and keep; anything else unknown is dropped.
PASS_THROUGH_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch/patient"})
_CONTEXT_RANK = {"patient": 0, "user": 1, "system": 2}


class AuthError(Exception):
    """A token or credential is not accepted. ``error`` is the OAuth 2 / RFC 6750 code
    (None when no credentials were presented at all: RFC 6750 section 3.1)."""

    def __init__(self, message: str, error: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.message = message
        self.error = error


@dataclass(frozen=True)
class IssuedToken:
    token: str
    claims: dict[str, Any]
    expires_in: int

    @property
    def scope(self) -> str:
        return str(self.claims["scope"])


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    exp: float
    nbf: float
    own: bool  # issued by this hub: the account is re-checked


# --- scopes ---------------------------------------------------------------------------------


def _meet(requested: Scope, allowed: Scope) -> Scope | None:
    """The widest scope that both allow, or None."""
    if requested.resource_type == "*":
        resource_type = allowed.resource_type
    elif allowed.resource_type in ("*", requested.resource_type):
        resource_type = requested.resource_type
    else:
        return None
    permissions = requested.permissions & allowed.permissions
    if not permissions:
        return None
    wanted, granted = set(requested.query), set(allowed.query)
    if granted <= wanted:
        query = requested.query
    elif wanted <= granted:
        query = allowed.query
    else:  # two different restrictions: their conjunction is not one scope; keep it simple
        return None
    context = min(requested.context, allowed.context, key=_CONTEXT_RANK.__getitem__)
    return Scope(context, resource_type, frozenset(permissions), query)


def intersect_scopes(requested: str | None, allowed: str) -> str:
    """What a login asking for ``requested`` gets from an account allowed ``allowed``.

    ``None`` or blank asks for everything allowed. Non-resource scopes pass through when
    listed in PASS_THROUGH_SCOPES. Returns "" when nothing requested is allowed.
    """
    if requested is None or not requested.strip():
        return " ".join(allowed.split())
    allowed_set = ScopeSet.parse(allowed)
    granted: dict[str, None] = {}
    for item in requested.split():
        scope = parse_scope(item)
        if scope is None:
            if item in PASS_THROUGH_SCOPES:
                granted[item] = None
            continue
        for candidate in allowed_set.scopes:
            meet = _meet(scope, candidate)
            if meet is not None:
                granted[str(meet)] = None
    return " ".join(granted)


# --- keys -----------------------------------------------------------------------------------


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required members in lexicographic order, base64url."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    digest = hashlib.sha256(orjson.dumps(members, option=orjson.OPT_SORT_KEYS)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_or_create_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 key in ``path`` (PEM), created there (mode 0600) when missing.

    Several workers may start at once: each writes a private temporary file and links it
    into place; the first link wins and the others read the winner's key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise ValueError(f"{path} must hold an EC P-256 private key (ES256)")
    return loaded


class _ExternalKeys:
    """The JWKS document of an external IdP, re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_kid: dict[str, jwt.PyJWK] = {}
        self._without_kid: list[jwt.PyJWK] = []
        self._lock = threading.Lock()

    def find(self, kid: str | None) -> list[jwt.PyJWK]:
        if self.path is None:
            return []
        self._refresh()
        if kid is None:
            return list(self._without_kid) or list(self._by_kid.values())
        return [self._by_kid[kid]] if kid in self._by_kid else []

    def _refresh(self) -> None:
        assert self.path is not None
        try:
            status = self.path.stat()
        except FileNotFoundError:
            self._by_kid, self._without_kid, self._stamp = {}, [], None
            return
        stamp = (status.st_mtime_ns, status.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            document = orjson.loads(self.path.read_bytes())
            by_kid: dict[str, jwt.PyJWK] = {}
            without_kid: list[jwt.PyJWK] = []
            for entry in document.get("keys", []):
                if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("EC", "RSA"):
                    continue
                try:
                    key = jwt.PyJWK(entry)
                except jwt.PyJWKError:
                    continue  # a key we cannot use (an unsupported curve) is skipped, not fatal
                if key.algorithm_name not in ALGORITHMS:
                    continue
                if entry.get("kid"):
                    by_kid[str(entry["kid"])] = key
                else:
                    without_kid.append(key)
            self._by_kid, self._without_kid, self._stamp = by_kid, without_kid, stamp


# --- the service ----------------------------------------------------------------------------


class TokenService:
    """Issues the hub's tokens and verifies any token. One per process; thread-safe."""

    def __init__(self, settings: Settings, engine: sa.Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine  # None: no account re-check (only for issuing, e.g. offline)
        self.issuer = settings.auth_issuer
        self.audience = settings.auth_audience
        self._private_key = load_or_create_signing_key(Path(settings.auth_signing_key_file))
        public_jwk = dict(ECAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True))
        self.kid = jwk_thumbprint(public_jwk)
        self._public_jwk = {**public_jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}
        self._own_key = jwt.PyJWK(self._public_jwk)
        self._external = _ExternalKeys(settings.auth_jwks_file)
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()
        # username -> (monotonic time looked up, role if enabled else None)
        self._accounts: dict[str, tuple[float, Role | None]] = {}

    # --- issuing ---

    def jwks(self) -> dict[str, Any]:
        """The public keys of this issuer, as served at /auth/jwks.json."""
        return {"keys": [dict(self._public_jwk)]}

    def issue(
        self,
        user: users.User | Mapping[str, Any],
        scopes: str | None = None,
        ttl: int | None = None,
        client_id: str | None = None,
    ) -> str:
        """A signed access token for an account (a User, or a mapping of its fields)."""
        return self.issue_token(user, scopes, ttl, client_id).token

    def issue_token(
        self,
        user: users.User | Mapping[str, Any],
        scopes: str | None = None,
        ttl: int | None = None,
        client_id: str | None = None,
    ) -> IssuedToken:
        """Like ``issue``, with the claims. ``scopes`` are narrowed to what the account allows;
        a negative ``ttl`` makes an already expired token (tests)."""
        account = _as_user(user)
        if account.disabled:
            raise AuthError(f"Account {account.username!r} is disabled", "invalid_grant")
        granted = intersect_scopes(scopes, account.scopes)
        if not ScopeSet.parse(granted).scopes:
            raise AuthError(
                f"None of the requested scopes is allowed; allowed: {account.scopes}", "invalid_scope"
            )
        ttl = self.settings.token_ttl_seconds if ttl is None else ttl
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": account.username,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": str(uuid.uuid4()),
            "scope": granted,
            "hub_role": account.role.value,
            "hub_orgs": list(account.organizations),
        }
        if account.fhir_user:
            claims["fhirUser"] = account.fhir_user
        if account.patient:
            claims["patient"] = account.patient
        if client_id:
            claims["client_id"] = client_id
        token = jwt.encode(claims, self._private_key, algorithm="ES256", headers={"kid": self.kid})
        return IssuedToken(token, claims, ttl)

    # --- verifying ---

    def verify(self, token: str) -> Principal:
        """The principal a bearer token stands for; AuthError if it is not acceptable."""
        now = time.time()
        with self._cache_lock:
            cached = self._cache.get(token)
            if cached is not None:
                self._cache.move_to_end(token)
        if cached is None:
            cached = self._verify_signed(token)
            with self._cache_lock:
                self._cache[token] = cached
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        elif now > cached.exp + LEEWAY_SECONDS:
            self._forget(token)
            raise AuthError("The token has expired")
        elif now < cached.nbf - LEEWAY_SECONDS:
            raise AuthError("The token is not valid yet")
        if cached.own:
            self._check_account(cached.principal)
        return cached.principal

    def _forget(self, token: str) -> None:
        with self._cache_lock:
            self._cache.pop(token, None)

    def _verify_signed(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("The token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise AuthError(f"Token algorithm {algorithm!r} is not accepted; use ES256 or RS256")
        kid = header.get("kid")
        own = kid == self.kid or (kid is None and not self._external.find(None))
        keys = [self._own_key] if own else self._external.find(kid)
        if not keys:
            raise AuthError("The token is signed with a key this hub does not know")
        claims: dict[str, Any] | None = None
        error: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=self.audience,
                    leeway=LEEWAY_SECONDS,
                    options={"require": ["exp", "iat", "iss", "aud", "sub"]},
                )
                break
            except jwt.PyJWTError as exc:
                error = exc
        if claims is None:
            raise AuthError(_describe(error)) from None
        issuer = claims["iss"]
        if own and issuer != self.issuer:
            raise AuthError(f"The token's issuer {issuer!r} is not this hub's ({self.issuer})")
        if not own and issuer == self.issuer:
            raise AuthError("A token of this hub's issuer must be signed with this hub's key")
        principal = _principal(claims)
        nbf = float(claims.get("nbf", claims["iat"]))
        return _Verified(principal, float(claims["exp"]), nbf, own)

    def _check_account(self, principal: Principal) -> None:
        """The account behind one of our tokens must still exist, be enabled, keep its role."""
        if self.engine is None:
            return
        username = principal.subject
        seen = self._accounts.get(username)
        if (
            seen is None
            or time.monotonic() - seen[0] > USER_RECHECK_SECONDS
            or users.changed_since(username, seen[0])
        ):
            looked_up = time.monotonic()  # before the read, so a change during it is not missed
            account = users.get_user(self.engine, username)
            seen = (looked_up, account.role if account is not None and not account.disabled else None)
            self._accounts[username] = seen
        if seen[1] is None:
            raise AuthError("The token's account is unknown or disabled")
        if seen[1] is not principal.role:
            raise AuthError("The token's account has changed role; log in again")


def _describe(error: jwt.PyJWTError | None) -> str:
    if isinstance(error, jwt.ExpiredSignatureError):
        return "The token has expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "The token is not valid yet"
    if isinstance(error, jwt.InvalidAudienceError):
        return "The token is not meant for this FHIR server (aud)"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"The token lacks the {error.claim!r} claim"
    if isinstance(error, jwt.InvalidSignatureError):
        return "The token's signature does not verify"
    return f"The token is not valid: {error}"


def _principal(claims: Mapping[str, Any]) -> Principal:
    try:
        role = Role(str(claims.get("hub_role")))
    except ValueError:
        raise AuthError(f"The token's hub_role {claims.get('hub_role')!r} is not a hub role") from None
    scope = claims.get("scope", "")
    if isinstance(scope, list):  # some IdPs send scopes as a JSON array
        scope = " ".join(str(s) for s in scope)
    fhir_user = claims.get("fhirUser")
    if isinstance(fhir_user, str) and fhir_user.count("/") > 1:
        # An absolute URL (what OpenID Connect id_tokens carry): keep "Type/id".
        fhir_user = "/".join(fhir_user.rstrip("/").split("/")[-2:])
    organizations = claims.get("hub_orgs") or []
    if not isinstance(organizations, list):
        raise AuthError("The token's hub_orgs must be a list of Organization ids")
    patient = claims.get("patient")
    if patient is None and role is Role.PATIENT and isinstance(fhir_user, str):
        patient = fhir_user.split("/", 1)[-1]
    return Principal(
        subject=str(claims["sub"]),
        role=role,
        scopes=ScopeSet.parse(str(scope)),
        fhir_user=fhir_user if isinstance(fhir_user, str) else None,
        organizations=tuple(str(o).removeprefix("Organization/") for o in organizations),
        patient=str(patient) if patient is not None else None,
        token_id=claims.get("jti"),
        client_id=claims.get("client_id") or claims.get("azp"),
        issuer=str(claims["iss"]),
    )


def _as_user(user: users.User | Mapping[str, Any]) -> users.User:
    if isinstance(user, users.User):
        return user
    username = user.get("username") or user.get("sub")
    if not username:
        raise ValueError("A token needs a username")
    role, organizations, scopes = users.validate(
        str(username),
        user["role"],
        user.get("fhir_user"),
        user.get("organizations") or (),
        user.get("scopes"),
    )
    return users.User(
        username=str(username),
        role=role,
        scopes=scopes,
        fhir_user=user.get("fhir_user"),
        organizations=organizations,
        disabled=bool(user.get("disabled", False)),
    )


def auth_url(base_url: str, name: str) -> str:
    """An /auth endpoint beside the FHIR base: http://host/fhir -> http://host/auth/{name}."""
    return f"{base_url.rstrip('/').removesuffix('/fhir')}/auth/{name}"
