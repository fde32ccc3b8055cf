"""Identifier systems the connectors write, and the checks of Vietnamese identifiers.

Owns: the system URIs of identifiers that connectors put on resources (each national one is
a NamingSystem in ``fhir/naming-systems/``), the per-facility systems (MRN, episode, order
numbers), and the structure checks of CCCD and BHYT card codes.
Calls: ``hub.crypto.policy`` (the national systems, defined once there).
Called by: the mappings (``connectors.hl7v2``, ``connectors.xml130``), patient resolution.
"""

from __future__ import annotations

from hub.crypto.policy import BHXH, BHYT, CCCD

__all__ = ["BHXH", "BHYT", "CCCD", "FACILITY", "facility_system"]

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
