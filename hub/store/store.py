"""The store: versioned create, read, update and delete of FHIR resources.

Owns: the semantics of each write (version numbers, history, idempotent deletes, no-op
updates) and the transaction boundaries for callers that do not bring their own.
Every method takes the connection of an open transaction, so a Bundle transaction can run
many operations atomically.
Calls: records, reader, writer.  Called by: the REST router, bulk ingest, the CLI.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from consent import context as access
from hub.crypto.keys import bound as bound_keys
from hub.db.schema import compartment
from hub.errors import FhirError, conflict, gone, not_found, precondition_failed
from hub.search.registry import Registry
from hub.store import reader, writer
from hub.store.records import NewResource, StoredResource, finalize, now, same_content


def new_id() -> str:
    return str(uuid.uuid4())


class Store:
    def __init__(self, engine: sa.Engine, registry: Registry) -> None:
        self.engine = engine
        self.registry = registry

    # Both bind the database's keys (hub.crypto) for the code run inside: index extraction,
    # search predicates and decryption find them there. Bound before connecting: loading the
    # keys the first time may write, which must not queue behind our own transaction.
    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        with (
            bound_keys(self.engine),
            self.engine.connect().execution_options(write=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with bound_keys(self.engine), self.engine.connect() as conn, conn.begin():
            yield conn

    # --- reads --------------------------------------------------------------------------

    def get(self, conn: sa.Connection, res_type: str, res_id: str) -> StoredResource:
        row = reader.current_row(conn, res_type, res_id, visible_only=True)
        if row is None:
            raise not_found(f"{res_type}/{res_id} is not known")
        access.report([row.pid])
        stored = reader.to_stored(row)
        if stored.deleted:
            raise gone(f"{res_type}/{res_id} was deleted")
        return stored

    def get_version(self, conn: sa.Connection, res_type: str, res_id: str, version: int) -> StoredResource:
        row = reader.version_row(conn, res_type, res_id, version)
        if row is None:
            raise not_found(f"{res_type}/{res_id}/_history/{version} is not known")
        access.report([row.pid])
        stored = reader.to_stored(row)
        if stored.deleted:
            raise gone(f"{res_type}/{res_id}/_history/{version} is a deletion")
        return stored

    def history(
        self,
        conn: sa.Connection,
        *,
        res_type: str | None = None,
        res_id: str | None = None,
        since: datetime | None = None,
        count: int = 20,
        offset: int = 0,
    ) -> tuple[list[StoredResource], int]:
        if (
            res_id is not None
            and res_type is not None
            and reader.current_row(conn, res_type, res_id, visible_only=True) is None
        ):
            raise not_found(f"{res_type}/{res_id} is not known")
        return reader.history(conn, res_type=res_type, res_id=res_id, since=since, count=count, offset=offset)

    # --- writes -------------------------------------------------------------------------

    def create(
        self, conn: sa.Connection, resource: dict[str, Any], res_id: str | None = None
    ) -> StoredResource:
        """Create with a server id (or the given one, which the caller checked is free)."""
        return self.create_many(conn, [(resource, res_id)])[0]

    def create_many(
        self, conn: sa.Connection, resources: list[tuple[dict[str, Any], str | None]]
    ) -> list[StoredResource]:
        """Create several resources with one bulk insert (a transaction's POST entries)."""
        moment = now()
        items = []
        for index, (body, res_id) in enumerate(resources):
            try:
                access.before_write(body)
                item = finalize(self.registry, body, res_id or new_id(), 1, moment)
                access.authorize_write(conn, item.res_type, "c", None, item.index_rows)
                items.append(item)
            except FhirError as error:
                error.item_index = index
                raise
        pids = self.insert(conn, items)
        access.report(pids)
        return [_stored(item) for item in items]

    def insert(self, conn: sa.Connection, items: list[NewResource]) -> list[int]:
        try:
            with conn.begin_nested():
                return writer.insert_new(conn, items)
        except IntegrityError:
            raise conflict("A resource with that id was created concurrently") from None

    def update(
        self,
        conn: sa.Connection,
        res_type: str,
        res_id: str,
        resource: dict[str, Any],
        *,
        if_match: int | None = None,
        server_id: bool = False,
    ) -> tuple[StoredResource, bool]:
        """PUT semantics: a new version, or creation with the client's id. Returns (stored, created).

        Hidden is unknown: a principal that does not see every row may only change what it
        can see, and may not choose the id of a new resource; any other id answers 404 "not
        known", whether it exists or not (``server_id``: the server chose this id, as for a
        transaction's conditional PUT without a match, so creating it is allowed)."""
        row = reader.current_row(conn, res_type, res_id, for_update=True)
        if not access.unrestricted() and _unknown_to_caller(conn, row):
            if not server_id or row is not None:
                access.required().require(res_type, "u")
                raise not_found(f"{res_type}/{res_id} is not known")
            row = None
        if row is None:
            if if_match is not None:
                raise precondition_failed(
                    f"{res_type}/{res_id} does not exist, so version {if_match} cannot match"
                )
            return self.create(conn, resource, res_id), True
        if if_match is not None and row.version != if_match:
            raise precondition_failed(f"{res_type}/{res_id} is at version {row.version}, not {if_match}")
        current = reader.to_stored(row)
        access.authorize_write(conn, res_type, "u", row.pid, None)
        access.before_write(resource)
        if not current.deleted and current.content is not None and same_content(current.content, resource):
            return current, False
        item = finalize(self.registry, resource, res_id, row.version + 1, max(now(), current.last_updated))
        _keep_earlier_labels(conn, row.pid, item)
        access.authorize_write(conn, res_type, "u", None, item.index_rows)
        access.report([row.pid])
        if not writer.replace_current(
            conn, row.pid, row.version, item.version, item.last_updated, writer.stored_content(conn, item)
        ):
            raise conflict(f"{res_type}/{res_id} was changed concurrently; retry with its new version")
        writer.insert_index_rows(conn, [row.pid], [item])
        return _stored(item), current.deleted

    def delete(self, conn: sa.Connection, res_type: str, res_id: str) -> StoredResource | None:
        """Delete the current version; a resource already deleted or never known is fine.

        Hidden is unknown: for a principal that does not see every row, an id it cannot see
        answers 404 "not known", whether it exists or not."""
        row = reader.current_row(conn, res_type, res_id, for_update=True)
        if not access.unrestricted() and _unknown_to_caller(conn, row):
            access.required().require(res_type, "d")
            raise not_found(f"{res_type}/{res_id} is not known")
        if row is None or row.deleted:
            access.authorize_write(conn, res_type, "d", None, None)
            return None
        access.authorize_write(conn, res_type, "d", row.pid, None)
        access.report([row.pid])
        moment = max(now(), reader.to_stored(row).last_updated)
        if not writer.replace_current(conn, row.pid, row.version, row.version + 1, moment, None):
            raise conflict(f"{res_type}/{res_id} was changed concurrently")
        return StoredResource(res_type, res_id, row.version + 1, moment, True, None)


def _unknown_to_caller(conn: sa.Connection, row: sa.Row[Any] | None) -> bool:
    """Whether the current request must treat this row as if it did not exist."""
    return row is None or not access.required().may_see(conn, row.pid)


def _keep_earlier_labels(conn: sa.Connection, pid: int, item: NewResource) -> None:
    """A version's labels include every earlier version's, and its patients every earlier
    version's, so neither removing an HIV code nor moving the resource to another patient
    (or out of every compartment) makes the old versions readable through history."""
    earlier, patients = 0, dict[str, None]()
    for patient, mask in conn.execute(
        sa.select(compartment.c.patient_id, compartment.c.labels).where(compartment.c.pid == pid)
    ):
        earlier |= mask
        patients[patient] = None
    members = item.index_rows.get("compartment") or []
    if earlier:
        merged = earlier | (members[0][1] if members else 0)
        wanted = dict.fromkeys(patient for patient, _ in members) | patients
        item.index_rows["compartment"] = [(patient, merged) for patient in wanted]


def _stored(item: NewResource) -> StoredResource:
    return StoredResource(item.res_type, item.res_id, item.version, item.last_updated, False, item.content)
