"""Processing of inbox messages: map, resolve the patient, write one FHIR transaction each.

Owns: the formats known by name (``FORMATS``, ``format_for``, ``register_format``), how due
messages are claimed (a short committed claim: PostgreSQL ``FOR UPDATE SKIP LOCKED`` so
concurrent workers take disjoint rows, state ``processing``, the attempt counted, a lease;
then the batch's write transaction, which processes only rows still carrying its claim), the
order kept per ordering key (only the oldest pending message of a key runs; rejected and dead
ones do not block), group commit (one write transaction per batch, a SAVEPOINT per message),
the Provenance of each message, and the outcome of each attempt: ``processed``, ``rejected``
(``Rejected``, or a 4xx from the store: permanent), ``failed`` (anything else: retried after
``2^attempts`` seconds, at most 10 minutes) and ``dead`` after ``inbox.MAX_ATTEMPTS``
attempts, including attempts whose process died (a message that kills its worker dies, it
does not loop). A database that cannot be reached rolls the whole batch back and raises
``Transient``: nothing is marked processed, nothing may be acknowledged.
Each message's transaction runs as its own named system access
(``system:connector-<source>``), so its AuditEvent describes only that message's resources.
Calls: ``connectors.inbox`` (raw bytes, states), ``connectors.sources`` (via the table), the
format modules (``connectors.hl7v2``, ``connectors.xml130``, ``connectors.fhirpull``),
``connectors.patients.resolve``, ``hub.rest.transaction.transaction_in``, the store's write
transaction, ``consent.context``.
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

import orjson
import sqlalchemy as sa

from connectors import inbox
from connectors.identifiers import FACILITY, facility_reference, facility_system
from connectors.model import Format, Mapped, Rejected, Source, Transient
from hub.crypto.keys import Keyring
from hub.db.schema import connector_message, connector_source
from hub.errors import FhirError
from hub.store.references import rewrite

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
        stalled: set[str] = set()  # keys whose earlier message in this batch did not finish
        outcomes: dict[int, Outcome] = {}
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
            if (
                source is None
                or source.paused
                or (row.ordering_key is not None and row.ordering_key in stalled)
            ):
                self._unclaim(conn, row.id, tokens[row.id])
                outcomes[row.id] = Outcome("queued", row.error, row.error_where, False, [])
                if row.ordering_key is not None:
                    stalled.add(row.ordering_key)
                continue
            outcome, warnings = self._one(conn, row, source, ring, facilities.get(source.facility_code))
            outcome = self._mark(conn, row, outcome, warnings, moment)
            outcome.attempted = True
            outcomes[row.id] = outcome
            if outcome.state not in inbox.FINAL_STATES and row.ordering_key is not None:
                stalled.add(row.ordering_key)
        return outcomes

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
        """One message in its own SAVEPOINT: its outcome (and the mapping's warnings)."""
        warnings: list[str] = []
        try:
            # Inside: bytes that cannot be opened (a lost data key) fail this message only.
            data = inbox.open_raw(ring, row.source, row.raw_sha256, bytes(row.raw))
            with conn.begin_nested():
                resources = self._write(conn, row, source, data, warnings, facility_id)
            return Outcome("processed", None, None, False, resources), warnings
        except Rejected as error:
            return Outcome("rejected", error.reason, error.where, error.unsupported), warnings
        except FhirError as error:
            where = next((i.expression[0] for i in error.issues if i.expression), None)
            text = str(error)[:2000]
            if error.status < 500 and error.status not in _TRANSIENT_STATUSES:
                return Outcome("rejected", text, where, False), warnings
            return Outcome("failed", f"HTTP {error.status}: {text}", where, False), warnings
        except sa.exc.DBAPIError as error:
            if _db_unreachable(error) or _retry_batch(error):
                raise  # the whole batch: Transient, or retried at once
            log.exception("connector message %s: database error", row.id)
            return Outcome("failed", f"database error: {error.orig}"[:2000], None, False), warnings
        except Exception as error:  # noqa: BLE001  (a mapper bug must not stop the queue)
            log.exception("connector message %s could not be processed", row.id)
            return Outcome("failed", f"{type(error).__name__}: {error}"[:2000], None, False), warnings

    def _write(
        self,
        conn: sa.Connection,
        row: Any,
        source: Source,
        data: bytes,
        warnings: list[str],
        facility_id: str | None,
    ) -> list[str]:
        """Map the message and write it as one transaction with its Provenance; the
        resources written ("Type/id")."""
        from consent.context import serving, system_access_for
        from hub.rest.messages import FhirRequest
        from hub.rest.transaction import transaction_in

        units = format_of(source).map(data, source)
        # A new Access per message: its AuditEvent names only this message's resources.
        access = system_access_for(f"connector-{source.name}")
        with serving(access):
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
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            request = FhirRequest("POST", "", parsed_body=bundle, principal=access.principal)
            response = transaction_in(self.router, conn, request)
        return _locations(response.body)

    def _mark(
        self, conn: sa.Connection, row: Any, outcome: Outcome, warnings: list[str], moment: datetime
    ) -> Outcome:
        values: dict[str, Any] = {
            "state": outcome.state,
            "error": outcome.error,
            "error_where": outcome.where[:200] if outcome.where else None,
            "processed_at": moment,
            "lease_until": None,
            "next_attempt_at": None,
            "resources": outcome.resources,
            "warnings": warnings or None,
        }
        if outcome.state == "failed":
            attempts = int(row.attempts)  # this one included (counted when claimed)
            if attempts >= self.max_attempts:
                values["state"] = "dead"
                outcome = Outcome("dead", outcome.error, outcome.where, False, [])
            else:
                delay = min(self.retry_base_seconds * 2**attempts, RETRY_CAP_SECONDS)
                values["next_attempt_at"] = moment + timedelta(seconds=delay)
        conn.execute(connector_message.update().where(connector_message.c.id == row.id).values(values))
        return outcome


# --- helpers ----------------------------------------------------------------------------------


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _sources(conn: sa.Connection, names: set[str]) -> dict[str, Source]:
    rows = conn.execute(sa.select(connector_source).where(connector_source.c.name.in_(sorted(names))))
    return {
        row.name: Source(
            name=row.name,
            facility_code=row.facility_code,
            facility_name=row.facility_name,
            facility_level=row.facility_level,
            kind=row.kind,
            settings=dict(row.settings or {}),
            paused=bool(row.paused),
        )
        for row in rows
    }


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
    try:
        from connectors import patients  # type: ignore[attr-defined, unused-ignore]
    except ImportError:
        return _fallback_patients(unit)
    entries: list[dict[str, Any]] = patients.resolve(conn, router, unit, source)
    return entries


# TEMPORARY (until connectors.patients exists): each patient a conditional create on its
# first identifier, with no matching across identifiers, no merge, no review flag.
def _fallback_patients(unit: Mapped) -> list[dict[str, Any]]:
    entries = []
    for facts in unit.patients:
        request: dict[str, Any] = {"method": "POST", "url": "Patient"}
        identifiers = facts.resource.get("identifier") or []
        first = identifiers[0] if identifiers else None
        if first and first.get("system") and first.get("value"):
            request["ifNoneExist"] = f"identifier={first['system']}|{first['value']}"
        entries.append({"fullUrl": facts.placeholder, "resource": facts.resource, "request": request})
    return entries


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
    if not body:
        return []
    bundle = orjson.loads(body)
    found = []
    for entry in bundle.get("entry") or []:
        location = (entry.get("response") or {}).get("location") or ""
        parts = location.split("/_history/")[0].split("/")
        if len(parts) >= 2:
            found.append(f"{parts[-2]}/{parts[-1]}")
    return found
