"""Writes demo/vn-demo.json: the synthetic Vietnamese demo world that `hub demo` loads.

Owns: every resource of the demo Bundle (facilities of Gia Lai province, their clinicians, five
citizens and the history of Nguyễn Thị Hoa across a commune station, a regional medical centre
and the provincial hospital). Everything is made up; no real person. Ids are fixed
(``vn-demo-...``) and every entry is a PUT, so loading the file twice changes nothing.
Run it after editing (``python demo/build_vn_demo.py``) and commit both files: the JSON is what
the hub loads, this script is how it is kept consistent (values, dates, references).
Calls: only the standard library.  Called by: a person editing the demo; tests/test_demo_data.py
checks that the committed JSON is what this script writes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "vn-demo.json"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_VN = "https://ehealth-hub.vn/sid/icd-10"
ATC = "http://www.whocc.no/atc"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
CSKCB = "https://ehealth-hub.vn/sid/cskcb"
CCCD = "https://ehealth-hub.vn/sid/cccd"
BHYT = "https://ehealth-hub.vn/sid/bhyt"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
XHTML = "http://www.w3.org/1999/xhtml"

# Facilities (Organization ids; the demo accounts' organizations are these ids, hub/cli.py).
PROV = "vn-demo-org-bvdk-gialai"  # Bệnh viện Đa khoa tỉnh
STATION = "vn-demo-org-tyt-iakrai"  # Trạm Y tế xã
DISTRICT = "vn-demo-org-ttyt-iagrai"  # Trung tâm Y tế khu vực
OTHER = "vn-demo-org-bvdk-ankhe"  # a second hospital: no access to Hoa by default

DR_STATION = "vn-demo-practitioner-1"  # Phạm Minh Tuấn, bs.tuan
DR_PROV = "vn-demo-practitioner-2"  # Võ Thị Thu Hà, bs.ha
DR_DISTRICT = "vn-demo-practitioner-3"  # Đinh Văn Long (no account)
DR_OTHER = "vn-demo-practitioner-4"  # Hồ Văn Khánh, bs.khanh

HOA = "vn-demo-patient-1"
CHILD = "vn-demo-patient-5"

entries: list[dict[str, Any]] = []


def put(resource: dict[str, Any]) -> dict[str, Any]:
    url = f"{resource['resourceType']}/{resource['id']}"
    entries.append({"fullUrl": url, "resource": resource, "request": {"method": "PUT", "url": url}})
    return resource


def ref(target: str, display: str | None = None) -> dict[str, str]:
    return {"reference": target, **({"display": display} if display else {})}


def narrative(*paragraphs: str) -> dict[str, str]:
    """A generated Narrative: plain Vietnamese paragraphs (no markup from data; & < > escaped)."""
    body = "".join(
        f"<p>{p.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</p>" for p in paragraphs
    )
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">{body}</div>'}


def concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": text or display}


def address(line: str | None, ward: str) -> list[dict[str, Any]]:
    """A 2025 address: commune or ward (the `city` element) and province, no district level
    (NQ 202/2025/QH15)."""
    text = ", ".join([x for x in (line, ward, "tỉnh Gia Lai") if x])
    return [
        {
            "use": "home",
            **({"line": [line]} if line else {}),
            "city": ward,
            "state": "Gia Lai",
            "country": "VN",
            "text": text,
        }
    ]


# --- facilities -------------------------------------------------------------------------------


def organization(oid: str, code: str, name: str, kind: str, line: str | None, ward: str) -> None:
    put(
        {
            "resourceType": "Organization",
            "id": oid,
            "identifier": [{"system": CSKCB, "value": code}],
            "active": True,
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                            "code": "prov",
                            "display": "Healthcare Provider",
                        }
                    ],
                    "text": kind,
                }
            ],
            "name": name,
            "address": [{k: v for k, v in address(line, ward)[0].items() if k != "use"}],
        }
    )


organization(
    PROV,
    "64001",
    "Bệnh viện Đa khoa tỉnh Gia Lai (demo)",
    "Bệnh viện tuyến tỉnh",
    "Tôn Thất Tùng",
    "phường Pleiku",
)
organization(STATION, "64123", "Trạm Y tế xã Ia Krái (demo)", "Trạm y tế xã", "Thôn 1", "xã Ia Krái")
organization(
    DISTRICT,
    "64010",
    "Trung tâm Y tế khu vực Ia Grai (demo)",
    "Trung tâm y tế khu vực",
    "Hùng Vương",
    "xã Ia Grai",
)
organization(
    OTHER,
    "64002",
    "Bệnh viện Đa khoa khu vực An Khê (demo)",
    "Bệnh viện đa khoa khu vực",
    "Quang Trung",
    "phường An Khê",
)


# --- clinicians --------------------------------------------------------------------------------


def practitioner(
    pid: str, n: int, family: str, given: list[str], gender: str, title: str, cchn: str, org: str
) -> None:
    put(
        {
            "resourceType": "Practitioner",
            "id": pid,
            "active": True,
            "identifier": [{"system": "https://ehealth-hub.vn/sid/cchn", "value": cchn}],
            "name": [
                {
                    "use": "official",
                    "family": family,
                    "given": given,
                    "text": " ".join([family, *given]),
                    "prefix": ["BS."],
                }
            ],
            "gender": gender,
            "qualification": [{"code": {"text": title}}],
        }
    )
    put(
        {
            "resourceType": "PractitionerRole",
            "id": f"vn-demo-practitionerrole-{n}",
            "active": True,
            "practitioner": ref(f"Practitioner/{pid}"),
            "organization": ref(f"Organization/{org}"),
            "code": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/practitioner-role",
                            "code": "doctor",
                            "display": "Doctor",
                        }
                    ],
                    "text": "Bác sĩ",
                }
            ],
            "specialty": [{"text": title}],
        }
    )


practitioner(DR_STATION, 1, "Phạm", ["Minh", "Tuấn"], "male", "Bác sĩ đa khoa", "000123/GL-CCHN", STATION)
practitioner(
    DR_PROV, 2, "Võ", ["Thị", "Thu", "Hà"], "female", "Bác sĩ chuyên khoa I Nội tiết", "000456/GL-CCHN", PROV
)
practitioner(DR_DISTRICT, 3, "Đinh", ["Văn", "Long"], "male", "Bác sĩ Nội khoa", "000789/GL-CCHN", DISTRICT)
practitioner(DR_OTHER, 4, "Hồ", ["Văn", "Khánh"], "male", "Bác sĩ Hồi sức cấp cứu", "001012/GL-CCHN", OTHER)

# --- citizens ----------------------------------------------------------------------------------

VI = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "vi"}]}, "preferred": True}]


def patient(
    pid: str,
    family: str,
    given: list[str],
    gender: str,
    birth: str,
    cccd: str,
    bhyt: str | None,
    phone: str | None,
    village: str,
    ward: str,
    org: str,
    gp: str | None = None,
    text: dict[str, str] | None = None,
) -> None:
    put(
        {
            "resourceType": "Patient",
            "id": pid,
            **({"text": text} if text else {}),
            "identifier": [
                {"use": "official", "system": CCCD, "value": cccd},
                *([{"system": BHYT, "value": bhyt}] if bhyt else []),
            ],
            "name": [
                {"use": "official", "family": family, "given": given, "text": " ".join([family, *given])}
            ],
            **({"telecom": [{"system": "phone", "value": phone, "use": "mobile"}]} if phone else {}),
            "gender": gender,
            "birthDate": birth,
            **({"address": address(village, ward)} if ward else {}),
            "communication": VI,
            "managingOrganization": ref(f"Organization/{org}"),
            **({"generalPractitioner": [ref(f"Practitioner/{gp}")]} if gp else {}),
        }
    )


patient(
    HOA,
    "Nguyễn",
    ["Thị", "Hoa"],
    "female",
    "1988-03-14",
    "064188001234",
    "DN4640123456789",
    "0905120001",
    "Thôn 1",
    "xã Ia Krái",
    STATION,
    DR_STATION,
    narrative(
        "Nguyễn Thị Hoa, nữ, sinh ngày 14/03/1988, thôn 1, xã Ia Krái, tỉnh Gia Lai.",
        "Quản lý sức khỏe ban đầu tại Trạm Y tế xã Ia Krái; bác sĩ gia đình: BS. Phạm Minh Tuấn.",
    ),
)
patient(
    "vn-demo-patient-2",
    "Trần",
    ["Văn", "Đức"],
    "male",
    "1975-11-02",
    "064075009876",
    "HT2640987654321",
    "0905120002",
    "Thôn 2",
    "xã Ia Krái",
    STATION,
)
patient(
    "vn-demo-patient-3",
    "Ksor",
    ["H'Bia"],
    "female",
    "2001-07-21",
    "064301004567",
    "TE1640111222333",
    "0905120003",
    "Thôn 3",
    "xã Ia Krái",
    STATION,
)
# Lê Văn Minh: the provincial hospital's patient, no address or phone on file.
patient(
    "vn-demo-patient-4", "Lê", ["Văn", "Minh"], "male", "1990-07-02", "064090004321", None, None, "", "", PROV
)
patient(
    CHILD,
    "Rơ Mah",
    ["Gia", "Bảo"],
    "male",
    "2019-05-06",
    "064219007788",
    "TE1640222333444",
    None,
    "Thôn 1",
    "xã Ia Krái",
    STATION,
    DR_STATION,
)

put(
    {
        "resourceType": "RelatedPerson",
        "id": "vn-demo-relatedperson-1",
        "active": True,
        "patient": ref(f"Patient/{HOA}"),
        "relationship": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                        "code": "HUSB",
                        "display": "husband",
                    }
                ],
                "text": "Chồng",
            }
        ],
        "name": [{"family": "Rơ Mah", "given": ["Thanh"], "text": "Rơ Mah Thanh"}],
        "telecom": [{"system": "phone", "value": "0905120099", "use": "mobile"}],
    }
)
# Hoa as the mother of her son: the proxy account hoa.proxy binds to this RelatedPerson (a proxy
# represents the one patient of its RelatedPerson, docs/access.md §2).
put(
    {
        "resourceType": "RelatedPerson",
        "id": "vn-demo-relatedperson-2",
        "active": True,
        "patient": ref(f"Patient/{CHILD}"),
        "relationship": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                        "code": "MTH",
                        "display": "mother",
                    }
                ],
                "text": "Mẹ",
            }
        ],
        "name": [{"family": "Nguyễn", "given": ["Thị", "Hoa"], "text": "Nguyễn Thị Hoa"}],
        "telecom": [{"system": "phone", "value": "0905120001", "use": "mobile"}],
        "period": {"start": "2019-05-06"},
    }
)

# --- clinical building blocks -------------------------------------------------------------------

FACILITY_DOCTOR = {STATION: DR_STATION, DISTRICT: DR_DISTRICT, PROV: DR_PROV, OTHER: DR_OTHER}


def encounter(
    eid: str,
    pid: str,
    org: str,
    start: str,
    end: str,
    reason: dict[str, Any],
    kind: str,
    *,
    inpatient: bool = False,
    diagnoses: list[str] = (),  # type: ignore[assignment]
) -> str:
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"}
        if inpatient
        else {"system": ACT_CODE, "code": "AMB", "display": "ambulatory"},
        "type": [{"text": kind}],
        "subject": ref(f"Patient/{pid}"),
        "participant": [{"individual": ref(f"Practitioner/{FACILITY_DOCTOR[org]}")}],
        "period": {"start": start, "end": end},
        "reasonCode": [reason],
        "serviceProvider": ref(f"Organization/{org}"),
    }
    if diagnoses:
        res["diagnosis"] = [
            {"condition": ref(f"Condition/{c}"), "rank": i + 1} for i, c in enumerate(diagnoses)
        ]
    if inpatient:
        res["hospitalization"] = {
            "admitSource": {"text": "Chuyển tuyến từ Trung tâm Y tế khu vực Ia Grai"},
            "dischargeDisposition": concept(
                "http://terminology.hl7.org/CodeSystem/discharge-disposition",
                "home",
                "Home",
                "Ra viện về nhà",
            ),
        }
    put(res)
    return eid


def quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def blood_pressure(systolic: int, diastolic: int) -> list[dict[str, Any]]:
    """The two components of a BP panel (85354-9), each with the treatment target as its range
    (the usual < 140/90 mmHg for a treated hypertensive adult), which the record's chart shades."""
    parts = []
    for loinc, display, text, value, low, high in (
        ("8480-6", "Systolic blood pressure", "Huyết áp tâm thu", systolic, 90, 139),
        ("8462-4", "Diastolic blood pressure", "Huyết áp tâm trương", diastolic, 60, 89),
    ):
        parts.append(
            {
                "code": concept(LOINC, loinc, display, text),
                "valueQuantity": quantity(value, "mmHg", "mm[Hg]"),
                "referenceRange": [
                    {"low": quantity(low, "mmHg", "mm[Hg]"), "high": quantity(high, "mmHg", "mm[Hg]")}
                ],
            }
        )
    return parts


