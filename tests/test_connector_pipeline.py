"""Processing inbox messages (connectors.pipeline), on a database of its own: one FHIR
transaction per message with its Provenance and AuditEvent, idempotent reprocessing,
rejections, retries with backoff and dead letters that block nothing behind them, order kept
per patient, paused sources, a killed worker (PostgreSQL), and the FHIR validator's verdict
on what is stored. The messages use the inbox tests' ``TestFormat``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import PG_URL, SHARED
from test_connector_inbox import make_source, message

from connectors import inbox, sources
from connectors.identifiers import FACILITY, facility_system
from connectors.model import Source, Transient
from connectors.pipeline import Pipeline, provenance_id
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.db.schema import connector_message
from hub.rest import FhirRequest, FhirRouter
from hub.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub(fresh_database_url: Any) -> Iterator[FhirRouter]:
    """A router on a database of this module's own (no other test's messages get claimed)."""
    router = build_router(Settings(database_url=fresh_database_url("connpipe")))
    yield router
    router.ctx.store.engine.dispose()


def _get(router: FhirRouter, path: str, **query: str) -> dict[str, Any]:
    response = router.handle(
        FhirRequest("GET", path, query=list(query.items()), principal=system_principal("system:test"))
    )
    assert response.status == 200, response.body
    result: dict[str, Any] = orjson.loads(response.body or b"{}")
    return result


def _search(router: FhirRouter, res_type: str, **query: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in _get(router, res_type, **query).get("entry", [])]


def _drain(pipeline: Pipeline, rounds: int = 20) -> int:
    total = 0
    for _ in range(rounds):
        done = pipeline.process_due()
        if done == 0:
            break
        total += done
    return total


def _state(router: FhirRouter, ids: list[int]) -> list[str]:
    with router.ctx.store.engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.select(connector_message.c.id, connector_message.c.state).where(
                    connector_message.c.id.in_(ids)
                )
            ).all()
        )
    return [rows[i] for i in ids]


def _add(router: FhirRouter, name: str, code: str = "64020") -> Source:
    return sources.add(router, make_source(name, code=code))


def test_process_ids_writes_one_transaction_with_provenance_and_audit(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-basic", code="64021")
    body = message(
        "b-1",
        mrn="mrn-b1",
        observations=[
            {"id": "b1-glu", "code": "2345-7", "value": 5.4},
            {"id": "b1-k", "code": "2823-3", "value": 4.1},
        ],
    )
    # With another patient's message in the same batch (one database transaction).
    received, neighbour = inbox.receive(engine, source, [body, message("b-2", mrn="mrn-b2")])
    outcomes = Pipeline(hub).process_ids([received.id, neighbour.id])
    outcome = outcomes[received.id]
    assert outcomes[neighbour.id].state == "processed"
    assert outcome.state == "processed" and outcome.error is None, outcome
    # (a new patient also gets connectors.patients' review Flag)
    types = sorted(r.split("/")[0] for r in outcome.resources if not r.startswith("Flag/"))
    assert types == ["Observation", "Observation", "Patient", "Provenance"]

    (patient,) = _search(hub, "Patient", identifier=f"{facility_system('mrn', '64021')}|mrn-b1")
    observations = _search(hub, "Observation", subject=f"Patient/{patient['id']}")
    assert sorted(o["valueQuantity"]["value"] for o in observations) == [4.1, 5.4]
    (organization,) = _search(hub, "Organization", identifier=f"{FACILITY}|64021")
    assert {o["performer"][0]["reference"] for o in observations} == {f"Organization/{organization['id']}"}

    provenance = _get(hub, f"Provenance/{provenance_id(source.name, 'b-1')}")
    assert sorted(t["reference"] for t in provenance["target"]) == sorted(
        r for r in outcome.resources if r.split("/")[0] in ("Patient", "Observation")
    )
    assert provenance["agent"][0]["who"]["reference"] == f"Organization/{organization['id']}"
    entity = provenance["entity"][0]["what"]
    assert entity["identifier"] == {"system": facility_system("message", "64021"), "value": "b-1"}
    assert source.name in entity["display"] and f"inbox message {received.id}" in entity["display"]

    # The message's AuditEvent, written by the connector's own system access.
    events = _search(hub, "AuditEvent", patient=f"Patient/{patient['id']}")
    writes = [
        e for e in events if any(a.get("name") == f"system:connector-{source.name}" for a in e["agent"])
    ]
    assert len(writes) == 1
    assert writes[0]["action"] == "E"
    # It describes this message's resources only, not its neighbour's in the same batch.
    named = orjson.dumps(writes[0]).decode()
    assert all(r in named for r in outcome.resources if r.startswith("Patient/"))
    assert not any(r in named for r in outcomes[neighbour.id].resources)

    summary = next(m for m in inbox.messages(engine, source=source.name) if m.id == received.id)
    assert summary.state == "processed" and sorted(summary.resources) == sorted(outcome.resources)
    with engine.connect() as conn:
        kept = conn.execute(
            sa.select(connector_message.c.warnings).where(connector_message.c.id == received.id)
        ).scalar_one()
    assert kept == ["a warning"]  # the mapping's warnings stay with the message
    # Processed already: its stored outcome, nothing written again.
    again = Pipeline(hub).process_ids([received.id])[received.id]
    assert again.state == "processed" and sorted(again.resources) == sorted(outcome.resources)


def test_reprocessing_and_resending_create_no_duplicates(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-idem", code="64022")
    feed = [
        message(f"i-{n}", mrn="mrn-i", observations=[{"id": f"i-obs-{n}", "code": "2345-7", "value": n}])
        for n in range(3)
    ]
    first = inbox.receive(engine, source, feed)
    pipeline = Pipeline(hub)
    assert {o.state for o in pipeline.process_ids([r.id for r in first]).values()} == {"processed"}
    resent = inbox.receive(engine, source, feed)  # the whole feed again
    assert all(r.duplicate for r in resent)
    assert inbox.replay(engine, source=source.name, state="processed") == 3  # and processed again
    assert _drain(pipeline) == 3
    (patient,) = _search(hub, "Patient", identifier=f"{facility_system('mrn', '64022')}|mrn-i")
    assert len(_search(hub, "Observation", subject=f"Patient/{patient['id']}")) == 3
    for n in range(3):
        provenance = _get(hub, f"Provenance/{provenance_id(source.name, f'i-{n}')}")
        assert provenance["meta"]["versionId"] == "1"  # reprocessing changed nothing
    history = _get(hub, f"Patient/{patient['id']}/_history")
    assert history["entry"][0]["resource"]["meta"]["versionId"] == "1"


def test_rejected_messages_are_kept_with_their_reason(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-reject", code="64023")
    received = inbox.receive(
        engine,
        source,
        [message("x-1", mrn="mrn-x1", fail="rejected"), message("x-2", mrn="mrn-x2", fail="invalid")],
    )
    outcomes = Pipeline(hub).process_ids([r.id for r in received])
    bad_value, invalid = outcomes[received[0].id], outcomes[received[1].id]
    assert (bad_value.state, bad_value.error, bad_value.where) == (
        "rejected",
        "value is not a number",
        "OBX-5",
    )
    assert invalid.state == "rejected" and invalid.where == "Observation.status"
    assert (invalid.error or "").startswith("Bundle.entry[") and "'bogus'" in (invalid.error or "")
    # Nothing of either was written (the SAVEPOINT rolled back; no Patient of theirs).
    assert _search(hub, "Patient", identifier=f"{facility_system('mrn', '64023')}|mrn-x2") == []
    listed = {m.id: m for m in inbox.messages(engine, source=source.name)}
    assert listed[received[0].id].error_where == "OBX-5" and listed[received[1].id].state == "rejected"


def test_poison_message_dies_without_blocking_the_rest(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-poison", code="64024")
    received = inbox.receive(
        engine,
        source,
        [
            message("z-1", mrn="mrn-z", fail="boom"),  # poison
            message("z-2", mrn="mrn-z"),  # same patient: waits for it
            message("z-3", mrn="mrn-other"),  # another patient: goes on at once
        ],
    )
    ids = [r.id for r in received]
    slow = Pipeline(hub, retry_base_seconds=3600)
    assert slow.process_due() == 2  # z-2 waits behind z-1
    assert _state(hub, ids) == ["failed", "queued", "processed"]
    (failed,) = inbox.messages(engine, source=source.name, state="failed")
    assert failed.attempts == 1 and failed.error == "RuntimeError: mapper bug"
    assert failed.next_attempt_at is not None and failed.next_attempt_at > inbox.now()
    assert slow.process_due() == 0  # not due yet; z-2 still waits
    assert slow.process_ids([ids[1]])[ids[1]].state == "queued"  # asked directly: still waits

    with engine.connect() as conn, conn.begin():  # an hour later
        conn.execute(
            connector_message.update()
            .where(connector_message.c.id == ids[0])
            .values(next_attempt_at=inbox.now() - timedelta(seconds=1))
        )
    quick = Pipeline(hub, retry_base_seconds=0)
    _drain(quick)
    assert _state(hub, ids) == ["dead", "processed", "processed"]
    (dead,) = inbox.messages(engine, source=source.name, state="dead")
    assert dead.attempts == inbox.MAX_ATTEMPTS and "mapper bug" in (dead.error or "")
    (status,) = inbox.status(engine, source.name)
    assert status.counts["dead"] == 1 and status.failures == 1 and status.backlog == 0
    assert status.last_error == "RuntimeError: mapper bug"
    # Replayed after a fix (here: still broken), it is retried from attempt 0.
    assert inbox.replay(engine, state="dead", source=source.name) == 1
    assert quick.process_ids([ids[0]])[ids[0]].state == "failed"
    sources.set_paused(engine, source.name, True)  # the other tests' process_due leave it be


def test_a_message_that_cannot_be_opened_fails_alone(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-tampered", code="64030")
    received = inbox.receive(engine, source, [message("u-1", mrn="mrn-u1"), message("u-2", mrn="mrn-u2")])
    with engine.connect() as conn, conn.begin():  # u-1's row now holds u-2's ciphertext
        other = conn.execute(
            sa.select(connector_message.c.raw).where(connector_message.c.id == received[1].id)
        ).scalar_one()
        conn.execute(
            connector_message.update().where(connector_message.c.id == received[0].id).values(raw=other)
        )
    outcomes = Pipeline(hub).process_ids([r.id for r in received])
    assert outcomes[received[0].id].state == "failed" and "integrity" in (
        outcomes[received[0].id].error or ""
    )
    assert outcomes[received[1].id].state == "processed"
    sources.set_paused(engine, source.name, True)  # the other tests' process_due leave it be


def test_order_is_kept_per_patient(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-order", code="64025")
    # Three versions of one result for one patient, received in order: the last one wins,
    # whether processed in one batch or one at a time.
    values = [1.0, 2.0, 3.0]
    feed = [
        message(f"o-{n}", mrn="mrn-o", observations=[{"id": "o-obs", "code": "2345-7", "value": v}])
        for n, v in enumerate(values)
    ]
    ids = [r.id for r in inbox.receive(engine, source, feed)]
    # Asking for the last two first: they wait for the first.
    outcomes = Pipeline(hub).process_ids(ids[1:])
    assert {o.state for o in outcomes.values()} == {"queued"}
    Pipeline(hub, batch_size=1).process_due()
    assert _state(hub, ids) == ["processed", "queued", "queued"]
    _drain(Pipeline(hub))
    (patient,) = _search(hub, "Patient", identifier=f"{facility_system('mrn', '64025')}|mrn-o")
    (observation,) = _search(hub, "Observation", subject=f"Patient/{patient['id']}")
    assert observation["valueQuantity"]["value"] == 3.0 and observation["meta"]["versionId"] == "3"


def test_concurrent_workers_process_each_message_once(hub: FhirRouter) -> None:
    import threading

    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-concurrent", code="64031")
    feed = [
        message(
            f"w-{n}",
            mrn=f"mrn-w{n % 6}",
            observations=[{"id": "w-obs-" + str(n % 6), "code": "2345-7", "value": n}],
        )
        for n in range(36)
    ]
    ids = [r.id for r in inbox.receive(engine, source, feed)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _drain(Pipeline(hub, batch_size=4), rounds=40)
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    _drain(Pipeline(hub))  # what a worker left waiting behind another's batch
    assert set(_state(hub, ids)) == {"processed"}
    for patient_no in range(6):
        (patient,) = _search(
            hub, "Patient", identifier=f"{facility_system('mrn', '64031')}|mrn-w{patient_no}"
        )
        (observation,) = _search(hub, "Observation", subject=f"Patient/{patient['id']}")
        # The patient's last message wins: order per patient held across workers.
        assert observation["valueQuantity"]["value"] == 30 + patient_no
        assert observation["meta"]["versionId"] == "6"  # one version per message, none twice


def test_paused_source_is_stored_but_not_processed(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-paused", code="64026")
    sources.set_paused(engine, source.name, True)
    (received,) = inbox.receive(engine, source, [message("q-1", mrn="mrn-q")])
    pipeline = Pipeline(hub)
    assert pipeline.process_ids([received.id])[received.id].state == "queued"
    _drain(pipeline)
    assert _state(hub, [received.id]) == ["queued"]
    sources.set_paused(engine, source.name, False)
    _drain(pipeline)
    assert _state(hub, [received.id]) == ["processed"]


def test_database_down_raises_transient_and_marks_nothing(hub: FhirRouter, fresh_database_url: Any) -> None:
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-down", code="64027")
    (received,) = inbox.receive(engine, source, [message("d-1", mrn="mrn-d")])
    # The same database through a pool whose connections fail (a stopped server).
    broken = build_router(Settings(database_url=str(engine.url.render_as_string(hide_password=False))))
    real_connect = broken.ctx.store.engine.connect

    def unreachable() -> sa.Connection:
        raise sa.exc.OperationalError("connect", {}, ConnectionRefusedError("server is down"))

    broken.ctx.store.engine.connect = unreachable  # type: ignore[method-assign]
    with pytest.raises(Transient):
        Pipeline(broken).process_ids([received.id])
    broken.ctx.store.engine.connect = real_connect  # type: ignore[method-assign]
    assert _state(hub, [received.id]) == ["queued"]
    assert Pipeline(hub).process_ids([received.id])[received.id].state == "processed"


_KILLED_WORKER = textwrap.dedent(
    """
    import sys, time
    from connectors.pipeline import Pipeline, register_format
    from consent.context import system_access
    from hub.app_factory import build_router
    from hub.settings import Settings

    class Stuck:
        name = "test-json"
        def peek(self, raw):
            raise NotImplementedError
        def map(self, raw, source):
            print("claimed", flush=True)
            time.sleep(120)
            raise SystemExit(1)

    register_format(Stuck())
    Pipeline(build_router(Settings(database_url=sys.argv[1])), lease_seconds=2).process_due()
    """
)


@pytest.mark.skipif(not PG_URL, reason="FOR UPDATE SKIP LOCKED claims: PostgreSQL")
def test_worker_killed_mid_batch_loses_nothing(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    _drain(Pipeline(hub, retry_base_seconds=0))  # nothing of the other tests left due
    source = _add(hub, "pipe-killed", code="64028")
    ids = [
        r.id for r in inbox.receive(engine, source, [message(f"k-{n}", mrn=f"mrn-k{n}") for n in range(4)])
    ]
    url = engine.url.render_as_string(hide_password=False)
    worker = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WORKER, url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == b"claimed"
        # While it holds them, another worker skips them (no waiting, no double processing).
        started = time.monotonic()
        assert Pipeline(hub).process_due() == 0
        assert time.monotonic() - started < 5
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    # Its claim stays until its lease ends (2 s here), with the attempt counted...
    assert _state(hub, ids) == ["processing"] * 4
    deadline = time.monotonic() + 30
    while _state(hub, ids) != ["processed"] * 4 and time.monotonic() < deadline:
        _drain(Pipeline(hub))  # the killed transaction's locks go once PostgreSQL notices
        time.sleep(0.2)
    assert _state(hub, ids) == ["processed"] * 4
    # ...then another worker took them over: nothing lost, each processed once.
    assert {m.attempts for m in inbox.messages(engine, source=source.name)} == {2}
    for n in range(4):
        (patient,) = _search(hub, "Patient", identifier=f"{facility_system('mrn', '64028')}|mrn-k{n}")
        assert len(_search(hub, "Observation", subject=f"Patient/{patient['id']}")) == 1


_CRASHING_WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from test_connector_inbox import TestFormat
    from connectors.pipeline import Pipeline
    from hub.app_factory import build_router
    from hub.settings import Settings

    class Crashing(TestFormat):
        def map(self, raw, source):
            if b'"crash"' in raw:
                os._exit(3)  # the process dies mid-batch (OOM kill, segfault...)
            return super().map(raw, source)

    from connectors.pipeline import register_format
    register_format(Crashing())
    lease = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    pipeline = Pipeline(build_router(Settings(database_url=sys.argv[1])), lease_seconds=lease, max_attempts=3)
    pipeline.process_due()
    """
)


