"""Writing the audit trail: AuditEvents in the store, each appended to a hash chain.

Owns: the chain's arithmetic (``content_digest``, ``link``, ``GENESIS``) and the one way
AuditEvents are written (``AuditTrail.record`` / ``record_in``): built from the template in
``hub.audit.events``, stamped by ``records.finalize`` without fhir.resources validation
(every request writes one, so the write must stay cheap), inserted with their search
indexes by ``writer.insert_new``, and appended to ``audit_chain`` in the same transaction,
so an AuditEvent exists exactly when its chain row does.
Calls: events, group_commit, the store (records, writer), the schema, ``hub.crypto.keys``.
Called by: the access layer (every FHIR interaction), the web adapter (starts and stops
the group commit writer), the CLI, bench/audit.py.

The chain: ``digest`` is the SHA-256 of the AuditEvent's stored JSON in canonical form
(keys sorted, no whitespace, see ``content_digest``), and ``chain[n] = sha256(chain[n-1] ||
digest[n])`` over the raw 32-byte values, starting from ``GENESIS``. The canonical form is
needed because PostgreSQL's jsonb keeps the value, not the bytes (it reorders keys), so the
bytes read back are never the bytes written; SQLite keeps them. Either way the digest
commits to every element of what is stored.

Ordering: ``seq`` is the chain position, head + 1, with no gaps. Appenders serialize: on
PostgreSQL by a transaction-scoped advisory lock taken before the head is read (released at
commit, so the next appender reads a committed head); on SQLite the write transaction
(BEGIN IMMEDIATE, from ``Store.write``) already excludes every other writer.

Group commit (``record`` while the web adapter runs, ``start_group_commit``): the request
thread builds its AuditEvents and their digests (no lock, no connection), then hands them
to the process's one writer thread (``hub.audit.group_commit``) and waits. The writer puts
every request queued meanwhile into one transaction: one pid allocation, one insert per
table, the chain lock taken once, the head read once, the chain extended for the whole
batch, one commit, and only then are the waiting requests answered. So a read's answer
still leaves only once its AuditEvent is durable, while concurrent reads share the lock
and the commit instead of queueing on them one by one. Worker processes each have their
own writer and serialize per batch on the chain lock. Without a running writer (the CLI,
tests driving the router, after shutdown) ``record`` writes in a transaction of its own.

Writes (``record_in``) stay in the data's own transaction: a write and its AuditEvent
commit or roll back together, which group commit cannot give (the batch's transaction
is not the write's). ``record_in`` builds and digests before touching the chain and takes
the lock last, so the lock is held for one head read, one insert and the commit. Writes
could join a group only by deferring the chain row (the data transaction stores the
AuditEvent and a "to be chained" row, a writer chains them later, the answer waits for
it); until ``hub audit verify`` knows that state, this is not done: an AuditEvent outside
the chain is exactly what verify must report.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from hub.audit.events import AccessEvent, build_audit_event
from hub.audit.group_commit import GroupCommit
from hub.crypto.keys import using as using_keys
from hub.db.schema import audit_chain
from hub.store import Store, writer
from hub.store.records import NewResource, finalize, now

GENESIS = "0" * 64
# pg_advisory_xact_lock key of the chain head: the bytes of "hubaudit" as a signed bigint.
AUDIT_LOCK_KEY = int.from_bytes(b"hubaudit", "big")
DEFAULT_OBSERVER = "Vietnam e-health hub"
# AuditEvents per group commit transaction at most (a request's own are never split).
MAX_BATCH_EVENTS = 500


def content_digest(content: bytes | str | dict[str, Any]) -> str:
    """SHA-256 (hex) of stored resource JSON in canonical form: sorted keys, compact.

    Accepts the column as each driver returns it: bytes or text, or an already parsed
    document (psycopg without the hub's raw jsonb loader).
    """
    document = content if isinstance(content, dict) else orjson.loads(content)
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def link(previous: str, digest: str) -> str:
    """The chain value after ``previous`` for an entry with ``digest`` (both hex)."""
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(digest)).hexdigest()


def chain_head(conn: sa.Connection) -> tuple[int, str]:
    """(seq, chain) of the last entry, or (0, GENESIS) for an empty trail."""
    row = conn.execute(
        sa.select(audit_chain.c.seq, audit_chain.c.chain).order_by(audit_chain.c.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS) if row is None else (int(row.seq), str(row.chain))


@dataclass(frozen=True)
class Prepared:
    """AuditEvents ready to append: finalized (id, meta, JSON, index rows) and digested."""

    items: list[NewResource]
    digests: list[str]

    @property
    def ids(self) -> list[str]:
        return [item.res_id for item in self.items]


class AuditTrail:
    def __init__(self, store: Store, base_url: str, observer: str = DEFAULT_OBSERVER) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.observer = observer
        self._group: GroupCommit[Prepared] | None = None

    def build(self, events: Sequence[AccessEvent]) -> list[NewResource]:
        """The AuditEvents of ``events``, finalized (id, meta, JSON, index rows)."""
        moment = now()
        # The database's keys decide whether each is sealed (and blind the index rows).
        with using_keys(self.store.keys()):
            return [
                finalize(
                    self.store.registry,
                    build_audit_event(event, self.base_url, self.observer),
                    str(uuid.uuid4()),
                    1,
                    moment,
                    validate=False,  # a fixed template; tests/test_audit_chain.py validates it
                )
                for event in events
            ]

    def prepare(self, events: Sequence[AccessEvent]) -> Prepared:
        """Everything of an append that needs neither the database nor the lock."""
        items = self.build(events)
        return Prepared(items, [content_digest(item.content) for item in items])

    def record(self, events: Sequence[AccessEvent]) -> list[str]:
        """Write the events' AuditEvents and return their ids once they are committed: by
        the group commit writer when it runs, else in one transaction of their own."""
        if not events:
            return []
        prepared = self.prepare(events)
        group = self._group
        if group is None or not group.submit_and_wait(prepared):
            self._commit([prepared])
        return prepared.ids

    def record_in(self, conn: sa.Connection, events: Sequence[AccessEvent]) -> list[str]:
        """Write inside the caller's open write transaction, so the audit commits or rolls
        back with the data it describes. Call it as late as possible in that transaction:
        on PostgreSQL it holds the chain lock until the transaction ends.
        """
        if not events:
            return []
        prepared = self.prepare(events)
        _append(conn, [prepared])
        return prepared.ids

    def start_group_commit(self, time_limit_seconds: float | None = None) -> GroupCommit[Prepared]:
        """Start this process's writer thread (idempotent) and return it; ``record`` then
        goes through it. ``time_limit_seconds`` bounds each batch's transaction as a
        request's is bounded."""
        if self._group is None:
            self._group = GroupCommit(
                self._commit,
                weight=lambda prepared: len(prepared.items),
                max_weight=MAX_BATCH_EVENTS,
                time_limit_seconds=time_limit_seconds,
                name="audit-group-commit",
            )
        return self._group

    @property
    def group_commit(self) -> GroupCommit[Prepared] | None:
        """The running writer, if any (read by the health report)."""
        return self._group

    def stop_group_commit(self) -> None:
        """Write what is queued and stop the writer; ``record`` writes directly again."""
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def _commit(self, batch: Sequence[Prepared]) -> None:
        with self.store.write() as conn:
            _append(conn, batch)


def _append(conn: sa.Connection, batch: Sequence[Prepared]) -> None:
    """Insert the batch's AuditEvents with their index rows, then, under the chain lock,
    extend the chain by all of them from the head read once."""
    items = [item for prepared in batch for item in prepared.items]
    digests = [digest for prepared in batch for digest in prepared.digests]
    writer.insert_new(conn, items)  # before the lock: other appenders need not wait for it
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(AUDIT_LOCK_KEY)))
    seq, chain = chain_head(conn)
    rows = []
    for item, digest in zip(items, digests, strict=True):
        seq += 1
        chain = link(chain, digest)
        rows.append(
            {
                "seq": seq,
                "res_id": item.res_id,
                "digest": digest,
                "chain": chain,
                "recorded": item.last_updated,
            }
        )
    conn.execute(audit_chain.insert(), rows)
