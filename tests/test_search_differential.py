"""Differential search test: the hub's answers against hand-written Python filters.

The 300-patient Synthea set, loaded once per run by conftest's ``synthea_300`` (the backend
under test), is copied for this module and served by a real uvicorn server. Each case sends one search over HTTP, follows
the ``next`` links, and compares what came back with what a plain Python filter over the raw
Bundles selects. The oracle never calls hub code: folding, date ranges, prefixes and reference
resolution are re-implemented here from the FHIR R4 search specification (search.html).

Ids: patient-level resources keep the uuid of their ``urn:uuid`` fullUrl. The hospital's
Organizations and Practitioners are repeated in every patient Bundle and get fresh ids on
import, so cases about them compare names or identifiers as multisets, never ids.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import ADMIN_AUTH, SYNTHEA_300, LiveServer, LoadedSet

pytestmark = pytest.mark.slow

DATA = SYNTHEA_300
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
Resource = dict[str, Any]

# --- the oracle's own helpers (no hub code) -------------------------------------------------


def fold(text: str) -> str:
    """Case- and accent-blind form: đ→d, strip combining marks, casefold, collapse spaces."""
    text = text.replace("đ", "d").replace("Đ", "D")
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(text.casefold().split())


_TIME_RE = re.compile(r"T\d\d:\d\d(?P<sec>:\d\d(?:\.(?P<frac>\d+))?)?")
NEVER_BEFORE = datetime.min.replace(tzinfo=UTC)
NEVER_AFTER = datetime.max.replace(tzinfo=UTC)


def span(text: str) -> tuple[datetime, datetime]:
    """Half-open [low, high) range of a FHIR date/dateTime/instant by its precision (no zone = UTC)."""
    if len(text) == 4:
        year = int(text)
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
    if len(text) == 7:
        year, month = int(text[:4]), int(text[5:7])
        nxt = (
            datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
        )
        return datetime(year, month, 1, tzinfo=UTC), nxt
    if len(text) == 10:
        day = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return day, day + timedelta(days=1)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    match = _TIME_RE.search(text)
    assert match, text
    if not match["sec"]:
        width = timedelta(minutes=1)
    elif match["frac"]:
        width = timedelta(microseconds=10 ** (6 - min(len(match["frac"]), 6)))
    else:
        width = timedelta(seconds=1)
    return moment.astimezone(UTC), moment.astimezone(UTC) + width


def period_span(period: dict[str, str]) -> tuple[datetime, datetime]:
    low = span(period["start"])[0] if period.get("start") else NEVER_BEFORE
    high = span(period["end"])[1] if period.get("end") else NEVER_AFTER
    return low, high


def date_matches(prefix: str, target: tuple[datetime, datetime], query: tuple[datetime, datetime]) -> bool:
    """FHIR R4 search.html#prefix: compare the target's range with the search value's range."""
    t_low, t_high = target
    q_low, q_high = query
    contained = q_low <= t_low and t_high <= q_high
    return {
        "eq": contained,
        "ne": not contained,
        "gt": t_high > q_high,  # the range above the search value overlaps the target
        "lt": t_low < q_low,
        "ge": t_high > q_high or contained,
        "le": t_low < q_low or contained,
        "sa": t_low >= q_high,  # the range above the search value contains the target
        "eb": t_high <= q_low,
    }[prefix]


def when(value: str) -> Callable[[tuple[datetime, datetime]], bool]:
    """A predicate for a prefixed date search value such as ``ge2019-05``."""
    prefix, text = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
    query = span(text)
    return lambda target: date_matches(prefix, target, query)


def codings(concept: Any) -> list[dict[str, Any]]:
    if isinstance(concept, list):
        return [c for item in concept for c in codings(item)]
    return list(concept.get("coding", [])) if isinstance(concept, dict) else []


def has_code(concept: Any, system: str | None, code: str) -> bool:
    return any(
        c.get("code") == code and (system is None or c.get("system") == system) for c in codings(concept)
    )


def ref(value: Any) -> str | None:
    """'Patient/x' of a Reference (urn:uuid references were rewritten on load)."""
    return value.get("reference") if isinstance(value, dict) else None


def name_parts(name: dict[str, Any]) -> list[str]:
    parts = [name.get("family"), name.get("text")]
    parts += name.get("given", []) + name.get("prefix", []) + name.get("suffix", [])
    return [p for p in parts if p]


def quantity(obs: Resource) -> dict[str, Any] | None:
    return obs.get("valueQuantity")


# --- raw data ---------------------------------------------------------------------------------

SHARED_TYPES = ("Organization", "Practitioner")


