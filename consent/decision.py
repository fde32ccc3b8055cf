"""The one place where access is decided.

Owns: for one request, (1) whether the principal may attempt the interaction at all (role
ceiling and SMART scopes: 403 before any data is touched), and (2) which stored rows it
may see, as one SQL condition over ``resource`` (or ``resource_history``) that the store
and the search engine add to every statement they run: reads, searches, totals, includes,
chains, history, ``$everything``, ``$export`` and transaction entries alike. Filtering in
SQL is what keeps hidden resources out of totals and paging counts (HAPI #2020) and out
of ``_include``/``_revinclude``.

The row condition for a principal that is not unrestricted is:

    (resource type allowed by a scope [and its granular query])
    AND (
        not in any patient's compartment (directory data: Organization, Practitioner...)
        OR in the compartment of a patient the principal *is* (patient role: all labels)
        OR some compartment row c and permit grant g for c.patient_id match: grantee is
           one of the principal's identities, purpose matches, g covers every label of the
           resource, g is in its period, its basis is honoured by the policy, and no deny
           grant for that patient, grantee and purpose touches the resource's labels
        OR an open break-glass grant of this principal covers that patient
    )

The shipped policy ("moh") honours grants derived from the managing organization and
care teams (treatment, NORMAL data only); "consent-only" ignores them. Sensitive labels are
never in a policy grant, so they always need a consent that names them.
Calls: labels, derive (purposes), the search query parser (granular scopes).
Called by: the REST router (``Access`` per request), the store and search engine via
``consent.context``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

from consent import labels
from consent.derive import ANY, ETREAT, HRESCH, PUBHLTH, TREAT
from hub.auth.principal import Principal, Role
from hub.auth.scopes import Scope
from hub.db.schema import access_grant, break_glass, compartment, resource
from hub.errors import FhirError, Issue
from hub.search.registry import Registry

PATIENT_REQUEST, FAMILY_REQUEST, OPERATIONS = "PATRQT", "FAMRQT", "HOPERAT"
PURPOSES = frozenset({TREAT, ETREAT, HRESCH, PUBHLTH, PATIENT_REQUEST, FAMILY_REQUEST, OPERATIONS})
_FAR_FUTURE = 2**62

# What each role may ever touch, whatever its scopes say. None = any type.
_DIRECTORY = frozenset({
    "Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService",
    "Endpoint", "Schedule", "Slot",
})  # fmt: skip
ROLE_TYPES: dict[Role, frozenset[str] | None] = {
    Role.ADMIN: None,
    Role.SERVICE: None,
    Role.CLINICIAN: None,
    Role.PATIENT: None,
    Role.PROXY: None,
    Role.FACILITY_ADMIN: _DIRECTORY,
    Role.INSPECTOR: frozenset({"Organization", "Location", "Observation"}),
    Role.AUDITOR: frozenset({"AuditEvent", "Consent", "Provenance"}),
}
# Roles that see rows without a consent check (still audited, still limited by scopes).
UNRESTRICTED = frozenset({Role.ADMIN, Role.SERVICE, Role.AUDITOR})
# Roles that never see patient data, even with a wide scope.
NO_PATIENT_DATA = frozenset({Role.FACILITY_ADMIN, Role.INSPECTOR})
# Types no one may change over the API: the audit trail is append-only.
APPEND_ONLY = frozenset({"AuditEvent"})
# Which purposes of use a role may state (the first is its default).
ROLE_PURPOSES: dict[Role, tuple[str, ...]] = {
    Role.CLINICIAN: (TREAT, HRESCH, PUBHLTH),
    Role.PATIENT: (PATIENT_REQUEST,),
    Role.PROXY: (FAMILY_REQUEST,),
    Role.SERVICE: (OPERATIONS, PUBHLTH),
    Role.ADMIN: (OPERATIONS,),
    Role.AUDITOR: (OPERATIONS,),
    Role.FACILITY_ADMIN: (OPERATIONS,),
    Role.INSPECTOR: (PUBHLTH,),
}
# The SMART permission each interaction needs.
PERMISSION = {
    "read": "r", "vread": "r", "search-type": "s", "search-system": "s", "history-instance": "s",
    "history-type": "s", "history-system": "s", "create": "c", "update": "u", "delete": "d",
    "operation": "r",
}  # fmt: skip


def forbidden(message: str) -> FhirError:
    return FhirError(403, [Issue("forbidden", message)])


def unauthorized(message: str = "This request needs a bearer token") -> FhirError:
    return FhirError(401, [Issue("login", message)])


@dataclass
class Access:
    """What one request may see. Made by ``decide``; applied by the store and search."""

    principal: Principal
    purpose: str
    registry: Registry
    policy: str = "moh"
    identities: tuple[str, ...] = ()  # grantee references the principal acts as
    own_patients: tuple[str, ...] = ()  # patients whose whole record the principal sees
    context_patients: tuple[str, ...] | None = None  # patient/ scopes: only these records
    break_glass_patients: tuple[str, ...] = ()  # open break-glass grants of this principal
    now: int = field(default_factory=lambda: int(time.time()))
    touched: list[int] = field(default_factory=list)  # pids of resources returned

    @property
    def unrestricted(self) -> bool:
        return self.principal.role in UNRESTRICTED and self.context_patients is None

    def saw(self, pids: Iterable[int]) -> None:
        self.touched.extend(pids)

    # --- interaction level ----------------------------------------------------------------

    def readable_scopes(self, res_type: str) -> list[Scope]:
        allowed = ROLE_TYPES[self.principal.role]
        if allowed is not None and res_type not in allowed:
            return []
        scopes = self.principal.scopes
        return scopes.granting(res_type, "r") + scopes.granting(res_type, "s")

    def require(self, res_type: str | None, permission: str) -> None:
        """403 unless role and scopes allow ``permission`` on the type (None: system level)."""
        role = self.principal.role
        if res_type is None:
            if not any(
                s.resource_type == "*" and permission in s.permissions for s in self.principal.scopes.scopes
            ):
                raise forbidden(f"Your access does not include system-level '{permission}' interactions")
            return
        if permission in "cud" and res_type in APPEND_ONLY:
            raise forbidden(f"{res_type} is append-only: the hub writes it, no one changes it")
        allowed = ROLE_TYPES[role]
        if allowed is not None and res_type not in allowed:
            raise forbidden(f"The {role.value} role has no access to {res_type}")
        if not self.principal.scopes.allows(res_type, permission):
            raise forbidden(f"Your token's scopes do not allow '{permission}' on {res_type}")

    # --- row level ------------------------------------------------------------------------

    def visible(self, table: sa.Table = resource) -> sa.ColumnElement[bool] | None:
        """The SQL condition a row of ``table`` (resource or resource_history) must meet;
        None when the principal sees every row."""
        types = self._types_clause(table)
        data = None if self.unrestricted else self._data_clause(table)
        parts = [p for p in (types, data) if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else sa.and_(*parts)

    def _types_clause(self, table: sa.Table) -> sa.ColumnElement[bool] | None:
        scopes = [s for s in self.principal.scopes.scopes if s.permissions & {"r", "s"}]
        allowed = ROLE_TYPES[self.principal.role]
        wildcard = [s for s in scopes if s.resource_type == "*"]
        if allowed is None and any(not s.query for s in wildcard):
            return None
        alternatives: list[sa.ColumnElement[bool]] = []
        for scope in scopes:
            condition = self._scope_condition(table, scope)
            if scope.resource_type == "*":
                alternatives.append(condition if condition is not None else sa.true())
            else:
                alternatives.append(
                    table.c.res_type == scope.resource_type
                    if condition is None
                    else sa.and_(table.c.res_type == scope.resource_type, condition)
                )
        clause = sa.or_(*alternatives) if alternatives else sa.false()
        if allowed is not None:
            clause = sa.and_(table.c.res_type.in_(sorted(allowed)), clause)
        return clause

    def _scope_condition(self, table: sa.Table, scope: Scope) -> sa.ColumnElement[bool] | None:
        """A granular scope's query (``patient/Observation.rs?category=laboratory``) as SQL."""
        if not scope.query:
            return None
        from hub.search.query import parse  # the search layer imports this module's users

        if scope.resource_type == "*":
            raise forbidden("Granular scopes must name a resource type")
        query = parse(self.registry, scope.resource_type, list(scope.query), base_url="")
        pid_column = table.c.pid
        return sa.and_(*(_rebind(c, pid_column) for c in query.conditions))

    def _data_clause(self, table: sa.Table) -> sa.ColumnElement[bool]:
        pid = table.c.pid
        member = sa.select(compartment.c.pid).where(compartment.c.pid == pid)
        if self.principal.role in NO_PATIENT_DATA:
            return ~sa.exists(member)
        outside_records = ~sa.exists(member)
        if self.context_patients is not None:
            # patient/ scopes: only these patients' records, whatever else is granted.
            in_context = sa.exists(member.where(compartment.c.patient_id.in_(self.context_patients)))
            if self.principal.role in UNRESTRICTED:
                return sa.or_(outside_records, in_context)
            return sa.or_(outside_records, sa.and_(in_context, self._records_clause(pid)))
        return sa.or_(outside_records, self._records_clause(pid))

    def _records_clause(self, pid: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
        alternatives: list[sa.ColumnElement[bool]] = []
        if self.own_patients:
            alternatives.append(
                sa.exists().where(compartment.c.pid == pid, compartment.c.patient_id.in_(self.own_patients))
            )
        if self.identities:
            alternatives.append(self._granted(pid))
        if self.break_glass_patients:
            alternatives.append(
                sa.exists().where(
                    compartment.c.pid == pid,
                    compartment.c.patient_id.in_(self.break_glass_patients),
                    compartment.c.labels.op("&")(labels.AUDIT) == 0,
                )
            )
        return sa.or_(*alternatives) if alternatives else sa.false()

    def _bases(self) -> list[str]:
        return ["consent", "proxy", "policy"] if self.policy == "moh" else ["consent", "proxy"]

    def _in_force(self, grant: sa.Table | sa.Alias) -> list[sa.ColumnElement[bool]]:
        return [
            grant.c.grantee.in_([*self.identities, ANY]),
            grant.c.purpose.in_([self.purpose, ANY]),
            sa.func.coalesce(grant.c.starts, 0) <= self.now,
            sa.func.coalesce(grant.c.ends, _FAR_FUTURE) >= self.now,
        ]

    def _granted(self, pid: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
        permit, deny = access_grant.alias("permit_grant"), access_grant.alias("deny_grant")
        denied = sa.exists().where(
            deny.c.patient_id == compartment.c.patient_id,
            deny.c.effect == "deny",
            deny.c.labels.op("&")(compartment.c.labels) != 0,
            *self._in_force(deny),
        )
        return sa.exists().where(
            compartment.c.pid == pid,
            permit.c.patient_id == compartment.c.patient_id,
            permit.c.effect == "permit",
            permit.c.basis.in_(self._bases()),
            permit.c.labels.op("&")(compartment.c.labels) == compartment.c.labels,
            *self._in_force(permit),
            ~denied,
        )

    # --- checks on single rows (writes) ---------------------------------------------------

    def may_see(self, conn: sa.Connection, pid: int) -> bool:
        clause = self.visible()
        if clause is None:
            return True
        return (
            conn.execute(sa.select(resource.c.pid).where(resource.c.pid == pid, clause)).first() is not None
        )

    def may_write_for(self, conn: sa.Connection, patients: Iterable[str]) -> bool:
        """A write that puts data into these patients' records is allowed when the principal
        could read NORMAL data of each of them (sensitive data may be written for a patient
        whose normal record one treats: writing does not disclose)."""
        wanted = set(patients)
        if self.unrestricted or not wanted:
            return True
        if self.principal.role in NO_PATIENT_DATA:
            return False
        if self.context_patients is not None and not wanted <= set(self.context_patients):
            return False
        wanted -= set(self.own_patients) | set(self.break_glass_patients)
        if not wanted or not self.identities:
            return not wanted
        grant = access_grant
        rows = conn.execute(
            sa.select(grant.c.patient_id)
            .where(
                grant.c.patient_id.in_(sorted(wanted)),
                grant.c.effect == "permit",
                grant.c.basis.in_(self._bases()),
                grant.c.labels.op("&")(labels.NORMAL) != 0,
                *self._in_force(grant),
            )
            .distinct()
        ).all()
        return wanted <= {r[0] for r in rows}


def _rebind(condition: sa.ColumnElement[bool], pid: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Search conditions are written against ``resource.c.pid``; point them at ``pid``."""
    if pid is resource.c.pid:
        return condition
    from sqlalchemy.sql.visitors import replacement_traverse

    return replacement_traverse(condition, {}, lambda e: pid if e is resource.c.pid else None)  # type: ignore[no-any-return]


# --- making an Access for a request ---------------------------------------------------------


def identities_of(conn: sa.Connection, principal: Principal) -> tuple[str, ...]:
    """Grantee references a principal acts as: its fhirUser, its organizations, and the care
    teams it takes part in (from the care teams' own grants)."""
    found = [principal.fhir_user] if principal.fhir_user else []
    found += [f"Organization/{o}" for o in principal.organizations]
    if principal.fhir_user and principal.role == Role.CLINICIAN:
        teams = conn.execute(
            sa.select(access_grant.c.grantee)
            .where(
                access_grant.c.grantee.like("CareTeam/%"),
                access_grant.c.pid.in_(
                    sa.select(access_grant.c.pid).where(access_grant.c.grantee == principal.fhir_user)
                ),
            )
            .distinct()
        ).all()
        found += [r[0] for r in teams]
    return tuple(dict.fromkeys(found))


def proxied_patients(conn: sa.Connection, principal: Principal) -> tuple[str, ...]:
    if not principal.fhir_user:
        return ()
    rows = conn.execute(
        sa.select(access_grant.c.patient_id)
        .where(access_grant.c.grantee == principal.fhir_user, access_grant.c.basis == "proxy")
        .distinct()
    ).all()
    return tuple(r[0] for r in rows)


def open_break_glass(conn: sa.Connection, principal: Principal, now: int) -> tuple[str, ...]:
    if principal.role != Role.CLINICIAN or not principal.fhir_user:
        return ()
    from datetime import UTC, datetime

    moment = datetime.fromtimestamp(now, UTC)
    rows = conn.execute(
        sa.select(break_glass.c.patient_id)
        .where(break_glass.c.fhir_user == principal.fhir_user, break_glass.c.expires > moment)
        .distinct()
    ).all()
    return tuple(r[0] for r in rows)


def purpose_for(principal: Principal, stated: str | None) -> str:
    allowed = ROLE_PURPOSES[principal.role]
    if stated is None:
        return allowed[0]
    if stated not in allowed:
        raise forbidden(
            f"Purpose of use '{stated}' is not open to the {principal.role.value} role"
            f" (allowed: {', '.join(allowed)}; emergencies use break-glass)"
        )
    return stated


def decide(
    conn: sa.Connection, principal: Principal, registry: Registry, *, purpose: str | None, policy: str
) -> Access:
    """The Access of one request. Reads the grants that make up the principal's identities."""
    access = Access(principal, purpose_for(principal, purpose), registry, policy=policy)
    role = principal.role
    if role == Role.CLINICIAN:
        access.identities = identities_of(conn, principal)
        access.break_glass_patients = open_break_glass(conn, principal, access.now)
    elif role == Role.PATIENT and principal.fhir_user_type == "Patient":
        access.own_patients = (principal.fhir_user_id or "",)
    elif role == Role.PROXY and principal.fhir_user:
        access.identities = (principal.fhir_user,)
    if _patient_context_only(principal):
        if role == Role.PATIENT:
            access.context_patients = access.own_patients
        elif role == Role.PROXY:
            access.context_patients = (
                (principal.patient,) if principal.patient else proxied_patients(conn, principal)
            )
        else:
            access.context_patients = (principal.patient,) if principal.patient else ()
    return access


def _patient_context_only(principal: Principal) -> bool:
    scopes = [s for s in principal.scopes.scopes if s.permissions & {"r", "s"}]
    return bool(scopes) and all(s.context == "patient" for s in scopes)
