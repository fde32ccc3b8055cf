"""``hub.store.pids.pid_in`` (used by ``$everything``): the page's rows by pid, one array parameter on PostgreSQL and an
IN list on SQLite, select exactly the rows asked for (bench/pages.py measured why it exists)."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from hub.db.schema import resource
from hub.store.pids import pid_in


def test_pid_in_selects_exactly_the_given_pids(http: httpx.Client, engine: sa.Engine, uid: str) -> None:
    for n in range(30):  # rows of its own, whatever else the session database holds
        answer = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Pid{uid}{n}"}]})
        assert answer.status_code == 201, answer.text
    with engine.connect() as conn:
        known = [int(p) for p in conn.execute(sa.select(resource.c.pid).limit(1500)).scalars()]
        assert len(known) >= 30
        absent = (max(known) if known else 0) + 10**9
        for wanted in ([], known[:1], known[::3], [*known, absent], [absent]):
            found = (
                conn.execute(sa.select(resource.c.pid).where(pid_in(conn, resource.c.pid, wanted)))
                .scalars()
                .all()
            )
            assert sorted(int(p) for p in found) == sorted(set(wanted) & set(known))
        if conn.dialect.name == "postgresql":
            # One bound array, however many pids: the statement text does not grow with them.
            statement = sa.select(resource.c.pid).where(pid_in(conn, resource.c.pid, known))
            assert "ANY" in str(statement.compile(conn)) and str(statement.compile(conn)).count("%(") == 1
