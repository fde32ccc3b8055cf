"""QĐ 130 clinical tables -> FHIR: XML2 drugs, XML3 services and supplies, XML4 results,
XML5 progress notes, XML7/XML8 papers, XML13 referral, XML14 re-visit. One function per table.

Owns: what each of these tables becomes (the choices are listed in
``connectors.xml130.mapping``'s docstring, with XML1 and XML0).
Calls: ``connectors.xml130.episode`` (``Episode``, code lists, coding helpers),
``connectors.xml130.mapping`` (the re-visit Appointment, shared with XML1).
Called by: ``connectors.xml130`` (``map_tables``, per HOSO).
"""

from __future__ import annotations

import html
import re
from typing import Any

from connectors.identifiers import facility_reference
from connectors.xml130.episode import (
    CODE_LISTS,
    COST_GROUPS,
    LOINC,
    OBS_CATEGORY,
    SNOMED,
    Episode,
    cc,
    coded,
    facility_ref,
    icd10,
    listed,
    notes_of,
    practitioner,
)
from connectors.xml130.fields import Row
from connectors.xml130.mapping import appointment

_SERVICE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._\-]{0,49}")


def map_tables(ep: Episode, tables: dict[str, list[Row]]) -> None:
    services = {r.text("MA_DICH_VU"): r for r in tables.get("XML3", []) if r.text("MA_DICH_VU")}
    with_results = {r.text("MA_DICH_VU") for r in tables.get("XML4", [])}
    for row in tables.get("XML2", []):
        drug(ep, row)
    written = services_and_supplies(ep, tables.get("XML3", []), with_results)
    written |= results(ep, tables.get("XML4", []), services)
    supplies(ep, tables.get("XML3", []), written)
    for row in tables.get("XML5", []):
        progress(ep, row)
    for table, kind in (("XML7", "discharge"), ("XML8", "summary")):
        for row in tables.get(table, []):
            paper(ep, row, kind)
    for row in tables.get("XML13", []):
        referral(ep, row)
    for row in tables.get("XML14", []):
        day = row.day("NGAY_HEN_KL")
        if day is None:
            row.required("NGAY_HEN_KL")
        else:
            appointment(ep, day, row.text("CHAN_DOAN_RV"), row.text("SO_GIAYHEN_KL"))


# --- XML2: drugs ----------------------------------------------------------------------------


def drug(ep: Episode, row: Row) -> None:
    code = row.required("MA_THUOC")
    name = row.required("TEN_THUOC")
    if code is None or name is None:
        return
    strength = row.text("HAM_LUONG")
    medication = cc(CODE_LISTS["drug"]["system"], code, name, f"{name} {strength}" if strength else name)
    dosage: dict[str, Any] = {}
    text = "; ".join(t for t in (row.text("LIEU_DUNG"), row.text("CACH_DUNG")) if t)
    if text:
        dosage["text"] = text
    route = row.text("DUONG_DUNG")
    if route is not None:
        dosage["route"] = coded("route", route)
    quantity = _quantity(row, "SO_LUONG", "DON_VI_TINH")
    request: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "status": "completed",
        "intent": "order",
        "medicationCodeableConcept": medication,
        **ep.context(),
    }
    ordered = row.when("NGAY_YL")
    if ordered:
        request["authoredOn"] = ordered
    prescriber = row.text("MA_BAC_SI")
    if prescriber:
        request["requester"] = practitioner(prescriber)
    if dosage:
        request["dosageInstruction"] = [dosage]
    if quantity:
        request["dispenseRequest"] = {"quantity": quantity}
    notes = notes_of(("Số đăng ký", row.text("SO_DANG_KY")), ("Dạng bào chế", row.text("DANG_BAO_CHE")))
    if notes:
        request["note"] = notes
    key = f"XML2/{row.pos}"
    request_url = ep.put(request, key)
    given = row.when("NGAY_TH_YL")
    if given is None:
        return
    # That the drug was given or handed over (NGAY_TH_YL: the order carried out) is a
    # MedicationDispense of the order; the MedicationRequest stays the order.
    dispense: dict[str, Any] = {
        "resourceType": "MedicationDispense",
        "status": "completed",
        "medicationCodeableConcept": medication,
        "subject": ep.subject(),
        "context": {"reference": ep.encounter},
        "authorizingPrescription": [{"reference": request_url}],
        "performer": [{"actor": facility_reference(ep.facility)}],
        "whenHandedOver": given,
    }
    if quantity:
        dispense["quantity"] = quantity
    if dosage:
        dispense["dosageInstruction"] = [dosage]
    ep.put(dispense, key)


