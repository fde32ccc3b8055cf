"""The "fhir" format: what a FHIR pull stores in the inbox, and how a stored page maps to FHIR.

Owns: the envelope of a pulled page (``page_envelope``: one searchset page; ``ndjson_envelope``:
one chunk of a Bulk ``$export`` file), ``FORMAT`` (peek and map), the types the hub refuses to
take from a facility (``SKIPPED``), the pull order of types (``pull_order``) and the rewriting of
the facility's references.
Calls: ``connectors.model``, ``connectors.identifiers``, the R4 JSON schema (``hub.validation``,
to know which types carry ``identifier``).
Called by: ``connectors.pipeline`` (``FORMAT.peek``/``FORMAT.map``), the poller
(``connectors.fhirpull.poller``) that builds the envelopes.

How a facility's resource lands in the hub, idempotently:

- a Patient becomes ``PatientFacts`` (``connectors.patients`` resolves it to the citizen's one
  record by CCCD, BHYT, then MRN); the facility's Patient id is kept as an MRN-like identifier
  ``facility_system("mrn", code)|<id>`` so that the next pull (and every reference to that
  Patient from a later page) finds the same record again;
- every other resource gets an identifier saying where it came from,
  ``facility_system("fhir-id", code)|<Type>/<id>``, and is written by a conditional PUT on it:
  pulling it again updates it in place, never duplicates it;
- references to the facility's ids become the placeholder of the same page when the target is on
  the page; a conditional reference by that identifier when the target's type is pulled
  *before* the referring one (``pull_order``, and the inbox processes a feed's pages in order);
  otherwise (a type pulled later, or not at all) a logical reference (``Reference.identifier``),
  which never fails for want of its target.

A facility speaks only for itself: identifiers in the hub's facility-scoped namespaces of
*another* facility (``https://ehealth-hub.vn/sid/<kind>/<other MA_CSKCB>``: its MRNs, filler
numbers...) are dropped from what is pulled, so that patient resolution and conditional updates
never match another facility's records by them; conditional references in the facility's
content (``Patient?identifier=...``) are not followed (they would be searched in the hub's whole
record), the reference is dropped and a warning kept.

One page is one ``Mapped`` (one transaction): a bad resource refuses its page, with its place.
"""

from __future__ import annotations

import re
import uuid
from functools import cache
from typing import Any
from urllib.parse import quote

import orjson

from connectors.identifiers import (
    BHXH,
    BHYT,
    CCCD,
    FACILITY_SCOPED_KINDS,
    facility_reference,
    facility_system,
)
from connectors.model import Mapped, PatientFacts, Peek, Rejected, Source

__all__ = [
    "FORMAT",
    "ORDERING_SYSTEM",
    "SKIPPED",
    "FhirFormat",
    "configured_types",
    "ndjson_envelope",
    "page_envelope",
    "pull_order",
]

# The ordering key of a pulled feed: pages of one source are processed in the order they were
# stored (a Patient page before the Encounter page that refers to its patients).
ORDERING_SYSTEM = "https://ehealth-hub.vn/sid/fhir-pull"

# Types the hub does not take from a facility, and why (kept as the page's warnings).
SKIPPED: dict[str, str] = {
    "AuditEvent": "the facility's own audit trail; the hub records its own",
    "Provenance": "the hub writes its own Provenance for every message it stores",
    "Consent": "consent to the hub is given to the hub under its own rules (docs/access.md); "
    "a facility's Consent would grant access here that nobody gave",
    "Subscription": "a facility's configuration",
    "Bundle": "a container, not data",
    "OperationOutcome": "not data",
    "Parameters": "not data",
    "Binary": "no identifier to make it idempotent",
}

