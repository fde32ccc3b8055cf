"""Processing of inbox messages: map, resolve the patient, write FHIR transactions.

Owns: the formats known by name (``FORMATS``, ``format_for``, ``register_format``), how due
messages are claimed (a short committed claim: PostgreSQL ``FOR UPDATE SKIP LOCKED`` so
concurrent workers take disjoint rows, state ``processing``, the attempt counted, a lease;
then the batch's write transaction, which processes only rows still carrying its claim), the
order kept per ordering key (only the oldest pending message of a key runs; rejected and dead
ones do not block), group commit (one write transaction per batch) in combined units: the
messages of a batch that can share one FHIR transaction Bundle are written as one, in one
SAVEPOINT (one plan, lock and bulk-insert round, one audit append, one search for their
patients, instead of one each); a unit that fails is taken again one message per SAVEPOINT,
so a poison message rejects only itself (``Pipeline._round`` says which messages may share
a unit). Also the Provenance of each message, and the outcome of each attempt:
``processed``, ``rejected`` (``Rejected``, or a 4xx from the store: permanent), ``failed``
(anything else: retried after ``2^attempts`` seconds, at most 10 minutes) and ``dead`` after
``inbox.MAX_ATTEMPTS`` attempts, including attempts whose process died (a message that kills
its worker dies, it does not loop). A database that cannot be reached rolls the whole batch
back and raises ``Transient``: nothing is marked processed, nothing may be acknowledged.
Every message's inbox row is marked (one executemany per batch) in the transaction that
stored its data: exactly once holds.

Audit: a unit's transaction runs as its source's named system access
(``system:connector-<source>``), and the gate writes one AuditEvent per patient it touched,
each naming only that patient's resources: a patient's access log shows the connector and
what it wrote for them, and nothing of the unit's other patients. What is given up is one
event per message (each message's Provenance still says which message wrote which
resources); per-message events cost an audit append (chain lock, digest, compartment
lookup) per message, the largest fixed cost after the transaction's own.
Calls: ``connectors.inbox`` (raw bytes, states), ``connectors.sources`` (via the table), the
format modules (``connectors.hl7v2``, ``connectors.xml130``, ``connectors.fhirpull``),
``connectors.patients`` (``prefetch``, ``begin_message``, ``resolve``),
``hub.rest.transaction.transaction_in``, the store's write transaction, ``consent.context``.
Called by: the MLLP listener through the runner (``process_ids`` right after receipt, so it
ACKs after the commit), the workers (``process_due``), the CLI.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import orjson
import sqlalchemy as sa

from connectors import inbox, patients
from connectors import sources as source_registry
from connectors.identifiers import FACILITY, facility_reference, facility_system
from connectors.model import Format, Mapped, Rejected, Source, Transient
from hub.crypto.keys import Keyring
from hub.db.schema import connector_message, connector_source
from hub.errors import FhirError
from hub.store.references import iter_references, rewrite

if TYPE_CHECKING:
    from hub.rest.router import FhirRouter

__all__ = [
    "FORMATS",
    "Outcome",
    "Pipeline",
    "format_for",
    "format_of",
    "provenance_id",
    "register_format",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# --- formats ------------------------------------------------------------------------------

FORMATS: dict[str, Format] = {}
_FORMAT_MODULES = {"hl7v2": "connectors.hl7v2", "xml130": "connectors.xml130", "fhir": "connectors.fhirpull"}
_formats_lock = threading.Lock()


def register_format(fmt: Format) -> None:
    """Make a format known by its name (the feeds' modules are loaded on first use; tests
    register their own)."""
    with _formats_lock:
        FORMATS[fmt.name] = fmt


def format_of(source: Source) -> Format:
    """The format a source's messages are in: its kind's, or the one its ``format`` setting
    names (a facility dialect with its own mapper, a test format)."""
    named = source.settings.get("format")
    return format_for(named if isinstance(named, str) else source.format)


def format_for(name: str) -> Format:
    """The format of that name; ``LookupError`` when no module provides it."""
    found = FORMATS.get(name)
    if found is not None:
        return found
    module_name = _FORMAT_MODULES.get(name)
    if module_name is None:
        raise LookupError(f"no format named {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise LookupError(f"format {name!r}: module {module_name} is not installed") from None
        raise
    fmt: Format = module.FORMAT
    register_format(fmt)
    return fmt


# --- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    id: int
    lease: datetime  # the lease_until written when claimed: the claim's token


@dataclass
class Outcome:
    state: str
    error: str | None
    where: str | None
    unsupported: bool
    resources: list[str] = field(default_factory=list)
    attempted: bool = False  # processed in this call (not a stored or waiting state)


RETRY_CAP_SECONDS = 600.0
LEASE_SECONDS = 60.0  # a batch takes seconds; a claim older than this was abandoned
# Store answers that say "not now" rather than "never": a conflict with a concurrent write,
# a timeout, a rate limit.
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
# PostgreSQL deadlock and serialization failures: the batch is retried at once, whole.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_BATCH_RETRIES = 3
_DUE_STATES = ("queued", "failed", "processing")


def provenance_id(source: str, control_id: str) -> str:
    """The id of a message's Provenance: the same on every reprocessing, so it is updated in
    place (a no-op when nothing changed) instead of added again."""
    return "cx-" + hashlib.sha256(f"{source}|{control_id}".encode()).hexdigest()[:40]


def _db_unreachable(error: BaseException) -> bool:
    """Whether an error means the database cannot be used now (the whole batch waits), not
    that this message made a statement fail (that message alone fails)."""
    if isinstance(error, (sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return True
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa.exc.OperationalError):
        sqlstate = getattr(error.orig, "sqlstate", None)
        if not isinstance(sqlstate, str):
            return True  # SQLite (locked, I/O error) and the like
        # Connection (08), resources: disk, memory, connections (53), operator intervention,
        # shutdown (57, but not 57014: a statement cancelled), system/I-O errors (58).
        # Not 54xxx (an index row too large...): that one message's fault, or it would block
        # the batch forever.
        return sqlstate[:2] in ("08", "53", "57", "58") and sqlstate != "57014"
    return False


def _retry_batch(error: BaseException) -> bool:
    orig = getattr(error, "orig", None)
    return getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES


class Pipeline:
    """Processes inbox messages through one router (and its store)."""

    def __init__(
        self,
        router: FhirRouter,
        *,
        batch_size: int = 50,
        retry_base_seconds: float = 1.0,
        max_attempts: int = inbox.MAX_ATTEMPTS,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.router = router
        self.store = router.ctx.store
        self.engine = self.store.engine
        self.batch_size = batch_size
        # Backoff after the n-th failure: retry_base_seconds * 2^n, capped (tests use 0).
        self.retry_base_seconds = retry_base_seconds
        self.max_attempts = max_attempts
        # How long a claim is left alone by process_due before it counts as abandoned.
        self.lease_seconds = lease_seconds
        self._postgres = self.engine.dialect.name == "postgresql"

    # --- entry points ---------------------------------------------------------------------

    def process_ids(self, ids: list[int]) -> dict[int, Outcome]:
        """Process exactly these messages, if still due; the outcome of each (a message
        already final gives its stored outcome; one that must wait for an earlier message of
        its key, or whose source is paused, its current state). A message another call
        claimed and left without an outcome (its process died, or the database went away
        mid-batch) is taken over at once: a sender resending it needs its ACK now."""
        if not ids:
            return {}
        wanted = sorted(set(ids))
        claims, outcomes = self._claim(lambda conn, moment: self._candidates_by_id(conn, wanted, moment))
        outcomes.update(self._process(claims))
        return outcomes

    def process_due(self, limit: int | None = None) -> int:
        """Claim and process up to ``limit`` (default: the batch size) due messages; how many
        got an outcome (whatever it is)."""
        size = limit if limit is not None else self.batch_size
        claims, outcomes = self._claim(lambda conn, moment: self._candidates_due(conn, size, moment))
        outcomes.update(self._process(claims))
        # Rows that had to wait (an earlier message of their key) are not counted.
        return sum(1 for outcome in outcomes.values() if outcome.attempted)

    def _with_retries(self, work: Callable[[sa.Connection], _T]) -> _T:
        for attempt in range(_BATCH_RETRIES):
            try:
                with self.store.write() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as error:
                if _retry_batch(error) and attempt + 1 < _BATCH_RETRIES:
                    log.info("connector batch retried after %s", error.orig)
                    continue
                if _db_unreachable(error):
                    raise Transient(f"database unavailable: {error.orig}") from error
                raise
            except sa.exc.TimeoutError as error:  # no connection from the pool
                raise Transient(f"database unavailable: {error}") from error
        raise Transient("the batch kept conflicting with concurrent writers")  # pragma: no cover

    # --- claiming -------------------------------------------------------------------------
    #
    # Two short steps. The claim (its own committed transaction) marks the rows
    # "processing", counts the attempt and sets lease_until, which is also the claim's token.
    # Processing (the batch's write transaction) locks the rows again and handles only those
    # still carrying its token. So a process that dies, or loses its database, mid-batch
    # leaves its rows "processing" with the attempt counted: a message that kills every
    # worker that tries it goes dead after max_attempts instead of being retried forever,
    # and rows taken over a second time are claimed one at a time, so its neighbours in the
    # batch are not dragged down with it.

    def _due(self, table: Any, moment: datetime) -> sa.ColumnElement[bool]:
        return sa.or_(
            table.c.state == "queued",
            sa.and_(table.c.state == "failed", table.c.next_attempt_at <= moment),
            sa.and_(table.c.state == "processing", table.c.lease_until < moment),
        )

    def _claim(
        self, candidates: Callable[[sa.Connection, datetime], tuple[list[Any], dict[int, Outcome]]]
    ) -> tuple[list[_Claim], dict[int, Outcome]]:
        def work(conn: sa.Connection) -> tuple[list[_Claim], dict[int, Outcome]]:
            moment = inbox.now()
            rows, outcomes = candidates(conn, moment)
            claims = self._take(conn, rows, outcomes, moment)
            return claims, outcomes

        return self._with_retries(work)

    def _candidates_due(
        self, conn: sa.Connection, limit: int, moment: datetime
    ) -> tuple[list[Any], dict[int, Outcome]]:
        m = connector_message
        earlier = m.alias("earlier")
        active_sources = sa.select(connector_source.c.name).where(connector_source.c.paused.is_(False))
        # Coarse in SQL: no earlier pending message of the key that is not due itself (that
        # one waits, so this one must). The exact check is _runnable's.
        blocked = (
            sa.select(earlier.c.id)
            .where(
                earlier.c.ordering_key == m.c.ordering_key,
                earlier.c.id < m.c.id,
                earlier.c.state.in_(inbox.PENDING_STATES),
                sa.not_(self._due(earlier, moment)),
            )
            .exists()
        )
        query = (
            sa.select(m.c.id)
            .where(
                m.c.state.in_(_DUE_STATES),
                self._due(m, moment),
                m.c.source.in_(active_sources),
                sa.or_(m.c.ordering_key.is_(None), sa.not_(blocked)),
            )
            .order_by(m.c.id)
            .limit(limit)
        )
        if self._postgres:  # concurrent claims take disjoint rows, never waiting
            query = query.with_for_update(skip_locked=True, of=m)
        ids = [int(row.id) for row in conn.execute(query)]
        return (self._rows(conn, ids, lock=False) if ids else []), {}

    def _candidates_by_id(
        self, conn: sa.Connection, ids: list[int], moment: datetime
    ) -> tuple[list[Any], dict[int, Outcome]]:
        # PostgreSQL: wait for a batch processing them to commit, then see their outcome.
        rows = self._rows(conn, ids, lock=self._postgres)
        outcomes: dict[int, Outcome] = {}
        due = []
        for row in rows:
            if self._is_due(row, moment) or row.state == "processing":
                # "processing" here is nobody's batch in progress (that one holds the row's
                # lock, or on SQLite the database's): a claim left without an outcome.
                due.append(row)
            else:
                outcomes[row.id] = _stored_outcome(row)
        return due, outcomes

    def _is_due(self, row: Any, moment: datetime) -> bool:
        if row.state == "queued":
            return True
        if row.state == "failed":
            return row.next_attempt_at is None or inbox.utc(row.next_attempt_at) <= moment
        if row.state == "processing":
            return row.lease_until is None or inbox.utc(row.lease_until) < moment
        return False

    def _take(
        self, conn: sa.Connection, rows: list[Any], outcomes: dict[int, Outcome], moment: datetime
    ) -> list[_Claim]:
        """Claim the rows that may run now; the others get their current state as outcome
        (or "dead": claimed max_attempts times without an outcome)."""
        if not rows:
            return []
        sources = _sources(conn, {row.source for row in rows})
        runnable = self._runnable(conn, rows)
        eligible = []
        for row in rows:
            source = sources.get(row.source)
            if source is None or source.paused or row.id not in runnable:
                outcomes[row.id] = _stored_outcome(row)
            else:
                eligible.append(row)
        # Left without an outcome more than once: one at a time, so only the culprit (a
        # message that kills its worker) keeps losing attempts.
        repeated = [row for row in eligible if row.state == "processing" and int(row.attempts) >= 2]
        if repeated:
            for row in eligible:
                if row is not repeated[0]:
                    outcomes[row.id] = _stored_outcome(row)
            eligible = [repeated[0]]
        lease = moment + timedelta(seconds=self.lease_seconds)
        claims = []
        for row in eligible:
            if row.state == "processing" and int(row.attempts) >= self.max_attempts:
                error = f"{row.attempts} attempts ended without an outcome (the worker stopped or lost the database)"
                conn.execute(
                    connector_message.update()
                    .where(connector_message.c.id == row.id)
                    .values(
                        state="dead", error=error, error_where=None, lease_until=None, processed_at=moment
                    )
                )
                outcomes[row.id] = Outcome("dead", error, None, False, [], attempted=True)
            else:
                claims.append(_Claim(int(row.id), lease))
        if claims:
            conn.execute(
                connector_message.update()
                .where(connector_message.c.id.in_([claim.id for claim in claims]))
                .values(state="processing", attempts=connector_message.c.attempts + 1, lease_until=lease)
            )
        return claims

    def _rows(self, conn: sa.Connection, ids: list[int], *, lock: bool) -> list[Any]:
        m = connector_message.c
        rows: list[Any] = []
        for start in range(0, len(ids), 500):
            query = sa.select(connector_message).where(m.id.in_(ids[start : start + 500])).order_by(m.id)
            if lock:
                query = query.with_for_update(of=connector_message)
            rows.extend(conn.execute(query).all())
        return sorted(rows, key=lambda row: row.id)

    def _runnable(self, conn: sa.Connection, rows: list[Any]) -> set[int]:
        """The rows no earlier pending message of their key outside this batch holds back."""
        keys = {row.ordering_key for row in rows if row.ordering_key is not None}
        pending: dict[str, list[int]] = {}
        if keys:
            m = connector_message.c
            last = max(row.id for row in rows)
            for key_list in _chunks(sorted(keys), 500):
                query = sa.select(m.id, m.ordering_key).where(
                    m.ordering_key.in_(key_list), m.state.in_(inbox.PENDING_STATES), m.id < last
                )
                for found in conn.execute(query):
                    pending.setdefault(found.ordering_key, []).append(int(found.id))
        batch = {row.id for row in rows}
        runnable = set()
        for row in rows:
            held = row.ordering_key is not None and any(
                other < row.id and other not in batch for other in pending.get(row.ordering_key, ())
            )
            if not held:
                runnable.add(row.id)
        return runnable

    # --- processing -----------------------------------------------------------------------

    def _process(self, claims: list[_Claim]) -> dict[int, Outcome]:
        if not claims:
            return {}
        tokens = {claim.id: claim.lease for claim in claims}
        try:
            return self._with_retries(lambda conn: self._run(conn, tokens))
        except Transient:
            self._release(tokens)
            raise

    def _release(self, tokens: dict[int, datetime]) -> None:
        """Best effort after the database went away mid-batch: give the claims back (attempt
        not counted). Failing that, they are taken over when their lease ends, or at once by
        process_ids."""
        try:
            with self.store.write() as conn:
                for row_id, lease in tokens.items():
                    self._unclaim(conn, row_id, lease)
        except Exception:  # noqa: BLE001  (still unreachable: the lease covers it)
            log.info("connector claims not released (database still unavailable)")

    def _unclaim(self, conn: sa.Connection, row_id: int, lease: datetime) -> None:
        m = connector_message
        conn.execute(
            m.update()
            .where(m.c.id == row_id, m.c.state == "processing", m.c.lease_until == lease)
            .values(state="queued", attempts=m.c.attempts - 1, lease_until=None)
        )

    def _run(self, conn: sa.Connection, tokens: dict[int, datetime]) -> dict[int, Outcome]:
        moment = inbox.now()
        rows = self._rows(conn, sorted(tokens), lock=self._postgres)
        sources = _sources(conn, {row.source for row in rows})
        facilities = self._facility_ids(conn, list(sources.values()))
        ring = self.store.keys()
        outcomes: dict[int, Outcome] = {}
        marks: list[tuple[Any, Outcome, list[str]]] = []
        pending: list[_Message] = []
        for row in rows:
            mine = (
                row.state == "processing"
                and row.lease_until is not None
                and inbox.utc(row.lease_until) == tokens[row.id]
            )
            if not mine:  # taken over meanwhile (our claim outlived its lease, or process_ids)
                outcomes[row.id] = _stored_outcome(row)
                continue
            source = sources.get(row.source)
            facility = facilities.get(source.facility_code) if source else None
            pending.append(_Message(row, source, facility, tokens[row.id]))
        stalled: set[str] = set()  # keys whose earlier message in this batch did not finish
        while pending:
            pending = self._round(conn, pending, ring, stalled, outcomes, marks)
        for row, outcome in self._mark_all(conn, marks, moment):
            outcome.attempted = True
            outcomes[row.id] = outcome
        return outcomes

    def _round(
        self,
        conn: sa.Connection,
        pending: list[_Message],
        ring: Keyring,
        stalled: set[str],
        outcomes: dict[int, Outcome],
        marks: list[tuple[Any, Outcome, list[str]]],
    ) -> list[_Message]:
        """One combined unit: the pending messages (in id order) that can share one
        transaction, written together; the messages left for the next round.

        A message joins the unit unless an earlier message of its ordering key is in the
        unit or left for later (order per key), it is another source's (the unit runs as
        one source's access), or its entries would write what the unit already writes or
        references (the same Patient, the same condition or identifier: one transaction
        plans every condition before writing any, so two creates of one condition would
        both create). If the unit fails, its messages are taken one at a time, each in its
        own SAVEPOINT, so a poison message rejects only itself."""
        unit: list[_Message] = []
        later: list[_Message] = []
        held: set[str] = set()  # ordering keys with a message left for the next round
        writes: set[tuple[str, ...]] = set()
        reads: set[tuple[str, ...]] = set()
        count = 0
        refused = 0  # messages prepared and then left for later in this round
        access_name: str | None = None
        limit = min(self.router.ctx.max_bundle_entries, _UNIT_ENTRIES)
        try:
            with conn.begin_nested():  # the unit's SAVEPOINT
                self._prefetch(conn, pending, ring, stalled)
                for message in pending:
                    row, source, key = message.row, message.source, message.row.ordering_key
                    if source is None or source.paused or (key is not None and key in stalled):
                        # Given back after the unit (not in its SAVEPOINT, which may roll back).
                        outcomes[row.id] = Outcome("queued", row.error, row.error_where, False, [])
                        if key is not None:
                            stalled.add(key)
                        continue
                    closed = refused >= _MAX_REFUSED
                    if closed or (key is not None and key in held) or access_name not in (None, source.name):
                        later.append(message)
                        if key is not None:
                            held.add(key)
                        continue
                    prepared = self._prepare(conn, message, ring)
                    if isinstance(prepared, Outcome):  # final before any write (rejected...)
                        outcomes[row.id] = prepared
                        marks.append((row, prepared, message.warnings))
                        if prepared.state not in inbox.FINAL_STATES and key is not None:
                            stalled.add(key)
                        continue
                    its_writes, its_reads = _footprint(prepared)
                    clash = (its_writes & (writes | reads)) or (its_reads & writes)
                    if unit and (clash or count + len(prepared) > limit):
                        message.mapped = None  # resolved against what the unit will change
                        refused += 1
                        later.append(message)
                        if key is not None:
                            held.add(key)
                        continue
                    message.entries = prepared
                    unit.append(message)
                    writes |= its_writes
                    reads |= its_reads
                    count += len(prepared)
                    access_name = source.name
                if unit:
                    self._write_unit(conn, unit)
        except Exception as error:  # noqa: BLE001  (one bad message: the others go on singly)
            if isinstance(error, sa.exc.DBAPIError) and (_db_unreachable(error) or _retry_batch(error)):
                raise
            log.info("a combined unit of %d messages failed (%s): one at a time", len(unit), error)
            # The unit, the message being prepared, and any not reached yet: one at a time.
            waiting = {id(message) for message in later}
            singles = [m for m in pending if m.row.id not in outcomes and id(m) not in waiting]
            self._give_back(conn, pending, outcomes)
            return self._singly(conn, singles, later, ring, stalled, outcomes, marks)
        self._give_back(conn, pending, outcomes)
        for message in unit:
            outcome = Outcome("processed", None, None, False, message.resources)
            outcomes[message.row.id] = outcome
            marks.append((message.row, outcome, message.warnings))
        return later

    def _singly(
        self,
        conn: sa.Connection,
        unit: list[_Message],
        later: list[_Message],
        ring: Keyring,
        stalled: set[str],
        outcomes: dict[int, Outcome],
        marks: list[tuple[Any, Outcome, list[str]]],
    ) -> list[_Message]:
        """The unit's messages one at a time (the unit's SAVEPOINT was rolled back); what
        was decided without writing (rejected when mapped) stays decided."""
        for message in unit:
            row, key = message.row, message.row.ordering_key
            assert message.source is not None
            if key is not None and key in stalled:
                self._unclaim(conn, row.id, message.token)
                outcomes[row.id] = Outcome("queued", row.error, row.error_where, False, [])
                continue
            outcome, warnings = self._one(conn, row, message.source, ring, message.facility_id)
            outcomes[row.id] = outcome
            marks.append((row, outcome, warnings))
            if outcome.state not in inbox.FINAL_STATES and key is not None:
                stalled.add(key)
        return later

    def _give_back(self, conn: sa.Connection, pending: list[_Message], outcomes: dict[int, Outcome]) -> None:
        """Unclaim the round's messages that wait (paused source, an earlier message of their
        key not final): back to "queued", the attempt not counted."""
        for message in pending:
            outcome = outcomes.get(message.row.id)
            if outcome is not None and outcome.state == "queued" and not outcome.attempted:
                self._unclaim(conn, message.row.id, message.token)

    def _map(self, message: _Message, ring: Keyring) -> None:
        """Map a message (once: kept until it is resolved against a unit), or record why
        it cannot be (its outcome)."""
        if message.mapped is not None or message.failure is not None:
            return
        row, source = message.row, message.source
        assert source is not None
        try:
            data = inbox.open_raw(ring, row.source, row.raw_sha256, bytes(row.raw))
            message.mapped = format_of(source).map(data, source)
        except Exception as error:  # noqa: BLE001  (classified as _one does)
            message.failure = _classify(row, error)

    def _prefetch(
        self, conn: sa.Connection, pending: list[_Message], ring: Keyring, stalled: set[str]
    ) -> None:
        """Map the round's candidates (the first one's source) and look their patients up
        with one search (connectors.patients.prefetch)."""
        first = next((m.source for m in pending if m.source is not None and not m.source.paused), None)
        if first is None:
            return
        units: list[Mapped] = []
        for message in pending:
            key = message.row.ordering_key
            if message.source is not first or (key is not None and key in stalled):
                continue
            self._map(message, ring)
            units.extend(message.mapped or [])
        if units:
            from consent.context import serving, system_access_for

            with serving(system_access_for(f"connector-{first.name}")):
                patients.prefetch(conn, self.router, units, first)

    def _prepare(
        self, conn: sa.Connection, message: _Message, ring: Keyring
    ) -> list[dict[str, Any]] | Outcome:
        """A message's entries for the unit (mapped, its patients resolved, its Provenance,
        the facility named), or its outcome when it cannot be written at all."""
        row, source = message.row, message.source
        assert source is not None
        message.warnings = []
        self._map(message, ring)
        if message.failure is not None:
            return message.failure
        assert message.mapped is not None
        try:
            return self._entries(conn, row, source, message.mapped, message.warnings, message.facility_id)
        except sa.exc.DBAPIError:
            raise
        except Exception as error:  # noqa: BLE001  (classified as _one does)
            return _classify(row, error)

    def _entries(
        self,
        conn: sa.Connection,
        row: Any,
        source: Source,
        units: list[Mapped],
        warnings: list[str],
        facility_id: str | None,
    ) -> list[dict[str, Any]]:
        """The transaction entries of one message: its patients resolved (as the pipeline's
        system access of its source), its mapped entries, its Provenance."""
        from consent.context import serving, system_access_for

        with serving(system_access_for(f"connector-{source.name}")):
            _begin_message(conn)
            entries: list[dict[str, Any]] = []
            for unit in units:
                warnings.extend(unit.warnings)
                entries.extend(_resolve(conn, self.router, unit, source))
                entries.extend(unit.entries)
        if not entries:
            return []
        for entry in entries:
            if "resource" in entry and not entry.get("fullUrl"):
                entry["fullUrl"] = f"urn:uuid:{uuid.uuid4()}"
        provenance = _provenance_entry(row, source, units, entries)
        if provenance is not None:  # None: nothing written that it could name
            entries.append(provenance)
        if facility_id is not None:
            _name_facility(entries, source.facility_code, facility_id)
        return entries

    def _write_unit(self, conn: sa.Connection, unit: list[_Message]) -> None:
        """The unit's messages as ONE transaction Bundle (each message keeps its own
        Provenance); each message's resources read back from its part of the response.

        Its AuditEvents are those of one transaction by the source's system access
        (``system:connector-<source>``): the gate writes one per patient touched, each
        naming only that patient's resources, so every patient's access log still shows
        which connector wrote what; only the grouping into one event per message is lost
        (the Provenance of each message keeps which message wrote which resources)."""
        from consent.context import serving, system_access_for
        from hub.rest.messages import FhirRequest
        from hub.rest.transaction import transaction_in

        assert unit[0].source is not None
        entries = [entry for message in unit for entry in message.entries]
        if not entries:
            for message in unit:
                message.resources = []
            return
        access = system_access_for(f"connector-{unit[0].source.name}")
        with serving(access):
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            request = FhirRequest("POST", "", parsed_body=bundle, principal=access.principal)
            response = transaction_in(self.router, conn, request)
        answered = (orjson.loads(response.body).get("entry") or []) if response.body else []
        position = 0
        for message in unit:
            part = answered[position : position + len(message.entries)]
            position += len(message.entries)
            message.resources = _locations_of(part)

    def _mark_all(
        self, conn: sa.Connection, marks: list[tuple[Any, Outcome, list[str]]], moment: datetime
    ) -> list[tuple[Any, Outcome]]:
        """Every outcome of the batch in one statement (executemany), in the batch's
        transaction: a message is marked processed in the transaction that stored it. The
        outcomes as marked (a failure past max_attempts is dead)."""
        if not marks:
            return []
        m = connector_message
        params = []
        marked = []
        for row, outcome, warnings in marks:
            final, values = self._final(row, outcome, moment)
            marked.append((row, final))
            params.append({**values, "b_id": row.id, "warnings": warnings or None})
        statement = (
            m.update()
            .where(m.c.id == sa.bindparam("b_id"))
            .values({name: sa.bindparam(name) for name in params[0] if name != "b_id"})
        )
        conn.execute(statement, params)
        return marked

    def _final(self, row: Any, outcome: Outcome, moment: datetime) -> tuple[Outcome, dict[str, Any]]:
        values: dict[str, Any] = {
            "state": outcome.state,
            "error": outcome.error,
            "error_where": outcome.where[:200] if outcome.where else None,
            "processed_at": moment,
            "lease_until": None,
            "next_attempt_at": None,
            "resources": outcome.resources,
        }
        if outcome.state == "failed":
            attempts = int(row.attempts)  # this one included (counted when claimed)
            if attempts >= self.max_attempts:
                values["state"] = "dead"
                outcome = Outcome("dead", outcome.error, outcome.where, False, [])
            else:
                delay = min(self.retry_base_seconds * 2**attempts, RETRY_CAP_SECONDS)
                values["next_attempt_at"] = moment + timedelta(seconds=delay)
        return outcome, values

    def _facility_ids(self, conn: sa.Connection, batch_sources: list[Source]) -> dict[str, str]:
        """The id of each facility's Organization (added with its source). Mappings name it
        by a conditional reference, which a transaction resolves under an advisory lock held
        to the batch's commit: every batch of a facility would wait for the one before."""
        from consent.context import serving, system_access_for
        from hub.search import engine as search_engine

        found: dict[str, str] = {}
        with serving(system_access_for("connector-pipeline")):
            for code in sorted({source.facility_code for source in batch_sources}):
                ids = search_engine.find_ids(
                    conn,
                    self.router.ctx.registry,
                    "Organization",
                    [("identifier", f"{FACILITY}|{code}")],
                    self.router.ctx.base_url,
                )
                if len(ids) == 1:  # else left to the transaction (412 when ambiguous)
                    found[code] = ids[0]
        return found

    def _one(
        self, conn: sa.Connection, row: Any, source: Source, ring: Keyring, facility_id: str | None
    ) -> tuple[Outcome, list[str]]:
        """One message in its own SAVEPOINT and transaction (the way back when its combined
        unit failed): its outcome (and the mapping's warnings)."""
        from consent.context import serving, system_access_for
        from hub.rest.messages import FhirRequest
        from hub.rest.transaction import transaction_in

        warnings: list[str] = []
        try:
            # Inside: bytes that cannot be opened (a lost data key) fail this message only.
            data = inbox.open_raw(ring, row.source, row.raw_sha256, bytes(row.raw))
            with conn.begin_nested():
                units = format_of(source).map(data, source)
                entries = self._entries(conn, row, source, units, warnings, facility_id)
                if not entries:
                    return Outcome("processed", None, None, False, []), warnings
                # A new Access: its AuditEvent names only this message's resources.
                access = system_access_for(f"connector-{source.name}")
                with serving(access):
                    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
                    request = FhirRequest("POST", "", parsed_body=bundle, principal=access.principal)
                    response = transaction_in(self.router, conn, request)
            return Outcome("processed", None, None, False, _locations(response.body)), warnings
        except sa.exc.DBAPIError as error:
            if _db_unreachable(error) or _retry_batch(error):
                raise  # the whole batch: Transient, or retried at once
            return _classify(row, error), warnings
        except Exception as error:  # noqa: BLE001  (a mapper bug must not stop the queue)
            return _classify(row, error), warnings


