"""The hub's own accounts: people and service accounts in the ``hub_user`` table.

Owns: adding, reading, listing, disabling accounts and setting their passwords; the
default scopes of each role; checking that an account's fhirUser fits its role; and the
administration of accounts by people (``manage_*``, ``visible_accounts``): who may list,
add, disable or change which account (hub admins all; a facility admin only their staff's:
clinician, facility-admin and inspector accounts of their own organizations, bound to their
own Practitioners; auditors read), each change or refused attempt audited as an AuditEvent
naming the actor.
Calls: passwords, principal, scopes, the schema, the audit trail (``AccessEvent``).
Called by: the token service and ``/auth/token`` (authenticate, re-check on verify), the
CLI (``hub users``, ``hub demo``), the operator console (``hub.web.views.console``), tests.

An account without a password is a service account: it gets tokens only from
``hub token`` run by an operator. One with a password may also log in at ``/auth/token``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

from hub.audit.events import AccessEvent
from hub.auth.passwords import burn_verification, hash_password, needs_rehash, verify_password
from hub.auth.principal import Principal, Role
from hub.auth.scopes import ScopeSet
from hub.db.schema import hub_user

if TYPE_CHECKING:  # for typing only: this low-level module stays free of the store
    from hub.audit.trail import AuditTrail

_T = TypeVar("_T")

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


# --- administration of accounts by people (the operator console) ---------------------------

# Roles whose accounts act beyond one facility (or are services): only a hub admin gives,
# changes or takes them.
HUB_ONLY_ROLES = frozenset({Role.ADMIN, Role.AUDITOR, Role.SERVICE})
# A facility admin may create accounts of these roles: their staff. Never patient or proxy
# accounts: bound to a citizen, with a password the admin chose, they would read that
# citizen's record. Changing an existing account's role, they may not make it a facility
# admin (that would raise its power: an escalation).
FACILITY_CREATABLE_ROLES = frozenset({Role.CLINICIAN, Role.FACILITY_ADMIN, Role.INSPECTOR})
FACILITY_ASSIGNABLE_ROLES = FACILITY_CREATABLE_ROLES - {Role.FACILITY_ADMIN}
# The organizations a Practitioner holds PractitionerRoles at (None: not known), read by the
# caller through the FHIR router as the actor: this module does not read FHIR data.
PractitionerOrganizations = Callable[[str], "set[str] | None"]
# Who reads the account list: the two administering roles, and auditors (read only).
ACCOUNT_READER_ROLES = frozenset({Role.ADMIN, Role.FACILITY_ADMIN, Role.AUDITOR})
AUDIT_PURPOSE = "HSYSADMIN"


class AccountForbidden(PermissionError):
    """The actor may not do this (to this account); the message says why, for the actor."""


def account_in_view(actor: Principal, user: User) -> bool:
    """Whether ``actor`` sees ``user`` in the account list: hub admins and auditors every
    account, a facility admin the accounts that act for one of their organizations."""
    if actor.role in (Role.ADMIN, Role.AUDITOR):
        return True
    if actor.role is Role.FACILITY_ADMIN:
        return bool(set(user.organizations) & set(actor.organizations))
    return False


def may_manage(actor: Principal, user: User) -> bool:
    """Whether ``actor`` may disable, enable or change ``user``: a hub admin any other
    account; a facility admin an account of a facility role whose organizations are all
    theirs (an account that also acts for another facility is that facility's business too).
    Nobody their own account: no lock-out, no self-promotion."""
    if user.username == actor.subject:
        return False
    if actor.role is Role.ADMIN:
        return True
    if actor.role is not Role.FACILITY_ADMIN or user.role in HUB_ONLY_ROLES:
        return False
    return bool(user.organizations) and set(user.organizations) <= set(actor.organizations)


def visible_accounts(
    engine: sa.Engine,
    actor: Principal,
    *,
    role: str | Role | None = None,
    organization: str | None = None,
    disabled: bool | None = None,
) -> list[User]:
    """The accounts ``actor`` may see, filtered by role, organization (an id the account acts
    for) and disabled flag. AccountForbidden for roles that read no accounts."""
    if actor.role not in ACCOUNT_READER_ROLES:
        raise AccountForbidden("Only hub admins, facility admins and auditors read the accounts")
    wanted_role = Role(role) if role else None
    organization = organization.removeprefix("Organization/") if organization else None
    return [
        user
        for user in list_users(engine)
        if account_in_view(actor, user)
        and (wanted_role is None or user.role is wanted_role)
        and (organization is None or organization in user.organizations)
        and (disabled is None or user.disabled is disabled)
    ]


def manage_add(
    engine: sa.Engine,
    actor: Principal,
    username: str,
    role: str | Role,
    *,
    fhir_user: str | None = None,
    organizations: Iterable[str] = (),
    password: str | None = None,
    trail: AuditTrail | None = None,
    client_address: str | None = None,
    practitioner_organizations: PractitionerOrganizations | None = None,
) -> User:
    """Add an account on ``actor``'s authority, with the checks of ``hub users add`` (a
    person needs a password; only integration-service accounts may have none) and the
    role's default scopes. A facility admin binds an account only to a Practitioner of their
    own organizations: every PractitionerRole it holds (at least one) is at one of them,
    as ``practitioner_organizations`` reads them (without it, no fhirUser at all). Raises
    AccountForbidden or UserError; audited either way."""
    orgs = tuple(organizations)
    detail = _detail(username, role=str(role), fhir_user=fhir_user, organizations=orgs)

    def work() -> User:
        if actor.role not in (Role.ADMIN, Role.FACILITY_ADMIN):
            raise AccountForbidden("Only hub admins and facility admins add accounts")
        checked_role, checked_orgs, _ = validate(username, role, fhir_user, orgs, None)
        if actor.role is Role.FACILITY_ADMIN:
            if checked_role not in FACILITY_CREATABLE_ROLES:
                raise AccountForbidden(f"A facility admin cannot create {checked_role.value} accounts")
            if not checked_orgs or not set(checked_orgs) <= set(actor.organizations):
                raise AccountForbidden("A facility admin adds accounts of their own organizations only")
            if fhir_user is not None:
                _own_practitioner(actor, fhir_user, practitioner_organizations)
        if not password and checked_role is not Role.SERVICE:
            raise UserError("A person's account needs a password")
        return add_user(
            engine,
            username,
            checked_role,
            fhir_user=fhir_user,
            organizations=checked_orgs,
            password=password or None,
        )

    return _audited(trail, actor, "users-add", "C", detail, client_address, work)


def manage_disable(
    engine: sa.Engine,
    actor: Principal,
    username: str,
    disabled: bool = True,
    *,
    trail: AuditTrail | None = None,
    client_address: str | None = None,
) -> User:
    """Disable (or enable) an account on ``actor``'s authority: its logins stop at once, and
    its tokens (and so its web sessions) at once in this process, within the token service's
    re-check interval in others. Raises AccountForbidden or UserError; audited either way."""
    operation = "users-disable" if disabled else "users-enable"

    def work() -> User:
        _manageable(engine, actor, username)
        disable_user(engine, username, disabled)
        return _existing(engine, username)

    return _audited(trail, actor, operation, "U", _detail(username), client_address, work)


def manage_change(
    engine: sa.Engine,
    actor: Principal,
    username: str,
    *,
    role: str | Role | None = None,
    organizations: Iterable[str] | None = None,
    fhir_user: str | None = None,
    trail: AuditTrail | None = None,
    client_address: str | None = None,
) -> User:
    """Change an account's role, organizations or fhirUser (None: unchanged) on ``actor``'s
    authority. A new role brings that role's default scopes. A facility admin may move an
    account between facility roles (never to facility-admin or a hub-only role) and among
    their own organizations, and may not change its fhirUser. Tokens issued for the old role
    stop working. Raises AccountForbidden or UserError; audited either way."""
    orgs = tuple(organizations) if organizations is not None else None
    detail = _detail(username, role=str(role) if role else None, fhir_user=fhir_user, organizations=orgs)

    def work() -> User:
        user = _manageable(engine, actor, username)
        new_role = Role(role) if role else user.role
        new_fhir_user = fhir_user if fhir_user is not None else user.fhir_user
        new_orgs = orgs if orgs is not None else user.organizations
        if actor.role is Role.FACILITY_ADMIN:
            if new_role is not user.role and new_role not in FACILITY_ASSIGNABLE_ROLES:
                raise AccountForbidden(f"A facility admin cannot make an account {new_role.value}")
            if new_fhir_user != user.fhir_user:
                raise AccountForbidden("Only a hub admin changes which person an account is")
            if not new_orgs or not set(new_orgs) <= set(actor.organizations):
                raise AccountForbidden("A facility admin assigns their own organizations only")
        scopes = user.scopes if new_role is user.role else None
        checked_role, checked_orgs, checked_scopes = validate(
            username, new_role, new_fhir_user, new_orgs, scopes
        )
        _update(
            engine,
            username,
            role=checked_role.value,
            organizations=list(checked_orgs),
            fhir_user=new_fhir_user,
            scopes=checked_scopes,
        )
        return _existing(engine, username)

    return _audited(trail, actor, "users-change", "U", detail, client_address, work)


def looks_like_username(username: str) -> bool:
    """Whether ``username`` could name an account (anything else is no account: answered
    without a query, and never a NUL for PostgreSQL's text)."""
    return _USERNAME_RE.match(username) is not None


def _existing(engine: sa.Engine, username: str) -> User:
    user = get_user(engine, username) if looks_like_username(username) else None
    if user is None:
        raise UserError(f"No user {username!r}")
    return user


def _own_practitioner(
    actor: Principal, fhir_user: str, practitioner_organizations: PractitionerOrganizations | None
) -> None:
    """A facility admin's account binds a Practitioner of their organizations only, so they
    cannot mint themselves another facility's doctor (and the grants naming that doctor)."""
    kind, _, practitioner = fhir_user.partition("/")
    held = (
        practitioner_organizations(practitioner)
        if practitioner_organizations and kind == "Practitioner"
        else None
    )
    if not held or not held <= set(actor.organizations):
        raise AccountForbidden(
            f"{fhir_user} is not a practitioner of your organizations (a PractitionerRole there, none elsewhere)"
        )


def _manageable(engine: sa.Engine, actor: Principal, username: str) -> User:
    if actor.role not in (Role.ADMIN, Role.FACILITY_ADMIN):
        raise AccountForbidden("Only hub admins and facility admins change accounts")
    user = _existing(engine, username)
    if not account_in_view(actor, user):
        # Out of the actor's view is the same answer as no such account: no oracle of which
        # accounts (citizens' portal accounts among them) exist.
        raise UserError(f"No user {username!r}")
    if user.username == actor.subject:
        raise AccountForbidden("Your own account is changed by another administrator")
    if not may_manage(actor, user):
        raise AccountForbidden(f"{username!r} is not an account you manage")
    return user


def _detail(username: str, **fields: str | tuple[str, ...] | None) -> str:
    """What the AuditEvent's query records: the account and the fields asked for (never a
    password)."""
    from urllib.parse import urlencode

    pairs: list[tuple[str, str]] = [("username", username)]
    for name, value in fields.items():
        if isinstance(value, tuple):
            pairs.extend((name, v) for v in value)
        elif value is not None:
            pairs.append((name, value))
    return urlencode(pairs)


def _audited(
    trail: AuditTrail | None,
    actor: Principal,
    operation: str,
    action: str,
    detail: str,
    client_address: str | None,
    work: Callable[[], _T],
) -> _T:
    """Run ``work`` and write one AuditEvent naming the actor, whatever the outcome (the
    status: 200, 403 refused, 400 invalid, 404 unknown, 500 failed), as the connectors'
    admin API does."""
    status = 500
    try:
        result = work()
        status = 200
        return result
    except AccountForbidden:
        status = 403
        raise
    except UserError as error:
        status = 404 if str(error).startswith("No user") else 400
        raise
    finally:
        if trail is not None:
            trail.record(
                [
                    AccessEvent(
                        principal=actor,
                        interaction="operation",
                        action=action,
                        operation=operation,
                        query=detail,
                        outcome_status=status,
                        purpose=AUDIT_PURPOSE,
                        client_address=client_address,
                    )
                ]
            )
