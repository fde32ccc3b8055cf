"""The Access of the request being served, where the store and search engine find it.

Owns: a context variable holding the current ``Access`` and the helpers that read it.
The router sets it around each request (``serving``); every read statement over
``resource`` or ``resource_history`` adds ``visible_clause`` and reports what it returned
with ``report``. Outside a request (CLI, bulk import, migrations) no Access is set and
the hub itself is reading: nothing is filtered.
Calls: nothing.  Called by: the router, the store, the search engine, the operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from consent.decision import Access

_current: ContextVar[Access | None] = ContextVar("hub_access", default=None)


def current() -> Access | None:
    return _current.get()


@contextmanager
def serving(access: Access | None) -> Iterator[Access | None]:
    token = _current.set(access)
    try:
        yield access
    finally:
        _current.reset(token)


def detached() -> Access | None:
    """A copy of the current Access for work that outlives the request (an $export job):
    same rights, its own record of what it disclosed."""
    from dataclasses import replace

    access = _current.get()
    return None if access is None else replace(access, touched=[])


def visible_clause(table: sa.Table) -> sa.ColumnElement[bool] | None:
    """The condition rows of ``table`` must meet for the current request (None: all)."""
    access = _current.get()
    return None if access is None else access.visible(table)


def restrict(statement: sa.Select, table: sa.Table) -> sa.Select:  # type: ignore[type-arg]
    clause = visible_clause(table)
    return statement if clause is None else statement.where(clause)


def report(pids: Iterable[int]) -> None:
    """Record that these resources were disclosed (the audit trail names their patients)."""
    access = _current.get()
    if access is not None:
        access.saw(pids)


# --- writes ---------------------------------------------------------------------------------

EVIDENCE_EXTENSION = "https://ehealth-hub.vn/fhir/StructureDefinition/consent-evidence-method"


def before_write(body: dict[str, object]) -> None:
    """Stamp what a write must carry: a Consent a patient (or their proxy) gives through the
    hub records when and how it was given. Staff recording a consent given elsewhere (a
    signed form) carry its own dateTime and sourceAttachment; their content is not touched."""
    access = _current.get()
    if body.get("resourceType") != "Consent" or access is None:
        return
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
    access = _current.get()
    if access is None:
        return
    from consent.decision import forbidden

    access.require(res_type, permission)
    if existing_pid is not None and not access.may_see(conn, existing_pid):
        raise forbidden(f"You may not change this {res_type}")
    if new_rows is not None:
        patients = [str(row[0]) for row in new_rows.get("compartment", ())]
        if not access.may_write_for(conn, patients):
            raise forbidden(f"You may not write a {res_type} into the record of a patient you cannot access")
