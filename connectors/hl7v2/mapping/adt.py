"""ADT (patient administration) to Patient and Encounter: the mapping table of ADT events.

| event | what the hub does |
|---|---|
| A01 admit, A04 register | Patient; Encounter in-progress (A01) / arrived (A04) |
| A02 transfer, A06 out->in, A07 in->out | Patient; Encounter in-progress at the new location/class |
| A03 discharge | Patient; Encounter finished, period end PV1-45 (else EVN-2) |
| A05 pre-admit | Patient; Encounter planned |
| A08 update | Patient; Encounter as PV1 says (finished when PV1-45 is set) |
| A11 cancel admit | Patient; Encounter cancelled |
| A13 cancel discharge | Patient; Encounter in-progress again (no end) |
| A28 add person, A31 update person | Patient only |
| A40 merge | Patient (survivor) + ``Mapped.merges`` from MRG-1 |
| others | refused (AR) with the reason in ``REFUSED`` |

The Encounter is a conditional PUT on the visit number (PV1-19, system
``facility_system("visit", code)``), so every event of one visit updates one Encounter; a
message without a visit number identifies its Encounter by MSH-10 (``"message"`` system).
Calls: ``mapping.common``.  Called by: ``connectors.hl7v2`` through ``mapping.MAPPERS``.
"""

from __future__ import annotations

from connectors.hl7v2.mapping import Mapper
from connectors.hl7v2.mapping.common import (
    Json,
    classify,
    conditional_put,
    cwe_field,
    facility,
    full_url,
    patient,
    subject,
    table,
    ts,
    xcn_field,
)
from connectors.hl7v2.parse import Message, Segment
from connectors.identifiers import BHXH, BHYT, CCCD, facility_system
from connectors.model import Mapped, Rejected, Source

# ADT event -> Encounter.status (None: the event carries no Encounter).
ENCOUNTER_STATUS: dict[str, str | None] = {
    "A01": "in-progress",
    "A02": "in-progress",
    "A03": "finished",
    "A04": "arrived",
    "A05": "planned",
    "A06": "in-progress",
    "A07": "in-progress",
    "A08": "in-progress",
    "A11": "cancelled",
    "A13": "in-progress",
    "A28": None,
    "A31": None,
}
REFUSED: dict[str, str] = {
    f"ADT^{t}": f"ADT^{t} ({what}) is not mapped: {why}"
    for t, what, why in (
        ("A09", "patient departing - tracking", "patient tracking is not part of the record"),
        ("A10", "patient arriving - tracking", "patient tracking is not part of the record"),
        ("A12", "cancel transfer", "transfer history is not kept, only the current location"),
        ("A14", "pending admit", "pending events are not part of the record"),
        ("A15", "pending transfer", "pending events are not part of the record"),
        ("A16", "pending discharge", "pending events are not part of the record"),
        ("A25", "cancel pending discharge", "pending events are not part of the record"),
        ("A26", "cancel pending transfer", "pending events are not part of the record"),
        ("A27", "cancel pending admit", "pending events are not part of the record"),
        ("A29", "delete person information", "the record keeps every version; deletion is manual"),
        ("A41", "merge account", "accounts are not part of the record; A40 merges patients"),
        ("A45", "move visit information", "moving visits between accounts is not supported"),
        ("A47", "change patient identifier list", "identifier changes go through A40 merge"),
        ("A60", "update allergy information", "allergies over ADT are not mapped yet"),
    )
}
_PARTICIPANTS = (
    (7, "ATND", "attender"),
    (8, "REF", "referrer"),
    (9, "CON", "consultant"),
    (17, "ADM", "admitter"),
)


def _location(pv1: Segment) -> str:
    """PV1-3 (PL: point of care^room^bed^facility^...^building^floor) as text."""
    parts = [pv1.text(3, i) for i in (1, 2, 3, 4, 7, 8)]
    labels = ("", "room ", "bed ", "", "building ", "floor ")
    return ", ".join(f"{label}{p}" for label, p in zip(labels, parts, strict=True) if p)


