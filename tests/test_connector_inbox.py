"""The connector registry and the durable inbox (connectors.sources, connectors.inbox), on a
database of their own: sources and their facility Organization, receipt in one transaction,
duplicates, a peek that refuses, raw bytes sealed at rest, replay, listings and status.

``TestFormat`` (JSON messages -> Mapped) stands in for the feeds' formats; the pipeline's
tests use it too (registered by name, chosen with the source setting ``format``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from connectors import inbox, sources
from connectors.identifiers import FACILITY, facility_system
from connectors.model import Mapped, PatientFacts, Peek, Rejected, Source
from connectors.pipeline import register_format
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.db.schema import connector_message
from hub.rest import FhirRequest, FhirRouter
from hub.settings import Settings

FORMAT_NAME = "test-json"


class TestFormat:
    """A message is a JSON object: {"type", "control", "patient": {"mrn", "family"},
    "observations": [{"code", "value"}], "fail": "rejected" | "boom" | "invalid"}."""

    __test__ = False  # not a pytest class
    name = FORMAT_NAME

    def peek(self, raw: bytes) -> Peek:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Rejected("not JSON", "body") from None
        if not isinstance(message, dict) or not isinstance(message.get("control"), str):
            raise Rejected("no control id", "control")
        patient = message.get("patient")
        key = f"mrn|{patient['mrn']}" if isinstance(patient, dict) else None
        return Peek(str(message.get("type", "TEST")), message["control"], key)

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        message = orjson.loads(raw)
        fail = message.get("fail")
        if fail == "rejected":
            raise Rejected("value is not a number", "OBX-5", unsupported=False)
        if fail == "boom":
            raise RuntimeError("mapper bug")
        control = message["control"]
        patient = message["patient"]
        placeholder = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, source.name + control)}"
        facts = PatientFacts(
            placeholder,
            {
                "resourceType": "Patient",
                "identifier": [
                    {"system": facility_system("mrn", source.facility_code), "value": patient["mrn"]}
                ],
                "name": [{"family": patient.get("family", "Nguyễn"), "given": ["Văn"]}],
                "gender": "male",
            },
        )
        entries = []
        for position, obs in enumerate(message.get("observations", [])):
            identifier = {"system": facility_system("filler", source.facility_code), "value": obs["id"]}
            resource = {
                "resourceType": "Observation",
                "identifier": [identifier],
                "status": "bogus" if fail == "invalid" else "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": obs["code"]}]},
                "subject": {"reference": placeholder},
                "valueQuantity": {
                    "value": obs["value"],
                    "unit": "mmol/L",
                    "system": "http://unitsofmeasure.org",
                    "code": "mmol/L",
                },
                "performer": [{"reference": f"Organization?identifier={FACILITY}|{source.facility_code}"}],
            }
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{control}/{position}')}",
                    "resource": resource,
                    "request": {
                        "method": "PUT",
                        "url": f"Observation?identifier={identifier['system']}|{identifier['value']}",
                    },
                }
            )
        return [Mapped(str(message.get("type", "TEST")), control, [facts], entries, warnings=["a warning"])]


register_format(TestFormat())


def message(control: str, mrn: str | None = "mrn-1", **extra: Any) -> bytes:
    body: dict[str, Any] = {"type": "ORU^R01", "control": control, **extra}
    if mrn is not None:
        body["patient"] = {"mrn": mrn}
    body.setdefault("observations", [{"id": f"obs-{control}", "code": "2345-7", "value": 5.4}])
    return orjson.dumps(body)


def make_source(name: str, code: str = "64020", **settings: Any) -> Source:
    return Source(
        name=name,
        facility_code=code,
        facility_name=f"Bệnh viện {name}",
        facility_level="provincial",
        kind="hl7v2-mllp",
        settings={"format": FORMAT_NAME, **settings},
    )


@pytest.fixture(scope="module")
def hub(fresh_database_url: Any) -> Iterator[FhirRouter]:
    """A router on a database of this module's own (no other test's messages in its inbox)."""
    router = build_router(Settings(database_url=fresh_database_url("conninbox")))
    yield router
    router.ctx.store.engine.dispose()


def test_add_source_stores_it_and_its_organization(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    added = sources.add(hub, make_source("inbox-org", code="01234"))
    assert added.facility_code == "01234" and added.settings == {"format": FORMAT_NAME}
    assert sources.get(engine, "inbox-org") == added
    assert "inbox-org" in [s.name for s in sources.all_sources(engine)]
    with pytest.raises(sources.SourceError, match="already exists"):
        sources.add(hub, make_source("inbox-org", code="01234"))
    renamed = Source(**{**added.__dict__, "facility_name": "BVĐK tỉnh"})
    sources.add(hub, renamed, replace=True)
    found = hub.handle(
        FhirRequest(
            "GET",
            "Organization",
            query=[("identifier", f"{FACILITY}|01234")],
            principal=system_principal("system:test"),
        )
    )
    bundle = orjson.loads(found.body or b"{}")
    assert found.status == 200 and len(bundle["entry"]) == 1  # upserted, not added twice
    organization = bundle["entry"][0]["resource"]
    assert organization["name"] == "BVĐK tỉnh"
    assert {k: v for k, v in organization["type"][0]["coding"][1].items() if k != "display"} == {
        "system": sources.LEVEL_SYSTEM,
        "code": "provincial",
    }
    assert sources.set_paused(engine, "inbox-org", True).paused
    assert not sources.set_paused(engine, "inbox-org", False).paused
    with pytest.raises(KeyError):
        sources.set_paused(engine, "no-such-source", True)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"name": "Bad Name"}, "source name"),
        ({"facility_code": "1234"}, "facility code"),
        ({"facility_level": "national"}, "facility level"),
        ({"kind": "dicom"}, "kind"),
        ({"settings": {"prot": 2575}}, "setting 'prot'"),
        ({"settings": {"port": 70000}}, "TCP port"),
        ({"settings": {"port": True}}, "wrong type"),
        ({"kind": "fhir-pull", "settings": {}}, "base_url"),
    ],
)
def test_add_source_refuses_what_breaks_a_rule(hub: FhirRouter, change: dict[str, Any], problem: str) -> None:
    source = Source(**{**make_source("rules").__dict__, "settings": {}, **change})
    with pytest.raises(sources.SourceError, match=problem):
        sources.add(hub, source)
    assert sources.get(hub.ctx.store.engine, source.name) is None


def test_receive_stores_each_once_and_refuses_what_peek_cannot_read(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-receive"))
    first, second, broken = message("r-1"), message("r-2", mrn="mrn-2"), b"\x00not json"
    got = inbox.receive(engine, source, [first, second, broken, first])
    assert [r.state for r in got] == ["queued", "queued", "rejected", "queued"]
    assert [r.duplicate for r in got] == [False, False, False, True]
    assert got[3].id == got[0].id and len({got[0].id, got[1].id, got[2].id}) == 3
    assert got[0].peek == Peek("ORU^R01", "r-1", "mrn|mrn-1")
    assert got[2].peek is None and got[2].error == "not JSON"
    again = inbox.receive(engine, source, [second])  # a resend: the stored row
    assert again[0].duplicate and again[0].id == got[1].id
    listed = {m.id: m for m in inbox.messages(engine, source=source.name)}
    assert set(listed) == {got[0].id, got[1].id, got[2].id}
    assert listed[got[2].id].state == "rejected" and listed[got[2].id].error_where == "body"
    assert listed[got[0].id].control_id == "r-1" and listed[got[0].id].message_type == "ORU^R01"
    assert inbox.raw(engine, got[0].id) == first and inbox.raw(engine, got[2].id) == broken
    with pytest.raises(KeyError):
        inbox.raw(engine, 10**9)
    # Same bytes from another source: another message.
    other = sources.add(hub, make_source("inbox-receive-2"))
    assert not inbox.receive(engine, other, [first])[0].duplicate


def test_raw_bytes_and_ordering_key_are_not_stored_in_the_clear(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-sealed"))
    secret = "079123456789"
    body = message("s-1", mrn=secret, note="Nguyễn Thị Hoa")
    received = inbox.receive(engine, source, [body])[0]
    with engine.connect() as conn:
        row = conn.execute(sa.select(connector_message).where(connector_message.c.id == received.id)).one()
    stored = bytes(row.raw)
    assert stored[:2] == b"E1" and b"control" not in stored and secret.encode() not in stored
    assert b"Hoa" not in stored and body not in stored
    assert row.ordering_key is not None and secret not in row.ordering_key and len(row.ordering_key) == 32
    assert inbox.raw(engine, received.id) == body
    # A ciphertext moved to another row fails its integrity check instead of opening.
    other = inbox.receive(engine, source, [message("s-2")])[0]
    with engine.connect() as conn, conn.begin():
        conn.execute(connector_message.update().where(connector_message.c.id == other.id).values(raw=stored))
    with pytest.raises(Exception, match="integrity"):
        inbox.raw(engine, other.id)


def test_replay_by_id_state_and_source(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    one = sources.add(hub, make_source("inbox-replay-a"))
    two = sources.add(hub, make_source("inbox-replay-b"))
    a = inbox.receive(engine, one, [message("p-1"), b"junk-a1", b"junk-a2"])
    b = inbox.receive(engine, two, [b"junk-b1"])
    assert [r.state for r in a + b] == ["queued", "rejected", "rejected", "rejected"]
    with pytest.raises(ValueError):
        inbox.replay(engine)
    assert inbox.replay(engine, ids=[a[1].id]) == 1
    assert [m.state for m in inbox.messages(engine, source=one.name)] == ["rejected", "queued", "queued"]
    assert inbox.replay(engine, state="rejected", source=one.name) == 1
    assert {m.state for m in inbox.messages(engine, source=one.name)} == {"queued"}
    assert inbox.messages(engine, source=two.name)[0].state == "rejected"  # the other source's
    assert inbox.replay(engine, source=two.name) == 1
    summary = inbox.messages(engine, source=two.name)[0]
    assert summary.state == "queued" and summary.error is None and summary.attempts == 0


def test_messages_page_newest_first(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-paging"))
    ids = [r.id for r in inbox.receive(engine, source, [message(f"g-{i}") for i in range(5)])]
    first = inbox.messages(engine, source=source.name, limit=2)
    assert [m.id for m in first] == ids[::-1][:2]
    rest = inbox.messages(engine, source=source.name, limit=10, before_id=first[-1].id)
    assert [m.id for m in rest] == ids[::-1][2:]
    assert inbox.messages(engine, source=source.name, state="rejected") == []
    assert "raw" not in first[0].as_json() and first[0].as_json()["received_at"].endswith("Z")


def test_status_counts_backlog_and_last_error(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-status"))
    assert inbox.status(engine, source.name)[0].backlog == 0
    inbox.receive(engine, source, [message("t-1"), message("t-2"), b"garbage"])
    sources.set_paused(engine, source.name, True)
    inbox.receive(
        engine, sources.get(engine, source.name) or source, [message("t-3")]
    )  # paused: still stored
    (found,) = inbox.status(engine, source.name)
    assert found.paused and found.kind == "hl7v2-mllp" and found.facility_code == "64020"
    assert found.counts["queued"] == 3 and found.counts["rejected"] == 1
    assert found.backlog == 3 and found.failures == 1
    assert found.last_error == "body: not JSON" and found.last_error_at is not None
    assert found.last_received_at is not None and found.last_processed_at is None
    as_json = found.as_json()
    assert as_json["name"] == source.name and as_json["last_received_at"].endswith("Z")
    orjson.dumps(as_json)  # JSON as it is
    assert source.name in {s.name for s in inbox.status(engine)}


def test_status_last_processed_and_recent_rate(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-rate"))
    ids = [r.id for r in inbox.receive(engine, source, [message(f"r-{i}") for i in range(4)])]
    moment = inbox.now()
    m = connector_message.c
    with engine.connect() as conn, conn.begin():
        # Two handled just now, one two minutes ago (outside the 60 s window), one waiting.
        conn.execute(
            connector_message.update().where(m.id.in_(ids[:2])).values(state="processed", processed_at=moment)
        )
        conn.execute(
            connector_message.update()
            .where(m.id == ids[2])
            .values(state="dead", error="gone", processed_at=moment - timedelta(minutes=2))
        )
    (found,) = inbox.status(engine, source.name)
    assert found.counts["processed"] == 2 and found.counts["dead"] == 1 and found.counts["queued"] == 1
    assert found.last_processed_at is not None and abs((found.last_processed_at - moment).total_seconds()) < 1
    assert found.messages_per_second == round(2 / 60, 3)
    assert found.last_error == "gone" and found.backlog == 1 and found.failures == 1


def test_status_reads_indexes_not_the_whole_inbox(hub: FhirRouter) -> None:
    """Every statement inbox.status runs (each /metrics scrape) can be answered from an index:
    with sequential scans made as costly as the planner allows, none reads connector_message
    whole."""
    engine = hub.ctx.store.engine
    source = sources.add(hub, make_source("inbox-plan"))
    inbox.receive(engine, source, [message("plan-1"), b"junk-plan"])
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "connector_message" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert inbox.status(engine) and inbox.status(engine, source.name)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert statements
    postgres = engine.dialect.name == "postgresql"
    plans: list[str] = []
    with engine.connect() as conn:
        if postgres:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in statements:
            explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
            plan = "\n".join(str(row[-1]) for row in conn.exec_driver_sql(explain + statement, parameters))
            plans.append(plan)
            if postgres:
                assert "Seq Scan on connector_message" not in plan, (statement, plan)
                # Each range bounded by its index condition, not walked and filtered.
                assert "Filter: ((state)" not in plan, (statement, plan)
            else:
                # SQLite: "SCAN connector_message" (no index) or a full scan of an index.
                assert "SCAN connector_message" not in plan, (statement, plan)
        conn.rollback()
    # Migration 0009's indexes: counts and windows by (source, state, processed_at), the last
    # error by the partial (source, id) index of rows with an error.
    for index in ("ix_connector_message_source_state_processed_at", "ix_connector_message_source_id_error"):
        assert any(index in plan for plan in plans), (index, plans)


def test_rotate_reencrypt_reseals_inbox_messages_and_source_secrets(
    fresh_database_url: Any, tmp_path: Path
) -> None:
    """``hub keys rotate --reencrypt`` (hub.crypto.admin): the raw bytes of inbox messages and
    the sealed secrets of sources end up under the new data key, and still open."""
    from hub.crypto import admin, keys
    from hub.db.schema import connector_source

    settings = Settings(
        database_url=fresh_database_url("conninbox_keys"), master_key_file=tmp_path / "master.key"
    )
    router = build_router(settings)
    engine = router.ctx.store.engine
    try:
        feed = sources.add(router, make_source("inbox-keys"))
        pull = Source(
            "inbox-keys-pull",
            "64020",
            "Bệnh viện kéo",
            "provincial",
            "fhir-pull",
            {"base_url": "http://127.0.0.1:9/fhir", "token": "secret-token-" + uuid.uuid4().hex},
        )
        sources.add(router, pull)
        bodies = [message(f"k-{i}") for i in range(3)]
        ids = [r.id for r in inbox.receive(engine, feed, bodies)]

        def kids() -> set[str | None]:
            with engine.connect() as conn:
                raws = conn.execute(sa.select(connector_message.c.raw)).scalars().all()
                token = conn.execute(
                    sa.select(connector_source.c.settings).where(connector_source.c.name == pull.name)
                ).scalar_one()["token"]
            assert token.startswith("$sealed:") and pull.settings["token"] not in token
            return {inbox.sealed_kid(bytes(raw)) for raw in raws} | {
                inbox.sealed_kid(base64.b64decode(token.removeprefix("$sealed:")))
            }

        (before,) = kids()
        admin.rotate(engine, settings)
        report = admin.reencrypt(engine)
        active, _ = keys.keyring_for(engine).active()
        assert active != before and kids() == {active}
        assert (report.messages, report.sources) == (3, 1)
        assert [inbox.raw(engine, i) for i in ids] == bodies
        assert (sources.get(engine, pull.name) or feed).settings["token"] == pull.settings["token"]
        again = admin.reencrypt(engine)  # nothing left under an older key
        assert (again.messages, again.sources) == (0, 0)
    finally:
        engine.dispose()
