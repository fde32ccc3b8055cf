"""Rebuilding the search indexes from stored resources (``hub reindex``).

Owns: re-extracting index rows for current versions after the registry changes (a new
parameter, a fixed extractor, a changed hashing scheme). It works in batches, each in its
own transaction, so a large store is reindexed without holding one long lock.
It runs only inside an explicit system access (``consent.context.system_access``).
Calls: index extraction, the writer, ``hub.crypto`` (decryption), consent.context.
Called by: the CLI, tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson
import sqlalchemy as sa

from consent.context import required_unrestricted
from hub.crypto.envelope import open_content
from hub.db.schema import INDEX_TABLES, resource
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
                sa.select(resource.c.pid, resource.c.res_type, resource.c.res_id, resource.c.content)
                .where(resource.c.pid > last_pid, resource.c.deleted.is_(False))
                .order_by(resource.c.pid)
                .limit(BATCH)
            )
            if res_type is not None:
                query = query.where(resource.c.res_type == res_type)
            rows = conn.execute(query).all()
            if not rows:
                return report
            pids = [r.pid for r in rows]
            for table in INDEX_TABLES.values():
                conn.execute(table.delete().where(table.c.pid.in_(pids)))
            items = []
            for row in rows:
                content = row.content if isinstance(row.content, bytes) else row.content.encode()
                # Index values come from the plaintext (identifiers hash with the index key).
                content = open_content(content, row.res_type, row.res_id)
                index_rows = extract_index_rows(store.registry, row.res_type, orjson.loads(content))
                report.rows += sum(len(v) for v in index_rows.values())
                items.append(NewResource(row.res_type, row.res_id, 0, None, content, index_rows))  # type: ignore[arg-type]
            insert_index_rows(conn, pids, items)
        report.resources += len(rows)
        last_pid = pids[-1]
        if progress is not None:
            progress(len(rows))
