"""HL7 v2 datatypes to FHIR: TS/DTM, XPN, XAD, XTN, CX, XCN, CE/CWE, and what every message
family shares (the patient from PID, the placeholders, conditional entries).

Owns: the datatype conversions (each raises ``Rejected`` naming the field, "PID-7: '2023-13-45'
is not a date"), the classification of PID-3 identifiers into the hub's systems (CCCD, BHYT,
BHXH, the facility's MRN), the code-system URIs of v2 coding-system names (LN, SCT, I10...),
the v2 code tables read from ``fhir/hl7v2/*.json``, and the helpers that build idempotent
transaction entries (conditional PUT on an identifier, ``urn:uuid`` full URLs derived from
the message so a re-sent message maps to the same Bundle).
Calls: ``connectors.hl7v2.parse``, ``connectors.identifiers``, ``connectors.model``.
Called by: the mapping modules (``adt``, ``oru``, ``orders``, ``siu``, ``vxu``), ``peek``.
"""

from __future__ import annotations

import calendar
import json
import re
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from connectors.hl7v2.parse import Message, Segment, component, components, masked
from connectors.identifiers import BHXH, BHYT, CCCD, facility_reference, facility_system
from connectors.model import PatientFacts, Rejected, Source

Json = dict[str, Any]
TABLES_DIR = Path(__file__).resolve().parents[3] / "fhir" / "hl7v2"
# Times without a UTC offset are the facility's local time: Vietnam is UTC+7 all year.
DEFAULT_OFFSET = "+07:00"
_NS = uuid.UUID("0f6b1d8e-7c1e-4c59-9d55-3a2b6c1f0e11")  # urn:uuid namespace of v2 mappings
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?$")

# Authorities and identifier types (HL7 table 0203) that mark the national identity number.
CCCD_AUTHORITIES = frozenset({"CCCD", "BCA", "VNM-CCCD"})
CCCD_TYPES = frozenset({"NI", "NN", "NNVNM", "CCCD"})
BHYT_AUTHORITIES = frozenset({"BHYT", "BHXH", "VSS"})
BHYT_TYPES = frozenset({"BHYT", "HC"})
MRN_TYPES = frozenset({"MR", "MRN", "PI", "PT", "PN", ""})
# Identifier types (table 0203) that are never a facility's patient number; any other type,
# including a facility's own made-up one, is read as its MRN.
NOT_MRN_TYPES = frozenset(
    {"SS", "SSN", "DL", "DN", "PPN", "PEN", "AN", "BA", "BC", "BR", "CC", "DI", "EI", "EN", "FI", "GI"}
    | {"LI", "LN", "MA", "MC", "NPI", "PRN", "RRI", "SR", "TAX", "UPIN", "VN", "WC", "WCN", "XX", "NH"}
)

# v2 coding-system names (table 0396) to FHIR system URIs.
CODE_SYSTEMS: dict[str, str] = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CP": "http://hl7.org/fhir/sid/icd-9-cm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "MVX": "http://hl7.org/fhir/sid/mvx",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "UCUM": "http://unitsofmeasure.org",
    "ISO+": "http://unitsofmeasure.org",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "C4": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "NCI": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
    "NCIT": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
    "ISO3166_1": "urn:iso:std:iso:3166",
}


# --- tables --------------------------------------------------------------------------------


