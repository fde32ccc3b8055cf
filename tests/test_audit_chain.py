"""The audit trail: AuditEvents are valid R4, searchable, chained, and tampering shows.

One database for the module. Each tamper test records its own events, changes the
database behind the hub's back with plain SQL, checks what ``verify_chain`` reports, and
puts the database back so the next test starts from an intact trail.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import backend
from fhir.resources.R4B.auditevent import AuditEvent
from test_output_validity import validator  # noqa: F401  (the shared validator, a fixture)
from typer.testing import CliRunner

from hub.app_factory import build_router
from hub.audit import APPEND_ONLY_TYPES
from hub.audit.events import MAX_ENTITIES, AccessEvent, build_audit_event
from hub.audit.trail import GENESIS, AuditTrail, content_digest, link
from hub.audit.verify import verify_chain
from hub.auth.principal import Principal, Role, system_principal
from hub.auth.scopes import ScopeSet
from hub.crypto import keys
from hub.crypto.envelope import is_sealed, open_content
from hub.db.engine import create_engine
from hub.db.schema import (
    audit_chain,
    compartment,
    idx_reference,
    idx_reference_audit,
    resource,
    resource_history,
)
from hub.rest import FhirRequest, FhirRouter
from hub.search.index import extract_index_rows
from hub.search.registry import get_registry
from hub.settings import Settings
from hub.store import Store, writer
from hub.store.records import NewResource, finalize, now

BASE = "http://hub.test/fhir"


def clinician(practitioner: str = "Practitioner/dr-an") -> Principal:
    return Principal(
        subject="dr.an",
        role=Role.CLINICIAN,
        scopes=ScopeSet.parse("user/*.rs"),
        fhir_user=practitioner,
        organizations=("org-1",),
        token_id="jti-123",
        client_id="his-bach-mai",
        issuer="http://127.0.0.1:8000/auth",
    )


def read_event(patient: str, **changes: Any) -> AccessEvent:
    values: dict[str, Any] = {
        "principal": clinician(),
        "interaction": "read",
        "action": "R",
        "resource_type": "Patient",
        "resource_id": patient,
        "patients": [patient],
        "client_address": "10.1.2.3",
    }
    values.update(changes)
    return AccessEvent(**values)


# --- the AuditEvent shapes ----------------------------------------------------------------

SHAPES: dict[str, AccessEvent] = {
    "read": read_event("p1"),
    "search": AccessEvent(
        principal=clinician(),
        interaction="search-type",
        action="E",
        resource_type="Observation",
        query="patient=p1&code=http://loinc.org|8867-4",
        patients=["p1", "Patient/p2"],
        entities=[f"Observation/o{i}" for i in range(MAX_ENTITIES + 20)],
        purpose="TREAT",
    ),
    "break-glass": read_event(
        "p3", purpose="ETREAT", break_glass_reason="Unconscious in the ER", break_glass_id=7
    ),
    "everything": AccessEvent(
        principal=clinician(),
        interaction="operation",
        action="E",
        resource_type="Patient",
        resource_id="p1",
        operation="$everything",
        patients=["p1"],
    ),
    "export": AccessEvent(
        principal=system_principal(),
        interaction="operation",
        action="E",
        operation="$export",
        query="_type=Patient",
        purpose="PUBHLTH",
    ),
    "create-forbidden": AccessEvent(
        principal=Principal("citizen", Role.PATIENT, ScopeSet.parse("patient/*.rs"), fhir_user="Patient/p9"),
        interaction="create",
        action="C",
        resource_type="Observation",
        outcome_status=403,
        purpose="PATRQT",
    ),
    "transaction-error": AccessEvent(
        principal=system_principal(),
        interaction="transaction",
        action="E",
        entities=["Patient/p4", "Encounter/e4"],
        patients=["p4"],
        outcome_status=500,
        purpose="HOPERAT",
    ),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_audit_event_is_valid_r4(name: str) -> None:
    built = build_audit_event(SHAPES[name], BASE, "Test hub")
    AuditEvent.model_validate({**built, "id": "x"})
    assert built["type"]["code"] == "rest"
    assert built["subtype"][0] == {
        "system": "http://hl7.org/fhir/restful-interaction",
        "code": SHAPES[name].interaction,
        "display": SHAPES[name].interaction,
    }
    assert {"system": "https://ehealth-hub.vn/fhir/CodeSystem/hub-tags", "code": "audit"}.items() <= (
        built["meta"]["tag"][0].items()
    )
    assert sum(agent["requestor"] for agent in built["agent"]) == 1


def test_audit_event_details() -> None:
    search = build_audit_event(SHAPES["search"], BASE, "Test hub")
    patients = [e["what"]["reference"] for e in search["entity"] if e.get("role", {}).get("code") == "1"]
    assert patients == ["Patient/p1", "Patient/p2"]
    query = search["entity"][0]
    assert query["role"]["code"] == "24" and "what" not in query
    assert base64.b64decode(query["query"]).decode() == f"Observation?{SHAPES['search'].query}"
    details = {d["type"]: d["valueString"] for d in query["detail"]}
    assert details == {"entities-touched": str(MAX_ENTITIES + 20), "entities-omitted": "20"}
    observations = [e for e in search["entity"][1:] if e["what"]["reference"].startswith("Observation/")]
    assert len(observations) == MAX_ENTITIES

    glass = build_audit_event(SHAPES["break-glass"], BASE, "Test hub")
    assert glass["meta"]["security"][0]["code"] == "BTG"
    assert [p["coding"][0]["code"] for p in glass["purposeOfEvent"]] == ["ETREAT"]
    assert {"type": "break-glass-reason", "valueString": "Unconscious in the ER"} in glass["entity"][0][
        "detail"
    ]

    assert build_audit_event(SHAPES["create-forbidden"], BASE, "h")["outcome"] == "4"
    assert build_audit_event(SHAPES["transaction-error"], BASE, "h")["outcome"] == "8"
    with pytest.raises(ValueError):
        build_audit_event(read_event("p1", interaction="peek"), BASE, "h")


def test_append_only_types() -> None:
    assert "AuditEvent" in APPEND_ONLY_TYPES


# --- the trail in a database ----------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_url(fresh_database_url) -> str:  # type: ignore[no-untyped-def]
    return fresh_database_url("audit_chain")


@pytest.fixture(scope="module")
def audit_engine(audit_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(audit_url)
    keys.configure(Settings(database_url=audit_url), engine)  # its keyring, as the app factory makes it
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def audit_router(audit_engine: sa.Engine) -> FhirRouter:
    return build_router(Settings(database_url=str(audit_engine.url), base_url=BASE), audit_engine)


@pytest.fixture(scope="module")
def trail(audit_engine: sa.Engine) -> AuditTrail:
    return AuditTrail(Store(audit_engine, get_registry()), BASE)


def assert_intact(engine: sa.Engine) -> None:
    report = verify_chain(engine)
    assert report.ok, report.problems


def test_record_and_verify(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    before = verify_chain(audit_engine)
    ids = trail.record([read_event(f"rv-{i}") for i in range(5)])
    ids += trail.record([SHAPES[name] for name in sorted(SHAPES)])
    assert len(set(ids)) == len(ids) == 5 + len(SHAPES)
    report = verify_chain(audit_engine)
    assert report.ok, report.problems
    assert report.verified == before.verified + len(ids)
    assert report.head_seq == report.verified
    with audit_engine.connect() as conn:
        rows = conn.execute(sa.select(audit_chain).order_by(audit_chain.c.seq)).all()
        stored = dict(
            conn.execute(
                sa.select(resource.c.res_id, resource.c.content).where(resource.c.res_type == "AuditEvent")
            ).all()
        )
    # Stored encrypted (issue 8: the trail holds queries, token ids and addresses)...
    assert all(is_sealed(_raw(content)) for content in stored.values())
    assert b"10.1.2.3" not in _raw(stored[ids[0]]) and b"jti-123" not in _raw(stored[ids[0]])
    stored = {res_id: _plain(audit_engine, res_id, content) for res_id, content in stored.items()}
    # ...and the chain arithmetic, recomputed here from its definition over the plaintext.
    previous = GENESIS
    for row in rows:
        assert row.digest == content_digest(stored[row.res_id])
        assert row.chain == link(previous, row.digest)
        previous = row.chain
    assert [r.res_id for r in rows[-len(ids) :]] == ids
    assert previous == report.head
    # Stored without validation, so check what was stored is valid too.
    AuditEvent.model_validate(orjson.loads(stored[ids[-1]]))


def test_stored_audit_events_pass_the_shared_validator(
    trail: AuditTrail,
    audit_engine: sa.Engine,
    validator: Any,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    ids = trail.record([SHAPES[name] for name in sorted(SHAPES)])
    with audit_engine.connect() as conn:
        stored = conn.execute(
            sa.select(resource.c.content).where(
                resource.c.res_type == "AuditEvent", resource.c.res_id.in_(ids)
            )
        ).scalars()
        lines = [_plain(audit_engine, "", content).decode() for content in stored]
    assert len(lines) == len(SHAPES)
    out = tmp_path / "audit-events.ndjson"
    out.write_text("\n".join(lines) + "\n")
    code, report = validator(out)
    assert code == 0, report


def test_record_in_rolls_back_with_the_caller(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    head = verify_chain(audit_engine).head
    with pytest.raises(RuntimeError), trail.store.write() as conn:
        trail.record_in(conn, [read_event("rollback")])
        raise RuntimeError("the data write failed")
    report = verify_chain(audit_engine)
    assert report.ok and report.head == head


def test_concurrent_appends_serialize(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    before = verify_chain(audit_engine).verified
    threads, per_thread, errors = 4, 10, []

    def work(n: int) -> None:
        try:
            for i in range(per_thread):
                events = [read_event(f"conc-{n}-{i}")] * (1 + i % 3)
                trail.record(events)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    report = verify_chain(audit_engine)
    assert report.ok, report.problems
    assert report.verified == before + threads * sum(1 + i % 3 for i in range(per_thread))


def test_search_finds_audit_events(trail: AuditTrail, audit_router: FhirRouter) -> None:
    patient, practitioner = f"pat-{uuid.uuid4().hex[:8]}", f"Practitioner/{uuid.uuid4().hex[:8]}"
    ids = trail.record(
        [
            read_event(patient, principal=clinician(practitioner)),
            read_event(patient, purpose="ETREAT", break_glass_reason="ER", break_glass_id=1),
            AccessEvent(
                principal=clinician(practitioner),
                interaction="search-type",
                action="E",
                resource_type="Observation",
                query=f"patient={patient}",
                patients=[patient],
                entities=[f"Observation/{patient}-obs"],
            ),
            read_event("somebody-else"),
        ]
    )

    def search(*query: tuple[str, str]) -> set[str]:
        """The ids found among ours: each search is itself audited by the router, and
        reading AuditEvents about a patient is a disclosure about that patient too."""
        response = audit_router.handle(
            FhirRequest("GET", "AuditEvent", [*query, ("_count", "100")], principal=system_principal())
        )
        assert response.status == 200, response.body
        assert response.body is not None
        return {e["resource"]["id"] for e in orjson.loads(response.body).get("entry", [])} & set(ids)

    assert search(("patient", patient)) == set(ids[:3])
    assert search(("patient", f"Patient/{patient}")) == set(ids[:3])
    assert search(("agent", practitioner)) == {ids[0], ids[2]}
    assert search(("patient", patient), ("subtype", "search-type")) == {ids[2]}
    assert search(("entity", f"Observation/{patient}-obs")) == {ids[2]}
    assert search(("patient", patient), ("purpose", "ETREAT")) == {ids[1]}
    assert search(("patient", patient), ("_security", "BTG")) == {ids[1]}
    today = datetime.now(UTC).date().isoformat()
    assert search(("patient", patient), ("date", f"ge{today}")) == set(ids[:3])
    assert search(
        ("patient", patient), ("_tag", "https://ehealth-hub.vn/fhir/CodeSystem/hub-tags|audit")
    ) == set(ids[:3])


# --- tampering ------------------------------------------------------------------------------


def _chain_row(engine: sa.Engine, res_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(audit_chain).where(audit_chain.c.res_id == res_id)).one()


def _resource_row(engine: sa.Engine, res_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(resource).where(resource.c.res_type == "AuditEvent", resource.c.res_id == res_id)
        ).one()


def _kinds(engine: sa.Engine) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in verify_chain(engine).problems]


def _text(content: bytes | str) -> str:
    """The content column as the drivers take it back (psycopg returns jsonb as bytes)."""
    return content.decode() if isinstance(content, bytes) else content


def _raw(content: bytes | str) -> bytes:
    return content.encode() if isinstance(content, str) else content


def _plain(engine: sa.Engine, res_id: str, content: bytes | str) -> bytes:
    """The AuditEvent as recorded (they are stored sealed): opened with the database's keys.
    The id comes from the envelope when not given."""
    raw = _raw(content)
    with keys.bound(engine):
        return open_content(raw, "AuditEvent", res_id or orjson.loads(raw)["id"])


def _restore_resource(engine: sa.Engine, row: Any) -> None:
    """Put a resource row back as it was, with the index rows its content implies."""
    with keys.bound(engine), engine.begin() as conn:
        writer.delete_index_rows(conn, row.pid)
        conn.execute(resource.delete().where(resource.c.pid == row.pid))
        conn.execute(resource.insert().values({**row._asdict(), "content": _text(row.content)}))
        document = orjson.loads(_plain(engine, row.res_id, row.content))
        rows = extract_index_rows(get_registry(), "AuditEvent", document)
        item = NewResource("AuditEvent", row.res_id, 1, row.last_updated, b"", rows)
        writer.insert_index_rows(conn, [row.pid], [item])


def test_edited_content(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    ids = trail.record([read_event(f"edit-{i}") for i in range(3)])
    seq = _chain_row(audit_engine, ids[1]).seq
    original = _resource_row(audit_engine, ids[1])
    edited = orjson.loads(_plain(audit_engine, ids[1], original.content))
    edited["entity"][0]["what"]["reference"] = "Patient/someone-else"
    with audit_engine.begin() as conn:
        conn.execute(
            resource.update()
            .where(resource.c.pid == original.pid)
            .values(content=orjson.dumps(edited).decode())
        )
    try:
        report = verify_chain(audit_engine)
        assert not report.ok
        assert report.first_broken is not None
        assert (report.first_broken.kind, report.first_broken.seq) == ("edited", seq)
        assert _kinds(audit_engine) == [("edited", seq)]
    finally:
        with audit_engine.begin() as conn:
            conn.execute(
                resource.update()
                .where(resource.c.pid == original.pid)
                .values(content=_text(original.content))
            )
    assert_intact(audit_engine)


def test_deleted_resource_row(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    ids = trail.record([read_event(f"del-{i}") for i in range(3)])
    seq = _chain_row(audit_engine, ids[0]).seq
    original = _resource_row(audit_engine, ids[0])
    with audit_engine.begin() as conn:
        conn.execute(resource.delete().where(resource.c.pid == original.pid))
    try:
        assert _kinds(audit_engine) == [("deleted", seq)]
    finally:
        _restore_resource(audit_engine, original)
    assert_intact(audit_engine)
    # The deleted flag (a REST delete would also leave history: reported as updated).
    with audit_engine.begin() as conn:
        conn.execute(resource.update().where(resource.c.pid == original.pid).values(deleted=True))
    try:
        assert _kinds(audit_engine) == [("deleted", seq)]
    finally:
        with audit_engine.begin() as conn:
            conn.execute(resource.update().where(resource.c.pid == original.pid).values(deleted=False))
    assert_intact(audit_engine)


def test_deleted_chain_row_is_a_gap(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    ids = trail.record([read_event(f"gap-{i}") for i in range(3)])
    row = _chain_row(audit_engine, ids[1])
    with audit_engine.begin() as conn:
        conn.execute(audit_chain.delete().where(audit_chain.c.seq == row.seq))
    try:
        kinds = _kinds(audit_engine)
        # The gap, and the AuditEvent that is now outside the chain.
        assert kinds == [("gap", row.seq), ("unchained", None)]
        assert verify_chain(audit_engine).problems[1].res_id == ids[1]
    finally:
        with audit_engine.begin() as conn:
            conn.execute(audit_chain.insert().values(row._asdict()))
    assert_intact(audit_engine)


def test_swapped_digests_break_the_chain(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    ids = trail.record([read_event(f"swap-{i}") for i in range(3)])
    first, second = _chain_row(audit_engine, ids[0]), _chain_row(audit_engine, ids[2])
    with audit_engine.begin() as conn:
        conn.execute(audit_chain.update().where(audit_chain.c.seq == first.seq).values(digest=second.digest))
        conn.execute(audit_chain.update().where(audit_chain.c.seq == second.seq).values(digest=first.digest))
    try:
        report = verify_chain(audit_engine)
        assert [(p.kind, p.seq) for p in report.problems] == [("chain", first.seq), ("chain", second.seq)]
        assert report.first_broken is not None and report.first_broken.seq == first.seq
    finally:
        with audit_engine.begin() as conn:
            for row in (first, second):
                conn.execute(
                    audit_chain.update().where(audit_chain.c.seq == row.seq).values(digest=row.digest)
                )
    assert_intact(audit_engine)


def test_reordered_chain_rows(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    ids = trail.record([read_event(f"order-{i}") for i in range(2)])
    first, second = _chain_row(audit_engine, ids[0]), _chain_row(audit_engine, ids[1])
    with audit_engine.begin() as conn:
        # Swap the positions: move one aside to keep the primary key unique meanwhile.
        conn.execute(audit_chain.update().where(audit_chain.c.seq == first.seq).values(seq=-1))
        conn.execute(audit_chain.update().where(audit_chain.c.seq == second.seq).values(seq=first.seq))
        conn.execute(audit_chain.update().where(audit_chain.c.seq == -1).values(seq=second.seq))
    try:
        kinds = {kind for kind, _ in _kinds(audit_engine)}
        assert "chain" in kinds
    finally:
        with audit_engine.begin() as conn:
            conn.execute(audit_chain.delete().where(audit_chain.c.seq.in_([first.seq, second.seq])))
            conn.execute(audit_chain.insert(), [first._asdict(), second._asdict()])
    assert_intact(audit_engine)


def _forge(conn: sa.Connection, document: dict[str, Any], res_id: str, version: int, pid: int | None) -> int:
    """Write an AuditEvent version with the store's own writer, behind the trail's back (the
    REST layer and the store refuse: AuditEvents are append-only). Returns its pid."""
    item = finalize(get_registry(), document, res_id, version, now(), validate=False)
    if pid is None:
        (pid,) = writer.insert_new(conn, [item])
        return pid
    content = writer.stored_content(conn, item)
    assert writer.replace_current(conn, pid, version - 1, version, item.last_updated, content)
    writer.insert_index_rows(conn, [pid], [item])
    return pid


def test_audit_event_inserted_behind_the_chain(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    store, forged = trail.store, str(uuid.uuid4())
    document = build_audit_event(read_event("forged"), BASE, "Test hub")
    with store.write() as conn:
        pid = _forge(conn, dict(document), forged, 1, None)
    try:
        report = verify_chain(audit_engine)
        assert [(p.kind, p.res_id) for p in report.problems] == [("unchained", forged)]
        # An update leaves history: reported as well.
        with store.write() as conn:
            _forge(conn, {**document, "outcome": "4"}, forged, 2, pid)
        kinds = {(p.kind, p.res_id) for p in verify_chain(audit_engine).problems}
        assert kinds == {("unchained", forged), ("updated", forged)}
    finally:
        with audit_engine.begin() as conn:
            conn.execute(resource_history.delete().where(resource_history.c.pid == pid))
            writer.delete_index_rows(conn, pid)
            conn.execute(resource.delete().where(resource.c.pid == pid))
    assert_intact(audit_engine)


def test_updated_audit_event_in_chain(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    (res_id,) = trail.record([read_event("upd")])
    seq = _chain_row(audit_engine, res_id).seq
    original = _resource_row(audit_engine, res_id)
    with trail.store.write() as conn:
        document = orjson.loads(_plain(audit_engine, res_id, original.content))
        _forge(conn, {**document, "outcome": "8"}, res_id, 2, original.pid)
    try:
        kinds = sorted(_kinds(audit_engine), key=str)
        assert kinds == [("edited", seq), ("updated", seq), ("updated", seq)]
    finally:
        with audit_engine.begin() as conn:
            conn.execute(resource_history.delete().where(resource_history.c.pid == original.pid))
        _restore_resource(audit_engine, original)
    assert_intact(audit_engine)


def _index_rows(engine: sa.Engine, pid: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with engine.connect() as conn:
        refs = [
            r._asdict()
            for r in conn.execute(sa.select(idx_reference_audit).where(idx_reference_audit.c.pid == pid))
        ]
        # The trail's references live apart from the clinical ones (issue 10).
        assert conn.execute(sa.select(idx_reference.c.pid).where(idx_reference.c.pid == pid)).first() is None
        members = [r._asdict() for r in conn.execute(sa.select(compartment).where(compartment.c.pid == pid))]
    return refs, members


def _patient_log(router: FhirRouter, patient: str) -> set[str]:
    response = router.handle(
        FhirRequest(
            "GET", "AuditEvent", [("patient", patient), ("_count", "100")], principal=system_principal()
        )
    )
    assert response.status == 200, response.body
    assert response.body is not None
    return {e["resource"]["id"] for e in orjson.loads(response.body).get("entry", [])}


def test_deleted_index_rows_are_reported(
    trail: AuditTrail, audit_engine: sa.Engine, audit_router: FhirRouter
) -> None:
    """Issue 8 defect 18: the rows that put an event in its patient's access log are bound
    to the chain: deleting them hides the event from AuditEvent?patient= and verify says so."""
    patient = f"idx-{uuid.uuid4().hex[:8]}"
    ids = trail.record([read_event(patient), read_event(f"{patient}-other")])
    seq, pid = _chain_row(audit_engine, ids[0]).seq, _resource_row(audit_engine, ids[0]).pid
    assert ids[0] in _patient_log(audit_router, patient)  # (with the audit of that search)
    refs, members = _index_rows(audit_engine, pid)
    assert any(r["target_id"] == patient for r in refs) and [m["patient_id"] for m in members] == [patient]

    # The reference index rows of the event (patient, entity, agent) are deleted.
    with audit_engine.begin() as conn:
        conn.execute(idx_reference_audit.delete().where(idx_reference_audit.c.pid == pid))
    try:
        assert ids[0] not in _patient_log(audit_router, patient)  # hidden from the patient...
        report = verify_chain(audit_engine)
        assert [(p.kind, p.seq, p.res_id) for p in report.problems] == [("index", seq, ids[0])]
        detail = report.problems[0].detail
        assert "idx_reference_audit rows missing" in detail and f"Patient/{patient}" in detail
    finally:
        with audit_engine.begin() as conn:
            conn.execute(idx_reference_audit.insert(), refs)
    assert_intact(audit_engine)
    assert ids[0] in _patient_log(audit_router, patient)

    # Its compartment row is deleted (who may read it, and whose record it is in).
    with audit_engine.begin() as conn:
        conn.execute(compartment.delete().where(compartment.c.pid == pid))
    try:
        report = verify_chain(audit_engine)
        assert [(p.kind, p.seq) for p in report.problems] == [("index", seq)]
        assert "compartment rows missing for Patient/" + patient in report.problems[0].detail
    finally:
        with audit_engine.begin() as conn:
            conn.execute(compartment.insert(), members)
    assert_intact(audit_engine)

    # Moved into another patient's log: a changed target is reported as well.
    with audit_engine.begin() as conn:
        conn.execute(
            compartment.update().where(compartment.c.pid == pid).values(patient_id=f"{patient}-other")
        )
    try:
        kinds = _kinds(audit_engine)
        assert kinds == [("index", seq)]
        assert "not implied by the content" in verify_chain(audit_engine).problems[0].detail
    finally:
        with audit_engine.begin() as conn:
            conn.execute(compartment.delete().where(compartment.c.pid == pid))
            conn.execute(compartment.insert(), members)
    assert_intact(audit_engine)


def test_tampered_envelope_is_reported(trail: AuditTrail, audit_engine: sa.Engine) -> None:
    """A sealed AuditEvent whose ciphertext was changed cannot be opened: reported, never hashed."""
    (res_id,) = trail.record([read_event("envelope")])
    seq, original = _chain_row(audit_engine, res_id).seq, _resource_row(audit_engine, res_id)
    envelope = orjson.loads(_raw(original.content))
    ct = bytearray(base64.b64decode(envelope["_enc"]["ct"]))
    ct[10] ^= 1
    envelope["_enc"]["ct"] = base64.b64encode(bytes(ct)).decode()
    with audit_engine.begin() as conn:
        conn.execute(
            resource.update()
            .where(resource.c.pid == original.pid)
            .values(content=orjson.dumps(envelope).decode())
        )
    try:
        report = verify_chain(audit_engine)
        assert [(p.kind, p.seq) for p in report.problems] == [("unreadable", seq)]
    finally:
        with audit_engine.begin() as conn:
            conn.execute(
                resource.update()
                .where(resource.c.pid == original.pid)
                .values(content=_text(original.content))
            )
    assert_intact(audit_engine)


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture()
def cli_env(audit_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from hub.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", audit_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_cli_verify_and_head(cli_env: None, trail: AuditTrail, audit_engine: sa.Engine) -> None:
    from hub.cli import app

    runner = CliRunner()
    trail.record([read_event("cli")])
    head = runner.invoke(app, ["audit", "head"])
    assert head.exit_code == 0, head.output
    anchored = head.output.strip()
    assert len(anchored) == 64 and anchored == verify_chain(audit_engine).head

    ok = runner.invoke(app, ["audit", "verify"])
    assert ok.exit_code == 0, ok.output
    assert "Intact" in ok.output

    # The chain grows past the anchor: still fine.
    (res_id,) = trail.record([read_event("cli-later")])
    assert runner.invoke(app, ["audit", "verify", "--expect-head", anchored]).exit_code == 0
    wrong = runner.invoke(app, ["audit", "verify", "--expect-head", "ab" * 32])
    assert wrong.exit_code == 1 and "head" in wrong.output

    # Truncating the tail (chain row and AuditEvent) is consistent on its own; the anchor
    # taken after it shows it.
    latest = verify_chain(audit_engine).head
    row, original = _chain_row(audit_engine, res_id), _resource_row(audit_engine, res_id)
    with audit_engine.begin() as conn:
        conn.execute(audit_chain.delete().where(audit_chain.c.seq == row.seq))
        conn.execute(resource.delete().where(resource.c.pid == original.pid))
    try:
        assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
        assert runner.invoke(app, ["audit", "verify", "--expect-head", latest]).exit_code == 1
    finally:
        _restore_resource(audit_engine, original)
        with audit_engine.begin() as conn:
            conn.execute(audit_chain.insert().values(row._asdict()))

    # A tampered trail exits 1 and names the problem.
    with audit_engine.begin() as conn:
        conn.execute(audit_chain.update().where(audit_chain.c.seq == row.seq).values(chain="00" * 32))
    try:
        broken = runner.invoke(app, ["audit", "verify"])
        assert broken.exit_code == 1
        assert "chain" in broken.output and str(row.seq) in broken.output
    finally:
        with audit_engine.begin() as conn:
            conn.execute(audit_chain.update().where(audit_chain.c.seq == row.seq).values(chain=row.chain))
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0


def test_backend_is_known() -> None:
    assert backend() in ("sqlite", "postgresql")
