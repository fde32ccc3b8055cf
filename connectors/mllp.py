"""The HL7 v2 listener: MLLP over TCP (TLS optional), one listener per ``hl7v2-mllp`` source.

Owns: the MLLP framing on the wire (``0x0B message 0x1C 0x0D``, tolerating a missing final
CR, bytes between frames and a BOM or LF endings inside), the limits of a connection (size
of one message, idle time), the group commit of receipt and processing across all of a
listener's connections, and which ACK a sender gets:

* AA when the message is processed (its transaction committed);
* AE (with an ERR segment: the error and where) when it is rejected, kept in the inbox;
* AR when its type is unsupported;
* no ACK at all, and the connection closed, when the store is down (receipt or processing
  raised ``Transient`` or a database error) or the message is not final yet: the sender
  sends it again, and ``inbox.receive`` recognises the resend as a duplicate, so a message
  is stored and processed once however often it comes.

Two stages: the *receiver* (one task) takes every message waiting on any connection (up
to ``batch_size``) and stores them with ONE ``inbox.receive`` (one database transaction);
then each received message goes to a *lane* chosen by its ordering key (the patient), and
each lane's *processor* takes everything waiting in it and runs ONE ``runner.process(ids)``
(one write transaction, a SAVEPOINT per message). Receipt of the next batch overlaps
processing; lanes run side by side (``lanes`` transactions at once, so the database's
round trips overlap; default one, see ``LANES``), and within a lane one batch at a time, so a patient's earlier message is final before a later one of the same
patient is processed. A connection sends one message and waits for its ACK (what MLLP
senders do): many connections make the batches.

Calls: ``connectors.inbox.receive`` (in a thread), a ``Runner`` (``connectors.worker.Runner``,
or ``PipelineRunner`` here: ``connectors.pipeline.Pipeline.process_ids`` in a thread),
``connectors.hl7v2.ack`` (ACK building) and ``connectors.hl7v2.framing`` (normalisation).
Called by: ``connectors.worker.start_listeners`` (``hub connectors serve``, ``hub serve``
with CONNECTORS_LISTEN), the tests and ``bench/connectors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
import ssl
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlalchemy as sa

from connectors.hl7v2.ack import ack
from connectors.hl7v2.framing import frame, normalize
from connectors.model import Rejected, Source, Transient

if TYPE_CHECKING:
    from connectors.pipeline import Outcome, Pipeline

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_PORT = 2575
DEFAULT_HOST = "0.0.0.0"  # noqa: S104  (a listener for facilities on the network)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
IDLE_SECONDS = 300.0  # a connection silent this long is closed (senders reconnect)
# A message must arrive whole this long after its start block: a sender trickling bytes
# (slow loris) is never idle, so the idle limit alone would hold its buffer forever.
MESSAGE_SECONDS = 120.0
# Open connections per listener: each may buffer up to max_message_bytes, so this bounds the
# listener's memory (a HIS keeps one to a few; more are a misconfigured or hostile peer).
MAX_CONNECTIONS = 256
# Bytes all of a listener's connections may hold in partial messages at once (each one up to
# max_message_bytes): many large senders at once are cut off (no ACK: they resend later)
# before they exhaust the process's memory.
MAX_BUFFERED_BYTES = 256 * 1024 * 1024
BATCH_SIZE = 200
# Processing transactions at once. 1 by default: measured (bench/connectors.py, PostgreSQL,
# 2 cores) two lanes gave 78 msg/s against 116 for one: processing is CPU-bound in the
# client, and one lane's batches grow as messages wait, so fewer, larger units are cheaper.
LANES = 1

START_BLOCK = 0x0B
END_BLOCK = 0x1C
CR = 0x0D
_READ_CHUNK = 64 * 1024

# States after which the message will not change without an operator (replay).
_FINAL = frozenset({"processed", "rejected", "dead"})
# A database that is down or restarting shows up as one of these; the sender must retry.
_STORE_DOWN: tuple[type[BaseException], ...] = (Transient, sa.exc.DBAPIError, OSError)


class Runner(Protocol):
    """How messages are processed after receipt (``connectors.worker.Runner`` implements it)."""

    async def process(self, ids: list[int]) -> dict[int, Outcome]: ...


class PipelineRunner:
    """``Pipeline.process_ids`` in a thread of this process (no Redis). Its own thread, not
    the loop's default executor, which other work in the process may fill."""

    def __init__(self, pipeline: Pipeline, *, threads: int = 4) -> None:
        self.pipeline = pipeline
        self._thread = ThreadPoolExecutor(threads, thread_name_prefix="mllp-process")

    async def process(self, ids: list[int]) -> dict[int, Outcome]:
        return await _in_thread(self._thread, self.pipeline.process_ids, ids)

    def close(self) -> None:
        self._thread.shutdown(wait=False)


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in ``executor``, in a copy of the caller's context (like
    ``asyncio.to_thread``: the system access of ``hub connectors serve`` goes along)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, fn, *args)


