"""How inbox messages get processed: in this process, or by arq workers over Redis.

Owns:

* ``Runner``: what an MLLP listener awaits to have the messages it just stored processed
  (``process(ids) -> outcomes``) before it ACKs. Without ``REDIS_URL`` it runs
  ``Pipeline.process_ids`` in a thread of this process; with ``REDIS_URL`` it enqueues the
  arq job ``process_ids`` and awaits its result (``Transient`` when Redis or the worker
  does not answer in time: the sender gets no ACK and sends again; the messages stay
  queued and the next ``process_due`` takes them).
* ``InProcessWorker``: a thread of ``hub serve`` / ``hub connectors serve`` that loops
  ``Pipeline.process_due`` (woken at once by new uploads, sleeping with backoff while idle)
  and runs the intake of sources that are polled: the QĐ 130 folder of each ``xml130``
  source with a ``folder`` setting and the ``fhir-pull`` pollers, each at its own interval.
* The arq side: ``worker_settings`` / ``WorkerSettings`` (job ``process_ids``; cron
  ``process_due``, which drains what is due, and ``poll_sources``, the same intake as the
  in-process worker), each worker building its own router at start-up, and ``run_worker``
  for ``hub connectors worker`` (several processes on request).
* ``ConnectorRuntime``: what ``hub serve`` starts and stops with the app (in-process
  worker, MLLP listeners when ``CONNECTORS_LISTEN`` is on).

Where the work runs. Without ``REDIS_URL`` everything runs in the serving process: the
listener processes before it ACKs, the in-process worker retries failures, drains uploads
and polls folders and FHIR servers. With ``REDIS_URL`` the serving process (``hub serve``
or ``hub connectors serve``) only receives (MLLP listeners, uploads) and the arq workers
(``hub connectors worker``) do all processing, retries and polling; arq runs each cron tick
once over all workers, so a folder is never read by two processes at once.

Calls: ``connectors.pipeline`` (``Pipeline``), ``connectors.sources``, the intake of
``connectors.xml130.folder`` and ``connectors.fhirpull``, ``connectors.mllp`` (listeners),
``connectors.metrics`` (batch histograms), arq, ``hub.app_factory.build_router``.
Called by: ``connectors.api`` (the app's lifespan), ``connectors.cli`` (serve, worker),
the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.metrics import observe_batch
from connectors.model import Source, Transient
from consent.context import system_access

if TYPE_CHECKING:
    import sqlalchemy as sa
    from arq.connections import ArqRedis

    from connectors.mllp import MllpServer
    from connectors.pipeline import Outcome, Pipeline
    from hub.rest import FhirRouter
    from hub.settings import Settings

log = logging.getLogger(__name__)

# How long a listener waits for an arq worker's result before the sender gets no ACK.
RESULT_TIMEOUT_SECONDS = 30.0
# How often an awaited job's result is looked for, and how often arq workers look for
# jobs: an ACK waits for both, so they are short (arq's default is half a second).
RESULT_POLL_SECONDS = 0.005
WORKER_POLL_SECONDS = 0.01
# The in-process worker's sleep while nothing is due: doubles from MIN to MAX.
IDLE_MIN_SECONDS = 0.05
IDLE_MAX_SECONDS = 1.0
# After an error (database down), before trying again.
ERROR_SECONDS = 2.0
# How often the registered sources are read again (new, paused, removed).
SOURCES_REFRESH_SECONDS = 10.0
# Default intake intervals when a source's settings give none ("interval", seconds).
FOLDER_INTERVAL_SECONDS = 5.0
PULL_INTERVAL_SECONDS = 60.0
# arq: the cron ticks (every CRON_EVERY seconds), how long one process_due tick drains,
# and how many jobs one worker process runs at once.
CRON_EVERY = 2
DRAIN_SECONDS = 20.0
MAX_JOBS = 4


def _process_ids(pipeline: Pipeline, ids: list[int], mode: str) -> dict[int, Outcome]:
    """``Pipeline.process_ids`` in the connectors' own system access, timed."""
    started = time.perf_counter()
    with system_access("connectors-worker"):
        outcomes = pipeline.process_ids(ids)
    observe_batch(mode, time.perf_counter() - started, len(ids))
    return outcomes