def _rewrite(node: Any, types: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, types) for k, v in node.items()}
        target = out.get("reference")
        if isinstance(target, str) and target.startswith("urn:uuid:"):
            out["reference"] = f"{types[target]}/{target[len('urn:uuid:') :]}"
        return out
    if isinstance(node, list):
        return [_rewrite(v, types) for v in node]
    return node


@dataclass
class Data:
    base: str
    res: dict[str, dict[str, Resource]]  # type -> id -> resource, for types whose ids are kept
    copies: dict[str, list[Resource]]  # Organization / Practitioner: every copy that was loaded
    first_copy: dict[str, Resource]  # Organization / Practitioner by their uuid in the raw data
    updated: dict[str, str] = field(default_factory=dict)  # Patient id -> meta.lastUpdated

    def of(self, res_type: str) -> Iterator[tuple[str, Resource]]:
        return iter(self.res[res_type].items())

    def ids(self, res_type: str, keep: Callable[[Resource], bool]) -> set[str]:
        return {i for i, r in self.of(res_type) if keep(r)}

    def by_patient(self, res_type: str, field_name: str = "subject") -> dict[str, list[Resource]]:
        out: dict[str, list[Resource]] = defaultdict(list)
        for _, r in self.of(res_type):
            target = ref(r.get(field_name))
            if target and target.startswith("Patient/"):
                out[target.split("/")[1]].append(r)
        return out

    def patients(self) -> list[str]:
        """Patients in a fixed order, with a middling number of Observations first."""
        counts = {p: len(v) for p, v in self.by_patient("Observation").items()}
        ordered = sorted(self.res["Patient"])
        return [p for p in ordered if 100 <= counts.get(p, 0) <= 300] + [
            p for p in ordered if not 100 <= counts.get(p, 0) <= 300
        ]


def load_raw(base: str) -> Data:
    res: dict[str, dict[str, Resource]] = defaultdict(dict)
    copies: dict[str, list[Resource]] = defaultdict(list)
    first_copy: dict[str, Resource] = {}
    types: dict[str, str] = {}
    files = sorted(DATA.glob("*.json.gz"), key=lambda p: (not p.name.startswith(("hosp", "pract")), p.name))
    for path in files:
        bundle = json.loads(gzip.decompress(path.read_bytes()))
        types.update({e["fullUrl"]: e["resource"]["resourceType"] for e in bundle["entry"]})
        for entry in bundle["entry"]:
            resource = _rewrite(entry["resource"], types)
            res_type, res_id = resource["resourceType"], entry["fullUrl"][len("urn:uuid:") :]
            if res_type in SHARED_TYPES:
                copies[res_type].append(resource)
                first_copy.setdefault(res_id, resource)
            else:
                assert res_id not in res[res_type]
                res[res_type][res_id] = resource
    return Data(base, res, copies, first_copy)


# --- the server side ---------------------------------------------------------------------------


@dataclass
class Found:
    total: int | None
    matches: list[Resource]
    included: list[Resource]


def search_all(base: str, res_type: str, params: list[tuple[str, str]]) -> Found:
    with httpx.Client(headers={"Accept": "application/fhir+json", **ADMIN_AUTH}, timeout=120) as client:
        response = client.get(f"{base}/{res_type}", params=params)
        pages = 0
        total, matches, included = None, [], {}
        while True:
            assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:600]}"
            page = response.json()
            if pages == 0:
                total = page.get("total")
            pages += 1
            assert pages < 200, "paging does not end"
            for entry in page.get("entry", []):
                mode = entry.get("search", {}).get("mode")
                resource = entry["resource"]
                if mode == "match":
                    matches.append(resource)
                elif mode == "include":
                    included[(resource["resourceType"], resource["id"])] = resource
                else:
                    raise AssertionError(f"unexpected entry mode {mode!r}: {json.dumps(entry)[:300]}")
            following = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
            if not following:
                return Found(total, matches, list(included.values()))
            response = client.get(following[0])


@pytest.fixture(scope="module")
def data(synthea_300: LoadedSet) -> Iterator[Data]:
    assert synthea_300.report.errors == []
    with LiveServer(synthea_300.copy("differential")) as server:
        raw = load_raw(server.base)
        patients = search_all(server.base, "Patient", [("_count", "1000")]).matches
        raw.updated = {p["id"]: p["meta"]["lastUpdated"] for p in patients}
        yield raw


# --- the cases ----------------------------------------------------------------------------------