# Types pulled first, in this order, so that the usual references point to a type pulled
# before (conditional references resolve: Observation.encounter, .basedOn; DiagnosticReport
# .result; MedicationDispense.authorizingPrescription); the rest follow in the order the
# source's settings list them. Where the arrow points back (Encounter.diagnosis -> Condition)
# the reference stays logical.
_FIRST = (
    "Patient",
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Encounter",
    "EpisodeOfCare",
    "Condition",
    "AllergyIntolerance",
    "Medication",
    "MedicationRequest",
    "ServiceRequest",
    "Specimen",
    "Procedure",
    "Observation",
    "DiagnosticReport",
    "ImagingStudy",
    "MedicationDispense",
    "MedicationAdministration",
    "MedicationStatement",
    "Immunization",
    "CarePlan",
    "DocumentReference",
    "Composition",
)
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_KEPT_META = ("security", "tag")  # consent labels travel; versions and sources are the hub's own
# A system of the hub's facility-scoped namespaces (identifiers.facility_system): kind, facility.
_SCOPED = re.compile(r"^https://ehealth-hub\.vn/sid/([a-z0-9-]+)/([0-9A-Za-z]{5})$")


def pull_order(resource_types: list[str]) -> list[str]:
    """The configured types in the order they are pulled (Patient always first)."""
    wanted = list(dict.fromkeys(["Patient", *resource_types]))
    first = [t for t in _FIRST if t in wanted]
    return first + [t for t in wanted if t not in first]


def configured_types(settings: dict[str, Any]) -> list[str]:
    """The types a source pulls: setting ``types``."""
    return list(settings.get("types") or [])


def page_envelope(url: str, resource_type: str, resources: list[dict[str, Any]], order: str) -> bytes:
    """The raw bytes stored for one searchset page. Only what the page says about the data is
    kept (not the Bundle's id, timestamp or links), so fetching the same page again after a
    restart gives the same bytes and the inbox keeps one row."""
    return orjson.dumps(
        {"kind": "page", "url": url, "type": resource_type, "order": order, "resources": resources},
        option=orjson.OPT_SORT_KEYS,
    )


def ndjson_envelope(resource_type: str, since: str | None, offset: int, lines: bytes, order: str) -> bytes:
    """The raw bytes stored for one chunk of a Bulk export file: the lines as received, named by
    type, ``_since`` and line offset (not by the job's URL, which changes at each kick-off)."""
    return orjson.dumps(
        {
            "kind": "ndjson",
            "type": resource_type,
            "since": since,
            "offset": offset,
            "order": order,
            "ndjson": lines.decode("utf-8"),
        },
        option=orjson.OPT_SORT_KEYS,
    )


@cache
def _identifier_shapes() -> dict[str, str]:
    """Each R4 type's ``identifier``: "array", "single" or absent (from the official schema)."""
    from hub.validation import _schema  # the schema the store validates with, loaded once

    definitions = _schema()["definitions"]
    shapes: dict[str, str] = {}
    for res_type in _schema()["x-resource-types"]:
        element = definitions[res_type]["properties"].get("identifier")
        if element is not None:
            shapes[res_type] = "array" if element.get("type") == "array" else "single"
    return shapes


def _control_id(url: str) -> str:
    if len(url) <= 200:
        return url
    return f"page:{uuid.uuid5(uuid.NAMESPACE_URL, url).hex}"


class FhirFormat:
    """``connectors.model.Format`` for pulled FHIR pages."""

    name = "fhir"

    def peek(self, raw: bytes) -> Peek:
        document = _load(raw)
        kind = document.get("kind")
        if kind == "page":
            return Peek("Bundle", _control_id(str(document.get("url", ""))), _order(document))
        if kind == "ndjson":
            control = f"ndjson:{document.get('type')}:{document.get('since') or '-'}:{document.get('offset')}"
            return Peek("NDJSON", control, _order(document))
        if document.get("resourceType") == "Bundle":  # a Bundle stored as it came (an upload)
            resources = _bundle_resources(document)
            self_link = next(
                (li.get("url") for li in document.get("link", []) if li.get("relation") == "self"), None
            )
            control = (
                self_link or f"bundle:{document.get('id') or uuid.uuid5(uuid.NAMESPACE_OID, raw.hex()).hex}"
            )
            return Peek("Bundle", _control_id(str(control)), _first_patient_key(resources))
        raise Rejected("neither a pulled page, an NDJSON chunk nor a Bundle", "kind")

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        document = _load(raw)
        peek = self.peek(raw)
        if document.get("kind") == "ndjson":
            resources = _ndjson_resources(str(document.get("ndjson", "")))
        elif document.get("kind") == "page":
            resources = [r for r in document.get("resources", []) if isinstance(r, dict)]
        else:
            resources = _bundle_resources(document)
        page_type = document.get("type")
        order = pull_order(configured_types(source.settings))
        mapper = _PageMapper(source, order, page_type if isinstance(page_type, str) else None)
        return [mapper.map(peek, resources)]


