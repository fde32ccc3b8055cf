"""Authentication over real HTTP: /auth/token, bearer verification, SMART discovery, the CLI.

Every rejection must be a 401 OperationOutcome (code "login") with an RFC 6750 challenge,
and say nothing about the resource asked for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import (
    ADMIN_AUTH,
    REPO,
    TEST_AUDIENCE,
    TEST_ISSUER,
    LiveServer,
    auth_env,
    auth_settings,
    make_token,
)
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from hub.auth import users
from hub.auth.principal import Role
from hub.auth.tokens import AuthError, TokenService, intersect_scopes, jwk_thumbprint

HUB = str(Path(sys.executable).parent / "hub")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
IDP_ISSUER = "https://idp.example.vn/realms/hub"


def _origin(server: LiveServer) -> str:
    return server.base.removesuffix("/fhir")


def _login(server: LiveServer, **form: str) -> httpx.Response:
    return httpx.post(f"{_origin(server)}/auth/token", data=form, timeout=30)


def _get(server: LiveServer, path: str, token: str | None) -> httpx.Response:
    headers = {"Accept": "application/fhir+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"{server.base}/{path}", headers=headers, timeout=30)


def _assert_401(response: httpx.Response, fragment: str, presented: bool = True) -> None:
    assert response.status_code == 401, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "login"
    assert fragment.lower() in outcome["issue"][0]["diagnostics"].lower(), outcome
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="hub"')
    assert ('error="invalid_token"' in challenge) is presented


def _add(server: LiveServer, role: Role, uid: str, password: str | None = "pw-" + "x" * 8, **kw: Any) -> str:
    username = f"{role.value}-{uid}"
    users.add_user(server.engine, username, role, password=password, **kw)
    return username


# --- login --------------------------------------------------------------------------------------


def test_password_login_gives_a_token_that_reads_fhir(live_server: LiveServer, uid: str) -> None:
    name = _add(live_server, Role.ADMIN, uid, password="Mật khẩu đúng 1")
    response = _login(live_server, grant_type="password", username=name, password="Mật khẩu đúng 1")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer = response.json()
    assert answer["token_type"] == "Bearer"
    assert 0 < answer["expires_in"] <= 3600
    assert answer["scope"] == "system/*.cruds"
    assert "patient" not in answer
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["iss"] == TEST_ISSUER and claims["aud"] == TEST_AUDIENCE and claims["sub"] == name
    assert claims["hub_role"] == "hub-admin" and claims["exp"] - claims["iat"] == answer["expires_in"]
    assert uuid.UUID(claims["jti"])
    assert jwt.get_unverified_header(answer["access_token"])["alg"] == "ES256"
    read = _get(live_server, "Patient?_count=1", answer["access_token"])
    assert read.status_code == 200, read.text
    assert read.json()["resourceType"] == "Bundle"


def test_patient_login_carries_the_launch_context(live_server: LiveServer, uid: str) -> None:
    name = _add(live_server, Role.PATIENT, uid, password="benh-nhan-1", fhir_user=f"Patient/p-{uid}")
    answer = _login(live_server, grant_type="password", username=name, password="benh-nhan-1").json()
    assert answer["patient"] == f"p-{uid}"
    assert answer["fhirUser"] == f"Patient/p-{uid}"
    assert answer["scope"] == users.DEFAULT_SCOPES[Role.PATIENT]
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert claims["patient"] == f"p-{uid}" and claims["fhirUser"] == f"Patient/p-{uid}"


def test_unknown_user_and_wrong_password_get_the_same_answer(live_server: LiveServer, uid: str) -> None:
    name = _add(live_server, Role.CLINICIAN, uid, password="right-one", fhir_user="Practitioner/x")
    wrong = _login(live_server, grant_type="password", username=name, password="wrong-one")
    unknown = _login(live_server, grant_type="password", username=f"nobody-{uid}", password="wrong-one")
    for response in (wrong, unknown):
        assert response.status_code == 400
        assert response.json() == {
            "error": "invalid_grant",
            "error_description": "Wrong username or password",
        }
    assert wrong.content == unknown.content
    users.disable_user(live_server.engine, name)
    disabled = _login(live_server, grant_type="password", username=name, password="right-one")
    assert disabled.content == unknown.content


def test_token_endpoint_errors_follow_rfc_6749(live_server: LiveServer) -> None:
    url = f"{_origin(live_server)}/auth/token"
    as_json = httpx.post(url, json={"grant_type": "password"})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    assert _login(live_server, grant_type="authorization_code", code="x").json()["error"] == (
        "unsupported_grant_type"
    )
    assert _login(live_server, grant_type="password", username="x").json()["error"] == "invalid_request"
    twice = httpx.post(url, content="grant_type=password&grant_type=password", headers=FORM)
    assert twice.json()["error"] == "invalid_request"


def test_client_credentials_for_service_accounts(live_server: LiveServer, uid: str) -> None:
    name = _add(live_server, Role.SERVICE, uid, password="his-secret")
    url = f"{_origin(live_server)}/auth/token"
    posted = httpx.post(
        url, data={"grant_type": "client_credentials", "client_id": name, "client_secret": "his-secret"}
    )
    assert posted.status_code == 200, posted.text
    basic = httpx.post(
        url,
        data={"grant_type": "client_credentials", "scope": "system/Patient.rs"},
        auth=(name, "his-secret"),
    )
    assert basic.status_code == 200, basic.text
    assert basic.json()["scope"] == "system/Patient.rs"
    claims = jwt.decode(basic.json()["access_token"], options={"verify_signature": False})
    assert claims["client_id"] == name and claims["hub_role"] == "integration-service"
    assert _get(live_server, "Patient?_count=1", basic.json()["access_token"]).status_code == 200

    wrong = httpx.post(url, data={"grant_type": "client_credentials"}, auth=(name, "not-it"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"] == 'Basic realm="hub"'
    missing = httpx.post(url, data={"grant_type": "client_credentials"})
    assert missing.status_code == 401 and missing.json()["error"] == "invalid_client"

    person = _add(live_server, Role.AUDITOR, uid, password="auditor-pw")
    refused = httpx.post(url, data={"grant_type": "client_credentials"}, auth=(person, "auditor-pw"))
    assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"


def test_login_scopes_are_intersected_with_the_allowed_ones(live_server: LiveServer, uid: str) -> None:
    doctor = _add(live_server, Role.CLINICIAN, uid, password="bac-si", fhir_user="Practitioner/d1")
    asked = "patient/Observation.rs user/Patient.r openid offline_access system/*.cruds"
    answer = _login(
        live_server, grant_type="password", username=doctor, password="bac-si", scope=asked
    ).json()
    assert answer["scope"] == "patient/Observation.rs user/Patient.r openid user/*.cruds"

    patient = _add(live_server, Role.PATIENT, uid, password="benh-nhan", fhir_user="Patient/p1")
    answer = _login(
        live_server, grant_type="password", username=patient, password="benh-nhan", scope="user/*.rs"
    ).json()
    assert answer["scope"] == (
        "patient/*.rs patient/Consent.rs patient/Appointment.rs patient/QuestionnaireResponse.r "
        "patient/AuditEvent.rs"
    )

    auditor = _add(live_server, Role.AUDITOR, uid, password="kiem-toan")
    refused = _login(
        live_server, grant_type="password", username=auditor, password="kiem-toan", scope="user/Patient.c"
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


def test_intersect_scopes_rules() -> None:
    assert intersect_scopes(None, "user/*.cruds") == "user/*.cruds"
    assert intersect_scopes("user/Observation.rs", "user/*.cruds") == "user/Observation.rs"
    assert intersect_scopes("user/*.cruds", "user/Organization.rs user/Location.cruds") == (
        "user/Organization.rs user/Location.cruds"
    )
    assert intersect_scopes("user/Observation.write", "user/Observation.rs") == ""
    assert intersect_scopes("patient/*.read", "user/*.cruds") == "patient/*.rs"  # v1 read as v2
    assert intersect_scopes("system/*.rs", "patient/*.rs") == "patient/*.rs"
    granular = "user/Observation.rs?category=laboratory"
    assert intersect_scopes(granular, "user/*.cruds") == granular
    assert intersect_scopes("user/Observation.rs", granular) == granular
    assert intersect_scopes("launch/patient fhirUser bogus", "user/*.rs") == "launch/patient fhirUser"


# --- bearer verification ----------------------------------------------------------------------


def test_no_token_is_401_with_a_challenge(live_server: LiveServer) -> None:
    for path in ("Patient/does-not-matter", "Observation?code=1234", "$export"):
        response = _get(live_server, path, None)
        _assert_401(response, "needs a bearer token", presented=False)
        assert "does-not-matter" not in response.text
    posted = httpx.post(f"{live_server.base}/Patient", json={"resourceType": "Patient"})
    _assert_401(posted, "bearer token", presented=False)
    basic = httpx.get(f"{live_server.base}/Patient", auth=("user", "pw"))
    _assert_401(basic, "Bearer <token>", presented=False)


def test_expired_token_is_refused(live_server: LiveServer) -> None:
    expired = make_token(live_server, ttl=-120)
    _assert_401(_get(live_server, "Patient", expired), "expired")


def test_token_of_another_key_is_refused(live_server: LiveServer, tmp_path: Path) -> None:
    other = TokenService(auth_settings("sqlite://", auth_signing_key_file=tmp_path / "other.pem"))
    forged = other.issue({"username": "test-admin", "role": "hub-admin"})
    _assert_401(_get(live_server, "Patient", forged), "key this hub does not know")
    # The same key under the hub's kid: the signature still fails.
    header = {"kid": live_server.tokens.kid}
    claims = jwt.decode(forged, options={"verify_signature": False})
    key = other._private_key  # noqa: SLF001 - the test needs the other key itself
    spoofed = jwt.encode(claims, key, algorithm="ES256", headers=header)
    _assert_401(_get(live_server, "Patient", spoofed), "signature")


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_and_hmac_tokens_are_refused(live_server: LiveServer) -> None:
    claims = jwt.decode(live_server.admin_token, options={"verify_signature": False})
    kid = live_server.tokens.kid
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}."
    _assert_401(_get(live_server, "Patient", unsigned), "'none' is not accepted")
    # HS256 keyed with the public JWK: the classic algorithm-confusion attack.
    public = json.dumps(live_server.tokens.jwks()["keys"][0]).encode()
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}"
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    _assert_401(_get(live_server, "Patient", confused), "'HS256' is not accepted")
    _assert_401(_get(live_server, "Patient", "not-a-jwt"), "well-formed")


def test_tampered_payload_is_refused(live_server: LiveServer, uid: str) -> None:
    token = make_token(live_server, role=Role.AUDITOR, username=f"aud-{uid}")
    assert _get(live_server, "metadata", token).status_code == 200
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["hub_role"], claims["scope"] = "hub-admin", "system/*.cruds"
    tampered = f"{header}.{_b64(claims)}.{signature}"
    _assert_401(_get(live_server, "Patient", tampered), "signature")


def test_wrong_audience_or_issuer_is_refused(live_server: LiveServer) -> None:
    for field, fragment in (("auth_audience", "not meant for this"), ("auth_issuer", "issuer")):
        other = TokenService(auth_settings("sqlite://", **{field: "http://elsewhere.example/x"}))
        token = other.issue({"username": "test-admin", "role": "hub-admin"})
        _assert_401(_get(live_server, "Patient", token), fragment)


def test_disabled_or_unknown_account_is_refused(live_server: LiveServer, uid: str) -> None:
    token = make_token(live_server, role=Role.ADMIN, username=f"leaver-{uid}")
    assert _get(live_server, "Patient?_count=1", token).status_code == 200
    users.disable_user(live_server.engine, f"leaver-{uid}")
    _assert_401(_get(live_server, "Patient?_count=1", token), "unknown or disabled")
    users.disable_user(live_server.engine, f"leaver-{uid}", disabled=False)
    assert _get(live_server, "Patient?_count=1", token).status_code == 200
    ghost = live_server.tokens.issue({"username": f"ghost-{uid}", "role": "hub-admin"})
    _assert_401(_get(live_server, "Patient", ghost), "unknown or disabled")


def test_export_files_need_a_token(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.base}/$export-file/{uuid.uuid4().hex}/Patient.ndjson")
    _assert_401(response, "bearer token", presented=False)
    with_token = httpx.get(
        f"{live_server.base}/$export-file/{uuid.uuid4().hex}/Patient.ndjson", headers=ADMIN_AUTH
    )
    assert with_token.status_code == 404


# --- an external identity provider --------------------------------------------------------------


@pytest.fixture(scope="module")
def idp(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, Any, Path]]:
    """A hub trusting the JWKS file of an IdP holding an RSA key with kid idp-1."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path_factory.mktemp("idp") / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [{**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "idp-1"}]})
    )
    with LiveServer(database_url, auth_jwks_file=jwks) as server:
        yield server, key, jwks


