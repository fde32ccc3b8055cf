"""Encryption-at-rest benchmark (issue 4): what sealing costs reads, searches and writes.

Data: the Patients of the first N Synthea bundles (``../shared``; they carry a phone number)
given a CCCD and a BHYT number, so every one of them is sealed when encryption is on, plus
the first Observations of each (not sensitive: stored plain in both modes). The same
resources go into two fresh databases per backend, ``ENCRYPT_AT_REST`` off and on, each with
its own master key in a temporary directory.

Measured in process, at the store/engine level (no HTTP, no access layer), best of 5 rounds:

    open        hub.crypto.open_content on one Patient's stored bytes (no database)
    read        Store.get of every Patient, one read transaction: µs per resource
    read_obs    Store.get of Observations (plain in both modes: the cost of the check)
    page        Patient?_count=100 pages through hub.search.engine: µs per resource
    ident       Patient?identifier=<CCCD system>|<value>: µs per query (keyed hash vs plain)
    write       Store.create_many of the Patients in batches of 100: µs per resource

    .venv/bin/python bench/crypto.py --patients 300
    .venv/bin/python bench/crypto.py --patients 300 --backends sqlite postgresql
"""

from __future__ import annotations

import argparse
import base64
import gzip
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consent.context import system_access  # noqa: E402
from hub.crypto import keys, open_content  # noqa: E402
from hub.db.engine import create_engine  # noqa: E402
from hub.db.migrate import upgrade  # noqa: E402
from hub.db.schema import resource  # noqa: E402
from hub.search import engine as search_engine  # noqa: E402
from hub.search.registry import get_registry  # noqa: E402
from hub.settings import Settings  # noqa: E402
from hub.store import Store  # noqa: E402

DATA = Path("/work/shared/data/synthea/bundles_r4_300_patients_gz")
PG = "postgresql://postgres@127.0.0.1:5432"
CCCD = "https://ehealth-hub.vn/sid/cccd"
BHYT = "https://ehealth-hub.vn/sid/bhyt"
OBSERVATIONS_PER_PATIENT = 5
ROUNDS = 7


def load_resources(patients: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    files = sorted(p for p in DATA.iterdir() if not p.name.startswith(("hospital", "practitioner")))
    found_patients, observations = [], []
    for number, path in enumerate(files[:patients]):
        bundle = orjson.loads(gzip.decompress(path.read_bytes()))
        kept = 0
        patient_id = None
        for entry in bundle["entry"]:
            res = entry["resource"]
            if res["resourceType"] == "Patient":
                patient_id = f"bench-p{number}"
                res = {k: v for k, v in res.items() if k not in ("id", "text", "extension")}
                res["id"] = patient_id
                res["identifier"] = [
                    {"system": CCCD, "value": f"0791{number:08d}"},
                    {"system": BHYT, "value": f"DN479{number:010d}"},
                ]
                found_patients.append(res)
            elif res["resourceType"] == "Observation" and kept < OBSERVATIONS_PER_PATIENT and patient_id:
                obs = {k: v for k, v in res.items() if k not in ("encounter", "text")}
                obs["id"] = f"bench-o{number}-{kept}"
                obs["subject"] = {"reference": f"Patient/{patient_id}"}
                observations.append(obs)
                kept += 1
    return found_patients, observations


def best(rounds: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(rounds))


def database(backend: str, label: str, tmp: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp / label}.sqlite3"
    name = f"hub_bench_crypto_{label}"
    admin = sa.create_engine(f"{PG}/postgres".replace("postgresql://", "postgresql+psycopg://"))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{PG}/{name}"


@dataclass
class Side:
    """One database of the comparison, loaded and ready to measure."""

    engine: sa.Engine
    store: Store
    figures: dict[str, float]
    sample: bytes  # the stored bytes of the first Patient


def prepare(
    backend: str, encrypt: bool, patients: list[dict[str, Any]], observations: list[dict[str, Any]], tmp: Path
) -> Side:
    label = f"{backend}_{'on' if encrypt else 'off'}"
    url = database(backend, label, tmp)
    upgrade(url)
    settings = Settings(database_url=url, master_key_file=tmp / f"{label}.key", encrypt_at_rest=encrypt)
    engine = create_engine(url)
    keys.configure(settings, engine)
    store = Store(engine, get_registry())
    figures: dict[str, float] = {}
    started = time.perf_counter()
    for start in range(0, len(patients), 100):
        batch = [(orjson.loads(orjson.dumps(p)), p["id"]) for p in patients[start : start + 100]]
        with system_access("bench-crypto"), store.write() as conn:
            store.create_many(conn, batch)
    figures["write"] = (time.perf_counter() - started) / len(patients) * 1e6
    with system_access("bench-crypto"), store.write() as conn:
        for start in range(0, len(observations), 500):
            chunk = observations[start : start + 500]
            store.create_many(conn, [(orjson.loads(orjson.dumps(o)), o["id"]) for o in chunk])
    if backend == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(resource.c.content).where(resource.c.res_id == patients[0]["id"])
        ).scalar_one()
    sample = stored if isinstance(stored, bytes) else stored.encode()
    figures["stored_bytes"] = float(len(sample))
    return Side(engine, store, figures, sample)


