"""The Access of the request being served, where the store and search engine find it.

Owns: a context variable holding the current ``Access`` and the helpers that read it.
The router sets it around each request (``serving``); every read statement over
``resource`` or ``resource_history`` adds ``visible_clause`` and reports what it returned
with ``report``; every write goes through ``before_write``/``authorize_write``.
Fail closed: with no Access set, each of them raises (a 500 OperationOutcome at the edge,
a programming error) instead of reading or writing unfiltered. Work that is not a
request (CLI import, reindex, demo loading, key rotation, tests) runs inside
``system_access(reason)``: an explicit, named, unrestricted Access whose principal is
``system:<reason>`` (role hub-admin); the CLI audits each such command.
Calls: consent.decision (Access), consent.governance (Consent writes; facility admins'
directory writes, on the version replaced and the one written), hub.auth.principal,
the search registry.
Called by: the router, the store, the search engine, the operations, the CLI, bulk import,
$export jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import sqlalchemy as sa

from hub.errors import FhirError, Issue

if TYPE_CHECKING:
    from consent.decision import Access

_current: ContextVar[Access | None] = ContextVar("hub_access", default=None)


SYSTEM_PREFIX = "system:"


def current() -> Access | None:
    return _current.get()


def missing_access() -> FhirError:
    return FhirError(
        500,
        [
            Issue(
                "exception",
                "Internal error: data was accessed outside any request or system access (fail closed)",
            )
        ],
    )


def required() -> Access:
    """The current Access; an error (500) when none is set: nothing reads unfiltered by default."""
    access = _current.get()
    if access is None:
        raise missing_access()
    return access


def system_access_for(reason: str) -> Access:
    """An unrestricted Access for the hub's own work, named after why it runs."""
    from consent.decision import OPERATIONS, Access
    from hub.auth.principal import system_principal
    from hub.search.registry import get_registry

    if not reason.strip():
        raise ValueError("A system access needs a reason")
    return Access(system_principal(f"{SYSTEM_PREFIX}{reason}"), OPERATIONS, get_registry())


@contextmanager
def system_access(reason: str) -> Iterator[Access]:
    """Run the enclosed work with an explicit, named, unrestricted access (admin CLI
    commands, reindex, bulk import, tests). Callers that touch citizens' data audit it."""
    with serving(system_access_for(reason)) as access:
        assert access is not None
        yield access


@contextmanager
def serving(access: Access | None) -> Iterator[Access | None]:
    token = _current.set(access)
    try:
        yield access
    finally:
        _current.reset(token)


def detached() -> Access:
    """A copy of the current Access for work that outlives the request (an $export job):
    same rights, its own record of what it disclosed."""
    from dataclasses import replace

    return replace(required(), touched=[])


def visible_clause(table: sa.Table) -> sa.ColumnElement[bool] | None:
    """The condition rows of ``table`` must meet for the current request (None: all, which
    only an unrestricted Access gives). Raises when no Access is set."""
    return required().visible(table)


def report(pids: Iterable[int]) -> None:
    """Record that these resources were disclosed (the audit trail names their patients)."""
    required().saw(pids)


def required_unrestricted(what: str) -> Access:
    """The current Access, which must see every row (``system_access``): for the hub's own
    bulk work (import, reindex). An error otherwise: such work never runs unfiltered by default."""
    access = required()
    if not access.unrestricted:
        raise FhirError(500, [Issue("exception", f"{what} needs a system access (fail closed)")])
    return access


def unrestricted() -> bool:
    """Whether the current Access sees every row (and may choose ids for new resources)."""
    return required().unrestricted


# --- writes ---------------------------------------------------------------------------------

EVIDENCE_EXTENSION = "https://ehealth-hub.vn/fhir/StructureDefinition/consent-evidence-method"


