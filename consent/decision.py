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
from typing import Any

import sqlalchemy as sa

from consent import labels
from consent.derive import ANY, ETREAT, HRESCH, PUBHLTH, TREAT
from hub.audit import APPEND_ONLY_TYPES
from hub.auth.principal import Principal, Role
from hub.auth.scopes import Scope
from hub.db.schema import (
    access_grant,
    break_glass,
    compartment,
    history_compartment,
    resource,
    resource_history,
)
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
    reason: str | None = None  # X-Access-Reason: why a privileged change is made (consent.governance)
    now: int = field(default_factory=lambda: int(time.time()))
    touched: list[int] = field(default_factory=list)  # pids of resources returned
    # Directory entries this request's writes were allowed to write, by (type, id): a
    # transaction creating a department and its roles together checks the roles against the
    # department before it is inserted (consent.governance, facility admins).
    directory_written: dict[tuple[str, str], dict[str, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _clauses: dict[tuple[object, ...], sa.ColumnElement[bool] | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def unrestricted(self) -> bool:
        return self.principal.role in UNRESTRICTED and self.context_patients is None

    def saw(self, pids: Iterable[int]) -> None:
        self.touched.extend(pids)

    # --- interaction level ----------------------------------------------------------------

    def require(self, res_type: str | None, permission: str) -> None:
        """403 unless role and scopes allow ``permission`` on the type (None: system level)."""
        role = self.principal.role
        if res_type is None:
            if not any(
                s.resource_type == "*" and permission in s.permissions for s in self.principal.scopes.scopes
            ):
                raise forbidden(f"Your access does not include system-level '{permission}' interactions")
            return
        if permission in "cud" and res_type in APPEND_ONLY_TYPES:  # the audit trail
            raise forbidden(f"{res_type} is append-only: the hub writes it, no one changes it")
        allowed = ROLE_TYPES[role]
        if allowed is not None and res_type not in allowed:
            raise forbidden(f"The {role.value} role has no access to {res_type}")
        if not self.principal.scopes.allows(res_type, permission):
            raise forbidden(f"Your token's scopes do not allow '{permission}' on {res_type}")

    # --- row level ------------------------------------------------------------------------

    def visible(self, table: sa.Table = resource) -> sa.ColumnElement[bool] | None:
        """The SQL condition a row of ``table`` (resource or resource_history) must meet;
        None when the principal sees every row. Built once per table and request (a search
        asks for it for its total and again for its page)."""
        key = (table, self.principal, self.purpose, self.policy, self.identities, self.own_patients,
               self.context_patients, self.break_glass_patients, self.now)  # fmt: skip
        if key not in self._clauses:
            types = self._types_clause(table)
            data = None if self.unrestricted else self._data_clause(table)
            parts = [p for p in (types, data) if p is not None]
            self._clauses[key] = None if not parts else parts[0] if len(parts) == 1 else sa.and_(*parts)
        return self._clauses[key]

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
        """The record condition of a row: over the current version's ``compartment`` rows,
        and for a ``resource_history`` row over that version's own rows
        (``history_compartment``, keyed by pid and version): each version is visible to
        those who may see that version (its patients, its labels), so a result moved to
        another patient is not the second patient's in its first version."""
        if table.name != resource_history.name:
            return self._records_clause(table, compartment, [compartment.c.pid == table.c.pid])
        past = history_compartment
        return self._records_clause(
            table, past, [past.c.pid == table.c.pid, past.c.version == table.c.version]
        )

    def _records_clause(
        self, table: sa.Table, c: sa.Table, keys: list[sa.ColumnElement[bool]]
    ) -> sa.ColumnElement[bool]:
        """Scalar subqueries over the row's compartment rows ``c`` (an index probe per row):

            (SELECT CASE WHEN count(*) = 0 THEN 1           -- in no patient's record
                         ELSE max(CASE WHEN <permitted> THEN 1 ELSE 0 END) END
             FROM compartment WHERE pid = <row>.pid) > 0

        A resource that belongs in a patient's record but names no patient the hub could
        resolve has one row with ``patient_id = NO_PATIENT`` (""): no own record, grant or
        break-glass ever names "", so only unrestricted roles see it.
        With patient/ scopes, a first probe tells outside (2), in a context patient's record
        (1) or not (0), and only rows in context are probed for ``<permitted>``.

        Written this way, not as ``NOT EXISTS(member) OR EXISTS(permitted member)``, because
        PostgreSQL may run such EXISTS arms as hashed subplans over the whole compartment
        table (every row's grants, deny checks included, for a page of 20), misjudges their
        size by orders of magnitude, and plans them slowly; a scalar subquery is always one
        probe per candidate row. ``> 0`` rather than ``= 1`` gives the planner a default
        estimate of a third of the rows instead of 0.5%, which keeps it from plans built
        for a handful of rows. ``compartment (pid, patient_id, labels)`` covers the probe
        (index-only). Resolving the principal's grants once per statement instead (issue 10:
        NORMAL rows looked up in uncorrelated permit/deny sets, hashed SubPlans) was measured
        and dropped: building the set costs O(patients open) per statement (20,000 policy
        grants: ~100 ms added to a 10-row search), and PostgreSQL charges the set's cost to
        every candidate row, which pushes clinician searches over ``jit_above_cost``."""
        if self.principal.role in NO_PATIENT_DATA:
            return ~sa.exists(sa.select(c.c.pid).where(*keys))

        def over_records(value: sa.ColumnElement[int], outside: int) -> sa.ScalarSelect[int]:
            verdict = sa.case((sa.func.count() == 0, outside), else_=value)
            return sa.select(verdict).where(*keys).scalar_subquery()

        permitted = sa.func.max(sa.case((self._member_permitted(c), 1), else_=0))
        if self.context_patients is None:
            return over_records(permitted, 1) > 0
        # patient/ scopes: only these patients' records, whatever else is granted.
        in_context = sa.func.max(sa.case((c.c.patient_id.in_(self.context_patients), 1), else_=0))
        if self.principal.role in UNRESTRICTED:
            return over_records(in_context, 1) > 0
        return sa.case({2: 1, 1: over_records(permitted, 1)}, value=over_records(in_context, 2), else_=0) > 0

    def _member_permitted(self, c: sa.Table = compartment) -> sa.ColumnElement[bool]:
        """Whether a compartment row ``c`` (one patient's record) is open to the principal."""
        alternatives: list[sa.ColumnElement[bool]] = []
        if self.own_patients:
            alternatives.append(c.c.patient_id.in_(self.own_patients))
        if self.identities:
            alternatives.append(self._granted(c))
        if self.break_glass_patients:
            alternatives.append(
                sa.and_(c.c.patient_id.in_(self.break_glass_patients), c.c.labels.op("&")(labels.AUDIT) == 0)
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

    def _granted(self, c: sa.Table = compartment) -> sa.ColumnElement[bool]:
        """A permit grant in force covers every label of the compartment row, and no deny
        grant in force touches any of them: one probe of the patient's grants, each scored
        deny 2, covering permit 1, other 0; the row is open when the highest score is 1."""
        grant = access_grant
        score = sa.case(
            (sa.and_(grant.c.effect == "deny", grant.c.labels.op("&")(c.c.labels) != 0), 2),
            (
                sa.and_(
                    grant.c.effect == "permit",
                    grant.c.basis.in_(self._bases()),
                    grant.c.labels.op("&")(c.c.labels) == c.c.labels,
                ),
                1,
            ),
            else_=0,
        )
        strongest = sa.select(sa.func.max(score)).where(
            grant.c.patient_id == c.c.patient_id, *self._in_force(grant)
        )
        # Nested in a CASE, SQLAlchemy would not correlate compartment by itself.
        return strongest.correlate_except(grant).scalar_subquery() == 1

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
        grant, deny = access_grant, access_grant.alias("deny_grant")
        denied = sa.exists().where(
            deny.c.patient_id == grant.c.patient_id,
            deny.c.effect == "deny",
            deny.c.labels.op("&")(labels.NORMAL) != 0,
            *self._in_force(deny),  # type: ignore[arg-type]
        )
        rows = conn.execute(
            sa.select(grant.c.patient_id)
            .where(
                grant.c.patient_id.in_(sorted(wanted)),
                grant.c.effect == "permit",
                grant.c.basis.in_(self._bases()),
                grant.c.labels.op("&")(labels.NORMAL) != 0,
                *self._in_force(grant),
                ~denied,  # a patient who denied this principal their record: no writing into it
            )
            .distinct()
        ).all()
        return wanted <= {r[0] for r in rows}


def _rebind(condition: sa.ColumnElement[bool], pid: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
    """Search conditions are written against ``resource.c.pid``; point them at ``pid``."""
    if pid is resource.c.pid:
        return condition
    from sqlalchemy.sql.visitors import replacement_traverse

    def replace(element: Any, **_: Any) -> Any:
        return pid if element is resource.c.pid else None

    return replacement_traverse(condition, {}, replace)


# --- making an Access for a request ---------------------------------------------------------


def identities_of(conn: sa.Connection, principal: Principal, now: int | None = None) -> tuple[str, ...]:
    """Grantee references a principal acts as: its fhirUser, its organizations, and the care
    teams it takes part in now (from the care teams' own grants, within their period)."""
    now = int(time.time()) if now is None else now
    found = [principal.fhir_user] if principal.fhir_user else []
    found += [f"Organization/{o}" for o in principal.organizations]
    if principal.fhir_user and principal.role == Role.CLINICIAN:
        # Only a CareTeam's own grants say who is on it: a Consent naming the clinician and
        # some CareTeam together, or a care team listing another team, does not make the
        # clinician a member of that team.
        found += care_teams_of(conn, principal.fhir_user, now)
    return tuple(dict.fromkeys(found))


def care_teams_of(conn: sa.Connection, fhir_user: str, now: int | None) -> list[str]:
    """``CareTeam/{id}`` of the teams a person is on, from the teams' own grants: at ``now``
    (within the team's period), or in any period when ``now`` is None."""
    in_period = (
        []
        if now is None
        else [
            sa.func.coalesce(access_grant.c.starts, 0) <= now,
            sa.func.coalesce(access_grant.c.ends, _FAR_FUTURE) >= now,
        ]
    )
    teams = conn.execute(
        sa.select(resource.c.res_id)
        .join(access_grant, access_grant.c.pid == resource.c.pid)
        .where(
            resource.c.res_type == "CareTeam",
            access_grant.c.basis == "policy",
            access_grant.c.grantee == fhir_user,
            *in_period,
        )
        .distinct()
    ).all()
    return [f"CareTeam/{r[0]}" for r in teams]


def proxied_patients(conn: sa.Connection, principal: Principal, now: int | None = None) -> tuple[str, ...]:
    """The patients a RelatedPerson represents now: active, within RelatedPerson.period."""
    if not principal.fhir_user:
        return ()
    now = int(time.time()) if now is None else now
    rows = conn.execute(
        sa.select(access_grant.c.patient_id)
        .where(
            access_grant.c.grantee == principal.fhir_user,
            access_grant.c.basis == "proxy",
            sa.func.coalesce(access_grant.c.starts, 0) <= now,
            sa.func.coalesce(access_grant.c.ends, _FAR_FUTURE) >= now,
        )
        .distinct()
    ).all()
    return tuple(r[0] for r in rows if r[0])


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
        access.identities = identities_of(conn, principal, access.now)
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
                (principal.patient,) if principal.patient else proxied_patients(conn, principal, access.now)
            )
        else:
            access.context_patients = (principal.patient,) if principal.patient else ()
    return access


def _patient_context_only(principal: Principal) -> bool:
    scopes = [s for s in principal.scopes.scopes if s.permissions & {"r", "s"}]
    return bool(scopes) and all(s.context == "patient" for s in scopes)
