"""Consent resources in plain words, for the patient portal and the clinician's record page.

Owns: turning a FHIR ``Consent`` (as stored by the hub, see docs/access.md §2) into sentences an
ordinary person reads ("Bệnh viện Đa khoa tỉnh Gia Lai may see ordinary data for treatment until
31/12/2027", "No one may see HIV data"), the names and meanings of the sensitive categories and
purposes the portal offers, the Consent a patient's grant becomes (``grant_consent``), and the
default-policy reasons a clinician may read a record (``policy_reasons``).
Reads provisions the way ``consent.derive`` turns them into grants (nested provisions inherit
type, actors, purposes and period; labels are each provision's own), so the words say what the
hub enforces. Pure: no I/O; the caller passes ``gettext`` (message ids are English) and a date
formatter (the locale's short date).
Calls: nothing outside the standard library.  Called by: hub.web.views.portal (and the clinician
record page).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Gettext = Callable[[str], str]


def N_(message: str) -> str:
    """Marks an English message id for extraction; translated later with the page's gettext."""
    return message


DateFormat = Callable[[str], str]  # a FHIR date or dateTime -> the locale's short date

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
LOINC = "http://loinc.org"

# Confidentiality codes that mean ordinary data (consent.derive._CONFIDENTIALITY_NORMAL).
_NORMAL_CODES = frozenset({"N", "L", "U", "NORMAL"})
SENSITIVE_CODES = ("HIV", "PSY", "SEX", "ETH", "STD", "GDIS", "V")
_SCOPE_PURPOSE = {"treatment": "TREAT", "research": "HRESCH"}


@dataclass(frozen=True)
class Choice:
    """One option of the grant form: its code, its plain name and what choosing it means."""

    code: str
    name: str  # English message id
    meaning: str  # English message id


CATEGORIES: tuple[Choice, ...] = (
    Choice(
        "N",
        N_("ordinary data"),
        N_("Visits, test results, vaccinations, medicines and documents that are not in a sensitive group."),
    ),
    Choice(
        "HIV",
        N_("HIV data"),
        N_("HIV tests, HIV diagnoses and HIV medicines. Only you can share them."),
    ),
    Choice(
        "PSY",
        N_("mental-health data"),
        N_("Mental-health diagnoses, questionnaires such as PHQ-9 and medicines for mental health."),
    ),
    Choice(
        "SEX",
        N_("sexual and reproductive health data"),
        N_("Pregnancy, birth, contraception and other reproductive health care."),
    ),
    Choice(
        "ETH",
        N_("alcohol and drug use data"),
        N_("Treatment for alcohol or drug use, for example methadone."),
    ),
    Choice(
        "STD",
        N_("data on sexually transmitted infections"),
        N_("Tests and treatment for infections such as syphilis or gonorrhoea."),
    ),
    Choice(
        "GDIS",
        N_("genetic data"),
        N_("Genetic tests and inherited conditions."),
    ),
    Choice(
        "V",
        N_("very restricted data"),
        N_("Anything your doctors marked as very restricted."),
    ),
)
CATEGORY_BY_CODE = {c.code: c for c in CATEGORIES}

PURPOSES: tuple[Choice, ...] = (
    Choice("TREAT", N_("for treatment"), N_("When they examine or treat you.")),
    Choice("ETREAT", N_("for emergency treatment"), N_("Only in an emergency.")),
    Choice("HRESCH", N_("for research"), N_("For medical research approved by an ethics board.")),
    Choice("PUBHLTH", N_("for public health"), N_("For disease surveillance and public-health programmes.")),
)
PURPOSE_BY_CODE = {c.code: c for c in PURPOSES}

STATUS_WORDS = {
    "active": N_("In force"),
    "withdrawn": N_("Withdrawn"),
    "pending": N_("Not yet in force"),
    "error": N_("Entered in error"),
}


def consent_state(consent: Mapping[str, Any]) -> str:
    """active, withdrawn (inactive or rejected), pending (draft, proposed) or error."""
    status = consent.get("status")
    if status == "active":
        return "active"
    if status in ("inactive", "rejected"):
        return "withdrawn"
    if status in ("draft", "proposed"):
        return "pending"
    return "error"


def _ref(value: Any) -> str | None:
    if isinstance(value, Mapping):
        ref = value.get("reference")
        if isinstance(ref, str) and ref:
            return ref
    return None


def _join(items: Sequence[str], gettext: Gettext, last: str) -> str:
    """ "a", "a and b", "a, b and c" ("or" for purposes): the last joiner translated."""
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return gettext(last).format(a=", ".join(items[:-1]), b=items[-1])