def _process_due(pipeline: Pipeline, mode: str) -> int:
    started = time.perf_counter()
    with system_access("connectors-worker"):
        done = pipeline.process_due()
    if done:
        observe_batch(mode, time.perf_counter() - started, done)
    return done


def _anything_due(engine: sa.Engine) -> bool:
    """A read before claiming: an idle worker then never opens a write transaction (SQLite
    has one writer, which the API's requests need)."""
    import sqlalchemy as sa

    from connectors.inbox import now
    from hub.db.schema import connector_message

    m, moment = connector_message.c, now()
    due = sa.or_(
        m.state == "queued",
        sa.and_(m.state == "failed", m.next_attempt_at <= moment),
        sa.and_(m.state == "processing", m.lease_until < moment),
    )
    query = sa.select(m.id).where(m.state.in_(("queued", "failed", "processing")), due).limit(1)
    with engine.connect() as conn:
        return conn.execute(query).first() is not None


def _drain(pipeline: Pipeline, mode: str, seconds: float) -> int:
    """``process_due`` until nothing is due or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    total = 0
    while time.monotonic() < deadline:
        done = _process_due(pipeline, mode)
        total += done
        if not done:
            break
    return total


# --- the runner a listener awaits ------------------------------------------------------------


class Runner:
    """Processes the given inbox ids now and returns their outcomes (``connectors.mllp``
    awaits it before it ACKs)."""

    def __init__(
        self,
        pipeline: Pipeline | None = None,
        *,
        redis_url: str | None = None,
        queue_name: str = "hub-connectors",
        timeout: float = RESULT_TIMEOUT_SECONDS,
    ) -> None:
        if pipeline is None and redis_url is None:
            raise ValueError("a Runner needs a pipeline (in-process) or a Redis URL (arq)")
        self.pipeline = pipeline
        self.redis_url = redis_url
        self.queue_name = queue_name
        self.timeout = timeout
        self._redis: ArqRedis | None = None

    @classmethod
    def for_settings(cls, router: FhirRouter, settings: Settings) -> Runner:
        """arq when ``REDIS_URL`` is set, else in-process."""
        if settings.redis_url:
            return cls(redis_url=settings.redis_url, queue_name=settings.connectors_queue)
        from connectors.pipeline import Pipeline

        return cls(Pipeline(router))

    @property
    def mode(self) -> str:
        return "arq" if self.redis_url else "in-process"

    async def process(self, ids: list[int]) -> dict[int, Outcome]:
        if not ids:
            return {}
        if self.pipeline is not None and self.redis_url is None:
            return await asyncio.to_thread(_process_ids, self.pipeline, ids, "in-process")
        try:
            redis = await self._pool()
            job = await redis.enqueue_job("process_ids", ids, _queue_name=self.queue_name)
            if job is None:  # only when a job id is reused; ours are arq's random ones
                raise Transient("the processing job could not be enqueued")
            outcomes: dict[int, Outcome] = await job.result(
                timeout=self.timeout, poll_delay=RESULT_POLL_SECONDS
            )
        except Transient:
            raise
        except TimeoutError as exc:
            raise Transient(f"no arq worker answered within {self.timeout:g} s") from exc
        except Exception as exc:  # noqa: BLE001  (Redis down, the job failed: the sender retries)
            raise Transient(f"processing through arq failed: {exc}") from exc
        return outcomes

    async def _pool(self) -> ArqRedis:
        if self._redis is None:
            from arq.connections import RedisSettings, create_pool

            assert self.redis_url is not None
            redis_settings = RedisSettings.from_dsn(self.redis_url)
            redis_settings.conn_retries = 0  # Redis down: no ACK now, the sender retries
            self._redis = await create_pool(redis_settings, default_queue_name=self.queue_name)
        return self._redis

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()


# --- intake of polled sources ------------------------------------------------------------------


class Intake:
    """Polls the sources that are not pushed to the hub: each ``xml130`` source's folder
    (settings ``folder``) and each ``fhir-pull`` source, at their ``interval`` (seconds).
    Sources are read again every ``SOURCES_REFRESH_SECONDS``: a FHIR pull source replaced
    with other settings gets a fresh ``Poller`` then."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._sources: list[Source] = []
        self._sources_read = float("-inf")
        self._due: dict[str, float] = {}
        self._pollers: dict[str, Any] = {}

    def _refresh(self, now: float, *, force: bool = False) -> None:
        if not force and now - self._sources_read < SOURCES_REFRESH_SECONDS:
            return
        from connectors import sources

        self._sources = [
            s
            for s in sources.all_sources(self.engine)
            if not s.paused and (s.kind == "fhir-pull" or (s.kind == "xml130" and s.settings.get("folder")))
        ]
        self._sources_read = now
        names = {s.name for s in self._sources}
        for name in [n for n in self._pollers if n not in names]:  # removed or paused
            with contextlib.suppress(Exception):
                self._pollers.pop(name).close()

    def poll(self, *, force: bool = False) -> int:
        """Poll every source whose interval has passed (all of them with ``force``); returns
        how many messages were received. A failing source is logged and tried again at
        its next interval; the others go on."""
        now = time.monotonic()
        self._refresh(now, force=force)
        received = 0
        for source in self._sources:
            if not force and now < self._due.get(source.name, 0.0):
                continue
            default = FOLDER_INTERVAL_SECONDS if source.kind == "xml130" else PULL_INTERVAL_SECONDS
            self._due[source.name] = now + float(source.settings.get("interval", default))
            try:
                with self._only_here(source) as mine, system_access(f"connectors-intake-{source.name}"):
                    if mine:
                        received += self._poll_one(source)
            except (Transient, OSError) as error:
                # Expected while a facility's server or share is away: one line per interval.
                log.warning("intake of source %s: %s (retried at the next interval)", source.name, error)
            except Exception:  # noqa: BLE001  (one source's trouble never stops the others)
                log.exception("intake of source %s failed", source.name)
        return received

    @contextlib.contextmanager
    def _only_here(self, source: Source) -> Iterator[bool]:
        """Whether this process may poll the source now: on PostgreSQL a session advisory
        lock per source, so two processes (uvicorn workers, arq workers whose cron ticks
        overlap a long poll) never read one folder or one FHIR server at once."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        import sqlalchemy as sa

        key = sa.func.hashtext(f"hub-connector-intake:{source.name}")
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            locked = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar())
            try:
                yield locked
            finally:
                if locked:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))

    def _poll_one(self, source: Source) -> int:
        if source.kind == "xml130":
            from connectors.xml130.folder import watch

            result = watch(self.engine, source, Path(str(source.settings["folder"])))
            return len(result) if isinstance(result, (list, tuple)) else int(result or 0)
        from connectors.fhirpull import Poller

        poller = self._pollers.get(source.name)
        if poller is not None and poller.source != source:
            # Replaced (sources.add replace=True): new URL, token or types take effect now;
            # the cursor is in the database, so the new poller goes on where the old one was.
            with contextlib.suppress(Exception):
                poller.close()
            poller = None
        if poller is None:
            poller = self._pollers[source.name] = Poller(self.engine, source)
        return int(poller.poll_once())


# --- the in-process worker ---------------------------------------------------------------


class InProcessWorker:
    """A thread that processes what is due and polls the polled sources, until stopped."""

    def __init__(
        self,
        router: FhirRouter,
        *,
        process: bool = True,
        intake: bool = True,
        name: str = "connectors-worker",
    ) -> None:
        from connectors.pipeline import Pipeline

        self.pipeline = Pipeline(router)
        self.intake = Intake(router.ctx.store.engine) if intake else None
        self.process = process
        self.name = name
        self.processed = 0  # messages this worker processed (tests, logs)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = float("-inf")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Look for due messages now (new ones were stored)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch in hand (committed or rolled back, never half done)."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> int:
        """One round: intake, then everything due. Returns the messages processed."""
        if self.intake is not None:
            self.intake.poll()
        done = 0
        if self.process and _anything_due(self.pipeline.engine):
            while not self._stop.is_set():
                batch = _process_due(self.pipeline, "in-process")
                done += batch
                self.processed += batch  # counted per committed batch, as the rows show it
                if not batch:
                    break
        return done

    def _run(self) -> None:
        idle = IDLE_MIN_SECONDS
        while not self._stop.is_set():
            self._wake.clear()
            try:
                done = self.run_once()
            except Exception as exc:  # noqa: BLE001  (database down: wait, then try again)
                now = time.monotonic()
                if now - self._last_error_log > 60:  # once a minute, not once a loop
                    log.warning("connector worker: %s; retrying every %g s", exc, ERROR_SECONDS)
                    self._last_error_log = now
                self._wake.wait(ERROR_SECONDS)
                continue
            if done:
                idle = IDLE_MIN_SECONDS
                continue
            self._wake.wait(idle)
            idle = min(IDLE_MAX_SECONDS, idle * 2)


# --- arq ------------------------------------------------------------------------------------


async def _startup(ctx: dict[str, Any]) -> None:
    """Each arq worker process builds its own router (engine, keys, registry)."""
    from connectors.pipeline import Pipeline
    from hub.app_factory import build_router

    router = build_router(ctx["settings"])
    ctx["router"] = router
    ctx["pipeline"] = Pipeline(router)
    ctx["intake"] = Intake(router.ctx.store.engine)


async def _shutdown(ctx: dict[str, Any]) -> None:
    router = ctx.get("router")
    if router is not None:
        router.ctx.store.engine.dispose()


async def process_ids(ctx: dict[str, Any], ids: list[int]) -> dict[int, Outcome]:
    """arq job: process exactly these inbox messages (a listener awaits the outcomes)."""
    return await asyncio.to_thread(_process_ids, ctx["pipeline"], list(ids), "arq-job")


async def process_due(ctx: dict[str, Any]) -> int:
    """arq cron: process what is due (new, retries, expired leases) for up to DRAIN_SECONDS."""
    return await asyncio.to_thread(_drain, ctx["pipeline"], "arq-cron", DRAIN_SECONDS)


async def poll_sources(ctx: dict[str, Any]) -> int:
    """arq cron: the intake of folders and FHIR pull sources (once per tick over all workers)."""
    intake: Intake = ctx["intake"]
    return await asyncio.to_thread(intake.poll)


def worker_settings(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The arq ``Worker`` arguments of a connector worker (``arq.worker.run_worker`` takes
    them as its settings)."""
    from arq import cron, func
    from arq.connections import RedisSettings

    if not settings.redis_url:
        raise ValueError("arq workers need REDIS_URL")
    ticks = set(range(0, 60, CRON_EVERY))
    return {
        "functions": [func(process_ids, name="process_ids", keep_result=300)],
        "cron_jobs": [
            cron(
                process_due,
                name="process_due",
                second=ticks,
                run_at_startup=True,
                keep_result=0,
                timeout=DRAIN_SECONDS + 60,
            ),
            cron(poll_sources, name="poll_sources", second=ticks, keep_result=0, timeout=300),
        ],
        "queue_name": settings.connectors_queue,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": {"settings": settings},
        "max_jobs": MAX_JOBS,
        "poll_delay": WORKER_POLL_SECONDS,
        "job_timeout": 300,
        "keep_result": 300,
        "log_results": False,
        **overrides,
    }