def _quantity(row: Row, value_field: str, unit_field: str) -> dict[str, Any]:
    value = row.number(value_field)
    if value is None:
        return {}
    quantity: dict[str, Any] = {"value": value}
    unit = row.text(unit_field)
    if unit:
        quantity["unit"] = unit
    return quantity


# --- XML3: services and supplies -------------------------------------------------------------


def services_and_supplies(ep: Episode, rows: list[Row], with_results: set[str | None]) -> dict[str, str]:
    """A Procedure per service row; a supply row names the service it was used in
    (MA_DICH_VU) and is that Procedure's ``usedCode`` (what a reader of the procedure wants to
    see). Returns the fullUrl of each service's Procedure by service code."""
    used: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        target = row.text("MA_DICH_VU")
        if row.text("MA_VAT_TU") and target:
            used.setdefault(target, []).append(_supply(row)[1])
    written: dict[str, str] = {}
    for row in rows:
        if not row.text("MA_VAT_TU"):
            found = service(ep, row, with_results, used)
            if found is not None:
                written.setdefault(*found)
    return written


def supplies(ep: Episode, rows: list[Row], services: dict[str, str]) -> None:
    """A ChargeItem per supply row: the item, how many, when, in the episode's Encounter
    (``context``) and, when the service it was used in was written, that Procedure or
    DiagnosticReport (``service``). ChargeItem rather than SupplyDelivery: XML3 is the cost
    table of the insurance claim (a supply row is a line charged to the episode, with its
    price), and only ChargeItem links an Encounter and the service (R4 SupplyDelivery has
    neither; it is a logistics record of a delivery to a place or person)."""
    for row in rows:
        if not row.text("MA_VAT_TU"):
            continue
        code, item = _supply(row)
        product = {k: v for k, v in item.items() if k != "text"}
        name = row.text("TEN_VAT_TU")
        if name:
            product["text"] = name
        charge: dict[str, Any] = {
            "resourceType": "ChargeItem",
            "status": "billed",  # the file is the episode's insurance claim
            "code": product,
            "subject": ep.subject(),
            "context": {"reference": ep.encounter},
            "productCodeableConcept": product,
        }
        when = row.when("NGAY_TH_YL") or row.when("NGAY_YL")
        if when:
            charge["occurrenceDateTime"] = when
        quantity = _quantity(row, "SO_LUONG", "DON_VI_TINH")
        if quantity:
            charge["quantity"] = quantity
        doctor = row.text("MA_BAC_SI")
        if doctor:
            charge["performer"] = [{"actor": practitioner(doctor)}]
        charge["performingOrganization"] = facility_reference(ep.facility)
        price = row.number("DON_GIA_BV")
        if price is not None:  # the facility's unit price (no ChargeItemDefinition to price it)
            charge["priceOverride"] = {"value": price, "currency": "VND"}
        target = row.text("MA_DICH_VU")
        if target and target in services:
            charge["service"] = [{"reference": services[target]}]
        ep.put(charge, f"XML3/{row.pos}")


def _supply(row: Row) -> tuple[str, dict[str, Any]]:
    code = row.text("MA_VAT_TU") or ""
    name = row.text("TEN_VAT_TU")
    quantity = _quantity(row, "SO_LUONG", "DON_VI_TINH")
    label = name or code
    if quantity:
        label = f"{label} x {quantity['value']}{' ' + quantity['unit'] if 'unit' in quantity else ''}"
    return code, cc(CODE_LISTS["supply"]["system"], code, name, label)


