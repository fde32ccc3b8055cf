"""ORM^O01 and OML^O21 (orders) to ServiceRequest.

| v2 | ServiceRequest |
|---|---|
| ORC-2 / OBR-2 placer number | identifier (type PLAC, ``facility_system("placer", code)``): the conditional PUT key |
| ORC-3 / OBR-3 filler number | identifier (type FILL); the key when there is no placer number |
| ORC-4 placer group number | requisition |
| ORC-5 order status (0038), else ORC-1 order control (0119) | status (``fhir/hl7v2/order-status.json``) |
| - | intent ``order`` |
| OBR-4 | code |
| TQ1-9 / ORC-7.6 / OBR-27.6 priority | priority (S stat, A asap, R routine, C/T urgent) |
| TQ1-7 / ORC-7.4 / OBR-6 | occurrenceDateTime |
| ORC-9 | authoredOn |
| ORC-12 / OBR-16 | requester (logical reference by staff code) |
| OBR-31 | reasonCode |
| NTE after ORC/OBR | note |

An ORC without an OBR (pharmacy RXO, dietary ODS...) is not a service order: skipped with a
warning; a message with no OBR at all is refused.
Calls: ``mapping.common``.  Called by: ``connectors.hl7v2`` through ``mapping.MAPPERS``.
"""

from __future__ import annotations

from typing import Any

from connectors.hl7v2.mapping import Mapper
from connectors.hl7v2.mapping.common import (
    Json,
    coded,
    conditional_put,
    cwe_field,
    full_url,
    notes,
    patient,
    subject,
    table,
    ts,
    xcn_field,
)
from connectors.hl7v2.parse import Message, Segment
from connectors.identifiers import facility_system
from connectors.model import Mapped, PatientFacts, Rejected, Source

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _orders(msg: Message) -> list[tuple[Segment | None, Segment | None, Segment | None, Segment | None]]:
    """(PID, ORC, TQ1, OBR) per order in message order (ORC or OBR may be missing)."""
    out: list[list[Any]] = []
    pid: Segment | None = None
    current: list[Any] | None = None
    for seg in msg.segments:
        if seg.name == "PID":
            pid = seg
            current = None
        elif seg.name == "ORC":
            current = [pid, seg, None, None]
            out.append(current)
        elif seg.name == "TQ1" and current is not None and current[2] is None:
            current[2] = seg
        elif seg.name == "OBR":
            if current is None or current[3] is not None:
                current = [pid, None, None, seg]
                out.append(current)
            else:
                current[3] = seg
    return [(g[0], g[1], g[2], g[3]) for g in out]


def _notes_after(msg: Message, seg: Segment | None) -> list[Json]:
    if seg is None:
        return []
    following: list[Segment] = []
    for nxt in msg.segments[seg.index + 1 :]:
        if nxt.name != "NTE":
            break
        following.append(nxt)
    return notes(following)


def _status(orc: Segment | None) -> str:
    statuses: dict[str, dict[str, str]] = table("order-status")
    if orc is None:
        return "active"
    by_status = statuses["order_status"].get(orc.text(5).upper())
    if by_status:
        return by_status
    return statuses["order_control"].get(orc.text(1).upper(), "active")


def _priority(orc: Segment | None, tq1: Segment | None, obr: Segment) -> str | None:
    code = (tq1.text(9) if tq1 else "") or (orc.text(7, 6) if orc else "") or obr.text(27, 6)
    priorities: dict[str, str] = table("order-status")["priority"]
    return priorities.get(code.upper()) if code else None


def map_orders(msg: Message, source: Source) -> Mapped:
    mapped = Mapped(msg.message_type, msg.control_id, patients=[], entries=[])
    patients: dict[int, PatientFacts] = {}
    code = source.facility_code
    placer_system = facility_system("placer", code)
    filler_system = facility_system("filler", code)
    used: set[str] = set()
    orders = _orders(msg)
    for position, (pid, orc, tq1, obr) in enumerate(orders, 1):
        where = f"ORC[{position}]"
        if obr is None:
            mapped.warnings.append(f"{where}: order without OBR (not a service order) skipped")
            continue
        if pid is None:
            raise Rejected("order before any PID: an order needs its patient", where)
        if pid.index not in patients:
            patients[pid.index] = patient(msg, source, pid)
            mapped.patients.append(patients[pid.index])
        facts = patients[pid.index]
        placer = (orc.text(2) if orc else "") or obr.text(2)
        filler = (orc.text(3) if orc else "") or obr.text(3)
        identifiers: list[Json] = []
        if placer:
            identifiers.append({"type": coded(V2_0203, "PLAC"), "system": placer_system, "value": placer})
        if filler:
            identifiers.append({"type": coded(V2_0203, "FILL"), "system": filler_system, "value": filler})
        if identifiers:
            key_system, key = identifiers[0]["system"], identifiers[0]["value"]
        else:
            key_system, key = facility_system("message", code), f"{msg.control_id}/ORC{position}"
            identifiers.append({"system": key_system, "value": key})
        if key in used:
            # Several OBR under one ORC share its number: each is its own request.
            key = f"{key}/{obr.text(1) or position}"
            identifiers = [{"system": key_system, "value": key}]
        used.add(key)
        res: Json = {
            "resourceType": "ServiceRequest",
            "identifier": identifiers,
            "status": _status(orc),
            "intent": "order",
        }
        group = orc.text(4) if orc else ""
        if group:
            res["requisition"] = {"system": placer_system, "value": group}
        priority = _priority(orc, tq1, obr)
        if priority:
            res["priority"] = priority
        concept = cwe_field(obr, 4)
        if concept is None:
            raise Rejected("universal service identifier (OBR-4) is empty", f"OBR[{position}]-4")
        res["code"] = concept
        res["subject"] = subject(facts)
        occurrence = (
            (ts(tq1[7], "TQ1-7") if tq1 else None)
            or (ts(orc.text(7, 4), "ORC-7.4") if orc else None)
            or ts(obr[6], "OBR-6")
            or ts(obr[7], "OBR-7")
        )
        if occurrence:
            res["occurrenceDateTime"] = occurrence
        authored = ts(orc[9], "ORC-9") if orc else None
        if authored:
            res["authoredOn"] = authored
        requesters = (xcn_field(orc, 12, source) if orc else []) or xcn_field(obr, 16, source)
        if requesters:
            res["requester"] = requesters[0]
        reason = cwe_field(obr, 31)
        if reason:
            res["reasonCode"] = [reason]
        note = _notes_after(msg, orc) + _notes_after(msg, obr)
        if note:
            res["note"] = note
        url = full_url(msg.control_id, "ServiceRequest", key)
        mapped.entries.append(conditional_put(res, key_system, key, url))
    if not mapped.entries:
        raise Rejected(
            f"{msg.message_type} holds no OBR: only service orders are mapped (not pharmacy or diet)",
            "OBR",
            unsupported=True,
        )
    return mapped


MAPPERS: dict[str, Mapper] = {"ORM^O01": map_orders, "OML^O21": map_orders}