# --- helpers ----------------------------------------------------------------------------------


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# Entries of one combined unit at most (under the store's MAX_BUNDLE_ENTRIES): a unit's
# transaction plans, locks and resolves all its conditions at once.
_UNIT_ENTRIES = 2000
# Messages a round may prepare (map, resolve) and then leave for later because they meet the
# unit: past it the unit is closed. A batch whose messages all meet (pages of one FHIR pull
# naming the same practitioners) then costs a few wasted preparations a round, not all of
# the remaining messages each round.
_MAX_REFUSED = 4


@dataclass
class _Message:
    """A claimed message on its way through the rounds of a batch."""

    row: Any
    source: Source | None
    facility_id: str | None
    token: datetime  # the claim's lease_until
    mapped: list[Mapped] | None = None  # kept while it is not resolved against a unit
    failure: Outcome | None = None  # why it cannot be mapped
    entries: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resources: list[str] = field(default_factory=list)


def _classify(row: Any, error: BaseException) -> Outcome:
    """The outcome of a message whose processing raised ``error``."""
    if isinstance(error, Rejected):
        return Outcome("rejected", error.reason, error.where, error.unsupported)
    if isinstance(error, FhirError):
        where = next((i.expression[0] for i in error.issues if i.expression), None)
        text = str(error)[:2000]
        if error.status < 500 and error.status not in _TRANSIENT_STATUSES:
            return Outcome("rejected", text, where, False)
        return Outcome("failed", f"HTTP {error.status}: {text}", where, False)
    if isinstance(error, sa.exc.DBAPIError):
        log.error("connector message %s: database error", row.id, exc_info=error)
        # The class and SQLSTATE only: the driver's text can quote a row ("Failing row
        # contains (...)") and the inbox's error column is not sealed.
        sqlstate = getattr(error.orig, "sqlstate", None) or "-"
        return Outcome(
            "failed", f"database error: {type(error.orig).__name__} (SQLSTATE {sqlstate})", None, False
        )
    log.error("connector message %s could not be processed", row.id, exc_info=error)
    return Outcome("failed", f"{type(error).__name__}: {error}"[:2000], None, False)