def encounter(msg: Message, source: Source, pv1: Segment, status: str, patient_ref: str) -> Json:
    """The transaction entry of the Encounter of PV1 (conditional PUT on its visit number)."""
    code = source.facility_code
    visit = pv1.text(19)
    system, value = (
        (facility_system("visit", code), visit)
        if visit
        else (facility_system("message", code), msg.control_id)
    )
    klass = pv1.text(2).upper()
    act = table("patient-class").get(klass, ["AMB", "ambulatory"])
    res: Json = {
        "resourceType": "Encounter",
        "identifier": [{"use": "official", "system": system, "value": value}],
        "status": status,
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": act[0],
            "display": act[1],
        },
    }
    hospital_service = pv1.text(10)
    if hospital_service:
        res["serviceType"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0069", "code": hospital_service}]
        }
    res["subject"] = {"reference": patient_ref}
    participants: list[Json] = []
    for n, role, display in _PARTICIPANTS:
        for ref in xcn_field(pv1, n, source):
            participants.append(
                {
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": role,
                                    "display": display,
                                }
                            ]
                        }
                    ],
                    "individual": ref,
                }
            )
    if participants:
        res["participant"] = participants
    start = ts(pv1[44], "PV1-44")
    evn = msg.first("EVN")
    event_time = ts(evn[6], "EVN-6") or ts(evn[2], "EVN-2") if evn else None
    end = ts(pv1[45], "PV1-45")
    if status == "finished" and not end:
        end = event_time or ts(msg.msh[7], "MSH-7")
    if status in ("in-progress", "arrived") and not start and msg.trigger in ("A01", "A04"):
        start = event_time
    period: Json = {}
    if start:
        period["start"] = start
    if end and status in ("finished", "cancelled") or (end and msg.trigger == "A08"):
        period["end"] = end
        if msg.trigger == "A08":
            res["status"] = "finished"
    if period:
        if "start" in period and "end" in period and period["end"] < period["start"]:
            raise Rejected(f"discharge {period['end']} is before admission {period['start']}", "PV1-45")
        res["period"] = period
    pv2 = msg.first("PV2")
    reason = (
        cwe_field(
            pv2,
            3,
        )
        if pv2
        else None
    )
    if reason:
        res["reasonCode"] = [reason]
    hospitalization: Json = {}
    admit_source = pv1.text(14)
    if admit_source:
        hospitalization["admitSource"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0023", "code": admit_source}]
        }
    disposition = pv1.text(36)
    if disposition:
        hospitalization["dischargeDisposition"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0112", "code": disposition}]
        }
    if hospitalization:
        res["hospitalization"] = hospitalization
    location = _location(pv1)
    if location:
        res["location"] = [
            {"location": {"display": location}, "status": "completed" if status == "finished" else "active"}
        ]
    res["serviceProvider"] = facility(source)
    return conditional_put(res, system, value, full_url(msg.control_id, "Encounter", pv1.index))


def _merge_identifiers(mrg: Segment, source: Source) -> list[Json]:
    """The retired patient's identifiers (MRG-1, else MRG-4 patient id) in the hub's systems."""
    out: list[Json] = []
    for n in (1, 4):
        for rep in mrg.reps(n):
            got = classify(rep, mrg)
            if not got:
                continue
            kind, value = got
            system = {"cccd": CCCD, "bhyt": BHYT, "bhxh": BHXH}.get(kind) or facility_system(
                "mrn", source.facility_code
            )
            out.append({"system": system, "value": value})
        if out:
            break
    return out


def map_adt(msg: Message, source: Source) -> Mapped:
    trigger = msg.trigger
    mapped = Mapped(msg.message_type, msg.control_id, patients=[], entries=[])
    if trigger == "A40":
        # One or more PID/MRG pairs: each PID survives, its MRG names the retired record.
        for pid in msg.all("PID"):
            facts = patient(msg, source, pid)
            mapped.patients.append(facts)
            mrg = next((s for s in msg.segments[pid.index + 1 :] if s.name in ("MRG", "PID")), None)
            if mrg is None or mrg.name != "MRG":
                raise Rejected("A40 needs an MRG segment after each PID", f"PID[{len(mapped.patients)}]")
            retired = _merge_identifiers(mrg, source)
            if not retired:
                raise Rejected("MRG-1 holds no identifier the hub can use", "MRG-1")
            mapped.merges.append((facts.placeholder, retired))
        return mapped
    facts = patient(msg, source)
    mapped.patients.append(facts)
    status = ENCOUNTER_STATUS[trigger]
    if status is None:
        return mapped
    pv1 = msg.first("PV1")
    if pv1 is None:
        raise Rejected(f"ADT^{trigger} needs a PV1 segment", "PV1")
    mapped.entries.append(encounter(msg, source, pv1, status, subject(facts)["reference"]))
    return mapped


MAPPERS: dict[str, Mapper] = {f"ADT^{t}": map_adt for t in (*ENCOUNTER_STATUS, "A40")}
