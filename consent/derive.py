"""Access rows derived from a resource at write time: compartment membership and grants.

Owns: turning resources into rows of ``compartment`` (whose record a resource is part of,
with its labels) and ``access_grant`` (who may read a patient's data, why, and which
labels). They are written and replaced with the search indexes, in the same transaction,
so a withdrawn Consent stops granting the moment its update commits, and ``hub reindex``
rebuilds them.

Where grants come from:
- ``Consent`` (status active): every provision, nested ones included, per actor (none =
  anyone, "*"), purpose (none = any, "*") and security label (none: permit = NORMAL data
  only, because sensitive classes always need a consent that names them; deny = all).
- policy (honoured when ``consent_policy = "moh"``): a Patient's managingOrganization and
  generalPractitioner, and an active CareTeam's participants, managing organizations and
  the CareTeam itself, may read NORMAL data for treatment (TREAT).
- proxy: an active RelatedPerson may read NORMAL data of their patient, for any purpose,
  within ``RelatedPerson.period`` (after ``period.end`` the proxy has nothing).
Where compartment rows come from (``compartment_rows``): the compartment references of
every type of the official Patient CompartmentDefinition (``fhir/compartment-links.json``),
a Binary's securityContext, a stored Bundle's entries; references the database must resolve
(identifiers, absolute URLs, a securityContext naming another resource) are left as pending
rows for ``hub.ops.compartment.resolve``; a resource that belongs in a record but names no
patient gets the ``NO_PATIENT`` row (see docs/storage.md, "The compartment rule").
Calls: labels, ``hub.ops.compartment`` (links, NO_PATIENT), dates.
Called by: index extraction, bulk ingest and ``hub reindex`` (compartment rows again).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from consent import labels
from hub.ops.compartment import NO_PATIENT, PENDING, links
from hub.search.dates import DateFormatError, date_range
from hub.search.registry import Registry

TREAT, ETREAT, HRESCH, PUBHLTH = "TREAT", "ETREAT", "HRESCH", "PUBHLTH"
ANY = "*"
_SCOPE_PURPOSE = {"treatment": TREAT, "research": HRESCH}
_INACTIVE_CARE_TEAM = frozenset({"inactive", "entered-in-error", "proposed", "suspended"})
_CONFIDENTIALITY_NORMAL = frozenset({"N", "L", "U", "NORMAL"})

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

# (patient_id, grantee, purpose, effect, labels, basis, starts, ends)
GrantRow = tuple[str, str, str, str, int, str, int | None, int | None]


def _ref(value: Any) -> str | None:
    """'Type/id' of a literal reference (relative, versioned or absolute), else None."""
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str) or ref.startswith(("#", "urn:")):
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def _patient_id(value: Any) -> str | None:
    ref = _ref(value)
    found = ref.split("/", 1)[1] if ref and ref.startswith("Patient/") else None
    return found if found and _FHIR_ID.fullmatch(found) else None


def _seconds(text: Any, upper: bool) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        low, high = date_range(text)
    except DateFormatError:
        return None
    return (high if upper else low) // 1_000_000


def _period(period: Any) -> tuple[int | None, int | None]:
    if not isinstance(period, dict):
        return None, None
    return _seconds(period.get("start"), False), _seconds(period.get("end"), True)


def _patient_reference(value: Any) -> tuple[str, str] | None:
    """How one compartment reference names a patient: ("patient", id); ("url", url) for an
    absolute URL of a Patient (only this hub's own base resolves); ("identifier", "system|value")
    for an identifier reference without a type, ("identifier!", ...) with type Patient;
    ("unresolved", ref) for a reference that may be a patient's but names none the hub can
    resolve (a contained Patient, a conditional or urn:uuid reference left unresolved, a bare
    string); None when it names a resource of another type."""
    if not isinstance(value, dict):
        return None
    ref = value.get("reference")
    declared = value.get("type") if isinstance(value.get("type"), str) else None
    if isinstance(ref, str) and ref:
        if ref.startswith("#"):
            return ("unresolved", ref)  # a contained Patient is no patient of the hub
        if "?" in ref and not ref.startswith("urn:"):  # conditional: resolved before storing, or not at all
            target = ref.split("?", 1)[0].rsplit("/", 1)[-1]
            return (
                ("unresolved", ref) if target == "Patient" or (not target and declared == "Patient") else None
            )
        if ref.startswith("urn:"):
            return ("unresolved", ref) if declared in (None, "Patient") else None
        parts = ref.split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if "://" in ref:
            if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
                return ("url", ref)
            typed = len(parts) >= 2 and parts[-2][:1].isupper()
            return None if typed or declared not in (None, "Patient") else ("unresolved", ref)
        if len(parts) == 2 and parts[1]:
            if parts[0] != "Patient":
                return None
            # No FHIR id is longer than 64 characters or holds other characters: such a
            # "Patient" is none the hub can hold, so the resource names no patient it knows.
            return ("patient", parts[1]) if _FHIR_ID.fullmatch(parts[1]) else ("unresolved", ref)
        return ("unresolved", ref) if declared in (None, "Patient") else None
    identifier = value.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
        if declared not in (None, "Patient"):
            return None
        system = identifier.get("system") if isinstance(identifier.get("system"), str) else None
        return ("identifier" if declared is None else "identifier!", f"{system or ''}|{identifier['value']}")
    return None


@dataclass
class _Members:
    patients: dict[str, None] = field(default_factory=dict)
    pending: list[tuple[str, str, str | None]] = field(default_factory=list)
    unresolved: bool = False  # a reference that may name a patient, and cannot be resolved
    candidates: bool = False  # any reference that names or may name a patient

    def add(self, value: Any, *, strict: bool = False) -> None:
        """``strict``: an untyped identifier is not assumed to be a patient's (standalone types)."""
        found = _patient_reference(value)
        if found is None:
            return
        kind, text = found
        if kind == "identifier" and strict:
            return
        self.candidates = True
        if kind == "patient":
            self.patients[text] = None
        elif kind == "url":
            self.pending.append(("url", text, None))
        elif kind.startswith("identifier"):
            system, _, ident = text.partition("|")
            self.pending.append(("identifier", ident, system or None))
        else:
            self.unresolved = True


def _collect(res_type: str, resource: dict[str, Any], members: _Members, *, strict: bool = False) -> bool:
    """Add the compartment references of a resource; False when its type has none."""
    extractors = links().by_type.get(res_type)
    if extractors is None:
        return False
    for extract in extractors:
        for value in extract(resource):
            members.add(value, strict=strict)
    return True


def _bundle_members(bundle: dict[str, Any], members: _Members) -> bool:
    """A stored Bundle (document, collection...) belongs to the patients of its entries: the
    compartment references of each entry, a Patient entry by its identifiers or its URL on
    this hub. References to other entries (urn:uuid fullUrls) are followed to Patient entries."""
    entries = [
        e for e in bundle.get("entry", ()) if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    patients_by_url = {
        e["fullUrl"]: e["resource"]
        for e in entries
        if isinstance(e.get("fullUrl"), str) and e["resource"].get("resourceType") == "Patient"
    }
    in_record = False
    for entry in entries:
        content = entry["resource"]
        kind = content.get("resourceType")
        if kind == "Patient":
            in_record = True
            _patient_entry(entry, content, members)
            continue
        inner = _Members()
        if not _collect(str(kind), content, inner):
            continue
        in_record = True
        members.patients.update(inner.patients)
        members.pending += inner.pending
        members.candidates |= inner.candidates
        members.unresolved |= inner.unresolved
        # references to Patient entries of the Bundle itself
        for extract in links().by_type[str(kind)]:
            for value in extract(content):
                ref = value.get("reference") if isinstance(value, dict) else None
                if isinstance(ref, str) and ref in patients_by_url:
                    _patient_entry({"fullUrl": ref}, patients_by_url[ref], members)
    return in_record


def _patient_entry(entry: dict[str, Any], patient: dict[str, Any], members: _Members) -> None:
    members.candidates = True
    before = len(members.patients) + len(members.pending)
    full_url = entry.get("fullUrl")
    if isinstance(full_url, str) and ("://" in full_url or full_url.startswith("Patient/")):
        members.add({"reference": full_url})
    for identifier in patient.get("identifier", ()):
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            members.add({"identifier": identifier, "type": "Patient"})
    if len(members.patients) + len(members.pending) == before:
        members.unresolved = True


def _about_no_patient(resource: dict[str, Any]) -> bool:
    """Whether the resource's subject explicitly names a resource of another type than Patient
    (an Observation of a Location's water, a Device's calibration, a Group's statistics)."""
    for element in links().subject_elements:
        value = resource.get(element)
        for item in value if isinstance(value, list) else [value]:
            ref = item.get("reference") if isinstance(item, dict) else None
            if not isinstance(ref, str) or "?" in ref or ref.startswith(("#", "urn:")):
                continue
            parts = ref.split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2] != "Patient" and parts[-1]:
                return True
    return False


def compartment_rows(res_type: str, res_id: str, resource: dict[str, Any], mask: int) -> dict[str, list[Any]]:
    """The ``compartment`` rows (patient_id, labels) of a resource, and the references only the
    database can resolve as ``hub.ops.compartment.PENDING`` rows (resolved before writing).

    Patient: its own. Compartment types (``fhir/compartment-links.json``): the patients their
    compartment references name. Binary: the patients of its ``securityContext``. Bundle: of
    its entries. A type in some patient's record naming no resolvable patient gets the
    ``NO_PATIENT`` row, except a standalone type (Schedule, Group) that names no patient at all.
    """
    members = _Members()
    if res_type == "Patient":
        return {"compartment": [(res_id, mask)]}
    required = True
    if res_type == "Binary":
        context = resource.get("securityContext")
        found = _patient_reference(context)
        if found is None and isinstance(context, dict) and isinstance(context.get("reference"), str):
            target = context["reference"].split("/_history/")[0]
            if target.count("/") == 1 and target[:1].isupper():
                # a resource of some patient's record (or of none): the Binary follows it
                members.pending.append(("context", target, None))
                required = False
        elif found is not None:
            members.add(context)
        elif context is not None:
            members.unresolved = True
    elif res_type == "Bundle":
        if not _bundle_members(resource, members):
            return {}
    else:
        standalone = res_type in links().standalone
        # The audit trail names its agents by untyped identifiers (user accounts, clients):
        # only identifiers declared to be a Patient's are looked up there.
        if not _collect(res_type, resource, members, strict=standalone or res_type == "AuditEvent"):
            return {}
        required = (not standalone or members.candidates) and (
            members.candidates or not _about_no_patient(resource)
        )
    rows: dict[str, list[Any]] = {}
    if members.patients:
        rows["compartment"] = [(patient, mask) for patient in members.patients]
    elif required or members.unresolved:
        rows["compartment"] = [(NO_PATIENT, mask)]
    if members.pending:
        rows[PENDING] = [
            (mask, kind, value, system) for kind, value, system in dict.fromkeys(members.pending)
        ]
    return rows


def grant_rows(res_type: str, res_id: str, resource: dict[str, Any]) -> list[GrantRow]:
    if res_type == "Consent":
        return list(_consent_grants(resource))
    if res_type == "Patient":
        refs = [
            _ref(resource.get("managingOrganization")),
            *map(_ref, resource.get("generalPractitioner", ())),
        ]
        return [(res_id, r, TREAT, "permit", labels.NORMAL, "policy", None, None) for r in refs if r]
    if res_type == "CareTeam":
        return _care_team_grants(res_id, resource)
    if res_type == "RelatedPerson":
        return _proxy_grants(res_id, resource)
    return []


def _proxy_grants(res_id: str, person: dict[str, Any]) -> list[GrantRow]:
    """An active RelatedPerson reads their patient's NORMAL data within RelatedPerson.period
    (no period: open-ended); an inactive one, or one whose period cannot be read, nothing."""
    patient = _patient_id(person.get("patient"))
    if patient is None or person.get("active", True) is not True:
        return []
    period = person.get("period")
    starts, ends = _period(period)
    if isinstance(period, dict) and (
        (period.get("start") is not None and starts is None)
        or (period.get("end") is not None and ends is None)
    ):
        return []  # fail closed: a period the hub cannot read grants nothing
    return [(patient, f"RelatedPerson/{res_id}", ANY, "permit", labels.NORMAL, "proxy", starts, ends)]


def _care_team_grants(res_id: str, team: dict[str, Any]) -> list[GrantRow]:
    patient = _patient_id(team.get("subject"))
    if patient is None or team.get("status") in _INACTIVE_CARE_TEAM:
        return []
    starts, ends = _period(team.get("period"))
    members = [f"CareTeam/{res_id}"]
    members += [r for p in team.get("participant", ()) if (r := _ref(p.get("member")))]
    members += [r for o in team.get("managingOrganization", ()) if (r := _ref(o))]
    members += [r for p in team.get("participant", ()) if (r := _ref(p.get("onBehalfOf")))]
    return [
        (patient, member, TREAT, "permit", labels.NORMAL, "policy", starts, ends)
        for member in dict.fromkeys(members)
    ]


def _label_mask(provision: dict[str, Any], effect: str) -> int:
    codes = []
    for label in provision.get("securityLabel", ()):
        code = label.get("code") if isinstance(label, dict) else None
        if isinstance(code, str):
            codes.append("NORMAL" if code in _CONFIDENTIALITY_NORMAL else code)
    mask = labels.mask_of(codes) & (labels.NORMAL | labels.SENSITIVE)
    if mask:
        return mask
    return labels.NORMAL if effect == "permit" else labels.NORMAL | labels.SENSITIVE


def _consent_grants(consent: dict[str, Any]) -> Iterator[GrantRow]:
    patient = _patient_id(consent.get("patient"))
    root = consent.get("provision")
    if consent.get("status") != "active" or patient is None or not isinstance(root, dict):
        return
    scope_purposes = [
        _SCOPE_PURPOSE[c.get("code")]
        for c in (consent.get("scope") or {}).get("coding", ())
        if c.get("code") in _SCOPE_PURPOSE
    ]

    def walk(provision: dict[str, Any], inherited: dict[str, Any]) -> Iterator[GrantRow]:
        effect = provision.get("type") or inherited.get("type") or "permit"
        actors = [r for a in provision.get("actor", ()) if (r := _ref(a.get("reference")))]
        actors = actors or inherited["actors"]
        purposes = [p["code"] for p in provision.get("purpose", ()) if isinstance(p, dict) and p.get("code")]
        purposes = purposes or inherited["purposes"]
        period = _period(provision.get("period")) if provision.get("period") else inherited["period"]
        mask = _label_mask(provision, effect)
        for actor in actors:
            for purpose in purposes:
                yield (patient, actor, purpose, effect, mask, "consent", *period)
        context = {"type": effect, "actors": actors, "purposes": purposes, "period": period}
        for child in provision.get("provision", ()):
            if isinstance(child, dict):
                yield from walk(child, context)

    root_context = {
        "type": None,
        "actors": [ANY],
        "purposes": scope_purposes or [ANY],
        "period": (None, None),
    }
    yield from walk(root, root_context)


def access_rows(
    registry: Registry, res_type: str, res_id: str, resource: dict[str, Any], index_rows: dict[str, list[Any]]
) -> dict[str, list[tuple[Any, ...]]]:
    """The ``compartment`` (plus pending, see ``compartment_rows``) and ``access_grant`` rows
    of a resource, in table column order without the leading pid."""
    mask = labels.labels_of(resource)
    rows: dict[str, list[tuple[Any, ...]]] = dict(compartment_rows(res_type, res_id, resource, mask))
    grants = grant_rows(res_type, res_id, resource)
    if grants:
        rows["access_grant"] = list(dict.fromkeys(grants))
    return rows
