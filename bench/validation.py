"""Validation benchmark: resources/s of the old fhir.resources path vs the R4 JSON schema path.

Over the resources of the Synthea transaction Bundles in ../shared/data/synthea (by default
``bundles_r4_small``, 20 patients; ``--all`` adds the 300-patient gzipped set), in one process
on one core, it times in alternating rounds (so both paths see the same machine load):

- ``fhir.resources``: ``model_validate_json(bytes)`` of the R4B model, what hub/validation.py
  did before issue 10. That path also walked the document for JSON types (about 40 µs a
  resource), which is left out here, so the old figure is an upper bound of its speed.
- ``schema``: ``hub.validation.validate_resource(bytes, type, document)``, as the write path
  (``records.finalize``) calls it: the document is already parsed there.
- ``schema + parse``: the same with ``orjson.loads`` of the bytes included.

Nothing touches a database (backend: none; auth and audit do not apply). The conditions
(Python, library versions, CPUs, load average at start and end) are printed first and last:
on a shared machine compare figures of one run only.

    .venv/bin/python bench/validation.py            # 3 rounds over the 20-patient set
    .venv/bin/python bench/validation.py --rounds 5 --all
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.validation import _validator, model_class, validate_resource  # noqa: E402

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea"


def load(include_300: bool) -> list[tuple[bytes, str, dict[str, Any]]]:
    files = sorted((SYNTHEA / "bundles_r4_small").glob("*.json"))
    if include_300:
        files += sorted((SYNTHEA / "bundles_r4_300_patients_gz").glob("*.json.gz"))
    out = []
    for path in files:
        data = path.read_bytes()
        bundle = orjson.loads(gzip.decompress(data) if path.suffix == ".gz" else data)
        for entry in bundle.get("entry", []):
            resource = entry["resource"]
            out.append((orjson.dumps(resource), resource["resourceType"], resource))
    return out


def old_path(items: list[tuple[bytes, str, dict[str, Any]]]) -> None:
    for raw, res_type, _ in items:
        model_class(res_type).model_validate_json(raw)


def schema_path(items: list[tuple[bytes, str, dict[str, Any]]]) -> None:
    for raw, res_type, document in items:
        validate_resource(raw, res_type, document)


def schema_and_parse(items: list[tuple[bytes, str, dict[str, Any]]]) -> None:
    for raw, res_type, _ in items:
        validate_resource(raw, res_type, orjson.loads(raw))


def conditions(label: str) -> None:
    print(
        f"[{label}] load average {os.getloadavg()}, CPUs {os.cpu_count()}, Python {platform.python_version()}, "
        f"jsonschema-rs {version('jsonschema_rs')}, fhir.resources {version('fhir.resources')}, "
        "one process (one core), no database (backend: none), auth/audit: not involved"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="add the 300-patient Synthea set")
    args = parser.parse_args()
    conditions("start")
    items = load(args.all)
    print(f"{len(items)} resources of {len({t for _, t, _ in items})} types")
    started = time.perf_counter()
    _validator()
    print(f"schema validator compiled in {time.perf_counter() - started:.2f} s (once per process)")
    for _, res_type, _ in items:  # warm the model cache so the rounds time validation only
        model_class(res_type)
    paths: dict[str, Callable[[list[tuple[bytes, str, dict[str, Any]]]], None]] = {
        "fhir.resources (old)": old_path,
        "schema (new)": schema_path,
        "schema + orjson.loads": schema_and_parse,
    }
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for round_no in range(1, args.rounds + 1):
        for name, run in paths.items():
            started = time.perf_counter()
            run(items)
            rate = len(items) / (time.perf_counter() - started)
            rates[name].append(rate)
            print(f"round {round_no}: {name:24} {rate:10,.0f} resources/s  (load {os.getloadavg()[0]:.1f})")
    print("median over rounds:")
    base = statistics.median(rates["fhir.resources (old)"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:24} {median:10,.0f} resources/s  x{median / base:.1f}")
    conditions("end")


if __name__ == "__main__":
    main()
