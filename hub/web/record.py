"""One citizen's integrated record as a view model: what the clinician's record page and the
patient portal show, built from the FHIR resources (plain dicts) the reader may see.

Owns: ``build_record`` (header, timeline of encounters with their diagnoses, procedures,
results and notes, lab and vital-sign trends with reference ranges, immunisations, care plans,
documents, imaging studies), ``consent_lines`` (why THIS clinician may see the record, as
structured lines the templates turn into words) and ``fetch_record`` (the requests a page
makes through its ``FhirHandle``: one ``$everything`` of the page's types; for a record too big
for one page, the types without Observations plus the newest Observations, capped).
Calls: the standard library and orjson; ``fetch_record`` calls the page's FHIR handle (the
router: access decision, consent filter, audit).
Called by: ``hub.web.views.clinician`` (record page) and the portal's pages.

The model is locale-free: times stay FHIR strings, numbers stay numbers, codes stay codes
(``sex`` is ``female``...); the templates format and translate them. Whatever the reader may
not see never reaches this module (the router filtered it), so there is nothing to hide here.
Every builder tolerates missing or odd fields (Synthea, the QĐ 130 and HL7 v2 connectors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

import orjson

CCCD_SYSTEM = "https://ehealth-hub.vn/sid/cccd"
BHYT_SYSTEM = "https://ehealth-hub.vn/sid/bhyt"
LOINC = "http://loinc.org"

# The types the record page shows, fetched with $everything (Observations apart: they can be
# many, so they come from a search newest first with a cap).
RECORD_TYPES = (
    "Patient",
    "Encounter",
    "Condition",
    "Procedure",
    "DiagnosticReport",
    "AllergyIntolerance",
    "MedicationRequest",
    "MedicationStatement",
    "Immunization",
    "CarePlan",
    "CareTeam",
    "DocumentReference",
    "Composition",
    "ClinicalImpression",
    "ImagingStudy",
    "Consent",
    "Organization",
    "Practitioner",
)
# Newest Observations the page reads (trends and encounter results); older ones are left out
# and the page says so. A Synthea patient has 40-90; a chronic patient over years a few hundred.
OBSERVATION_CAP = 500
# Points kept per trend series (the newest): a chart of more is unreadable anyway.
POINTS_CAP = 100
_RECORD_CAP = 1000  # the router's max _count

_ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
_VOID = frozenset({"entered-in-error", "refuted"})
_CURRENT_MEDICATION = frozenset({"active", "on-hold", "intended"})
_VITAL_CATEGORY = "vital-signs"
_LAB_CATEGORY = "laboratory"


# --------------------------------------------------------------------------- small readers


def concept_text(concept: Any) -> str:
    """A CodeableConcept as text: its text, else the first coding's display, else its code."""
    if not isinstance(concept, Mapping):
        return ""
    text = concept.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    for coding in _dicts(concept.get("coding")):
        display = coding.get("display")
        if isinstance(display, str) and display.strip():
            return display.strip()
    for coding in _dicts(concept.get("coding")):
        code = coding.get("code")
        if isinstance(code, str) and code.strip():
            return code.strip()
    return ""


def concepts_text(concepts: Any) -> list[str]:
    """A list of CodeableConcepts as their texts, empty ones dropped."""
    return [text for text in (concept_text(c) for c in _dicts(concepts)) if text]


def human_name(names: Any) -> str:
    """The official (else first) HumanName as text; Vietnamese order (family first) when built
    from parts, as the connectors write ``family`` = họ and ``given`` = tên đệm + tên."""
    candidates = _dicts(names)
    if not candidates:
        return ""
    chosen = next((n for n in candidates if n.get("use") == "official"), None)
    chosen = chosen or next((n for n in candidates if n.get("use") != "old"), candidates[0])
    text = chosen.get("text")
    if isinstance(text, str) and text.strip():
        return " ".join(text.split())
    parts: list[str] = []
    family = chosen.get("family")
    if isinstance(family, str):
        parts.append(family)
    parts.extend(g for g in _list(chosen.get("given")) if isinstance(g, str))
    return " ".join(" ".join(parts).split())


def address_text(addresses: Any) -> str:
    """The home (else first) Address as one line: its text, else line, city, district, state."""
    candidates = _dicts(addresses)
    if not candidates:
        return ""
    chosen = next((a for a in candidates if a.get("use") == "home"), candidates[0])
    text = chosen.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    parts = [str(p) for p in _list(chosen.get("line")) if isinstance(p, str) and p.strip()]
    for key in ("city", "district", "state"):
        value = chosen.get(key)
        if isinstance(value, str) and value.strip():
            parts.append(value.strip())
    return ", ".join(parts)