def actor_name(reference: str, names: Mapping[str, str], gettext: Gettext) -> str:
    """The display name of a consent actor; a reference the caller could not name says what it is."""
    if reference in names:
        return names[reference]
    kind, _, ident = reference.partition("/")
    kinds = {
        "Organization": N_("facility {id}"),
        "Practitioner": N_("health worker {id}"),
        "PractitionerRole": N_("health worker {id}"),
        "CareTeam": N_("care team {id}"),
        "RelatedPerson": N_("family member {id}"),
    }
    return gettext(kinds[kind]).format(id=ident) if kind in kinds else reference


def _labels(provision: Mapping[str, Any]) -> list[str]:
    codes: list[str] = []
    for label in provision.get("securityLabel", ()) or ():
        code = label.get("code") if isinstance(label, Mapping) else None
        if isinstance(code, str):
            code = "N" if code in _NORMAL_CODES else code
            if code not in codes:
                codes.append(code)
    return codes


def _what(codes: Sequence[str], effect: str, gettext: Gettext) -> str:
    if not codes:
        # consent.derive: a permit without labels is ordinary data; a deny, everything.
        return gettext("ordinary data") if effect == "permit" else gettext("any of the data")
    names = [gettext(CATEGORY_BY_CODE[c].name) if c in CATEGORY_BY_CODE else c for c in codes]
    return _join(names, gettext, "{a} and {b}")


def _why(purposes: Sequence[str], effect: str, gettext: Gettext) -> str:
    if not purposes or "*" in purposes:
        # A deny for any purpose needs no words; a permit for any purpose must say so.
        return gettext("for any purpose") if effect == "permit" else ""
    words = [gettext(PURPOSE_BY_CODE[p].name) if p in PURPOSE_BY_CODE else p for p in purposes]
    return _join(words, gettext, "{a} or {b}")


def _when(period: Mapping[str, Any] | None, gettext: Gettext, fmt_date: DateFormat) -> str:
    if not period:
        return ""
    start, end = period.get("start"), period.get("end")
    if start and end:
        return gettext("from {start} until {end}").format(start=fmt_date(start), end=fmt_date(end))
    if end:
        return gettext("until {end}").format(end=fmt_date(end))
    if start:
        return gettext("from {start}").format(start=fmt_date(start))
    return ""


def _sentence(
    effect: str,
    actors: Sequence[str],
    purposes: Sequence[str],
    period: Mapping[str, Any] | None,
    codes: Sequence[str],
    names: Mapping[str, str],
    gettext: Gettext,
    fmt_date: DateFormat,
) -> str:
    what = _what(codes, effect, gettext)
    anyone = not actors or "*" in actors
    who = _join([actor_name(a, names, gettext) for a in actors], gettext, "{a} and {b}")
    if effect == "deny":
        head = gettext("No one may see {what}") if anyone else gettext("{who} may not see {what}")
    else:
        head = gettext("Anyone may see {what}") if anyone else gettext("{who} may see {what}")
    parts = [
        head.format(who=who, what=what),
        _why(purposes, effect, gettext),
        _when(period, gettext, fmt_date),
    ]
    return " ".join(p for p in parts if p)


def describe_consent(
    consent: Mapping[str, Any], names: Mapping[str, str], gettext: Gettext, fmt_date: DateFormat
) -> list[str]:
    """The Consent as sentences: its state first when it is not in force, then one sentence per
    provision (nested provisions are exceptions and inherit what they do not say)."""
    sentences: list[str] = []
    state = consent_state(consent)
    if state != "active":
        sentences.append(
            {
                "withdrawn": gettext("Withdrawn: this consent is no longer in force."),
                "pending": gettext("Not yet in force: this consent has not been confirmed."),
                "error": gettext("Entered in error: this consent does not count."),
            }[state]
        )
    root = consent.get("provision")
    if not isinstance(root, Mapping):
        return sentences
    scope_purposes = [
        _SCOPE_PURPOSE[str(c.get("code"))]
        for c in (consent.get("scope") or {}).get("coding", ())
        if isinstance(c, Mapping) and str(c.get("code")) in _SCOPE_PURPOSE
    ]

    def walk(provision: Mapping[str, Any], inherited: dict[str, Any]) -> None:
        effect = provision.get("type") or inherited["type"] or "permit"
        actors = [r for a in provision.get("actor", ()) or () if (r := _ref(a.get("reference")))]
        actors = actors or inherited["actors"]
        purposes = [
            p["code"] for p in provision.get("purpose", ()) or () if isinstance(p, Mapping) and p.get("code")
        ]
        purposes = purposes or inherited["purposes"]
        period = provision.get("period") or inherited["period"]
        sentences.append(
            _sentence(effect, actors, purposes, period, _labels(provision), names, gettext, fmt_date)
        )
        context = {"type": effect, "actors": actors, "purposes": purposes, "period": period}
        for child in provision.get("provision", ()) or ():
            if isinstance(child, Mapping):
                walk(child, context)

    walk(root, {"type": None, "actors": [], "purposes": scope_purposes, "period": None})
    return sentences