def _condition(res_type: str, query: str) -> tuple[str, ...]:
    return ("condition", res_type, *sorted(f"{k}={v}" for k, v in parse_qsl(query.lstrip("?"))))


def _footprint(entries: list[dict[str, Any]]) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
    """What a message's entries write (literal ids, conditions of conditional creates and
    updates, a Patient's identifiers) and what they reference conditionally: two messages
    whose footprints meet may not share a transaction (see ``Pipeline._round``)."""
    writes: set[tuple[str, ...]] = set()
    reads: set[tuple[str, ...]] = set()
    for entry in entries:
        request = entry.get("request") or {}
        method, url = request.get("method"), str(request.get("url") or "")
        path, _, query = url.partition("?")
        if method in ("PUT", "PATCH", "DELETE"):
            writes.add(_condition(path, query) if query else ("id", path))
        elif method == "POST" and request.get("ifNoneExist"):
            writes.add(_condition(path, str(request["ifNoneExist"])))
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Patient":
            for identifier in resource.get("identifier") or []:
                if isinstance(identifier, dict) and identifier.get("value"):
                    writes.add(("patient", str(identifier.get("system")), str(identifier["value"])))
        for holder in iter_references(resource):
            reference = holder["reference"]
            if "?" in reference and "/" not in reference.split("?", 1)[0]:
                ref_type, _, ref_query = reference.partition("?")
                reads.add(_condition(ref_type, ref_query))
    return writes, reads