def test_a_message_that_kills_its_worker_goes_dead_and_spares_its_batch(hub: FhirRouter) -> None:
    engine = hub.ctx.store.engine
    _drain(Pipeline(hub, retry_base_seconds=0))  # nothing of the other tests left due
    source = _add(hub, "pipe-crash", code="64032")
    crash, *others = [
        r.id
        for r in inbox.receive(
            engine,
            source,
            [
                message("c-0", mrn="mrn-c0", note="crash"),
                message("c-1", mrn="mrn-c1"),
                message("c-2", mrn="mrn-c2"),
            ],
        )
    ]
    url = engine.url.render_as_string(hide_password=False)
    codes = []
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", _CRASHING_WORKER, url],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=120,
        )
        codes.append(done.returncode)
        assert done.returncode in (0, 3), done.stderr.decode()[-3000:]
        if _state(hub, [crash]) == ["dead"]:
            break
    # Three claims died with their process; the fourth finds it claimed 3 times: dead.
    assert codes == [3, 3, 3, 0]
    (dead,) = inbox.messages(engine, source=source.name, state="dead")
    assert dead.id == crash and dead.attempts == 3 and "without an outcome" in (dead.error or "")
    # Its batch neighbours lost two attempts with it, then went on alone.
    _drain(Pipeline(hub, lease_seconds=0))
    assert _state(hub, others) == ["processed", "processed"]


