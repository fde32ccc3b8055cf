"""The hub's own accounts: people and service accounts in the ``hub_user`` table.

Owns: adding, reading, listing, disabling accounts and setting their passwords; the
default scopes of each role; checking that an account's fhirUser fits its role.
Calls: passwords, principal, scopes, the schema.  Called by: the token service and
``/auth/token`` (authenticate, re-check on verify), the CLI (``hub users``, ``hub demo``),
tests.

An account without a password is a service account: it gets tokens only from
``hub token`` run by an operator. One with a password may also log in at ``/auth/token``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from hub.auth.passwords import burn_verification, hash_password, needs_rehash, verify_password
from hub.auth.principal import Role
from hub.auth.scopes import ScopeSet
from hub.db.schema import hub_user

_PATIENT_SCOPES = (
    "patient/*.rs patient/Consent.cruds patient/Appointment.cruds "
    "patient/QuestionnaireResponse.cru patient/AuditEvent.rs"
)
DEFAULT_SCOPES: dict[Role, str] = {
    Role.CLINICIAN: "user/*.cruds",
    Role.PATIENT: _PATIENT_SCOPES,
    Role.PROXY: _PATIENT_SCOPES,
    Role.FACILITY_ADMIN: " ".join(
        f"user/{t}.cruds"
        for t in (
            "Organization",
            "Practitioner",
            "PractitionerRole",
            "Location",
            "HealthcareService",
            "Endpoint",
            "Schedule",
            "Slot",
        )
    ),
    Role.INSPECTOR: "user/Organization.rs user/Location.cruds user/Observation.cruds",
    Role.SERVICE: "system/*.cruds",
    Role.AUDITOR: "user/AuditEvent.rs user/Consent.rs user/Provenance.rs",
    Role.ADMIN: "system/*.cruds",
}

# The resource type an account's fhirUser must have; roles not listed may have any or none.
FHIR_USER_TYPES: dict[Role, str] = {
    Role.CLINICIAN: "Practitioner",
    Role.PATIENT: "Patient",
    Role.PROXY: "RelatedPerson",
}
# Roles whose accounts act without a human behind them; they may use client_credentials.
SERVICE_ROLES = frozenset({Role.SERVICE, Role.ADMIN})

_USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
_REFERENCE_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
_ORG_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# username -> monotonic time of its last change in this process. The token service
# compares it with when it last looked the account up, so disabling an account in this
# process takes effect at once instead of after the re-check interval.
_changed: dict[str, float] = {}
_changed_lock = threading.Lock()


class UserError(ValueError):
    """An account cannot be added or changed as asked (the message says why)."""


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    scopes: str
    fhir_user: str | None = None
    organizations: tuple[str, ...] = ()
    disabled: bool = False
    created: datetime | None = None
    password_hash: str | None = field(default=None, repr=False)

    @property
    def has_password(self) -> bool:
        return self.password_hash is not None

    @property
    def patient(self) -> str | None:
        """The SMART launch patient: the account's own Patient id for the patient role."""
        if self.role is Role.PATIENT and self.fhir_user:
            return self.fhir_user.split("/", 1)[1]
        return None


def validate(
    username: str, role: str | Role, fhir_user: str | None, organizations: Iterable[str], scopes: str | None
) -> tuple[Role, tuple[str, ...], str]:
    """Check an account's fields; return its role, organizations and (default) scopes."""
    if not _USERNAME_RE.match(username):
        raise UserError(
            f"Username {username!r} must be 1-200 letters, digits or . _ @ + - and start with a letter or digit"
        )
    try:
        role = Role(role)
    except ValueError:
        raise UserError(f"Unknown role {role!r}; one of {', '.join(r.value for r in Role)}") from None
    expected = FHIR_USER_TYPES.get(role)
    if fhir_user is not None:
        match = _REFERENCE_RE.match(fhir_user)
        if not match:
            raise UserError(f"fhirUser {fhir_user!r} must be a relative reference such as Practitioner/123")
        if expected and match.group(1) != expected:
            raise UserError(f"A {role.value} account's fhirUser must be a {expected}, not {match.group(1)}")
    elif expected:
        raise UserError(f"A {role.value} account needs a fhirUser {expected}/<id>")
    orgs = tuple(dict.fromkeys(o.removeprefix("Organization/") for o in organizations))
    for org in orgs:
        if not _ORG_ID_RE.match(org):
            raise UserError(f"Organization id {org!r} is not a FHIR id")
    scopes = " ".join((scopes or DEFAULT_SCOPES[role]).split())
    parsed = ScopeSet.parse(scopes)
    if not parsed.scopes:
        raise UserError(f"Scopes {scopes!r} grant no access to any resource type")
    return role, orgs, scopes