@cache
def table(name: str) -> dict[str, Any]:
    """A code table of ``fhir/hl7v2/<name>.json`` (maps kept as data, readable by non-coders)."""
    data: dict[str, Any] = json.loads((TABLES_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return data


def code_system(name: str) -> str | None:
    """The FHIR system of a v2 coding-system name; HL7nnnn tables too; None when local."""
    key = name.strip().upper()
    if not key:
        return None
    if key in CODE_SYSTEMS:
        return CODE_SYSTEMS[key]
    m = re.match(r"^HL7?(\d{4})$", key)
    if m:
        return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
    return None


# --- identifiers of the mapped resources ---------------------------------------------------


def full_url(control_id: str, *parts: object) -> str:
    """A ``urn:uuid`` stable for the same message and position (a re-sent message maps alike)."""
    return "urn:uuid:" + str(uuid.uuid5(_NS, "|".join([control_id, *map(str, parts)])))


def conditional_put(resource: Json, system: str, value: str, url: str) -> Json:
    """A transaction entry that creates or updates the resource with this identifier."""
    from urllib.parse import quote

    return {
        "fullUrl": url,
        "resource": resource,
        "request": {
            "method": "PUT",
            "url": f"{resource['resourceType']}?identifier={quote(system, safe=':/')}|{quote(value, safe='')}",
        },
    }


def facility(source: Source) -> Json:
    ref = facility_reference(source.facility_code)
    return {**ref, "display": source.facility_name} if source.facility_name else ref


# --- dates ---------------------------------------------------------------------------------


def ts(value: str, where: str, *, date_only: bool = False) -> str | None:
    """A TS/DTM value as a FHIR date or dateTime, keeping its precision; None when empty.

    Precision below a day stays a date ("1975", "1975-04"); a time gets seconds and an offset
    (the message's, else Vietnam's +07:00) as FHIR requires. ``date_only`` drops the time."""
    raw = value.split("^", 1)[0].strip() if value else ""
    if not raw:
        return None
    m = _TS.match(raw)
    # The value's shape only, never its digits: a birth date (or a CCCD in the wrong field)
    # is personal data, and error texts are stored and sent unsealed.
    shown = repr(masked(raw))
    if not m:
        raise Rejected(f"{shown} is not a date", where)
    year, month, day, hour, minute, second, frac, offset = m.groups()
    y = int(year)
    if month is not None and not 1 <= int(month) <= 12:
        raise Rejected(f"{shown} is not a date (no such month)", where)
    if day is not None and not 1 <= int(day) <= calendar.monthrange(y, int(month or 1))[1]:
        raise Rejected(f"{shown} is not a date (no such day in its month)", where)
    if y < 1800:
        raise Rejected(f"{shown} is not a plausible date (before 1800)", where)
    if month is None:
        return year
    if day is None:
        return f"{year}-{month}"
    date = f"{year}-{month}-{day}"
    if date_only or hour is None:
        return date
    if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 59:
        raise Rejected(f"{shown} is not a time", where)
    if offset and (int(offset[1:3]) > 14 or int(offset[3:]) > 59):
        raise Rejected(f"{shown} has no valid UTC offset", where)
    tz = f"{offset[:3]}:{offset[3:]}" if offset else DEFAULT_OFFSET
    if tz in ("+00:00", "-00:00"):
        tz = "Z" if offset != "-0000" else "+00:00"
    return f"{date}T{hour}:{minute or '00'}:{second or '00'}{frac or ''}{tz}"


def instant(value: str, where: str) -> str | None:
    """A TS as a FHIR instant (full precision): a date alone becomes midnight local time."""
    got = ts(value, where)
    if got is None:
        return None
    if "T" in got:
        return got
    parts = (got.split("-") + ["01", "01"])[:3]
    return f"{parts[0]}-{parts[1]}-{parts[2]}T00:00:00{DEFAULT_OFFSET}"


# --- names, addresses, telecom -------------------------------------------------------------

# HL7 table 0063 (relationship), for NK1-3 codes sent without their coding system.
RELATIONSHIP_CODES = frozenset(
    {"ASC", "BRO", "CGV", "CHD", "DEP", "DOM", "EMC", "EME", "EMR", "EXF", "FCH", "FND", "FTH"}
    | {"GCH", "GRD", "GRP", "MGR", "MTH", "NCH", "NON", "OAD", "OTH", "OWN", "PAR", "SCH", "SEL"}
    | {"SIB", "SIS", "SPO", "TRA", "UNK", "WRD"}
)
_NAME_USE = {
    "L": "official",
    "D": "usual",
    "M": "maiden",
    "N": "nickname",
    "A": "anonymous",
    "B": "old",
    "C": "usual",
    "P": "usual",
    "U": "temp",
    "T": "temp",
    "I": "old",
    "S": "anonymous",
}


def xpn(value: str, seg: Segment) -> Json | None:
    """One XPN repetition as a HumanName.

    Vietnamese names are family name first ("Nguyễn Văn An": family Nguyễn, given Văn, An).
    When the sender puts the whole name in XPN-1 with nothing in XPN-2, the first word is
    the family name and the rest the given names; ``text`` is always family first."""
    enc = seg.enc
    c = components(value, enc)
    c += [""] * (14 - len(c))
    family = component(value, enc, 1, 1)
    given = [*c[1].split(), *c[2].split()]
    if family and not given and " " in family:
        first, rest = family.split(" ", 1)
        family, given = first, rest.split()
    if not family and not given:
        return None
    name: Json = {}
    use = _NAME_USE.get(c[6].upper())
    if use:
        name["use"] = use
    name["text"] = " ".join([family, *given]).strip()
    if family:
        name["family"] = family
    if given:
        name["given"] = given
    if c[4]:
        name["prefix"] = [c[4]]
    suffixes = [s for s in (c[3], c[5]) if s]
    if suffixes:
        name["suffix"] = suffixes
    return name


def xpns(seg: Segment, n: int) -> list[Json]:
    return [name for rep in seg.reps(n) if (name := xpn(rep, seg))]


_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "billing", "M": "home"}


def xad(value: str, seg: Segment) -> Json | None:
    """One XAD repetition as an Address (street, other designation: commune/ward, city:
    district, state: province, zip, country)."""
    enc = seg.enc
    c = components(value, enc)
    c += [""] * (9 - len(c))
    street = c[0]
    lines = [x for x in (street, c[1]) if x]
    addr: Json = {}
    use = _ADDRESS_USE.get(c[6].upper())
    if use:
        addr["use"] = use
    if lines:
        addr["line"] = lines
    for key, val in (("city", c[2]), ("state", c[3]), ("postalCode", c[4]), ("country", c[5])):
        if val:
            addr[key] = val
    if c[8] and "district" not in addr:
        addr["district"] = c[8]
    if not addr or addr.keys() == {"use"}:
        return None
    addr["text"] = ", ".join(x for x in (*lines, c[8], c[2], c[3], c[5]) if x)
    return addr


_TELECOM_USE = {"PRN": "home", "ORN": "home", "WPN": "work", "VHN": "home", "NET": "home", "PRS": "mobile"}
_TELECOM_SYSTEM = {
    "PH": "phone",
    "CP": "phone",
    "FX": "fax",
    "BP": "pager",
    "Internet": "email",
    "X.400": "email",
}


def xtn(value: str, seg: Segment) -> Json | None:
    """One XTN repetition as a ContactPoint (number in XTN-1, or country/area/local parts)."""
    enc = seg.enc
    c = components(value, enc)
    c += [""] * (12 - len(c))
    kind = c[2]
    system = _TELECOM_SYSTEM.get(kind, "phone" if kind or c[0] or c[6] else "other")
    if kind in ("Internet", "X.400") or "@" in c[3] or "@" in c[0]:
        text = c[3] or c[0]
        system = "email"
    else:
        parts = "".join(x for x in (c[4] and f"+{c[4]} ", c[5], c[6]) if x)
        text = c[0] or parts or c[11]
    text = text.strip()
    if not text:
        return None
    point: Json = {"system": system, "value": text}
    if kind == "CP" or c[1] == "PRS":
        point["use"] = "mobile"
    elif c[1] in _TELECOM_USE:
        point["use"] = _TELECOM_USE[c[1]]
    return point


def xtns(seg: Segment, *ns: int) -> list[Json]:
    return [p for n in ns for rep in seg.reps(n) if (p := xtn(rep, seg))]


# --- codes ---------------------------------------------------------------------------------


def cwe(value: str, seg: Segment) -> Json | None:
    """One CE/CWE repetition as a CodeableConcept (primary and alternate coding, text)."""
    enc = seg.enc
    c = components(value, enc)
    c += [""] * (9 - len(c))
    codings: list[Json] = []
    for code, display, sysname in ((c[0], c[1], c[2]), (c[3], c[4], c[5])):
        if not code:
            continue
        coding: Json = {}
        system = code_system(sysname)
        if system:
            coding["system"] = system
        coding["code"] = code
        if display:
            coding["display"] = display
        codings.append(coding)
    text = c[8] or c[1] or c[4]
    if not codings and not text:
        return None
    concept: Json = {}
    if codings:
        concept["coding"] = codings
    if text:
        concept["text"] = text
    return concept


def cwe_field(seg: Segment, n: int) -> Json | None:
    reps = seg.reps(n)
    return cwe(reps[0], seg) if reps else None


def coded(system: str, code: str, display: str | None = None) -> Json:
    coding: Json = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


# --- people --------------------------------------------------------------------------------


def xcn(value: str, seg: Segment, source: Source) -> Json | None:
    """One XCN repetition as a logical Reference to a practitioner (identifier + display):
    the hub has no practitioner directory of each facility yet, so no literal reference."""
    enc = seg.enc
    c = components(value, enc)
    c += [""] * (9 - len(c))
    staff_id = c[0]
    family = component(value, enc, 2, 1)
    given = " ".join(x for x in (c[2], c[3]) if x)
    display = " ".join(x for x in (c[5], family, given) if x).strip()
    if not staff_id and not display:
        return None
    ref: Json = {"type": "Practitioner"}
    if staff_id:
        ref["identifier"] = {
            "system": facility_system("practitioner", source.facility_code),
            "value": staff_id,
        }
    if display:
        ref["display"] = display
    return ref


def xcn_field(seg: Segment, n: int, source: Source) -> list[Json]:
    return [r for rep in seg.reps(n) if (r := xcn(rep, seg, source))]


# --- the patient ---------------------------------------------------------------------------


def classify(value: str, seg: Segment) -> tuple[str, str] | None:
    """What a CX (PID-3 repetition) is: ("cccd"|"bhyt"|"bhxh"|"mrn", value) or None (SSN,
    driver's licence, other identifiers the hub does not keep)."""
    enc = seg.enc
    ident = component(value, enc, 1).replace(" ", "")
    if not ident:
        return None
    authority = component(value, enc, 4, 1).upper()
    kind = component(value, enc, 5).upper()
    if authority in CCCD_AUTHORITIES or kind in CCCD_TYPES:
        # NI alone is any country's national id: only 12 digits is a CCCD.
        if authority in CCCD_AUTHORITIES or (ident.isdigit() and len(ident) == 12):
            return ("cccd", ident)
        return None
    if authority in BHYT_AUTHORITIES or kind in BHYT_TYPES:
        ident = ident.upper()
        if len(ident) == 10 and ident.isdigit():
            return ("bhxh", ident)
        return ("bhyt", ident)
    if kind in MRN_TYPES or kind not in NOT_MRN_TYPES:
        return ("mrn", ident)
    return None


def patient_identifiers(pid: Segment) -> list[tuple[str, str, str]]:
    """(kind, value, assigning authority) of every identifier the hub keeps, PID-3 first,
    then PID-2 (v2.3 senders put the MRN there) and PID-4."""
    found: list[tuple[str, str, str]] = []
    for n in (3, 2, 4):
        for rep in pid.reps(n):
            got = classify(rep, pid)
            if got:
                found.append((*got, component(rep, pid.enc, 4, 1)))
    return found


def ordering_key(msg: Message) -> str | None:
    """The strongest patient identifier as "system|value": CCCD, else the BHYT card's BHXH
    number (stable across card renewals), else the MRN. ``peek`` has no source, so the MRN's
    system is scoped by the sending facility (MSH-4) rather than the registered code."""
    pid = msg.first("PID")
    if pid is None:
        return None
    ids = patient_identifiers(pid)
    by_kind: dict[str, str] = {}
    for kind, value, _ in ids:
        by_kind.setdefault(kind, value)
    if "cccd" in by_kind:
        return f"{CCCD}|{by_kind['cccd']}"
    if "bhyt" in by_kind and len(by_kind["bhyt"]) >= 10:
        return f"{BHXH}|{by_kind['bhyt'][-10:]}"
    if "bhxh" in by_kind:
        return f"{BHXH}|{by_kind['bhxh']}"
    if "mrn" in by_kind:
        sender = msg.msh.text(4) or msg.msh.text(3) or "-"
        return f"mrn:{sender}|{by_kind['mrn']}"
    return None


# Table 0001, plus the numeric codes of Vietnamese HIS (QĐ 130 GIOI_TINH: 1 nam, 2 nữ, 3 unknown).
_GENDER = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "N": "other",
    "U": "unknown",
    "1": "male",
    "2": "female",
    "3": "unknown",
}