def _idp_token(key: Any, kid: str = "idp-1", **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": IDP_ISSUER,
        "aud": [TEST_AUDIENCE, "account"],
        "sub": "keycloak-user-1",
        "iat": now,
        "exp": now + 300,
        "scope": "openid system/*.cruds",
        "hub_role": "hub-admin",
        "fhirUser": "https://hub.example.vn/fhir/Practitioner/ext-1",
        **claims,
    }
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_external_jwks_issuer_is_accepted(idp: tuple[LiveServer, Any, Path]) -> None:
    server, key, jwks = idp
    assert _get(server, "Patient?_count=1", _idp_token(key)).status_code == 200
    principal = server.tokens.verify(_idp_token(key, hub_orgs=["org-1"]))
    assert principal.issuer == IDP_ISSUER and principal.subject == "keycloak-user-1"
    assert principal.fhir_user == "Practitioner/ext-1" and principal.organizations == ("org-1",)
    # The IdP's key cannot speak for the hub's own issuer, nor for an unknown role.
    _assert_401(_get(server, "Patient", _idp_token(key, iss=TEST_ISSUER)), "this hub's key")
    _assert_401(_get(server, "Patient", _idp_token(key, hub_role="superuser")), "hub_role")
    _assert_401(_get(server, "Patient", _idp_token(key, kid="idp-2")), "does not know")
    # A rotated JWKS file is picked up without a restart.
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    entry = {**RSAAlgorithm.to_jwk(new_key.public_key(), as_dict=True), "kid": "idp-2"}
    document = json.loads(jwks.read_text())
    jwks.write_text(json.dumps({"keys": [*document["keys"], entry]}))
    assert _get(server, "Patient?_count=1", _idp_token(new_key, kid="idp-2")).status_code == 200
    # The hub's own tokens keep working beside the IdP's.
    assert _get(server, "Patient?_count=1", server.admin_token).status_code == 200