@dataclass
class Expect:
    res_type: str
    params: list[tuple[str, str]]
    ids: set[str] | None = None  # exact ids of the matches
    key: Callable[[Resource], Any] | None = None  # or: compare this key of the matches as a multiset
    keys: list[Any] | None = None
    included: set[str] | None = None  # "Type/id" of the entries with search.mode include
    included_keys: list[Any] | None = None  # or a multiset of `key` over them
    order: Callable[[Resource], Any] | None = None  # matches must come sorted by this key...
    descending: bool = False  # ...in this direction (ties in any order)
    summary_count: int | None = None


CASES: dict[str, Callable[[Data], Expect]] = {}


def case(fn: Callable[[Data], Expect]) -> Callable[[Data], Expect]:
    CASES[fn.__name__] = fn
    return fn


def by_obs_code(system: str | None, code: str) -> Callable[[Resource], bool]:
    return lambda o: has_code(o.get("code"), system, code)


# token


@case
def token_code_without_system(d: Data) -> Expect:
    return Expect("Observation", [("code", "33762-6")], d.ids("Observation", by_obs_code(None, "33762-6")))


@case
def token_system_and_code_paged(d: Data) -> Expect:
    keep = by_obs_code(LOINC, "8302-2")
    return Expect("Observation", [("code", f"{LOINC}|8302-2")], d.ids("Observation", keep))


@case
def token_bar_code_means_no_system(d: Data) -> Expect:
    # |code matches only codings without a system; every Synthea coding has one.
    keep = lambda o: any(c.get("code") == "8302-2" and "system" not in c for c in codings(o["code"]))  # noqa: E731
    return Expect("Observation", [("code", "|8302-2")], d.ids("Observation", keep))


@case
def token_system_bar_only(d: Data) -> Expect:
    system = "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber"
    keep = lambda p: any(i.get("system") == system for i in p.get("identifier", []))  # noqa: E731
    return Expect("Patient", [("identifier", f"{system}|")], d.ids("Patient", keep))


@case
def token_identifier_system_value(d: Data) -> Expect:
    patient = d.res["Patient"][d.patients()[0]]
    ssn = next(i for i in patient["identifier"] if i.get("system") == "http://hl7.org/fhir/sid/us-ssn")

    def keep(p: Resource) -> bool:
        return any(
            i.get("system") == ssn["system"] and i.get("value") == ssn["value"] for i in p["identifier"]
        )

    return Expect("Patient", [("identifier", f"{ssn['system']}|{ssn['value']}")], d.ids("Patient", keep))


@case
def token_identifier_with_use_keeps_system(d: Data) -> Expect:
    # ImagingStudy.identifier has use=official, a system and no type: sys|value must find it.
    study = next(s for _, s in sorted(d.of("ImagingStudy")))
    ident = study["identifier"][0]
    keep = lambda s: any(  # noqa: E731
        i.get("system") == ident["system"] and i.get("value") == ident["value"]
        for i in s.get("identifier", [])
    )
    return Expect(
        "ImagingStudy", [("identifier", f"{ident['system']}|{ident['value']}")], d.ids("ImagingStudy", keep)
    )


@case
def token_not(d: Data) -> Expect:
    # :not also returns resources without any value for the parameter.
    keep = lambda c: not has_code(c.get("clinicalStatus"), None, "active")  # noqa: E731
    return Expect("Condition", [("clinical-status:not", "active")], d.ids("Condition", keep))


@case
def token_text_is_a_string_search(d: Data) -> Expect:
    # R4: ":text — processed as a string search" on CodeableConcept.text / Coding.display:
    # case- and accent-blind, equal to or starting with the value.
    def keep(c: Resource) -> bool:
        texts = [c["code"].get("text", "")] + [x.get("display", "") for x in codings(c["code"])]
        return any(fold(t).startswith("diabetes") for t in texts)

    return Expect("Condition", [("code:text", "diabetes")], d.ids("Condition", keep))


@case
def token_text_wildcard_is_literal(d: Data) -> Expect:
    # "_" is an ordinary character in a search value (here it must not act as a LIKE wildcard).
    def keep(c: Resource) -> bool:
        texts = [c["code"].get("text", "")] + [x.get("display", "") for x in codings(c["code"])]
        return any(fold(t).startswith("viral_sinusitis") for t in texts)

    return Expect("Condition", [("code:text", "viral_sinusitis")], d.ids("Condition", keep))


@case
def token_code_on_code_type(d: Data) -> Expect:
    return Expect("Patient", [("gender", "female")], d.ids("Patient", lambda p: p.get("gender") == "female"))


@case
def token_vaccine_code(d: Data) -> Expect:
    system = "http://hl7.org/fhir/sid/cvx"
    keep = lambda i: has_code(i.get("vaccineCode"), system, "133")  # noqa: E731
    return Expect("Immunization", [("vaccine-code", f"{system}|133")], d.ids("Immunization", keep))