def patient(msg: Message, source: Source, pid: Segment | None = None) -> PatientFacts:
    """The patient of PID as the facility describes it, with its placeholder."""
    pid = pid or msg.first("PID")
    if pid is None:
        raise Rejected("message has no PID segment", "PID")
    resource: Json = {"resourceType": "Patient"}
    identifiers: list[Json] = []
    seen: set[tuple[str, str]] = set()
    mrn_authority = str(source.settings.get("mrn_authority", "")).upper()
    ids = patient_identifiers(pid)
    mrns = [i for i in ids if i[0] == "mrn"]
    # One MRN per facility: the one of the configured authority, else the first.
    mrn = next(
        (i for i in mrns if mrn_authority and i[2].upper() == mrn_authority), mrns[0] if mrns else None
    )

    def add(system: str, value: str, type_code: str | None = None) -> None:
        if (system, value) in seen:
            return
        seen.add((system, value))
        ident: Json = {"system": system, "value": value}
        if type_code:
            ident["type"] = coded("http://terminology.hl7.org/CodeSystem/v2-0203", type_code)
        identifiers.append(ident)

    for kind, value, _ in ids:
        if kind == "cccd":
            add(CCCD, value, "NI")
        elif kind == "bhyt":
            add(BHYT, value, "HC")
            if len(value) >= 10 and value[-10:].isdigit():
                add(BHXH, value[-10:], "SB")
        elif kind == "bhxh":
            add(BHXH, value, "SB")
    if mrn:
        add(facility_system("mrn", source.facility_code), mrn[1], "MR")
    if not identifiers:
        raise Rejected("no patient identifier the hub can use (CCCD, BHYT, MRN)", "PID-3")
    resource["identifier"] = identifiers
    names = xpns(pid, 5)
    if names:
        resource["name"] = names
    sex = pid.text(8).upper()
    if sex:
        gender = _GENDER.get(sex)
        if gender is None:
            raise Rejected(f"{sex!r} is not a sex code of table 0001", "PID-8")
        resource["gender"] = gender
    birth = ts(pid[7], "PID-7", date_only=True)
    if birth:
        resource["birthDate"] = birth
    telecom = xtns(pid, 13, 14)
    if telecom:
        resource["telecom"] = telecom
    addresses = [a for rep in pid.reps(11) if (a := xad(rep, pid))]
    if addresses:
        resource["address"] = addresses
    death = pid.text(30).upper()
    death_time = ts(pid[29], "PID-29")
    if death_time:
        resource["deceasedDateTime"] = death_time
    elif death == "Y":
        resource["deceasedBoolean"] = True
    marital = pid.text(16).upper()
    if marital:
        resource["maritalStatus"] = (
            coded("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", marital)
            if marital in {"A", "D", "I", "L", "M", "P", "S", "T", "U", "W"}
            else {"text": pid.text(16, 2) or marital}
        )
    contacts = [c for nk1 in _next_of_kin(msg, pid) if (c := _contact(nk1))]
    if contacts:
        resource["contact"] = contacts
    resource["managingOrganization"] = facility(source)
    return PatientFacts(placeholder=full_url(msg.control_id, "Patient", pid.index), resource=resource)


