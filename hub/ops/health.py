"""The hub's health in detail: database, Redis, disk and the audit writer, each ok/warn/fail.

Owns: ``health_report`` and ``HealthReport`` (what ``/healthz/details`` serves to hub admins
and the console's health page shows). ``/healthz`` stays the cheap probe of load balancers;
this one costs a few queries and a Redis ping, so it is for people and monitoring.

- database: reachable (``SELECT 1``) and its latency; the Alembic revision of the database
  against the head of ``migrations/`` (behind: ``hub db upgrade`` was not run);
- Redis (when ``REDIS_URL`` is set): ``PING`` and its latency; not set is fine (in-process
  rate limits and connector workers);
- disk: free space where the hub writes (the SQLite file's folder, ``EXPORT_DIR``);
- audit writer: the group commit thread of this process running, the requests waiting for
  their AuditEvents, the age of its last commit, and the newest chain entry in the database
  (written by any process). Waiting requests with no commit for a while mean the writer is
  stuck, and reads are answered only after their audit commits: fail.

Calls: SQLAlchemy, Alembic (the revision scripts), redis, ``hub.audit`` (the trail's writer,
the chain table).  Called by: ``hub.web.views.console`` (``/healthz/details``,
``/console/health``), tests.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from hub.db.schema import audit_chain
from hub.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from hub.audit.trail import AuditTrail

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

DB_SLOW_MS = 200.0  # a SELECT 1 slower than this: warn (every request makes several)
REDIS_SLOW_MS = 100.0
REDIS_TIMEOUT_SECONDS = 2.0
# Free disk: warn below either figure, fail below the smaller ones (exports and SQLite
# writes start failing, and PostgreSQL stops accepting writes when its disk is full).
DISK_WARN_FRACTION, DISK_WARN_BYTES = 0.10, 2 * 1024**3
DISK_FAIL_FRACTION, DISK_FAIL_BYTES = 0.02, 200 * 1024**2
AUDIT_STUCK_SECONDS = 30.0  # requests waiting and no commit for this long: the writer is stuck
AUDIT_QUEUE_WARN = 200  # requests waiting for their audit at once


@dataclass(frozen=True)
class Check:
    name: str  # database | redis | disk | audit
    status: str  # ok | warn | fail
    # One sentence for an operator: an English message id with {placeholders} filled from
    # ``params`` (the console translates it: every id is in hub/web/views/console.py's
    # HEALTH_MESSAGES and hub/web/locale/vi/console.po).
    text: str
    details: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> str:
        return self.text.format(**self.params)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "details": self.details}


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check]
    generated: datetime

    @property
    def status(self) -> str:
        """The worst status of any check."""
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "generated": self.generated.isoformat().replace("+00:00", "Z"),
            "checks": [c.as_json() for c in self.checks],
        }


def health_report(
    engine: sa.Engine, settings: Settings, redis_url: str | None, trail: AuditTrail | None
) -> HealthReport:
    """Every check, each guarded: one failing check never hides the others."""
    checks = [
        _guarded("database", lambda: check_database(engine)),
        _guarded("redis", lambda: check_redis(redis_url)),
        _guarded("disk", lambda: check_disk(engine, settings)),
        _guarded("audit", lambda: check_audit(engine, trail)),
    ]
    return HealthReport(checks, datetime.now(UTC))


def _guarded(name: str, run: Any) -> Check:
    try:
        check: Check = run()
        return check
    except Exception as error:  # noqa: BLE001  (the report names the failure, never raises)
        return Check(
            name, FAIL, "The check failed: {error}", {"error": _short(error)}, {"error": type(error).__name__}
        )


def _short(error: BaseException) -> str:
    """The error's class and first line, without a driver's long text (it can quote SQL)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