def service(
    ep: Episode, row: Row, with_results: set[str | None], used: dict[str, list[dict[str, Any]]]
) -> tuple[str, str] | None:
    """The row's Procedure; returns (its service code, its fullUrl) when one was written."""
    code = row.code("MA_DICH_VU", _SERVICE, "a service code (XX.YYYY.ZZZZ)", required=True)
    group = row.text("MA_NHOM") or ""
    if code is None or group in COST_GROUPS or code in with_results:
        return None
    name = row.text("TEN_DICH_VU")
    procedure: dict[str, Any] = {
        "resourceType": "Procedure",
        "status": "completed",
        "code": cc(CODE_LISTS["service"]["system"], code, name, name),
        **ep.context(),
    }
    if group:
        procedure["category"] = coded("ma_nhom", group)
    start, end = row.when("NGAY_TH_YL") or row.when("NGAY_YL"), row.when("NGAY_KQ")
    if start and end and end >= start:
        procedure["performedPeriod"] = {"start": start, "end": end}
    elif start:
        procedure["performedDateTime"] = start
    performers = row.codes("NGUOI_THUC_HIEN")
    if performers:
        procedure["performer"] = [{"actor": practitioner(p)} for p in performers]
    if row.text("MA_BAC_SI"):
        procedure["asserter"] = practitioner(row.text("MA_BAC_SI") or "")
    reasons = [c for c in (icd10(row, "MA_BENH", v) for v in row.codes("MA_BENH")) if c]
    if reasons:
        procedure["reasonCode"] = [cc(CODE_LISTS["icd10"]["system"], c) for c in reasons]
    site = row.text("VI_TRI_TH_DVKT")
    if site:
        procedure["bodySite"] = [{"text": site}]
    if used.get(code):
        procedure["usedCode"] = used[code]
    notes = notes_of(("Phương pháp vô cảm", row.text("PP_VO_CAM")))
    if notes:
        procedure["note"] = notes
    return code, ep.put(procedure, f"XML3/{row.pos}")


# --- XML4: results ----------------------------------------------------------------------------

_REPORT_CATEGORY = {"1": "LAB", "2": "RAD"}  # MA_NHOM of the service -> v2-0074
_OBS_CATEGORY = {"1": "laboratory", "2": "imaging", "3": "procedure"}


def results(ep: Episode, rows: list[Row], services: dict[str | None, Row]) -> dict[str, str]:
    """An Observation per row; a DiagnosticReport per MA_DICH_VU holding its rows. Returns
    the fullUrl of each service's DiagnosticReport by service code."""
    written: dict[str, str] = {}
    panels: dict[str, list[Row]] = {}
    for row in rows:
        code = row.code("MA_DICH_VU", _SERVICE, "a service code (XX.YYYY.ZZZZ)", required=True)
        if code is not None:
            panels.setdefault(code, []).append(row)
    for code, members in panels.items():
        service = services.get(code)
        group = (service.text("MA_NHOM") if service else None) or (
            "1" if members[0].text("MA_CHI_SO") else ""
        )
        name = service.text("TEN_DICH_VU") if service else None
        service_code = cc(CODE_LISTS["service"]["system"], code, name, name or code)
        urls, times, readers, conclusions = [], [], [], []
        for row in members:
            url, when = _observation(ep, row, service_code, _OBS_CATEGORY.get(group, "laboratory"))
            urls.append(url)
            if when:
                times.append(when)
            reader = row.text("MA_BS_DOC_KQ")
            if reader and reader not in readers:
                readers.append(reader)
            conclusion = row.text("KET_LUAN")
            if conclusion and conclusion not in conclusions:
                conclusions.append(conclusion)
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "category": [
                cc("http://terminology.hl7.org/CodeSystem/v2-0074", _REPORT_CATEGORY.get(group, "OTH"))
            ],
            "code": service_code,
            **ep.context(),
        }
        taken = (service.when("NGAY_TH_YL") if service else None) or (min(times) if times else None)
        if taken:
            report["effectiveDateTime"] = taken
        if times:
            report["issued"] = max(times)
        if readers:
            report["resultsInterpreter"] = [practitioner(r) for r in readers]
        report["result"] = [{"reference": u} for u in urls]
        if conclusions:
            report["conclusion"] = "; ".join(conclusions)
        written[code] = ep.put(report, f"XML4/{code}")
    return written