def identifier_value(resource: Mapping[str, Any], system: str) -> str:
    """The value of the resource's first identifier of ``system`` ("" when none)."""
    for identifier in _dicts(resource.get("identifier")):
        if identifier.get("system") == system and isinstance(identifier.get("value"), str):
            return str(identifier["value"])
    return ""


def ref_key(reference: Any) -> str:
    """A Reference's literal target as ``Type/id`` ("" for none, contained or absolute ones
    are cut to their last two segments so ``http://x/fhir/Organization/a`` matches)."""
    if not isinstance(reference, Mapping):
        return ""
    value = reference.get("reference")
    if not isinstance(value, str) or not value or value.startswith("#"):
        return ""
    parts = value.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else ""


def age_on(birth_date: str, today: date) -> int | None:
    """Whole years between a FHIR birthDate (``yyyy``, ``yyyy-mm`` or ``yyyy-mm-dd``) and today."""
    try:
        pieces = [int(p) for p in birth_date[:10].split("-")]
    except (TypeError, ValueError):
        return None
    if not pieces or pieces[0] < 1800:
        return None
    year, month, day = (pieces + [1, 1])[:3]
    years = today.year - year - ((today.month, today.day) < (month, day))
    return years if years >= 0 else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in _list(value) if isinstance(v, Mapping)]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _when(resource: Mapping[str, Any], *keys: str) -> str:
    """The first of ``keys`` that holds a dateTime, or a Period's start (``xxxPeriod``)."""
    for key in keys:
        value = resource.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, Mapping):
            start = value.get("start") or value.get("end")
            if isinstance(start, str) and start:
                return start
    return ""


def _code_key(concept: Any) -> tuple[str, str]:
    """(system, code) of the concept's LOINC coding, else its first coding; text as last resort."""
    codings = _dicts(concept.get("coding")) if isinstance(concept, Mapping) else []
    for coding in codings:
        if coding.get("system") == LOINC and _str(coding.get("code")):
            return LOINC, str(coding["code"])
    for coding in codings:
        if _str(coding.get("code")):
            return _str(coding.get("system")), str(coding["code"])
    return "", concept_text(concept).lower()


# --------------------------------------------------------------------------- the view model


@dataclass
class Quantity:
    """A measured value: number and unit, or a text value (``value`` None)."""

    value: float | None
    unit: str = ""
    text: str = ""
    label: str = ""  # the component's name (systolic...) when the value is one of several


@dataclass
class Entry:
    """One item of the record: a diagnosis, procedure, result, medication, note, document..."""

    kind: str  # diagnosis | procedure | result | report | medication | immunization | note | document
    resource_type: str
    id: str
    text: str
    when: str = ""
    status: str = ""
    detail: str = ""  # secondary text (a report's conclusion, a document's description)
    values: list[Quantity] = field(default_factory=list)
    interpretation: str = ""
    narrative: Mapping[str, Any] | None = None  # Narrative; shown only through |narrative
    attachments: list[str] = field(default_factory=list)  # attachment titles (never rendered)


@dataclass
class EncounterView:
    """One encounter of the timeline, with what happened in it."""

    id: str
    start: str
    end: str
    facility: str  # the serviceProvider's name ("" when unknown)
    facility_id: str
    class_code: str
    class_text: str
    types: list[str]
    reasons: list[str]
    status: str
    items: list[Entry] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Entry]:
        return [item for item in self.items if item.kind in kinds]


@dataclass
class Point:
    time: str
    value: float


@dataclass
class Series:
    key: str  # the (component) code
    label: str
    unit: str
    points: list[Point] = field(default_factory=list)
    low: float | None = None
    high: float | None = None


@dataclass
class Trend:
    """One chart: a code measured over time, one series (or several: blood pressure)."""

    key: str  # system|code, also the chart's HTML id stem
    label: str
    category: str  # vital-signs | laboratory | other
    series: list[Series] = field(default_factory=list)
    truncated: bool = False  # older points than the newest POINTS_CAP of a series left out

    @property
    def times(self) -> list[str]:
        """Every time of any series, ascending: the rows of the chart's table."""
        return sorted({p.time for s in self.series for p in s.points})

    @property
    def rows(self) -> list[tuple[str, list[float | None]]]:
        """The chart's table: one row per time, one value (or None) per series."""
        by_time = [{p.time: p.value for p in s.points} for s in self.series]
        return [(time, [values.get(time) for values in by_time]) for time in self.times]

    @property
    def has_range(self) -> bool:
        return any(s.low is not None or s.high is not None for s in self.series)


@dataclass
class Header:
    patient_id: str
    name: str
    birth_date: str
    age: int | None
    sex: str  # administrative gender code
    cccd: str
    bhyt: str
    address: str
    phone: str
    deceased: bool
    managing_facility: str
    managing_facility_id: str
    family_doctors: list[str]
    allergies: list[Entry]
    problems: list[Entry]
    medications: list[Entry]