def _begin_message(conn: sa.Connection) -> None:
    """Patient resolution starts afresh for the next message (patients.begin_message)."""
    patients.begin_message(conn)


def _locations_of(entries: list[dict[str, Any]]) -> list[str]:
    """ "Type/id" of every resource these transaction-response entries name."""
    found = []
    for entry in entries:
        location = (entry.get("response") or {}).get("location") or ""
        parts = location.split("/_history/")[0].split("/")
        if len(parts) >= 2:
            found.append(f"{parts[-2]}/{parts[-1]}")
    return found


def _sources(conn: sa.Connection, names: set[str]) -> dict[str, Source]:
    """The sources of a batch, their secrets opened (a mapping may read its settings)."""
    rows = conn.execute(sa.select(connector_source).where(connector_source.c.name.in_(sorted(names))))
    return {row.name: source_registry.from_row(conn.engine, row) for row in rows}


def _name_facility(entries: list[dict[str, Any]], code: str, facility_id: str) -> None:
    """The facility's conditional reference made literal (see Pipeline._facility_ids)."""
    conditional = facility_reference(code)["reference"]
    literal = f"Organization/{facility_id}"

    def resolve(reference: str) -> str | None:
        return literal if reference == conditional else None

    for entry in entries:
        if isinstance(entry.get("resource"), dict):
            rewrite(entry["resource"], resolve)