class WorkerSettings:
    """For arq's own command line: ``arq connectors.worker.WorkerSettings`` (settings from
    the environment, as ``hub connectors worker`` reads them)."""

    functions = [process_ids]
    on_startup = _startup
    on_shutdown = _shutdown


def _arq_settings_from_env() -> None:
    """Fill ``WorkerSettings`` from the environment's settings (import time, arq's CLI)."""
    from hub.settings import get_settings

    settings = get_settings()
    if settings.redis_url:
        for key, value in worker_settings(settings).items():
            setattr(WorkerSettings, key, value)


_arq_settings_from_env()


def _run_one(settings: Settings, metrics_port: int | None) -> None:
    from arq.worker import run_worker as arq_run_worker

    if metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server

        from connectors.metrics import BATCH_MESSAGES, BATCH_SECONDS

        registry = CollectorRegistry()
        registry.register(BATCH_SECONDS)
        registry.register(BATCH_MESSAGES)
        start_http_server(metrics_port, registry=registry)
    arq_run_worker(worker_settings(settings))


def run_worker(settings: Settings, processes: int = 1, *, metrics_port: int | None = None) -> None:
    """``hub connectors worker``: ``processes`` arq worker processes (1: this one), until
    SIGINT/SIGTERM; with several, worker i serves its batch histograms on
    ``metrics_port + i``."""
    if processes <= 1:
        _run_one(settings, metrics_port)
        return
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_run_one,
            args=(settings, metrics_port + i if metrics_port else None),
            name=f"connectors-worker-{i}",
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    import os

                    os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()


