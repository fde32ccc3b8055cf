"""Reads audited by group commit (hub.audit.group_commit), over HTTP against a live server.

Concurrent readers each get exactly one AuditEvent per request, the chain stays gapless and
verifies, and no answer leaves before its AuditEvent has committed: a reader that asks for
its own access log right after a read finds that read, and while the chain lock is held
(no batch can commit) no reader gets an answer at all. Requests queued while a batch
commits are committed together in the next one (one transaction, PostgreSQL's xmin shows
it). A batch that cannot be written fails every request in it with the 500 "could not be
audited".
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import sqlalchemy as sa
from conftest import LiveServer, backend
from test_audit_rules import audit_unwritable

from hub.audit.events import AccessEvent
from hub.audit.group_commit import GroupCommit
from hub.audit.trail import AUDIT_LOCK_KEY, AuditTrail
from hub.audit.verify import verify_chain
from hub.auth.principal import system_principal
from hub.db.schema import audit_chain

READERS = 16
READS_EACH = 4


@pytest.fixture(scope="module")
def server(fresh_database_url) -> Iterator[LiveServer]:  # type: ignore[no-untyped-def]
    # A time limit far above how long a test holds the chain lock: the writer's batch must
    # wait for the lock, not time out (the limit bounds each batch as it bounds a request).
    with LiveServer(fresh_database_url("audit_group"), request_timeout_seconds=600) as live:
        yield live


def _trail(server: LiveServer) -> AuditTrail:
    trail = server.app.state.router.gate.trail
    assert isinstance(trail, AuditTrail)
    return trail


def _group(server: LiveServer) -> GroupCommit[object]:
    group = _trail(server)._group
    assert group is not None, "the app's lifespan starts the audit writer"
    return group  # type: ignore[return-value]


def _seqs_since(engine: sa.Engine, seq: int) -> list[int]:
    with engine.connect() as conn:
        query = sa.select(audit_chain.c.seq).where(audit_chain.c.seq > seq).order_by(audit_chain.c.seq)
        return [int(s) for s in conn.execute(query).scalars()]


def _head_seq(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(audit_chain.c.seq), 0))).scalar_one())


def _patients(admin: httpx.Client, count: int) -> list[str]:
    ids = [f"gc-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    for pid in ids:
        response = admin.put(
            f"Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"}
        )
        assert response.status_code == 201, response.text
    return ids


def test_concurrent_readers_each_find_their_own_event(server: LiveServer) -> None:
    with server.admin_client() as admin:
        patients = _patients(admin, READERS)
    before = _head_seq(server.engine)

    def reader(patient: str) -> int:
        """Read the patient, then at once its access log: each read must already be in it."""
        requests = 0
        with server.admin_client() as client:
            for done in range(1, READS_EACH + 1):
                assert client.get(f"Patient/{patient}").status_code == 200
                log = client.get("AuditEvent", params={"patient": patient, "subtype": "read"})
                requests += 2
                assert log.status_code == 200, log.text
                reads = [e["resource"] for e in log.json().get("entry", [])]
                assert len(reads) == done, (patient, done, len(reads))
                assert all(e["subtype"][0]["code"] == "read" for e in reads)
        return requests

    with ThreadPoolExecutor(READERS) as pool:
        requests = sum(pool.map(reader, patients))

    # One AuditEvent per request (each touched one patient's data), no gaps, chain intact.
    seqs = _seqs_since(server.engine, before)
    assert seqs == list(range(before + 1, before + 1 + requests))
    report = verify_chain(server.engine)
    assert report.ok, report.problems[:5]
    assert report.head_seq == before + requests


@contextmanager
def chain_locked(engine: sa.Engine) -> Iterator[None]:
    """Hold what every appender must take (PostgreSQL: the chain's advisory lock; SQLite:
    the write lock), so no audit batch can commit until the block ends."""
    if backend() == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_lock(AUDIT_LOCK_KEY)))
            conn.commit()  # a session lock: held past the transaction
            try:
                yield
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(AUDIT_LOCK_KEY)))
                conn.commit()
    else:
        # A write transaction (BEGIN IMMEDIATE, hub.db.engine) excludes every other writer.
        with engine.connect().execution_options(write=True) as conn, conn.begin():
            yield


def _wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll until ``check`` holds (a wait for a state, not a measurement); fail after 30 s."""
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_no_answer_before_its_event_commits_and_waiting_reads_commit_together(server: LiveServer) -> None:
    with server.admin_client() as admin:
        (patient,) = _patients(admin, 1)
    group = _group(server)
    before = _head_seq(server.engine)
    answered: list[int] = []
    lock = threading.Lock()

    def read() -> int:
        with server.admin_client() as client:
            status = client.get(f"Patient/{patient}").status_code
        with lock:
            answered.append(status)
        return status

    readers = 13
    with ThreadPoolExecutor(readers) as pool, chain_locked(server.engine):
        # Every read is answered but for its audit: the first batch is stuck on the lock,
        # the other reads queue behind it.
        futures = [pool.submit(read) for _ in range(readers)]
        _wait_until(lambda: group.waiting() == readers, "every read to wait for its audit")
        assert answered == [], "an answer left before its AuditEvent committed"
        assert not any(f.done() for f in futures)
        assert _head_seq(server.engine) == before
    assert [f.result() for f in futures] == [200] * readers

    assert _seqs_since(server.engine, before) == list(range(before + 1, before + 1 + readers))
    if backend() == "postgresql":
        # Those queued while a batch was stuck went in one transaction, the next one.
        with server.engine.connect() as conn:
            xmins = conn.execute(
                sa.text("SELECT xmin::text FROM audit_chain WHERE seq > :seq ORDER BY seq"), {"seq": before}
            ).scalars()
            transactions = list(dict.fromkeys(xmins))
        assert len(transactions) <= 2, transactions
    report = verify_chain(server.engine)
    assert report.ok, report.problems[:5]


def test_a_batch_that_cannot_be_written_fails_every_read_in_it(server: LiveServer) -> None:
    with server.admin_client() as admin:
        (patient,) = _patients(admin, 1)
    before = _head_seq(server.engine)

    def read(_: int) -> httpx.Response:
        with server.admin_client() as client:
            return client.get(f"Patient/{patient}")

    with audit_unwritable(server.engine), ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(read, range(8)))
    for response in responses:
        assert response.status_code == 500, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "could not be audited" in response.text
        assert patient not in response.text  # nothing of the record left with the failure
    assert _head_seq(server.engine) == before
    # The writer survives the failure: the next read is audited again.
    with server.admin_client() as admin:
        assert admin.get(f"Patient/{patient}").status_code == 200
    assert _seqs_since(server.engine, before) == [before + 1]
    assert verify_chain(server.engine).ok


def test_a_stopped_writer_hands_back_to_direct_writes(server: LiveServer) -> None:
    """After shutdown (or in the CLI) ``record`` writes in a transaction of its own."""
    trail = AuditTrail(_trail(server).store, server.base)
    trail.start_group_commit()
    trail.stop_group_commit()
    before = _head_seq(server.engine)
    event = AccessEvent(
        principal=system_principal("group-commit-test"),
        interaction="read",
        action="R",
        resource_type="Patient",
        resource_id="after-stop",
        patients=["after-stop"],
    )
    (res_id,) = trail.record([event])
    with server.engine.connect() as conn:
        chained = conn.execute(sa.select(audit_chain.c.res_id).where(audit_chain.c.seq == before + 1))
        assert chained.scalar_one() == res_id
    assert _head_seq(server.engine) == before + 1
