"""Every HL7 v2 sample of ../shared/data/hl7v2/ either maps or is refused with a reason.

The table lists each file with what the hub does with it: the message type read from MSH-9
(never the file name: ``MDM_01.hl7`` is an ADT^A01, ``SIU_12.hl7`` an ADT^A60) and the
resources its mapping produces, or the stage (peek or map), place and reason of the refusal.
A new sample file without a row fails the test, so the table cannot go stale. The last test
runs ../shared/tools/validate_fhir.js over every resource the samples map to.

Pure functions, no database: the mapping is ``connectors.hl7v2.FORMAT``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import SHARED

from connectors.hl7v2 import FORMAT
from connectors.hl7v2.ack import ack_for
from connectors.hl7v2.mapping.oru import STANDALONE_SPECIMEN
from connectors.identifiers import FACILITY, facility_system
from connectors.model import Rejected, Source

SAMPLES = SHARED / "data" / "hl7v2"
REPO = Path(__file__).resolve().parent.parent
VALIDATOR = SHARED / "tools" / "validate_fhir.js"
SOURCE = Source("bv-test-his", "64001", "Bệnh viện Đa khoa tỉnh Gia Lai", "provincial", "hl7v2-mllp")

MS = "microsoft_fhir_converter/"
PY = "python_hl7/"
E1P1 = {"Encounter": 1, "Patient": 1}
# Specimens are entries of their own: the store indexes Specimen.
assert STANDALONE_SPECIMEN
SPECIMENS_2 = {"Specimen": 2}

# file -> (MSH-9, resources by type, merges)
MAPS: dict[str, tuple[str, dict[str, int], int]] = {
    MS + "ADT-A01-01.hl7": ("ADT^A01", E1P1, 0),
    MS + "ADT-A01-02.hl7": ("ADT^A01", E1P1, 0),
    MS + "ADT-A02-01.hl7": ("ADT^A02", E1P1, 0),
    MS + "ADT-A02-02.hl7": ("ADT^A02", E1P1, 0),
    MS + "ADT-A03-01.hl7": ("ADT^A03", E1P1, 0),
    MS + "ADT-A03-02.hl7": ("ADT^A03", E1P1, 0),
    MS + "ADT-A04-01.hl7": ("ADT^A04", E1P1, 0),
    MS + "ADT-A05-01.hl7": ("ADT^A05", E1P1, 0),
    MS + "ADT-A05-02.hl7": ("ADT^A05", E1P1, 0),
    MS + "ADT-A06-01.hl7": ("ADT^A06", E1P1, 0),
    MS + "ADT-A06-02.hl7": ("ADT^A06", E1P1, 0),
    MS + "ADT-A07-01.hl7": ("ADT^A07", E1P1, 0),
    MS + "ADT-A08-01.hl7": ("ADT^A08", E1P1, 0),
    MS + "ADT-A08-02.hl7": ("ADT^A08", E1P1, 0),
    MS + "ADT-A11-02.hl7": ("ADT^A11", E1P1, 0),
    MS + "ADT-A28-01.hl7": ("ADT^A28", {"Patient": 1}, 0),
    MS + "ADT-A31-01.hl7": ("ADT^A31", {"Patient": 1}, 0),
    MS + "ADT-A31-02.hl7": ("ADT^A31", {"Patient": 1}, 0),
    MS + "ADT-A40-01.hl7": ("ADT^A40", {"Patient": 1}, 1),
    MS + "ADT-A40-02.hl7": ("ADT^A40", {"Patient": 2}, 2),
    MS + "ADT01-28.hl7": ("ADT^A01", E1P1, 0),
    MS + "ADT04-23.hl7": ("ADT^A04", E1P1, 0),
    MS + "ADT04-251.hl7": ("ADT^A04", E1P1, 0),
    MS + "MDM_01.hl7": ("ADT^A01", E1P1, 0),  # the name lies
    MS + "IZ_1_1.1_Admin_Child_Max_Message.hl7": ("VXU^V04", {"Immunization": 1, "Patient": 1}, 0),
    MS + "VXU-V04-01.hl7": ("VXU^V04", {"Immunization": 1, "Patient": 1}, 0),
    MS + "VXU.hl7": ("VXU^V04", {"Immunization": 3, "Patient": 1}, 0),
    MS + "LAB-ORM-1.hl7": ("ORM^O01", {"Patient": 1, "ServiceRequest": 1}, 0),
    MS + "ORM-O01-03.hl7": ("ORM^O01", {"Patient": 1, "ServiceRequest": 2}, 0),
    MS + "OML-O21-02.hl7": ("ORM^O01", {"Patient": 1, "ServiceRequest": 2}, 0),  # the name lies
    MS + "OML-O21-01.hl7": ("OML^O21", {"Patient": 1, "ServiceRequest": 1}, 0),
    MS + "OML-O21-03.hl7": ("OML^O21", {"Patient": 1, "ServiceRequest": 5}, 0),
    MS + "MDHHS-OML-O21-1.hl7": ("OML^O21", {"Patient": 1, "ServiceRequest": 1}, 0),
    MS + "MDHHS-OML-O21-2.hl7": ("OML^O21", {"Patient": 1, "ServiceRequest": 2}, 0),
    MS + "LAB-ORU-1.hl7": (
        "ORU^R01",
        {"DiagnosticReport": 2, "Observation": 10, "Patient": 1, **SPECIMENS_2},
        0,
    ),
    MS + "LAB-ORU-2.hl7": (
        "ORU^R01",
        {"DiagnosticReport": 2, "Observation": 10, "Patient": 1, **SPECIMENS_2},
        0,
    ),
    MS + "ORU-R01-RMGEAD.hl7": ("ORU^R01", {"DiagnosticReport": 1, "Observation": 1, "Patient": 1}, 0),
    MS + "SIU-S12-01.hl7": ("SIU^S12", {"Appointment": 1, "Patient": 1}, 0),
    MS + "SIU-S13-01.hl7": ("SIU^S13", {"Appointment": 1, "Patient": 1}, 0),
    MS + "SIU-S13-02.hl7": ("SIU^S13", {"Appointment": 1, "Patient": 1}, 0),
    MS + "SIU-S14-01.hl7": ("SIU^S14", {"Appointment": 1, "Patient": 1}, 0),
    MS + "SIU-S15-01.hl7": ("SIU^S15", {"Appointment": 1, "Patient": 1}, 0),
}

# file -> (stage, where, part of the reason, unsupported (AR) or not (AE))
_TYPE = ("peek", "MSH-9", "is not supported by the hub", True)
REFUSES: dict[str, tuple[str, str, str, bool]] = {
    MS + "ADT-A09-01.hl7": ("peek", "MSH-9", "patient tracking is not part of the record", True),
    MS + "ADT-A10-01.hl7": ("peek", "MSH-9", "patient tracking is not part of the record", True),
    MS + "ADT-A10-02.hl7": ("peek", "MSH-9", "patient tracking is not part of the record", True),
    MS + "ADT-A14-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A14-02.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A15-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A15-02.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A16-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A16-02.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A25-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A25-02.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A26-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A27-01.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A27-02.hl7": ("peek", "MSH-9", "pending events are not part of the record", True),
    MS + "ADT-A29-01.hl7": ("peek", "MSH-9", "deletion is manual", True),
    MS + "ADT-A29-02.hl7": ("peek", "MSH-9", "deletion is manual", True),
    MS + "ADT-A41-02.hl7": ("peek", "MSH-9", "A40 merges patients", True),
    MS + "ADT-A45-01.hl7": ("peek", "MSH-9", "moving visits between accounts", True),
    MS + "ADT-A47-01.hl7": ("peek", "MSH-9", "identifier changes go through A40", True),
    MS + "ADT-A47-02.hl7": ("peek", "MSH-9", "identifier changes go through A40", True),
    MS + "ADT-A60-01.hl7": ("peek", "MSH-9", "allergies over ADT are not mapped", True),
    MS + "SIU_12.hl7": ("peek", "MSH-9", "ADT^A60 (update allergy information)", True),  # the name lies
    MS + "SIU-S16-02.hl7": ("peek", "MSH-9", "SIU^S16 (discontinue appointment)", True),
    MS + "SIU-S17-01.hl7": ("peek", "MSH-9", "SIU^S17 (delete appointment)", True),
    MS + "SIU-S26-02.hl7": ("peek", "MSH-9", "no-show reporting is not mapped", True),
    MS + "ORM-O01-04.hl7": ("map", "OBR", "only service orders are mapped (not pharmacy or diet)", True),
    MS + "ORM-O01-05.hl7": ("map", "OBR", "only service orders are mapped (not pharmacy or diet)", True),
    MS + "ORM-O01-06.hl7": ("map", "OBR", "only service orders are mapped (not pharmacy or diet)", True),
    **{
        MS + name: _TYPE
        for name in (
            "BAR-P01-01.hl7",
            "BAR-P01-02.hl7",
            "BAR-P02-01.hl7",
            "BAR-P12-01.hl7",
            "BAR-P12-02.hl7",
            "DFT-P03-02.hl7",
            "DFT-P11-02.hl7",
            "MDM-T01-01.hl7",
            "MDM-T01-02.hl7",
            "MDM-T02-01.hl7",
            "MDM-T02-02.hl7",
            "MDM-T05-01.hl7",
            "MDM-T05-02.hl7",
            "MDM-T06-01.hl7",
            "MDM-T06-02.hl7",
            "MDM-T09-01.hl7",
            "MDM-T09-02.hl7",
            "MDM-T10-02.hl7",
            "OMG-O19-01.hl7",
            "OMG-O19-02.hl7",
            "OUL-R22-01.hl7",
            "OUL-R22-02.hl7",
            "OUL-R23-01.hl7",
            "OUL-R23-02.hl7",
            "OUL-R24-01.hl7",
            "OUL-R24-02.hl7",
            "PC1-Problem-Add-v2.3.1.hl7",
            "PC1-Problem-Delete-v2.3.1.hl7",
            "RDE-O11-02.hl7",
            "RDE-O25-02.hl7",
            "RDS-O13-01.hl7",
            "RDS-O13-02.hl7",
            "REF-I12-01.hl7",
            "REF-I12-02.hl7",
            "REF-I14-01.hl7",
        )
    },
    # python-hl7's parser test: a PID of placeholders and no OBR, so no result to record.
    PY + "python-hl7_rep_sample_ORU_R01_repetitions.hl7": ("map", "OBR", "ORU^R01 has no OBR segment", False),
    # The FHS/BHS batch (VINAH spec) carries an anonymised birth date in year 1013.
    PY + "python-hl7_sample_file_FHS_BHS_batch_ADT_A04_v2.5.hl7": (
        "map",
        "PID-7",
        "'99999999' is not a plausible date",
        False,
    ),
}


def _files() -> list[str]:
    return sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.glob("*/*.hl7"))


def test_every_sample_has_a_row() -> None:
    files = _files()
    assert len(files) >= 100
    assert set(files) == set(MAPS) | set(REFUSES), "add a row for each new sample file"
    assert not set(MAPS) & set(REFUSES)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_sample_maps(name: str) -> None:
    raw = (SAMPLES / name).read_bytes()
    message_type, counts, merges = MAPS[name]
    peek = FORMAT.peek(raw)
    assert peek.message_type == message_type
    assert peek.control_id
    assert peek.ordering_key and "|" in peek.ordering_key
    mapped = FORMAT.map(raw, SOURCE)
    got = Counter(e["resource"]["resourceType"] for m in mapped for e in m.entries)
    got["Patient"] += sum(len(m.patients) for m in mapped)
    assert dict(got) == counts
    assert sum(len(m.merges) for m in mapped) == merges
    for m in mapped:
        assert m.message_type == message_type
        placeholders = {p.placeholder for p in m.patients}
        for entry in m.entries:
            # Every entry is idempotent (conditional PUT on an identifier) and is about the patient.
            assert entry["request"]["method"] == "PUT"
            assert "?identifier=https://ehealth-hub.vn/sid/" in entry["request"]["url"]
            assert entry["fullUrl"].startswith("urn:uuid:")
            text = json.dumps(entry["resource"])
            assert any(p in text for p in placeholders)
    # Mapping is deterministic: the same bytes give the same Bundle entries (re-sent feeds).
    assert [m.entries for m in FORMAT.map(raw, SOURCE)] == [m.entries for m in mapped]


@pytest.mark.parametrize("name", sorted(REFUSES))
def test_sample_refused_with_reason(name: str) -> None:
    raw = (SAMPLES / name).read_bytes()
    stage, where, reason, unsupported = REFUSES[name]
    with pytest.raises(Rejected) as caught:
        if stage == "map":
            FORMAT.peek(raw)  # the envelope is fine: stored, then refused by the mapping
            FORMAT.map(raw, SOURCE)
        else:
            FORMAT.peek(raw)
    err = caught.value
    assert err.where == where
    assert reason in err.reason
    assert err.unsupported is unsupported
    # The sender is told why: AR for an unsupported type, AE for a bad field, with ERR-8.
    answer = ack_for(raw, err).decode()
    assert f"MSA|{'AR' if unsupported else 'AE'}|" in answer
    assert reason.replace("^", "\\S\\") in answer


def test_mapped_samples_are_valid_fhir(tmp_path: Path) -> None:
    """validate_fhir.js over every resource the samples map to (patients included)."""
    node = shutil.which("node")
    assert node, "node is needed for the FHIR validator"
    resources = []
    for name in sorted(MAPS):
        for m in FORMAT.map((SAMPLES / name).read_bytes(), SOURCE):
            resources += [p.resource for p in m.patients] + [e["resource"] for e in m.entries]
    path = tmp_path / "hl7v2.ndjson"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in resources), encoding="utf-8")
    done = subprocess.run(
        [node, str(VALIDATOR), "--quiet", str(path)],
        cwd=REPO,
        env={**os.environ, "FHIRVAL_DIR": str(REPO / ".fhirval")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(resources)} valid, 0 invalid" in done.stdout


def _as_transaction(name: str, source: Source, patient_key: str) -> dict[str, object]:
    """The mapped sample as one transaction Bundle. ``connectors.patients.resolve`` stands
    between the mapping and the store in the pipeline; here each patient is a conditional PUT
    on its first identifier (made unique per run by ``patient_key``), enough for the store."""
    entries: list[dict[str, object]] = []
    for m in FORMAT.map((SAMPLES / name).read_bytes(), source):
        for facts in m.patients:
            ident = facts.resource["identifier"][0]
            ident["value"] = f"{ident['value']}-{patient_key}"
            url = f"Patient?identifier={ident['system']}|{ident['value']}"
            entries.append(
                {
                    "fullUrl": facts.placeholder,
                    "resource": facts.resource,
                    "request": {"method": "PUT", "url": url},
                }
            )
        entries += m.entries
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_mapped_samples_are_stored_once(http: httpx.Client, uid: str) -> None:
    """Every mapped sample is accepted by the hub's transaction (validation, conditional
    references, indexing) and sending it again changes nothing: no duplicate anywhere."""
    facility = uid[:5].upper()
    source = Source(f"hl7-{uid}", facility, "Trạm Y tế xã Ia Kha", "commune", "hl7v2-mllp")
    org = {
        "resourceType": "Organization",
        "identifier": [{"system": FACILITY, "value": facility}],
        "name": source.facility_name,
    }
    put = http.put(f"Organization?identifier={FACILITY}|{facility}", json=org)
    assert put.status_code in (200, 201), put.text
    created: dict[str, str] = {}
    for name in sorted(MAPS):
        bundle = _as_transaction(name, source, uid)
        if not bundle["entry"]:
            continue
        first = http.post("", json=bundle)
        assert first.status_code == 200, f"{name}: {first.text[:2000]}"
        again = http.post("", json=_as_transaction(name, source, uid))
        assert again.status_code == 200, f"{name}: {again.text[:2000]}"
        one = [e["response"]["location"].split("/_history")[0] for e in first.json()["entry"]]
        two = [e["response"]["location"].split("/_history")[0] for e in again.json()["entry"]]
        assert one == two, f"{name}: re-sending created new resources"
        created |= dict.fromkeys(one, name)
    kinds = {ref.split("/fhir/")[-1].split("/")[0] for ref in created}
    expected = {"Patient", "Encounter", "Observation", "DiagnosticReport", "ServiceRequest"}
    expected |= {"Appointment", "Immunization", "Specimen"}
    assert kinds == expected
    # Each stored Specimen is searchable and found from the report that names it.
    specimens = [ref.split("/fhir/")[-1] for ref in created if "/Specimen/" in ref]
    assert specimens
    for ref in specimens:
        reports = http.get("DiagnosticReport", params={"specimen": ref}).json()
        assert reports.get("total", len(reports.get("entry", []))) >= 1, ref
        stored = http.get(ref).json()
        found = http.get(
            "Specimen",
            params={"identifier": f"{stored['identifier'][0]['system']}|{stored['identifier'][0]['value']}"},
        ).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [stored["id"]]
    # The facility is referenced, not copied: the conditional reference resolved to it.
    enc = http.get(
        "Encounter", params={"identifier": f"{facility_system('visit', facility)}|40007716"}
    ).json()
    assert len(enc["entry"]) == 1
    org_id = put.json()["id"]
    assert enc["entry"][0]["resource"]["serviceProvider"]["reference"] == f"Organization/{org_id}"


def test_damaged_samples_are_refused_never_crash() -> None:
    """Truncated, cut or scrambled copies of every mappable sample either map or raise
    ``Rejected`` (stored as rejected, answered with AE/AR): any other exception would be
    taken for a transient failure and retried until dead-lettered."""
    rnd = random.Random(11)
    outcomes: Counter[str] = Counter()
    for name in sorted(MAPS):
        raw = (SAMPLES / name).read_bytes()
        for k in range(24):
            damaged = bytearray(raw)
            where = rnd.randrange(len(damaged))
            if k % 4 == 0:
                del damaged[where:]
            elif k % 4 == 1:
                for _ in range(6):
                    damaged[rnd.randrange(len(damaged))] = rnd.choice(b"|^~\\&\r\n09AZ \x00\xff")
            elif k % 4 == 2:
                del damaged[where : where + rnd.randrange(1, 60)]
            else:
                damaged[where:where] = bytes(rnd.choice(b"|^~&\\") for _ in range(rnd.randrange(1, 6)))
            try:
                FORMAT.peek(bytes(damaged))
                FORMAT.map(bytes(damaged), SOURCE)
                outcomes["mapped"] += 1
            except Rejected as err:
                assert err.reason
                outcomes["refused"] += 1
                ack_for(bytes(damaged), err)  # and the sender can be told
    assert outcomes["mapped"] and outcomes["refused"]
