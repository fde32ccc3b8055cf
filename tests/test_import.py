"""Bulk import: Synthea transaction Bundles, the 300-patient set, NDJSON, and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO, SHARED, SYNTHEA_300, LoadedSet

from consent.context import system_access
from hub.app_factory import build_router
from hub.db.engine import create_engine
from hub.db.schema import INDEX_TABLES
from hub.ingest.pipeline import Importer, ImportReport
from hub.ingest.prepare import UNRESOLVED
from hub.settings import Settings
from hub.store.reindex import reindex

SMALL = SHARED / "data/synthea/bundles_r4_small"
NDJSON = SHARED / "data/synthea/bulk_ndjson_10_patients"


def _require(path: Path) -> None:
    assert path.exists(), f"test data missing: {path} (../shared must sit beside the repo)"


def _bundle_counts(folder: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in folder.iterdir():
        if path.name.endswith((".json", ".json.gz")):
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            counts.update(e["resource"]["resourceType"] for e in json.loads(data)["entry"])
    return counts


def _stored_counts(url: str) -> Counter[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT res_type, count(*) FROM resource WHERE NOT deleted GROUP BY res_type")
        ).all()
    engine.dispose()
    return Counter({t: n for t, n in rows})


def _import(url: str, paths: list[Path], workers: int = 2) -> ImportReport:
    router = build_router(Settings(database_url=url))
    with system_access("test-import"):
        report = Importer(router, workers=workers).run(paths)
    router.ctx.store.engine.dispose()
    return report


def test_small_synthea_bundles_load_completely(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    _require(SMALL)
    url = fresh_database_url("small")
    report = _import(url, [SMALL])
    assert report.errors == []
    expected = _bundle_counts(SMALL)
    assert _stored_counts(url) == expected
    assert sum(report.created.values()) == sum(expected.values())
    # Every reference was resolved to Type/id: no urn:uuid and no placeholder survives.
    engine = create_engine(url)
    with engine.connect() as conn:
        leftovers = conn.execute(
            sa.text(
                "SELECT count(*) FROM idx_reference WHERE target_url LIKE 'urn:%' OR target_type = 'Unresolved'"
            )
        ).scalar_one()
    engine.dispose()
    assert leftovers == 0


def test_reimport_creates_new_resources_without_collisions(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    _require(SMALL)
    url = fresh_database_url("reimport")
    one = sorted(SMALL.iterdir())[0]
    _import(url, [one])
    report = _import(url, [one])
    assert report.errors == []
    per_bundle = Counter(e["resource"]["resourceType"] for e in json.loads(one.read_bytes())["entry"])
    assert _stored_counts(url) == Counter({t: 2 * n for t, n in per_bundle.items()})
    # The copies got fresh ids; their fullUrls now name the newest copy, as over REST.
    engine = create_engine(url)
    with engine.connect() as conn:
        aliases = conn.execute(sa.text("SELECT count(*) FROM fullurl_alias")).scalar_one()
    engine.dispose()
    assert aliases == sum(per_bundle.values())


def _derived_rows(url: str) -> dict[str, Counter[tuple[object, ...]]]:
    """Every index and access row, the pid replaced by the resource's type and id."""
    engine = create_engine(url)
    found: dict[str, Counter[tuple[object, ...]]] = {}
    with engine.connect() as conn:
        names = dict(conn.execute(sa.text("SELECT pid, res_type || '/' || res_id FROM resource")).all())
        for kind, table in INDEX_TABLES.items():
            rows = conn.execute(sa.select(table)).all()
            found[kind] = Counter((names[row[0]], *row[1:]) for row in rows)
    engine.dispose()
    return found


def _care_team_bundle(practitioner_url: str) -> bytes:
    """A Patient and their active CareTeam whose member is a Practitioner of an earlier bundle."""
    patient, team = (
        "urn:uuid:7d0c2f6e-0d4e-4c53-9d43-2b8f0e6f5a01",
        "urn:uuid:7d0c2f6e-0d4e-4c53-9d43-2b8f0e6f5a02",
    )
    entries = [
        (patient, {"resourceType": "Patient", "name": [{"family": "Trần"}]}),
        (
            team,
            {
                "resourceType": "CareTeam",
                "status": "active",
                "subject": {"reference": patient},
                "participant": [{"member": {"reference": practitioner_url}}],
            },
        ),
    ]
    return json.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"fullUrl": url, "resource": body, "request": {"method": "POST", "url": body["resourceType"]}}
                for url, body in entries
            ],
        }
    ).encode()


