"""Combined units (connectors.pipeline): the messages of a batch written in few transactions,
on a database of its own. Each message keeps its Provenance and its inbox outcome; a poison
message in a unit rejects only itself; messages whose writes meet (one conditional resource,
one new citizen known by different identifiers) never share a transaction, so nothing is
created twice; order per ordering key holds across the rounds of a batch; the AuditEvents of
a combined transaction still name the connector and, each, one patient's resources.

The messages are JSON in this module's own format (``batch-json``): every field chosen by
the test, ordering key included.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from connectors import inbox, sources
from connectors.identifiers import CCCD, facility_system
from connectors.model import Mapped, PatientFacts, Peek, Rejected, Source
from connectors.pipeline import Pipeline, provenance_id, register_format
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.rest import FhirRequest, FhirRouter
from hub.settings import Settings

FORMAT = "batch-json"
CODE = "64031"


class BatchFormat:
    """{"control", "key", "family", "ids": [[system, value]...], "obs": ["filler id"...],
    "invalid": bool}: one patient, an Observation per filler id (a conditional PUT on it)."""

    name = FORMAT

    def peek(self, raw: bytes) -> Peek:
        body = orjson.loads(raw)
        if not isinstance(body, dict) or "control" not in body:
            raise Rejected("no control id", "control")
        return Peek("ORU^R01", body["control"], body.get("key"))

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        body = orjson.loads(raw)
        control = body["control"]
        placeholder = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, source.name + control)}"
        patient = {
            "resourceType": "Patient",
            "identifier": [{"system": system, "value": value} for system, value in body["ids"]],
            "name": [{"family": body.get("family", "Trần"), "given": ["Thị"]}],
            "gender": "female",
        }
        entries = []
        for filler in body.get("obs", []):
            identifier = {"system": facility_system("filler", source.facility_code), "value": filler}
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                    "resource": {
                        "resourceType": "Observation",
                        "identifier": [identifier],
                        "status": "bogus" if body.get("invalid") else "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                        "subject": {"reference": placeholder},
                        "valueQuantity": {"value": body.get("value", 5.0), "unit": "mmol/L"},
                    },
                    "request": {
                        "method": "PUT",
                        "url": f"Observation?identifier={identifier['system']}|{filler}",
                    },
                }
            )
        return [Mapped("ORU^R01", control, [PatientFacts(placeholder, patient)], entries)]


register_format(BatchFormat())


@pytest.fixture(scope="module")
def hub(fresh_database_url: Any) -> Iterator[FhirRouter]:
    router = build_router(Settings(database_url=fresh_database_url("connbatch")))
    yield router
    router.ctx.store.engine.dispose()


def _source(router: FhirRouter, name: str) -> Source:
    return sources.add(
        router,
        Source(name, CODE, "TTYT huyện Chư Sê", "district", "hl7v2-mllp", settings={"format": FORMAT}),
    )


def _mrn(value: str) -> list[str]:
    return [facility_system("mrn", CODE), value]


def _msg(control: str, key: str, ids: list[list[str]], obs: list[str], **extra: Any) -> bytes:
    return orjson.dumps({"control": control, "key": key, "ids": ids, "obs": obs, **extra})


def _search(router: FhirRouter, res_type: str, **query: str) -> list[dict[str, Any]]:
    response = router.handle(
        FhirRequest("GET", res_type, query=list(query.items()), principal=system_principal("system:test"))
    )
    assert response.status == 200, response.body
    return [e["resource"] for e in orjson.loads(response.body or b"{}").get("entry", [])]


def _receive(router: FhirRouter, source: Source, raws: list[bytes]) -> list[int]:
    return [r.id for r in inbox.receive(router.ctx.store.engine, source, raws)]


def test_a_batch_shares_transactions_and_keeps_each_message_its_own(hub: FhirRouter) -> None:
    source = _source(hub, "batch-many")
    tag = uuid.uuid4().hex[:6]
    raws = [_msg(f"m-{tag}-{i}", f"k{i}", [_mrn(f"{tag}-{i}")], [f"{tag}-o{i}"]) for i in range(20)]
    ids = _receive(hub, source, raws)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    engine = hub.ctx.store.engine
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        outcomes = Pipeline(hub).process_ids(ids)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert [outcomes[i].state for i in ids] == ["processed"] * 20
    # One message per transaction took ~46 statements a message; a combined unit shares
    # the transaction's fixed costs (plan, locks, bulk insert, audit, marks).
    assert statements[0] < 20 * 15, statements[0]

    for n, message_id in enumerate(ids):
        outcome = outcomes[message_id]
        types = sorted(r.split("/")[0] for r in outcome.resources if not r.startswith("Flag/"))
        assert types == ["Observation", "Patient", "Provenance"], outcome.resources
        (provenance,) = _search(hub, "Provenance", _id=provenance_id(source.name, f"m-{tag}-{n}"))
        # Its own message's resources, none of its unit neighbours'.
        assert sorted(t["reference"] for t in provenance["target"]) == sorted(
            r for r in outcome.resources if r.split("/")[0] in ("Patient", "Observation")
        )
        (patient,) = _search(hub, "Patient", identifier="|".join(_mrn(f"{tag}-{n}")))
        assert f"Patient/{patient['id']}" in outcome.resources
        # The AuditEvents of the combined transaction: by the connector's access, one per
        # patient, naming that patient's resources and no other message's.
        events = [
            e
            for e in _search(hub, "AuditEvent", patient=f"Patient/{patient['id']}")
            if any(a.get("name") == f"system:connector-{source.name}" for a in e["agent"])
        ]
        assert len(events) == 1
        named = orjson.dumps(events[0]).decode()
        assert all(r in named for r in outcome.resources if r.split("/")[0] in ("Patient", "Observation"))
        others = [r for i in ids if i != message_id for r in outcomes[i].resources]
        assert not any(r in named for r in others if r.startswith(("Patient/", "Observation/")))
    summaries = {m.id: m for m in inbox.messages(engine, source=source.name)}
    assert all(summaries[i].state == "processed" for i in ids)
    assert sorted(summaries[ids[3]].resources) == sorted(outcomes[ids[3]].resources)


def test_a_poison_message_in_a_unit_rejects_only_itself(hub: FhirRouter) -> None:
    source = _source(hub, "batch-poison")
    tag = uuid.uuid4().hex[:6]
    raws = [
        _msg(f"p-{tag}-{i}", f"pk{i}", [_mrn(f"p{tag}-{i}")], [f"p{tag}-o{i}"], invalid=(i == 2))
        for i in range(5)
    ]
    ids = _receive(hub, source, raws)
    outcomes = Pipeline(hub).process_ids(ids)
    assert [outcomes[i].state for i in ids] == [
        "processed",
        "processed",
        "rejected",
        "processed",
        "processed",
    ]
    rejected = outcomes[ids[2]]
    assert rejected.error and "bogus" in rejected.error and rejected.resources == []
    # Its error names its entry in its own transaction (Patient, Flag, Observation...), not
    # in the combined one (where two messages' entries come before it).
    assert rejected.where == "Observation.status"
    assert int(rejected.error.removeprefix("Bundle.entry[").split("]")[0]) < 4, rejected.error
    assert not _search(hub, "Patient", identifier="|".join(_mrn(f"p{tag}-2")))
    for n in (0, 1, 3, 4):
        (observation,) = _search(
            hub, "Observation", identifier=f"{facility_system('filler', CODE)}|p{tag}-o{n}"
        )
        assert observation["status"] == "final"


def test_messages_that_write_the_same_thing_never_share_a_transaction(hub: FhirRouter) -> None:
    source = _source(hub, "batch-clash")
    tag = uuid.uuid4().hex[:6]
    cccd = f"0{int(tag, 16) % 10**11:011d}"
    raws = [
        # Two patients' messages naming one Observation (one filler id): a conditional
        # update each; in one transaction both would create it.
        _msg(f"c-{tag}-1", "ck1", [_mrn(f"c{tag}-1")], [f"c{tag}-shared"], value=1.0),
        _msg(f"c-{tag}-2", "ck2", [_mrn(f"c{tag}-2")], [f"c{tag}-shared"], value=2.0),
        # One new citizen under two ordering keys, known by a shared identifier (a CCCD
        # and the MRNs of two facility systems): one Patient, not two.
        _msg(f"c-{tag}-3", "ck3", [[CCCD, cccd], _mrn(f"c{tag}-3")], []),
        _msg(f"c-{tag}-4", "ck4", [[CCCD, cccd]], [f"c{tag}-o4"]),
    ]
    ids = _receive(hub, source, raws)
    outcomes = Pipeline(hub).process_ids(ids)
    assert [outcomes[i].state for i in ids] == ["processed"] * 4
    (shared,) = _search(hub, "Observation", identifier=f"{facility_system('filler', CODE)}|c{tag}-shared")
    assert shared["valueQuantity"]["value"] == 2.0  # the later message, written after
    (citizen,) = _search(hub, "Patient", identifier=f"{CCCD}|{cccd}")
    assert f"Patient/{citizen['id']}" in outcomes[ids[2]].resources
    assert f"Patient/{citizen['id']}" in outcomes[ids[3]].resources


def test_order_per_key_holds_across_the_rounds_of_a_batch(hub: FhirRouter) -> None:
    source = _source(hub, "batch-order")
    tag = uuid.uuid4().hex[:6]
    raws = []
    for round_ in range(3):
        for n in range(4):
            raws.append(
                _msg(f"o-{tag}-{n}-{round_}", f"ok{n}", [_mrn(f"o{tag}-{n}")], [], family=f"Round{round_}")
            )
    ids = _receive(hub, source, raws)
    outcomes = Pipeline(hub).process_ids(ids)
    assert all(outcomes[i].state == "processed" for i in ids)
    for n in range(4):
        (patient,) = _search(hub, "Patient", identifier="|".join(_mrn(f"o{tag}-{n}")))
        assert patient["name"][0]["family"] == "Round2"
        assert patient["meta"]["versionId"] == "3"  # three versions, in the messages' order


def test_a_batch_whose_messages_all_meet_is_written_in_order(hub: FhirRouter) -> None:
    # Ten patients' messages updating one Observation: a round per message (the unit closes
    # after a few refusals instead of preparing every remaining message each round).
    source = _source(hub, "batch-meet")
    tag = uuid.uuid4().hex[:6]
    raws = [
        _msg(f"e-{tag}-{i}", f"ek{i}", [_mrn(f"e{tag}-{i}")], [f"e{tag}-shared"], value=float(i))
        for i in range(10)
    ]
    ids = _receive(hub, source, raws)
    outcomes = Pipeline(hub).process_ids(ids)
    assert [outcomes[i].state for i in ids] == ["processed"] * 10
    (shared,) = _search(hub, "Observation", identifier=f"{facility_system('filler', CODE)}|e{tag}-shared")
    assert shared["valueQuantity"]["value"] == 9.0 and shared["meta"]["versionId"] == "10"