def _observation(
    ep: Episode, row: Row, service_code: dict[str, Any], category: str
) -> tuple[str, str | None]:
    indicator = row.text("MA_CHI_SO")
    name = row.text("TEN_CHI_SO")
    code = (
        cc(CODE_LISTS["indicator"]["system"], indicator, name, name or indicator)
        if indicator
        else service_code
    )
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [cc(OBS_CATEGORY, category)],
        "code": code,
        **ep.context(),
    }
    when = row.when("NGAY_KQ")
    if when:
        observation["effectiveDateTime"] = when
        observation["issued"] = when if "T" in when else f"{when}T00:00:00+07:00"
    reader = row.text("MA_BS_DOC_KQ")
    if reader:
        observation["performer"] = [practitioner(reader)]
    value, description = row.text("GIA_TRI"), row.text("MO_TA")
    if value is not None:
        number = _number_or_none(value)
        if number is not None:
            quantity: dict[str, Any] = {"value": number}
            unit = row.text("DON_VI_DO")
            if unit:
                quantity["unit"] = unit
            observation["valueQuantity"] = quantity
        else:
            observation["valueString"] = value
    elif description is not None:
        observation["valueString"] = description
        description = None
    notes = notes_of(("", description), ("Kết luận", row.text("KET_LUAN")))
    if notes:
        observation["note"] = notes
    return ep.put(observation, f"XML4/{row.pos}"), when


def _number_or_none(value: str) -> int | float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return int(value) if value.lstrip("-").isdigit() else number


# --- XML5: clinical progress --------------------------------------------------------------------


def progress(ep: Episode, row: Row) -> None:
    """A ClinicalImpression per progress row: a clinician's account of the course at a time
    (its ``summary``), found by patient, encounter and date, in the timeline and $everything.
    (An Observation with the text as its value was the fallback while the hub did not index
    ClinicalImpression: a note is an assessment, not a measured value.)"""
    text = row.required("DIEN_BIEN_LS")
    if text is None:
        return
    note: dict[str, Any] = {
        "resourceType": "ClinicalImpression",
        "status": "completed",
        "code": cc(LOINC, "11506-3", "Progress note", "Diễn biến lâm sàng"),
        **ep.context(),
    }
    when = row.when("THOI_DIEM_DBLS")
    if when:
        note["effectiveDateTime"] = when
        note["date"] = when if "T" in when else f"{when}T00:00:00+07:00"  # date is a dateTime
    who = row.codes("NGUOI_THUC_HIEN")
    if who:  # one assessor in R4: the first; the others are named in a note
        note["assessor"] = practitioner(who[0])
    note["summary"] = text
    notes = notes_of(
        ("Giai đoạn bệnh", row.text("GIAI_DOAN_BENH")),
        ("Hội chẩn", row.text("HOI_CHAN")),
        ("Phẫu thuật", row.text("PHAU_THUAT")),
        ("Cùng thực hiện", ", ".join(who[1:]) or None),
    )
    if notes:
        note["note"] = notes
    ep.put(note, f"XML5/{row.pos}")


# --- XML7 discharge paper, XML8 record summary: a Composition each ---------------------------

_PAPERS: dict[str, tuple[str, str, str, list[tuple[str, str]]]] = {
    # kind: (table, LOINC code, title, [(field, section title)])
    "discharge": (
        "XML7",
        "18842-5",
        "Giấy ra viện",
        [
            ("CHAN_DOAN_RV", "Chẩn đoán"),
            ("PP_DIEUTRI", "Phương pháp điều trị"),
            ("GHI_CHU", "Ghi chú, lời dặn"),
            ("SO_NGAY_NGHI", "Số ngày nghỉ"),
        ],
    ),
    "summary": (
        "XML8",
        "34133-9",
        "Tóm tắt hồ sơ bệnh án",
        [
            ("CHAN_DOAN_VAO", "Chẩn đoán vào viện"),
            ("QT_BENHLY", "Quá trình bệnh lý và diễn biến lâm sàng"),
            ("TOMTAT_KQ", "Tóm tắt kết quả cận lâm sàng"),
            ("PP_DIEUTRI", "Phương pháp điều trị"),
            ("CHAN_DOAN_RV", "Chẩn đoán ra viện"),
            ("KET_QUA_DTRI", "Kết quả điều trị"),
            ("GHI_CHU", "Ghi chú"),
        ],
    ),
}
# Fields a paper carries that are not text for a reader (or are mapped elsewhere).
_PAPER_SKIP = frozenset({"MA_LK", "STT", "DU_PHONG", "MA_TTDV", "MA_BS", "TEN_BS", "NGAY_CT", "MA_LOAI_KCB"})


