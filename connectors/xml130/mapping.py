"""QĐ 130 episode -> FHIR: the patient, XML1 and XML0 (the other tables are in
``connectors.xml130.clinical``); what every table becomes is listed here.

Owns: the patient's facts, the XML1 and XML0 mappings (the code lists are data in
``fhir/xml130/code-lists.json``). Every table, one function each:
- XML1 ``TONG_HOP``: the patient's facts; Coverage per BHYT card; the Encounter (MA_LK);
  a Condition per MA_BENH_CHINH / MA_BENH_KT (ICD-10); a Procedure per MA_PTTT_QT
  (ICD-9-CM); body weight and blood group Observations; an Appointment for NGAY_TAI_KHAM.
- XML0 check-in: an in-progress Encounter, created only when none exists (ifNoneExist), so
  a late check-in never reopens a closed episode; XML1 completes it (same identifier).
- XML2 drugs: MedicationRequest per row (the order); a MedicationDispense (its
  authorizingPrescription) when NGAY_TH_YL says the drug was given or handed over.
- XML3: Procedure per service row (not the cost lines of bed days and transport, and not the
  services whose results XML4 carries: their DiagnosticReport stands for them); a supply row
  is the ``usedCode`` of the service it names (MA_DICH_VU) and a ChargeItem of its own (the
  Encounter as context, that Procedure or DiagnosticReport as service, quantity, unit price).
- XML4: Observation per indicator, a DiagnosticReport per MA_DICH_VU holding them.
- XML5: a ClinicalImpression per progress row (LOINC 11506-3, the text as its summary):
  found by patient, encounter and date, in the timeline and $everything.
- XML7 discharge paper / XML8 record summary: a Composition (LOINC 18842-5 / 34133-9), a
  section per field, readable text. XML13 referral: ServiceRequest. XML14 re-visit: Appointment.
Each written type is one the hub indexes (``hub.search.registry.SUPPORTED_RESOURCE_TYPES``):
a conditional write needs its identifier search.
Every entry is a conditional PUT on an identifier derived from MA_LK under the facility's
"ma-lk" system (value ``<MA_LK>/<table>/<STT or code>``; the Encounter's is MA_LK itself), so
the same file written again changes nothing and a corrected re-export updates in place.
Calls: ``connectors.identifiers``, ``connectors.xml130.episode`` (``Episode``, code lists),
``connectors.xml130.fields``.
Called by: ``connectors.xml130`` (``FORMAT.map``).
"""

from __future__ import annotations

import re
from typing import Any

from connectors.identifiers import BHXH, BHYT, CCCD, FACILITY, facility_reference, facility_system, parse_bhyt
from connectors.model import PatientFacts
from connectors.xml130.episode import (
    CODE_LISTS,
    ID_DOCUMENT_SYSTEM,
    LOINC,
    OBS_CATEGORY,
    REGISTERED_FACILITY,
    UCUM,
    Episode,
    cc,
    coded,
    facility_ref,
    icd10,
    listed,
    notes_of,
)
from connectors.xml130.fields import Row

_ICD9 = re.compile(r"[0-9]{2}(\.[0-9]{1,2})?")
_UNMAPPED = {
    "XML6": "HIV/AIDS care",
    "XML9": "birth certificate",
    "XML10": "pregnancy leave",
    "XML11": "sick leave",
    "XML12": "medical assessment",
    "XML15": "TB treatment",
}

# --- the patient (XML1, or XML0 when the episode has no XML1 yet) ---------------------------


