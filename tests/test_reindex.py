"""``hub reindex`` rebuilds index rows that are missing or stale."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from consent.context import system_access
from hub.db.schema import INDEX_TABLES
from hub.rest import FhirRouter
from hub.store.reindex import reindex


def test_reindex_restores_search(http: httpx.Client, router: FhirRouter, uid: str) -> None:
    created = http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Võ{uid}"}]}).json()
    assert http.get("/Patient", params={"family": f"vo{uid}", "_total": "accurate"}).json()["total"] == 1
    store = router.ctx.store
    with store.write() as conn:
        pid = conn.execute(
            sa.text("SELECT pid FROM resource WHERE res_id = :i"), {"i": created["id"]}
        ).scalar_one()
        count = sa.text("SELECT count(*) FROM idx_string WHERE pid = :p")
        before = conn.execute(count, {"p": pid}).scalar_one()
        for table in INDEX_TABLES.values():
            conn.execute(table.delete().where(table.c.pid == pid))
    assert http.get("/Patient", params={"family": f"vo{uid}", "_total": "accurate"}).json()["total"] == 0
    with system_access("test-reindex"):
        report = reindex(store, "Patient")
    assert report.resources >= 1 and report.rows >= 1
    assert http.get("/Patient", params={"family": f"vo{uid}", "_total": "accurate"}).json()["total"] == 1
    # Reindexing twice does not duplicate rows.
    with system_access("test-reindex"):
        reindex(store, "Patient")
    with store.read() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM idx_string WHERE pid = :p"), {"p": pid}
        ).scalar_one()
    assert rows == before > 0


def test_reindex_fails_closed_without_a_system_access(router: FhirRouter) -> None:
    """Reindexing reads every row: only inside an explicit system access."""
    from hub.errors import FhirError

    try:
        reindex(router.ctx.store, "Patient")
    except FhirError as error:
        assert error.status == 500 and "system access" in str(error)
    else:
        raise AssertionError("reindex ran without a system access")
