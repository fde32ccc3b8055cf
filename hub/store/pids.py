"""Rows by a list of pids, the cheap way for each backend.

Owns: ``pid_in``, the condition "this pid column is among these pids". On PostgreSQL it is one
array parameter (``= ANY(%s)``): an IN list of a record's 200-1,000 pids is expanded, compiled
and parsed by SQLAlchemy and psycopg on every request (bench/pages.py measured ~5 % of the
clinician's record page in that work; 600 rows 25 -> 20 ms). SQLite has no arrays and keeps
the IN list (its bound-parameter limit is far above the router's ``max_count``).
Calls: SQLAlchemy.  Called by: ``hub.ops.everything`` (the page's rows).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY


def pid_in(conn: sa.Connection, column: sa.ColumnElement[int], pids: list[int]) -> sa.ColumnElement[bool]:
    """``column`` among ``pids``: ``= ANY(array)`` on PostgreSQL, ``IN (...)`` elsewhere."""
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.literal(pids, ARRAY(sa.BigInteger)))
    return column.in_(pids)
