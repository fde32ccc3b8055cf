"""QĐ 130 episode -> FHIR: the patient, and the episode's entries, one function per table.

Owns: what each table becomes, in one readable place per table (the code lists are data in
``fhir/xml130/code-lists.json``):
- XML1 ``TONG_HOP``: the patient's facts; Coverage per BHYT card; the Encounter (MA_LK);
  a Condition per MA_BENH_CHINH / MA_BENH_KT (ICD-10); a Procedure per MA_PTTT_QT
  (ICD-9-CM); body weight and blood group Observations; an Appointment for NGAY_TAI_KHAM.
- XML0 check-in: an in-progress Encounter, created only when none exists (ifNoneExist), so
  a late check-in never reopens a closed episode; XML1 completes it (same identifier).
- XML2 drugs: MedicationRequest per row; a MedicationStatement (based on it) when NGAY_TH_YL
  says the drug was given or handed over.
- XML3: Procedure per service row (not the cost lines of bed days and transport, and not the
  services whose results XML4 carries: their DiagnosticReport stands for them); a supply row
  is the ``usedCode`` of the service it names (MA_DICH_VU).
- XML4: Observation per indicator, a DiagnosticReport per MA_DICH_VU holding them.
- XML5: an Observation per progress row (LOINC 11506-3, the text as its value): found by
  patient, encounter and date, in the timeline and $everything.
- XML7 discharge paper / XML8 record summary: a DocumentReference with the paper as text
  (LOINC 18842-5 / 34133-9). XML13 referral: ServiceRequest. XML14 re-visit: Appointment.
The hub holds and indexes the types of ``hub.search.registry.SUPPORTED_RESOURCE_TYPES``
only; MedicationDispense, SupplyDelivery, ChargeItem, ClinicalImpression and Composition are
not among them (a conditional write needs the identifier search), hence the choices above.
Every entry is a conditional PUT on an identifier derived from MA_LK under the facility's
"ma-lk" system (value ``<MA_LK>/<table>/<STT or code>``; the Encounter's is MA_LK itself), so
the same file written again changes nothing and a corrected re-export updates in place.
Calls: ``connectors.identifiers``, ``connectors.xml130.fields``.
Called by: ``connectors.xml130`` (``FORMAT.map``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from connectors.identifiers import BHXH, BHYT, CCCD, FACILITY, facility_reference, facility_system, parse_bhyt
from connectors.model import PatientFacts
from connectors.xml130.fields import Problems, Row

CODE_LISTS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "fhir" / "xml130" / "code-lists.json").read_text("utf-8")
)
HUB = "https://ehealth-hub.vn"
# A practising-certificate number (MA_BAC_SI, NGUOI_THUC_HIEN, MA_BS_DOC_KQ) is national.
PRACTITIONER_SYSTEM = f"{HUB}/sid/cchn"
ID_DOCUMENT_SYSTEM = f"{HUB}/sid/giay-to-tuy-than"  # SO_CCCD that is not a 12-digit CCCD
REGISTERED_FACILITY = f"{HUB}/fhir/StructureDefinition/coverage-registered-facility"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

_ICD10 = re.compile(r"[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?[*†+]?")
_ICD9 = re.compile(r"[0-9]{2}(\.[0-9]{1,2})?")
_SAFE = re.compile(r"[^,|$\\]{1,100}")  # an identifier value a token search can hold as is
_UNMAPPED = {
    "XML6": "HIV/AIDS care",
    "XML9": "birth certificate",
    "XML10": "pregnancy leave",
    "XML11": "sick leave",
    "XML12": "medical assessment",
    "XML15": "TB treatment",
}
COST_GROUPS = frozenset({"12", "14", "15", "16"})  # transport and bed days: costs, not care


def cc(system: str, code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    concept: dict[str, Any] = {"coding": [coding]}
    if text:
        concept["text"] = text
    return concept


def listed(name: str, code: str) -> tuple[str, dict[str, Any]]:
    """(system, entry) of a code in a code list (entry {} when the list lacks it)."""
    table = CODE_LISTS[name]
    return table["system"], table.get("codes", {}).get(code, {})


def coded(name: str, code: str, text: str | None = None) -> dict[str, Any]:
    system, entry = listed(name, code)
    return cc(system, code, entry.get("display"), text)


def practitioner(code: str, display: str | None = None) -> dict[str, Any]:
    """A logical reference: the hub holds no Practitioner for every certificate number."""
    ref: dict[str, Any] = {"identifier": {"system": PRACTITIONER_SYSTEM, "value": code}}
    if display:
        ref["display"] = display
    return ref


def facility_ref(code: str) -> dict[str, Any]:
    return {"identifier": {"system": FACILITY, "value": code}}


def notes_of(*parts: tuple[str, str | None]) -> list[dict[str, str]]:
    return [{"text": f"{label}: {value}" if label else value} for label, value in parts if value]


def icd10(row: Row, name: str, value: str) -> str | None:
    code = value.strip().upper()
    if "." not in code and len(code) > 3 and code[:3].isalnum():
        code = f"{code[:3]}.{code[3:]}"  # the dotless form some HIS write: J069 -> J06.9
    if not _ICD10.fullmatch(code):
        row.bad(name, f"{value!r} is not an ICD-10 code")
        return None
    return code


def _uuid(name: str) -> str:
    """A ``urn:uuid:`` made from ``name`` (the same name, the same uuid: a file mapped twice
    gives the same Bundle); cheaper than uuid.uuid5, which builds UUID objects."""
    h = hashlib.sha1(name.encode()).hexdigest()
    return f"urn:uuid:{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_VARIANT = {c: "89ab"[int(c, 16) % 4] for c in "0123456789abcdef"}
_PLAIN = re.compile(r"[A-Za-z0-9._~:/\-]*")


def _quoted(text: str) -> str:
    """URL-encoded for a conditional URL (``parse_qsl`` on the hub's side)."""
    return text if _PLAIN.fullmatch(text) else quote(text, safe=":/")


class Episode:
    """The entries of one HOSO under construction: identifiers, fullUrls, references."""

    def __init__(self, facility: str, ma_lk: str, problems: Problems) -> None:
        self.facility, self.ma_lk, self.problems = facility, ma_lk, problems
        self.system = facility_system("ma-lk", facility)
        self.patient = _uuid(f"patient|{facility}|{ma_lk}")
        self.encounter = self.full_url("Encounter", f"{self.system}|{ma_lk}")  # as put() names it
        self.entries: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._at: dict[str, int] = {}  # fullUrl -> its position in entries

    def full_url(self, res_type: str, value: str) -> str:
        return _uuid(f"{res_type}|{self.system}|{value}")

    def put(
        self,
        resource: dict[str, Any],
        suffix: str | None,
        *,
        system: str | None = None,
        if_none: bool = False,
    ) -> str:
        """Add ``resource`` as a conditional PUT (or a create if none exists) on its identifier
        ``<MA_LK>/<suffix>`` (MA_LK itself when suffix is None, or a value under ``system``)."""
        res_type = resource["resourceType"]
        value = self.ma_lk if suffix is None else (suffix if system else f"{self.ma_lk}/{suffix}")
        system = system or self.system
        identifier = {"system": system, "value": value}
        extra = resource.get("identifier", [])  # more identifiers the resource carries
        resource = {
            "resourceType": res_type,
            "identifier": [identifier, *extra],
            **{k: v for k, v in resource.items() if k not in ("resourceType", "identifier")},
        }
        full_url = self.full_url(res_type, f"{system}|{value}")
        query = f"identifier={_quoted(system)}|{_quoted(value)}"
        request = (
            {"method": "POST", "url": res_type, "ifNoneExist": query}
            if if_none
            else {"method": "PUT", "url": f"{res_type}?{query}"}
        )
        entry = {"fullUrl": full_url, "resource": resource, "request": request}
        if full_url in self._at:  # the same resource again (XML14 after NGAY_TAI_KHAM): last wins
            self.entries[self._at[full_url]] = entry
        else:
            self._at[full_url] = len(self.entries)
            self.entries.append(entry)
        return full_url

    def subject(self) -> dict[str, str]:
        return {"reference": self.patient}

    def context(self) -> dict[str, Any]:
        return {"subject": self.subject(), "encounter": {"reference": self.encounter}}


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