def patient_facts(ep: Episode, row: Row) -> PatientFacts:
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": []}
    ids = patient["identifier"]
    gender = _gender(row)
    birth = row.birth("NGAY_SINH")
    cccd = row.text("SO_CCCD")
    if cccd is not None:
        if cccd.isdigit() and len(cccd) == 12:
            ids.append({"system": CCCD, "value": cccd})
        elif cccd.isalnum() and len(cccd) <= 15:  # an old ID card (CMND) or a passport
            ids.append({"system": ID_DOCUMENT_SYSTEM, "value": cccd})
        else:
            row.bad(
                "SO_CCCD",
                "is neither a 12-digit CCCD nor an ID document number (at most 15 letters and digits)",
            )
    for card in _cards(row):
        ids.append({"system": BHYT, "value": card})
        ids.append({"system": BHXH, "value": card[-10:]})
    mrn = row.required("MA_BN")
    if mrn is not None:
        ids.append(
            {
                "type": cc("http://terminology.hl7.org/CodeSystem/v2-0203", "MR"),
                "system": facility_system("mrn", ep.facility),
                "value": mrn,
            }
        )
    name = row.required("HO_TEN")
    if name is not None:
        words = name.split()
        human: dict[str, Any] = {"use": "official", "text": " ".join(words), "family": words[0]}
        if len(words) > 1:
            human["given"] = words[1:]  # Vietnamese order: family, middle, given
        patient["name"] = [human]
    if gender is not None:
        patient["gender"] = gender
    if birth is not None:
        patient["birthDate"] = birth
    phone = row.text("DIEN_THOAI")
    if phone is not None:
        patient["telecom"] = [{"system": "phone", "value": phone, "use": "mobile"}]
    address = _address(row)
    if address:
        patient["address"] = [address]
    extensions = _patient_extensions(row)
    if extensions:
        patient["extension"] = extensions
    return PatientFacts(ep.patient, patient)


def _gender(row: Row) -> str | None:
    value = row.text("GIOI_TINH")
    if value is None:
        return None
    entry = CODE_LISTS["gioi_tinh"]["codes"].get(value)
    if entry is None:
        row.bad("GIOI_TINH", f"{value!r} is not 1 (male), 2 (female) or 3 (unknown)")
        return None
    return str(entry["fhir"])


def _cards(row: Row) -> list[str]:
    cards = []
    for code in row.codes("MA_THE_BHYT"):
        card = parse_bhyt(code)
        if card is None:
            row.bad("MA_THE_BHYT", f"{code!r} is not a BHYT card code (2 letters, 13 digits)")
            continue
        cards.append(f"{card.group}{card.level}{card.province}{card.bhxh}")
    return cards


def _address(row: Row) -> dict[str, Any]:
    unit = CODE_LISTS["admin_unit"]
    extensions = []
    for name in unit["fields"]:
        code = row.text(name)
        if code is not None:
            if not code.isdigit():
                row.bad(name, f"{code!r} is not an administrative unit code (digits)")
                continue
            extensions.append(
                {"url": unit["extension"], "valueCoding": {"system": unit["systems"][name], "code": code}}
            )
    text = row.text("DIA_CHI")
    if not text and not extensions:
        return {}
    address: dict[str, Any] = {"use": "home", "country": "VN"}
    if text:
        address["text"] = text
    if extensions:  # codes as received: pre-2025 records carry the old units' codes
        address["extension"] = extensions
    return address


def _patient_extensions(row: Row) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    nationality = row.text("MA_QUOCTICH")
    if nationality is not None:
        out.append(
            {
                "url": CODE_LISTS["quoc_tich"]["extension"],
                "extension": [{"url": "code", "valueCodeableConcept": coded("quoc_tich", nationality)}],
            }
        )
    for field, name in (("MA_DANTOC", "dan_toc"), ("MA_NGHE_NGHIEP", "nghe_nghiep")):
        value = row.text(field)
        if value is not None:
            out.append({"url": CODE_LISTS[name]["extension"], "valueCodeableConcept": coded(name, value)})
    return out


# --- XML1 -----------------------------------------------------------------------------------


def map_xml1(ep: Episode, row: Row) -> None:
    coverage(ep, row)
    conditions = _conditions(ep, row)
    encounter: dict[str, Any] = {
        "status": "finished" if row.text("NGAY_RA") else "in-progress",
        **_encounter_kind(row),
        "subject": ep.subject(),
    }
    period = {"start": row.when("NGAY_VAO"), "end": row.when("NGAY_RA")}
    if period["start"] is None:
        row.required("NGAY_VAO")
    encounter["period"] = {k: v for k, v in period.items() if v}
    days = row.number("SO_NGAY_DTRI")
    if days is not None:
        encounter["length"] = {"value": days, "unit": "d", "system": UCUM, "code": "d"}
    reasons = [{"text": t} for t in (row.text("LY_DO_VV"), row.text("CHAN_DOAN_VAO")) if t]
    if reasons:
        encounter["reasonCode"] = reasons
    if conditions:
        role = "http://terminology.hl7.org/CodeSystem/diagnosis-role"
        encounter["diagnosis"] = [
            {"condition": {"reference": url}, "use": cc(role, "DD", "Discharge diagnosis"), "rank": n}
            for n, url in enumerate(conditions, 1)
        ]
    hospitalization = _hospitalization(row)
    if hospitalization:
        encounter["hospitalization"] = hospitalization
    encounter["serviceProvider"] = facility_reference(ep.facility)
    outcome = row.text("KET_QUA_DTRI")
    if outcome is not None:
        system, entry = listed("ket_qua_dtri", outcome)
        if not entry:
            row.bad("KET_QUA_DTRI", f"{outcome!r} is not a treatment outcome code (1-5, 7, 8)")
        else:
            encounter["extension"] = [
                {
                    "url": CODE_LISTS["ket_qua_dtri"]["extension"],
                    "valueCodeableConcept": cc(system, outcome, entry["display"]),
                }
            ]
    ep.put({"resourceType": "Encounter", **encounter}, None)
    _procedures(ep, row)
    _weight_and_blood_group(ep, row)
    revisit = row.day("NGAY_TAI_KHAM")
    if revisit is not None:
        appointment(ep, revisit, None, None)