def _next_of_kin(msg: Message, pid: Segment) -> list[Segment]:
    """The NK1 segments of this PID's group (up to the next PID)."""
    out: list[Segment] = []
    for seg in msg.segments[pid.index + 1 :]:
        if seg.name == "PID":
            break
        if seg.name == "NK1":
            out.append(seg)
    return out


def _contact(nk1: Segment) -> Json | None:
    """NK1 (next of kin: người thân) as Patient.contact: relationship NK1-3 (table 0063),
    name NK1-2, phone NK1-5/NK1-6, address NK1-4."""
    contact: Json = {}
    relationship = cwe_field(nk1, 3)
    if relationship:
        for coding in relationship.get("coding", []):
            if "system" not in coding and coding["code"] in RELATIONSHIP_CODES:
                coding["system"] = "http://terminology.hl7.org/CodeSystem/v2-0063"
        contact["relationship"] = [relationship]
    names = xpns(nk1, 2)
    if names:
        contact["name"] = names[0]
    telecom = xtns(nk1, 5, 6)
    if telecom:
        contact["telecom"] = telecom
    address = next((a for rep in nk1.reps(4) if (a := xad(rep, nk1))), None)
    if address:
        contact["address"] = address
    return contact if ("name" in contact or "telecom" in contact) else None


def subject(facts: PatientFacts) -> Json:
    return {"reference": facts.placeholder}


def notes(segments: list[Segment]) -> list[Json]:
    """NTE-3 texts as Annotations."""
    out: list[Json] = []
    for nte in segments:
        text = "\n".join(nte.enc.unescape(r) for r in nte.reps(3)).strip()
        if text:
            out.append({"text": text})
    return out


def children(msg: Message, parent: Segment, names: set[str], stop: set[str]) -> list[Segment]:
    """The segments after ``parent`` named in ``names`` until one named in ``stop``."""
    out: list[Segment] = []
    for seg in msg.segments[parent.index + 1 :]:
        if seg.name in stop:
            break
        if seg.name in names:
            out.append(seg)
    return out