# string


def patient_names(value: str, match: Callable[[str, str], bool]) -> Callable[[Resource], bool]:
    return lambda p: any(match(part, value) for n in p.get("name", []) for part in name_parts(n))


@case
def string_name_accent_insensitive(d: Data) -> Expect:
    keep = patient_names("trevino", lambda part, v: fold(part).startswith(v))
    return Expect("Patient", [("name", "trevino")], d.ids("Patient", keep))


@case
def string_name_query_with_accents(d: Data) -> Expect:
    keep = patient_names("angela", lambda part, v: fold(part).startswith(v))
    return Expect("Patient", [("name", "ÁNGELA")], d.ids("Patient", keep))


@case
def string_family_prefix(d: Data) -> Expect:
    keep = lambda p: any(fold(n.get("family", "")).startswith("rod") for n in p.get("name", []))  # noqa: E731
    return Expect("Patient", [("family", "Rod")], d.ids("Patient", keep))


@case
def string_given_exact(d: Data) -> Expect:
    keep = lambda p: any("Ángela" in n.get("given", []) for n in p.get("name", []))  # noqa: E731
    assert d.ids("Patient", keep)
    return Expect("Patient", [("given:exact", "Ángela")], d.ids("Patient", keep))


@case
def string_exact_is_case_and_accent_sensitive(d: Data) -> Expect:
    keep = lambda p: any("angela" in n.get("given", []) for n in p.get("name", []))  # noqa: E731
    return Expect("Patient", [("given:exact", "angela")], d.ids("Patient", keep))


@case
def string_name_contains(d: Data) -> Expect:
    keep = patient_names("ria", lambda part, v: v in fold(part))
    return Expect("Patient", [("name:contains", "RÍA")], d.ids("Patient", keep))


@case
def string_contains_wildcard_is_literal(d: Data) -> Expect:
    keep = patient_names("o_", lambda part, v: v in fold(part))
    return Expect("Patient", [("name:contains", "o_")], d.ids("Patient", keep))


@case
def string_city_with_space(d: Data) -> Expect:
    keep = lambda p: any(fold(a.get("city", "")).startswith("new bed") for a in p.get("address", []))  # noqa: E731
    return Expect("Patient", [("address-city", "new  Bed")], d.ids("Patient", keep))


@case
def string_organization_city_by_names(d: Data) -> Expect:
    orgs = [
        o
        for o in d.copies["Organization"]
        if any(fold(a.get("city", "")).startswith("boston") for a in o.get("address", []))
    ]
    return Expect(
        "Organization", [("address-city", "boston")], key=lambda o: o["name"], keys=[o["name"] for o in orgs]
    )


@case
def string_practitioner_family_by_npi(d: Data) -> Expect:
    npi = lambda p: p["identifier"][0]["value"]  # noqa: E731
    found = [
        p
        for p in d.copies["Practitioner"]
        if any(fold(n.get("family", "")).startswith("ha") for n in p["name"])
    ]
    return Expect("Practitioner", [("family", "ha")], key=npi, keys=[npi(p) for p in found])


# date: Patient.birthDate with every prefix


def birthdate_case(value: str) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        test = when(value)
        return Expect(
            "Patient", [("birthdate", value)], d.ids("Patient", lambda p: test(span(p["birthDate"])))
        )

    return build


for _value in (
    "eq1956-08-03",
    "eq1956",
    "ne1950",
    "lt1950",
    "gt2000-06",
    "le1950-01-01",
    "ge2010",
    "sa2005-12-31",
    "eb1940",
):
    CASES[f"date_birthdate_{_value}"] = birthdate_case(_value)


def effective_case(value: str) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        test = when(value)
        return Expect(
            "Observation",
            [("date", value)],
            d.ids("Observation", lambda o: test(span(o["effectiveDateTime"]))),
        )

    return build


for _value in (
    "eq2019-05",
    "ge2021-03-25",
    "gt2021-03-30",
    "sa2021-03-30",
    "lt1960",
    "le1955-06-30",
    "eb1958",
    "eq2011-06-06",
):
    CASES[f"date_observation_{_value}"] = effective_case(_value)
CASES["date_observation_with_offset"] = effective_case("ge2021-03-31T06:00:00+07:00")
CASES["date_observation_minute_precision"] = effective_case("eq2021-03-28T15:27")


def encounter_case(
    value: str, extra: list[tuple[str, str]], keep: Callable[[Resource], bool]
) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        test = when(value)
        found = d.ids("Encounter", lambda e: keep(e) and test(period_span(e["period"])))
        return Expect("Encounter", [("date", value), *extra], found)

    return build