def _load(raw: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise Rejected(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise Rejected("not a JSON object")
    return document


def _order(document: dict[str, Any]) -> str | None:
    order = document.get("order")
    return order if isinstance(order, str) and order else None


def _bundle_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and (e.get("search") or {}).get("mode") != "outcome"
    ]


def _ndjson_resources(text: str) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise Rejected(f"not JSON: {error}", f"line {number + 1}") from None
        if not isinstance(item, dict):
            raise Rejected("not a resource", f"line {number + 1}")
        resources.append(item)
    return resources


def _first_patient_key(resources: list[dict[str, Any]]) -> str | None:
    """The strongest identifier of the first Patient on the page, as "system|value"."""
    for item in resources:
        if item.get("resourceType") != "Patient":
            continue
        identifiers = [i for i in item.get("identifier", []) if isinstance(i, dict) and i.get("value")]
        for system in (CCCD, BHYT, BHXH):
            for identifier in identifiers:
                if identifier.get("system") == system:
                    return f"{system}|{identifier['value']}"
        if identifiers:
            return f"{identifiers[0].get('system', '')}|{identifiers[0]['value']}"
    return None


def _placeholder(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{system}|{value}')}"


class _PageMapper:
    """Maps the resources of one page of one source."""

    def __init__(self, source: Source, order: list[str], page_type: str | None) -> None:
        self.source = source
        code = source.facility_code
        self.mrn = facility_system("mrn", code)
        self.origin = facility_system("fhir-id", code)
        self.base = str(source.settings.get("base_url", "")).rstrip("/")
        self.order = order
        # Types whose resources are stored before this page's: conditional references to them
        # resolve. A page of unknown type (an upload) may refer conditionally to Patients only.
        position = order.index(page_type) if page_type in order else 1
        self.earlier = frozenset(order[:position])
        self.on_page: dict[str, str] = {}  # "Type/id" -> placeholder fullUrl
        self.warnings: list[str] = []

    def map(self, peek: Peek, resources: list[dict[str, Any]]) -> Mapped:
        taken: list[tuple[int, dict[str, Any]]] = []
        for index, item in enumerate(resources):
            res_type, res_id = item.get("resourceType"), item.get("id")
            if (
                not isinstance(res_type, str)
                or not isinstance(res_id, str)
                or not _REFERENCE.match(f"{res_type}/{res_id}")
            ):
                raise Rejected("a resource needs a resourceType and an id", f"resource[{index}]")
            if res_type in SKIPPED or (res_type != "Patient" and res_type not in _identifier_shapes()):
                reason = SKIPPED.get(res_type, "no identifier to make it idempotent")
                self.warnings.append(f"{res_type}/{res_id} skipped: {reason}")
                continue
            system, value = (
                (self.mrn, res_id) if res_type == "Patient" else (self.origin, f"{res_type}/{res_id}")
            )
            self.on_page[f"{res_type}/{res_id}"] = _placeholder(system, value)
            taken.append((index, item))
        patients: list[PatientFacts] = []
        entries: list[dict[str, Any]] = []
        for index, item in taken:
            try:
                if item["resourceType"] == "Patient":
                    patients.append(self._patient(item))
                else:
                    entries.append(self._entry(item))
            except Rejected as error:
                raise Rejected(
                    error.reason, f"resource[{index}]" + (f".{error.where}" if error.where else "")
                ) from None
        return Mapped(peek.message_type, peek.control_id, patients, entries, warnings=self.warnings)

    def _foreign(self, identifier: Any) -> bool:
        """An identifier in another facility's namespace (never this facility's to give)."""
        if not isinstance(identifier, dict):
            return False
        match = _SCOPED.match(str(identifier.get("system", "")))
        return (
            match is not None
            and match.group(1) in FACILITY_SCOPED_KINDS
            and match.group(2) != self.source.facility_code
        )

    def _own_identifiers(self, content: dict[str, Any], key: str) -> None:
        """Drop the identifiers of ``content`` that name another facility's records."""
        own = content.get("identifier")
        if isinstance(own, list):
            kept = [i for i in own if not self._foreign(i)]
            if len(kept) != len(own):
                self.warnings.append(
                    f"{key}: {len(own) - len(kept)} identifier(s) of another facility dropped"
                )
                content["identifier"] = kept
        elif self._foreign(own):
            self.warnings.append(f"{key}: an identifier of another facility dropped")
            del content["identifier"]

    def _patient(self, item: dict[str, Any]) -> PatientFacts:
        res_id = item["id"]
        patient = _copy_content(item)
        self._own_identifiers(patient, f"Patient/{res_id}")
        identifiers = [i for i in patient.get("identifier", []) if isinstance(i, dict)]
        if not any(i.get("system") == self.mrn and i.get("value") == res_id for i in identifiers):
            identifiers.append({"system": self.mrn, "value": res_id})
        patient["identifier"] = identifiers
        patient["managingOrganization"] = facility_reference(self.source.facility_code)
        # Other patients (Patient.link) may not be in the hub yet: logical references only.
        self._rewrite(patient, conditional=False)
        return PatientFacts(self.on_page[f"Patient/{res_id}"], patient)

    def _entry(self, item: dict[str, Any]) -> dict[str, Any]:
        res_type, res_id = item["resourceType"], item["id"]
        content = _copy_content(item)
        self._own_identifiers(content, f"{res_type}/{res_id}")
        value = f"{res_type}/{res_id}"
        mine = {"system": self.origin, "value": value}
        if _identifier_shapes()[res_type] == "array":
            identifiers = [i for i in content.get("identifier", []) if isinstance(i, dict)]
            if mine not in identifiers:
                identifiers.append(mine)
            content["identifier"] = identifiers
            system = self.origin
        else:
            own = content.get("identifier")
            if isinstance(own, dict) and own.get("system") and own.get("value"):
                # One identifier only (Composition, QuestionnaireResponse...): the facility's
                # own is just as stable a key.
                system, value = str(own["system"]), str(own["value"])
            else:
                content["identifier"] = mine
                system = self.origin
        self._rewrite(content, conditional=True)
        return {
            "fullUrl": self.on_page[f"{res_type}/{res_id}"],
            "resource": content,
            "request": {
                "method": "PUT",
                "url": f"{res_type}?identifier={quote(system, safe=':/')}|{quote(value, safe='/')}",
            },
        }

    def _rewrite(self, content: dict[str, Any], *, conditional: bool) -> None:
        from hub.store.references import iter_references

        for holder in list(iter_references(content)):
            reference = holder["reference"]
            local = (
                reference[len(self.base) + 1 :]
                if self.base and reference.startswith(self.base + "/")
                else reference
            )
            if "?" in local and not local.startswith(("http://", "https://")):
                # A conditional reference would be resolved against the hub's whole record,
                # not the facility's: not followed.
                del holder["reference"]
                holder.setdefault("display", "conditional reference of the facility, not followed")
                self.warnings.append(f"a conditional reference ({local.split('?')[0]}?...) not followed")
                continue
            match = _REFERENCE.match(local)
            if match is None:
                continue  # contained (#id), urn:uuid, or another server's: left as it is
            res_type, res_id = match.group(1), match.group(2)
            key = f"{res_type}/{res_id}"
            if key in self.on_page:
                holder["reference"] = self.on_page[key]
                continue
            system, value = (self.mrn, res_id) if res_type == "Patient" else (self.origin, key)
            if conditional and res_type in self.earlier:
                holder["reference"] = f"{res_type}?identifier={system}|{value}"
            else:
                del holder["reference"]
                holder["type"] = res_type
                holder["identifier"] = {"system": system, "value": value}


def _copy_content(item: dict[str, Any]) -> dict[str, Any]:
    """The resource without the facility's id and version (the hub assigns its own)."""
    content: dict[str, Any] = orjson.loads(orjson.dumps(item))
    content.pop("id", None)
    meta = content.pop("meta", None)
    if isinstance(meta, dict):
        kept = {k: meta[k] for k in _KEPT_META if meta.get(k)}
        if kept:
            content["meta"] = kept
    return content


FORMAT = FhirFormat()
