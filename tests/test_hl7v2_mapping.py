"""HL7 v2 mapping, peek, ACK and framing: what each message family produces, field by field.

Vietnamese-flavoured synthetic messages (CCCD and BHYT in PID-3, names with diacritics,
UTF-8, LF endings and a BOM) and the shared samples are mapped with ``connectors.hl7v2``
(pure functions, no database) and the FHIR is checked: identifiers in the hub's systems,
values, units, reference ranges, flags, codes, statuses, references. The ACK is read back
by python-hl7 and hl7apy (third-party parsers); the framing is exercised over a real socket
with python-hl7's MLLP client as the sender. The last test prints messages/s of peek+map
(lean path) and of ACK building (lean vs hl7apy) on one core: a figure, not an assertion.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from conftest import SHARED
from hl7.client import MLLPClient

from connectors.hl7v2 import FORMAT
from connectors.hl7v2.ack import ack, ack_for
from connectors.hl7v2.framing import Deframer, frame, normalize
from connectors.hl7v2.mapping.common import ts
from connectors.hl7v2.mapping.oru import STANDALONE_SPECIMEN
from connectors.hl7v2.parse import masked
from connectors.identifiers import BHXH, BHYT, CCCD, facility_system
from connectors.model import Mapped, Rejected, Source

SAMPLES = SHARED / "data" / "hl7v2"
SOURCE = Source("bvdk-gialai-his", "64001", "Bệnh viện Đa khoa tỉnh Gia Lai", "provincial", "hl7v2-mllp")
ORG = "Organization?identifier=https://ehealth-hub.vn/sid/cskcb|64001"
MRN = facility_system("mrn", "64001")


def message(*segments: str, lf: bool = True, bom: bool = True) -> bytes:
    """A message as a Vietnamese HIS might write it to a file: UTF-8, LF endings, a BOM."""
    body = ("\n" if lf else "\r").join(segments) + ("\n" if lf else "\r")
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8")


MSH = "MSH|^~\\&|HIS_VNPT|64001|EHEALTH_HUB|SYT_GIALAI|20240315083000+0700||{type}|{id}|P|{version}|||AL|NE|VNM|UNICODE UTF-8"
PID_VN = (
    "PID|1||079085001234^^^BCA^NI~GD4797901234567^^^BHYT^HC~BN-2024-0001^^^64001^MR||"
    "Nguyễn Văn An^^^^^^L||19850412|M|||12 Lê Lợi^Phường Hội Thương^Pleiku^Gia Lai^600000^VN^H"
    "||0905123456^PRN^CP~an.nguyen@example.vn^NET^Internet|||M"
)
PV1_VN = (
    "PV1|1|I|NOI1^P101^G02^64001||||BS001^Trần^Thị Bình^^^BS.|||MED||||7|||BS001^Trần^Thị Bình"
    "||VV20240315001|||||||||||||||||01||||||||20240315080000|20240320101500"
)


def adt(
    trigger: str, *extra: str, control: str = "VN-ADT-1", pv1: str = PV1_VN, version: str = "2.5"
) -> bytes:
    return message(
        MSH.format(type=f"ADT^{trigger}^ADT_A01", id=control, version=version),
        f"EVN|{trigger}|20240315083000",
        PID_VN,
        pv1,
        *extra,
    )


def only(mapped: list[Mapped]) -> Mapped:
    assert len(mapped) == 1
    return mapped[0]


def resources(m: Mapped, kind: str) -> list[dict[str, Any]]:
    """The mapped resources of one type, contained ones included."""
    out = []
    for entry in m.entries:
        res = entry["resource"]
        out += [c for c in res.get("contained", []) if c["resourceType"] == kind]
        if res["resourceType"] == kind:
            out.append(res)
    return out


# --- the patient ---------------------------------------------------------------------------


def test_vietnamese_patient_from_pid() -> None:
    m = only(FORMAT.map(adt("A01", "NK1|1|Trần^Thị Hoa|MTH^Mẹ^HL70063||0912345678^PRN^CP"), SOURCE))
    (facts,) = m.patients
    p = facts.resource
    assert facts.placeholder.startswith("urn:uuid:")
    systems = {(i["system"], i["value"]) for i in p["identifier"]}
    assert systems == {
        (CCCD, "079085001234"),
        (BHYT, "GD4797901234567"),
        (BHXH, "7901234567"),  # the last 10 characters of the card: stable across renewals
        (MRN, "BN-2024-0001"),
    }
    # Family name first: "Nguyễn Văn An" in one component is family Nguyễn, given Văn An.
    assert p["name"] == [
        {"use": "official", "text": "Nguyễn Văn An", "family": "Nguyễn", "given": ["Văn", "An"]}
    ]
    assert p["gender"] == "male"
    assert p["birthDate"] == "1985-04-12"
    assert p["address"] == [
        {
            "use": "home",
            "line": ["12 Lê Lợi", "Phường Hội Thương"],
            "city": "Pleiku",
            "state": "Gia Lai",
            "postalCode": "600000",
            "country": "VN",
            "text": "12 Lê Lợi, Phường Hội Thương, Pleiku, Gia Lai, VN",
        }
    ]
    assert p["telecom"] == [
        {"system": "phone", "value": "0905123456", "use": "mobile"},
        {"system": "email", "value": "an.nguyen@example.vn", "use": "home"},
    ]
    assert p["managingOrganization"]["reference"] == ORG
    # NK1: the next of kin (người thân), family name first in its own component too.
    assert p["contact"] == [
        {
            "relationship": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0063",
                            "code": "MTH",
                            "display": "Mẹ",
                        }
                    ],
                    "text": "Mẹ",
                }
            ],
            "name": {"text": "Trần Thị Hoa", "family": "Trần", "given": ["Thị", "Hoa"]},
            "telecom": [{"system": "phone", "value": "0912345678", "use": "mobile"}],
        }
    ]


def test_peek_reads_msh_and_strongest_identifier() -> None:
    peek = FORMAT.peek(adt("A01", control="VN-42"))
    assert (peek.message_type, peek.control_id) == ("ADT^A01", "VN-42")
    assert peek.ordering_key == f"{CCCD}|079085001234"
    # Without a CCCD, the BHYT card orders by its BHXH number (same across card renewals).
    no_cccd = adt("A01").replace(b"079085001234^^^BCA^NI~", b"")
    assert FORMAT.peek(no_cccd).ordering_key == f"{BHXH}|7901234567"
    only_mrn = adt("A01").replace(b"079085001234^^^BCA^NI~GD4797901234567^^^BHYT^HC~", b"")
    assert FORMAT.peek(only_mrn).ordering_key == "mrn:64001|BN-2024-0001"


def test_peek_tolerates_framing_crlf_and_trailing_garbage() -> None:
    raw = adt("A04")
    for variant in (
        frame(raw),
        raw.replace(b"\n", b"\r\n"),
        raw.replace(b"\n", b"\r"),
        raw[3:],  # no BOM
        raw + b"\n\n   \n\t",
        b"\x0b" + raw + b"\x1c\r\n",
    ):
        assert FORMAT.peek(variant).message_type == "ADT^A04"
        assert only(FORMAT.map(variant, SOURCE)).entries == only(FORMAT.map(raw, SOURCE)).entries


def test_partial_birth_dates_keep_their_precision() -> None:
    for sent, kept in (
        ("1985", "1985"),
        ("198504", "1985-04"),
        ("19850412", "1985-04-12"),
        ("198504120830", "1985-04-12"),
    ):
        raw = adt("A28").replace(b"|19850412|", f"|{sent}|".encode())
        assert only(FORMAT.map(raw, SOURCE)).patients[0].resource["birthDate"] == kept


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("2024", "2024"),
        ("202403", "2024-03"),
        ("20240315", "2024-03-15"),
        ("2024031508", "2024-03-15T08:00:00+07:00"),
        ("202403150830", "2024-03-15T08:30:00+07:00"),
        ("20240315083015.25+0000", "2024-03-15T08:30:15.25Z"),
        ("20240315083015-0500", "2024-03-15T08:30:15-05:00"),
    ],
)
def test_timestamps(sent: str, expected: str) -> None:
    assert ts(sent, "X-1") == expected


@pytest.mark.parametrize(
    "sent", ["2024-03-15", "20241301", "20240230", "202403152500", "20240315083000+1500", "1700"]
)
def test_bad_timestamps(sent: str) -> None:
    with pytest.raises(Rejected) as caught:
        ts(sent, "OBR-7")
    # The value's shape, not its digits (error texts are unsealed: test_connector_attacks).
    assert caught.value.where == "OBR-7" and repr(masked(sent)) in caught.value.reason
    assert repr(sent) not in caught.value.reason


@pytest.mark.parametrize(
    ("field", "value", "where", "reason"),
    [
        ("birth", "20231345", "PID-7", "'99999999' is not a date (no such month)"),
        ("birth", "2023-12-01", "PID-7", "'9999-99-99' is not a date"),
        ("birth", "20230230", "PID-7", "'99999999' is not a date (no such day in its month)"),
        ("sex", "X", "PID-8", "'X' is not a sex code"),
    ],
)
def test_malformed_fields_are_refused_with_their_place(
    field: str, value: str, where: str, reason: str
) -> None:
    raw = adt("A01")
    raw = (
        raw.replace(b"|19850412|", f"|{value}|".encode())
        if field == "birth"
        else raw.replace(b"|19850412|M|", f"|19850412|{value}|".encode())
    )
    with pytest.raises(Rejected) as caught:
        FORMAT.map(raw, SOURCE)
    assert caught.value.where == where
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{where}: ")
    assert not caught.value.unsupported


def test_unparseable_and_unsupported() -> None:
    for raw, where in ((b"", "MSH"), (b"hello, this is not HL7", "MSH"), (b"PID|1||123\rMSH|^~\\&|", "MSH")):
        with pytest.raises(Rejected) as caught:
            FORMAT.peek(raw)
        assert caught.value.where == where
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(message(MSH.format(type="ADT^A99", id="X1", version="2.5"), PID_VN))
    assert caught.value.unsupported and caught.value.where == "MSH-9"
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(message(MSH.format(type="ADT^A01", id="X1", version="3.0"), PID_VN))
    assert caught.value.unsupported and caught.value.where == "MSH-12"
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(message(MSH.format(type="ADT^A01", id="", version="2.5"), PID_VN))
    assert caught.value.where == "MSH-10"


def test_all_versions_read_alike() -> None:
    base = only(FORMAT.map(adt("A01"), SOURCE))
    for version in ("2.3", "2.3.1", "2.4", "2.5.1", "2.6", "2.7", "2.8"):
        m = only(FORMAT.map(adt("A01", version=version), SOURCE))
        assert m.entries == base.entries and m.patients[0].resource == base.patients[0].resource


# --- ADT -----------------------------------------------------------------------------------


def test_adt_encounter_lifecycle() -> None:
    admit = only(FORMAT.map(adt("A01"), SOURCE))
    (entry,) = admit.entries
    enc = entry["resource"]
    visit = facility_system("visit", "64001")
    assert entry["request"] == {"method": "PUT", "url": f"Encounter?identifier={visit}|VV20240315001"}
    assert enc["status"] == "in-progress"
    assert enc["class"]["code"] == "IMP"
    assert enc["subject"] == {"reference": admit.patients[0].placeholder}
    assert enc["serviceProvider"]["reference"] == ORG
    assert enc["period"] == {"start": "2024-03-15T08:00:00+07:00"}  # no end while admitted
    assert enc["location"][0]["location"]["display"] == "NOI1, room P101, bed G02, 64001"
    attender = enc["participant"][0]
    assert attender["type"][0]["coding"][0]["code"] == "ATND"
    assert attender["individual"]["identifier"] == {
        "system": facility_system("practitioner", "64001"),
        "value": "BS001",
    }
    assert attender["individual"]["display"] == "BS. Trần Thị Bình"
    # A04 registers (arrived), A03 discharges with the end, A11 cancels: one Encounter, updated.
    assert only(FORMAT.map(adt("A04"), SOURCE)).entries[0]["resource"]["status"] == "arrived"
    discharge = only(FORMAT.map(adt("A03"), SOURCE)).entries[0]
    assert discharge["request"]["url"] == entry["request"]["url"]
    assert discharge["resource"]["status"] == "finished"
    assert discharge["resource"]["period"] == {
        "start": "2024-03-15T08:00:00+07:00",
        "end": "2024-03-20T10:15:00+07:00",
    }
    assert discharge["resource"]["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "01"
    assert only(FORMAT.map(adt("A11"), SOURCE)).entries[0]["resource"]["status"] == "cancelled"
    # A08 updates: with a discharge time the visit is over.
    assert only(FORMAT.map(adt("A08"), SOURCE)).entries[0]["resource"]["status"] == "finished"
    # A28/A31 carry the person only.
    assert only(FORMAT.map(adt("A31"), SOURCE)).entries == []


def test_adt_without_visit_number_uses_the_message_id() -> None:
    pv1 = "PV1|1|O|KHAM1^P05"
    m = only(FORMAT.map(adt("A04", pv1=pv1, control="MSG-777"), SOURCE))
    enc = m.entries[0]["resource"]
    assert enc["identifier"][0] == {
        "use": "official",
        "system": facility_system("message", "64001"),
        "value": "MSG-777",
    }
    assert enc["class"]["code"] == "AMB"


def test_adt_a40_merge() -> None:
    raw = message(
        MSH.format(type="ADT^A40^ADT_A39", id="VN-MRG-1", version="2.5"),
        "EVN|A40|20240316090000",
        PID_VN,
        "MRG|BN-2019-0456^^^64001^MR",
    )
    m = only(FORMAT.map(raw, SOURCE))
    assert m.entries == []
    (survivor,) = m.patients
    assert m.merges == [(survivor.placeholder, [{"system": MRN, "value": "BN-2019-0456"}])]
    sample = only(FORMAT.map((SAMPLES / "microsoft_fhir_converter/ADT-A40-02.hl7").read_bytes(), SOURCE))
    assert [ids for _, ids in sample.merges] == [
        [{"system": MRN, "value": "56789"}],
        [{"system": MRN, "value": "569"}],
    ]
    without_mrg = message(MSH.format(type="ADT^A40", id="VN-MRG-2", version="2.5"), PID_VN)
    with pytest.raises(Rejected, match="MRG"):
        FORMAT.map(without_mrg, SOURCE)


def test_sample_adt_a01_fields() -> None:
    m = only(FORMAT.map((SAMPLES / "microsoft_fhir_converter/ADT-A01-01.hl7").read_bytes(), SOURCE))
    p = m.patients[0].resource
    # PID-3 has two MRs and an SSN: the first MR is the facility's MRN; the SSN is not kept.
    assert p["identifier"] == [
        {
            "system": MRN,
            "value": "PATID1234",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
        }
    ]
    assert p["address"][0]["line"] == ["1000 Hospital Lane", "Ste. 123"]
    assert p["deceasedDateTime"] == "2008-08-25T11:16:30+01:15"
    enc = m.entries[0]["resource"]
    assert enc["identifier"][0]["value"] == "40007716"
    assert enc["reasonCode"][0]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "140004",
        "display": "Chronic pharyngitis",
    }
    assert [x["type"][0]["coding"][0]["code"] for x in enc["participant"]] == ["ATND", "REF", "CON", "ADM"]


# --- ORU -----------------------------------------------------------------------------------

ORU_VN = (
    MSH.format(type="ORU^R01^ORU_R01", id="XN-20240315-0007", version="2.5.1"),
    PID_VN,
    "ORC|RE|CD-123|XN-555",
    "OBR|1|CD-123|XN-555|24323-8^Xét nghiệm sinh hóa máu^LN|||20240315070000|||||||||BS001^Trần^Thị Bình||||||20240315101500|||F",
    "NTE|1||Kết quả đã được bác sĩ duyệt",
    "OBX|1|NM|2345-7^Glucose^LN||7.8|mmol/L^mmol/L^UCUM|3.9-6.4|H|||F|||20240315090000||KTV01^Lê^Văn Cường",
    "NTE|1||Bệnh nhân chưa nhịn ăn",
    "OBX|2|NM|2160-0^Creatinine^LN||88|umol/l|62-106|N|||F",
    "OBX|3|SN|1988-5^CRP^LN||<^0.5|mg/L^^UCUM|<5||||F",
    "OBX|4|SN|5195-3^HBsAg titer^LN||^1^:^128||||||F",
    "OBX|5|SN|2093-3^Cholesterol^LN||^4.1^-^5.2|mmol/L^^UCUM|>3||||C",
    "OBX|6|CWE|5196-1^HBsAg^LN||NEG^Âm tính^HL70078||||||F",
    "OBX|7|ST|5778-6^Màu nước tiểu^LN||Vàng nhạt||||||F",
    "OBX|8|NM|718-7^Hemoglobin^LN||||||||I",
    "SPM|1|MAU-0315-07^XN-555||SER^Huyết thanh^HL70487|||||||||||||20240315070500|20240315073000",
)


def test_oru_observations_report_and_specimen() -> None:
    m = only(FORMAT.map(message(*ORU_VN), SOURCE))
    filler = facility_system("filler", "64001")
    patient_ref = {"reference": m.patients[0].placeholder}
    obs = {o["identifier"][0]["value"]: o for o in resources(m, "Observation")}
    assert list(obs) == [
        "XN-555/1/2345-7",
        "XN-555/2/2160-0",
        "XN-555/3/1988-5",
        "XN-555/4/5195-3",
        "XN-555/5/2093-3",
        "XN-555/6/5196-1",
        "XN-555/7/5778-6",
        "XN-555/8/718-7",
    ]
    glucose = obs["XN-555/1/2345-7"]
    assert glucose["identifier"][0]["system"] == filler
    assert glucose["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}
    ]
    assert glucose["valueQuantity"] == {
        "value": 7.8,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert glucose["referenceRange"] == [
        {
            "low": {"value": 3.9, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
            "high": {"value": 6.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
        }
    ]
    assert glucose["interpretation"] == [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": "H",
                    "display": "High",
                }
            ]
        }
    ]
    assert glucose["status"] == "final"
    assert glucose["effectiveDateTime"] == "2024-03-15T09:00:00+07:00"  # OBX-14
    assert glucose["issued"] == "2024-03-15T10:15:00+07:00"  # OBR-22
    assert glucose["note"] == [{"text": "Bệnh nhân chưa nhịn ăn"}]
    assert glucose["subject"] == patient_ref
    assert glucose["performer"][0]["reference"] == ORG
    assert glucose["performer"][1]["display"] == "Lê Văn Cường"
    creat = obs["XN-555/2/2160-0"]
    # "umol/l" is not UCUM as sent: the unit text is kept, the UCUM code is umol/L.
    assert creat["valueQuantity"] == {
        "value": 88,
        "unit": "umol/l",
        "system": "http://unitsofmeasure.org",
        "code": "umol/L",
    }
    assert creat["effectiveDateTime"] == "2024-03-15T07:00:00+07:00"  # OBR-7 when OBX-14 is empty
    assert creat["interpretation"][0]["coding"][0]["code"] == "N"
    crp = obs["XN-555/3/1988-5"]
    assert crp["valueQuantity"] == {
        "value": 0.5,
        "comparator": "<",
        "unit": "mg/L",
        "system": "http://unitsofmeasure.org",
        "code": "mg/L",
    }
    assert crp["referenceRange"] == [
        {"high": {"value": 5, "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"}}
    ]
    assert obs["XN-555/4/5195-3"]["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    chol = obs["XN-555/5/2093-3"]
    assert chol["valueRange"]["low"]["value"] == 4.1 and chol["valueRange"]["high"]["value"] == 5.2
    assert chol["referenceRange"] == [
        {"low": {"value": 3, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}
    ]
    assert chol["status"] == "corrected"
    assert obs["XN-555/6/5196-1"]["valueCodeableConcept"] == {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0078", "code": "NEG", "display": "Âm tính"}
        ],
        "text": "Âm tính",
    }
    assert obs["XN-555/7/5778-6"]["valueString"] == "Vàng nhạt"
    pending = obs["XN-555/8/718-7"]
    assert pending["status"] == "registered" and not any(k.startswith("value") for k in pending)
    (report,) = resources(m, "DiagnosticReport")
    assert report["identifier"] == [{"system": filler, "value": "XN-555"}]
    assert report["status"] == "final"
    assert report["code"]["coding"][0]["code"] == "24323-8"
    assert report["conclusion"] == "Kết quả đã được bác sĩ duyệt"
    assert report["basedOn"] == [
        {
            "type": "ServiceRequest",
            "identifier": {"system": facility_system("placer", "64001"), "value": "CD-123"},
        }
    ]
    urls = {e["resource"]["identifier"][0]["value"]: e["fullUrl"] for e in m.entries}
    assert [r["reference"] for r in report["result"]] == [urls[v] for v in obs]
    (specimen,) = resources(m, "Specimen")
    assert specimen["identifier"] == [{"system": filler, "value": "XN-555/MAU-0315-07"}]
    assert specimen["subject"] == patient_ref
    assert specimen["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0487",
        "code": "SER",
        "display": "Huyết thanh",
    }
    assert specimen["collection"] == {"collectedDateTime": "2024-03-15T07:05:00+07:00"}
    assert specimen["receivedTime"] == "2024-03-15T07:30:00+07:00"
    # The registry indexes Specimen: an entry of its own, referenced by report and results.
    assert STANDALONE_SPECIMEN and "contained" not in report and "id" not in specimen
    assert report["specimen"] == [{"reference": urls[specimen["identifier"][0]["value"]]}]
    assert glucose["specimen"] == report["specimen"][0]
    # Each entry is a conditional PUT on the identifier it carries.
    for entry in m.entries:
        ident = entry["resource"]["identifier"][0]
        assert entry["request"]["method"] == "PUT"
        assert entry["request"]["url"].startswith(
            f"{entry['resource']['resourceType']}?identifier={ident['system']}|"
        )


def test_oru_bad_number_is_refused_at_its_obx() -> None:
    raw = message(*ORU_VN).replace(b"||7.8|", b"||7,8|")
    with pytest.raises(Rejected) as caught:
        FORMAT.map(raw, SOURCE)
    assert (caught.value.where, caught.value.reason) == ("OBX[1]-5", "'9,9' is not a number")
    answer = ack(raw, "AE", caught.value.reason, caught.value.where).decode()
    assert "ERR||OBX^1^5^1|102^Data type error^HL70357|E||||'9,9' is not a number" in answer


def test_sample_oru_v24_structured_numeric_and_v23_specimen() -> None:
    m = only(FORMAT.map((SAMPLES / "microsoft_fhir_converter/ORU-R01-RMGEAD.hl7").read_bytes(), SOURCE))
    (glucose,) = resources(m, "Observation")
    assert glucose["valueQuantity"] == {
        "value": 182,
        "unit": "mg/dl",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert (
        glucose["referenceRange"][0]["low"]["value"] == 70
        and glucose["referenceRange"][0]["high"]["value"] == 105
    )
    assert glucose["interpretation"][0]["coding"][0]["code"] == "H"
    obr15 = message(*ORU_VN[:4], *ORU_VN[5:7]).replace(
        b"|||20240315070000|||||||||", "|||20240315070000||||||||BLD&Máu&HL70070|".encode()
    )
    spec = resources(only(FORMAT.map(obr15, SOURCE)), "Specimen")
    assert spec[0]["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0070",
        "code": "BLD",
        "display": "Máu",
    }


# --- orders --------------------------------------------------------------------------------


def test_orm_service_request() -> None:
    raw = message(
        MSH.format(type="ORM^O01^ORM_O01", id="CD-MSG-1", version="2.3"),
        PID_VN,
        "ORC|NW|CD-123|||SC||^^^20240315080000^^S||20240315075500|||BS001^Trần^Thị Bình",
        "OBR|1|CD-123||24323-8^Xét nghiệm sinh hóa máu^LN|||||||||||||||||||||||||||R10.4^Đau bụng^I10",
        "NTE|1||Nhịn ăn 8 giờ",
    )
    m = only(FORMAT.map(raw, SOURCE))
    (sr,) = resources(m, "ServiceRequest")
    assert (
        m.entries[0]["request"]["url"]
        == f"ServiceRequest?identifier={facility_system('placer', '64001')}|CD-123"
    )
    assert sr["identifier"][0]["value"] == "CD-123"
    assert sr["status"] == "active" and sr["intent"] == "order"
    assert sr["priority"] == "stat"
    assert sr["code"]["coding"][0]["code"] == "24323-8"
    assert sr["occurrenceDateTime"] == "2024-03-15T08:00:00+07:00"
    assert sr["authoredOn"] == "2024-03-15T07:55:00+07:00"
    assert sr["requester"]["identifier"]["value"] == "BS001"
    assert sr["reasonCode"][0]["coding"][0] == {
        "system": "http://hl7.org/fhir/sid/icd-10",
        "code": "R10.4",
        "display": "Đau bụng",
    }
    assert sr["note"] == [{"text": "Nhịn ăn 8 giờ"}]
    cancelled = raw.replace(b"ORC|NW|CD-123|||SC|", b"ORC|CA|CD-123|||CA|")
    assert resources(only(FORMAT.map(cancelled, SOURCE)), "ServiceRequest")[0]["status"] == "revoked"


def test_sample_oml_o21() -> None:
    m = only(FORMAT.map((SAMPLES / "microsoft_fhir_converter/MDHHS-OML-O21-2.hl7").read_bytes(), SOURCE))
    first, second = resources(m, "ServiceRequest")
    # Two OBR under one ORC share its placer number: each is its own request.
    assert first["identifier"][0]["value"] == "ORD723222"
    assert second["identifier"][0]["value"] == "ORD723222/2"
    assert first["code"]["coding"][0]["code"] == "1320" and second["code"]["coding"][0]["code"] == "1680"
    assert len({e["request"]["url"] for e in m.entries}) == 2


# --- SIU -----------------------------------------------------------------------------------


def test_siu_appointment_lifecycle() -> None:
    m = only(FORMAT.map((SAMPLES / "microsoft_fhir_converter/SIU-S12-01.hl7").read_bytes(), SOURCE))
    (appt,) = resources(m, "Appointment")
    system = facility_system("appointment", "64001")
    assert appt["identifier"] == [{"system": system, "value": "36996"}, {"system": system, "value": "12345"}]
    assert m.entries[0]["request"]["url"] == f"Appointment?identifier={system}|36996"
    assert appt["status"] == "booked"
    assert (appt["start"], appt["end"]) == (
        "2021-09-24T09:30:00+02:15",
        "2021-09-24T10:20:00+02:15",
    )  # TQ1-7/8
    assert appt["serviceType"][0]["coding"][0]["code"] == "76164006"
    assert appt["comment"] == "Appointment booked for emergency procedure"
    actors = [p["actor"] for p in appt["participant"]]
    assert actors[0] == {"reference": m.patients[0].placeholder}
    assert actors[1]["identifier"]["value"] == "1210"  # AIP-3
    assert actors[2] == {"type": "Location", "display": "055, Room01, GH Clinic"}  # AIL-3
    assert actors[3] == {"type": "Device", "display": "EVIS X12 Video Colonoscope"}  # AIG-3
    for name, status in (
        ("SIU-S13-01.hl7", "booked"),
        ("SIU-S14-01.hl7", "booked"),
        ("SIU-S15-01.hl7", "cancelled"),
    ):
        got = resources(
            only(FORMAT.map((SAMPLES / "microsoft_fhir_converter" / name).read_bytes(), SOURCE)),
            "Appointment",
        )[0]
        assert got["status"] == status
        assert got["identifier"][0]["value"] == "36996"  # the same Appointment, updated


def test_siu_times_from_ais_duration() -> None:
    raw = message(
        MSH.format(type="SIU^S12^SIU_S12", id="LH-1", version="2.5"),
        "SCH|LH-0001|LH-0001||||TK^Tái khám^L|||||",
        PID_VN,
        "RGS|1",
        "AIS|1||KHAM^Khám tái khám^L|20240322083000|||30|min",
        "AIP|1||BS001^Trần^Thị Bình",
    )
    appt = resources(only(FORMAT.map(raw, SOURCE)), "Appointment")[0]
    assert appt["start"] == "2024-03-22T08:30:00+07:00"
    assert appt["end"] == "2024-03-22T09:00:00+07:00"
    assert appt["minutesDuration"] == 30
    with pytest.raises(Rejected, match="needs a start time"):
        FORMAT.map(raw.replace(b"|20240322083000|||30|min", b"|"), SOURCE)


# --- VXU -----------------------------------------------------------------------------------


def test_vxu_immunization() -> None:
    raw = message(
        MSH.format(type="VXU^V04^VXU_V04", id="TC-2024-1", version="2.5.1"),
        PID_VN,
        "ORC|RE||TC-889^TYT-XA",
        "RXA|0|1|20240310090000||115^Tdap^CVX|0.5|mL^mL^UCUM||00^New Record^NIP001|YT01^Phạm^Thị Dung|^^^Trạm Y tế xã Ia Kha||||LOT-VN-77|20250601|SKY^SK Bioscience^MVX|||CP|A",
        "RXR|IM^Tiêm bắp^HL70162|LD^Cánh tay trái^HL70163",
        "ORC|RE||TC-890^TYT-XA",
        "RXA|0|1|20240310||03^MMR^CVX|999||||||||||||00^Cha mẹ từ chối^NIP002||RE|A",
    )
    m = only(FORMAT.map(raw, SOURCE))
    given, refused = resources(m, "Immunization")
    system = facility_system("immunization", "64001")
    assert given["identifier"] == [{"system": system, "value": "TC-889"}]
    assert given["status"] == "completed"
    assert given["vaccineCode"]["coding"][0] == {
        "system": "http://hl7.org/fhir/sid/cvx",
        "code": "115",
        "display": "Tdap",
    }
    assert given["occurrenceDateTime"] == "2024-03-10T09:00:00+07:00"
    assert given["doseQuantity"] == {
        "value": 0.5,
        "unit": "mL",
        "system": "http://unitsofmeasure.org",
        "code": "mL",
    }
    assert given["lotNumber"] == "LOT-VN-77" and given["expirationDate"] == "2025-06-01"
    assert given["manufacturer"] == {"display": "SK Bioscience"}
    assert given["primarySource"] is True
    assert given["route"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0162",
        "code": "IM",
        "display": "Tiêm bắp",
    }
    assert given["site"]["coding"][0]["code"] == "LD"
    assert given["performer"][0]["function"]["coding"][0]["code"] == "AP"
    assert given["performer"][0]["actor"]["display"] == "Phạm Thị Dung"
    assert given["patient"] == {"reference": m.patients[0].placeholder}
    assert refused["status"] == "not-done"
    assert refused["statusReason"]["coding"][0]["code"] == "00"
    assert "doseQuantity" not in refused  # 999 = unknown amount
    assert refused["occurrenceDateTime"] == "2024-03-10"


# --- ACK -----------------------------------------------------------------------------------


def test_ack_mirrors_the_message() -> None:
    raw = adt("A01", control="VN-ACK-1", version="2.5.1")
    text = ack(raw, "AA").decode()
    parsed = hl7.parse(text)
    msh, msa = parsed.segment("MSH"), parsed.segment("MSA")
    assert str(msh(3)) == "EHEALTH_HUB" and str(msh(4)) == "SYT_GIALAI"  # swapped
    assert str(msh(5)) == "HIS_VNPT" and str(msh(6)) == "64001"
    assert str(msh(9)) == "ACK^A01^ACK"
    assert str(msh(12)) == "2.5.1"
    assert str(msh(18)) == "UNICODE UTF-8"
    assert str(msh(10)) and str(msh(10)) != "VN-ACK-1" and len(str(msh(10))) <= 20
    assert (str(msa(1)), str(msa(2))) == ("AA", "VN-ACK-1")
    assert "ERR" not in text


def test_ack_error_segments() -> None:
    raw = adt("A01", control="VN-ACK-2", version="2.5")
    text = ack(raw, "AE", "'20231345' is not a date | bad", "PID-7").decode()
    err = hl7.parse(text).segment("ERR")
    assert str(err(2)) == "PID^1^7^1"
    assert str(err(3)) == "102^Data type error^HL70357"
    assert str(err(4)) == "E"
    assert str(err(8)) == "'20231345' is not a date \\F\\ bad"  # escaped, so the ACK stays parseable
    # v2.3/2.4 senders get ERR-1 (ELD) and MSA-3 instead.
    old = ack(adt("A01", control="VN-ACK-3", version="2.3"), "AE", "bad date", "PID-7").decode()
    parsed = hl7.parse(old)
    assert str(parsed.segment("MSH")(9)) == "ACK^A01"
    assert str(parsed.segment("MSA")(3)) == "bad date"
    assert str(parsed.segment("ERR")(1)) == "PID^1^7^102&Data type error&HL70357"


def test_ack_answers_in_the_senders_charset() -> None:
    latin = adt("A01", control="VN-ACK-5").replace(b"UNICODE UTF-8", b"8859/1")
    answer = ack(latin, "AE", "Tên không hợp lệ: Müller", "PID-5")
    assert "Müller".encode("latin-1") in answer  # what the sender can decode
    assert ack(adt("A01"), "AE", "Tên không hợp lệ", "PID-5").decode("utf-8").count("Tên không hợp lệ") == 1


def test_ack_for_anything() -> None:
    for junk in (b"", b"\x00\xff garbage", b"GET / HTTP/1.1\r\n\r\n", b"MSH|"):
        text = ack(junk, "AR", "not an HL7 v2 message: no MSH segment", "MSH").decode()
        parsed = hl7.parse(text)
        assert str(parsed.segment("MSA")(1)) == "AR"
        assert str(parsed.segment("MSH")(12)) == "2.5"
        assert str(parsed.segment("ERR")(3)).startswith("100^")
    unsupported = message(MSH.format(type="MFN^M02", id="MF-1", version="2.5"))
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(unsupported)
    text = ack_for(unsupported, caught.value).decode()
    assert "MSA|AR|MF-1" in text and "|200^Unsupported message type^HL70357|E|" in text
    assert ack_for(unsupported, None).decode().split("\r")[1] == "MSA|AA|MF-1"


def test_ack_is_valid_for_hl7apy() -> None:
    """hl7apy (which knows the v2 message structures) accepts the ACKs as ACK messages."""
    from hl7apy.parser import parse_message

    for version in ("2.3", "2.5", "2.5.1", "2.6"):
        raw = adt("A01", control="VN-ACK-4", version=version)
        for code in ("AA", "AE"):
            text = ack(
                raw, code, "PID-7: bad date" if code == "AE" else None, "PID-7" if code == "AE" else None
            )
            parsed = parse_message(text.decode().rstrip("\r"), find_groups=False)
            assert parsed.msh.msh_9.msh_9_1.value == "ACK"
            assert parsed.msa.msa_1.value == code
            assert parsed.msa.msa_2.value == "VN-ACK-4"


# --- framing -------------------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize(b"\xef\xbb\xbfMSH|x\nPID|1\n\n") == b"MSH|x\rPID|1"
    assert normalize(b"\x0bMSH|x\r\nPID|1  \r\n\x1c\r") == b"MSH|x\rPID|1"
    assert normalize(b"") == b""


def test_deframer_handles_any_chunking() -> None:
    messages = [adt("A01", control=f"C{i}") for i in range(5)]
    stream = b"noise" + b"".join(frame(m) for m in messages)
    for size in (1, 3, 64, len(stream)):
        deframer = Deframer()
        got: list[bytes] = []
        for i in range(0, len(stream), size):
            got += deframer.feed(stream[i : i + size])
        assert got == messages
        assert deframer.pending == 0
    with pytest.raises(ValueError):
        Deframer(max_size=100).feed(b"\x0b" + b"x" * 200)


@pytest.fixture
def ack_server() -> Iterator[tuple[int, list[bytes]]]:
    """A minimal MLLP peer on a real socket: de-frames, peeks, answers with ``ack_for``."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                deframer = Deframer()
                while data := conn.recv(65536):
                    for raw in deframer.feed(data):
                        received.append(raw)
                        try:
                            FORMAT.peek(raw)
                            answer = ack_for(raw, None)
                        except Rejected as exc:
                            answer = ack_for(raw, exc)
                        conn.sendall(frame(answer))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], received
    listener.close()
    thread.join(timeout=5)


