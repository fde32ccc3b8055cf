"""The QĐ 130 XML format (connectors.xml130), pure: envelopes from tests/xml130_factory.py
read and mapped, every table's FHIR asserted (values, codes, references), every quirk
tolerated, broken files refused with per-field reasons, several HOSO per file, the same bytes
giving the same entries, and what the mapping produces valid for the FHIR validator.
No database: the pipeline's end-to-end run is in tests/test_xml130_folder.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import xml130_factory as f
from test_output_validity import last_line, validator  # noqa: F401  (the validator fixture)

from connectors.identifiers import BHXH, BHYT, CCCD, FACILITY, facility_system
from connectors.model import Mapped, Rejected, Source
from connectors.xml130 import FORMAT
from connectors.xml130.episode import PRACTITIONER_SYSTEM

SOURCE = Source("bv-test-xml", f.FACILITY, "Bệnh viện test", "provincial", "xml130", {})
MA_LK_SYSTEM = facility_system("ma-lk", f.FACILITY)
ICD10 = "http://hl7.org/fhir/sid/icd-10"


def mapped(raw: bytes) -> list[Mapped]:
    return FORMAT.map(raw, SOURCE)


def one(raw: bytes) -> Mapped:
    (result,) = mapped(raw)
    return result


def resources(m: Mapped, res_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in m.entries if e["resource"]["resourceType"] == res_type]


def by_id(m: Mapped, res_type: str, suffix: str) -> dict[str, Any]:
    """The resource whose first identifier is <MA_LK>/<suffix> (MA_LK alone for "")."""
    wanted = f"{m.control_id}/{suffix}" if suffix else m.control_id
    (found,) = [r for r in resources(m, res_type) if _identifiers(r)[0]["value"] == wanted]
    return found


def _identifiers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    found = resource["identifier"]  # Composition.identifier is one Identifier, not a list
    return [found] if isinstance(found, dict) else list(found)


def full_url(m: Mapped, resource: dict[str, Any]) -> str:
    (url,) = [e["fullUrl"] for e in m.entries if e["resource"] is resource]
    return url


def full_episode(index: int = 1) -> dict[str, Any]:
    ep = f.episode(index)
    ep.update(
        XML7=f.discharge_paper(ep), XML8=f.record_summary(ep), XML13=f.referral(ep), XML14=f.revisit(ep)
    )
    return ep


# --- peek ---------------------------------------------------------------------------------------


def test_peek_names_every_episode_and_orders_by_the_strongest_patient_identifier() -> None:
    raw = f.envelope([f.episode(1), f.episode(2)])
    peek = FORMAT.peek(raw)
    assert peek.message_type == "XML130"
    assert peek.control_id == "640010240700001;640010240700002"
    assert peek.ordering_key == f"{CCCD}|064185000001"
    no_cccd = FORMAT.peek(f.envelope([f.episode(3, SO_CCCD="")]))
    assert no_cccd.ordering_key == f"{BHXH}|6400000003"
    mrn_only = FORMAT.peek(f.envelope([f.episode(4, SO_CCCD="", MA_THE_BHYT="")]))
    assert mrn_only.ordering_key == f"{facility_system('mrn', f.FACILITY)}|BN00000004"


def test_peek_refuses_what_is_not_a_qd130_envelope() -> None:
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(b"MSH|^~\\&|HIS|64001\r")
    assert caught.value.where == "GIAMDINHHS" and "not well-formed" in caught.value.reason
    with pytest.raises(Rejected) as caught:
        FORMAT.peek(b"<Bundle><type value='transaction'/></Bundle>")
    assert "not GIAMDINHHS" in caught.value.reason


# --- XML1 ---------------------------------------------------------------------------------------


def test_xml1_patient_facts() -> None:
    m = one(f.envelope([f.episode(1)]))
    assert m.message_type == "XML130" and m.control_id == "640010240700001"
    (facts,) = m.patients
    patient = facts.resource
    assert facts.placeholder.startswith("urn:uuid:")
    ids = {(i["system"], i["value"]) for i in patient["identifier"]}
    assert ids == {
        (CCCD, "064185000001"),
        (BHYT, "DN4646400000001"),
        (BHXH, "6400000001"),
        (facility_system("mrn", f.FACILITY), "BN00000001"),
    }
    assert patient["name"] == [
        {"use": "official", "text": "Nguyễn Thị Hoa", "family": "Nguyễn", "given": ["Thị", "Hoa"]}
    ]
    assert patient["gender"] == "female" and patient["birthDate"] == "1985-03-15"
    assert patient["telecom"] == [{"system": "phone", "value": "0905123456", "use": "mobile"}]
    (address,) = patient["address"]
    assert address["text"] == "Tổ 3, phường Diên Hồng, tỉnh Gia Lai" and address["country"] == "VN"
    codes = {
        (e["valueCoding"]["system"].rsplit("/", 1)[1], e["valueCoding"]["code"]) for e in address["extension"]
    }
    assert codes == {("vn-tinh", "52"), ("vn-xa", "21025")}  # no MAHUYEN_CU_TRU: none written
    ext = {e["url"].rsplit("/", 1)[1]: e for e in patient["extension"]}
    assert ext["patient-nationality"]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "000"
    ethnicity = ext["patient-ethnicity"]["valueCodeableConcept"]["coding"][0]
    assert (ethnicity["code"], ethnicity["display"]) == ("01", "Kinh")
    assert (
        ext["patient-occupation"]["valueCodeableConcept"]["coding"][0]["code"] == "0005"
    )  # leading zeros kept


def test_xml1_encounter_coverage_diagnoses_procedure_weight_and_revisit() -> None:
    m = one(f.envelope([f.episode(1)]))
    patient = {"reference": m.patients[0].placeholder}
    encounter = by_id(m, "Encounter", "")
    assert encounter["identifier"] == [{"system": MA_LK_SYSTEM, "value": "640010240700001"}]
    assert encounter["status"] == "finished" and encounter["subject"] == patient
    assert encounter["class"]["code"] == "AMB"
    assert encounter["type"][0]["coding"][0]["code"] == "01"
    assert encounter["serviceType"]["coding"][0]["code"] == "K01"
    assert encounter["period"] == {"start": "2025-07-01T07:30:00+07:00", "end": "2025-07-01T10:15:00+07:00"}
    assert encounter["serviceProvider"] == {"reference": f"Organization?identifier={FACILITY}|64001"}
    assert [r["text"] for r in encounter["reasonCode"]] == ["Đau đầu, chóng mặt 3 ngày", "Tăng huyết áp"]
    disposition = encounter["hospitalization"]["dischargeDisposition"]["coding"]
    assert [c["code"] for c in disposition] == ["1", "home"]
    (outcome,) = encounter["extension"]
    assert outcome["url"].endswith("encounter-treatment-outcome")
    assert outcome["valueCodeableConcept"]["coding"][0]["code"] == "2"
    encounter_ref = {"reference": full_url(m, encounter)}

    (coverage,) = resources(m, "Coverage")
    assert coverage["identifier"] == [{"system": BHYT, "value": "DN4646400000001"}]
    assert coverage["beneficiary"] == patient and coverage["period"] == {
        "start": "2025-01-01",
        "end": "2025-12-31",
    }
    assert [c["value"] for c in coverage["class"]] == ["DN", "4"]
    assert coverage["extension"][0]["valueIdentifier"] == {"system": FACILITY, "value": "64010"}

    main = by_id(m, "Condition", "XML1/MA_BENH_CHINH")
    secondary = [by_id(m, "Condition", f"XML1/MA_BENH_KT/{c}") for c in ("E11.9", "E78.5")]
    assert main["code"]["coding"] == [{"system": ICD10, "code": "I10"}]
    assert [c["code"]["coding"][0]["code"] for c in secondary] == ["E11.9", "E78.5"]
    assert main["note"][0]["text"].endswith("Tăng huyết áp vô căn; Đái tháo đường type 2")
    assert all(c["encounter"] == encounter_ref and c["subject"] == patient for c in [main, *secondary])
    assert [d["condition"]["reference"] for d in encounter["diagnosis"]] == [
        full_url(m, c) for c in [main, *secondary]
    ]
    assert [d["rank"] for d in encounter["diagnosis"]] == [1, 2, 3]

    procedure = by_id(m, "Procedure", "XML1/MA_PTTT_QT/89.52")
    assert procedure["code"]["coding"] == [{"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": "89.52"}]
    weight = by_id(m, "Observation", "XML1/CAN_NANG")
    assert weight["code"]["coding"][0]["code"] == "29463-7"
    assert weight["valueQuantity"] == {
        "value": 58.5,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    assert by_id(m, "Observation", "XML1/NHOM_MAU")["valueCodeableConcept"] == {"text": "O+"}
    appointment = by_id(m, "Appointment", "tai-kham")
    assert appointment["status"] == "proposed"
    assert appointment["requestedPeriod"] == [{"start": "2025-07-15", "end": "2025-07-15"}]
    assert appointment["participant"] == [{"actor": patient, "status": "needs-action"}]


def test_dotless_icd10_codes_and_secondary_lists() -> None:
    m = one(f.envelope([f.episode(1, MA_BENH_CHINH="J069", MA_BENH_KT="k29.7; ;E11.9")]))
    assert by_id(m, "Condition", "XML1/MA_BENH_CHINH")["code"]["coding"][0]["code"] == "J06.9"
    assert len(resources(m, "Condition")) == 3
    by_id(m, "Condition", "XML1/MA_BENH_KT/K29.7")


def test_died_and_inpatient_codes() -> None:
    m = one(
        f.envelope(
            [
                f.episode(
                    1,
                    MA_LOAI_KCB="03",
                    KET_QUA_DTRI="5",
                    MA_LOAI_RV="1",
                    MA_NOI_DI="64010",
                    MA_KHOA="K01;K26",
                )
            ]
        )
    )
    encounter = by_id(m, "Encounter", "")
    assert [c["code"] for c in encounter["serviceType"]["coding"]] == ["K01", "K26"]
    assert encounter["class"]["code"] == "IMP"
    assert [c["code"] for c in encounter["hospitalization"]["dischargeDisposition"]["coding"]] == ["1", "exp"]
    assert encounter["hospitalization"]["origin"] == {
        "type": "Organization",
        "identifier": {"system": FACILITY, "value": "64010"},
    }


# --- XML2 - XML5 ----------------------------------------------------------------------------------


def test_xml2_medication_request_and_dispense_of_what_was_given() -> None:
    m = one(f.envelope([f.episode(1)]))
    assert len(resources(m, "MedicationRequest")) == 5 and len(resources(m, "MedicationDispense")) == 5
    request = by_id(m, "MedicationRequest", "XML2/1")
    assert request["status"] == "completed" and request["intent"] == "order"
    medication = request["medicationCodeableConcept"]
    assert medication["coding"][0]["code"] == "40.17" and medication["coding"][0]["display"] == "Paracetamol"
    assert medication["text"] == "Paracetamol 500mg"
    (dosage,) = request["dosageInstruction"]
    assert dosage["text"] == "1 viên x 3 lần/ngày; Uống sau ăn"
    assert dosage["route"]["coding"][0] == {
        "system": "https://ehealth-hub.vn/fhir/CodeSystem/moh-duong-dung",
        "code": "1.01",
        "display": "Uống",
    }
    assert request["dispenseRequest"]["quantity"] == {"value": 15, "unit": "Viên"}
    assert request["requester"] == {
        "type": "Practitioner",
        "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.DOCTOR},
    }
    assert request["authoredOn"] == "2025-07-01T09:30:00+07:00"
    given = by_id(m, "MedicationDispense", "XML2/1")
    assert given["status"] == "completed"
    assert given["authorizingPrescription"] == [{"reference": full_url(m, request)}]
    assert given["whenHandedOver"] == "2025-07-01T10:00:00+07:00"
    assert given["medicationCodeableConcept"] == medication and given["dosageInstruction"] == [dosage]
    assert given["subject"] == request["subject"]
    assert given["context"] == {"reference": full_url(m, by_id(m, "Encounter", ""))}
    assert given["quantity"] == {"value": 15, "unit": "Viên"}
    assert given["performer"] == [
        {"actor": {"reference": f"Organization?identifier={FACILITY}|{f.FACILITY}"}}
    ]
    assert given["identifier"] == [{"system": MA_LK_SYSTEM, "value": f"{m.control_id}/XML2/1"}]
    assert not resources(m, "MedicationStatement")
    # A row without NGAY_TH_YL was ordered, not (yet) given: no dispense.
    ep = f.episode(2)
    ep["XML2"][0]["NGAY_TH_YL"] = ""
    m2 = one(f.envelope([ep]))
    assert len(resources(m2, "MedicationDispense")) == 4


def test_xml3_services_and_supplies() -> None:
    m = one(f.envelope([f.episode(1)]))
    # The exam is a Procedure (the syringe used in it is its usedCode); the chemistry panel
    # and the ECG have XML4 results, so their DiagnosticReports stand for them.
    (procedure,) = [p for p in resources(m, "Procedure") if p["identifier"][0]["value"].endswith("XML3/1")]
    assert procedure["code"]["coding"][0]["code"] == f.EXAM_SERVICE
    assert procedure["code"]["text"] == "Khám Nội"
    assert procedure["category"]["coding"][0]["code"] == "13"
    assert procedure["performedPeriod"] == {
        "start": "2025-07-01T07:40:00+07:00",
        "end": "2025-07-01T07:50:00+07:00",
    }
    assert procedure["performer"] == [
        {"actor": {"type": "Practitioner", "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.DOCTOR}}}
    ]
    assert procedure["reasonCode"][0]["coding"][0] == {"system": ICD10, "code": "I10"}
    (supply,) = procedure["usedCode"]
    assert supply["coding"][0]["code"] == f.SUPPLY and supply["text"] == "Bơm tiêm nhựa 5ml x 2 Cái"
    assert len([p for p in resources(m, "Procedure") if "/XML3/" in p["identifier"][0]["value"]]) == 1
    assert m.warnings == []
    # The supply is a ChargeItem too: in the Encounter, for the exam's Procedure.
    (charge,) = resources(m, "ChargeItem")
    supply_row = f.episode(1)["XML3"][-1]
    assert charge["identifier"] == [
        {"system": MA_LK_SYSTEM, "value": f"{m.control_id}/XML3/{supply_row['STT']}"}
    ]
    assert charge["status"] == "billed"
    assert charge["code"]["coding"][0]["code"] == f.SUPPLY and charge["code"]["text"] == "Bơm tiêm nhựa 5ml"
    assert charge["productCodeableConcept"] == charge["code"]
    assert charge["quantity"] == {"value": 2, "unit": "Cái"}
    assert charge["occurrenceDateTime"] == "2025-07-01T09:45:00+07:00"
    assert charge["context"] == {"reference": full_url(m, by_id(m, "Encounter", ""))}
    assert charge["subject"] == procedure["subject"]
    assert charge["service"] == [{"reference": full_url(m, procedure)}]
    assert charge["performer"] == [
        {"actor": {"type": "Practitioner", "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.DOCTOR}}}
    ]
    # A supply of a service with XML4 results is charged for its DiagnosticReport.
    ep = f.episode(3)
    ep["XML3"][-1]["MA_DICH_VU"] = f.LAB_SERVICE
    lab = one(f.envelope([ep]))
    (lab_charge,) = resources(lab, "ChargeItem")
    report = by_id(lab, "DiagnosticReport", f"XML4/{f.LAB_SERVICE}")
    assert lab_charge["service"] == [{"reference": full_url(lab, report)}]
    # Bed days are costs, not care: no Procedure; a supply used in no mapped service is still
    # charged to the episode, naming no service.
    ep = f.episode(2)
    ep["XML3"][0]["MA_NHOM"] = "15"
    loose = one(f.envelope([ep]))
    assert not [p for p in resources(loose, "Procedure") if "/XML3/" in p["identifier"][0]["value"]]
    assert loose.warnings == []
    (loose_charge,) = resources(loose, "ChargeItem")
    assert "service" not in loose_charge and loose_charge["code"]["coding"][0]["code"] == f.SUPPLY


def test_xml4_observations_grouped_into_reports() -> None:
    m = one(f.envelope([f.episode(1, lab=9)]))
    glucose = by_id(m, "Observation", "XML4/1")
    assert glucose["code"]["coding"][0]["code"] == "GLU" and glucose["code"]["text"] == "Glucose"
    assert glucose["valueQuantity"] == {"value": 7.8, "unit": "mmol/L"}
    assert glucose["category"][0]["coding"][0]["code"] == "laboratory"
    assert glucose["effectiveDateTime"] == "2025-07-01T09:15:00+07:00"
    assert glucose["performer"] == [
        {"type": "Practitioner", "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.READER}}
    ]
    assert glucose["note"] == [{"text": "Kết luận: Tăng glucose máu"}]
    assert by_id(m, "Observation", "XML4/3")["valueQuantity"] == {"value": 88, "unit": "umol/L"}
    assert by_id(m, "Observation", "XML4/9")["valueString"] == "Âm tính"
    panel = by_id(m, "DiagnosticReport", f"XML4/{f.LAB_SERVICE}")
    assert panel["code"]["coding"][0]["code"] == f.LAB_SERVICE
    assert panel["code"]["text"] == "Định lượng các chỉ số sinh hóa máu"
    assert panel["category"][0]["coding"][0]["code"] == "LAB"
    assert len(panel["result"]) == 9
    assert panel["result"][0] == {"reference": full_url(m, glucose)}
    assert panel["conclusion"] == "Tăng glucose máu"
    assert panel["effectiveDateTime"] == "2025-07-01T08:10:00+07:00"  # when it was done (XML3)
    assert panel["issued"] == "2025-07-01T09:15:00+07:00"
    ecg = by_id(m, "DiagnosticReport", f"XML4/{f.ECG_SERVICE}")
    (ecg_result,) = ecg["result"]
    ecg_obs = by_id(m, "Observation", "XML4/10")
    assert ecg_result == {"reference": full_url(m, ecg_obs)}
    assert ecg_obs["code"]["coding"][0]["code"] == f.ECG_SERVICE  # no MA_CHI_SO: the service
    assert ecg_obs["valueString"] == "Nhịp xoang đều, tần số 78 lần/phút"
    assert ecg_obs["category"][0]["coding"][0]["code"] == "procedure"
    assert ecg["conclusion"] == "Điện tim bình thường"


def test_xml5_progress_notes() -> None:
    m = one(f.envelope([f.episode(1)]))
    first = by_id(m, "ClinicalImpression", "XML5/1")
    assert by_id(m, "ClinicalImpression", "XML5/2")["summary"].startswith("HA 140/90 mmHg")
    assert first["status"] == "completed"
    assert first["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "11506-3",
        "display": "Progress note",
    }
    assert first["summary"].startswith("Tỉnh, tiếp xúc tốt. HA 160/95 mmHg")
    assert (
        first["effectiveDateTime"] == "2025-07-01T07:45:00+07:00"
        and first["date"] == first["effectiveDateTime"]
    )
    assert first["assessor"] == {
        "type": "Practitioner",
        "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.DOCTOR},
    }
    assert first["encounter"] == {"reference": full_url(m, by_id(m, "Encounter", ""))}
    assert first["subject"] == {"reference": m.patients[0].placeholder}
    assert not [o for o in resources(m, "Observation") if "/XML5/" in o["identifier"][0]["value"]]
    # Several clinicians: the first assesses, the others are named; a consultation is a note.
    ep = f.episode(2)
    ep["XML5"][0].update(NGUOI_THUC_HIEN=f"{f.DOCTOR};{f.NURSE}", HOI_CHAN="Hội chẩn khoa Nội")
    two = by_id(one(f.envelope([ep])), "ClinicalImpression", "XML5/1")
    assert two["assessor"]["identifier"]["value"] == f.DOCTOR
    assert two["note"] == [{"text": "Hội chẩn: Hội chẩn khoa Nội"}, {"text": f"Cùng thực hiện: {f.NURSE}"}]


def test_typical_episode_is_20_to_40_resources() -> None:
    m = one(f.envelope([f.episode(1)]))
    assert 20 <= len(m.entries) + len(m.patients) <= 40


# --- XML0, XML7, XML8, XML13, XML14, unknown tables ---------------------------------------------


def test_xml0_check_in_creates_an_in_progress_encounter_only_if_none_exists() -> None:
    ep = f.episode(5, XML1=None, XML2=None, XML3=None, XML4=None, XML5=None)
    ep["XML0"] = f.check_in(f.episode(5))
    m = one(f.envelope([ep]))
    assert m.control_id == "640010240700005"
    assert {i["system"] for i in m.patients[0].resource["identifier"]} == {
        CCCD,
        BHYT,
        BHXH,
        facility_system("mrn", f.FACILITY),
    }
    encounter_entry = next(e for e in m.entries if e["resource"]["resourceType"] == "Encounter")
    assert encounter_entry["request"] == {
        "method": "POST",
        "url": "Encounter",
        "ifNoneExist": f"identifier={MA_LK_SYSTEM}|640010240700005",
    }
    encounter = encounter_entry["resource"]
    assert encounter["status"] == "in-progress" and encounter["period"] == {
        "start": "2025-07-01T07:30:00+07:00"
    }
    # The closing XML1 writes the same Encounter (same identifier), finished.
    closing = by_id(one(f.envelope([f.episode(5)])), "Encounter", "")
    assert closing["identifier"] == encounter["identifier"] and closing["status"] == "finished"


def test_papers_referral_and_revisit() -> None:
    m = one(f.envelope([full_episode(1)]))
    encounter_url = full_url(m, by_id(m, "Encounter", ""))
    discharge = by_id(m, "Composition", "XML7")
    assert discharge["identifier"] == {"system": MA_LK_SYSTEM, "value": f"{m.control_id}/XML7"}
    assert discharge["status"] == "final" and discharge["title"] == "Giấy ra viện"
    assert discharge["type"]["coding"][0]["code"] == "18842-5"
    assert discharge["author"] == [
        {
            "type": "Practitioner",
            "identifier": {"system": PRACTITIONER_SYSTEM, "value": f.DOCTOR},
            "display": "Trần Văn Bình",
        }
    ]
    assert discharge["date"] == "2025-07-01"
    assert discharge["subject"] == {"reference": m.patients[0].placeholder}
    assert discharge["encounter"] == {"reference": encounter_url}
    assert discharge["custodian"] == {"reference": f"Organization?identifier={FACILITY}|{f.FACILITY}"}
    assert discharge["event"] == [
        {"period": {"start": "2025-07-01T07:30:00+07:00", "end": "2025-07-01T10:15:00+07:00"}}
    ]
    sections = {s["title"]: s["text"]["div"] for s in discharge["section"]}
    assert sections["Chẩn đoán"] == (
        '<div xmlns="http://www.w3.org/1999/xhtml"><p>Tăng huyết áp vô căn; Đái tháo đường type 2</p></div>'
    )
    assert "<p>Tái khám sau 2 tuần hoặc khi có dấu hiệu bất thường</p>" in sections["Ghi chú, lời dặn"]
    assert "<p>SO_LUU_TRU: LTHS00000001</p>" in sections["Thông tin khác"]  # fields of our reading are kept
    assert all(s["text"]["status"] == "generated" for s in discharge["section"])
    summary = by_id(m, "Composition", "XML8")
    assert summary["type"]["coding"][0]["code"] == "34133-9" and summary["title"] == "Tóm tắt hồ sơ bệnh án"
    outcome = next(s for s in summary["section"] if s["title"] == "Kết quả điều trị")
    assert "<p>Đỡ</p>" in outcome["text"]["div"]  # the outcome's display, not "2"
    assert summary["author"] == [{"reference": f"Organization?identifier={FACILITY}|64001"}]
    assert not resources(m, "DocumentReference")
    referral = by_id(m, "ServiceRequest", "XML13")
    assert referral["code"]["coding"][0]["code"] == "3457005"
    assert referral["performer"] == [
        {"type": "Organization", "identifier": {"system": FACILITY, "value": "52001"}}
    ]
    assert [c["coding"][0]["code"] for c in referral["reasonCode"]] == ["I10", "E11.9", "E78.5"]
    assert referral["requisition"] == {"value": "CTHS00000001"}
    # NGAY_TAI_KHAM and XML14 are one re-visit: one Appointment, XML14's details.
    (appointment,) = resources(m, "Appointment")
    assert appointment["description"] == "Tái khám (giấy hẹn HKHS00000001)"
    urls = [e["request"]["url"] for e in m.entries]
    assert len(urls) == len(set(urls))


def test_unmapped_tables_are_warnings() -> None:
    ep = f.episode(1)
    raw = f.envelope([ep])
    extra = base64.b64encode(
        b"<CHI_TIEU_GIAY_CHUNG_SINH><MA_LK>640010240700001</MA_LK></CHI_TIEU_GIAY_CHUNG_SINH>"
    )
    raw = raw.replace(
        b"</HOSO>",
        b"<FILEHOSO><LOAIHOSO>XML9</LOAIHOSO><NOIDUNGFILE>" + extra + b"</NOIDUNGFILE></FILEHOSO></HOSO>",
    )
    m = one(raw)
    assert m.warnings == ["HOSO[1]: XML9 (birth certificate) is not mapped: kept in the inbox only"]


# --- quirks, several HOSO, idempotence -------------------------------------------------------------


@pytest.mark.parametrize(
    "quirks, one_line",
    [
        ((), True),
        (("self-closing",), False),
        (("bad-xsi",), False),
        (("bom",), False),
        (("crlf",), False),
        (("wrapped-base64",), False),
        (("no-decl",), False),
        (("self-closing", "bad-xsi", "bom", "crlf", "wrapped-base64"), False),
        (("self-closing", "bad-xsi", "bom"), True),
    ],
)
def test_quirks_map_to_the_same_entries(quirks: tuple[str, ...], one_line: bool) -> None:
    plain = one(f.envelope([full_episode(1)]))
    odd_raw = f.envelope([full_episode(1)], quirks=quirks, one_line=one_line)
    assert odd_raw != f.envelope([full_episode(1)])
    odd = one(odd_raw)
    assert odd.entries == plain.entries and odd.patients[0].resource == plain.patients[0].resource
    assert FORMAT.peek(odd_raw) == FORMAT.peek(f.envelope([full_episode(1)]))


def test_a_utf16_file_with_its_byte_order_mark() -> None:
    raw = f.envelope([f.episode(1)])
    utf16 = raw.decode("utf-8").encode("utf-16")  # BOM first, the declaration still says utf-8
    assert utf16[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert one(utf16).entries == one(raw).entries


def test_partial_birth_dates() -> None:
    assert (
        one(f.envelope([f.episode(1)], quirks=["partial-birth"])).patients[0].resource["birthDate"] == "1985"
    )
    assert (
        one(f.envelope([f.episode(1, NGAY_SINH="198503000000")])).patients[0].resource["birthDate"]
        == "1985-03"
    )
    assert (
        one(f.envelope([f.episode(1, NGAY_SINH="19850315")])).patients[0].resource["birthDate"]
        == "1985-03-15"
    )


def test_namespaced_table_documents() -> None:
    raw = f.envelope([f.episode(1)])
    plain = one(raw)
    doc = f.table_document("XML1", f.episode(1)["XML1"]).replace(
        b"<TONG_HOP>", b'<TONG_HOP xmlns="urn:x-his">'
    )
    old = base64.b64encode(f.table_document("XML1", f.episode(1)["XML1"]))
    assert old in raw
    odd = one(raw.replace(old, base64.b64encode(doc)))
    assert odd.entries == plain.entries


def test_several_hoso_in_one_file() -> None:
    result = mapped(f.envelope([f.episode(1), full_episode(2), f.episode(3, drugs=7, lab=5)]))
    assert [m.control_id for m in result] == ["640010240700001", "640010240700002", "640010240700003"]
    assert len({m.patients[0].placeholder for m in result}) == 3
    assert len(resources(result[2], "MedicationRequest")) == 7
    assert len(resources(result[1], "Composition")) == 2
    encounters = [by_id(m, "Encounter", "")["subject"]["reference"] for m in result]
    assert encounters == [m.patients[0].placeholder for m in result]


def test_same_bytes_same_entries_all_conditional() -> None:
    raw = f.envelope([full_episode(1), f.episode(2)])
    first, again = mapped(raw), mapped(raw)
    assert json.dumps([m.entries for m in first]) == json.dumps([m.entries for m in again])
    assert [m.patients[0].placeholder for m in first] == [m.patients[0].placeholder for m in again]
    for m in first:
        urls = [e["request"]["url"] for e in m.entries]
        assert len(set(urls)) == len(urls) and len({e["fullUrl"] for e in m.entries}) == len(urls)
        for entry in m.entries:
            request = entry["request"]
            assert request["method"] == "PUT" and request["url"].split("?", 1)[1].startswith("identifier=")
            resource = entry["resource"]
            identifier = (
                resource["identifier"]
                if isinstance(resource["identifier"], dict)
                else resource["identifier"][0]
            )
            assert (
                request["url"]
                == f"{resource['resourceType']}?identifier={identifier['system']}|{identifier['value']}"
            )
    # Another episode of the same patient updates the same Coverage (the card), new the rest.
    other = one(f.envelope([f.episode(1, MA_LK="640019999")]))
    assert resources(other, "Coverage")[0]["identifier"] == resources(first[0], "Coverage")[0]["identifier"]
    assert by_id(other, "Encounter", "")["identifier"] != by_id(first[0], "Encounter", "")["identifier"]


# --- refusals -------------------------------------------------------------------------------------


def _bomb() -> bytes:
    return (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
        b"<GIAMDINHHS><X>&lol2;</X></GIAMDINHHS>"
    )


def _with_table(table: str, document: bytes) -> bytes:
    ep = f.episode(1)
    raw = f.envelope([ep])
    old = base64.b64encode(f.table_document(table, ep[table]))
    assert old in raw
    return raw.replace(old, base64.b64encode(document))


def _row(table: str, n: int, **fields: str) -> dict[str, Any]:
    ep = f.episode(1)
    ep[table][n - 1].update(fields)
    return ep


@pytest.mark.parametrize(
    "raw, where, reason",
    [
        (b"not xml at all", "GIAMDINHHS", "not well-formed XML"),
        (_bomb(), "GIAMDINHHS", "DTD or entity declaration is not allowed"),
        (b"\xff\xfe<\x00G\x00", "GIAMDINHHS", "not well-formed XML"),
        ("<GIAMDINHHS><X>caf\u00e9</X></GIAMDINHHS>".encode("latin-1"), "GIAMDINHHS", "not UTF-8"),
        (b"<GIAMDINHHS><THONGTINHOSO/></GIAMDINHHS>", "GIAMDINHHS/THONGTINHOSO/DANHSACHHOSO", "no HOSO"),
        (
            f.envelope([f.episode(1)]).replace(b"<NOIDUNGFILE>PD94", b"<NOIDUNGFILE>!!PD94", 1),
            "HOSO[1]/XML1",
            "not base64",
        ),
        (_with_table("XML2", b"<CHITIEU_CHITIET_THUOC><DSACH"), "HOSO[1]/XML2", "not well-formed XML"),
        (_with_table("XML3", _bomb()), "HOSO[1]/XML3", "DTD"),
        (f.envelope([f.episode(1, MA_LK="")]), "HOSO[1]/XML1/MA_LK", "MA_LK is required"),
    ],
)
def test_broken_files_are_refused_where_they_break(raw: bytes, where: str, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        mapped(raw)
    assert caught.value.where == where and reason in caught.value.reason, caught.value


@pytest.mark.parametrize(
    "episode, where, reason",
    [
        (f.episode(1, NGAY_SINH="19851315"), "HOSO[1]/XML1/NGAY_SINH", "not a birth date"),
        (f.episode(1, NGAY_SINH="1985-03-15"), "HOSO[1]/XML1/NGAY_SINH", "not a birth date"),
        (f.episode(1, NGAY_VAO="202507011"), "HOSO[1]/XML1/NGAY_VAO", "not a time yyyyMMddHHmm"),
        (f.episode(1, NGAY_RA="202502301015"), "HOSO[1]/XML1/NGAY_RA", "no calendar date"),
        (f.episode(1, NGAY_RA="202507012515"), "HOSO[1]/XML1/NGAY_RA", "no such time of day"),
        (f.episode(1, GIOI_TINH="F"), "HOSO[1]/XML1/GIOI_TINH", "not 1 (male)"),
        (f.episode(1, MA_BENH_CHINH="TANG HA"), "HOSO[1]/XML1/MA_BENH_CHINH", "not an ICD-10 code"),
        (f.episode(1, MA_PTTT_QT="AB.1"), "HOSO[1]/XML1/MA_PTTT_QT", "not an ICD-9-CM"),
        (f.episode(1, MA_THE_BHYT="DN46464"), "HOSO[1]/XML1/MA_THE_BHYT", "not a BHYT card code"),
        (f.episode(1, CAN_NANG="58,5"), "HOSO[1]/XML1/CAN_NANG", "decimals use '.'"),
        (f.episode(1, KET_QUA_DTRI="6"), "HOSO[1]/XML1/KET_QUA_DTRI", "not a treatment outcome"),
        (f.episode(1, MA_CSKCB="79001"), "HOSO[1]/XML1/MA_CSKCB", "not this source's facility"),
        (f.episode(1, HO_TEN=""), "HOSO[1]/XML1/HO_TEN", "is required"),
        (f.episode(1, MA_LK="64001,2"), "HOSO[1]/XML1/MA_LK", "one of , | $"),
        (_row("XML2", 3, SO_LUONG="mười"), "HOSO[1]/XML2[3]/SO_LUONG", "not a decimal"),
        (_row("XML2", 2, MA_THUOC=""), "HOSO[1]/XML2[2]/MA_THUOC", "is required"),
        (_row("XML2", 2, MA_LK="OTHER"), "HOSO[1]/XML2[2]/MA_LK", "not the episode's MA_LK"),
        (_row("XML2", 2, STT="1"), "HOSO[1]/XML2[1]/STT", "appears twice"),
        (_row("XML3", 1, MA_DICH_VU="", MA_VAT_TU=""), "HOSO[1]/XML3[1]/MA_DICH_VU", "is required"),
        (_row("XML4", 1, NGAY_KQ="2025"), "HOSO[1]/XML4[1]/NGAY_KQ", "not a time"),
        (_row("XML5", 2, DIEN_BIEN_LS=""), "HOSO[1]/XML5[2]/DIEN_BIEN_LS", "is required"),
    ],
)
def test_field_errors_are_refused_per_field(episode: dict[str, Any], where: str, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        mapped(f.envelope([episode]))
    assert caught.value.where == where and reason in caught.value.reason, caught.value


def test_every_field_error_is_listed() -> None:
    ep = f.episode(1, NGAY_SINH="x", GIOI_TINH="9")
    ep["XML4"][1]["GIA_TRI"] = "1"  # fine
    ep["XML2"][0]["NGAY_YL"] = "2025070"
    with pytest.raises(Rejected) as caught:
        mapped(f.envelope([ep]))
    reason = caught.value.reason
    assert reason.startswith("3 field error(s): ")
    for where in ("HOSO[1]/XML1/NGAY_SINH", "HOSO[1]/XML1/GIOI_TINH", "HOSO[1]/XML2[1]/NGAY_YL"):
        assert where in reason


def test_a_file_of_another_facility_is_refused() -> None:
    with pytest.raises(Rejected) as caught:
        mapped(f.envelope([f.episode(1)], facility="79001"))
    assert caught.value.where == "THONGTINDONVI/MACSKCB" and "79001" in caught.value.reason


# --- the validator ------------------------------------------------------------------------------


def _as_stored(result: list[Mapped]) -> list[dict[str, Any]]:
    """The resources with ids and references as the transaction would leave them."""
    targets: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in result:
        patient = dict(m.patients[0].resource, id=m.patients[0].placeholder.rsplit(":", 1)[1])
        targets[m.patients[0].placeholder] = f"Patient/{patient['id']}"
        out.append(patient)
        for entry in m.entries:
            resource = dict(entry["resource"], id=entry["fullUrl"].rsplit(":", 1)[1])
            targets[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
            out.append(resource)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    targets.get(v, "Organization/facility-64001" if v.startswith("Organization?") else v)
                    if k == "reference"
                    else rewrite(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return [rewrite(r) for r in out]


def test_every_mapped_resource_is_valid_fhir(validator: Any, tmp_path: Path) -> None:  # noqa: F811
    ep0 = f.episode(3, XML1=None, XML2=None, XML3=None, XML4=None, XML5=None)
    ep0["XML0"] = f.check_in(f.episode(3))
    raw = f.envelope([full_episode(1), f.episode(2, lab=9, drugs=7, MA_LOAI_KCB="03", KET_QUA_DTRI="5"), ep0])
    stored = _as_stored(mapped(raw))
    types = {r["resourceType"] for r in stored}
    assert types >= {
        "Patient", "Coverage", "Encounter", "Condition", "Procedure", "Observation", "Appointment",
        "MedicationRequest", "MedicationDispense", "DiagnosticReport", "Composition", "ChargeItem",
        "ClinicalImpression", "ServiceRequest",
    }  # fmt: skip
    path = tmp_path / "xml130.ndjson"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stored), encoding="utf-8")
    code, output = validator(path)
    assert code == 0 and last_line(output).startswith(f"{len(stored)} valid, 0 invalid"), output[-6000:]


def test_a_resource_two_episodes_share_is_written_once() -> None:
    first, second = f.episode(1), f.episode(2)
    second["XML1"]["MA_THE_BHYT"] = first["XML1"]["MA_THE_BHYT"]
    result = mapped(f.envelope([first, second]))
    coverages = [c for m in result for c in resources(m, "Coverage")]
    assert len(coverages) == 1 and coverages[0]["beneficiary"] == {
        "reference": result[1].patients[0].placeholder
    }
    assert len({e["fullUrl"] for m in result for e in m.entries}) == sum(len(m.entries) for m in result)