def test_import_derives_the_rows_reindex_derives(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The importer patches cross-bundle references and renumbers ids after its workers
    indexed the resources, and re-derives access rows only where that can change them: the
    rows it stores are those ``hub reindex`` derives from the stored content. Loaded twice,
    so the second copy of every resource (Patients and CareTeams included) gets a new id."""
    files = sorted(SYNTHEA_300.glob("*.json.gz"))
    chosen = [p for p in files if p.name.startswith(("hospital", "practitioner"))]
    chosen += [p for p in files if not p.name.startswith(("hospital", "practitioner"))][:1]
    practitioners = next(p for p in chosen if p.name.startswith("practitioner"))
    first = json.loads(gzip.decompress(practitioners.read_bytes()))["entry"][0]["fullUrl"]
    (tmp_path / "team.json").write_bytes(_care_team_bundle(first))
    chosen.append(tmp_path / "team.json")
    url = fresh_database_url("derived")
    for _ in range(2):
        assert _import(url, chosen).errors == []
    imported = _derived_rows(url)
    router = build_router(Settings(database_url=url))
    with system_access("test-reindex"):
        reindex(router.ctx.store)
    router.ctx.store.engine.dispose()
    assert imported == _derived_rows(url)
    grantees = {row[2] for row in imported["access_grant"]}
    assert grantees and not any(g.startswith(UNRESOLVED) for g in grantees)


@pytest.mark.slow
def test_300_patient_set_loads_completely(synthea_300: LoadedSet) -> None:
    """The run's one load of the large set (conftest's ``synthea_300``, shared with the
    differential search test): nothing rejected, every resource stored."""
    assert synthea_300.report.errors == []
    assert synthea_300.report.rejected == 0
    expected = _bundle_counts(SYNTHEA_300)
    assert _stored_counts(synthea_300.url) == expected
    assert sum(synthea_300.report.created.values()) == sum(expected.values())


def test_ndjson_import_keeps_ids_and_reimport_updates(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    _require(NDJSON)
    url = fresh_database_url("ndjson")
    report = _import(url, [NDJSON])
    expected: Counter[str] = Counter()
    ids: set[str] = set()
    for path in NDJSON.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            if "resourceType" in resource:
                expected[resource["resourceType"]] += 1
                ids.add(resource["id"])
    assert report.errors == []
    assert _stored_counts(url) == expected
    engine = create_engine(url)
    with engine.connect() as conn:
        stored_ids = {r[0] for r in conn.execute(sa.text("SELECT res_id FROM resource"))}
    engine.dispose()
    assert stored_ids == ids
    again = _import(url, [NDJSON / "Patient.000.ndjson"])
    assert sum(again.updated.values()) == expected["Patient"]
    assert _stored_counts(url) == expected


def test_import_reports_bad_lines_and_keeps_good_ones(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("badlines")
    data = tmp_path / "Patient.ndjson"
    data.write_text(
        '{"resourceType":"Patient","id":"ok-1"}\n'
        '{"resourceType":"Patient","id":"bad","birthDate":"31/12/1990"}\n'
        "{not json}\n"
        '{"resourceType":"Patient","id":"ok-2"}\n'
    )
    report = _import(url, [data], workers=1)
    assert _stored_counts(url) == Counter({"Patient": 2})
    assert report.rejected == 2
    assert any(":2:" in e and "birthDate" in e for e in report.errors)
    assert any(":3:" in e for e in report.errors)


def test_cli_import_prints_summary_and_fails_on_errors(fresh_database_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _require(SMALL)
    url = fresh_database_url("cli")
    env = {**os.environ, "DATABASE_URL": url}
    hub = str(Path(sys.executable).parent / "hub")
    ok = subprocess.run(
        [hub, "import", str(sorted(SMALL.iterdir())[0])], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0, ok.stderr
    assert "Imported" in ok.stdout and "No errors" in ok.stdout
    broken = tmp_path / "broken.json"
    broken.write_text(
        '{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":"urn:uuid:8c0f2b3e-2b9a-4d4f-9f0e-1a2b3c4d5e6f",'
        '"resource":{"resourceType":"Patient","gender":12},"request":{"method":"POST","url":"Patient"}}]}'
    )
    failed = subprocess.run([hub, "import", str(broken)], env=env, capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 1
    assert "1 errors" in failed.stdout and "Patient.gender" in failed.stdout