def _encounter_kind(row: Row) -> dict[str, Any]:
    kinds = CODE_LISTS["ma_loai_kcb"]
    code = row.required("MA_LOAI_KCB")
    entry = kinds["codes"].get(code or "", {})
    out: dict[str, Any] = {
        "class": {"system": kinds["class_system"], "code": entry.get("class", kinds["default_class"])}
    }
    if code is not None:
        out["type"] = [coded("ma_loai_kcb", code)]
    departments = row.codes("MA_KHOA")  # one, or several separated by ";"
    if departments:
        out["serviceType"] = {"coding": [coded("ma_khoa", d)["coding"][0] for d in departments]}
    return out


def _hospitalization(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kind = row.text("MA_LOAI_RV")
    if kind is not None:
        lists = CODE_LISTS["ma_loai_rv"]
        system, entry = listed("ma_loai_rv", kind)
        if not entry:
            row.bad("MA_LOAI_RV", f"{kind!r} is not a discharge type code (1-5)")
        else:
            died = row.text("KET_QUA_DTRI") in ("5", "8")
            standard = lists["died_disposition"] if died else entry["disposition"]
            out["dischargeDisposition"] = {
                "coding": [
                    {"system": system, "code": kind, "display": entry["display"]},
                    {"system": lists["disposition_system"], "code": standard},
                ]
            }
    for field, key in (("MA_NOI_DI", "origin"), ("MA_NOI_DEN", "destination")):
        code = row.text(field)
        if code is not None:
            out[key] = facility_ref(code)
    return out


def coverage(ep: Episode, row: Row) -> None:
    """A Coverage per BHYT card, identified by the card code (the same card's Coverage is
    updated by every episode); the validity lists pair with the cards by position."""
    starts, ends = row.codes("GT_THE_TU"), row.codes("GT_THE_DEN")
    registered = row.codes("MA_DKBD")
    for n, card in enumerate(_cards(row)):
        parsed = parse_bhyt(card)
        assert parsed is not None
        resource: dict[str, Any] = {
            "resourceType": "Coverage",
            "status": "active",
            "type": cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "PUBLICPOL", text="Bảo hiểm y tế"),
            "beneficiary": ep.subject(),
            "payor": [{"display": "Bảo hiểm xã hội Việt Nam"}],
            "class": [
                {
                    "type": cc("http://terminology.hl7.org/CodeSystem/coverage-class", "group"),
                    "value": parsed.group,
                },
                {
                    "type": cc("http://terminology.hl7.org/CodeSystem/coverage-class", "plan"),
                    "value": str(parsed.level),
                },
            ],
        }
        period = {}
        for key, values, name in (("start", starts, "GT_THE_TU"), ("end", ends, "GT_THE_DEN")):
            if n < len(values):
                day = Row(row.table, row.pos, {name: values[n]}, row.problems).day(name)
                if day:
                    period[key] = day
        if period:
            resource["period"] = period
        if n < len(registered):
            resource["extension"] = [
                {"url": REGISTERED_FACILITY, "valueIdentifier": {"system": FACILITY, "value": registered[n]}}
            ]
        ep.put(resource, card, system=BHYT)