def test_python_hl7_client_over_a_real_socket(ack_server: tuple[int, list[bytes]]) -> None:
    port, received = ack_server
    sample = (SAMPLES / "microsoft_fhir_converter/ADT04-23.hl7").read_bytes()  # BOM + LF
    with MLLPClient("127.0.0.1", port) as client:
        answer = client.send_message(sample)
        assert b"MSA|AA|Q123456789T123456789X123456" in answer
        refused = client.send_message((SAMPLES / "microsoft_fhir_converter/BAR-P01-01.hl7").read_bytes())
        assert b"MSA|AR|" in refused and b"BAR\\S\\P01" in refused
        vietnamese = client.send_message(adt("A01", control="VN-SOCK-1"))
        assert b"MSA|AA|VN-SOCK-1" in vietnamese
    assert received[0] == sample  # the bytes as sent, for the inbox
    assert "Nguyễn Văn An" in received[2].decode("utf-8")


# --- throughput (a figure, printed) --------------------------------------------------------


def _rate(fn: Any, arg: bytes, seconds: float = 0.4) -> float:
    """Calls per second of this process's CPU time (the machine is shared: wall time would
    measure the neighbours too)."""
    n, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        fn(arg)
        n += 1
    return n / elapsed


def _hl7apy_ack(raw: bytes) -> str:
    """The same ACK built with hl7apy, for comparison: only the MSH is parsed (parsing the
    whole message costs hl7apy ~0.5 s for the 24-segment ADT), the ACK built and serialised."""
    from hl7apy.core import Message
    from hl7apy.parser import parse_segment

    msh_line = normalize(raw).decode("utf-8").split("\r", 1)[0]
    version = msh_line.split("|")[11]
    incoming = parse_segment(msh_line, version=version)
    answer = Message("ACK", version=version)
    answer.msh.msh_3 = incoming.msh_5.value
    answer.msh.msh_5 = incoming.msh_3.value
    answer.msh.msh_10 = "H1"
    answer.msh.msh_9 = f"ACK^{incoming.msh_9.msh_9_2.value}^ACK"
    answer.msa.msa_1 = "AA"
    answer.msa.msa_2 = incoming.msh_10.value
    return str(answer.to_er7())