# --- what `hub serve` runs beside the API ------------------------------------------------------


def mllp_ssl(settings: Settings) -> ssl.SSLContext | None:
    """The hub-wide MLLP TLS context (MLLP_TLS_CERT/KEY), for sources without their own."""
    if not settings.mllp_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.mllp_tls_cert, settings.mllp_tls_key)
    return context


async def start_listeners(
    router: FhirRouter,
    settings: Settings,
    runner: Runner,
    sources: list[Source] | None = None,
    *,
    tolerate_busy: bool = False,
) -> list[MllpServer]:
    """An MLLP listener per unpaused hl7v2-mllp source (at its ``port``; its ``host`` or
    MLLP_HOST; its own TLS files (``certfile``, ``keyfile``) or MLLP_TLS_CERT/KEY)."""
    from connectors import sources as registry
    from connectors.mllp import MllpServer

    engine = router.ctx.store.engine
    if sources is None:
        sources = await asyncio.to_thread(registry.all_sources, engine)
    hub_tls = mllp_ssl(settings)
    servers: list[MllpServer] = []
    try:
        for source in sources:
            if source.kind != "hl7v2-mllp" or source.paused:
                continue
            server = MllpServer(
                engine,
                source,
                runner,
                host=str(source.settings.get("host") or settings.mllp_host),
                # Its own certfile wins; "tls": false keeps it plain even with MLLP_TLS_CERT.
                ssl_context=None
                if source.settings.get("certfile") or source.settings.get("tls") is False
                else hub_tls,
            )
            try:
                await server.start()
            except OSError as error:
                await server.stop()  # its stages started before the bind failed
                if not (tolerate_busy and error.errno == errno.EADDRINUSE):
                    raise
                # `hub serve --workers N`: the first process to bind a port serves it.
                log.info("MLLP port %s of %s is served by another process", server.port, source.name)
                continue
            servers.append(server)
    except BaseException:
        for server in servers:
            await server.stop()
        raise
    return servers


