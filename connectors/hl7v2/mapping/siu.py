"""SIU^S12-S15 (scheduling) to Appointment.

| v2 | Appointment |
|---|---|
| SCH-1 placer / SCH-2 filler appointment id | identifier (``facility_system("appointment", code)``), the conditional PUT key (SCH-2 first: the scheduler's own id) |
| trigger S12 new, S13 rescheduled, S14 modified, S15 cancelled; SCH-25 filler status | status (``fhir/hl7v2/appointment-status.json``: booked, booked, booked, cancelled) |
| SCH-6 event reason, SCH-7 appointment reason | reasonCode |
| SCH-8 appointment type | appointmentType |
| AIS-3 service | serviceType |
| TQ1-7/8 (2.5+), SCH-11.4/.5 (TQ), else AIS-4 + AIS-7 duration (AIS-8 units) | start, end, minutesDuration |
| PID | participant (patient, required) |
| AIP-3 personnel, AIL-3 location, AIG-3 resource | participant (actor as a logical reference or display; status from the trigger) |
| NTE after SCH | comment |

A booked appointment with no start time is refused (FHIR app-3 allows that only for proposed,
cancelled or waitlisted ones).
Calls: ``mapping.common``.  Called by: ``connectors.hl7v2`` through ``mapping.MAPPERS``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from connectors.hl7v2.mapping import Mapper
from connectors.hl7v2.mapping.common import (
    Json,
    conditional_put,
    cwe_field,
    full_url,
    instant,
    notes,
    patient,
    subject,
    table,
    xcn_field,
)
from connectors.hl7v2.parse import Message, Segment
from connectors.identifiers import facility_system
from connectors.model import Mapped, Rejected, Source

_MINUTES = {"MIN": 1, "M": 1, "S": 1 / 60, "SEC": 1 / 60, "H": 60, "HR": 60, "HOUR": 60, "D": 1440}


def _duration_minutes(amount: str, units: str) -> float | None:
    try:
        value = float(amount)
    except ValueError:
        return None
    factor = _MINUTES.get(units.upper() or "MIN")
    return value * factor if factor else None


def _plus_minutes(start: str, minutes: float) -> str:
    return (datetime.fromisoformat(start) + timedelta(minutes=minutes)).isoformat()


def _times(msg: Message, sch: Segment) -> tuple[str | None, str | None, float | None]:
    """(start, end, minutes) from TQ1, SCH-11, or the first AIS/AIL/AIP that has them."""
    tq1 = msg.first("TQ1")
    if tq1 is not None and tq1[7]:
        return instant(tq1[7], "TQ1-7"), instant(tq1[8], "TQ1-8") if tq1[8] else None, None
    if sch.text(11, 4):
        end_raw = sch.text(11, 5)
        return instant(sch.text(11, 4), "SCH-11.4"), instant(end_raw, "SCH-11.5") if end_raw else None, None
    for name, start_n, dur_n, unit_n in (("AIS", 4, 7, 8), ("AIL", 6, 9, 10), ("AIP", 6, 9, 10)):
        for seg in msg.all(name):
            if seg[start_n]:
                begin = instant(seg[start_n], f"{name}-{start_n}")
                minutes = _duration_minutes(seg.text(dur_n), seg.text(unit_n)) if seg[dur_n] else None
                end = _plus_minutes(begin, minutes) if begin and minutes else None
                return begin, end, minutes
    return None, None, None


def map_siu(msg: Message, source: Source) -> Mapped:
    sch = msg.first("SCH")
    if sch is None:
        raise Rejected(f"{msg.message_type} has no SCH segment", "SCH")
    facts = patient(msg, source)
    mapped = Mapped(msg.message_type, msg.control_id, patients=[facts], entries=[])
    system = facility_system("appointment", source.facility_code)
    filler, placer = sch.text(2), sch.text(1)
    identifiers = [{"system": system, "value": v} for v in (filler, placer) if v]
    if not identifiers:
        raise Rejected("appointment has no id (SCH-1 placer, SCH-2 filler)", "SCH-2")
    key = identifiers[0]["value"]
    statuses = table("appointment-status")
    status = statuses["filler_status"].get(sch.text(25)) or statuses["trigger"][msg.trigger]
    if msg.trigger == "S15":
        status = "cancelled"
    res: Json = {"resourceType": "Appointment", "identifier": identifiers, "status": status}
    service = next((c for ais in msg.all("AIS") if (c := cwe_field(ais, 3))), None)
    if service:
        res["serviceType"] = [service]
    appointment_type = cwe_field(sch, 8)
    if appointment_type:
        res["appointmentType"] = appointment_type
    reasons = [c for n in (7, 6) if (c := cwe_field(sch, n))]
    if reasons:
        res["reasonCode"] = reasons
    start, end, minutes = _times(msg, sch)
    if start is None and status not in ("proposed", "cancelled", "waitlist"):
        raise Rejected("a booked appointment needs a start time (TQ1-7, SCH-11.4 or AIS-4)", "AIS-4")
    if start:
        res["start"] = start
        if end:
            res["end"] = end
        else:  # app-2: start and end go together
            res["end"] = start
    if minutes:
        res["minutesDuration"] = max(1, round(minutes))
    comment = "\n".join(n["text"] for n in notes(_after(msg, sch, "NTE", skip={"TQ1", "TQ2"})))
    if comment:
        res["comment"] = comment
    participant_status = "declined" if status == "cancelled" else "accepted"
    participants: list[Json] = [{"actor": subject(facts), "status": participant_status}]
    for aip in msg.all("AIP"):
        for ref in xcn_field(aip, 3, source):
            entry: Json = {"actor": ref, "status": participant_status}
            role = cwe_field(aip, 4)
            if role:
                entry["type"] = [role]
            participants.append(entry)
    for ail in msg.all("AIL"):
        where = ", ".join(p for p in (ail.text(3, i) for i in (1, 2, 3, 4)) if p)
        if where:
            participants.append(
                {"actor": {"type": "Location", "display": where}, "status": participant_status}
            )
    for aig in msg.all("AIG"):
        resource = cwe_field(aig, 3)
        if resource and resource.get("text"):
            participants.append(
                {"actor": {"type": "Device", "display": resource["text"]}, "status": participant_status}
            )
    res["participant"] = participants
    url = full_url(msg.control_id, "Appointment", key)
    mapped.entries.append(conditional_put(res, system, key, url))
    return mapped


def _after(
    msg: Message, seg: Segment, name: str, skip: frozenset[str] | set[str] = frozenset()
) -> list[Segment]:
    """The ``name`` segments right after ``seg`` (segments in ``skip`` may come between)."""
    out: list[Segment] = []
    for nxt in msg.segments[seg.index + 1 :]:
        if nxt.name in skip:
            continue
        if nxt.name != name:
            break
        out.append(nxt)
    return out


REFUSED: dict[str, str] = {
    f"SIU^{t}": f"SIU^{t} ({what}) is not mapped: {why}"
    for t, what, why in (
        ("S16", "discontinue appointment", "the appointment's outcome comes with S15 or an encounter"),
        ("S17", "delete appointment", "the record keeps every version; deletion is manual"),
        ("S26", "patient did not show up", "no-show reporting is not mapped yet"),
    )
}
MAPPERS: dict[str, Mapper] = {f"SIU^{t}": map_siu for t in ("S12", "S13", "S14", "S15")}
