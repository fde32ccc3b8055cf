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
Calls: labels, the compartment definition, dates.  Called by: index extraction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from consent import labels
from hub.ops.compartment import links
from hub.search.dates import DateFormatError, date_range
from hub.search.registry import Registry

PURPOSE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
TREAT, ETREAT, HRESCH, PUBHLTH = "TREAT", "ETREAT", "HRESCH", "PUBHLTH"
ANY = "*"
_SCOPE_PURPOSE = {"treatment": TREAT, "research": HRESCH}
_INACTIVE_CARE_TEAM = frozenset({"inactive", "entered-in-error", "proposed", "suspended"})
_CONFIDENTIALITY_NORMAL = frozenset({"N", "L", "U", "NORMAL"})

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
    return ref.split("/", 1)[1] if ref and ref.startswith("Patient/") else None


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


def compartment_rows(
    registry: Registry, res_type: str, res_id: str, reference_rows: list[tuple[Any, ...]], mask: int
) -> list[tuple[Any, ...]]:
    """(patient_id, labels) rows: the patients whose compartment holds this resource."""
    patients: dict[str, None] = {}
    if res_type == "Patient":
        patients[res_id] = None
    params = links(registry).get(res_type, ())
    if params:
        hashes = {p.hash_identity for p in params}
        for row in reference_rows:
            # idx_reference row without pid: (hash_identity, hash_target, type, id, url)
            if row[0] in hashes and row[2] == "Patient" and row[3]:
                patients[row[3]] = None
    return [(patient, mask) for patient in patients]


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
    """The ``compartment`` and ``access_grant`` rows of a resource, in table column order
    without the leading pid."""
    mask = labels.labels_of(resource)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    members = compartment_rows(registry, res_type, res_id, index_rows.get("reference", []), mask)
    if members:
        rows["compartment"] = members
    grants = grant_rows(res_type, res_id, resource)
    if grants:
        rows["access_grant"] = list(dict.fromkeys(grants))
    return rows