def build_ack(raw: bytes, code: str, error: str | None = None, where: str | None = None) -> bytes:
    """The ACK of ``raw``, unframed."""
    return ack(raw, code, error, where)


# --- one listener ------------------------------------------------------------------------


class StoreDown(Exception):
    """Receipt or processing could not run: the sender gets no ACK and must resend."""


@dataclass
class _Pending:
    raw: bytes
    done: asyncio.Future[bytes]  # the ACK, or StoreDown
    received_at: float = field(default_factory=time.perf_counter)
    id: int | None = None


@dataclass
class ListenerStats:
    """Counters of one listener (for status pages and the benchmark)."""

    connections: int = 0
    open_connections: int = 0
    messages: int = 0
    acks: dict[str, int] = field(default_factory=lambda: {"AA": 0, "AE": 0, "AR": 0})
    no_ack: int = 0  # store down or not final: closed without an ACK
    batches: int = 0
    largest_batch: int = 0
    too_large: int = 0
    too_slow: int = 0  # cut off: a message not whole within message_seconds
    refused: int = 0  # connections closed at once: max_connections were open
    refused_peers: int = 0  # connections closed at once: the peer is not in setting "allow"
    over_budget: int = 0  # cut off (no ACK): the listener's buffers held max_buffered_bytes
    last_error: str | None = None
    # MSH-4 (sending facility) as senders wrote it, with how many messages named it: the
    # source stays the listener's whatever a message says, but an operator sees who sends.
    sending_facilities: dict[str, int] = field(default_factory=dict)


