"""Rebuilding the search indexes from stored resources (``hub reindex``).

Owns: re-extracting index rows for current versions after the registry changes (a new
parameter, a fixed extractor, a changed hashing scheme, a new kind of row such as the word
rows of multi-word name search in ``hub.search.words``, which a database written before
issue 10 lacks: ``hub reindex --type Patient``, then ``Practitioner`` and ``RelatedPerson``),
and rebuilding compartment membership: ``compartment`` from each current version (a deleted
resource keeps the rows of its last version) and ``history_compartment`` from the content
of every archived version (a deletion marker in history keeps the rows of the version it
deleted). It works in batches, each in its own transaction, so a large store is reindexed
without holding one long lock.
It runs only inside an explicit system access (``consent.context.system_access``).
Calls: index extraction, the writer, ``hub.crypto`` (decryption), ``consent.derive`` and
``hub.ops.compartment`` (membership), consent.context.  Called by: the CLI, tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from consent import labels
from consent.context import required_unrestricted
from consent.derive import compartment_rows
from hub.crypto.envelope import open_content
from hub.db.schema import INDEX_TABLES, compartment, history_compartment, resource, resource_history
from hub.ops.compartment import resolve
from hub.search.index import extract_index_rows
from hub.store import Store
from hub.store.records import NewResource
from hub.store.writer import insert_index_rows

BATCH = 1000


@dataclass
class ReindexReport:
    resources: int = 0
    rows: int = 0


def reindex(
    store: Store, res_type: str | None = None, progress: Callable[[int], None] | None = None
) -> ReindexReport:
    required_unrestricted("Reindexing")
    report = ReindexReport()
    last_pid = 0
    while True:
        with store.write() as conn:
            query = (
                sa.select(
                    resource.c.pid,
                    resource.c.res_type,
                    resource.c.res_id,
                    resource.c.deleted,
                    resource.c.content,
                )
                .where(resource.c.pid > last_pid)
                .order_by(resource.c.pid)
                .limit(BATCH)
            )
            if res_type is not None:
                query = query.where(resource.c.res_type == res_type)
            batch = conn.execute(query).all()
            if not batch:
                return report
            rows = [r for r in batch if not r.deleted]
            pids = [r.pid for r in rows]
            for table in INDEX_TABLES.values():
                conn.execute(table.delete().where(table.c.pid.in_(pids)))
            items = []
            for row in rows:
                content = _plain(row)
                index_rows = extract_index_rows(store.registry, row.res_type, orjson.loads(content))
                resolve(conn, index_rows, store.base_url)
                report.rows += sum(len(v) for v in index_rows.values())
                items.append(NewResource(row.res_type, row.res_id, 0, None, content, index_rows))  # type: ignore[arg-type]
            insert_index_rows(conn, pids, items)
            _rebuild_history(conn, store, batch)
        report.resources += len(rows)
        last_pid = batch[-1].pid
        if progress is not None:
            progress(len(rows))


def _plain(row: Any) -> bytes:
    content = row.content if isinstance(row.content, bytes) else row.content.encode()
    # Index values come from the plaintext (identifiers hash with the index key).
    return open_content(content, row.res_type, row.res_id)


def _members(conn: sa.Connection, store: Store, row: Any) -> list[tuple[Any, ...]]:
    parsed = orjson.loads(_plain(row))
    found = compartment_rows(row.res_type, row.res_id, parsed, labels.labels_of(parsed))
    resolve(conn, found, store.base_url)
    return list(found.get("compartment", ()))


def _rebuild_history(conn: sa.Connection, store: Store, batch: Sequence[Any]) -> None:
    """``history_compartment`` of every archived version of the batch, from its content; a
    deleted current resource's ``compartment`` from its last version's."""
    pids = [r.pid for r in batch]
    conn.execute(history_compartment.delete().where(history_compartment.c.pid.in_(pids)))
    versions = conn.execute(
        sa.select(
            resource_history.c.pid,
            resource_history.c.version,
            resource_history.c.res_type,
            resource_history.c.res_id,
            resource_history.c.deleted,
            resource_history.c.content,
        )
        .where(resource_history.c.pid.in_(pids))
        .order_by(resource_history.c.pid, resource_history.c.version)
    ).all()
    last: dict[int, list[tuple[Any, ...]]] = {}
    out: list[dict[str, Any]] = []
    for version in versions:
        members = last.get(version.pid, []) if version.deleted else _members(conn, store, version)
        last[version.pid] = members
        out += [
            {"pid": version.pid, "version": version.version, "patient_id": p, "labels": mask}
            for p, mask in members
        ]
    if out:
        conn.execute(history_compartment.insert(), out)
    deleted = [r.pid for r in batch if r.deleted and r.pid in last]
    if deleted:
        conn.execute(compartment.delete().where(compartment.c.pid.in_(deleted)))
        rows = [{"pid": pid, "patient_id": p, "labels": mask} for pid in deleted for p, mask in last[pid]]
        if rows:
            conn.execute(compartment.insert(), rows)