def category(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBS_CAT, "code": code}]}]


def observation(
    oid: str,
    pid: str,
    eid: str | None,
    when: str,
    cat: str,
    code: dict[str, Any],
    org: str,
    **value: Any,
) -> str:
    put(
        {
            "resourceType": "Observation",
            "id": oid,
            "status": "final",
            "category": category(cat),
            "code": code,
            "subject": ref(f"Patient/{pid}"),
            **({"encounter": ref(f"Encounter/{eid}")} if eid else {}),
            "effectiveDateTime": when,
            "performer": [ref(f"Organization/{org}")],
            **value,
        }
    )
    return oid


LABS: dict[str, tuple[str, str, str, str, str, dict[str, float]]] = {
    # key: (LOINC, display, Vietnamese text, unit, UCUM, reference range)
    "hba1c": (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "HbA1c",
        "%",
        "%",
        {"low": 4.0, "high": 5.6},
    ),
    "glucose": (
        "1558-6",
        "Fasting glucose [Moles/volume] in Serum or Plasma",
        "Glucose máu lúc đói",
        "mmol/L",
        "mmol/L",
        {"low": 3.9, "high": 5.6},
    ),
    "creatinine": (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "Creatinin máu",
        "µmol/L",
        "umol/L",
        {"low": 45, "high": 84},
    ),
    "cholesterol": (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "Cholesterol toàn phần",
        "mmol/L",
        "mmol/L",
        {"low": 0, "high": 5.2},
    ),
}