def consent_actors(consent: Mapping[str, Any]) -> list[str]:
    """Every actor reference a Consent names (to look their names up before describing it)."""
    found: list[str] = []

    def walk(provision: Mapping[str, Any]) -> None:
        for a in provision.get("actor", ()) or ():
            if isinstance(a, Mapping) and (r := _ref(a.get("reference"))) and r not in found:
                found.append(r)
        for child in provision.get("provision", ()) or ():
            if isinstance(child, Mapping):
                walk(child)

    root = consent.get("provision")
    if isinstance(root, Mapping):
        walk(root)
    return found


def grants_sensitive(consent: Mapping[str, Any]) -> bool:
    """Whether any permit of the Consent names a sensitive category (proxies may not grant those)."""

    def walk(provision: Mapping[str, Any], effect: str) -> bool:
        effect = provision.get("type") or effect
        if effect == "permit" and any(code in SENSITIVE_CODES for code in _labels(provision)):
            return True
        return any(walk(c, effect) for c in provision.get("provision", ()) or () if isinstance(c, Mapping))

    root = consent.get("provision")
    return isinstance(root, Mapping) and walk(root, "permit")


def has_deny(consent: Mapping[str, Any]) -> bool:
    """Whether any provision of the Consent denies (only the patient may lift a deny)."""

    def walk(provision: Mapping[str, Any], effect: str) -> bool:
        effect = provision.get("type") or effect
        return effect == "deny" or any(
            walk(c, effect) for c in provision.get("provision", ()) or () if isinstance(c, Mapping)
        )

    root = consent.get("provision")
    return isinstance(root, Mapping) and walk(root, "permit")


def grant_consent(
    patient_id: str,
    actor: str,
    purpose: str,
    categories: Sequence[str],
    end: str | None = None,
    *,
    effect: str = "permit",
) -> dict[str, Any]:
    """The Consent one grant of the portal form writes: ``actor`` ("Organization/x") may (or, with
    effect "deny", may not) see ``categories`` for ``purpose`` until ``end`` (a FHIR date, or
    None for no end). The hub stamps ``dateTime`` and the evidence method when a patient or a
    proxy writes it (consent.governance), so neither is set here."""
    if effect not in ("permit", "deny"):
        raise ValueError(f"not a provision type: {effect!r}")
    unknown = [c for c in categories if c not in CATEGORY_BY_CODE]
    if unknown or purpose not in PURPOSE_BY_CODE:
        raise ValueError(f"unknown category or purpose: {unknown or purpose!r}")
    provision: dict[str, Any] = {
        "type": effect,
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
                "reference": {"reference": actor},
            }
        ],
        "purpose": [{"system": ACT_REASON, "code": purpose}],
        "securityLabel": [
            {"system": CONFIDENTIALITY, "code": "N"} if c == "N" else {"system": ACT_CODE, "code": c}
            for c in (categories or ["N"])
        ],
    }
    if end:
        provision["period"] = {"end": end}
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "provision": provision,
    }


def policy_reasons(
    patient: Mapping[str, Any],
    care_teams: Sequence[Mapping[str, Any]],
    names: Mapping[str, str],
    gettext: Gettext,
) -> list[str]:
    """Why clinicians may read a patient's ordinary data without a Consent under the default
    policy (CONSENT_POLICY=moh, docs/access.md §2): the managing facility, the family doctor,
    the active care teams."""
    reasons: list[str] = []
    if org := _ref(patient.get("managingOrganization")):
        reasons.append(
            gettext(
                "{who} manages this record: its health workers may see ordinary data for treatment"
            ).format(who=actor_name(org, names, gettext))
        )
    for gp in patient.get("generalPractitioner", ()) or ():
        if ref := _ref(gp):
            reasons.append(
                gettext("The family doctor {who} may see ordinary data for treatment").format(
                    who=actor_name(ref, names, gettext)
                )
            )
    for team in care_teams:
        if team.get("status") in ("inactive", "entered-in-error", "proposed", "suspended"):
            continue
        label = team.get("name") or actor_name(f"CareTeam/{team.get('id', '')}", names, gettext)
        reasons.append(
            gettext("The care team {who} may see ordinary data for treatment").format(who=str(label))
        )
    return reasons