def _stored_outcome(row: Any) -> Outcome:
    return Outcome(row.state, row.error, row.error_where, False, list(row.resources or []))


def _resolve(conn: sa.Connection, router: FhirRouter, unit: Mapped, source: Source) -> list[dict[str, Any]]:
    """The entries standing for the unit's patients (connectors.patients)."""
    return patients.resolve(conn, router, unit, source)


def _provenance_entry(
    row: Any, source: Source, units: list[Mapped], entries: list[dict[str, Any]]
) -> dict[str, Any] | None:
    control_id = row.control_id or (units[0].control_id if units else None) or row.raw_sha256
    message_type = row.message_type or (units[0].message_type if units else "message")
    # What the message says: its patients and its mapped entries. Not what the hub adds on
    # the way (patient resolution's review and conflict Flags, written once): a Provenance
    # that must not change when the message is processed again.
    carried = {facts.placeholder for unit in units for facts in unit.patients}
    carried.update(str(entry.get("fullUrl")) for unit in units for entry in unit.entries)
    written = [
        entry
        for entry in entries
        if "resource" in entry and entry.get("request", {}).get("method") in ("POST", "PUT", "PATCH")
    ]
    # Provenance.target is 1..*: a message that carries nothing itself (only what resolution
    # added) names what was written.
    targets = [{"reference": e["fullUrl"]} for e in written if e.get("fullUrl") in carried] or [
        {"reference": e["fullUrl"]} for e in written
    ]
    if not targets:
        return None
    recorded = inbox.utc(row.received_at).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    prov_id = provenance_id(source.name, control_id)
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": prov_id,
        "target": targets,
        # When the hub received the message: the same on every reprocessing (no new version).
        "recorded": recorded,
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "UPDATE",
                    "display": "revise",
                }
            ],
            "text": f"{message_type} from connector source {source.name}",
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                            "display": "Author",
                        }
                    ]
                },
                "role": [{"text": "source"}],
                "who": {**facility_reference(source.facility_code), "display": source.facility_name},
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {"display": f"hub connector {source.name}"},
            },
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {
                        "system": facility_system("message", source.facility_code),
                        "value": control_id,
                    },
                    "display": f"{message_type} {control_id} (source {source.name}, inbox message {row.id})",
                },
            }
        ],
    }
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, prov_id)}",
        "resource": provenance,
        "request": {"method": "PUT", "url": f"Provenance/{prov_id}"},
    }


def _locations(body: bytes | None) -> list[str]:
    """ "Type/id" of every resource a transaction-response names."""
    return _locations_of(orjson.loads(body).get("entry") or []) if body else []