def lab(oid: str, pid: str, eid: str, when: str, org: str, key: str, value: float) -> str:
    loinc, display, text, unit, ucum, rng = LABS[key]
    high = value > rng["high"]
    low = value < rng["low"]
    interp = "H" if high else "L" if low else "N"
    return observation(
        oid,
        pid,
        eid,
        when,
        "laboratory",
        concept(LOINC, loinc, display, text),
        org,
        valueQuantity=quantity(value, unit, ucum),
        interpretation=[
            concept(
                "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                interp,
                {"H": "High", "L": "Low", "N": "Normal"}[interp],
                {"H": "Cao", "L": "Thấp", "N": "Bình thường"}[interp],
            )
        ],
        referenceRange=[
            {
                **({"low": quantity(rng["low"], unit, ucum)} if rng["low"] else {}),
                "high": quantity(rng["high"], unit, ucum),
                "text": f"{rng['low']:g}–{rng['high']:g} {unit}"
                if rng["low"]
                else f"< {rng['high']:g} {unit}",
            }
        ],
    )


def vitals(
    prefix: str,
    pid: str,
    eid: str,
    when: str,
    org: str,
    sys: int,
    dia: int,
    weight: float,
    hr: int,
    height_m: float,
) -> list[str]:
    ids = [
        observation(
            f"{prefix}-bp",
            pid,
            eid,
            when,
            "vital-signs",
            concept(LOINC, "85354-9", "Blood pressure panel with all children optional", "Huyết áp"),
            org,
            component=blood_pressure(sys, dia),
        ),
        observation(
            f"{prefix}-weight",
            pid,
            eid,
            when,
            "vital-signs",
            concept(LOINC, "29463-7", "Body weight", "Cân nặng"),
            org,
            valueQuantity=quantity(weight, "kg", "kg"),
        ),
        observation(
            f"{prefix}-bmi",
            pid,
            eid,
            when,
            "vital-signs",
            concept(LOINC, "39156-5", "Body mass index (BMI) [Ratio]", "Chỉ số khối cơ thể (BMI)"),
            org,
            valueQuantity=quantity(round(weight / height_m**2, 1), "kg/m2", "kg/m2"),
            referenceRange=[
                {
                    "low": quantity(18.5, "kg/m2", "kg/m2"),
                    "high": quantity(22.9, "kg/m2", "kg/m2"),
                    "text": "18,5–22,9 (người châu Á)",
                }
            ],
        ),
        observation(
            f"{prefix}-hr",
            pid,
            eid,
            when,
            "vital-signs",
            concept(LOINC, "8867-4", "Heart rate", "Nhịp tim"),
            org,
            valueQuantity=quantity(hr, "/min", "/min"),
            referenceRange=[{"low": quantity(60, "/min", "/min"), "high": quantity(100, "/min", "/min")}],
        ),
    ]
    return ids


def lab_report(
    rid: str, pid: str, eid: str, when: str, org: str, results: list[str], conclusion: str
) -> None:
    put(
        {
            "resourceType": "DiagnosticReport",
            "id": rid,
            "status": "final",
            "category": [
                concept("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB", "Laboratory", "Xét nghiệm")
            ],
            "code": concept(LOINC, "11502-2", "Laboratory report", "Phiếu kết quả xét nghiệm sinh hóa máu"),
            "subject": ref(f"Patient/{pid}"),
            "encounter": ref(f"Encounter/{eid}"),
            "effectiveDateTime": when,
            "issued": when,
            "performer": [ref(f"Organization/{org}")],
            "result": [ref(f"Observation/{r}") for r in results],
            "conclusion": conclusion,
        }
    )


def condition(
    cid: str,
    pid: str,
    eid: str,
    icd: str,
    display: str,
    text: str,
    onset: str,
    *,
    status: str = "active",
    abatement: str | None = None,
    security: str | None = None,
    note: str | None = None,
) -> str:
    code = {
        "coding": [{"system": ICD10, "code": icd, "display": display}, {"system": ICD10_VN, "code": icd}],
        "text": text,
    }
    put(
        {
            "resourceType": "Condition",
            "id": cid,
            **({"meta": {"security": [{"system": ACT_CODE, "code": security}]}} if security else {}),
            "text": narrative(
                f"{text} (ICD-10 {icd}), phát hiện ngày {onset[8:10]}/{onset[5:7]}/{onset[:4]}."
            ),
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "confirmed",
                    }
                ]
            },
            "category": [
                concept(
                    "http://terminology.hl7.org/CodeSystem/condition-category",
                    "encounter-diagnosis",
                    "Encounter Diagnosis",
                    "Chẩn đoán",
                )
            ],
            "code": code,
            "subject": ref(f"Patient/{pid}"),
            "encounter": ref(f"Encounter/{eid}"),
            "onsetDateTime": onset,
            **({"abatementDateTime": abatement} if abatement else {}),
            "recordedDate": onset[:10],
            **({"note": [{"text": note}]} if note else {}),
        }
    )
    return cid


