"""VXU^V04 (vaccination record update) to Immunization, one per RXA.

| v2 | Immunization |
|---|---|
| ORC-3 filler / ORC-2 placer order number | identifier (``facility_system("immunization", code)``), the conditional PUT key; without either, MSH-10 + RXA position |
| RXA-20 completion status (0322), RXA-21 action code D | status: CP/PA completed, RE/NA not-done, D entered-in-error |
| RXA-18 substance refusal reason | statusReason |
| RXA-5 administered code (CVX, NDC...) | vaccineCode |
| RXA-3 | occurrenceDateTime |
| RXA-6 (999 = unknown) + RXA-7 units | doseQuantity |
| RXA-9 (NIP001: 00 new record, 01 historical) | primarySource |
| RXA-10 administering provider, ORC-12 ordering provider | performer (function AP, OP) |
| RXA-15 / RXA-16 / RXA-17 | lotNumber / expirationDate / manufacturer (display) |
| RXR-1 route, RXR-2 site | route / site |

OBX under an RXA (funding, VIS documents) are not mapped: a warning says so.
Calls: ``mapping.common``.  Called by: ``connectors.hl7v2`` through ``mapping.MAPPERS``.
"""

from __future__ import annotations

from connectors.hl7v2.mapping import Mapper
from connectors.hl7v2.mapping.common import (
    Json,
    coded,
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
from connectors.hl7v2.mapping.oru import number, unit
from connectors.hl7v2.parse import Message, Segment
from connectors.identifiers import facility_system
from connectors.model import Mapped, Rejected, Source

PERFORMER_FUNCTION = "http://terminology.hl7.org/CodeSystem/v2-0443"


def _groups(msg: Message) -> list[tuple[Segment | None, Segment, Segment | None]]:
    """(ORC, RXA, RXR) per administration."""
    out: list[tuple[Segment | None, Segment, Segment | None]] = []
    orc: Segment | None = None
    for seg in msg.segments:
        if seg.name == "ORC":
            orc = seg
        elif seg.name == "RXA":
            rxr = next(
                (s for s in msg.segments[seg.index + 1 :] if s.name in ("RXR", "RXA", "ORC")),
                None,
            )
            out.append((orc, seg, rxr if rxr is not None and rxr.name == "RXR" else None))
            orc = None
    return out


def map_vxu(msg: Message, source: Source) -> Mapped:
    facts = patient(msg, source)
    mapped = Mapped(msg.message_type, msg.control_id, patients=[facts], entries=[])
    groups = _groups(msg)
    if not groups:
        raise Rejected("VXU^V04 has no RXA segment (no vaccination to record)", "RXA")
    system = facility_system("immunization", source.facility_code)
    used: set[str] = set()
    for position, (orc, rxa, rxr) in enumerate(groups, 1):
        where = f"RXA[{position}]"
        key = (orc.text(3) or orc.text(2)) if orc else ""
        if not key or key in used:
            key = f"{msg.control_id}/RXA{position}"
        used.add(key)
        vaccine = cwe_field(rxa, 5)
        if vaccine is None:
            raise Rejected("administered code (RXA-5) is empty", f"{where}-5")
        occurrence = ts(rxa[3], f"{where}-3")
        if occurrence is None:
            raise Rejected("date/time of administration (RXA-3) is empty", f"{where}-3")
        completion = rxa.text(20).upper()
        status = table("immunization")["completion_status"].get(completion, "completed")
        if rxa.text(21).upper() == "D":
            status = "entered-in-error"
        res: Json = {
            "resourceType": "Immunization",
            "identifier": [{"system": system, "value": key}],
            "status": status,
        }
        refusal = cwe_field(rxa, 18)
        if refusal and status == "not-done":
            res["statusReason"] = refusal
        res |= {"vaccineCode": vaccine, "patient": subject(facts), "occurrenceDateTime": occurrence}
        source_code = rxa.text(9)
        if source_code in ("00", "01"):
            res["primarySource"] = source_code == "00"
        lot = rxa.text(15)
        if lot:
            res["lotNumber"] = lot
        expiry = ts(rxa[16], f"{where}-16", date_only=True)
        if expiry:
            res["expirationDate"] = expiry if len(expiry) == 10 else f"{expiry}-01"[:10]
        manufacturer = rxa.text(17, 2) or rxa.text(17, 1)
        if manufacturer:
            res["manufacturer"] = {"display": manufacturer}
        res["location"] = {"display": rxa.text(11, 4)} if rxa.text(11, 4) else None
        if res["location"] is None:
            del res["location"]
        if rxr is not None:
            site = cwe_field(rxr, 2)
            if site:
                res["site"] = site
            route = cwe_field(rxr, 1)
            if route:
                res["route"] = route
        amount = rxa.text(6)
        if amount and amount != "999":
            res["doseQuantity"] = {"value": number(amount, f"{where}-6")} | unit(rxa, 7)
        performers: list[Json] = [
            {"function": coded(PERFORMER_FUNCTION, "AP", "Administering Provider"), "actor": ref}
            for ref in xcn_field(rxa, 10, source)
        ]
        if orc is not None:
            performers += [
                {"function": coded(PERFORMER_FUNCTION, "OP", "Ordering Provider"), "actor": ref}
                for ref in xcn_field(orc, 12, source)
            ]
        if status != "not-done":
            performers.append({"actor": facility(source)})
        res["performer"] = performers
        url = full_url(msg.control_id, "Immunization", key)
        mapped.entries.append(conditional_put(res, system, key, url))
    if msg.all("OBX"):
        mapped.warnings.append("OBX observations of the vaccination (funding, VIS) are not mapped")
    return mapped


MAPPERS: dict[str, Mapper] = {"VXU^V04": map_vxu}
