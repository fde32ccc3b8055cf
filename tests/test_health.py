"""The detailed health report (hub/ops/health.py): each check against the real thing.

Database (reachable, latency, migration head; a schema one migration behind, an unreachable
server), Redis (HUB_TEST_REDIS_URL when set; a port where nothing listens), disk (thresholds),
the audit writer of a running server (running, queue, last commit) and of a writer that
cannot commit because another connection holds the audit chain's lock (stuck: fail).
``/healthz/details`` over HTTP is in tests/test_pages_console.py (it lives with the console).
Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from conftest import PG_URL, LiveServer, auth_settings

from hub.audit.events import AccessEvent
from hub.audit.trail import AUDIT_LOCK_KEY, AuditTrail
from hub.auth.principal import system_principal
from hub.db.engine import create_engine
from hub.db.migrate import downgrade
from hub.ops import health
from hub.search.registry import get_registry
from hub.settings import Settings
from hub.store import Store

REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL")


def _known(check: health.Check) -> health.Check:
    """Every text a check produces is one the console translates (HEALTH_MESSAGES)."""
    from hub.web.views.console import HEALTH_MESSAGES

    assert check.text in HEALTH_MESSAGES, check.text
    assert check.message == check.text.format(**check.params)
    return check


@pytest.fixture(scope="module")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return auth_settings(database_url, export_dir=tmp_path_factory.mktemp("health-exports") / "exports")


def test_report_of_a_migrated_database(engine: sa.Engine, settings: Settings) -> None:
    report = health.health_report(engine, settings, None, None)
    assert [c.name for c in report.checks] == ["database", "redis", "disk", "audit"]
    database = _known(report.check("database"))
    assert database.status == health.OK, database
    assert database.details["backend"] == engine.dialect.name
    assert database.details["revision"] == database.details["head"] == ",".join(health.code_head())
    assert 0 < database.details["latency_ms"] < 5000
    assert _known(report.check("redis")).status == health.OK
    assert "Not configured" in _known(report.check("redis")).message
    disk = _known(report.check("disk"))
    assert disk.details["export"]["total_bytes"] > disk.details["export"]["free_bytes"] > 0
    # No trail given: auditing is off in this caller, a warning, and the worst status is it.
    assert _known(report.check("audit")).status == health.WARN
    assert report.status == health.WARN
    body = report.as_json()
    assert body["status"] == "warn" and body["generated"].endswith("Z")
    assert {c["name"] for c in body["checks"]} == {"database", "redis", "disk", "audit"}


def test_schema_behind_the_head_is_a_warning(fresh_database_url, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("health_behind")
    downgrade(url, "-1")
    behind = create_engine(url)
    try:
        check = _known(health.check_database(behind))
    finally:
        behind.dispose()
    assert check.status == health.WARN
    assert "hub db upgrade" in check.message
    assert check.details["revision"] != check.details["head"]


def test_unreachable_database_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if PG_URL:
        url = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
        engine = create_engine(url)
    else:
        # Plain SQLAlchemy: the hub's engine would create the missing folder.
        url = f"sqlite:///{tmp_path / 'no-such-folder' / 'hub.sqlite3'}"
        engine = sa.create_engine(url)
    try:
        report = health.health_report(engine, Settings(database_url=url), None, None)
    finally:
        engine.dispose()
    assert _known(report.check("database")).status == health.FAIL
    assert _known(report.check("database")).message == "The database is unreachable"
    # The other checks still ran: one failure hides nothing.
    assert _known(report.check("audit")).status == health.FAIL
    assert _known(report.check("redis")).status == health.OK
    assert report.status == health.FAIL


@pytest.mark.skipif(not REDIS_URL, reason="HUB_TEST_REDIS_URL not set")
def test_redis_answers() -> None:
    check = _known(health.check_redis(REDIS_URL))
    assert check.status in (health.OK, health.WARN)
    assert check.details["latency_ms"] >= 0


def test_redis_that_does_not_answer_fails() -> None:
    check = _known(health.check_redis("redis://:secret@127.0.0.1:1/0"))
    assert check.status == health.FAIL
    assert "secret" not in str(check.as_json())  # the URL is shown without its password


def test_disk_thresholds(engine: sa.Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Thresholds above any real disk: the same free space is then reported low.
    monkeypatch.setattr(health, "DISK_WARN_BYTES", 2**62)
    assert _known(health.check_disk(engine, settings)).status == health.WARN
    monkeypatch.setattr(health, "DISK_FAIL_BYTES", 2**62)
    check = _known(health.check_disk(engine, settings))
    assert check.status == health.FAIL
    assert check.message.startswith("Little free disk space")


def test_audit_writer_of_a_running_server(live_server: LiveServer) -> None:
    with live_server.admin_client() as client:
        assert client.get("Patient", params={"_count": "1"}).status_code == 200  # an audited read
    trail = live_server.app.state.router.gate.trail
    report = health.health_report(live_server.engine, live_server.settings, None, trail)
    audit = _known(report.check("audit"))
    assert audit.status == health.OK, audit
    assert audit.details["running"] is True
    assert audit.details["batches"] >= 1
    assert audit.details["last_commit_age_seconds"] is not None
    assert audit.details["chain_seq"] >= 1


@pytest.fixture()
def writer_trail(engine: sa.Engine) -> Iterator[AuditTrail]:
    trail = AuditTrail(Store(engine, get_registry()), "http://hub.test/fhir")
    trail.start_group_commit()
    yield trail
    trail.stop_group_commit()


def _hold_chain_lock(engine: sa.Engine) -> sa.Connection:
    """A connection holding what every audit append needs: the chain's advisory lock
    (PostgreSQL) or the database's write lock (SQLite)."""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_lock(AUDIT_LOCK_KEY)))
        conn.commit()
    else:
        conn = conn.execution_options(write=True)
        conn.begin()
    return conn


def _release(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_unlock(AUDIT_LOCK_KEY)))
        conn.commit()
    else:
        conn.rollback()
    conn.close()


def test_a_stuck_audit_writer_fails(
    engine: sa.Engine, writer_trail: AuditTrail, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "AUDIT_STUCK_SECONDS", 0.2)
    event = AccessEvent(principal=system_principal("test-health"), interaction="operation", action="E")
    lock = _hold_chain_lock(engine)
    threads = [threading.Thread(target=writer_trail.record, args=([event],)) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        writer = writer_trail.group_commit
        assert writer is not None
        deadline = time.monotonic() + 10
        while writer.waiting() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # past the (lowered) stuck threshold
        check = _known(health.check_audit(engine, writer_trail))
        assert check.status == health.FAIL, check
        assert check.details["queue_depth"] == 3
    finally:
        _release(lock)
        for thread in threads:
            thread.join(timeout=30)
    # Once the lock is released the three records commit and the writer is healthy again.
    check = _known(health.check_audit(engine, writer_trail))
    assert check.status == health.OK, check
    assert check.details["queue_depth"] == 0
    assert check.details["batches"] >= 1


def test_a_stopped_writer_is_a_warning(engine: sa.Engine) -> None:
    trail = AuditTrail(Store(engine, get_registry()), "http://hub.test/fhir")
    assert _known(health.check_audit(engine, trail)).status == health.WARN  # never started
    trail.start_group_commit()
    assert _known(health.check_audit(engine, trail)).status == health.OK
    trail.stop_group_commit()
    check = _known(health.check_audit(engine, trail))
    assert check.status == health.WARN
    assert check.details["running"] is False