def procedure(
    prid: str, pid: str, eid: str, when: str, snomed: str, display: str, text: str, org: str
) -> None:
    put(
        {
            "resourceType": "Procedure",
            "id": prid,
            "status": "completed",
            "code": concept(SNOMED, snomed, display, text),
            "subject": ref(f"Patient/{pid}"),
            "encounter": ref(f"Encounter/{eid}"),
            "performedDateTime": when,
            "performer": [
                {
                    "actor": ref(f"Practitioner/{FACILITY_DOCTOR[org]}"),
                    "onBehalfOf": ref(f"Organization/{org}"),
                }
            ],
        }
    )


def immunization(
    iid: str, pid: str, cvx: str, display: str, text: str, when: str, dose: int, lot: str
) -> None:
    put(
        {
            "resourceType": "Immunization",
            "id": iid,
            "status": "completed",
            "vaccineCode": concept(CVX, cvx, display, text),
            "patient": ref(f"Patient/{pid}"),
            "occurrenceDateTime": when,
            "primarySource": True,
            "lotNumber": lot,
            "performer": [{"actor": ref(f"Organization/{STATION}")}],
            "protocolApplied": [{"doseNumberPositiveInt": dose}],
        }
    )


def medication(
    mid: str,
    pid: str,
    eid: str,
    atc: str,
    display: str,
    text: str,
    dosage: str,
    authored: str,
    org: str,
    status: str = "active",
) -> None:
    put(
        {
            "resourceType": "MedicationRequest",
            "id": mid,
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": concept(ATC, atc, display, text),
            "subject": ref(f"Patient/{pid}"),
            "encounter": ref(f"Encounter/{eid}"),
            "authoredOn": authored,
            "requester": ref(f"Practitioner/{FACILITY_DOCTOR[org]}"),
            "dosageInstruction": [{"text": dosage}],
        }
    )


# --- Nguyễn Thị Hoa: 2023-2026 ------------------------------------------------------------------

I10 = "vn-demo-hoa-cond-i10"
E11 = "vn-demo-hoa-cond-e11"
E78 = "vn-demo-hoa-cond-e78"
J18 = "vn-demo-hoa-cond-j18"
CHECKUP = concept(
    ICD10, "I10", "Essential (primary) hypertension", "Khám định kỳ tăng huyết áp, đái tháo đường"
)
DIABETES_VISIT = concept(ICD10, "E11", "Type 2 diabetes mellitus", "Tái khám đái tháo đường típ 2")

# (date, facility, systolic, diastolic, weight kg, heart rate, labs or None, fasting capillary glucose or None)
VISITS: list[tuple[str, str, int, int, float, int, dict[str, float] | None, float | None]] = [
    ("2023-03-15", STATION, 152, 96, 68.0, 88, None, None),
    (
        "2023-04-10",
        DISTRICT,
        148,
        94,
        67.5,
        86,
        {"hba1c": 7.8, "glucose": 8.9, "creatinine": 62, "cholesterol": 6.2},
        None,
    ),
    ("2023-09-12", STATION, 142, 90, 66.8, 84, None, 7.9),
    (
        "2023-11-14",
        DISTRICT,
        140,
        88,
        66.2,
        82,
        {"hba1c": 7.2, "glucose": 7.6, "creatinine": 64, "cholesterol": 5.8},
        None,
    ),
    (
        "2024-05-21",
        DISTRICT,
        136,
        86,
        65.9,
        80,
        {"hba1c": 6.9, "glucose": 7.1, "creatinine": 66, "cholesterol": 5.5},
        None,
    ),
    ("2024-07-16", STATION, 138, 86, 66.0, 82, None, 7.3),
    (
        "2024-10-02",
        PROV,
        160,
        98,
        64.5,
        104,
        {"hba1c": 8.4, "glucose": 11.2, "creatinine": 92, "cholesterol": 6.1},
        None,
    ),
    (
        "2025-01-14",
        DISTRICT,
        134,
        84,
        64.8,
        78,
        {"hba1c": 7.4, "glucose": 7.8, "creatinine": 74, "cholesterol": 5.6},
        None,
    ),
    (
        "2025-05-27",
        DISTRICT,
        132,
        82,
        64.2,
        76,
        {"hba1c": 7.1, "glucose": 7.4, "creatinine": 71, "cholesterol": 5.4},
        None,
    ),
    (
        "2025-09-09",
        DISTRICT,
        130,
        82,
        63.8,
        80,
        {"hba1c": 6.8, "glucose": 6.9, "creatinine": 70, "cholesterol": 5.1},
        None,
    ),
    ("2026-03-03", STATION, 128, 80, 63.5, 76, None, 6.8),
    (
        "2026-08-19",
        DISTRICT,
        134,
        84,
        63.2,
        78,
        {"hba1c": 6.6, "glucose": 6.7, "creatinine": 71, "cholesterol": 4.9},
        None,
    ),
    ("2026-11-10", STATION, 126, 78, 63.0, 74, None, None),
]
HEIGHT = 1.55
KIND = {STATION: "Khám định kỳ tại trạm", DISTRICT: "Khám ngoại trú", PROV: "Điều trị nội trú"}