@lru_cache(maxsize=1)
def code_head() -> tuple[str, ...]:
    """The head revision(s) of ``migrations/`` (read once: the scripts do not change while
    the hub runs)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    return tuple(sorted(ScriptDirectory.from_config(config).get_heads()))


def check_database(engine: sa.Engine) -> Check:
    from alembic.runtime.migration import MigrationContext

    started = time.perf_counter()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            latency_ms = (time.perf_counter() - started) * 1000
            revision = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
    except sa.exc.SQLAlchemyError as error:
        return Check("database", FAIL, "The database is unreachable", {"error": _short(error)})
    head = code_head()
    details: dict[str, Any] = {
        "backend": engine.dialect.name,
        "latency_ms": round(latency_ms, 2),
        "revision": ",".join(revision) or None,
        "head": ",".join(head),
    }
    if revision != head:
        text = "The database schema is not at the code's migration head: run `hub db upgrade`"
        return Check("database", WARN if revision else FAIL, text, details)
    if latency_ms > DB_SLOW_MS:
        return Check(
            "database", WARN, "The database answers slowly ({ms} ms)", details, {"ms": round(latency_ms)}
        )
    return Check(
        "database", OK, "Reachable in {ms} ms, schema at the head", details, {"ms": round(latency_ms, 1)}
    )


def check_redis(redis_url: str | None) -> Check:
    if not redis_url:
        return Check("redis", OK, "Not configured: rate limits and connector work stay in this process", {})
    import redis

    safe = make_url_safe(redis_url)
    client = redis.Redis.from_url(
        redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
    )
    started = time.perf_counter()
    try:
        client.ping()
        latency_ms = (time.perf_counter() - started) * 1000
    except redis.RedisError as error:
        return Check("redis", FAIL, "Redis does not answer", {"url": safe, "error": _short(error)})
    finally:
        client.close()
    details = {"url": safe, "latency_ms": round(latency_ms, 2)}
    if latency_ms > REDIS_SLOW_MS:
        return Check("redis", WARN, "Redis answers slowly ({ms} ms)", details, {"ms": round(latency_ms)})
    return Check("redis", OK, "PING answered in {ms} ms", details, {"ms": round(latency_ms, 1)})


def make_url_safe(url: str) -> str:
    """A URL without its password (Redis URLs may carry one)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return url.split("@")[-1]


def data_dirs(engine: sa.Engine, settings: Settings) -> dict[str, Path]:
    """Where the hub writes on this machine: the SQLite database's folder and the export
    folder (PostgreSQL's own disk is its server's business)."""
    dirs: dict[str, Path] = {"export": Path(settings.export_dir)}
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            dirs["database"] = Path(database).resolve().parent
    return dirs


def _existing(path: Path) -> Path:
    """The nearest folder that exists (the export folder is made on first use)."""
    path = path.resolve()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(engine: sa.Engine, settings: Settings) -> Check:
    worst = OK
    lines: list[str] = []
    details: dict[str, Any] = {}
    for label, path in data_dirs(engine, settings).items():
        usage = shutil.disk_usage(_existing(path))
        fraction = usage.free / usage.total if usage.total else 0.0
        if usage.free < DISK_FAIL_BYTES or fraction < DISK_FAIL_FRACTION:
            status = FAIL
        elif usage.free < DISK_WARN_BYTES or fraction < DISK_WARN_FRACTION:
            status = WARN
        else:
            status = OK
        worst = max(worst, status, key=_RANK.__getitem__)
        details[label] = {
            "path": str(path),
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "free_percent": round(fraction * 100, 1),
            "status": status,
        }
        lines.append(f"{label} {usage.free / 1024**3:.1f} GiB ({fraction * 100:.0f} %)")
    text = "Free disk space: {summary}" if worst == OK else "Little free disk space: {summary}"
    return Check("disk", worst, text, details, {"summary": "; ".join(lines)})


def check_audit(engine: sa.Engine, trail: AuditTrail | None) -> Check:
    details: dict[str, Any] = {}
    with engine.connect() as conn:
        last = conn.execute(
            sa.select(audit_chain.c.seq, audit_chain.c.recorded).order_by(audit_chain.c.seq.desc()).limit(1)
        ).first()
    if last is not None:
        recorded = last.recorded if last.recorded.tzinfo else last.recorded.replace(tzinfo=UTC)
        details["chain_seq"] = int(last.seq)
        details["chain_last_recorded"] = recorded.isoformat().replace("+00:00", "Z")
    if trail is None:
        return Check("audit", WARN, "Auditing is off in this process", details)
    writer = trail.group_commit
    if writer is None or not writer.running():
        # Records are then written one transaction each: correct, slower under load.
        details["running"] = False
        return Check("audit", WARN, "The group commit writer is not running in this process", details)
    waiting = writer.waiting()
    # Before its first commit, the writer's age counts from its start.
    age = max(0.0, time.time() - (writer.last_commit or writer.started))
    details.update(
        {
            "running": True,
            "queue_depth": waiting,
            "batches": writer.batches,
            "last_commit_age_seconds": round(age, 1) if writer.last_commit else None,
        }
    )
    if waiting and age > AUDIT_STUCK_SECONDS:
        return Check(
            "audit",
            FAIL,
            "{waiting} requests wait for their audit and nothing was committed for {seconds} s or more",
            details,
            {"waiting": waiting, "seconds": round(AUDIT_STUCK_SECONDS)},
        )
    if waiting > AUDIT_QUEUE_WARN:
        return Check(
            "audit", WARN, "{waiting} requests wait for their audit records", details, {"waiting": waiting}
        )
    if writer.last_commit is None:
        return Check(
            "audit",
            OK,
            "Group commit running, {waiting} waiting, no batch yet",
            details,
            {"waiting": waiting},
        )
    return Check(
        "audit",
        OK,
        "Group commit running, {waiting} waiting, last batch {age} s ago",
        details,
        {"waiting": waiting, "age": round(age)},
    )