@dataclass
class RecordView:
    header: Header
    timeline: list[EncounterView]
    unlinked: list[Entry]  # diagnoses, procedures, results of no (visible) encounter
    trends: list[Trend]
    immunizations: list[Entry]
    care_plans: list[Entry]
    documents: list[Entry]
    imaging: list[Entry]
    facilities: list[str]  # distinct facilities of the timeline, in timeline order
    observations_capped: bool = False  # older Observations were not read

    @property
    def facility_count(self) -> int:
        return len(self.facilities)


# --------------------------------------------------------------------------- builders


def _name_of(
    ref: Any, organizations: Mapping[str, Mapping[str, Any]], practitioners: Mapping[str, Any]
) -> str:
    """The name of the Organization or Practitioner a Reference names, else its display."""
    key = ref_key(ref)
    kind, _, rid = key.partition("/")
    if kind == "Organization" and rid in organizations:
        name = _str(organizations[rid].get("name"))
        if name:
            return name
    if kind == "Practitioner" and rid in practitioners:
        name = human_name(practitioners[rid].get("name"))
        if name:
            return name
    return _str(ref.get("display")) if isinstance(ref, Mapping) else ""


def _quantity(holder: Mapping[str, Any], label: str = "") -> Quantity | None:
    """The value[x] of an Observation or component as a Quantity (None when it has none)."""
    q = holder.get("valueQuantity")
    if isinstance(q, Mapping):
        number = _number(q.get("value"))
        unit = _str(q.get("unit")) or _str(q.get("code"))
        if number is not None:
            return Quantity(number, unit, label=label)
    for key in ("valueInteger", "valueDecimal"):
        number = _number(holder.get(key))
        if number is not None:
            return Quantity(number, label=label)
    if isinstance(holder.get("valueCodeableConcept"), Mapping):
        return Quantity(None, text=concept_text(holder["valueCodeableConcept"]), label=label)
    for key in ("valueString", "valueBoolean", "valueDateTime", "valueTime"):
        value = holder.get(key)
        if isinstance(value, (str, bool)):
            return Quantity(None, text=str(value).lower() if isinstance(value, bool) else value, label=label)
    return None


def _observation_entry(obs: Mapping[str, Any]) -> Entry:
    values: list[Quantity] = []
    own = _quantity(obs)
    if own:
        values.append(own)
    for component in _dicts(obs.get("component")):
        value = _quantity(component, concept_text(component.get("code")))
        if value:
            values.append(value)
    return Entry(
        "result",
        "Observation",
        _str(obs.get("id")),
        concept_text(obs.get("code")),
        when=_when(obs, "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"),
        status=_str(obs.get("status")),
        values=values,
        interpretation=", ".join(concepts_text(obs.get("interpretation"))),
    )


