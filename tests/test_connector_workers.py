"""Where connector messages get processed (issue 11): the in-process worker, the Runner a
listener awaits, and arq workers over Redis.

In-process (both backends): a worker thread drains what is queued, is woken by new
messages, stops cleanly; ``Runner.process`` returns each message's outcome.
arq (when HUB_TEST_REDIS_URL names a Redis; ``make test-postgres`` sets it, so the
PostgreSQL run covers the production set-up): a real ``hub connectors worker`` subprocess
processes queued messages (its cron ``process_due``), ``Runner.process`` over arq returns
the outcomes it computed, an MLLP listener running with the arq Runner ACKs AA after the
worker committed, and a Runner with no worker on its queue raises ``Transient`` (the
sender gets no ACK). Every run uses a queue of its own, so runs sharing a Redis never meet.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import auth_env
from test_mllp import adt_a01, cccd, code_of, oru_r01, send

from connectors import inbox, sources
from connectors.model import Source, Transient
from connectors.pipeline import Pipeline
from connectors.worker import ConnectorRuntime, InProcessWorker, Intake, Runner
from hub.app_factory import build_router
from hub.rest import FhirRouter
from hub.settings import Settings

REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="HUB_TEST_REDIS_URL is not set (make test-postgres sets it)"
)


@pytest.fixture(scope="module")
def router(fresh_database_url: Callable[[str], str]) -> Iterator[FhirRouter]:
    """A database of this module's own: no test server's in-process worker drains it."""
    hub = build_router(Settings(database_url=fresh_database_url("workers")))
    yield hub
    hub.ctx.store.engine.dispose()


def _source(router: FhirRouter, kind: str = "hl7v2-mllp", **settings: object) -> Source:
    name = f"wk-{uuid.uuid4().hex[:10]}"
    return sources.add(router, Source(name, "64010", "BVĐK tỉnh Gia Lai", "provincial", kind, dict(settings)))


def _feed(count: int) -> list[bytes]:
    """ADT^A01 then ORU^R01 for each of ``count`` patients: 2 * count messages."""
    messages = []
    for _ in range(count):
        cid, tag = cccd(), uuid.uuid4().hex[:8]
        messages.append(adt_a01(f"A{tag}", cid, visit=f"V{tag}"))
        messages.append(oru_r01(f"R{tag}", cid, filler=f"F{tag}"))
    return messages


def _states(router: FhirRouter, source: Source) -> dict[int, str]:
    rows = inbox.messages(router.ctx.store.engine, source=source.name, limit=1000)
    return {row.id: row.state for row in rows}


def _wait_for(check: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- in-process ----------------------------------------------------------------------------


def test_in_process_worker_drains_the_inbox_and_stops_cleanly(router: FhirRouter) -> None:
    source = _source(router)
    received = inbox.receive(router.ctx.store.engine, source, _feed(4))
    assert [r.state for r in received] == ["queued"] * 8
    worker = InProcessWorker(router, intake=False)
    worker.start()
    try:
        # The counter follows each batch's commit, so it is waited for too.
        _wait_for(lambda: set(_states(router, source).values()) == {"processed"} and worker.processed >= 8)
        # Idle now (backing off); a new message is taken as soon as the worker is woken.
        (late,) = inbox.receive(router.ctx.store.engine, source, _feed(1)[:1])
        worker.wake()
        started = time.monotonic()
        _wait_for(lambda: _states(router, source)[late.id] == "processed", 15)
        assert time.monotonic() - started < 8  # not waiting out a long sleep
    finally:
        worker.stop()
    assert not worker.running


def test_runner_in_process_returns_outcomes(router: FhirRouter) -> None:
    source = _source(router)
    feed = _feed(2)
    ids = [r.id for r in inbox.receive(router.ctx.store.engine, source, [*feed, b"MSH|^~\\&|broken"])]
    runner = Runner(Pipeline(router))
    assert runner.mode == "in-process"
    outcomes = asyncio.run(runner.process(ids))
    assert sorted(outcomes) == sorted(ids[:-1]) or sorted(outcomes) == sorted(ids)
    for message_id in ids[:-1]:
        assert outcomes[message_id].state == "processed", outcomes[message_id]
        assert outcomes[message_id].resources  # "Type/id" written
    assert asyncio.run(runner.process([])) == {}
    # Processed again: nothing is written twice, the stored outcome comes back.
    again = asyncio.run(runner.process(ids[:2]))
    assert [again[i].state for i in ids[:2]] == ["processed", "processed"]


def test_runtime_without_redis_runs_in_process_workers(router: FhirRouter) -> None:
    settings = Settings(
        database_url=router.ctx.store.engine.url.render_as_string(hide_password=False), connector_workers=2
    )

    async def scenario() -> tuple[int, bool]:
        runtime = ConnectorRuntime(router, settings, listen=False)
        await runtime.start()
        try:
            return len(runtime.workers), all(w.running for w in runtime.workers)
        finally:
            await runtime.stop()

    assert asyncio.run(scenario()) == (2, True)


def test_in_process_worker_polls_an_xml130_folder(router: FhirRouter, tmp_path: Path) -> None:
    from xml130_factory import envelope, episode

    folder = tmp_path / "xml130"
    folder.mkdir()
    source = _source(router, "xml130", folder=str(folder), interval=0.2)
    source = sources.add(router, replace(source, facility_code="64001"), replace=True)  # the factory's
    (folder / "HS_20250701.xml").write_bytes(envelope([episode(77)]))
    worker = InProcessWorker(router)
    worker.start()
    try:
        # Taken into the inbox once, moved out of the folder, and processed to a final state
        # (what the mapping makes of it is tests/test_xml130*'s business).
        _wait_for(lambda: list(_states(router, source).values()) in (["processed"], ["rejected"], ["dead"]))
    finally:
        worker.stop()
    assert not (folder / "HS_20250701.xml").exists()
    assert [p.name for p in folder.rglob("HS_20250701.xml")], "moved to done/ or rejected/"
    (message,) = inbox.messages(router.ctx.store.engine, source=source.name)
    assert message.message_type == "XML130"


@pytest.mark.skipif(not os.environ.get("HUB_TEST_DATABASE_URL"), reason="PostgreSQL's advisory locks")
def test_one_process_at_a_time_polls_a_source(router: FhirRouter, tmp_path: Path) -> None:
    import sqlalchemy as sa
    from xml130_factory import envelope, episode

    folder = tmp_path / "locked"
    folder.mkdir()
    source = sources.add(
        router,
        Source(f"wk-{uuid.uuid4().hex[:10]}", "64001", "F", "district", "xml130", {"folder": str(folder)}),
    )
    file = folder / "HS.xml"
    file.write_bytes(envelope([episode(78)]))
    os.utime(file, (time.time() - 60, time.time() - 60))  # settled: ready to take
    intake = Intake(router.ctx.store.engine)
    key = sa.func.hashtext(f"hub-connector-intake:{source.name}")
    with router.ctx.store.engine.connect() as other:  # another process polling this source
        assert other.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar()
        assert intake.poll(force=True) == 0 and file.exists()
        other.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        other.commit()
    assert intake.poll(force=True) == 1 and not file.exists()


def _hub(*args: str, **env: str) -> subprocess.Popen[bytes]:
    """A ``hub`` subprocess with the test run's keys and the given environment."""
    environment = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    environment.update(auth_env())
    environment.update(env)
    hub = Path(sys.executable).parent / "hub"
    return subprocess.Popen(
        [str(hub), *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        raise AssertionError("did not stop on SIGINT") from None


def _url(router: FhirRouter) -> str:
    return router.ctx.store.engine.url.render_as_string(hide_password=False)


def test_cli_serve_listens_and_processes_in_process(router: FhirRouter) -> None:
    port = _free_port()
    source = _source(router, port=port, host="127.0.0.1")
    process = _hub("connectors", "serve", "--source", source.name, DATABASE_URL=_url(router))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    process.stdout.read().decode(errors="replace") if process.stdout else ""
                )
                time.sleep(0.1)
        feed = _feed(2)
        assert [code_of(send(port, message)) for message in feed] == ["AA"] * len(feed)
        assert set(_states(router, source).values()) == {"processed"}
    finally:
        code = _stop(process)
    assert code == 0


# --- arq --------------------------------------------------------------------------------------


@pytest.fixture()
def queue() -> str:
    return f"hub-connectors-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def arq_worker(router: FhirRouter, queue: str) -> Iterator[subprocess.Popen[bytes]]:
    """``hub connectors worker`` (two processes) on this run's queue and database."""
    assert REDIS_URL
    process = _hub(
        "connectors", "worker", "--processes", "2",
        DATABASE_URL=_url(router), REDIS_URL=REDIS_URL, CONNECTORS_QUEUE=queue,
    )  # fmt: skip
    try:
        yield process
    finally:
        assert _stop(process) == 0


@needs_redis
def test_arq_worker_processes_queued_messages_and_runner_jobs(
    router: FhirRouter, queue: str, arq_worker: subprocess.Popen[bytes]
) -> None:
    assert REDIS_URL
    source = _source(router)
    engine = router.ctx.store.engine
    # Stored with nobody processing here: the worker's cron process_due takes them.
    inbox.receive(engine, source, _feed(3))
    try:
        _wait_for(lambda: set(_states(router, source).values()) == {"processed"}, 60)
    except AssertionError:
        arq_worker.kill()
        output = arq_worker.stdout.read().decode(errors="replace") if arq_worker.stdout else ""
        raise AssertionError(f"the arq worker did not process the inbox:\n{output[-3000:]}") from None

    # A listener's Runner over arq: the job runs in the worker process, its outcomes come back.
    ids = [r.id for r in inbox.receive(engine, source, _feed(2))]
    runner = Runner(redis_url=REDIS_URL, queue_name=queue, timeout=30)
    assert runner.mode == "arq"

    async def over_arq() -> dict[int, object]:
        try:
            return dict(await runner.process(ids))
        finally:
            await runner.close()

    outcomes = asyncio.run(over_arq())
    assert sorted(outcomes) == sorted(ids)
    assert {getattr(o, "state", None) for o in outcomes.values()} == {"processed"}
    assert all(getattr(o, "resources", None) for o in outcomes.values())
    assert set(_states(router, source).values()) == {"processed"}


@needs_redis
def test_mllp_listener_with_the_arq_runner_acks_after_the_worker_commits(
    router: FhirRouter, queue: str, arq_worker: subprocess.Popen[bytes]
) -> None:
    assert REDIS_URL
    port = _free_port()
    source = _source(router, port=port, host="127.0.0.1")
    settings = Settings(
        database_url=router.ctx.store.engine.url.render_as_string(hide_password=False),
        redis_url=REDIS_URL,
        connectors_queue=queue,
        connectors_listen=True,
    )
    feed = _feed(2)

    async def scenario() -> list[str]:
        runtime = ConnectorRuntime(router, settings, only=[source.name])
        await runtime.start()
        try:
            assert runtime.workers == []  # with Redis, the arq workers process
            assert [(s.source.name, s.port) for s in runtime.servers] == [(source.name, port)]
            return [code_of(await asyncio.to_thread(send, port, message)) for message in feed]
        finally:
            await runtime.stop()

    assert asyncio.run(scenario()) == ["AA"] * len(feed)
    assert set(_states(router, source).values()) == {"processed"}


@needs_redis
def test_runner_without_a_worker_raises_transient(router: FhirRouter) -> None:
    assert REDIS_URL
    source = _source(router)
    ids = [r.id for r in inbox.receive(router.ctx.store.engine, source, _feed(1))]
    runner = Runner(redis_url=REDIS_URL, queue_name=f"nobody-{uuid.uuid4().hex}", timeout=1)

    async def unanswered() -> None:
        try:
            await runner.process(ids)
        finally:
            await runner.close()

    with pytest.raises(Transient, match="no arq worker answered"):
        asyncio.run(unanswered())
    # Nothing was lost: still queued, for whoever processes next.
    assert set(_states(router, source).values()) == {"queued"}
    nobody = Runner(redis_url="redis://127.0.0.1:1/0", queue_name="x", timeout=1)
    with pytest.raises(Transient):
        asyncio.run(nobody.process(ids))