def test_stored_resources_pass_the_fhir_validator(hub: FhirRouter, tmp_path: Path) -> None:
    import shutil

    validator = SHARED / "tools" / "validate_fhir.js"
    fhirval = REPO / ".fhirval"
    node = shutil.which("node")
    assert node is not None and validator.is_file() and (fhirval / "node_modules").is_dir(), (
        "validator missing"
    )
    engine = hub.ctx.store.engine
    source = _add(hub, "pipe-valid", code="64029")
    (received,) = inbox.receive(engine, source, [message("v-1", mrn="mrn-v")])
    outcome = Pipeline(hub).process_ids([received.id])[received.id]
    assert outcome.state == "processed"
    bodies = [orjson.dumps(_get(hub, reference)) for reference in outcome.resources]
    path = tmp_path / "stored.ndjson"
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    done = subprocess.run(
        [node, str(validator), "--quiet", str(path)],
        cwd=REPO,
        env={**os.environ, "FHIRVAL_DIR": str(fhirval)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and f"{len(bodies)} valid, 0 invalid" in done.stdout, done.stdout[-3000:]


def test_process_ids_takes_over_an_abandoned_claim_at_once(hub: FhirRouter) -> None:
    """The MLLP path: a sender resends a message whose worker died; it must not wait for the
    lease (here an hour) to get its ACK."""
    engine = hub.ctx.store.engine
    _drain(Pipeline(hub, retry_base_seconds=0))
    source = _add(hub, "pipe-takeover", code="64033")
    ids = [
        r.id
        for r in inbox.receive(
            engine, source, [message("t-0", mrn="mrn-t0", note="crash"), message("t-1", mrn="mrn-t1")]
        )
    ]
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_WORKER, engine.url.render_as_string(hide_password=False), "3600"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    assert _state(hub, ids) == ["processing", "processing"]
    assert Pipeline(hub).process_due() == 0  # a worker leaves a live lease alone
    outcomes = Pipeline(hub).process_ids(ids)  # (this process's mapper does not crash)
    assert [outcomes[i].state for i in ids] == ["processed", "processed"]
    assert {m.attempts for m in inbox.messages(engine, source=source.name)} == {2}