def measurements(patients: list[dict[str, Any]], observations: list[dict[str, Any]]) -> dict[str, Any]:
    registry = get_registry()
    patient_ids = [p["id"] for p in patients]
    observation_ids = [o["id"] for o in observations]
    first = patient_ids[0]

    def opening(side: Side) -> float:
        n = 5000
        with keys.bound(side.engine):
            started = time.perf_counter()
            for _ in range(n):
                open_content(side.sample, "Patient", first)
        return (time.perf_counter() - started) / n * 1e6

    def read_all(res_type: str, ids: list[str]) -> Callable[[Side], float]:
        def run(side: Side) -> float:
            with system_access("bench-crypto"), side.store.read() as conn:
                started = time.perf_counter()
                for res_id in ids:
                    side.store.get(conn, res_type, res_id)
                return (time.perf_counter() - started) / len(ids) * 1e6

        return run

    def pages(side: Side) -> float:
        returned = 0
        with system_access("bench-crypto"), side.store.read() as conn:
            started = time.perf_counter()
            for offset in range(0, len(patients), 100):
                params = [("_count", "100"), ("_offset", str(offset)), ("_total", "none")]
                query = search_engine.parse(registry, "Patient", params, base_url="http://b/fhir")
                returned += len(search_engine.execute(conn, registry, query).matches)
            return (time.perf_counter() - started) / returned * 1e6

    def identifiers(side: Side) -> float:
        with system_access("bench-crypto"), side.store.read() as conn:
            started = time.perf_counter()
            for p in patients:
                params = [("identifier", f"{CCCD}|{p['identifier'][0]['value']}"), ("_total", "none")]
                query = search_engine.parse(registry, "Patient", params, base_url="http://b/fhir")
                assert len(search_engine.execute(conn, registry, query).matches) == 1
            return (time.perf_counter() - started) / len(patients) * 1e6

    return {
        "open": opening,
        "read": read_all("Patient", patient_ids),
        "read_obs": read_all("Observation", observation_ids),
        "page": pages,
        "ident": identifiers,
    }


def breakdown(sample: bytes) -> dict[str, float]:
    """Where one opening's time goes: envelope parse, base64, AES-GCM (µs)."""
    envelope = orjson.loads(sample)
    sealed = envelope["_enc"]
    iv, ct = base64.b64decode(sealed["iv"]), base64.b64decode(sealed["ct"])
    cipher = keys.cipher_for(sealed["kid"])
    assert cipher is not None
    aad = f"Patient/{envelope['id']}/{envelope['meta']['versionId']}".encode()
    n = 5000

    def timed(run: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(n):
            run()
        return (time.perf_counter() - started) / n * 1e6

    return {
        "parse": timed(lambda: orjson.loads(sample)),
        "base64": timed(lambda: base64.b64decode(sealed["ct"])),
        "aes-gcm": timed(lambda: cipher.decrypt(iv, ct, aad)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--backends", nargs="+", default=["sqlite"], choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    patients, observations = load_resources(args.patients)
    print(f"{len(patients)} Patients (sealed when on), {len(observations)} Observations (plain in both)")
    rows = (
        ("open", "open_content, one Patient (µs/call)"),
        ("read", "Store.get Patient (µs/resource)"),
        ("read_obs", "Store.get Observation, plain (µs/resource)"),
        ("page", "Patient?_count=100 page (µs/resource)"),
        ("ident", "Patient?identifier=cccd|x (µs/query)"),
        ("write", "create_many Patient (µs/resource)"),
        ("stored_bytes", "stored Patient (bytes)"),
    )
    with tempfile.TemporaryDirectory(prefix="hub-bench-crypto-") as tmp:
        for backend in args.backends:
            sides = [
                prepare(backend, encrypt, patients, observations, Path(tmp)) for encrypt in (False, True)
            ]
            # Off and on alternate round by round, so load from other processes hits both alike.
            for key, measure in measurements(patients, observations).items():
                for side in sides:
                    side.figures[key] = float("inf")
                for _ in range(ROUNDS):
                    for side in sides:
                        side.figures[key] = min(side.figures[key], measure(side))
            off, on = (side.figures for side in sides)
            with keys.bound(sides[1].engine):
                parts = breakdown(sides[1].sample)
            for side in sides:
                side.engine.dispose()
            print(f"\n{backend}: encryption off vs on")
            print(f"{'':45} {'off':>9} {'on':>9} {'on-off':>9} {'ratio':>6}")
            for key, title in rows:
                ratio = on[key] / off[key] if off[key] else float("nan")
                print(f"{title:45} {off[key]:9.1f} {on[key]:9.1f} {on[key] - off[key]:9.1f} {ratio:6.2f}")
            print(
                "opening one sealed Patient, by step (µs): "
                + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            )
    print(f"\nRead/search figures: best of {ROUNDS} rounds, off and on interleaved; write: one pass.")


if __name__ == "__main__":
    main()
