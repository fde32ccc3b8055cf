"""The building blocks of a mapped QĐ 130 episode: ``Episode`` (its entries, each a
conditional write on an identifier derived from MA_LK, with a fullUrl made from that
identifier, so the same file gives the same Bundle), the code lists, and the small coding
helpers the table mappings share.

Owns: identifier values and conditional URLs of the entries, deterministic ``urn:uuid``s,
the code lists (``fhir/xml130/code-lists.json``), the systems the mappings write.
Calls: ``connectors.identifiers``, ``connectors.xml130.fields``.
Called by: ``connectors.xml130.mapping`` (patient, XML0, XML1), ``connectors.xml130.clinical``
(the other tables), ``connectors.xml130`` (the file).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from connectors.identifiers import FACILITY, facility_system
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
    # "type" says it names no patient: the compartment needs no lookup of the identifier.
    ref: dict[str, Any] = {
        "type": "Practitioner",
        "identifier": {"system": PRACTITIONER_SYSTEM, "value": code},
    }
    if display:
        ref["display"] = display
    return ref


def facility_ref(code: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": FACILITY, "value": code}}


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


_ONE_IDENTIFIER = frozenset({"Composition"})  # R4 types whose identifier is a single Identifier


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
            # Composition.identifier is 0..1: the one identifier, not a list.
            "identifier": identifier if res_type in _ONE_IDENTIFIER else [identifier, *extra],
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