visit_ids: list[str] = []
for n, (day, org, sys_bp, dia_bp, kg, hr, labs, capillary) in enumerate(VISITS, start=1):
    eid = f"vn-demo-hoa-enc-{n:02d}"
    visit_ids.append(eid)
    inpatient = org == PROV
    start = f"{day}T{'14:30' if inpatient else '07:30'}:00+07:00"
    end = "2024-10-08T10:00:00+07:00" if inpatient else f"{day}T08:15:00+07:00"
    if inpatient:
        reason = concept(
            ICD10, "J18.9", "Pneumonia, unspecified organism", "Sốt, ho, khó thở; đường huyết cao"
        )
        diagnoses = [J18, E11, I10]
    elif n == 1:
        reason = concept(
            ICD10, "R03.0", "Elevated blood-pressure reading", "Đo huyết áp cao khi khám sàng lọc"
        )
        diagnoses = [I10]
    elif n == 2:
        reason = concept(
            ICD10, "R73.9", "Hyperglycaemia, unspecified", "Đường huyết mao mạch cao tại trạm, chuyển khám"
        )
        diagnoses = [E11, E78]
    else:
        reason = DIABETES_VISIT if org == DISTRICT else CHECKUP
        diagnoses = [E11, I10] if org == DISTRICT else [I10, E11]
    encounter(eid, HOA, org, start, end, reason, KIND[org], inpatient=inpatient, diagnoses=diagnoses)
    when = f"{day}T{'15:00' if inpatient else '07:45'}:00+07:00"
    vitals(f"vn-demo-hoa-v{n:02d}", HOA, eid, when, org, sys_bp, dia_bp, kg, hr, HEIGHT)
    if capillary is not None:
        lab(f"vn-demo-hoa-l{n:02d}-glucose", HOA, eid, when, org, "glucose", capillary)
    if labs:
        results = [lab(f"vn-demo-hoa-l{n:02d}-{k}", HOA, eid, when, org, k, v) for k, v in labs.items()]
        high = labs["hba1c"] > 7.0
        lab_report(
            f"vn-demo-hoa-dr-{n:02d}",
            HOA,
            eid,
            when,
            org,
            results,
            "HbA1c chưa đạt mục tiêu (< 7%)." if high else "HbA1c đạt mục tiêu (< 7%).",
        )

put(
    {
        "resourceType": "Observation",
        "id": "vn-demo-hoa-height",
        "status": "final",
        "category": category("vital-signs"),
        "code": concept(LOINC, "8302-2", "Body height", "Chiều cao"),
        "subject": ref(f"Patient/{HOA}"),
        "encounter": ref("Encounter/vn-demo-hoa-enc-01"),
        "effectiveDateTime": "2023-03-15T07:45:00+07:00",
        "valueQuantity": quantity(155, "cm", "cm"),
    }
)

condition(
    I10,
    HOA,
    "vn-demo-hoa-enc-01",
    "I10",
    "Essential (primary) hypertension",
    "Tăng huyết áp vô căn",
    "2023-03-15",
)
condition(
    E11,
    HOA,
    "vn-demo-hoa-enc-02",
    "E11",
    "Type 2 diabetes mellitus",
    "Đái tháo đường típ 2",
    "2023-04-10",
    note="Chẩn đoán tại TTYT khu vực Ia Grai: HbA1c 7,8%, glucose đói 8,9 mmol/L.",
)
condition(
    E78,
    HOA,
    "vn-demo-hoa-enc-02",
    "E78.0",
    "Pure hypercholesterolaemia",
    "Tăng cholesterol máu",
    "2023-04-10",
)
condition(
    J18,
    HOA,
    "vn-demo-hoa-enc-07",
    "J18.9",
    "Pneumonia, unspecified organism",
    "Viêm phổi thùy dưới phải",
    "2024-10-02",
    status="resolved",
    abatement="2024-10-08",
)
# The sensitive one: mental health (PSY), hidden from clinicians and proxies without a consent that
# names the category; the patient herself sees it. Labelled by its code (ICD-10 F) and explicitly.
condition(
    "vn-demo-hoa-cond-psy",
    HOA,
    "vn-demo-hoa-enc-10",
    "F32.0",
    "Mild depressive episode",
    "Giai đoạn trầm cảm nhẹ",
    "2025-09-09",
    security="PSY",
)
observation(
    "vn-demo-hoa-phq9",
    HOA,
    "vn-demo-hoa-enc-10",
    "2025-09-09T08:00:00+07:00",
    "survey",
    concept(
        LOINC, "44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]", "Điểm PHQ-9"
    ),
    DISTRICT,
    valueInteger=8,
)

procedure(
    "vn-demo-hoa-proc-ecg",
    HOA,
    "vn-demo-hoa-enc-02",
    "2023-04-10T08:00:00+07:00",
    "29303009",
    "Electrocardiographic procedure",
    "Đo điện tim",
    DISTRICT,
)
procedure(
    "vn-demo-hoa-proc-xray",
    HOA,
    "vn-demo-hoa-enc-07",
    "2024-10-02T15:30:00+07:00",
    "399208008",
    "Plain chest X-ray",
    "Chụp X-quang ngực thẳng",
    PROV,
)
procedure(
    "vn-demo-hoa-proc-iv",
    HOA,
    "vn-demo-hoa-enc-07",
    "2024-10-02T16:00:00+07:00",
    "14152002",
    "Intravenous infusion",
    "Truyền dịch tĩnh mạch",
    PROV,
)
procedure(
    "vn-demo-hoa-proc-diet",
    HOA,
    "vn-demo-hoa-enc-03",
    "2023-09-12T08:00:00+07:00",
    "61310001",
    "Nutrition education",
    "Tư vấn chế độ ăn cho người đái tháo đường",
    STATION,
)
procedure(
    "vn-demo-hoa-proc-fundus",
    HOA,
    "vn-demo-hoa-enc-09",
    "2025-05-27T08:30:00+07:00",
    "252779009",
    "Single bright light fundus examination",
    "Soi đáy mắt",
    DISTRICT,
)

medication(
    "vn-demo-hoa-med-amlodipine",
    HOA,
    "vn-demo-hoa-enc-01",
    "C08CA01",
    "amlodipine",
    "Amlodipin 5 mg",
    "Uống 1 viên mỗi sáng",
    "2023-03-15",
    STATION,
)
medication(
    "vn-demo-hoa-med-metformin-500",
    HOA,
    "vn-demo-hoa-enc-02",
    "A10BA02",
    "metformin",
    "Metformin 500 mg",
    "Uống 1 viên sau ăn sáng và tối",
    "2023-04-10",
    DISTRICT,
    status="stopped",
)
medication(
    "vn-demo-hoa-med-metformin",
    HOA,
    "vn-demo-hoa-enc-07",
    "A10BA02",
    "metformin",
    "Metformin 850 mg",
    "Uống 1 viên sau ăn sáng và tối",
    "2024-10-08",
    PROV,
)
medication(
    "vn-demo-hoa-med-atorvastatin",
    HOA,
    "vn-demo-hoa-enc-08",
    "C10AA05",
    "atorvastatin",
    "Atorvastatin 10 mg",
    "Uống 1 viên buổi tối",
    "2025-01-14",
    DISTRICT,
)
medication(
    "vn-demo-hoa-med-levofloxacin",
    HOA,
    "vn-demo-hoa-enc-07",
    "J01MA12",
    "levofloxacin",
    "Levofloxacin 500 mg (không dùng penicilin do dị ứng)",
    "Truyền tĩnh mạch 500 mg mỗi ngày trong 5 ngày",
    "2024-10-02",
    PROV,
    status="completed",
)

