"""The store: versioned create, read, update and delete of FHIR resources.

Owns: the semantics of each write (version numbers, history, idempotent deletes, no-op
updates; ``update_many`` for many PUTs at once) and the transaction boundaries for callers that do not bring their own; resolving
at write time what decides whose record a version belongs to (conditional references
``Type?query`` outside a transaction are rewritten to ``Type/id`` as transactions do;
identifier references and own-base URLs via ``hub.ops.compartment.resolve``), and refusing
(422) a restricted writer's resource of a patient-compartment type that names no patient
the hub knows (it could not read it back). Membership follows the current version; earlier
versions keep theirs in ``history_compartment`` (the writer).
Every method takes the connection of an open transaction, so a Bundle transaction can run
many operations atomically. ``read`` is for reading only: on PostgreSQL it runs in
autocommit (no BEGIN/COMMIT round trips; READ COMMITTED gives each statement its own
snapshot either way). ``shared_read`` opens one read that every ``read`` inside it (in the
same thread/context) joins: a read request's admission and interaction then cost one
connection checkout instead of one each.
Calls: records, reader, writer, ``hub.ops.compartment``, the search engine (conditional
references), ``consent.context`` (every write is authorized before it is made),
``hub.crypto`` (the keyring and the policy of what is sealed at rest).
Called by: the REST router, bulk ingest, the CLI.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from consent import context as access
from hub.crypto.keys import Keyring, keyring_for
from hub.crypto.keys import current as current_keyring
from hub.crypto.keys import using as using_keys
from hub.crypto.policy import needs_sealing
from hub.errors import FhirError, Issue, conflict, gone, not_found, precondition_failed, unprocessable
from hub.ops import compartment
from hub.search.registry import Registry
from hub.store import reader, writer
from hub.store.records import NewResource, StoredResource, finalize, now, same_content
from hub.store.references import rewrite

# The read transaction opened by ``Store.shared_read`` in this context, with its engine.
_shared_read: ContextVar[tuple[sa.Engine, sa.Connection] | None] = ContextVar("hub_shared_read", default=None)


def new_id() -> str:
    return str(uuid.uuid4())


class Store:
    def __init__(
        self,
        engine: sa.Engine,
        registry: Registry,
        base_url: str | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        # The database's keys (hub.crypto.keys.configure, by the app factory or the CLI);
        # None: the keyring configured for this engine's database, looked up at first use.
        self.keyring = keyring
        # This hub's FHIR base: absolute references under it are local (compartment rules).
        self.base_url = base_url.rstrip("/") if base_url else None
        # PostgreSQL reads run without BEGIN and COMMIT: under READ COMMITTED each statement
        # takes its own snapshot inside a transaction too, so a read-only transaction only
        # adds two round trips. (SQLite's BEGIN is local and holds one snapshot: kept.)
        self._autocommit_reads = engine.dialect.name == "postgresql"

    # Both bind the database's keys (hub.crypto) for the code run inside: index extraction,
    # search predicates and decryption find them there. Bound before connecting: loading the
    # keys the first time may write, which must not queue behind our own transaction.
    def keys(self) -> Keyring:
        """The database's keyring, loaded."""
        return (self.keyring or keyring_for(self.engine)).ensure_loaded()

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        with (
            using_keys(self.keys()),
            self.engine.connect().execution_options(write=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read transaction: its own, or the ``shared_read`` open in this context (which
        it neither commits nor closes)."""
        shared = _shared_read.get()
        if shared is not None and shared[0] is self.engine:
            yield shared[1]
            return
        with using_keys(self.keys()), self.engine.connect() as conn:
            if self._autocommit_reads:
                conn.execution_options(isolation_level="AUTOCOMMIT")
            with conn.begin():
                yield conn

    @contextmanager
    def shared_read(self) -> Iterator[sa.Connection]:
        """One read transaction that every ``read`` in this context joins until it ends.

        For the reads of one request (the router: admission, then read, search or history),
        which otherwise check out a connection and begin and commit a transaction each:
        round trips to the database that cost more than the statements themselves. Not for
        code that writes and then reads what it wrote (SQLite keeps the read snapshot of the
        transaction's first statement); writes still open their own transaction."""
        with self.read() as conn:
            token = _shared_read.set((self.engine, conn))
            try:
                yield conn
            finally:
                _shared_read.reset(token)

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
        """Versions the request may see, each by its own compartment rows (see
        ``reader.version_row``); an instance none of whose versions is visible is unknown."""
        found = reader.history(
            conn, res_type=res_type, res_id=res_id, since=since, count=count, offset=offset
        )
        if (
            res_id is not None
            and res_type is not None
            and found[1] == 0
            and reader.current_row(conn, res_type, res_id, visible_only=True) is None
        ):
            raise not_found(f"{res_type}/{res_id} is not known")
        return found

    # --- writes -------------------------------------------------------------------------

    def create(
        self, conn: sa.Connection, resource: dict[str, Any], res_id: str | None = None
    ) -> StoredResource:
        """Create with a server id (or the given one, which the caller checked is free)."""
        return self.create_many(conn, [(resource, res_id)])[0]

    def create_many(
        self, conn: sa.Connection, resources: Sequence[tuple[dict[str, Any], str | None]]
    ) -> list[StoredResource]:
        """Create several resources with one bulk insert (a transaction's POST entries)."""
        moment = now()
        items = []
        for index, (body, res_id) in enumerate(resources):
            try:
                access.before_write(body)
                self._resolve_conditional(conn, body)
                item = finalize(self.registry, body, res_id or new_id(), 1, moment)
                item = self._resolve_members(conn, item)
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
        self._resolve_conditional(conn, resource)
        if not current.deleted and current.content is not None and same_content(current.content, resource):
            return current, False
        item = finalize(self.registry, resource, res_id, row.version + 1, max(now(), current.last_updated))
        item = self._resolve_members(conn, item)
        access.authorize_write(conn, res_type, "u", None, item.index_rows)
        access.report([row.pid])
        if not writer.replace_current(
            conn, row.pid, row.version, item.version, item.last_updated, writer.stored_content(conn, item)
        ):
            raise conflict(f"{res_type}/{res_id} was changed concurrently; retry with its new version")
        writer.insert_index_rows(conn, [row.pid], [item])
        return _stored(item), current.deleted

    def update_many(
        self, conn: sa.Connection, puts: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> list[StoredResource | None]:
        """``update`` of several existing resources (type, id, body) at once, for a caller
        that sees every row: each one's new version (or, when its content would not change,
        its current one, written nothing: ``update``'s no-op), or None where that PUT must
        take ``update`` itself (the resource is absent or deleted, a check refuses it, a
        Consent). The current rows are read and locked with one statement and the new
        versions written together (``writer.replace_many``): a connector's re-sent QĐ 130
        file, or one whose episodes changed, costs a few statements instead of a dozen per
        resource."""
        found: list[StoredResource | None] = [None] * len(puts)
        if not puts or not access.unrestricted():
            return found
        rows = reader.current_rows(conn, [(t, i) for t, i, _ in puts], for_update=True)
        moment = now()
        changed: list[tuple[int, int, NewResource]] = []  # (position, pid, new version)
        for position, (res_type, res_id, body) in enumerate(puts):
            row = rows.get((res_type, res_id))
            if row is None or row.deleted or res_type == "Consent":
                continue
            current = reader.to_stored(row)
            try:
                access.authorize_write(conn, res_type, "u", row.pid, None)
                access.before_write(body)
                self._resolve_conditional(conn, body)
                if current.content is not None and same_content(current.content, body):
                    found[position] = current
                    continue
                item = finalize(
                    self.registry, body, res_id, row.version + 1, max(moment, current.last_updated)
                )
                item = self._resolve_members(conn, item)
                access.authorize_write(conn, res_type, "u", None, item.index_rows)
            except FhirError:
                continue  # refused: ``update`` refuses it again, for its own entry
            changed.append((position, row.pid, item))
        if changed:
            writer.replace_many(conn, [(pid, item) for _, pid, item in changed])
            access.report([pid for _, pid, _ in changed])
            for position, _, item in changed:
                found[position] = _stored(item)
        return found

    def _resolve_conditional(self, conn: sa.Connection, body: dict[str, Any]) -> None:
        """Rewrite conditional references (``Patient?identifier=sys|val``) to ``Type/id``, as a
        transaction does: exactly one match (among what the request may see), else 412."""

        def resolve(reference: str) -> str | None:
            head, _, query = reference.partition("?")
            if not query or "/" in head or not head[:1].isupper():
                return None
            from urllib.parse import parse_qsl

            from hub.search import engine as search_engine  # the engine imports the store's users

            found = search_engine.find_ids(conn, self.registry, head, parse_qsl(query), self.base_url or "")
            if len(found) != 1:
                raise precondition_failed(
                    f"Conditional reference '{reference}' matches {'no' if not found else 'more than one'} resource"
                )
            return f"{head}/{found[0]}"

        rewrite(body, resolve)

    def _resolve_members(self, conn: sa.Connection, item: NewResource) -> NewResource:
        """Final compartment rows of a new version (identifier and own-base references looked
        up now); a restricted writer may not store one that belongs to no known patient. A
        version that resolution made sensitive (a Binary of an HIV result) is sealed."""
        compartment.resolve(conn, item.index_rows, self.base_url)
        ring = current_keyring()
        if (
            not item.encrypt
            and ring is not None
            and ring.encrypt
            and needs_sealing(item.res_type, item.content, {}, item.index_rows)
        ):
            item = replace(item, encrypt=True)
        current = access.current()
        if current is not None and not current.unrestricted and compartment.has_no_patient(item.index_rows):
            raise unprocessable(
                [
                    Issue(
                        "processing",
                        f"This {item.res_type} belongs in a patient's record: its subject (or patient,"
                        " securityContext...) must reference a Patient known to the hub",
                    )
                ]
            )
        return item

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


def _stored(item: NewResource) -> StoredResource:
    return StoredResource(item.res_type, item.res_id, item.version, item.last_updated, False, item.content)