class ConnectorRuntime:
    """The connectors' part of a serving process: the in-process worker (without REDIS_URL,
    unless CONNECTOR_WORKERS is 0) and, when asked, the MLLP listeners."""

    def __init__(
        self,
        router: FhirRouter,
        settings: Settings,
        *,
        listen: bool | None = None,
        only: list[str] | None = None,
        tolerate_busy: bool = True,
    ) -> None:
        self.router = router
        self.settings = settings
        self.listen = settings.connectors_listen if listen is None else listen
        self.only = only  # listen for these sources only (default: every hl7v2-mllp source)
        # A port another process of `hub serve --workers N` holds is skipped, not an error.
        self.tolerate_busy = tolerate_busy
        self.workers: list[InProcessWorker] = []
        self.servers: list[MllpServer] = []
        self.runner: Runner | None = None

    async def start(self) -> None:
        if not self.settings.redis_url:
            try:
                # Intake in the first thread only: a folder is read by one thread at a time.
                self.workers = [
                    InProcessWorker(self.router, intake=i == 0, name=f"connectors-worker-{i}")
                    for i in range(max(0, self.settings.connector_workers))
                ]
            except Exception:  # noqa: BLE001  (the FHIR API serves on; /connectors shows the backlog)
                log.exception("the in-process connector worker could not start")
                self.workers = []
            for worker in self.workers:
                worker.start()
        if self.listen:
            self.runner = Runner.for_settings(self.router, self.settings)
            chosen = None
            if self.only is not None:
                from connectors import sources as registry

                found = await asyncio.to_thread(registry.all_sources, self.router.ctx.store.engine)
                chosen = [s for s in found if s.name in self.only]
            self.servers = await start_listeners(
                self.router, self.settings, self.runner, chosen, tolerate_busy=self.tolerate_busy
            )

    def wake(self) -> None:
        """New messages were stored (an upload): let an in-process worker take them now."""
        for worker in self.workers[:1]:
            worker.wake()

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        self.servers = []
        if self.runner is not None:
            await self.runner.close()
            self.runner = None
        workers, self.workers = self.workers, []
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))