def add_user(
    engine: sa.Engine,
    username: str,
    role: str | Role,
    *,
    fhir_user: str | None = None,
    organizations: Iterable[str] = (),
    scopes: str | None = None,
    password: str | None = None,
) -> User:
    """Create an account; ``password=None`` makes a service account. Raises UserError."""
    role, orgs, scopes = validate(username, role, fhir_user, organizations, scopes)
    user = User(
        username=username,
        role=role,
        scopes=scopes,
        fhir_user=fhir_user,
        organizations=orgs,
        created=datetime.now(UTC),
        password_hash=hash_password(password) if password is not None else None,
    )
    row = {
        "username": user.username,
        "password_hash": user.password_hash,
        "role": user.role.value,
        "fhir_user": user.fhir_user,
        "organizations": list(user.organizations),
        "scopes": user.scopes,
        "disabled": False,
        "created": user.created,
    }
    with _write(engine) as conn:
        if conn.execute(sa.select(hub_user.c.username).where(hub_user.c.username == username)).first():
            raise UserError(f"User {username!r} already exists")
        try:
            conn.execute(hub_user.insert().values(**row))
        except sa.exc.IntegrityError:  # added concurrently since the check above
            raise UserError(f"User {username!r} already exists") from None
    _touch(username)
    return user


def get_user(engine: sa.Engine, username: str) -> User | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(hub_user).where(hub_user.c.username == username)).first()
    return _from_row(row) if row is not None else None


def list_users(engine: sa.Engine) -> list[User]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(hub_user).order_by(hub_user.c.username)).all()
    return [_from_row(row) for row in rows]


def disable_user(engine: sa.Engine, username: str, disabled: bool = True) -> None:
    """Disable (or with ``disabled=False`` re-enable) an account; its tokens stop working."""
    _update(engine, username, disabled=disabled)


def set_password(engine: sa.Engine, username: str, password: str | None) -> None:
    """Set a new password, or with None remove it (a service account again)."""
    _update(engine, username, password_hash=hash_password(password) if password is not None else None)


def authenticate(engine: sa.Engine, username: str, password: str) -> User | None:
    """The enabled account with this password, or None (unknown, wrong, disabled, no password).

    Every failure costs one Argon2 verification, so timing does not tell them apart.
    Slow (tens of ms): call it from a worker thread.
    """
    user = get_user(engine, username)
    if user is None or user.password_hash is None:
        burn_verification(password)
        return None
    if not verify_password(user.password_hash, password) or user.disabled:
        return None
    if needs_rehash(user.password_hash):
        set_password(engine, username, password)
    return user


def changed_since(username: str, moment: float) -> bool:
    """Whether this process changed the account after ``moment`` (time.monotonic())."""
    return _changed.get(username, float("-inf")) > moment


def _touch(username: str) -> None:
    with _changed_lock:
        _changed[username] = time.monotonic()


def _update(engine: sa.Engine, username: str, **values: object) -> None:
    with _write(engine) as conn:
        result = conn.execute(hub_user.update().where(hub_user.c.username == username).values(**values))
        if result.rowcount == 0:
            raise UserError(f"No user {username!r}")
    _touch(username)


@contextmanager
def _write(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A write transaction (BEGIN IMMEDIATE on SQLite, like the store's writes)."""
    with engine.connect().execution_options(write=True) as conn, conn.begin():
        yield conn


def _from_row(row: sa.Row) -> User:  # type: ignore[type-arg]
    return User(
        username=row.username,
        role=Role(row.role),
        scopes=row.scopes,
        fhir_user=row.fhir_user,
        organizations=tuple(row.organizations or ()),
        disabled=bool(row.disabled),
        created=row.created,
        password_hash=row.password_hash,
    )