class MllpServer:
    """An MLLP listener for one source (``source.settings``: ``host``, ``port``, and for TLS
    ``certfile`` / ``keyfile``); ``port=0`` picks a free port (``self.port`` after start)."""

    def __init__(
        self,
        engine: sa.Engine,
        source: Source,
        runner: Runner,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        batch_size: int = BATCH_SIZE,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        idle_seconds: float = IDLE_SECONDS,
        lanes: int | None = None,
        message_seconds: float = MESSAGE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        if source.kind != "hl7v2-mllp":
            raise ValueError(f"source {source.name!r} is {source.kind}, not hl7v2-mllp")
        self.engine = engine
        self.source = source
        self.runner = runner
        self.host = host or str(source.settings.get("host") or DEFAULT_HOST)
        self.port = int(port if port is not None else source.settings.get("port", DEFAULT_PORT))
        self.ssl_context = ssl_context if ssl_context is not None else tls_context(source.settings)
        self.allowed = allowed_networks(source.settings)
        self.batch_size = batch_size
        self.max_message_bytes = max_message_bytes
        self.idle_seconds = idle_seconds
        self.message_seconds = message_seconds
        self.max_connections = max_connections
        self._budget = _Budget(max_buffered_bytes)
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._incoming: asyncio.Queue[_Pending] = asyncio.Queue()
        self.lanes = max(1, lanes or LANES)
        self._lanes: list[asyncio.Queue[list[_Pending]]] = [asyncio.Queue() for _ in range(self.lanes)]
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"mllp-receive-{source.name}")

    # lifecycle

    async def start(self) -> None:
        if not self._closed_to_strangers() and not _loopback(self.host):
            # Fail closed: on a network address, whoever reaches the port would write into
            # the citizens' records as this facility.
            raise ValueError(
                f"MLLP {self.source.name}: listening on {self.host} needs setting 'allow' (the HIS "
                "addresses) or 'client_cafile' (TLS client certificates); only a loopback "
                "address may go without"
            )
        self._tasks = [
            asyncio.create_task(self._receiver(), name=f"mllp-receive-{self.source.name}"),
            *(
                asyncio.create_task(self._processor(lane), name=f"mllp-process-{self.source.name}-{n}")
                for n, lane in enumerate(self._lanes)
            ),
        ]
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, ssl=self.ssl_context, limit=_READ_CHUNK
        )
        if self.port == 0:  # an ephemeral port (tests): tell the caller which one
            self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "MLLP listener for %s on %s:%d%s",
            self.source.name,
            self.host,
            self.port,
            " (TLS)" if self.ssl_context else "",
        )
        if not self._closed_to_strangers():
            log.warning(
                "MLLP %s: any peer that reaches %s:%d may send as facility %s: set 'allow' "
                "(addresses) or 'client_cafile' (TLS client certificates)",
                self.source.name,
                self.host,
                self.port,
                self.source.facility_code,
            )

    def _closed_to_strangers(self) -> bool:
        """Only the allowed addresses, or holders of a client certificate, may connect."""
        return self.allowed is not None or (
            self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_REQUIRED
        )

    async def stop(self) -> None:
        """Stop accepting, close every connection, end the stages. A batch in a database
        call finishes there (its thread cannot be interrupted); its senders get no ACK."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._connections, *self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._fail_waiting(self._incoming)
        self._thread.shutdown(wait=False)

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # one connection: read a frame, wait for its ACK, write it, read the next

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        if not _peer_allowed(peer, self.allowed):
            # Whoever reaches the port would otherwise write into the record as this facility.
            self.stats.refused_peers += 1
            log.warning("MLLP %s: %s is not an allowed peer: closed", self.source.name, peer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        if len(self._connections) >= self.max_connections:
            # Refused before anything is read: idle or hostile connections cannot pile up
            # buffers, and the ones already open (the facility's own) keep being served.
            self.stats.refused += 1
            log.warning(
                "MLLP %s: %d connections open, refusing %s", self.source.name, self.max_connections, peer
            )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._connections.add(task)
        self.stats.connections += 1
        self.stats.open_connections += 1
        frames = _FrameReader(
            reader, self.max_message_bytes, self.idle_seconds, self.message_seconds, self._budget
        )
        try:
            while True:
                try:
                    raw = await frames.next()
                except _TooLarge as too_large:
                    self.stats.too_large += 1
                    log.warning(
                        "MLLP %s: message from %s over %d bytes: AE, closing",
                        self.source.name,
                        peer,
                        self.max_message_bytes,
                    )
                    writer.write(
                        frame(
                            build_ack(
                                too_large.head, "AE", f"message larger than {self.max_message_bytes} bytes"
                            )
                        )
                    )
                    await writer.drain()
                    return
                except _OverBudget:
                    self.stats.over_budget += 1
                    log.warning(
                        "MLLP %s: buffers full (%d bytes), closing %s without an ACK",
                        self.source.name,
                        self._budget.limit,
                        peer,
                    )
                    return
                except _TooSlow:
                    self.stats.too_slow += 1
                    log.warning(
                        "MLLP %s: message from %s not whole within %.0f s: closing",
                        self.source.name,
                        peer,
                        self.message_seconds,
                    )
                    return
                if raw is None:  # the sender closed, or was idle too long
                    return
                self.stats.messages += 1
                pending = _Pending(normalize(raw), asyncio.get_running_loop().create_future())
                self._record_sender(pending.raw, peer)
                self._incoming.put_nowait(pending)
                try:
                    ack = await pending.done
                except StoreDown as down:
                    self.stats.no_ack += 1
                    log.warning(
                        "MLLP %s: no ACK to %s (%s): closing so it resends", self.source.name, peer, down
                    )
                    return
                writer.write(frame(ack))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("MLLP %s: connection from %s lost: %s", self.source.name, peer, exc)
        finally:
            frames.release()
            self.stats.open_connections -= 1
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _record_sender(self, raw: bytes, peer: object) -> None:
        facility = _sending_facility(raw)
        seen = self.stats.sending_facilities
        if facility not in seen and len(seen) < 100:  # bounded: a sender cannot grow it
            if facility != self.source.facility_code:
                log.warning(
                    "MLLP %s: %s sends as MSH-4 %r, not facility %s (stored as this source's)",
                    self.source.name,
                    peer,
                    facility,
                    self.source.facility_code,
                )
            seen[facility] = 0
        if facility in seen:
            seen[facility] += 1

    # stage 1: receipt, one inbox transaction per batch

    async def _receiver(self) -> None:
        from connectors import inbox

        while True:
            batch = await _take(self._incoming, self.batch_size)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                received = await _in_thread(
                    self._thread, inbox.receive, self.engine, self.source, [p.raw for p in batch]
                )
            except _STORE_DOWN as exc:
                self._down(batch, f"receipt failed: {exc!r}")
                continue
            except Exception as exc:  # a defect: nothing was ACKed, the sender resends
                log.exception("MLLP %s: inbox.receive failed", self.source.name)
                self._down(batch, f"receipt failed: {exc!r}")
                continue
            lanes: list[list[_Pending]] = [[] for _ in self._lanes]
            for pending, row in zip(batch, received, strict=True):
                pending.id = row.id
                if row.state in ("queued", "failed", "processing"):
                    key = row.peek.ordering_key if row.peek is not None else None
                    # One patient, one lane (its order kept); no patient: any lane.
                    lane = zlib.crc32(key.encode()) if key is not None else row.id
                    lanes[lane % self.lanes].append(pending)
                elif row.state == "rejected":  # refused at peek (or earlier)
                    where, unsupported = self._why_refused(pending.raw)
                    self._answer(pending, row.state, row.error, where, unsupported=unsupported)
                else:  # a resend of a message already final
                    self._answer(pending, row.state, row.error, None, unsupported=False)
            for queue, pendings in zip(self._lanes, lanes, strict=True):
                if pendings:
                    queue.put_nowait(pendings)

    def _why_refused(self, raw: bytes) -> tuple[str | None, bool]:
        """Where a message refused at receipt is wrong, and whether its type is unsupported
        (AR): the inbox row keeps only the text, so the format's peek says it again (cheap:
        MSH and PID only; a refused message is rare)."""
        from connectors.pipeline import format_of

        try:
            format_of(self.source).peek(raw)
        except Rejected as refused:
            return refused.where, refused.unsupported
        except Exception:  # noqa: BLE001  (unreadable bytes: an AE without a place)
            return None, False
        return None, False

    # stage 2: processing, one runner call (one write transaction) per lane's batch

    async def _processor(self, lane: asyncio.Queue[list[_Pending]]) -> None:
        while True:
            batches = await _take(lane, self.batch_size)
            batch = [p for b in batches for p in b]
            ids = [p.id for p in batch if p.id is not None]
            try:
                outcomes = await self.runner.process(ids)
            except _STORE_DOWN as exc:
                self._down(batch, f"processing failed: {exc!r}")
                continue
            except Exception as exc:  # a defect: the messages stay in the inbox, unACKed
                log.exception("MLLP %s: processing failed", self.source.name)
                self._down(batch, f"processing failed: {exc!r}")
                continue
            for pending in batch:
                outcome = outcomes.get(pending.id) if pending.id is not None else None
                if outcome is None:  # not due now (a worker holds it): not final
                    self._down([pending], "not processed yet")
                    continue
                self._answer(
                    pending, outcome.state, outcome.error, outcome.where, unsupported=outcome.unsupported
                )

    # answers

    def _answer(
        self,
        pending: _Pending,
        state: str,
        error: str | None,
        where: str | None,
        *,
        unsupported: bool,
    ) -> None:
        if pending.done.done():  # its connection went away meanwhile
            return
        if state == "processed":
            code = "AA"
        elif state == "rejected":
            code = "AR" if unsupported else "AE"
        elif state == "dead":  # dead-lettered earlier: it needs an operator's replay
            code, error = "AE", f"dead-lettered: {error or 'too many failures'} (replay needed)"
        else:  # failed (transient) or still processing: the sender must resend later
            self._down([pending], f"{state}: {error}")
            return
        self.stats.acks[code] += 1
        pending.done.set_result(build_ack(pending.raw, code, error if code != "AA" else None, where))

    def _down(self, batch: Iterable[_Pending], why: str) -> None:
        self.stats.last_error = why
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(StoreDown(why))

    def _fail_waiting(self, queue: asyncio.Queue[_Pending]) -> None:
        while not queue.empty():
            self._down([queue.get_nowait()], "listener stopped")


def _sending_facility(raw: bytes) -> str:
    """MSH-4's first component, read without parsing the message ("" when there is none)."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        return ""
    field_sep, component_sep = raw[3:4], raw[4:5]
    fields = raw.split(b"\r", 1)[0].split(field_sep)
    if len(fields) < 4:
        return ""
    return fields[3].split(component_sep)[0].decode("utf-8", "replace")[:64]


