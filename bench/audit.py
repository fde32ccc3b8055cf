"""Audit trail benchmark: what recording one AuditEvent per request costs.

Every FHIR interaction writes an AuditEvent and its hash-chain entry, so this is a cost on
every request. Into a fresh scratch database per backend (SQLite in a temp directory;
PostgreSQL ``<database>_bench_audit``, dropped and re-created) it times:

- ``build``: building + finalizing one AuditEvent in memory (no database), and the same
  with fhir.resources validation, which the trail skips;
- ``single``: ``AuditTrail.record([event])``, one transaction per event (the per-request
  cost), sequentially and from 4 threads (appends serialize on the chain head);
- ``batch N``: ``record`` of N events per transaction;
- ``verify``: ``verify_chain`` over everything written;
- ``per request, direct vs group commit``: each of 1, 4 and 16 threads calls
  ``record([event])`` once per simulated request, as ``Gate.audit`` does for a read:
  first with every call in a transaction of its own (before issue 10), then through the
  group commit writer (``AuditTrail.start_group_commit``, as the app runs it), alternating
  at each concurrency so both see the same machine load. Printed: events/s, each call's
  wait p50/p95 (what a read's answer waits for its AuditEvent to be durable) and, for
  group commit, the transactions written and mean events per transaction.

Events are a patient read and a search touching 20 Observations, alternately. The
conditions (backend, CPUs, load average at the start of each backend's run) are printed
first: on a shared machine compare figures of one run only.

    .venv/bin/python bench/audit.py                       # SQLite and PostgreSQL
    .venv/bin/python bench/audit.py sqlite:///tmp/a.db    # this database: migrated, then appended to
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/hub .venv/bin/python bench/audit.py --events 2000
    .venv/bin/python bench/audit.py --per-request         # only direct vs group commit
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.audit.events import AccessEvent, build_audit_event  # noqa: E402
from hub.audit.trail import AuditTrail  # noqa: E402
from hub.audit.verify import verify_chain  # noqa: E402
from hub.auth.principal import Principal, Role  # noqa: E402
from hub.auth.scopes import ScopeSet  # noqa: E402
from hub.crypto.keys import configure as configure_keys  # noqa: E402
from hub.db.engine import create_engine, is_sqlite, normalize_url  # noqa: E402
from hub.db.migrate import upgrade  # noqa: E402
from hub.search.registry import get_registry  # noqa: E402
from hub.settings import Settings  # noqa: E402
from hub.store import Store  # noqa: E402
from hub.store.records import finalize, now  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/hub"
BASE = "http://127.0.0.1:8000/fhir"
PRINCIPAL = Principal(
    subject="dr.an",
    role=Role.CLINICIAN,
    scopes=ScopeSet.parse("user/*.rs"),
    fhir_user="Practitioner/dr-an",
    organizations=("org-1",),
    token_id="5f1c0c1e-8a43-4d0e-9a47-3f7f1c2a9b10",
    client_id="his-bach-mai",
    issuer="http://127.0.0.1:8000/auth",
)


def event(n: int) -> AccessEvent:
    patient = f"patient-{n % 997}"
    if n % 2:
        return AccessEvent(
            principal=PRINCIPAL,
            interaction="search-type",
            action="E",
            resource_type="Observation",
            query=f"patient={patient}&category=vital-signs&_count=20",
            patients=[patient],
            entities=[f"Observation/{patient}-{i}" for i in range(20)],
            client_address="10.1.2.3",
        )
    return AccessEvent(
        principal=PRINCIPAL,
        interaction="read",
        action="R",
        resource_type="Patient",
        resource_id=patient,
        patients=[patient],
        client_address="10.1.2.3",
    )


def scratch_url(url: str | None, backend: str, workdir: Path) -> str:
    if url:
        return url
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'audit.sqlite3'}"
    parsed = sa.engine.make_url(normalize_url(os.environ.get("HUB_BENCH_PG", PG)))
    name = f"{parsed.database}_bench_audit"
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return parsed.set(database=name).render_as_string(hide_password=False)


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:8.0f} events/s"


def timed(label: str, count: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(f"  {label:<28} {rate(count, seconds)}   ({seconds * 1000 / count:.2f} ms/event)")
    return seconds


def bench(url: str, events: int, per_request_only: bool = False) -> None:
    upgrade(url)
    engine = create_engine(url)
    registry = get_registry()
    keyring = configure_keys(Settings(database_url=url), engine)  # as the app factory does
    trail = AuditTrail(Store(engine, registry, keyring=keyring), BASE)
    print(f"{'sqlite' if is_sqlite(url) else 'postgresql'}: {sa.engine.make_url(normalize_url(url))!r}")
    print(f"  conditions: {os.cpu_count()} CPUs, load average {_load()} at start, no HTTP (trail only)")

    if per_request_only:
        compare_per_request(trail, engine, events)
        return

    builds = 2000
    timed("build (no validation)", builds, lambda: [trail.build([event(i)]) for i in range(builds)])

    def validated() -> None:
        for i in range(builds // 4):
            finalize(registry, build_audit_event(event(i), BASE, "hub"), f"v{i}", 1, now())

    timed("build (with validation)", builds // 4, validated)

    latencies: list[float] = []

    def single() -> None:
        for i in range(events):
            started = time.perf_counter()
            trail.record([event(i)])
            latencies.append(time.perf_counter() - started)

    timed("single, 1 thread", events, single)
    q = statistics.quantiles(latencies, n=100)
    print(
        f"  {'':<28} latency p50 {q[49] * 1000:.2f} ms, p95 {q[94] * 1000:.2f} ms, p99 {q[98] * 1000:.2f} ms"
    )

    threads = 4

    def concurrent() -> None:
        def work(offset: int) -> None:
            for i in range(events // threads):
                trail.record([event(offset + i)])

        workers = [threading.Thread(target=work, args=(n * events,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    timed(f"single, {threads} threads", events // threads * threads, concurrent)

    def batched(size: int, batches: int) -> Callable[[], object]:
        return lambda: [trail.record([event(b * size + i) for i in range(size)]) for b in range(batches)]

    for size in (10, 100):
        batches = max(1, events // size)
        timed(f"batch {size}", batches * size, batched(size, batches))

    report = None

    def verify() -> None:
        nonlocal report
        report = verify_chain(engine)

    with engine.connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM audit_chain")).scalar_one()
    timed("verify_chain", total, verify)
    assert report is not None and report.ok, report and report.problems[:5]

    compare_per_request(trail, engine, events)


CONCURRENCY = (1, 4, 16)


def compare_per_request(trail: AuditTrail, engine: sa.Engine, events: int) -> None:
    print(f"  per request, direct vs group commit ({events} events each, load {_load()} now):")
    for concurrency in CONCURRENCY:
        for group in (False, True):
            per_request(trail, events, concurrency, group)
    with engine.connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM audit_chain")).scalar_one()
    report = verify_chain(engine)
    assert report.ok and report.head_seq == total, report.problems[:5]
    print(f"  chain verified after the run: {total} entries, no gaps (load {_load()} at the end)")
    engine.dispose()


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def per_request(trail: AuditTrail, events: int, concurrency: int, group: bool) -> None:
    """``events`` single-request appends spread over ``concurrency`` threads."""
    writer = trail.start_group_commit() if group else None
    per_thread = max(1, events // concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work(offset: int) -> None:
        mine, failed = [], []
        for i in range(per_thread):
            started = time.perf_counter()
            try:
                trail.record([event(offset + i)])
            except Exception as error:  # noqa: BLE001  (counted and shown: a figure with errors is void)
                failed.append(str(error).splitlines()[0])
                continue
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    workers = [threading.Thread(target=work, args=(n * per_thread,)) for n in range(concurrency)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    trail.stop_group_commit()
    count = len(latencies)
    if count < 2 or errors:
        print(
            f"    {'group ' if group else 'direct'} {concurrency:>2} threads: {len(errors)} errors, e.g. {errors[:1]}"
        )
        return
    q = statistics.quantiles(latencies, n=100)
    line = (
        f"    {'group ' if group else 'direct'} {concurrency:>2} threads {rate(count, seconds)}"
        f"   wait p50 {q[49] * 1000:6.2f} ms, p95 {q[94] * 1000:6.2f} ms"
    )
    if writer is not None:
        line += f"   {writer.batches} transactions, {count / max(1, writer.batches):.1f} events each"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=os.environ.get("DATABASE_URL"), help="one database to use")
    parser.add_argument("--events", type=int, default=1000, help="events per measurement")
    parser.add_argument(
        "--per-request", action="store_true", help="only the per-request comparison (direct vs group commit)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        backends = [None] if args.url else ["sqlite", "postgresql"]
        for backend in backends:
            bench(scratch_url(args.url, backend or "", Path(workdir)), args.events, args.per_request)
            print()


if __name__ == "__main__":
    main()