put(
    {
        "resourceType": "AllergyIntolerance",
        "id": "vn-demo-hoa-allergy-penicillin",
        "text": narrative(
            "Dị ứng penicilin: nổi mày đay toàn thân năm 2015. Không dùng kháng sinh nhóm penicilin."
        ),
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "active",
                }
            ]
        },
        "verificationStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "code": "confirmed",
                }
            ]
        },
        "type": "allergy",
        "category": ["medication"],
        "criticality": "high",
        "code": concept(SNOMED, "764146007", "Penicillin", "Penicilin"),
        "patient": ref(f"Patient/{HOA}"),
        "onsetDateTime": "2015-06-01",
        "recordedDate": "2023-03-15",
        "recorder": ref(f"Practitioner/{DR_STATION}"),
        "reaction": [
            {
                "manifestation": [concept(SNOMED, "126485001", "Urticaria", "Nổi mày đay")],
                "severity": "moderate",
            }
        ],
    }
)

for iid, cvx, display, text, when, dose, lot in [
    (
        "covid-1",
        "208",
        "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose",
        "Vắc xin COVID-19 (Pfizer) mũi 1",
        "2021-08-20",
        1,
        "FK5618",
    ),
    (
        "covid-2",
        "208",
        "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose",
        "Vắc xin COVID-19 (Pfizer) mũi 2",
        "2021-09-17",
        2,
        "FK5619",
    ),
    (
        "covid-3",
        "208",
        "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose",
        "Vắc xin COVID-19 (Pfizer) mũi nhắc lại",
        "2022-03-10",
        3,
        "FN2041",
    ),
    (
        "hepb-1",
        "43",
        "hepatitis B vaccine, adult dosage",
        "Vắc xin viêm gan B (người lớn) mũi 1",
        "2023-09-12",
        1,
        "HB2309A",
    ),
    (
        "hepb-2",
        "43",
        "hepatitis B vaccine, adult dosage",
        "Vắc xin viêm gan B (người lớn) mũi 2",
        "2023-10-12",
        2,
        "HB2309A",
    ),
    (
        "hepb-3",
        "43",
        "hepatitis B vaccine, adult dosage",
        "Vắc xin viêm gan B (người lớn) mũi 3",
        "2024-03-12",
        3,
        "HB2402C",
    ),
    ("td", "09", "Td (adult), adsorbed", "Vắc xin uốn ván - bạch hầu (Td)", "2024-07-16", 1, "TD2406B"),
    ("flu", "141", "Influenza, seasonal, injectable", "Vắc xin cúm mùa", "2025-10-21", 1, "FL2510K"),
]:
    immunization(f"vn-demo-hoa-imm-{iid}", HOA, cvx, display, text, when, dose, lot)

put(
    {
        "resourceType": "CarePlan",
        "id": "vn-demo-hoa-careplan",
        "text": narrative(
            "Kế hoạch theo dõi tăng huyết áp và đái tháo đường típ 2 tại Trạm Y tế xã Ia Krái.",
            "Đo huyết áp và đường huyết mao mạch định kỳ tại trạm; xét nghiệm HbA1c, creatinin, "
            "cholesterol tại Trung tâm Y tế khu vực Ia Grai mỗi 4–6 tháng; tư vấn ăn uống, vận động.",
        ),
        "status": "active",
        "intent": "plan",
        "category": [{"text": "Quản lý bệnh mạn tính không lây tại tuyến xã"}],
        "title": "Theo dõi tăng huyết áp và đái tháo đường",
        "subject": ref(f"Patient/{HOA}"),
        "period": {"start": "2023-04-10"},
        "created": "2023-04-10",
        "author": ref(f"Practitioner/{DR_STATION}"),
        "addresses": [ref(f"Condition/{I10}"), ref(f"Condition/{E11}")],
        "activity": [
            {
                "detail": {
                    "kind": "ServiceRequest",
                    "code": concept(LOINC, "85354-9", "Blood pressure panel", "Đo huyết áp"),
                    "status": "in-progress",
                    "scheduledTiming": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "mo"}},
                    # A Location reference in R4; the demo has no Location, so the place is named.
                    "location": {"display": "Trạm Y tế xã Ia Krái (demo)"},
                    "description": "Đo huyết áp hằng tháng tại trạm y tế xã",
                }
            },
            {
                "detail": {
                    "kind": "ServiceRequest",
                    "code": concept(LOINC, "4548-4", "Hemoglobin A1c", "Xét nghiệm HbA1c"),
                    "status": "scheduled",
                    "scheduledString": "Mỗi 4–6 tháng tại Trung tâm Y tế khu vực Ia Grai",
                    "description": "Xét nghiệm HbA1c, creatinin, cholesterol; lần tới tháng 01/2027",
                }
            },
            {
                "detail": {
                    "status": "in-progress",
                    "description": "Ăn giảm tinh bột và muối, đi bộ 30 phút mỗi ngày",
                }
            },
        ],
    }
)

DISCHARGE_TEXT = """GIẤY RA VIỆN (bản tóm tắt, dữ liệu mô phỏng)
Bệnh viện Đa khoa tỉnh Gia Lai (demo) - Khoa Nội tổng hợp
Họ tên: Nguyễn Thị Hoa, nữ, sinh năm 1988
Vào viện: 02/10/2024 - Ra viện: 08/10/2024
Chẩn đoán: Viêm phổi thùy dưới phải (J18.9); Đái tháo đường típ 2 (E11); Tăng huyết áp (I10)
Điều trị: Levofloxacin truyền tĩnh mạch 5 ngày (dị ứng penicilin); insulin tạm thời; chỉnh liều metformin.
Tình trạng ra viện: hết sốt, X-quang cải thiện.
Hướng điều trị: Metformin 850 mg x 2 lần/ngày, Amlodipin 5 mg/ngày; tái khám tại TTYT khu vực Ia Grai sau 3 tháng.
"""