async def _take(queue: asyncio.Queue[_T], limit: int) -> list[_T]:
    """Wait for one item, then take whatever else is already waiting (up to ``limit``),
    without waiting for more: the group commit never adds latency to a lone message."""
    items = [await queue.get()]
    while len(items) < limit and not queue.empty():
        items.append(queue.get_nowait())
    return items


# --- reading frames ----------------------------------------------------------------------


class _TooLarge(Exception):
    def __init__(self, head: bytes) -> None:
        super().__init__("message too large")
        self.head = head  # the start of the message, for the AE's MSH


class _TooSlow(Exception):
    """A message was not whole within ``message_seconds`` of its start block."""


class _OverBudget(Exception):
    """The listener's connections together hold ``max_buffered_bytes`` already."""


@dataclass
class _Budget:
    """Bytes buffered by all of one listener's connections (one event loop: no lock)."""

    limit: int
    used: int = 0


class _FrameReader:
    """Frames from a stream: bytes before a start block (stray CR/LF, keep-alives) are
    skipped, a message ends at the end block, and the CR after it may be missing."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        limit: int,
        idle_seconds: float,
        message_seconds: float = MESSAGE_SECONDS,
        budget: _Budget | None = None,
    ) -> None:
        self.reader = reader
        self.budget = budget if budget is not None else _Budget(MAX_BUFFERED_BYTES)
        self.accounted = 0  # of self.buffer, counted in the budget
        self.limit = limit
        self.idle_seconds = idle_seconds
        self.message_seconds = message_seconds
        self.buffer = bytearray()

    def _account(self) -> None:
        self.budget.used += len(self.buffer) - self.accounted
        self.accounted = len(self.buffer)

    def release(self) -> None:
        """The connection ends: its buffer leaves the budget."""
        self.buffer.clear()
        self._account()

    async def next(self) -> bytes | None:
        start = -1
        scanned = 0
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set when a message has begun
        while True:
            if start < 0:
                start = self.buffer.find(START_BLOCK)
                if start < 0:
                    self.buffer.clear()
                else:
                    del self.buffer[:start]
                    start, scanned = 0, 1
            if start == 0 and deadline is None:
                deadline = loop.time() + self.message_seconds
            if start == 0:
                end = self.buffer.find(END_BLOCK, scanned)
                if end - 1 > self.limit or (end < 0 and len(self.buffer) - 1 > self.limit):
                    head = bytes(self.buffer[1:4096])
                    self.buffer.clear()
                    raise _TooLarge(head)
                if end >= 0:
                    message = bytes(self.buffer[1:end])
                    drop = end + 1
                    if len(self.buffer) > drop and self.buffer[drop] == CR:
                        drop += 1
                    del self.buffer[:drop]
                    return message
                scanned = len(self.buffer)
            wait = self.idle_seconds
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise _TooSlow
                wait = min(wait, left)
            try:
                chunk = await asyncio.wait_for(self.reader.read(_READ_CHUNK), wait)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise _TooSlow from None
                return None
            if not chunk:
                return None
            self._account()
            if self.budget.used + len(chunk) > self.budget.limit:
                raise _OverBudget
            self.buffer += chunk
            self._account()


# --- TLS and start-up --------------------------------------------------------------------


def allowed_networks(
    settings: dict[str, Any],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """Setting ``allow``: the addresses (or networks, "10.0.12.0/24") that may connect; None
    when not set (anyone who reaches the port)."""
    allow = settings.get("allow")
    if allow is None:
        return None
    if isinstance(allow, str):
        allow = [allow]
    try:
        return [ipaddress.ip_network(str(item), strict=False) for item in allow]
    except ValueError as error:
        raise ValueError(f"setting 'allow': {error}") from None


def _loopback(host: str | None) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): not provably local


def _peer_allowed(peer: object, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None) -> bool:
    if allowed is None:
        return True
    try:
        address = ipaddress.ip_address(str(peer[0]))  # type: ignore[index]
    except (TypeError, IndexError, ValueError):
        return False  # not an IP peer (fails closed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed)


def tls_context(settings: dict[str, Any]) -> ssl.SSLContext | None:
    """A server TLS context from a source's settings (``certfile``: the certificate chain,
    PEM; ``keyfile`` when the key is not in it; ``tls``: true to insist; ``client_cafile``:
    the CA (PEM) whose client certificates alone may connect: mutual TLS), or None: plain TCP."""
    cert = settings.get("certfile")
    if settings.get("client_cafile") and (not cert or settings.get("tls") is False):
        raise ValueError("setting 'client_cafile' needs TLS: a 'certfile'")  # never silently open
    if not cert:
        if settings.get("tls"):
            raise ValueError("setting 'tls' is on but no 'certfile' is given")
        return None
    if settings.get("tls") is False:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    key = settings.get("keyfile")
    context.load_cert_chain(Path(cert), Path(key) if key else None)
    client_ca = settings.get("client_cafile")
    if client_ca:
        context.load_verify_locations(cafile=Path(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
