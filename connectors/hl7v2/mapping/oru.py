"""ORU^R01 (observation results) to Observation, DiagnosticReport and Specimen.

| v2 | FHIR |
|---|---|
| PID | the patient (``common.patient``); several PATIENT_RESULT groups give several |
| OBR | DiagnosticReport: identifier OBR-3 filler (else ORC-3, OBR-2 placer, MSH-10+position), code OBR-4, status OBR-25 (table 0123), effective OBR-7, issued OBR-22, NTE -> conclusion, basedOn the order by placer number |
| OBX | Observation: identifier filler/set id (OBX-4 sub-id)/code, code OBX-3, value by OBX-2 (NM Quantity with a UCUM unit from OBX-6; ST/TX/FT string; CE/CWE/CNE CodeableConcept; SN Quantity with comparator, Range or Ratio; DT/TS/DTM dateTime), referenceRange OBX-7 ("3.5-5.0", "<5", ">10", else text), interpretation OBX-8 (table 0078 -> v3 ObservationInterpretation), status OBX-11 (table 0085), effective OBX-14 else OBR-7, performer OBX-16 and the facility, method OBX-17, NTE -> note |
| SPM (2.5+) / OBR-15 (2.3-2.4) | Specimen: type SPM-4 / OBR-15.1, collected SPM-17 / OBR-7, received SPM-18 / OBR-14; its own entry (conditional PUT) when the store's registry holds Specimen, else contained in the DiagnosticReport |

Every entry is a conditional PUT on its identifier, so a re-sent or corrected result (OBX-11
"C") updates the same resources.
Calls: ``mapping.common``.  Called by: ``connectors.hl7v2`` through ``mapping.MAPPERS``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from connectors.hl7v2.mapping import Mapper
from connectors.hl7v2.mapping.common import (
    Json,
    conditional_put,
    cwe,
    cwe_field,
    facility,
    full_url,
    instant,
    notes,
    patient,
    subject,
    table,
    ts,
    xcn_field,
)
from connectors.hl7v2.parse import Message, Segment, component, masked
from connectors.identifiers import facility_system
from connectors.model import Mapped, PatientFacts, Rejected, Source
from hub.search.registry import SUPPORTED_RESOURCE_TYPES

UCUM = "http://unitsofmeasure.org"
# The store indexes (and so resolves conditional PUTs of) only the types of its registry:
# without Specimen there, the specimen is contained in its DiagnosticReport instead.
STANDALONE_SPECIMEN = "Specimen" in SUPPORTED_RESOURCE_TYPES
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(?:-|_|–|to)\s*([+-]?\d+(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([+-]?\d+(?:\.\d+)?)\s*$")
_STRING_TYPES = frozenset({"ST", "TX", "FT", "ID", "IS", "TN", "XPN", "XAD", "XCN", "CX"})
_CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF", "CV"})


def number(text: str, where: str) -> int | float:
    """A decimal as JSON wants it (int when integral, so "72" stays 72)."""
    value = text.strip()
    if not _NUMBER.match(value):
        raise Rejected(f"{masked(text)!r} is not a number", where)
    try:
        dec = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex already checked
        raise Rejected(f"{masked(text)!r} is not a number", where) from exc
    if "." not in value:
        return int(dec)
    return float(dec)


def unit(seg: Segment, n: int) -> Json:
    """OBX-6 (CE) as Quantity unit/system/code: UCUM when it is UCUM or a known spelling."""
    code = seg.text(n, 1)
    text = seg.text(n, 2) or code
    system = seg.text(n, 3).upper()
    if not code and not text:
        return {}
    out: Json = {"unit": text or code}
    ucum = table("units").get(code.lower())
    if isinstance(ucum, str):
        out |= {"system": UCUM, "code": ucum}
    elif system in ("UCUM", "ISO+", "ANSI+") and " " not in code:
        out |= {"system": UCUM, "code": code}
    return out


def quantity(value: int | float, units: Json, comparator: str | None = None) -> Json:
    q: Json = {"value": value}
    if comparator:
        q["comparator"] = {"≤": "<=", "≥": ">="}.get(comparator, comparator)
    return q | units


def structured_numeric(text: str, units: Json, where: str) -> tuple[str, Json]:
    """SN: comparator^num1^separator/suffix^num2 -> ("Quantity"|"Range"|"Ratio", value)."""
    parts = (text.split("^") + ["", "", "", ""])[:4]
    comparator, num1, sep, num2 = (p.strip() for p in parts)
    if not num1:
        raise Rejected(f"structured numeric {masked(text)!r} has no number", where)
    first = number(num1, where)
    if sep in ("-", "") and num2:
        return "Range", {"low": quantity(first, units), "high": quantity(number(num2, where), units)}
    if sep in (":", "/") and num2:
        return "Ratio", {"numerator": {"value": first}, "denominator": {"value": number(num2, where)}}
    if comparator in ("<", ">", "<=", ">="):
        return "Quantity", quantity(first, units, comparator)
    if comparator and comparator != "=":
        raise Rejected(f"{comparator!r} is not a comparator of SN", where)
    return "Quantity", quantity(first, units)


def reference_range(text: str, units: Json) -> Json | None:
    """OBX-7: "3.5-5.0", "70_105", "<5", ">10"; anything else kept as text."""
    text = text.strip()
    if not text:
        return None
    m = _RANGE.match(text)
    if m:
        return {
            "low": quantity(number(m.group(1), "OBX-7"), units),
            "high": quantity(number(m.group(2), "OBX-7"), units),
        }
    m = _BOUND.match(text)
    if m:
        bound = quantity(number(m.group(2), "OBX-7"), units)
        return {"high": bound} if m.group(1) in ("<", "<=", "≤") else {"low": bound}
    return {"text": text}


def _value(obx: Segment, where: str, warnings: list[str]) -> tuple[str, Any] | None:
    """The value[x] of an OBX by its type OBX-2 (None when OBX-5 is empty)."""
    kind = obx.text(2).upper()
    reps = obx.reps(5)
    if not reps:
        return None
    enc = obx.enc
    if kind == "NM":
        value = component(reps[0], enc, 1)
        if not value:
            return None
        return "valueQuantity", quantity(number(value, where), unit(obx, 6))
    if kind == "SN":
        key, val = structured_numeric(enc.unescape(reps[0]), unit(obx, 6), where)
        return f"value{key}", val
    if kind in _CODED_TYPES:
        concept = cwe(reps[0], obx)
        return ("valueCodeableConcept", concept) if concept else None
    if kind in ("DT", "TS", "DTM"):
        got = ts(reps[0], where)
        return ("valueDateTime", got) if got else None
    if kind in ("ED", "RP"):
        warnings.append(f"{where}: {kind} (encapsulated data / reference pointer) is not kept")
        return None
    if kind and kind not in _STRING_TYPES and kind != "TM":
        warnings.append(f"{where}: value type {kind} kept as text")
    text = "\n".join(enc.unescape(r) for r in reps).strip()
    return ("valueString", text) if text else None


def _ei(seg: Segment, n: int) -> str:
    """EI: entity identifier, with its namespace when the sender gives one."""
    return seg.text(n, 1)


class _Context:
    """What one ORU message builds: entries, dedup of identifiers, warnings."""

    def __init__(self, msg: Message, source: Source) -> None:
        self.msg = msg
        self.source = source
        self.mapped = Mapped(msg.message_type, msg.control_id, patients=[], entries=[])
        self.specimens: dict[str, str] = {}  # specimen identifier -> fullUrl
        self.used: set[tuple[str, str]] = set()
        self._obr_times: dict[int, tuple[str | None, str | None]] = {}

    def obr_times(self, obr: Segment) -> tuple[str | None, str | None]:
        """OBR-7 (observation time) and OBR-22 (results reported), converted once per OBR."""
        got = self._obr_times.get(obr.index)
        if got is None:
            got = (ts(obr[7], "OBR-7"), instant(obr[22], "OBR-22") if obr[22] else None)
            self._obr_times[obr.index] = got
        return got

    def unique(self, kind: str, value: str) -> str:
        """``value``, made unique within the message for this resource kind."""
        candidate, n = value, 1
        while (kind, candidate) in self.used:
            n += 1
            candidate = f"{value}#{n}"
        self.used.add((kind, candidate))
        return candidate


def _report_key(ctx: _Context, obr: Segment, orc: Segment | None, position: int) -> tuple[str, str]:
    code = ctx.source.facility_code
    filler = _ei(obr, 3) or (_ei(orc, 3) if orc else "")
    if filler:
        return facility_system("filler", code), filler
    placer = _ei(obr, 2) or (_ei(orc, 2) if orc else "")
    if placer:
        return facility_system("placer", code), placer
    return facility_system("message", code), f"{ctx.msg.control_id}/OBR{position}"


def _specimen(
    ctx: _Context, obr: Segment, spm: Segment | None, filler: str, facts: PatientFacts
) -> tuple[str | None, Json | None]:
    """The Specimen of SPM (2.5+) or OBR-15 (2.3/2.4): (fullUrl of its own entry, None) when
    the store holds Specimen, else (None, the resource to contain in the report)."""
    code = ctx.source.facility_code
    res: Json = {"resourceType": "Specimen"}
    if spm is not None:
        ident = spm.text(2, 1) or spm.text(2, 2) or spm.text(1)
        key = f"{filler}/{ident}" if ident else filler
        kind = cwe_field(spm, 4)
        collected = spm.reps(17)
        start = ts(component(collected[0], spm.enc, 1), "SPM-17") if collected else None
        end = ts(component(collected[0], spm.enc, 2), "SPM-17") if collected else None
        received = instant(spm[18], "SPM-18")
    else:
        name = obr.text(15, 1) or obr.text(15, 2)
        if not name:
            return None, None
        key = f"{filler}/{name}"
        kind = cwe(
            obr.reps(15)[0].split(obr.enc.component)[0].replace(obr.enc.subcomponent, obr.enc.component), obr
        )
        start, end = ts(obr[7], "OBR-7"), ts(obr[8], "OBR-8")
        received = instant(obr[14], "OBR-14")
    if key in ctx.specimens:
        return ctx.specimens[key], None
    system = facility_system("filler", code)
    res["identifier"] = [{"system": system, "value": key}]
    res["status"] = "available"
    if kind:
        res["type"] = kind
    res["subject"] = subject(facts)
    if received:
        res["receivedTime"] = received
    if start:
        res["collection"] = (
            {"collectedPeriod": {"start": start, "end": end}} if end else {"collectedDateTime": start}
        )
    if not STANDALONE_SPECIMEN:
        return None, {"id": "specimen", **res}
    url = full_url(ctx.msg.control_id, "Specimen", key)
    ctx.mapped.entries.append(conditional_put(res, system, key, url))
    ctx.specimens[key] = url
    return url, None


def _observation(
    ctx: _Context, obx: Segment, obr: Segment, report_value: str, facts: PatientFacts, specimen: str | None
) -> str:
    code = ctx.source.facility_code
    set_id = obx.text(1) or str(obx.index)
    where = f"OBX[{set_id}]"
    concept = cwe_field(obx, 3)
    if concept is None:
        raise Rejected("observation identifier (OBX-3) is empty", f"{where}-3")
    code_key = obx.text(3, 1) or obx.text(3, 2)
    sub_id = obx.text(4)
    value = ctx.unique("Observation", "/".join(x for x in (report_value, set_id, sub_id, code_key) if x))
    system = facility_system("filler", code)
    status_code = obx.text(11).upper()
    status = table("observation-status").get(status_code, "final") if status_code else "final"
    res: Json = {
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": concept,
        "subject": subject(facts),
    }
    effective = ts(obx[14], f"{where}-14") or ctx.obr_times(obr)[0]
    if effective:
        res["effectiveDateTime"] = effective
    issued = ctx.obr_times(obr)[1]
    if issued:
        res["issued"] = issued
    performers = xcn_field(obx, 16, ctx.source)
    res["performer"] = [facility(ctx.source), *performers]
    got = _value(obx, f"{where}-5", ctx.mapped.warnings)
    if got:
        res[got[0]] = got[1]
    elif status in ("final", "amended", "corrected"):
        res["dataAbsentReason"] = {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}
            ]
        }
    flags: list[Json] = []
    for rep in obx.reps(8):
        flag = component(rep, obx.enc, 1)
        mapped = table("abnormal-flags").get(flag.upper()) or table("abnormal-flags").get(flag)
        if mapped:
            flags.append({"coding": [{"system": INTERPRETATION, "code": mapped[0], "display": mapped[1]}]})
        elif flag:
            flags.append({"text": flag})
    if flags:
        res["interpretation"] = flags
    note = notes(_trailing(ctx.msg, obx, "NTE"))
    if note:
        res["note"] = note
    method = cwe_field(obx, 17)
    if method:
        res["method"] = method
    if specimen:
        res["specimen"] = {"reference": specimen}
    ref_range = reference_range(obx.enc.unescape(obx[7]), unit(obx, 6))
    if ref_range:
        res["referenceRange"] = [ref_range]
    url = full_url(ctx.msg.control_id, "Observation", value)
    ctx.mapped.entries.append(conditional_put(res, system, value, url))
    return url


def _trailing(msg: Message, seg: Segment, name: str) -> list[Segment]:
    """The ``name`` segments right after ``seg`` (NTE after OBR/OBX)."""
    out: list[Segment] = []
    segments = msg.segments
    i = seg.index + 1
    while i < len(segments) and segments[i].name == name:
        out.append(segments[i])
        i += 1
    return out


def _groups(
    msg: Message,
) -> list[tuple[Segment | None, Segment, list[Segment], Segment | None, Segment | None]]:
    """(PID, OBR, its OBX list, its SPM, its ORC) for each OBR, in message order."""
    out: list[tuple[Segment | None, Segment, list[Segment], Segment | None, Segment | None]] = []
    pid: Segment | None = None
    orc: Segment | None = None
    current: list[Any] | None = None
    for seg in msg.segments:
        if seg.name == "PID":
            pid, orc = seg, None
        elif seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            current = [pid, seg, [], None, orc]
            out.append(current)  # type: ignore[arg-type]
        elif seg.name == "OBX" and current is not None:
            current[2].append(seg)
        elif seg.name == "SPM" and current is not None and current[3] is None:
            current[3] = seg
    return [tuple(g) for g in out]  # type: ignore[misc]


def map_oru(msg: Message, source: Source) -> Mapped:
    ctx = _Context(msg, source)
    groups = _groups(msg)
    if not groups:
        raise Rejected("ORU^R01 has no OBR segment (no result to record)", "OBR")
    patients: dict[int, PatientFacts] = {}
    for position, (pid, obr, obxs, spm, orc) in enumerate(groups, 1):
        if pid is None:
            raise Rejected("OBR before any PID: a result needs its patient", f"OBR[{position}]")
        if pid.index not in patients:
            patients[pid.index] = patient(msg, source, pid)
            ctx.mapped.patients.append(patients[pid.index])
        facts = patients[pid.index]
        system, value = _report_key(ctx, obr, orc, position)
        value = ctx.unique("DiagnosticReport", value)
        code = cwe_field(obr, 4)
        if code is None:
            raise Rejected("universal service identifier (OBR-4) is empty", f"OBR[{position}]-4")
        specimen, contained = _specimen(ctx, obr, spm, value, facts)
        results = [_observation(ctx, obx, obr, value, facts, specimen) for obx in obxs]
        status_code = obr.text(25).upper()
        report: Json = {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": system, "value": value}],
            "status": table("report-status").get(status_code, "final") if status_code else "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                            "code": obr.text(24) or "LAB",
                        }
                    ]
                }
            ],
            "code": code,
            "subject": subject(facts),
        }
        placer = _ei(obr, 2) or (_ei(orc, 2) if orc else "")
        if placer:
            report["basedOn"] = [
                {
                    "type": "ServiceRequest",
                    "identifier": {
                        "system": facility_system("placer", source.facility_code),
                        "value": placer,
                    },
                }
            ]
        effective = ts(obr[7], "OBR-7")
        if effective:
            report["effectiveDateTime"] = effective
        issued = obr[22] and instant(obr[22], "OBR-22")
        if issued:
            report["issued"] = issued
        report["performer"] = [facility(source)]
        if specimen:
            report["specimen"] = [{"reference": specimen}]
        elif contained:
            report["contained"] = [contained]
            report["specimen"] = [{"reference": "#specimen"}]
        if results:
            report["result"] = [{"reference": url} for url in results]
        conclusion = "\n".join(n["text"] for n in notes(_trailing(msg, obr, "NTE")))
        if conclusion:
            report["conclusion"] = conclusion
        url = full_url(msg.control_id, "DiagnosticReport", value)
        ctx.mapped.entries.append(conditional_put(report, system, value, url))
    return ctx.mapped


MAPPERS: dict[str, Mapper] = {"ORU^R01": map_oru}
