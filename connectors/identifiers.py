"""Identifier systems the connectors write, and the checks of Vietnamese identifiers.

Owns: the system URIs of identifiers that connectors put on resources (each national one is
a NamingSystem in ``fhir/naming-systems/``), the per-facility systems (MRN, episode, order
numbers), and the structure checks of CCCD and BHYT card codes.
Calls: ``hub.crypto.policy`` (the national systems, defined once there).
Called by: the mappings (``connectors.hl7v2``, ``connectors.xml130``), patient resolution.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from hub.crypto.policy import BHXH, BHYT, CCCD

__all__ = [
    "BHXH",
    "BHYT",
    "CCCD",
    "FACILITY",
    "BhytCard",
    "bhxh_of",
    "check_cccd",
    "facility_system",
    "parse_bhyt",
]

FACILITY = "https://ehealth-hub.vn/sid/cskcb"  # MA_CSKCB: Organization.identifier
_FACILITY_SCOPED = "https://ehealth-hub.vn/sid/{kind}/{facility}"
# Kinds of identifier that are unique only within one facility.
FACILITY_SCOPED_KINDS = frozenset(
    {
        "mrn",  # MA_BN, PID-3 of the facility's own assigning authority
        "ma-lk",  # QĐ 130 episode key (Encounter.identifier)
        "visit",  # PV1-19 visit number
        "placer",  # ORC-2 / OBR-2
        "filler",  # ORC-3 / OBR-3
        "appointment",  # SCH-1 / SCH-2
        "immunization",  # RXA/ORC ids
        "message",  # MSH-10, when nothing better identifies what a message created
        "practitioner",  # a facility's own staff codes (XCN-1 without a national id)
        "fhir-id",  # "Type/id" of a resource on the facility's FHIR server (connectors.fhirpull)
    }
)


def facility_system(kind: str, facility_code: str) -> str:
    """The system of an identifier unique within one facility (``kind`` in FACILITY_SCOPED_KINDS)."""
    if kind not in FACILITY_SCOPED_KINDS:
        raise ValueError(f"unknown facility-scoped identifier kind {kind!r}")
    return _FACILITY_SCOPED.format(kind=kind, facility=facility_code)


def facility_reference(facility_code: str) -> dict[str, str]:
    """A conditional reference to the facility's Organization (created when its source is added)."""
    return {"reference": f"Organization?identifier={FACILITY}|{facility_code}"}


# --- CCCD ------------------------------------------------------------------------------------

# Digits 1-3 of a CCCD: the province where the birth was registered, coded as the 63
# provinces were before the 2025 reform (Thông tư 07/2016/TT-BCA). The 34 provinces of
# 2025 kept codes of that list, so cards issued before and after the reform share it. No
# primary text was found for codes of births registered abroad: such a CCCD is reported as
# a problem (a review flag), never refused.
# fmt: off
CCCD_PROVINCES = frozenset((
    "001", "002", "004", "006", "008", "010", "011", "012", "014", "015", "017", "019", "020", "022", "024", "025",
    "026", "027", "030", "031", "033", "034", "035", "036", "037", "038", "040", "042", "044", "045", "046", "048",
    "049", "051", "052", "054", "056", "058", "060", "062", "064", "066", "067", "068", "070", "072", "074", "075",
    "077", "079", "080", "082", "083", "084", "086", "087", "089", "091", "092", "093", "094", "095", "096",
))
# fmt: on


def cccd_birth(value: str) -> tuple[int, str] | None:
    """(birth year, "male"/"female") that a 12-digit CCCD encodes in digits 4-6, else None.

    Digit 4: 0/1 born in the 1900s male/female, 2/3 the 2000s, 4/5 the 2100s, and so on."""
    if len(value) != 12 or not value.isdigit():
        return None
    digit = int(value[3])
    return 1900 + 100 * (digit // 2) + int(value[4:6]), ("male", "female")[digit % 2]


def check_cccd(value: str, gender: str | None = None, birth_year: int | None = None) -> list[str]:
    """The problems of a CCCD's structure (an empty list: it may be matched on).

    ``gender`` (FHIR administrative gender) and ``birth_year`` are what the record says;
    each is compared with what digits 4-6 encode when given (``other``/``unknown`` are
    not compared)."""
    if len(value) != 12 or not value.isdigit():
        # The value itself stays out of the text: problems end up in Flags, which are not
        # sealed at rest the way resources carrying a CCCD are.
        return [
            f"a CCCD has 12 digits, this one {len(value)} characters"
            + ("" if value.isdigit() else " (not all digits)")
        ]
    problems = []
    if value[:3] not in CCCD_PROVINCES:
        problems.append(f"CCCD digits 1-3 ({value[:3]}) are no province code")
    encoded = cccd_birth(value)
    assert encoded is not None
    year, sex = encoded
    this_year = date.today().year
    if year > this_year:
        problems.append(f"CCCD digits 4-6 ({value[3:6]}) give birth year {year}, in the future")
    if birth_year is not None and birth_year != year:
        problems.append(
            f"CCCD digits 4-6 ({value[3:6]}) give birth year {year}, the record says {birth_year}"
        )
    if gender in ("male", "female") and gender != sex:
        problems.append(f"CCCD digit 4 ({value[3]}) gives sex {sex}, the record says {gender}")
    return problems


# --- BHYT card code ------------------------------------------------------------------------

_BHYT = re.compile(r"^([A-Z]{2})([1-5])([0-9]{2})([0-9]{10})$")


@dataclass(frozen=True)
class BhytCard:
    """The parts of a 15-character BHYT card code (vn-health-data.md §2)."""

    group: str  # beneficiary group: DN, HC, GD, HN, TE, HS...
    level: int  # benefit level 1-5
    province: str  # issuing province, 2 digits
    bhxh: str  # the 10-digit social-insurance number: the same on every renewed card


def parse_bhyt(code: str) -> BhytCard | None:
    """The card's parts, or None when ``code`` is not a well-formed card code (whitespace
    and letter case are forgiven: HIS exports differ)."""
    match = _BHYT.match("".join(code.split()).upper())
    if match is None:
        return None
    group, level, province, bhxh = match.groups()
    return BhytCard(group, int(level), province, bhxh)


def bhxh_of(code: str) -> str | None:
    """The social-insurance number of a BHYT card code, or of a bare 10-digit BHXH number."""
    bare = "".join(code.split())
    if len(bare) == 10 and bare.isdigit():
        return bare
    card = parse_bhyt(bare)
    return card.bhxh if card else None