_any: Callable[[Resource], bool] = lambda e: True  # noqa: E731
_emergency: Callable[[Resource], bool] = lambda e: e["class"]["code"] == "EMER"  # noqa: E731
_inpatient: Callable[[Resource], bool] = lambda e: e["class"]["code"] == "IMP"  # noqa: E731
CASES["date_encounter_period_eq_month"] = encounter_case("eq2017-03", [], _any)
# An inpatient stay 2021-01-24T06:44 → 2021-01-25T06:44 straddles the start of the 25th.
CASES["date_encounter_period_ge_straddling"] = encounter_case("ge2021-01-25", [], _any)
# An emergency visit 2017-03-21T23:37 → 2017-03-22T01:07 straddles the end of the 21st.
CASES["date_encounter_period_le_straddling"] = encounter_case("le2017-03-21", [("class", "EMER")], _emergency)
CASES["date_encounter_period_gt"] = encounter_case("gt2021-03-21", [], _any)
CASES["date_encounter_period_lt"] = encounter_case("lt1950", [], _any)
CASES["date_encounter_period_sa"] = encounter_case("sa2021-03-21", [], _any)
CASES["date_encounter_period_eb"] = encounter_case("eb1960", [], _any)
CASES["date_encounter_period_ne"] = encounter_case("ne2021", [("class", "IMP")], _inpatient)


def onset_case(value: str) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        test = when(value)
        return Expect(
            "Condition", [("onset-date", value)], d.ids("Condition", lambda c: test(span(c["onsetDateTime"])))
        )

    return build


for _value in ("lt1980", "ge2019-06-01", "eq2016", "gt2020-12", "le1975-01-01"):
    CASES[f"date_condition_onset_{_value}"] = onset_case(_value)


# quantity


def quantity_case(
    value: str, extra: list[tuple[str, str]], keep: Callable[[Resource, dict[str, Any]], bool]
) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        found = d.ids("Observation", lambda o: quantity(o) is not None and keep(o, quantity(o)))  # type: ignore[arg-type]
        return Expect("Observation", [*extra, ("value-quantity", value)], found)

    return build


CASES["quantity_gt_with_system_and_code"] = quantity_case(
    f"gt180|{UCUM}|cm",
    [],
    lambda o, q: q["value"] > 180 and q.get("system") == UCUM and q.get("code") == "cm",
)
CASES["quantity_lt_number_only"] = quantity_case(
    "lt10",
    [("code", f"{LOINC}|29463-7")],
    lambda o, q: has_code(o["code"], LOINC, "29463-7") and q["value"] < 10,
)
CASES["quantity_ge_code_without_system"] = quantity_case(
    "ge400||mg/dL", [], lambda o, q: q["value"] >= 400 and (q.get("code") or q.get("unit")) == "mg/dL"
)
CASES["quantity_eq_uses_precision"] = quantity_case(
    "5.8",
    [("code", f"{LOINC}|4548-4")],
    lambda o, q: has_code(o["code"], LOINC, "4548-4") and 5.75 <= q["value"] < 5.85,
)
CASES["quantity_le_curly_unit"] = quantity_case(
    f"le2|{UCUM}|{{score}}",
    [],
    lambda o, q: q["value"] <= 2 and q.get("code") == "{score}" and q.get("system") == UCUM,
)
CASES["quantity_sa"] = quantity_case(
    f"sa38|{UCUM}|Cel", [], lambda o, q: q["value"] > 38 and q.get("code") == "Cel"
)
CASES["quantity_eb"] = quantity_case(
    f"eb37.2|{UCUM}|Cel", [], lambda o, q: q["value"] < 37.2 and q.get("code") == "Cel"
)
CASES["quantity_ne"] = quantity_case(
    "ne5",
    [("code", f"{LOINC}|4548-4")],
    lambda o, q: has_code(o["code"], LOINC, "4548-4") and not 4.5 <= q["value"] < 5.5,
)


# reference


def subject_is(patient: str) -> Callable[[Resource], bool]:
    return lambda r: ref(r.get("subject")) == f"Patient/{patient}"


@case
def reference_type_and_id(d: Data) -> Expect:
    p = d.patients()[0]
    return Expect("Observation", [("patient", f"Patient/{p}")], d.ids("Observation", subject_is(p)))


@case
def reference_bare_id(d: Data) -> Expect:
    p = d.patients()[1]
    return Expect("Observation", [("subject", p)], d.ids("Observation", subject_is(p)))


@case
def reference_type_modifier(d: Data) -> Expect:
    p = d.patients()[2]
    return Expect("Condition", [("subject:Patient", p)], d.ids("Condition", subject_is(p)))