def _entry(resource: Mapping[str, Any]) -> Entry | None:
    """The Entry of a resource the timeline or the lists show (None for other types)."""
    kind = resource.get("resourceType")
    rid = _str(resource.get("id"))
    status = _str(resource.get("status"))
    if kind == "Condition":
        clinical = concept_text(resource.get("clinicalStatus"))
        return Entry(
            "diagnosis",
            kind,
            rid,
            concept_text(resource.get("code")),
            when=_when(resource, "onsetDateTime", "onsetPeriod", "recordedDate"),
            status=clinical,
        )
    if kind == "Procedure":
        return Entry(
            "procedure",
            kind,
            rid,
            concept_text(resource.get("code")),
            when=_when(resource, "performedDateTime", "performedPeriod"),
            status=status,
        )
    if kind == "Observation":
        return _observation_entry(resource)
    if kind == "DiagnosticReport":
        return Entry(
            "report",
            kind,
            rid,
            concept_text(resource.get("code")),
            when=_when(resource, "effectiveDateTime", "effectivePeriod", "issued"),
            status=status,
            detail=_str(resource.get("conclusion"))
            or ", ".join(concepts_text(resource.get("conclusionCode"))),
            attachments=[
                _str(a.get("title")) for a in _dicts(resource.get("presentedForm")) if a.get("title")
            ],
        )
    if kind in ("MedicationRequest", "MedicationStatement"):
        medication = concept_text(resource.get("medicationCodeableConcept"))
        if not medication and isinstance(resource.get("medicationReference"), Mapping):
            medication = _str(resource["medicationReference"].get("display"))
        dosage = next((_str(d.get("text")) for d in _dicts(resource.get("dosageInstruction"))), "")
        dosage = dosage or next((_str(d.get("text")) for d in _dicts(resource.get("dosage"))), "")
        return Entry(
            "medication",
            kind,
            rid,
            medication,
            when=_when(resource, "authoredOn", "effectiveDateTime", "effectivePeriod", "dateAsserted"),
            status=status,
            detail=dosage,
        )
    if kind == "Immunization":
        return Entry(
            "immunization",
            kind,
            rid,
            concept_text(resource.get("vaccineCode")),
            when=_when(resource, "occurrenceDateTime", "recorded"),
            status=status,
            detail=_str(resource.get("lotNumber")),
        )
    if kind == "AllergyIntolerance":
        reactions = [
            text for r in _dicts(resource.get("reaction")) for text in concepts_text(r.get("manifestation"))
        ]
        return Entry(
            "allergy",
            kind,
            rid,
            concept_text(resource.get("code")),
            when=_when(resource, "onsetDateTime", "recordedDate"),
            status=_str(resource.get("criticality")),
            detail=", ".join(reactions),
        )
    if kind == "CarePlan":
        title = _str(resource.get("title")) or ", ".join(concepts_text(resource.get("category")))
        return Entry(
            "care-plan",
            kind,
            rid,
            title,
            when=_when(resource, "period", "created"),
            status=status,
            detail=_str(resource.get("description")),
            narrative=_narrative(resource),
        )
    if kind == "DocumentReference":
        attachments = [
            _str(c["attachment"].get("title"))
            for c in _dicts(resource.get("content"))
            if isinstance(c.get("attachment"), Mapping) and _str(c["attachment"].get("title"))
        ]
        text = _str(resource.get("description")) or concept_text(resource.get("type"))
        return Entry(
            "document",
            kind,
            rid,
            text or (attachments[0] if attachments else ""),
            when=_str(resource.get("date")) or _when(resource.get("context") or {}, "period"),
            status=_str(resource.get("docStatus")) or status,
            detail=concept_text(resource.get("type")) if text != concept_text(resource.get("type")) else "",
            attachments=attachments,
        )
    if kind == "Composition":
        return Entry(
            "document",
            kind,
            rid,
            _str(resource.get("title")) or concept_text(resource.get("type")),
            when=_str(resource.get("date")),
            status=status,
            narrative=_narrative(resource),
        )
    if kind == "ClinicalImpression":
        return Entry(
            "note",
            kind,
            rid,
            _str(resource.get("description")) or concept_text(resource.get("code")),
            when=_when(resource, "effectiveDateTime", "effectivePeriod", "date"),
            status=status,
            detail=_str(resource.get("summary")),
        )
    if kind == "ImagingStudy":
        modalities = [
            _str(m.get("code")) for m in _dicts(resource.get("modality")) if _str(m.get("code"))
        ] or sorted(
            {
                _str(s["modality"].get("code"))
                for s in _dicts(resource.get("series"))
                if isinstance(s.get("modality"), Mapping) and _str(s["modality"].get("code"))
            }
        )
        text = (
            _str(resource.get("description"))
            or ", ".join(concepts_text(resource.get("procedureCode")))
            or ", ".join(
                _str(s.get("description")) for s in _dicts(resource.get("series")) if s.get("description")
            )
        )
        series = _number(resource.get("numberOfSeries"))
        instances = _number(resource.get("numberOfInstances"))
        return Entry(
            "imaging",
            kind,
            rid,
            text,
            when=_str(resource.get("started")),
            status=status,
            detail=" ".join(modalities),
            values=[
                Quantity(
                    series if series is not None else float(len(_dicts(resource.get("series")))), "series"
                ),
                *([Quantity(instances, "instances")] if instances is not None else []),
            ],
        )
    return None


