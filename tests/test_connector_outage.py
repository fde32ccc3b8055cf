"""The database goes away while an MLLP feed streams in (issue 11, "crash and outage").

Several python-hl7 senders stream a feed of 50 messages (10 patients: an admission, a
result, a second admission, two more results each), each sender resending a message whose
ACK does not come (what MLLP senders do). Mid-stream, an admin connection stops the hub's
database from accepting connections and terminates every connection the hub holds, then
lets connections in again about two seconds later. In the end every message was ACKed AA
and every resource is in the store exactly once (counted by identifier), and the inbox
holds each message once, processed.

PostgreSQL only: SQLite is a file the hub opens itself, nothing can refuse its connections
from outside (its own database, so the session database is never disturbed).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hl7.client
import orjson
import pytest
import sqlalchemy as sa
from test_mllp import (
    FACILITY,
    Listener,
    PipelineThreadRunner,
    adt_a01,
    cccd,
    code_of,
    exchange,
    new_source,
    oru_r01,
)

from connectors import inbox
from connectors.identifiers import CCCD, facility_system
from consent.context import system_access
from hub.app_factory import build_router
from hub.auth.principal import system_principal
from hub.db.engine import normalize_url
from hub.rest import FhirRouter
from hub.rest.messages import FhirRequest
from hub.settings import Settings

pytestmark = pytest.mark.skipif(
    not os.environ.get("HUB_TEST_DATABASE_URL"),
    reason="needs PostgreSQL: an outage is made by refusing the hub's connections from an admin session",
)

PATIENTS = 10
SENDERS = 5
OUTAGE_SECONDS = 2.0


@pytest.fixture()
def outage_router(fresh_database_url: Any) -> Iterator[FhirRouter]:
    router = build_router(Settings(database_url=fresh_database_url("mllp_outage")))
    yield router
    router.ctx.store.engine.dispose()


def feed_of(cid: str, tag: str) -> list[tuple[str, bytes]]:
    """One patient's five messages, in the order a facility sends them."""
    return [
        (f"A1{tag}", adt_a01(f"A1{tag}", cid, visit=f"V1{tag}")),
        (f"R1{tag}", oru_r01(f"R1{tag}", cid, filler=f"F1{tag}")),
        (f"A2{tag}", adt_a01(f"A2{tag}", cid, visit=f"V2{tag}")),
        (f"R2{tag}", oru_r01(f"R2{tag}", cid, filler=f"F2{tag}")),
        (f"R3{tag}", oru_r01(f"R3{tag}", cid, filler=f"F3{tag}")),
    ]


class Sender:
    """Sends its messages one at a time; no ACK (closed, reset, refused) means reconnect
    and send the same message again."""

    def __init__(self, port: int, progress: threading.Semaphore) -> None:
        self.port = port
        self.progress = progress
        self.acks: dict[str, str] = {}
        self.resends = 0

    def run(self, messages: list[tuple[str, bytes]], deadline: float) -> None:
        client: hl7.client.MLLPClient | None = None
        for control_id, message in messages:
            while True:
                assert time.monotonic() < deadline, f"no ACK for {control_id} in time"
                try:
                    if client is None:
                        client = hl7.client.MLLPClient("127.0.0.1", self.port)
                    reply = exchange(client, message)
                except OSError:
                    reply = b""
                if reply:
                    self.acks[control_id] = code_of(reply)
                    self.progress.release()
                    break
                self.resends += 1
                if client is not None:
                    client.close()
                    client = None
                time.sleep(0.2)
        if client is not None:
            client.close()


def make_outage(url: str, after: threading.Semaphore, acks_before: int) -> dict[str, Any]:
    """Wait for ``acks_before`` ACKs, then refuse and cut the hub's connections for a while."""
    parsed = sa.engine.make_url(normalize_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    report: dict[str, Any] = {}
    try:
        for _ in range(acks_before):
            assert after.acquire(timeout=60)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS false'))
            try:
                killed = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": parsed.database},
                ).scalar_one()
                report["terminated"] = int(killed)
                time.sleep(OUTAGE_SECONDS)
            finally:
                conn.execute(sa.text(f'ALTER DATABASE "{parsed.database}" ALLOW_CONNECTIONS true'))
    finally:
        admin.dispose()
    return report


def _search(router: FhirRouter, resource_type: str, **params: str) -> list[dict[str, Any]]:
    request = FhirRequest(
        "GET",
        resource_type,
        query=[*params.items(), ("_count", "200")],
        principal=system_principal("system:test-outage"),
    )
    with system_access("test-outage"):
        response = router.handle(request)
    assert response.status == 200, response.body
    return [entry["resource"] for entry in orjson.loads(response.body or b"{}").get("entry", [])]


def test_database_outage_mid_stream_loses_nothing_and_duplicates_nothing(outage_router: FhirRouter) -> None:
    router = outage_router
    engine = router.ctx.store.engine
    source = new_source(router)
    patients = [(cccd(), uuid.uuid4().hex[:8]) for _ in range(PATIENTS)]
    feeds = [feed_of(cid, tag) for cid, tag in patients]
    progress = threading.Semaphore(0)
    runner = PipelineThreadRunner(router, retry_base_seconds=0.0)
    with Listener(engine, source, runner) as listener:
        senders = [Sender(listener.port, progress) for _ in range(SENDERS)]
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(SENDERS + 1) as pool:
            outage = pool.submit(
                make_outage, str(engine.url.render_as_string(hide_password=False)), progress, 15
            )
            work = [
                pool.submit(sender.run, [m for feed in feeds[i::SENDERS] for m in feed], deadline)
                for i, sender in enumerate(senders)
            ]
            for done in work:
                done.result()
            report = outage.result()
        stats = listener.server.stats

    acks = {control_id: code for sender in senders for control_id, code in sender.acks.items()}
    assert len(acks) == PATIENTS * 5 and set(acks.values()) == {"AA"}
    assert report["terminated"] >= 1  # the hub's connections were cut
    # The outage was felt: some sender got no ACK and sent again.
    assert sum(s.resends for s in senders) >= 1 and stats.no_ack >= 1

    visit, filler = facility_system("visit", FACILITY), facility_system("filler", FACILITY)
    for cid, tag in patients:
        (patient,) = _search(router, "Patient", identifier=f"{CCCD}|{cid}")
        for n in (1, 2):
            (encounter,) = _search(router, "Encounter", identifier=f"{visit}|V{n}{tag}")
            assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
        for n in (1, 2, 3):
            (report_,) = _search(router, "DiagnosticReport", identifier=f"{filler}|F{n}{tag}")
            assert len(report_["result"]) == 2
        observations = _search(router, "Observation", subject=f"Patient/{patient['id']}")
        assert len(observations) == 6
        assert len({o["identifier"][0]["value"] for o in observations}) == 6
    rows = inbox.messages(engine, source=source.name, limit=1000)
    assert len(rows) == PATIENTS * 5
    assert {row.state for row in rows} == {"processed"}
    assert sorted(row.control_id or "" for row in rows) == sorted(acks)