put(
    {
        "resourceType": "DocumentReference",
        "id": "vn-demo-hoa-docref-discharge",
        "text": narrative(
            "Giấy ra viện, Bệnh viện Đa khoa tỉnh Gia Lai, đợt điều trị 02/10/2024 - 08/10/2024."
        ),
        "status": "current",
        "docStatus": "final",
        "type": concept(LOINC, "18842-5", "Discharge summary", "Giấy ra viện"),
        "category": [{"text": "Tóm tắt ra viện"}],
        "subject": ref(f"Patient/{HOA}"),
        "date": "2024-10-08T10:00:00+07:00",
        "author": [ref(f"Practitioner/{DR_PROV}")],
        "custodian": ref(f"Organization/{PROV}"),
        "description": "Giấy ra viện đợt điều trị viêm phổi",
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "vi",
                    "data": base64.b64encode(DISCHARGE_TEXT.encode()).decode(),
                    "title": "giay-ra-vien-2024-10-08.txt",
                    "creation": "2024-10-08T10:00:00+07:00",
                }
            }
        ],
        "context": {
            "encounter": [ref("Encounter/vn-demo-hoa-enc-07")],
            "period": {"start": "2024-10-02", "end": "2024-10-08"},
        },
    }
)

STUDY_UID = "2.25.301712358765119381244236651020448376851"
put(
    {
        "resourceType": "ImagingStudy",
        "id": "vn-demo-hoa-imaging-chest",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}],
        "subject": ref(f"Patient/{HOA}"),
        "encounter": ref("Encounter/vn-demo-hoa-enc-07"),
        "started": "2024-10-02T15:30:00+07:00",
        "referrer": ref(f"Practitioner/{DR_PROV}"),
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "procedureCode": [concept(SNOMED, "399208008", "Plain chest X-ray", "X-quang ngực thẳng")],
        "description": "X-quang ngực thẳng (PA)",
        "series": [
            {
                "uid": f"{STUDY_UID}.1",
                "number": 1,
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                "description": "Ngực thẳng",
                "numberOfInstances": 1,
                "bodySite": {"system": SNOMED, "code": "51185008", "display": "Thoracic structure"},
                "instance": [
                    {
                        "uid": f"{STUDY_UID}.1.1",
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1.1",
                        },
                        "number": 1,
                    }
                ],
            }
        ],
    }
)
put(
    {
        "resourceType": "DiagnosticReport",
        "id": "vn-demo-hoa-dr-xray",
        "text": narrative("X-quang ngực thẳng: đám mờ thùy dưới phổi phải, phù hợp viêm phổi."),
        "status": "final",
        "category": [
            concept("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology", "Chẩn đoán hình ảnh")
        ],
        "code": concept(LOINC, "36643-5", "XR Chest 2 Views", "X-quang ngực"),
        "subject": ref(f"Patient/{HOA}"),
        "encounter": ref("Encounter/vn-demo-hoa-enc-07"),
        "effectiveDateTime": "2024-10-02T15:30:00+07:00",
        "issued": "2024-10-02T16:10:00+07:00",
        "performer": [ref(f"Organization/{PROV}")],
        "resultsInterpreter": [ref(f"Practitioner/{DR_PROV}")],
        "imagingStudy": [ref("ImagingStudy/vn-demo-hoa-imaging-chest")],
        "conclusion": "Đám mờ thùy dưới phổi phải, phù hợp viêm phổi. Bóng tim không to.",
    }
)

# Hoa signed, on admission, that the provincial hospital may see her ordinary data for treatment
# until the end of 2027: the consent state the record page shows. Sensitive classes not named.
put(
    {
        "resourceType": "Consent",
        "id": "vn-demo-hoa-consent-bvdk",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": ref(f"Patient/{HOA}"),
        "dateTime": "2024-10-02T14:45:00+07:00",
        "performer": [ref(f"Patient/{HOA}")],
        "organization": [ref(f"Organization/{PROV}")],
        "sourceAttachment": {"title": "Phiếu đồng ý chia sẻ dữ liệu sức khỏe (bản giấy, đã ký)"},
        "provision": {
            "type": "permit",
            "period": {"start": "2024-10-02", "end": "2027-12-31"},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": ref(f"Organization/{PROV}"),
                }
            ],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
            "securityLabel": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}
            ],
        },
    }
)

# --- the child: Rơ Mah Gia Bảo (born 2019), EPI vaccines and one visit -------------------------

for iid, cvx, display, text, when, dose in [
    ("bcg", "19", "BCG", "Vắc xin lao (BCG)", "2019-05-07", 1),
    ("hepb0", "08", "Hep B, adolescent or pediatric", "Vắc xin viêm gan B sơ sinh", "2019-05-06", 1),
    ("5in1-1", "120", "DTaP-Hib-IPV", "Vắc xin 5 trong 1 mũi 1", "2019-07-08", 1),
    ("5in1-2", "120", "DTaP-Hib-IPV", "Vắc xin 5 trong 1 mũi 2", "2019-08-08", 2),
    ("5in1-3", "120", "DTaP-Hib-IPV", "Vắc xin 5 trong 1 mũi 3", "2019-09-09", 3),
    ("measles", "05", "measles", "Vắc xin sởi", "2020-02-10", 1),
    ("je", "39", "Japanese encephalitis", "Vắc xin viêm não Nhật Bản", "2020-05-12", 1),
]:
    immunization(
        f"vn-demo-child-imm-{iid}", CHILD, cvx, display, text, when, dose, f"EPI{when[2:4]}{when[5:7]}"
    )
encounter(
    "vn-demo-child-enc-01",
    CHILD,
    STATION,
    "2026-04-07T08:00:00+07:00",
    "2026-04-07T08:20:00+07:00",
    concept(ICD10, "J06.9", "Acute upper respiratory infection, unspecified", "Sốt, ho, sổ mũi"),
    KIND[STATION],
    diagnoses=["vn-demo-child-cond-j06"],
)
condition(
    "vn-demo-child-cond-j06",
    CHILD,
    "vn-demo-child-enc-01",
    "J06.9",
    "Acute upper respiratory infection, unspecified",
    "Viêm đường hô hấp trên cấp",
    "2026-04-07",
    status="resolved",
    abatement="2026-04-14",
)
observation(
    "vn-demo-child-weight-01",
    CHILD,
    "vn-demo-child-enc-01",
    "2026-04-07T08:05:00+07:00",
    "vital-signs",
    concept(LOINC, "29463-7", "Body weight", "Cân nặng"),
    STATION,
    valueQuantity=quantity(19.5, "kg", "kg"),
)
observation(
    "vn-demo-child-temp-01",
    CHILD,
    "vn-demo-child-enc-01",
    "2026-04-07T08:05:00+07:00",
    "vital-signs",
    concept(LOINC, "8310-5", "Body temperature", "Nhiệt độ"),
    STATION,
    valueQuantity=quantity(38.2, "Cel", "Cel"),
)