def _narrative(resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
    text = resource.get("text")
    if isinstance(text, Mapping) and isinstance(text.get("div"), str) and text.get("status") != "empty":
        return text
    return None


def _encounter_refs(resource: Mapping[str, Any]) -> list[str]:
    """The Encounter ids a resource belongs to (``encounter``, ``context``)."""
    kind = resource.get("resourceType")
    refs: list[Any] = [resource.get("encounter")]
    if kind == "DocumentReference" and isinstance(resource.get("context"), Mapping):
        refs.extend(_list(resource["context"].get("encounter")))
    if kind in ("MedicationStatement", "ClinicalImpression"):
        refs.append(resource.get("context"))
    out: list[str] = []
    for ref in refs:
        key = ref_key(ref)
        if key.startswith("Encounter/"):
            out.append(key.partition("/")[2])
    return out


def _is_void(resource: Mapping[str, Any]) -> bool:
    verification = resource.get("verificationStatus")
    codes = (
        {_str(c.get("code")) for c in _dicts(verification.get("coding"))}
        if isinstance(verification, Mapping)
        else set()
    )
    return bool(codes & _VOID) or resource.get("status") == "entered-in-error"


def _clinical_active(resource: Mapping[str, Any]) -> bool:
    """A Condition or AllergyIntolerance in force: clinicalStatus active (or absent with no
    abatement: many feeds leave it out) and not refuted or entered in error."""
    if _is_void(resource):
        return False
    clinical = resource.get("clinicalStatus")
    codes = (
        {_str(c.get("code")) for c in _dicts(clinical.get("coding"))}
        if isinstance(clinical, Mapping)
        else set()
    )
    if codes:
        return bool(codes & _ACTIVE_CLINICAL)
    return not any(key.startswith("abatement") for key in resource)


def _category(obs: Mapping[str, Any]) -> str:
    codes = {_str(c.get("code")) for cat in _dicts(obs.get("category")) for c in _dicts(cat.get("coding"))}
    if _VITAL_CATEGORY in codes:
        return _VITAL_CATEGORY
    if _LAB_CATEGORY in codes:
        return _LAB_CATEGORY
    return "other"


def _range(holder: Mapping[str, Any]) -> tuple[float | None, float | None]:
    for ref in _dicts(holder.get("referenceRange")):
        low = ref.get("low")
        high = ref.get("high")
        low_value = _number(low.get("value")) if isinstance(low, Mapping) else None
        high_value = _number(high.get("value")) if isinstance(high, Mapping) else None
        if low_value is not None or high_value is not None:
            return low_value, high_value
    return None, None


def _numeric(holder: Mapping[str, Any]) -> tuple[float, str] | None:
    q = _quantity(holder)
    if q is None or q.value is None:
        return None
    return q.value, q.unit


def build_trends(observations: Iterable[Mapping[str, Any]]) -> list[Trend]:
    """Numeric Observations grouped by code into charts: one series for a plain value, one per
    numeric component (blood pressure: systolic 8480-6 and diastolic 8462-4). Reference range
    from the newest point that has one. Vital signs first, then laboratory, then the rest."""
    trends: dict[str, Trend] = {}
    newest_range: dict[tuple[str, str], str] = {}  # (trend, series) -> time of the range kept
    for obs in observations:
        if _is_void(obs) or obs.get("status") in ("cancelled",):
            continue
        time = _when(obs, "effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued")
        if not time:
            continue
        system, code = _code_key(obs.get("code"))
        if not code:
            continue
        parts: list[tuple[str, str, Mapping[str, Any]]] = []
        if _numeric(obs) is not None:
            parts.append((code, concept_text(obs.get("code")), obs))
        for component in _dicts(obs.get("component")):
            if _numeric(component) is not None:
                _, component_code = _code_key(component.get("code"))
                if component_code:
                    parts.append(
                        (component_code, concept_text(component.get("code")) or component_code, component)
                    )
        if not parts:
            continue
        key = f"{system}|{code}"
        trend = trends.get(key)
        if trend is None:
            trend = trends[key] = Trend(key, concept_text(obs.get("code")) or code, _category(obs))
        for series_key, label, holder in parts:
            series = next((s for s in trend.series if s.key == series_key), None)
            value, unit = _numeric(holder) or (0.0, "")
            if series is None:
                series = Series(series_key, label, unit)
                trend.series.append(series)
            series.unit = series.unit or unit
            series.points.append(Point(time, value))
            low, high = _range(holder)
            if (low is not None or high is not None) and time >= newest_range.get((key, series_key), ""):
                newest_range[(key, series_key)] = time
                series.low, series.high = low, high
    order = {_VITAL_CATEGORY: 0, _LAB_CATEGORY: 1}
    out = sorted(trends.values(), key=lambda t: (order.get(t.category, 2), t.label.lower()))
    for trend in out:
        for series in trend.series:
            series.points.sort(key=lambda p: p.time)
            if len(series.points) > POINTS_CAP:
                trend.truncated = True
                del series.points[:-POINTS_CAP]
    return out


def build_record(
    patient: Mapping[str, Any],
    resources: Iterable[Mapping[str, Any]],
    organizations: Mapping[str, Mapping[str, Any]],
    practitioners: Mapping[str, Mapping[str, Any]],
    *,
    today: date | None = None,
    observations_capped: bool = False,
) -> RecordView:
    """The record view of ``patient`` from the resources of their record the reader may see.

    ``organizations`` and ``practitioners`` map ids to the resources references name (those
    absent show the Reference's display, or nothing). One pass over the resources, then one
    per encounter: O(resources)."""
    today = today or date.today()
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for resource in resources:
        kind = resource.get("resourceType")
        if isinstance(kind, str):
            by_type.setdefault(kind, []).append(resource)

    def named(ref: Any) -> str:
        return _name_of(ref, organizations, practitioners)

    # Timeline: encounters newest first; what names an encounter joins it.
    encounters: dict[str, EncounterView] = {}
    for enc in by_type.get("Encounter", []):
        if _is_void(enc) or not _str(enc.get("id")):
            continue
        cls = enc.get("class")
        period = enc.get("period") if isinstance(enc.get("period"), Mapping) else {}
        assert isinstance(period, Mapping)
        provider = enc.get("serviceProvider")
        encounters[str(enc["id"])] = EncounterView(
            id=str(enc["id"]),
            start=_str(period.get("start")),
            end=_str(period.get("end")),
            facility=named(provider),
            facility_id=ref_key(provider).partition("/")[2]
            if ref_key(provider).startswith("Organization/")
            else "",
            class_code=_str(cls.get("code")) if isinstance(cls, Mapping) else "",
            class_text=(_str(cls.get("display")) or _str(cls.get("code")))
            if isinstance(cls, Mapping)
            else "",
            types=concepts_text(enc.get("type")),
            reasons=concepts_text(enc.get("reasonCode")),
            status=_str(enc.get("status")),
        )
    conditions = {str(c.get("id")): c for c in by_type.get("Condition", []) if not _is_void(c)}
    placed: set[tuple[str, str]] = set()
    for enc in by_type.get("Encounter", []):
        view = encounters.get(_str(enc.get("id")))
        if view is None:
            continue
        for diagnosis in _dicts(enc.get("diagnosis")):
            key = ref_key(diagnosis.get("condition"))
            cid = key.partition("/")[2] if key.startswith("Condition/") else ""
            if cid in conditions and ("Condition", cid) not in placed:
                entry = _entry(conditions[cid])
                if entry:
                    view.items.append(entry)
                    placed.add(("Condition", cid))

    unlinked: list[Entry] = []
    joinable = (
        "Condition",
        "Procedure",
        "Observation",
        "DiagnosticReport",
        "MedicationRequest",
        "Immunization",
        "DocumentReference",
        "Composition",
        "ClinicalImpression",
    )
    for kind in joinable:
        for resource in by_type.get(kind, []):
            rid = _str(resource.get("id"))
            if (kind, rid) in placed or _is_void(resource):
                continue
            entry = _entry(resource)
            if entry is None:
                continue
            targets = [encounters[e] for e in _encounter_refs(resource) if e in encounters]
            for view in targets[:1]:
                view.items.append(entry)
                placed.add((kind, rid))
            if not targets and kind in ("Condition", "Procedure", "DiagnosticReport", "ClinicalImpression"):
                unlinked.append(entry)
    timeline = sorted(encounters.values(), key=lambda e: e.start or "", reverse=True)
    for view in timeline:
        view.items.sort(key=lambda e: e.when)
    unlinked.sort(key=lambda e: e.when, reverse=True)
    facilities: list[str] = []
    for view in timeline:
        if view.facility and view.facility not in facilities:
            facilities.append(view.facility)

    def listed(kind: str, *, newest_first: bool = True) -> list[Entry]:
        entries = [e for r in by_type.get(kind, []) if not _is_void(r) for e in [_entry(r)] if e is not None]
        return sorted(entries, key=lambda e: e.when, reverse=newest_first)

    problems = [e for c in conditions.values() if _clinical_active(c) for e in [_entry(c)] if e]
    allergies = [
        e for a in by_type.get("AllergyIntolerance", []) if _clinical_active(a) for e in [_entry(a)] if e
    ]
    medications = [
        e
        for kind in ("MedicationRequest", "MedicationStatement")
        for m in by_type.get(kind, [])
        if m.get("status") in _CURRENT_MEDICATION
        for e in [_entry(m)]
        if e
    ]
    managing = patient.get("managingOrganization")
    managing_key = ref_key(managing)
    header = Header(
        patient_id=_str(patient.get("id")),
        name=human_name(patient.get("name")),
        birth_date=_str(patient.get("birthDate")),
        age=age_on(_str(patient.get("birthDate")), today) if patient.get("birthDate") else None,
        sex=_str(patient.get("gender")),
        cccd=identifier_value(patient, CCCD_SYSTEM),
        bhyt=identifier_value(patient, BHYT_SYSTEM),
        address=address_text(patient.get("address")),
        phone=next(
            (_str(t.get("value")) for t in _dicts(patient.get("telecom")) if t.get("system") == "phone"), ""
        ),
        deceased=bool(patient.get("deceasedBoolean") or patient.get("deceasedDateTime")),
        managing_facility=named(managing),
        managing_facility_id=managing_key.partition("/")[2]
        if managing_key.startswith("Organization/")
        else "",
        family_doctors=[n for n in (named(g) for g in _dicts(patient.get("generalPractitioner"))) if n],
        allergies=sorted(allergies, key=lambda e: e.text.lower()),
        problems=sorted(problems, key=lambda e: e.when, reverse=True),
        medications=sorted(medications, key=lambda e: e.when, reverse=True),
    )
    documents = listed("DocumentReference") + listed("Composition")
    documents.sort(key=lambda e: e.when, reverse=True)
    return RecordView(
        header=header,
        timeline=timeline,
        unlinked=unlinked,
        trends=build_trends(by_type.get("Observation", [])),
        immunizations=listed("Immunization"),
        care_plans=listed("CarePlan"),
        documents=documents,
        imaging=listed("ImagingStudy"),
        facilities=facilities,
        observations_capped=observations_capped,
    )


# --------------------------------------------------------------------------- consent in words


@dataclass
class ConsentLine:
    """One reason the reader may (or may not) see the record, for the page to say in words.

    ``basis``: ``managing`` (the patient's managing facility is the reader's), ``gp`` (the
    reader is the family doctor), ``care-team`` (on an active CareTeam), ``consent-permit``,
    ``consent-deny``. ``actor`` is who it names (a facility, a person, "" = anyone)."""

    basis: str
    actor: str
    purposes: list[str] = field(default_factory=list)  # v3 ActReason codes; [] = any purpose
    labels: list[str] = field(default_factory=list)  # security labels; [] = ordinary data
    start: str = ""
    end: str = ""
    consent_id: str = ""
    ref: str = ""  # the policy line's Organization, Practitioner or CareTeam reference


def consent_lines(
    patient: Mapping[str, Any],
    resources: Iterable[Mapping[str, Any]],
    organizations: Mapping[str, Mapping[str, Any]],
    practitioners: Mapping[str, Mapping[str, Any]],
    *,
    reader_practitioner: str,
    reader_organizations: Iterable[str],
    today: date | None = None,
) -> list[ConsentLine]:
    """Why the reader (``Practitioner/x`` and organization ids) may see this record: the default
    policy reasons (docs/access.md §2) and the active Consents in force today that name the
    reader, one of their organizations, a care team they are on, or anyone."""
    today_text = (today or date.today()).isoformat()
    orgs = {f"Organization/{o}" for o in reader_organizations}
    mine = set(orgs) | ({reader_practitioner} if reader_practitioner else set())
    lines: list[ConsentLine] = []

    def named(ref: Any) -> str:
        return _name_of(ref, organizations, practitioners)

    managing = patient.get("managingOrganization")
    if ref_key(managing) in orgs:
        lines.append(ConsentLine("managing", named(managing), ["TREAT"], ref=ref_key(managing)))
    for gp in _dicts(patient.get("generalPractitioner")):
        if ref_key(gp) in mine:
            lines.append(ConsentLine("gp", named(gp), ["TREAT"], ref=ref_key(gp)))
    teams: set[str] = set()
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for resource in resources:
        by_type.setdefault(_str(resource.get("resourceType")), []).append(resource)
    for team in by_type.get("CareTeam", []):
        if team.get("status") not in (None, "active"):
            continue
        members = {ref_key(p.get("member")) for p in _dicts(team.get("participant"))}
        members |= {ref_key(o) for o in _dicts(team.get("managingOrganization"))}
        if members & mine:
            team_ref = f"CareTeam/{_str(team.get('id'))}"
            teams.add(team_ref)
            lines.append(ConsentLine("care-team", _str(team.get("name")), ["TREAT"], ref=team_ref))
    for consent in by_type.get("Consent", []):
        if consent.get("status") != "active":
            continue
        provision = consent.get("provision")
        if not isinstance(provision, Mapping):
            continue
        _consent_provision(consent, provision, mine | teams, named, today_text, lines, ("", ""))
    return lines


def _consent_provision(
    consent: Mapping[str, Any],
    provision: Mapping[str, Any],
    mine: set[str],
    named: Any,
    today: str,
    lines: list[ConsentLine],
    inherited: tuple[str, str],
) -> None:
    period = provision.get("period") if isinstance(provision.get("period"), Mapping) else {}
    assert isinstance(period, Mapping)
    start = _str(period.get("start")) or inherited[0]
    end = _str(period.get("end")) or inherited[1]
    in_force = (not start or start[:10] <= today) and (not end or end[:10] >= today)
    actors = [a.get("reference") for a in _dicts(provision.get("actor"))]
    refs = [ref_key(a) for a in actors]
    if in_force and (not refs or set(refs) & mine):
        who = next((named(a) for a, k in zip(actors, refs, strict=True) if k in mine), "")
        kind = "consent-deny" if provision.get("type") == "deny" else "consent-permit"
        purposes = [_str(p.get("code")) for p in _dicts(provision.get("purpose")) if _str(p.get("code"))]
        labels = [_str(s.get("code")) for s in _dicts(provision.get("securityLabel")) if _str(s.get("code"))]
        lines.append(ConsentLine(kind, who, purposes, labels, start, end, _str(consent.get("id"))))
    for nested in _dicts(provision.get("provision")):
        _consent_provision(consent, nested, mine, named, today, lines, (start, end))


# --------------------------------------------------------------------------- fetching


class _Response(Protocol):
    status: int
    body: bytes


class FhirReader(Protocol):
    """What ``fetch_record`` needs of ``hub.web.fhir_handle.FhirHandle``."""

    def request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] = ...,
        body: dict[str, Any] | None = ...,
        headers: dict[str, str] | None = ...,
    ) -> Any: ...

    def search_resources(self, type_: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]: ...