def paper(ep: Episode, row: Row, kind: str) -> None:
    """A Composition per paper: typed by LOINC, titled, a section per field (its heading and
    its text), in the episode's Encounter. A reader (and the consent labels, which read
    narrative) sees the paper's text itself; the DocumentReference of the wave-1 mapping
    carried it base64-encoded, opaque to both."""
    table, loinc, title, fields = _PAPERS[kind]
    sections = []
    known = {f for f, _ in fields}
    for field, heading in fields:
        value = row.text(field)
        if field == "KET_QUA_DTRI" and value:
            value = listed("ket_qua_dtri", value)[1].get("display", value)
        if value:
            sections.append(_section(heading, [value]))
    others = [f"{k}: {v}" for k, v in row.values.items() if v and k not in known and k not in _PAPER_SKIP]
    if others:  # fields of our unconfirmed reading of the table: kept, not lost
        sections.append(_section("Thông tin khác", others))
    doctor = row.text("MA_BS")
    author = practitioner(doctor, row.text("TEN_BS")) if doctor else facility_reference(ep.facility)
    dated = row.when("NGAY_CT") or row.when("NGAY_RA") or row.when("NGAY_VAO")
    if dated is None:
        row.required("NGAY_CT")
        return
    document: dict[str, Any] = {
        "resourceType": "Composition",
        "status": "final",
        "type": cc(LOINC, loinc, text=title),
        "subject": ep.subject(),
        "encounter": {"reference": ep.encounter},
        "date": dated,
        "author": [author],
        "title": title,
        "custodian": facility_reference(ep.facility),
    }
    period = {k: v for k, v in (("start", row.when("NGAY_VAO")), ("end", row.when("NGAY_RA"))) if v}
    if period:
        document["event"] = [{"period": period}]
    if sections:
        document["section"] = sections
    ep.put(document, table)


def _section(title: str, lines: list[str]) -> dict[str, Any]:
    body = "".join(f"<p>{html.escape(line, quote=False)}</p>" for line in lines)
    return {
        "title": title,
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'},
    }


# --- XML13 referral -------------------------------------------------------------------------


def referral(ep: Episode, row: Row) -> None:
    referral_code = cc(SNOMED, "3457005", "Patient referral", "Chuyển tuyến")
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [referral_code],
        "code": referral_code,
        **ep.context(),
    }
    number = row.text("SO_CHUYENTUYEN") or row.text("GIAY_CHUYEN_TUYEN")
    if number:
        request["requisition"] = {"value": number}
    authored = row.when("NGAY_CT")
    if authored:
        request["authoredOn"] = authored
    doctor = row.text("MA_BAC_SI")
    if doctor:
        request["requester"] = practitioner(doctor)
    to = row.text("MA_NOI_DEN")
    if to:
        request["performer"] = [facility_ref(to)]
    else:
        row.required("MA_NOI_DEN")
    codes = ([row.text("MA_BENH_CHINH")] if row.text("MA_BENH_CHINH") else []) + row.codes("MA_BENH_KT")
    reasons = [c for c in (icd10(row, "MA_BENH_CHINH", v or "") for v in codes) if c]
    if reasons:
        request["reasonCode"] = [cc(CODE_LISTS["icd10"]["system"], c) for c in reasons]
    notes = notes_of(
        ("Dấu hiệu lâm sàng", row.text("DAU_HIEU_LS")),
        ("Chẩn đoán", row.text("CHAN_DOAN_RV")),
        ("Quá trình bệnh lý", row.text("QT_BENHLY")),
        ("Tóm tắt kết quả cận lâm sàng", row.text("TOMTAT_KQ")),
        ("Phương pháp điều trị", row.text("PP_DIEU_TRI")),
        ("Hướng điều trị", row.text("HUONG_DIEU_TRI")),
        ("Mã lý do chuyển tuyến", row.text("MA_LYDO_CT")),
    )
    if notes:
        request["note"] = notes
    ep.put(request, "XML13")
