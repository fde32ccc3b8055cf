"""``urn:uuid`` fullUrls of earlier transactions whose resource got another id.

Owns: recording and looking up those aliases, the same way for REST transactions and bulk
import, with an upsert so concurrent transactions naming the same fullUrl cannot collide.
Calls: SQLAlchemy.  Called by: Bundle transactions, the import pipeline.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hub.db.schema import fullurl_alias


def record(conn: sa.Connection, aliases: list[dict[str, str]]) -> None:
    """Point each fullUrl at its newest resource (later bundles mean the newest one)."""
    if not aliases:
        return
    # Longer ones cannot be a urn:uuid (nor fit the column); the transaction resolved them already.
    rows = list({a["full_url"]: a for a in aliases if len(a["full_url"]) <= 200}.values())
    if not rows:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert(fullurl_alias).values(rows)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[fullurl_alias.c.full_url],
            set_={"res_type": statement.excluded.res_type, "res_id": statement.excluded.res_id},
        )
    )


def lookup(conn: sa.Connection, full_url: str) -> tuple[str, str] | None:
    row = conn.execute(
        sa.select(fullurl_alias.c.res_type, fullurl_alias.c.res_id).where(
            fullurl_alias.c.full_url == full_url
        )
    ).first()
    return (row.res_type, row.res_id) if row is not None else None
