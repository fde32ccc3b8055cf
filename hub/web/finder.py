"""The clinician's patient search box: one text field turned into FHIR search parameters, and
a page of results with the facilities that hold data on each person.

Owns: ``parse_patient_query`` (12 digits -> CCCD, a BHYT card code -> BHYT, a date -> birth
date, a 4-digit year -> birth year, the other words -> one multi-word ``name`` search, which
the search engine matches accent-free, case-free, in any order, each word a prefix:
hub.search.predicates ``string``/``_every_word``) and ``find_patients`` (the result page).
Calls: the page's FHIR handle (the router: access decision, consent filter, audit), the
record module's small readers.
Called by: ``hub.web.views.clinician``.

A result page costs two searches whatever its size: the Patients (with their managing
Organizations by ``_include``), then the Encounters of all of them at once (only
``subject`` and ``serviceProvider``, with the providers by ``_include``): never one per row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from hub.web.record import BHYT_SYSTEM, CCCD_SYSTEM, address_text, age_on, human_name, ref_key

PAGE_SIZE = 20
# Encounters read to name the facilities of one result page (20 people): the newest first, so
# a person with a very long history may show fewer facilities, never a wrong one.
_ENCOUNTER_CAP = 1000

_CCCD = re.compile(r"^\d{12}$")
# 2 letters (beneficiary group), 1 digit (benefit level 1-5), 2 digits (province), 10 digits (BHXH).
_BHYT = re.compile(r"^[A-Za-z]{2}[1-5]\d{12}$")
_DMY = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})$")
_YMD = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_YEAR = re.compile(r"^(19|20)\d{2}$")
_SEPARATORS = re.compile(r"[\s,;]+")


def parse_patient_query(text: str) -> list[tuple[str, str]]:
    """FHIR Patient search parameters for what was typed; [] when nothing searchable.

    >>> parse_patient_query("nguyen hoa 14/03/1988")
    [('birthdate', '1988-03-14'), ('name', 'nguyen hoa')]
    """
    params: list[tuple[str, str]] = []
    words: list[str] = []
    for token in _SEPARATORS.split(text.strip()):
        if not token:
            continue
        if _CCCD.match(token):
            params.append(("identifier", f"{CCCD_SYSTEM}|{token}"))
        elif _BHYT.match(token):
            params.append(("identifier", f"{BHYT_SYSTEM}|{token.upper()}"))
        elif _DMY.match(token) or _YMD.match(token):
            birth = _birth_date(token)
            if birth:  # an impossible date (31/02) is a typo: dropped, not searched as a name
                params.append(("birthdate", birth))
        elif _YEAR.match(token):
            params.append(("birthdate", token))
        else:
            word = token.strip(".'\"()[]")
            if word:
                words.append(word)
    if words:
        # One multi-word value: the engine wants every word in some name part, any order.
        params.append(("name", " ".join(words)))
    return params


def _birth_date(token: str) -> str | None:
    dmy = _DMY.match(token)
    ymd = _YMD.match(token)
    if dmy:
        day, month, year = (int(g) for g in dmy.groups())
    elif ymd:
        year, month, day = (int(g) for g in ymd.groups())
    else:
        return None
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        return None


class FhirSearcher(Protocol):
    """What the finder needs of ``hub.web.fhir_handle.FhirHandle``."""

    def search(self, type_: str, params: list[tuple[str, str]]) -> dict[str, Any]: ...


@dataclass
class PatientRow:
    id: str
    name: str
    birth_date: str
    age: int | None
    sex: str
    address: str
    cccd: str
    bhyt: str
    facilities: list[str] = field(default_factory=list)  # managing facility first, then by visits


@dataclass
class FinderPage:
    query: str
    params: list[tuple[str, str]]
    rows: list[PatientRow]
    next_cursor: str  # "" on the last page


def find_patients(fhir: FhirSearcher, text: str, cursor: str = "", today: date | None = None) -> FinderPage:
    """The result page of ``text`` (``cursor``: the ``_cursor`` of a previous page's next link)."""
    params = parse_patient_query(text)
    if not params:
        return FinderPage(text, [], [], "")
    query = [*params, ("_count", str(PAGE_SIZE)), ("_include", "Patient:organization")]
    if cursor:
        query.append(("_cursor", cursor))
    bundle = fhir.search("Patient", query)
    patients: list[Mapping[str, Any]] = []
    organizations: dict[str, Mapping[str, Any]] = {}
    for entry in _entries(bundle):
        resource = entry["resource"]
        kind = resource.get("resourceType")
        if kind == "Patient" and _mode(entry) == "match":
            patients.append(resource)
        elif kind == "Organization":
            organizations[str(resource.get("id"))] = resource
    providers = _providers(fhir, [str(p.get("id")) for p in patients], organizations)
    today = today or date.today()
    rows: list[PatientRow] = []
    for patient in patients:
        pid = str(patient.get("id"))
        facilities: list[str] = []
        for org_id in [_org_id(patient.get("managingOrganization")), *providers.get(pid, [])]:
            name = _org_name(organizations.get(org_id)) if org_id else ""
            if name and name not in facilities:
                facilities.append(name)
        birth = patient.get("birthDate")
        rows.append(
            PatientRow(
                id=pid,
                name=human_name(patient.get("name")),
                birth_date=birth if isinstance(birth, str) else "",
                age=age_on(birth, today) if isinstance(birth, str) else None,
                sex=str(patient.get("gender") or ""),
                address=address_text(patient.get("address")),
                cccd=_identifier(patient, CCCD_SYSTEM),
                bhyt=_identifier(patient, BHYT_SYSTEM),
                facilities=facilities,
            )
        )
    return FinderPage(text, params, rows, _next_cursor(bundle))


def _providers(
    fhir: FhirSearcher, patient_ids: list[str], organizations: dict[str, Mapping[str, Any]]
) -> dict[str, list[str]]:
    """Patient id -> the Organization ids of their Encounters' service providers (newest
    first), from ONE Encounter search for the whole page; fills ``organizations``."""
    if not patient_ids:
        return {}
    bundle = fhir.search(
        "Encounter",
        [
            ("patient", ",".join(patient_ids)),
            # _elements applies to the included Organizations too: "name" keeps theirs.
            ("_elements", "subject,serviceProvider,name"),
            ("_include", "Encounter:service-provider"),
            ("_sort", "-date"),
            ("_count", str(_ENCOUNTER_CAP)),
        ],
    )
    out: dict[str, list[str]] = {}
    for entry in _entries(bundle):
        resource = entry["resource"]
        if resource.get("resourceType") == "Organization":
            organizations[str(resource.get("id"))] = resource
        elif resource.get("resourceType") == "Encounter":
            subject = ref_key(resource.get("subject")).partition("/")[2]
            org = _org_id(resource.get("serviceProvider"))
            if subject and org and org not in out.setdefault(subject, []):
                out[subject].append(org)
    return out


def _entries(bundle: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("resource"), Mapping)]


def _mode(entry: Mapping[str, Any]) -> str:
    search = entry.get("search")
    return str(search.get("mode") or "match") if isinstance(search, Mapping) else "match"


def _org_id(reference: Any) -> str:
    kind, _, rid = ref_key(reference).partition("/")
    return rid if kind == "Organization" else ""


def _org_name(organization: Mapping[str, Any] | None) -> str:
    name = organization.get("name") if organization else None
    return name if isinstance(name, str) else ""


def _identifier(resource: Mapping[str, Any], system: str) -> str:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, Mapping) and identifier.get("system") == system:
            return str(identifier.get("value") or "")
    return ""


def _next_cursor(bundle: Mapping[str, Any]) -> str:
    """The ``_cursor`` of the bundle's next link ("" when it has none)."""
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            values = parse_qs(urlsplit(link["url"]).query).get("_cursor")
            if values:
                return values[0]
    return ""