@case
def reference_absolute_url(d: Data) -> Expect:
    p = d.patients()[0]
    return Expect("Encounter", [("patient", f"{d.base}/Patient/{p}")], d.ids("Encounter", subject_is(p)))


@case
def reference_or_and_token(d: Data) -> Expect:
    p1, p2 = d.patients()[:2]
    keep = lambda o: (subject_is(p1)(o) or subject_is(p2)(o)) and has_code(o["code"], LOINC, "8302-2")  # noqa: E731
    return Expect(
        "Observation", [("patient", f"{p1},{p2}"), ("code", f"{LOINC}|8302-2")], d.ids("Observation", keep)
    )


# _id, _lastUpdated


@case
def id_list(d: Data) -> Expect:
    chosen = d.patients()[3:6] + ["no-such-id"]
    return Expect("Patient", [("_id", ",".join(chosen))], set(chosen[:3]))


@case
def id_and_reference(d: Data) -> Expect:
    p1, p2 = d.patients()[:2]
    o1 = sorted(o["id"] for o in d.by_patient("Observation")[p1])[0]
    o2 = sorted(o["id"] for o in d.by_patient("Observation")[p2])[0]
    return Expect("Observation", [("_id", f"{o1},{o2}"), ("patient", p1)], {o1})


def last_updated_case(prefix: str) -> Callable[[Data], Expect]:
    def build(d: Data) -> Expect:
        stamps = sorted(set(d.updated.values()))
        assert len(stamps) >= 3, "the load should span several write transactions"
        value = prefix + stamps[len(stamps) // 2]
        test = when(value)
        return Expect(
            "Patient", [("_lastUpdated", value)], {p for p, s in d.updated.items() if test(span(s))}
        )

    return build


for _prefix in ("lt", "ge", "eq", "gt"):
    CASES[f"last_updated_{_prefix}"] = last_updated_case(_prefix)


# combinations


@case
def and_of_dates_with_or_of_codes(d: Data) -> Expect:
    in_2015 = when("ge2015")
    before_2016 = when("lt2016")

    def keep(o: Resource) -> bool:
        moment = span(o["effectiveDateTime"])
        coded = has_code(o["code"], LOINC, "8302-2") or has_code(o["code"], LOINC, "29463-7")
        return coded and in_2015(moment) and before_2016(moment)

    params = [("date", "ge2015"), ("date", "lt2016"), ("code", f"{LOINC}|8302-2,{LOINC}|29463-7")]
    return Expect("Observation", params, d.ids("Observation", keep))


@case
def and_of_three_parameters(d: Data) -> Expect:
    since_1990 = when("ge1990")

    def keep(p: Resource) -> bool:
        cities = [fold(a.get("city", "")) for a in p.get("address", [])]
        near = any(c.startswith("boston") or c.startswith("worcester") for c in cities)
        return p["gender"] == "male" and since_1990(span(p["birthDate"])) and near

    params = [("gender", "male"), ("birthdate", "ge1990"), ("address-city", "Boston,Worcester")]
    return Expect("Patient", params, d.ids("Patient", keep))


@case
def summary_count(d: Data) -> Expect:
    n = len(d.ids("Observation", by_obs_code(LOINC, "2339-0")))
    return Expect("Observation", [("code", f"{LOINC}|2339-0"), ("_summary", "count")], summary_count=n)


# :missing


@case
def missing_true(d: Data) -> Expect:
    keep = lambda c: "abatementDateTime" not in c and "abatementPeriod" not in c  # noqa: E731
    return Expect("Condition", [("abatement-date:missing", "true")], d.ids("Condition", keep))


@case
def missing_false(d: Data) -> Expect:
    keep = lambda p: "deceasedDateTime" in p  # noqa: E731
    return Expect("Patient", [("death-date:missing", "false")], d.ids("Patient", keep))


@case
def missing_true_with_reference(d: Data) -> Expect:
    p = d.patients()[0]
    keep = lambda o: subject_is(p)(o) and "valueQuantity" not in o  # noqa: E731
    params = [("patient", p), ("value-quantity:missing", "true")]
    return Expect("Observation", params, d.ids("Observation", keep))


# chaining and reverse chaining


@case
def chain_typed_subject_name(d: Data) -> Expect:
    named = d.ids("Patient", patient_names("trevino", lambda part, v: fold(part).startswith(v)))
    keep = lambda o: (ref(o["subject"]) or "").split("/")[-1] in named  # noqa: E731
    return Expect("Observation", [("subject:Patient.name", "trevino")], d.ids("Observation", keep))


@case
def chain_patient_birthdate(d: Data) -> Expect:
    test = when("lt1950")
    old = d.ids("Patient", lambda p: test(span(p["birthDate"])))
    keep = lambda c: (ref(c["subject"]) or "").split("/")[-1] in old  # noqa: E731
    return Expect("Condition", [("patient.birthdate", "lt1950")], d.ids("Condition", keep))


@case
def chain_two_levels(d: Data) -> Expect:
    # Observation.encounter -> Encounter.subject (a Patient) -> gender. Every Synthea Observation
    # has an encounter, whose patient is the Observation's own; still a real two-join chain.
    women = d.ids("Patient", lambda p: p["gender"] == "female")
    encounters = d.res["Encounter"]

    def keep(o: Resource) -> bool:
        encounter = encounters.get((ref(o.get("encounter")) or "/").split("/")[1])
        patient = (ref(encounter["subject"]) or "").split("/")[-1] if encounter else None
        return has_code(o["code"], LOINC, "2339-0") and patient in women

    params = [("encounter.patient.gender", "female"), ("code", f"{LOINC}|2339-0")]
    return Expect("Observation", params, d.ids("Observation", keep))


@case
def chain_to_organization_name(d: Data) -> Expect:
    def keep(e: Resource) -> bool:
        org = d.first_copy.get((ref(e.get("serviceProvider")) or "/").split("/")[1])
        return org is not None and fold(org.get("name", "")).startswith("winchester")

    return Expect("Encounter", [("service-provider.name", "winchester")], d.ids("Encounter", keep))


@case
def reverse_chain_has(d: Data) -> Expect:
    found = {
        (ref(o["subject"]) or "").split("/")[-1]
        for _, o in d.of("Observation")
        if has_code(o["code"], LOINC, "33762-6")
    }
    return Expect("Patient", [("_has:Observation:patient:code", f"{LOINC}|33762-6")], found)


@case
def reverse_chain_has_with_text_lookup(d: Data) -> Expect:
    hypertension = next(c for _, c in d.of("Condition") if c["code"].get("text") == "Hypertension")
    coding = hypertension["code"]["coding"][0]
    found = {
        (ref(c["subject"]) or "").split("/")[-1]
        for _, c in d.of("Condition")
        if has_code(c["code"], coding["system"], coding["code"])
    }
    test = when("lt1960")
    found = {p for p in found if test(span(d.res["Patient"][p]["birthDate"]))}
    params = [
        ("_has:Condition:patient:code", f"{coding['system']}|{coding['code']}"),
        ("birthdate", "lt1960"),
    ]
    return Expect("Patient", params, found)


# _sort


def effective(o: Resource) -> datetime:
    return span(o["effectiveDateTime"])[0]


@case
def sort_observation_date_descending_paged(d: Data) -> Expect:
    p = d.patients()[0]
    params = [("patient", p), ("_sort", "-date"), ("_count", "37")]
    return Expect(
        "Observation", params, d.ids("Observation", subject_is(p)), order=effective, descending=True
    )


@case
def sort_encounter_date_ascending(d: Data) -> Expect:
    p = d.patients()[1]
    return Expect(
        "Encounter",
        [("patient", p), ("_sort", "date")],
        d.ids("Encounter", subject_is(p)),
        order=lambda e: period_span(e["period"])[0],
    )


@case
def sort_patient_birthdate_descending(d: Data) -> Expect:
    keep = lambda p: any(fold(a.get("city", "")).startswith("boston") for a in p.get("address", []))  # noqa: E731
    params = [("address-city", "boston"), ("_sort", "-birthdate")]
    return Expect("Patient", params, d.ids("Patient", keep), order=lambda p: p["birthDate"], descending=True)


@case
def sort_by_id(d: Data) -> Expect:
    keep = lambda p: p["gender"] == "female"  # noqa: E731
    params = [("gender", "female"), ("_sort", "_id"), ("_count", "50")]
    return Expect("Patient", params, d.ids("Patient", keep), order=lambda p: p["id"])


# _include / _revinclude


@case
def include_patient(d: Data) -> Expect:
    p = d.patients()[0]
    keep = lambda o: subject_is(p)(o) and has_code(o["code"], LOINC, "8302-2")  # noqa: E731
    params = [("patient", p), ("code", f"{LOINC}|8302-2"), ("_include", "Observation:patient")]
    return Expect("Observation", params, d.ids("Observation", keep), included={f"Patient/{p}"})


@case
def revinclude_encounters(d: Data) -> Expect:
    p1, p2 = d.patients()[:2]
    encounters = d.ids("Encounter", lambda e: subject_is(p1)(e) or subject_is(p2)(e))
    params = [("_id", f"{p1},{p2}"), ("_revinclude", "Encounter:patient")]
    return Expect("Patient", params, {p1, p2}, included={f"Encounter/{e}" for e in encounters})


@case
def include_organizations_by_name(d: Data) -> Expect:
    p = d.patients()[2]
    mine = [e for _, e in d.of("Encounter") if subject_is(p)(e)]
    orgs = {ref(e["serviceProvider"]) for e in mine if e.get("serviceProvider")}
    names = [d.first_copy[o.split("/")[1]]["name"] for o in orgs if o]
    params = [("patient", p), ("_include", "Encounter:service-provider")]
    return Expect(
        "Encounter", params, {e["id"] for e in mine}, key=lambda o: o.get("name"), included_keys=names
    )


# composite


@case
def composite_component_code_value(d: Data) -> Expect:
    def keep(o: Resource) -> bool:
        return any(
            has_code(c["code"], LOINC, "8480-6") and c.get("valueQuantity", {}).get("value", 0) > 140
            for c in o.get("component", [])
        )

    return Expect(
        "Observation",
        [("component-code-value-quantity", f"{LOINC}|8480-6$gt140")],
        d.ids("Observation", keep),
    )


@case
def composite_code_value(d: Data) -> Expect:
    keep = lambda o: has_code(o["code"], LOINC, "29463-7") and o["valueQuantity"]["value"] < 10  # noqa: E731
    return Expect(
        "Observation", [("code-value-quantity", f"{LOINC}|29463-7$lt10")], d.ids("Observation", keep)
    )


# --- the test ------------------------------------------------------------------------------------


def _diff(label: str, got: Counter[Any] | set[Any], want: Counter[Any] | set[Any]) -> str:
    if isinstance(got, set) and isinstance(want, set):
        missing, extra = sorted(want - got, key=str), sorted(got - want, key=str)
    else:
        missing = sorted((Counter(want) - Counter(got)).elements(), key=str)
        extra = sorted((Counter(got) - Counter(want)).elements(), key=str)
    return f"{label}: expected {len(want)}, got {len(got)}; missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})"


def _full(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    names = {k for k, _ in params}
    extra = [] if "_count" in names or "_summary" in names else [("_count", "1000")]
    return params + extra + ([] if "_summary" in names else [("_total", "accurate")])


def _describe(expect: Expect) -> str:
    return f"{expect.res_type}?" + "&".join(f"{k}={v}" for k, v in expect.params)


@pytest.mark.parametrize("name", list(CASES))
def test_search_matches_oracle(name: str, data: Data) -> None:
    expect = CASES[name](data)
    found = search_all(data.base, expect.res_type, _full(expect.params))
    query = _describe(expect)
    if expect.summary_count is not None:
        assert found.matches == [] and found.total == expect.summary_count, query
        return
    got_ids = [r["id"] for r in found.matches]
    assert len(got_ids) == len(set(got_ids)), f"{query}: duplicate matches across pages"
    if expect.ids is not None:
        assert set(got_ids) == expect.ids, _diff(query, set(got_ids), expect.ids)
    if expect.keys is not None:
        assert expect.key is not None
        got = Counter(expect.key(r) for r in found.matches)
        assert got == Counter(expect.keys), _diff(query, got, Counter(expect.keys))
    assert found.total == len(found.matches), f"{query}: total {found.total} != {len(found.matches)} matches"
    if expect.included is not None:
        got_inc = {f"{r['resourceType']}/{r['id']}" for r in found.included}
        assert got_inc == expect.included, _diff(f"{query} (included)", got_inc, expect.included)
    if expect.included_keys is not None:
        assert expect.key is not None
        got = Counter(expect.key(r) for r in found.included)
        assert got == Counter(expect.included_keys), _diff(
            f"{query} (included)", got, Counter(expect.included_keys)
        )
    if expect.order is not None:
        keys = [expect.order(r) for r in found.matches]
        wanted = sorted(keys, reverse=expect.descending)
        assert keys == wanted, f"{query}: matches are not sorted ({'desc' if expect.descending else 'asc'})"


def test_cases_are_many_and_meaningful(data: Data) -> None:
    """The oracle itself: enough cases, and most select something (an empty oracle proves little)."""
    assert len(CASES) >= 30
    empty = [n for n, build in CASES.items() if (e := build(data)).ids is not None and not e.ids]
    assert sorted(empty) == sorted(
        [
            "token_bar_code_means_no_system",
            "token_text_wildcard_is_literal",
            "string_exact_is_case_and_accent_sensitive",
            "string_contains_wildcard_is_literal",
        ]
    ), empty