@dataclass
class Fetched:
    """What the router let the reader see of one patient's record (``patient`` None: not
    found or hidden: the same answer)."""

    patient: dict[str, Any] | None
    resources: list[dict[str, Any]]
    organizations: dict[str, dict[str, Any]]
    practitioners: dict[str, dict[str, Any]]
    observations_capped: bool
    status: int


def fetch_record(fhir: FhirReader, patient_id: str, headers: dict[str, str] | None = None) -> Fetched:
    """The record the reader may see, in ONE audited request for a typical patient:
    ``Patient/{id}/$everything`` for the page's types (the referenced Organizations and
    Practitioners come with it). Measured on PostgreSQL with the demo patient (147 resources):
    one $everything with Observations 73 ms p50 against 45 + 75 ms for $everything without them
    plus a sorted Observation search. A record of more than ``_RECORD_CAP`` resources does not
    fit one page (its types are in name order, so some would be missing): then it is read again
    as the page's types without Observations plus the newest ``OBSERVATION_CAP`` Observations
    (older ones left out, ``observations_capped``). Names a reference needs that were not in
    the answer are read with one ``_id`` search per type. ``headers``: break-glass reason."""
    types = list(RECORD_TYPES)
    answer = _everything(fhir, patient_id, [*types, "Observation"], headers)
    if answer is None:
        return Fetched(None, [], {}, {}, False, 404)
    resources, more = answer
    capped = False
    if more:
        again = _everything(fhir, patient_id, types, headers)
        if again is None:
            return Fetched(None, [], {}, {}, False, 404)
        resources, capped = again
        observations = fhir.request(
            "GET",
            "Observation",
            [("patient", patient_id), ("_sort", "-date"), ("_count", str(OBSERVATION_CAP))],
            None,
            headers,
        )
        capped = True
        if observations.status == 200:
            obs_bundle = orjson.loads(observations.body)
            resources.extend(
                e["resource"]
                for e in _dicts(obs_bundle.get("entry"))
                if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Observation"
            )
    patient = next(
        (r for r in resources if r.get("resourceType") == "Patient" and r.get("id") == patient_id), None
    )
    if patient is None:
        return Fetched(None, [], {}, {}, False, 404)
    organizations = {
        str(r["id"]): r for r in resources if r.get("resourceType") == "Organization" and r.get("id")
    }
    practitioners = {
        str(r["id"]): r for r in resources if r.get("resourceType") == "Practitioner" and r.get("id")
    }
    wanted = _referenced(patient, resources)
    for kind, known in (("Organization", organizations), ("Practitioner", practitioners)):
        missing = sorted(i for k, i in wanted if k == kind and i not in known)
        if missing:
            for found in fhir.search_resources(kind, [("_id", ",".join(missing[:100]))]):
                if found.get("resourceType") == kind and found.get("id"):
                    known[str(found["id"])] = found
    return Fetched(patient, resources, organizations, practitioners, capped, 200)