# --- discovery and public documents -------------------------------------------------------------


def test_smart_configuration_and_jwks(live_server: LiveServer) -> None:
    origin = _origin(live_server)
    root = httpx.get(f"{origin}/.well-known/smart-configuration")
    below = httpx.get(f"{live_server.base}/.well-known/smart-configuration")
    assert root.status_code == below.status_code == 200
    assert root.json() == below.json()
    config = root.json()
    assert config["issuer"] == TEST_ISSUER
    assert config["token_endpoint"] == f"{origin}/auth/token"
    assert config["jwks_uri"] == f"{origin}/auth/jwks.json"
    assert set(config["grant_types_supported"]) == {"client_credentials", "password"}
    assert "client_secret_basic" in config["token_endpoint_auth_methods_supported"]
    for capability in ("permission-v2", "client-confidential-symmetric", "context-standalone-patient"):
        assert capability in config["capabilities"]
    assert "patient/*.rs" in config["scopes_supported"] and config["response_types_supported"]

    keys = httpx.get(config["jwks_uri"]).json()["keys"]
    assert [k["kid"] for k in keys] == [live_server.tokens.kid]
    assert keys[0]["kty"] == "EC" and keys[0]["alg"] == "ES256" and "d" not in keys[0]
    assert jwt.get_unverified_header(live_server.admin_token)["kid"] == keys[0]["kid"]
    assert keys[0]["kid"] == jwk_thumbprint(keys[0])
    # The token verifies with nothing but the published JWKS, as a resource server would.
    jwt.decode(live_server.admin_token, jwt.PyJWK(keys[0]), algorithms=["ES256"], audience=TEST_AUDIENCE)


