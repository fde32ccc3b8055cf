"""Deep paging benchmark (issue 10): page 500 of a 10k-result search against page 1.

Loads ``--n`` Observations of one patient straight through the store (a named system
access; dates spread over three years with ties, every ninth undated) into a fresh
database, runs ANALYZE, then walks the search ``Observation?subject=...&_count=20`` page by
page following the engine's ``next_cursor``, for each sort: none (pid), ``_lastUpdated``,
``-date`` (a correlated aggregate). It times page 1 and the deepest page (the cursor of
the page before it replayed ``--repeats`` times, median) and, for comparison, the same deep
page by ``_offset``, and page 1 with ``_total=accurate`` (the COUNT statement).

The search runs in-process (``hub.search.engine``: parse + execute in a read transaction)
under the system access, so the figures are the database's and the engine's alone: no
HTTP, no token, no consent clause, no audit, concurrency 1. Goal: deep page ≤ 1.5× page 1.

    .venv/bin/python bench/paging.py --database-url postgresql://postgres@127.0.0.1:5432/hub_bench_paging
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from consent.context import system_access  # noqa: E402
from hub.app_factory import build_router  # noqa: E402
from hub.db.engine import normalize_url  # noqa: E402
from hub.db.migrate import upgrade  # noqa: E402
from hub.rest import FhirRouter  # noqa: E402
from hub.search import engine  # noqa: E402
from hub.settings import Settings  # noqa: E402

BASE = "http://bench.local/fhir"
SORTS: tuple[str | None, ...] = (None, "_lastUpdated", "-date")


def fresh_database(url: str) -> str:
    parsed = sa.engine.make_url(normalize_url(url))
    if parsed.get_backend_name() == "postgresql":
        admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{parsed.database}"'))
        admin.dispose()
    elif parsed.database and Path(parsed.database).exists():
        Path(parsed.database).unlink()
    upgrade(url)
    return url


def load(router: FhirRouter, n: int) -> str:
    store = router.ctx.store
    with system_access("bench-paging"):
        with store.write() as conn:
            patient = store.create(conn, {"resourceType": "Patient", "name": [{"family": "Bench"}]})
        for start in range(0, n, 1000):
            batch = []
            for i in range(start, min(start + 1000, n)):
                observation: dict[str, Any] = {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patient.res_id}"},
                }
                if i % 9:
                    day = i % 1000
                    observation["effectiveDateTime"] = (
                        f"{2023 + day // 365}-{1 + day % 12:02d}-{1 + day % 28:02d}"
                    )
                batch.append((observation, None))
            with store.write() as conn:
                store.create_many(conn, batch)
    with store.engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    return patient.res_id


def run(router: FhirRouter, params: list[tuple[str, str]]) -> tuple[float, engine.SearchResult]:
    store = router.ctx.store
    began = time.perf_counter()
    with store.read() as conn:
        query = engine.parse(router.ctx.registry, "Observation", params, base_url=BASE)
        result = engine.execute(conn, router.ctx.registry, query)
    return time.perf_counter() - began, result


def median_ms(router: FhirRouter, params: list[tuple[str, str]], repeats: int) -> float:
    return statistics.median(run(router, params)[0] for _ in range(repeats)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/hub_bench_paging")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    url = fresh_database(args.database_url)
    router = build_router(Settings(database_url=url))
    began = time.perf_counter()
    patient = load(router, args.n)
    print(f"loaded {args.n} Observations in {time.perf_counter() - began:.1f} s")
    backend = router.ctx.store.engine.dialect.name
    with router.ctx.store.engine.connect() as conn:
        version = conn.execute(
            sa.text("SELECT version()" if backend == "postgresql" else "SELECT sqlite_version()")
        )
        server = version.scalar_one()
    print(
        f"conditions: {backend} ({str(server)[:40]}), in-process engine, system access (no auth, no consent "
        f"clause, no audit), concurrency 1, _count={args.count}, median of {args.repeats}; "
        f"load average at start {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}"
    )
    deepest = (args.n + args.count - 1) // args.count
    print(
        f"{'sort':14} {'page 1 ms':>10} {f'page {deepest} ms':>12} {'ratio':>6} {'by _offset ms':>14} {'+total ms':>10}"
    )
    with system_access("bench-paging"):
        for sort in SORTS:
            base = [("subject", f"Patient/{patient}"), ("_count", str(args.count))]
            base += [("_sort", sort)] if sort else []
            # Walk to the deepest page by cursors; ``cursor`` ends as the one that leads to it.
            cursor: str | None = None
            seen = 0
            while True:
                _, result = run(router, base + ([("_cursor", cursor)] if cursor else []))
                seen += len(result.matches)
                if result.next_cursor is None:
                    break
                cursor = result.next_cursor
            assert seen == args.n, f"walk saw {seen} of {args.n}"
            first = median_ms(router, base, args.repeats)
            deep = median_ms(router, base + ([("_cursor", cursor)] if cursor else []), args.repeats)
            offset = median_ms(router, base + [("_offset", str((deepest - 1) * args.count))], args.repeats)
            total = median_ms(router, base + [("_total", "accurate")], args.repeats)
            label = sort or "(pid)"
            print(f"{label:14} {first:10.2f} {deep:12.2f} {deep / first:6.2f} {offset:14.2f} {total:10.2f}")
    print(
        f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; goal: deep page ≤ 1.5× page 1"
    )


if __name__ == "__main__":
    main()