def _conditions(ep: Episode, row: Row) -> list[str]:
    urls = []
    recorded = row.when("NGAY_RA") or row.when("NGAY_VAO")
    main = row.text("MA_BENH_CHINH")
    pairs = [("MA_BENH_CHINH", main)] if main else []
    pairs += [("MA_BENH_KT", c) for c in row.codes("MA_BENH_KT")]
    for field, value in pairs:
        code = icd10(row, field, value)
        if code is None:
            continue
        condition: dict[str, Any] = {
            "resourceType": "Condition",
            "category": [
                cc("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis")
            ],
            "verificationStatus": cc(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
            ),
            "code": cc(CODE_LISTS["icd10"]["system"], code),
            **ep.context(),
        }
        if recorded:
            condition["recordedDate"] = recorded
        if field == "MA_BENH_CHINH":
            condition["note"] = notes_of(("Chẩn đoán ra viện", row.text("CHAN_DOAN_RV")))
            if not condition["note"]:
                del condition["note"]
        key = "MA_BENH_CHINH" if field == "MA_BENH_CHINH" else f"MA_BENH_KT/{code}"
        urls.append(ep.put(condition, f"XML1/{key}"))
    return urls


def _procedures(ep: Episode, row: Row) -> None:
    for value in row.codes("MA_PTTT_QT"):
        if not _ICD9.fullmatch(value):
            row.bad("MA_PTTT_QT", f"{value!r} is not an ICD-9-CM procedure code")
            continue
        procedure = {
            "resourceType": "Procedure",
            "status": "completed",
            "code": cc(CODE_LISTS["icd9cm"]["system"], value),
            **ep.context(),
        }
        ep.put(procedure, f"XML1/MA_PTTT_QT/{value}")


def _weight_and_blood_group(ep: Episode, row: Row) -> None:
    when = row.when("NGAY_VAO")
    vital = cc(OBS_CATEGORY, "vital-signs")
    weight = row.number("CAN_NANG")
    if weight is not None and when:
        ep.put(
            {
                "resourceType": "Observation",
                "status": "final",
                "category": [vital],
                "code": cc(LOINC, "29463-7", "Body weight", "Cân nặng"),
                **ep.context(),
                "effectiveDateTime": when,
                "valueQuantity": {"value": weight, "unit": "kg", "system": UCUM, "code": "kg"},
            },
            "XML1/CAN_NANG",
        )
    group = row.text("NHOM_MAU")
    if group is not None and when:
        ep.put(
            {
                "resourceType": "Observation",
                "status": "final",
                "category": [cc(OBS_CATEGORY, "laboratory")],
                "code": cc(LOINC, "882-1", "ABO and Rh group [Type] in Blood", "Nhóm máu"),
                **ep.context(),
                "effectiveDateTime": when,
                "valueCodeableConcept": {"text": group},
            },
            "XML1/NHOM_MAU",
        )


def appointment(ep: Episode, day: str, comment: str | None, note_id: str | None) -> None:
    """The re-visit (NGAY_TAI_KHAM, or XML14): one Appointment per episode, proposed for
    that day (no time: the patient comes during opening hours)."""
    resource: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "proposed",
        "description": "Tái khám" + (f" (giấy hẹn {note_id})" if note_id else ""),
        "requestedPeriod": [{"start": day, "end": day}],
        "participant": [{"actor": ep.subject(), "status": "needs-action"}],
    }
    if comment:
        resource["comment"] = comment
    ep.put(resource, "tai-kham")


# --- XML0 check-in --------------------------------------------------------------------------


def map_xml0(ep: Episode, row: Row) -> None:
    coverage(ep, row)
    encounter: dict[str, Any] = {"status": "in-progress", **_encounter_kind(row), "subject": ep.subject()}
    start = row.when("NGAY_VAO")
    if start is None:
        row.required("NGAY_VAO")
    else:
        encounter["period"] = {"start": start}
    encounter["serviceProvider"] = facility_reference(ep.facility)
    ep.put({"resourceType": "Encounter", **encounter}, None, if_none=True)


def unmapped(table: str) -> str:
    what = _UNMAPPED.get(table)
    return (
        f"{table} ({what}) is not mapped: kept in the inbox only"
        if what
        else (f"{table}: unknown table, not mapped (kept in the inbox only)")
    )


def patient_row(tables: dict[str, list[Row]]) -> Row | None:
    for table in ("XML1", "XML0"):
        if tables.get(table):
            return tables[table][0]
    return None