# --- the other citizens: the rows the first demo had, plus visits at other facilities ----------


def old_vitals(n: int, pid: str, day: str, sys_bp: int, dia_bp: int, kg: float) -> None:
    """Patients 1-3's first demo rows (ids kept: vn-demo-encounter-N, vn-demo-bp-N, vn-demo-weight-N)."""
    eid = f"vn-demo-encounter-{n}"
    encounter(eid, pid, STATION, f"{day}T08:00:00+07:00", f"{day}T08:30:00+07:00", CHECKUP, KIND[STATION])
    when = f"{day}T08:10:00+07:00"
    observation(
        f"vn-demo-bp-{n}",
        pid,
        eid,
        when,
        "vital-signs",
        concept(LOINC, "85354-9", "Blood pressure panel with all children optional", "Huyết áp"),
        STATION,
        component=blood_pressure(sys_bp, dia_bp),
    )
    observation(
        f"vn-demo-weight-{n}",
        pid,
        eid,
        when,
        "vital-signs",
        concept(LOINC, "29463-7", "Body weight", "Cân nặng"),
        STATION,
        valueQuantity=quantity(kg, "kg", "kg"),
    )


# Hoa's first station visit of the old demo (2026-10-01) stays: a check-up between two others.
old_vitals(1, HOA, "2026-10-01", 125, 82, 63.0)
old_vitals(2, "vn-demo-patient-2", "2026-10-02", 130, 84, 58)
old_vitals(3, "vn-demo-patient-3", "2026-10-03", 135, 86, 62)
condition(
    "vn-demo-condition-2",
    "vn-demo-patient-2",
    "vn-demo-encounter-2",
    "I10",
    "Essential (primary) hypertension",
    "Tăng huyết áp vô căn",
    "2026-10-02",
)
# Trần Văn Đức: a PHQ-9 score (mental health: needs a consent naming PSY) and a visit at the
# regional centre with a cholesterol result.
observation(
    "vn-demo-phq9-2",
    "vn-demo-patient-2",
    None,
    "2026-10-12",
    "survey",
    concept(LOINC, "44261-6", "PHQ-9 total score", "Điểm PHQ-9"),
    STATION,
    valueInteger=14,
)
encounter(
    "vn-demo-p2-enc-ttyt",
    "vn-demo-patient-2",
    DISTRICT,
    "2026-06-09T07:30:00+07:00",
    "2026-06-09T08:10:00+07:00",
    concept(ICD10, "I10", "Essential (primary) hypertension", "Khám tăng huyết áp"),
    KIND[DISTRICT],
)
lab(
    "vn-demo-p2-chol",
    "vn-demo-patient-2",
    "vn-demo-p2-enc-ttyt",
    "2026-06-09T07:45:00+07:00",
    DISTRICT,
    "cholesterol",
    5.9,
)

# Ksor H'Bia: dengue fever treated at An Khê (the other hospital).
encounter(
    "vn-demo-p3-enc-ankhe",
    "vn-demo-patient-3",
    OTHER,
    "2025-08-04T21:10:00+07:00",
    "2025-08-04T23:40:00+07:00",
    concept(ICD10, "A97.0", "Dengue without warning signs", "Sốt cao 3 ngày, đau cơ"),
    "Cấp cứu",
    diagnoses=["vn-demo-p3-cond-dengue"],
)
condition(
    "vn-demo-p3-cond-dengue",
    "vn-demo-patient-3",
    "vn-demo-p3-enc-ankhe",
    "A97.0",
    "Dengue without warning signs",
    "Sốt xuất huyết Dengue không có dấu hiệu cảnh báo",
    "2025-08-04",
    status="resolved",
    abatement="2025-08-12",
)
observation(
    "vn-demo-p3-platelets",
    "vn-demo-patient-3",
    "vn-demo-p3-enc-ankhe",
    "2025-08-04T21:30:00+07:00",
    "laboratory",
    concept(LOINC, "777-3", "Platelets [#/volume] in Blood by Automated count", "Số lượng tiểu cầu"),
    OTHER,
    valueQuantity=quantity(92, "G/L", "10*9/L"),
    referenceRange=[{"low": quantity(150, "G/L", "10*9/L"), "high": quantity(400, "G/L", "10*9/L")}],
)

# Lê Văn Minh (the provincial hospital's patient): a weight, a visit at the hospital and one at the
# regional centre.
observation(
    "vn-demo-weight-4",
    "vn-demo-patient-4",
    None,
    "2026-10-05",
    "vital-signs",
    concept(LOINC, "29463-7", "Body weight", "Cân nặng"),
    PROV,
    valueQuantity=quantity(64, "kg", "kg"),
)
encounter(
    "vn-demo-p4-enc-bvdk",
    "vn-demo-patient-4",
    PROV,
    "2026-10-05T09:00:00+07:00",
    "2026-10-05T09:40:00+07:00",
    concept(ICD10, "K29.7", "Gastritis, unspecified", "Đau thượng vị"),
    "Khám ngoại trú",
    diagnoses=["vn-demo-p4-cond-k29"],
)
condition(
    "vn-demo-p4-cond-k29",
    "vn-demo-patient-4",
    "vn-demo-p4-enc-bvdk",
    "K29.7",
    "Gastritis, unspecified",
    "Viêm dạ dày",
    "2026-10-05",
)
encounter(
    "vn-demo-p4-enc-ttyt",
    "vn-demo-patient-4",
    DISTRICT,
    "2025-12-02T07:30:00+07:00",
    "2025-12-02T08:00:00+07:00",
    concept(ICD10, "Z00.0", "General medical examination", "Khám sức khỏe định kỳ"),
    "Khám sức khỏe",
)
observation(
    "vn-demo-p4-bp",
    "vn-demo-patient-4",
    "vn-demo-p4-enc-ttyt",
    "2025-12-02T07:40:00+07:00",
    "vital-signs",
    concept(LOINC, "85354-9", "Blood pressure panel with all children optional", "Huyết áp"),
    DISTRICT,
    component=blood_pressure(118, 76),
)


def bundle() -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def main() -> None:
    OUT.write_text(json.dumps(bundle(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(entries)} entries")


if __name__ == "__main__":
    main()
