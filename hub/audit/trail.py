"""Writing the audit trail: AuditEvents in the store, each appended to a hash chain.

Owns: the chain's arithmetic (``content_digest``, ``link``, ``GENESIS``) and the one way
AuditEvents are written (``AuditTrail.record`` / ``record_in``): built from the template in
``hub.audit.events``, stamped by ``records.finalize`` without fhir.resources validation
(every request writes one, so the write must stay cheap), inserted with their search
indexes by ``writer.insert_new``, and appended to ``audit_chain`` in the same transaction,
so an AuditEvent exists exactly when its chain row does.
Calls: events, the store (records, writer), the schema.  Called by: the access layer
(every FHIR interaction), the CLI, bench/audit.py.

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
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa

from hub.audit.events import AccessEvent, build_audit_event
from hub.db.schema import audit_chain
from hub.store import Store, writer
from hub.store.records import NewResource, finalize, now

GENESIS = "0" * 64
# pg_advisory_xact_lock key of the chain head: the bytes of "hubaudit" as a signed bigint.
AUDIT_LOCK_KEY = int.from_bytes(b"hubaudit", "big")
DEFAULT_OBSERVER = "Vietnam e-health hub"


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


class AuditTrail:
    def __init__(self, store: Store, base_url: str, observer: str = DEFAULT_OBSERVER) -> None:
        self.store = store
        self.base_url = base_url.rstrip("/")
        self.observer = observer

    def build(self, events: Sequence[AccessEvent]) -> list[NewResource]:
        """The AuditEvents of ``events``, finalized (id, meta, JSON, index rows)."""
        moment = now()
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

    def record(self, events: Sequence[AccessEvent]) -> list[str]:
        """Write the events' AuditEvents in one transaction of their own; returns their ids."""
        if not events:
            return []
        with self.store.write() as conn:
            return self.record_in(conn, events)

    def record_in(self, conn: sa.Connection, events: Sequence[AccessEvent]) -> list[str]:
        """Write inside the caller's open write transaction, so the audit commits or rolls
        back with the data it describes. Call it as late as possible in that transaction:
        on PostgreSQL it holds the chain lock until the transaction ends.
        """
        if not events:
            return []
        items = self.build(events)
        writer.insert_new(conn, items)
        digests = [content_digest(item.content) for item in items]
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
        return [item.res_id for item in items]