def _everything(
    fhir: FhirReader, patient_id: str, types: list[str], headers: dict[str, str] | None
) -> tuple[list[dict[str, Any]], bool] | None:
    """One page of ``$everything`` of these types: (resources, whether more pages follow);
    None when the patient is missing or hidden (one answer)."""
    answer = fhir.request(
        "GET",
        f"Patient/{patient_id}/$everything",
        [("_type", ",".join(types)), ("_count", str(_RECORD_CAP))],
        None,
        headers,
    )
    if answer.status != 200:
        return None
    bundle = orjson.loads(answer.body)  # the router's bytes: orjson parses a record 2-3x faster than json
    resources = [e["resource"] for e in _dicts(bundle.get("entry")) if isinstance(e.get("resource"), dict)]
    more = any(_str(link.get("relation")) == "next" for link in _dicts(bundle.get("link")))
    return resources, more


def _referenced(patient: Mapping[str, Any], resources: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """The Organizations and Practitioners the page names: managing facility, family doctors,
    encounters' facilities."""
    refs: list[Any] = [patient.get("managingOrganization"), *_list(patient.get("generalPractitioner"))]
    refs.extend(r.get("serviceProvider") for r in resources if r.get("resourceType") == "Encounter")
    out: set[tuple[str, str]] = set()
    for ref in refs:
        kind, _, rid = ref_key(ref).partition("/")
        if kind in ("Organization", "Practitioner") and rid:
            out.add((kind, rid))
    return out
