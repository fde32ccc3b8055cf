"""Bundle benchmark (issue 8, defect 23): per-entry cost of a batch against a transaction.

Goal: a batch costs about as much per entry as a transaction of the same entries (before the
fix a batch ran every entry through ``FhirRouter.handle``: its own access decision, database
transaction and AuditEvent append, 30-50x the transaction's cost per entry).

Conditions (printed with the results): a fresh, migrated database per backend (SQLite in a
temporary directory; PostgreSQL database ``bench_bundles``, dropped and recreated), one
Organization, one Practitioner and 20 Patients managed by that Organization, so the
clinician's access (``Role.CLINICIAN``, ``user/*.cruds``, organization = the managing one)
comes from a policy grant. Each measured request is one Bundle of ``--entries`` Observations
(POST, spread over the 20 patients), sent in process through ``FhirRouter.handle`` (access
decision, dispatch, audit: everything but HTTP and JSON parsing of the body), as the admin
(``system_principal``) and as the clinician, ``--rounds`` times each, batch and transaction
interleaved. Printed: median milliseconds per entry per kind and principal, and the ratio
batch / transaction. ``--profile`` prints a cProfile of one clinician batch (top 25 by
cumulative time).

    .venv/bin/python bench/bundles.py                          # SQLite and PostgreSQL, 500 entries
    .venv/bin/python bench/bundles.py --backends sqlite --entries 1000 --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MASTER_KEY_FILE", str(Path(tempfile.mkdtemp(prefix="bench-bundles-")) / "master.key"))

from hub.app_factory import build_router  # noqa: E402
from hub.auth.principal import Principal, Role, system_principal  # noqa: E402
from hub.auth.scopes import ScopeSet  # noqa: E402
from hub.db.migrate import upgrade  # noqa: E402
from hub.rest.messages import FhirRequest  # noqa: E402
from hub.rest.router import FhirRouter  # noqa: E402
from hub.settings import Settings  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432"
ORG, DOCTOR, PATIENTS = "bench-bundles-org", "bench-bundles-dr", 20


def database_url(backend: str, workdir: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'bundles.sqlite3'}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('DROP DATABASE IF EXISTS "bench_bundles" WITH (FORCE)'))
        conn.execute(sa.text('CREATE DATABASE "bench_bundles"'))
    admin.dispose()
    return f"{PG}/bench_bundles"


def send(router: FhirRouter, principal: Principal, method: str, path: str, body: Any = None) -> Any:
    request = FhirRequest(method, path, body=orjson.dumps(body) if body else None, principal=principal)
    response = router.handle(request)
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {response.body!r}")
    return orjson.loads(response.body) if response.body else None


def seed(router: FhirRouter, admin: Principal) -> list[str]:
    send(router, admin, "PUT", f"Organization/{ORG}", {"resourceType": "Organization", "id": ORG})
    send(router, admin, "PUT", f"Practitioner/{DOCTOR}", {"resourceType": "Practitioner", "id": DOCTOR})
    patients = []
    for i in range(PATIENTS):
        body = {
            "resourceType": "Patient",
            "name": [{"family": f"Bench{i}"}],
            "managingOrganization": {"reference": f"Organization/{ORG}"},
        }
        patients.append(send(router, admin, "POST", "Patient", body)["id"])
    return patients


def bundle(kind: str, patients: list[str], entries: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "request": {"method": "POST", "url": "Observation"},
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patients[i % len(patients)]}"},
                    "valueQuantity": {"value": 60 + i % 40, "unit": "/min"},
                },
            }
            for i in range(entries)
        ],
    }


def timed(router: FhirRouter, principal: Principal, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    result = send(router, principal, "POST", "", body)
    elapsed = time.perf_counter() - start
    statuses = {e["response"]["status"] for e in result["entry"]}
    if not all(s.startswith("201") for s in statuses):
        raise RuntimeError(f"{body['type']}: entry statuses {statuses}")
    return elapsed


def run(backend: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    url = database_url(backend, workdir)
    upgrade(url)
    router = build_router(Settings(database_url=url, export_dir=workdir / "exports"))
    admin = system_principal("bench-admin")
    clinician = Principal(
        subject="bench-dr",
        role=Role.CLINICIAN,
        scopes=ScopeSet.parse("user/*.cruds"),
        fhir_user=f"Practitioner/{DOCTOR}",
        organizations=(ORG,),
    )
    patients = seed(router, admin)
    principals = {"admin": admin, "clinician": clinician}
    bodies = {kind: bundle(kind, patients, args.entries) for kind in ("transaction", "batch")}
    timed(router, admin, bundle("batch", patients, 20))  # warm-up
    timed(router, admin, bundle("transaction", patients, 20))
    per_entry: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        kinds = ("transaction", "batch") if round_ % 2 == 0 else ("batch", "transaction")
        for who, principal in principals.items():
            for kind in kinds:
                seconds = timed(router, principal, bodies[kind])
                per_entry.setdefault((kind, who), []).append(1000 * seconds / args.entries)
    out = [
        f"== {backend}: {args.entries} Observation entries per Bundle, {args.rounds} rounds, median ms/entry"
    ]
    for who in principals:
        tx = statistics.median(per_entry[("transaction", who)])
        batch = statistics.median(per_entry[("batch", who)])
        out.append(
            f"   {who:9}  transaction {tx:7.3f}   batch {batch:7.3f}   batch/transaction {batch / tx:5.2f}x"
            f"   (batch of {args.entries}: {batch * args.entries / 1000:.2f} s)"
        )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        timed(router, clinician, bodies["batch"])
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(25)
        out.append(stream.getvalue())
    router.ctx.store.engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(
        f"# {platform.node()} {platform.python_version()} {os.cpu_count()} cpus; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-bundles-") as tmp:
        for backend in args.backends:
            print("\n".join(run(backend, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