def test_throughput_printed(capsys: pytest.CaptureFixture[str]) -> None:
    adt_raw = (SAMPLES / "microsoft_fhir_converter/ADT-A01-01.hl7").read_bytes()
    oru_raw = message(*ORU_VN)

    def peek_map(raw: bytes) -> None:
        FORMAT.peek(raw)
        FORMAT.map(raw, SOURCE)

    _hl7apy_ack(adt_raw)  # hl7apy loads its structures of the version on first use
    figures = {
        "ADT^A01 (24 segments) peek+map, lean path": _rate(peek_map, adt_raw),
        "ORU^R01 (8 OBX) peek+map, lean path": _rate(peek_map, oru_raw),
        "ACK, lean (connectors.hl7v2.ack)": _rate(lambda r: ack(r, "AA"), adt_raw),
        "ACK, hl7apy (parse MSH + build + to_er7)": _rate(_hl7apy_ack, adt_raw, 1.0),
    }
    with capsys.disabled():
        print()
        for what, rate in figures.items():
            print(f"  {what}: {rate:,.0f} msg/s per CPU-second (one core)")
    assert all(rate > 0 for rate in figures.values())


def test_files_are_read_from_msh_not_names(tmp_path: Path) -> None:
    misnamed = tmp_path / "ORU-R01.hl7"
    misnamed.write_bytes(adt("A04", control="NAME-1"))
    assert FORMAT.peek(misnamed.read_bytes()).message_type == "ADT^A04"