def before_write(body: dict[str, object]) -> None:
    """Stamp what a write must carry: a Consent a patient (or their proxy) gives through the
    hub records when and how it was given. Staff recording a consent given elsewhere (a
    signed form) carry its own dateTime and sourceAttachment; their content is not touched."""
    access = required()
    res_type = body.get("resourceType")
    if isinstance(res_type, str) and res_type != "Consent":
        if access.principal.role.value not in ("facility-admin", "clinician"):  # the common case
            return
        from consent import governance

        if governance.restricts_directory(access, res_type):
            # Checked by authorize_write once conditional references are resolved (as a Consent).
            _pending_directory.set((access, body))
        return
    if res_type != "Consent":
        return
    # Validated and checked by authorize_write once conditional references are resolved and
    # the id stamped (consent.governance).
    _pending.set((access, body))
    if access.principal.role.value not in ("patient", "proxy"):
        return
    from datetime import UTC, datetime

    body.setdefault("dateTime", datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))
    extensions = body.setdefault("extension", [])
    if isinstance(extensions, list) and not any(
        isinstance(e, dict) and e.get("url") == EVIDENCE_EXTENSION for e in extensions
    ):
        extensions.append({"url": EVIDENCE_EXTENSION, "valueCode": "electronic"})


def authorize_write(
    conn: sa.Connection,
    res_type: str,
    permission: str,
    existing_pid: int | None,
    new_rows: dict[str, list[tuple[object, ...]]] | None,
) -> None:
    """403 unless the current request may change this resource: its scopes allow the
    interaction, it may see the version it replaces, and it may write into the records of
    the patients the new version belongs to."""
    access = required()
    from consent.decision import forbidden

    access.require(res_type, permission)
    if existing_pid is not None and not access.may_see(conn, existing_pid):
        raise forbidden(f"You may not change this {res_type}")
    if new_rows is not None:
        patients = [str(row[0]) for row in new_rows.get("compartment", ())]
        if not access.may_write_for(conn, patients):
            raise forbidden(f"You may not write a {res_type} into the record of a patient you cannot access")
    if res_type == "Consent":
        _govern(conn, access, permission, existing_pid, new_rows is not None)
    else:
        _govern_directory(conn, access, res_type, existing_pid, new_rows is not None)


def _govern_directory(
    conn: sa.Connection, access: Access, res_type: str, existing_pid: int | None, new: bool
) -> None:
    """consent.governance's rule for facility admins and clinicians: their own facilities'
    directory only, checked on the version changed or deleted and on the version written."""
    if access.principal.role.value not in ("facility-admin", "clinician"):
        return
    from consent import governance

    if not governance.restricts_directory(access, res_type):
        return
    if existing_pid is not None:
        governance.check_directory_stored(conn, access, res_type, existing_pid)
    if not new:
        return
    pending = _pending_directory.get()
    _pending_directory.set(None)
    if pending is None or pending[0] is not access or pending[1].get("resourceType") != res_type:
        raise FhirError(
            500, [Issue("exception", f"A {res_type} reached the store without its directory check")]
        )
    governance.check_directory_new(conn, access, res_type, pending[1])


# A Consent write passes here twice or three times: (update: authorize_write with the
# version replaced,) before_write with the new body, authorize_write with its index rows.
# These remember the first steps for the last, tagged with the Access of the request.
_pending: ContextVar[tuple[object, dict[str, object]] | None] = ContextVar("hub_consent_body", default=None)
_replacing: ContextVar[tuple[object, int] | None] = ContextVar("hub_consent_replaced", default=None)
# A facility admin's or clinician's directory write: its body, from before_write to its authorize_write.
_pending_directory: ContextVar[tuple[object, dict[str, object]] | None] = ContextVar(
    "hub_directory_body", default=None
)


def _govern(
    conn: sa.Connection, access: Access, permission: str, existing_pid: int | None, new: bool
) -> None:
    """consent.governance's rules for who may write, change or delete which Consent."""
    from consent import governance

    if permission == "d":
        if existing_pid is not None:
            governance.check_delete(conn, access, existing_pid)
        return
    if existing_pid is not None:  # an update: its new version comes next
        _replacing.set((access, existing_pid))
        return
    if not new:
        return
    pending, replacing = _pending.get(), _replacing.get()
    _pending.set(None)
    _replacing.set(None)
    if pending is None or pending[0] is not access:
        raise FhirError(500, [Issue("exception", "A Consent reached the store without its governance check")])
    replaced = (
        replacing[1] if permission == "u" and replacing is not None and replacing[0] is access else None
    )
    governance.check_write(conn, access, dict(pending[1]), replaced)