def test_metadata_is_public_and_names_the_token_endpoint(live_server: LiveServer) -> None:
    response = _get(live_server, "metadata", None)
    assert response.status_code == 200
    security = response.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = security["extension"][0]
    assert uris["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert uris["extension"] == [{"url": "token", "valueUri": f"{_origin(live_server)}/auth/token"}]
    # A bad token does not make the public document private.
    assert _get(live_server, "metadata", "garbage").status_code == 200
    assert httpx.get(_origin(live_server) + "/healthz").status_code == 200


def test_auth_off_lets_anonymous_in_but_still_checks_tokens(database_url: str) -> None:
    with LiveServer(database_url, auth_required=False) as server:
        assert _get(server, "Patient?_count=1", None).status_code == 200
        assert _get(server, "Patient?_count=1", server.admin_token).status_code == 200
        _assert_401(_get(server, "Patient", "garbage"), "well-formed")


# --- keys and the CLI ---------------------------------------------------------------------------


def test_signing_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "key.pem"
    first = TokenService(auth_settings("sqlite://", auth_signing_key_file=path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    second = TokenService(auth_settings("sqlite://", auth_signing_key_file=path))
    assert first.kid == second.kid
    assert second.verify(first.issue({"username": "a", "role": "hub-admin"})).subject == "a"
    with pytest.raises(AuthError, match="None of the requested scopes"):
        first.issue({"username": "a", "role": "auditor"}, scopes="user/Patient.c")


def test_user_validation() -> None:
    for role, fhir_user, message in (
        ("clinician", "Patient/1", "must be a Practitioner"),
        ("patient", None, "needs a fhirUser"),
        ("proxy", "Patient/1", "must be a RelatedPerson"),
        ("wizard", None, "Unknown role"),
        ("auditor", "not a reference", "relative reference"),
    ):
        with pytest.raises(users.UserError, match=message):
            users.validate("someone", role, fhir_user, (), None)
    with pytest.raises(users.UserError, match="Username"):
        users.validate("two words", "auditor", None, (), None)
    role, orgs, scopes = users.validate("x", "facility-admin", None, ["Organization/o1", "o1", "o2"], None)
    assert orgs == ("o1", "o2") and scopes.startswith("user/Organization.cruds")


def _hub(*args: str, server: LiveServer, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # COLUMNS: rich would otherwise cut table cells at 80 columns.
    env = {**os.environ, "DATABASE_URL": server.settings.database_url, "COLUMNS": "300", **auth_env()}
    return subprocess.run(
        [HUB, *args], env=env, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_users_and_token(live_server: LiveServer, uid: str) -> None:
    service = f"his-{uid}"
    added = _hub("users", "add", service, "--role", "integration-service", server=live_server)
    assert added.returncode == 0, added.stderr + added.stdout
    assert "no password" in added.stdout
    minted = _hub("token", service, "--scopes", "system/Patient.rs", "--ttl", "600", server=live_server)
    assert minted.returncode == 0, minted.stderr + minted.stdout
    token = minted.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == service and claims["scope"] == "system/Patient.rs"
    assert claims["exp"] - claims["iat"] == 600
    assert _get(live_server, "Patient?_count=1", token).status_code == 200

    nurse = f"dd-{uid}"
    added = _hub(
        "users", "add", nurse, "--role", "clinician", "--fhir-user", "Practitioner/n1", "--org", "o1",
        "--org", "o2", "--password-stdin", server=live_server, stdin="y-ta-mat-khau\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr + added.stdout
    login = _login(live_server, grant_type="password", username=nurse, password="y-ta-mat-khau")
    assert login.status_code == 200
    assert jwt.decode(login.json()["access_token"], options={"verify_signature": False})["hub_orgs"] == [
        "o1",
        "o2",
    ]
    listed = _hub("users", "list", server=live_server)
    assert service in listed.stdout and nurse in listed.stdout
    assert (
        _hub("users", "passwd", nurse, "--password-stdin", server=live_server, stdin="moi\n").returncode == 0
    )
    assert _login(live_server, grant_type="password", username=nurse, password="moi").status_code == 200
    assert _hub("users", "disable", nurse, server=live_server).returncode == 0
    assert _login(live_server, grant_type="password", username=nurse, password="moi").status_code == 400
    bad = _hub("users", "add", f"x-{uid}", "--role", "patient", "--no-password", server=live_server)
    assert bad.returncode == 1 and "needs a fhirUser" in bad.stdout
    assert _hub("token", f"nobody-{uid}", server=live_server).returncode == 1
