"""The durable inbox: every inbound message stored, sealed, before it is acknowledged.

Owns: the ``connector_message`` rows and their states: ``queued`` -> ``processing`` ->
``processed`` | ``rejected`` (permanent) | ``failed`` (transient, retried at
``next_attempt_at``) -> ``dead`` after ``MAX_ATTEMPTS`` failures (the dead letter). Receipt
(``receive``: one transaction for a whole group of messages, so a listener commits many at
once and ACKs each after), duplicate receipt (same bytes from the same source: the existing
row), replay, listings, the raw bytes (sealed at rest under the database's data key, as
resources are: ``hub.crypto``), and per-source status.
Raw bytes are stored as ``b"E1" + len(kid) + kid + iv + AES-GCM(raw)`` with AAD
``connector_message/<source>/<sha256>`` (a ciphertext moved to another row fails its tag), or
``b"P1" + raw`` when encryption at rest is off. The ordering key Peek gives (a patient
identifier) is stored only as a keyed hash (the search index key of ``hub.crypto.blind``).
Calls: ``hub.crypto.keys`` (the keyring), ``connectors.pipeline.format_for`` (the peek of
each source's format), ``hub.db.schema``.
Called by: listeners and pollers (``connectors.mllp``, ``connectors.xml130.folder``,
``connectors.fhirpull``), the upload API, the admin API and CLI, the pipeline (states).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from connectors.model import Peek, Rejected, Source
from hub.crypto.keys import KeyConfigError, Keyring, keyring_for
from hub.db.schema import connector_message, connector_source

__all__ = [
    "FINAL_STATES",
    "MAX_ATTEMPTS",
    "PENDING_STATES",
    "MessageSummary",
    "Received",
    "SourceStatus",
    "messages",
    "open_bytes",
    "open_raw",
    "ordering_hash",
    "raw",
    "receive",
    "replay",
    "reseal_raw",
    "seal_bytes",
    "seal_raw",
    "sealed_kid",
    "status",
]

MAX_ATTEMPTS = 5  # failures before a message is dead-lettered
STATES = ("queued", "processing", "processed", "rejected", "failed", "dead")
# Not final: they block later messages of their ordering key (rejected and dead do not).
PENDING_STATES = ("queued", "processing", "failed")
FINAL_STATES = ("processed", "rejected", "dead")
_SEALED, _PLAIN = b"E1", b"P1"
_ORDERING_FALLBACK_KEY = b"hub connector ordering key v1"  # no index key: still not the value itself


@dataclass
class Received:
    id: int
    state: str
    peek: Peek | None
    error: str | None
    duplicate: bool


@dataclass
class MessageSummary:
    id: int
    source: str
    received_at: datetime
    message_type: str | None
    control_id: str | None
    state: str
    attempts: int
    error: str | None
    error_where: str | None = None
    next_attempt_at: datetime | None = None
    processed_at: datetime | None = None
    resources: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("received_at", "next_attempt_at", "processed_at"):
            data[key] = _iso(data[key])
        return data


@dataclass
class SourceStatus:
    name: str
    facility_code: str
    facility_name: str
    kind: str
    paused: bool
    last_received_at: datetime | None
    last_processed_at: datetime | None
    counts: dict[str, int]
    backlog: int  # queued + processing + failed
    messages_per_second: float  # processed or rejected over the last 60 s
    failures: int  # failed + dead + rejected
    last_error: str | None
    last_error_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last_received_at", "last_processed_at", "last_error_at"):
            data[key] = _iso(data[key])
        return data


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else utc(moment).isoformat().replace("+00:00", "Z")


def utc(moment: datetime) -> datetime:
    """SQLite gives timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


# --- sealing --------------------------------------------------------------------------------


def _aad(source: str, sha256: str) -> bytes:
    return f"connector_message/{source}/{sha256}".encode()


def seal_bytes(ring: Keyring, aad: bytes, data: bytes) -> bytes:
    """``data`` sealed under the active data key (``b"P1" + data`` when encryption at rest is
    off); ``aad`` binds it to its place (a ciphertext moved elsewhere fails its tag)."""
    if not ring.encrypt:
        return _PLAIN + data
    kid, cipher = ring.active()
    iv = os.urandom(12)
    encoded = kid.encode()
    return _SEALED + bytes([len(encoded)]) + encoded + iv + cipher.encrypt(iv, data, aad)


def sealed_kid(stored: bytes) -> str | None:
    """The data key a stored value is sealed under (None: stored in the clear)."""
    if stored[:2] != _SEALED:
        return None
    return stored[3 : 3 + stored[2]].decode()


def open_bytes(ring: Keyring, aad: bytes, stored: bytes) -> bytes:
    """What ``seal_bytes`` sealed; ``KeyConfigError`` when it cannot be opened."""
    if stored[:2] == _PLAIN:
        return stored[2:]
    if stored[:2] != _SEALED:
        raise KeyConfigError("a stored value has an unknown envelope")
    size = stored[2]
    kid = stored[3 : 3 + size].decode()
    iv = stored[3 + size : 15 + size]
    cipher = ring.cipher(kid)
    if cipher is None:
        raise KeyConfigError(f"data key {kid} of a stored value is not known")
    try:
        return cipher.decrypt(iv, stored[15 + size :], aad)
    except Exception:  # noqa: BLE001  (InvalidTag and the like: never return unauthenticated bytes)
        raise KeyConfigError("a stored value failed its integrity check") from None


def seal_raw(ring: Keyring, source: str, sha256: str, data: bytes) -> bytes:
    """The stored form of a message's bytes (sealed when encryption at rest is on)."""
    return seal_bytes(ring, _aad(source, sha256), data)


def open_raw(ring: Keyring, source: str, sha256: str, stored: bytes) -> bytes:
    """A message's bytes as received; ``KeyConfigError`` when they cannot be opened."""
    return open_bytes(ring, _aad(source, sha256), stored)


def reseal_raw(conn: sa.Connection, ring: Keyring, *, batch: int = 500) -> tuple[int, int]:
    """``hub keys rotate --reencrypt``: every message's raw bytes sealed under the active
    data key (those stored in the clear too, when encryption at rest is on). Commits a
    batch at a time on ``conn`` (not inside a transaction); returns (rewritten, scanned)."""
    if not ring.encrypt:
        return 0, 0
    active, _ = ring.active()
    m = connector_message.c
    rewritten = scanned = 0
    last = 0
    while True:
        with conn.begin():
            rows = conn.execute(
                sa.select(m.id, m.source, m.raw_sha256, m.raw).where(m.id > last).order_by(m.id).limit(batch)
            ).all()
            for row in rows:
                stored = bytes(row.raw)
                if sealed_kid(stored) == active:
                    continue
                data = open_raw(ring, row.source, row.raw_sha256, stored)
                conn.execute(
                    connector_message.update()
                    .where(m.id == row.id)
                    .values(raw=seal_raw(ring, row.source, row.raw_sha256, data))
                )
                rewritten += 1
        if not rows:
            return rewritten, scanned
        scanned += len(rows)
        last = int(rows[-1].id)


def ordering_hash(ring: Keyring, key: str | None) -> str | None:
    """The keyed hash stored in place of a Peek's ordering key (a patient identifier)."""
    if key is None:
        return None
    secret = ring.index_key or _ORDERING_FALLBACK_KEY
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


# --- receipt --------------------------------------------------------------------------------


@dataclass
class _Incoming:
    sha256: str
    data: bytes
    peek: Peek | None
    state: str
    error: str | None
    where: str | None


def _peek(source: Source, data: bytes) -> tuple[Peek | None, str, str | None, str | None]:
    from connectors.pipeline import format_of

    try:
        fmt = format_of(source)
    except LookupError:
        # No format module (yet): keep the message queued; processing will tell why.
        return None, "queued", None, None
    try:
        return fmt.peek(data), "queued", None, None
    except Rejected as error:
        return None, "rejected", error.reason, error.where
    except Exception as error:  # noqa: BLE001  (bytes the peek cannot read: still kept, as rejected)
        return None, "rejected", f"unreadable message: {error}", None


def receive(engine: sa.Engine, source: Source, raws: list[bytes]) -> list[Received]:
    """Store these messages of one source in one database transaction (group commit of
    receipt) and say for each where it stands. Identical bytes received again from the same
    source give the existing row (``duplicate``). A paused source's messages are stored
    too (never lose data)."""
    if not raws:
        return []
    ring = keyring_for(engine)
    incoming: list[_Incoming] = []
    for data in raws:
        peek, state, error, where = _peek(source, data)
        incoming.append(_Incoming(hashlib.sha256(data).hexdigest(), data, peek, state, error, where))
    moment = now()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in incoming:
        if item.sha256 in seen:
            continue
        seen.add(item.sha256)
        peek = item.peek
        rows.append(
            {
                "source": source.name,
                "received_at": moment,
                "message_type": peek.message_type[:64] if peek else None,
                "control_id": peek.control_id[:200] if peek else None,
                "ordering_key": ordering_hash(ring, peek.ordering_key) if peek else None,
                "raw_sha256": item.sha256,
                "raw": seal_raw(ring, source.name, item.sha256, item.data),
                "state": item.state,
                "attempts": 0,
                "error": item.error,
                "error_where": item.where,
                "processed_at": moment if item.state == "rejected" else None,
            }
        )
    existing: dict[str, tuple[int, str, str | None]] = {}
    created: dict[str, int] = {}
    with engine.connect().execution_options(write=True) as conn, conn.begin():
        existing.update(_existing(conn, source.name, [row["raw_sha256"] for row in rows]))
        fresh = [row for row in rows if row["raw_sha256"] not in existing]
        if fresh:
            created.update(_insert(conn, fresh))
            missing = [row["raw_sha256"] for row in fresh if row["raw_sha256"] not in created]
            if missing:  # received concurrently by another connection
                existing.update(_existing(conn, source.name, missing))
    results: list[Received] = []
    reported: set[str] = set()
    for item in incoming:
        if item.sha256 in created and item.sha256 not in reported:
            reported.add(item.sha256)
            results.append(Received(created[item.sha256], item.state, item.peek, item.error, False))
            continue
        if item.sha256 in created:  # the same bytes twice in one group
            results.append(Received(created[item.sha256], item.state, item.peek, item.error, True))
            continue
        row_id, state, error = existing[item.sha256]
        results.append(Received(row_id, state, item.peek, error, True))
    return results


def _existing(conn: sa.Connection, source: str, shas: list[str]) -> dict[str, tuple[int, str, str | None]]:
    m = connector_message.c
    found: dict[str, tuple[int, str, str | None]] = {}
    for start in range(0, len(shas), 500):
        chunk = shas[start : start + 500]
        query = sa.select(m.raw_sha256, m.id, m.state, m.error).where(
            m.source == source, m.raw_sha256.in_(chunk)
        )
        for row in conn.execute(query):
            found[row.raw_sha256] = (int(row.id), row.state, row.error)
    return found


def _insert(conn: sa.Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    statement = (
        insert(connector_message)
        .on_conflict_do_nothing(index_elements=["source", "raw_sha256"])
        .returning(connector_message.c.id, connector_message.c.raw_sha256)
    )
    created: dict[str, int] = {}
    for row in conn.execute(statement, rows):
        created[row.raw_sha256] = int(row.id)
    return created


# --- operations -------------------------------------------------------------------------------


def replay(
    engine: sa.Engine,
    *,
    ids: list[int] | None = None,
    state: str | None = None,
    source: str | None = None,
) -> int:
    """Put messages back in the queue (attempts reset, error cleared); returns how many.

    ``ids``: those messages, whatever their state (but not one being processed);
    ``state``: the messages in that state; neither: the failed, dead and rejected ones.
    ``source`` narrows either. At least one filter is required."""
    if ids is None and state is None and source is None:
        raise ValueError("replay needs ids, a state or a source")
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
    m = connector_message.c
    conditions: list[sa.ColumnElement[bool]] = []
    if ids is not None:
        conditions.append(m.id.in_(ids))
    if state is not None:
        conditions.append(m.state == state)
    elif ids is None:
        conditions.append(m.state.in_(("failed", "dead", "rejected")))
    if source is not None:
        conditions.append(m.source == source)
    conditions.append(m.state != "processing")
    with engine.connect().execution_options(write=True) as conn, conn.begin():
        result = conn.execute(
            connector_message.update()
            .where(*conditions)
            .values(
                state="queued",
                attempts=0,
                next_attempt_at=None,
                lease_until=None,
                error=None,
                error_where=None,
            )
        )
        return int(result.rowcount)


def messages(
    engine: sa.Engine,
    *,
    source: str | None = None,
    state: str | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[MessageSummary]:
    """The newest messages first (page on with ``before_id``), never their bodies."""
    m = connector_message.c
    query = sa.select(
        m.id,
        m.source,
        m.received_at,
        m.message_type,
        m.control_id,
        m.state,
        m.attempts,
        m.error,
        m.error_where,
        m.next_attempt_at,
        m.processed_at,
        m.resources,
    )
    if source is not None:
        query = query.where(m.source == source)
    if state is not None:
        query = query.where(m.state == state)
    if before_id is not None:
        query = query.where(m.id < before_id)
    query = query.order_by(m.id.desc()).limit(max(1, min(limit, 1000)))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        MessageSummary(
            id=int(row.id),
            source=row.source,
            received_at=utc(row.received_at),
            message_type=row.message_type,
            control_id=row.control_id,
            state=row.state,
            attempts=int(row.attempts),
            error=row.error,
            error_where=row.error_where,
            next_attempt_at=utc(row.next_attempt_at) if row.next_attempt_at else None,
            processed_at=utc(row.processed_at) if row.processed_at else None,
            resources=list(row.resources or []),
        )
        for row in rows
    ]


def raw(engine: sa.Engine, id: int) -> bytes:  # noqa: A002  (the contract's name)
    """The bytes of a message as received (callers must be hub admins). ``KeyError`` when
    unknown."""
    m = connector_message.c
    with engine.connect() as conn:
        row = conn.execute(sa.select(m.source, m.raw_sha256, m.raw).where(m.id == id)).first()
    if row is None:
        raise KeyError(id)
    return open_raw(keyring_for(engine), row.source, row.raw_sha256, bytes(row.raw))


def status(engine: sa.Engine, source: str | None = None) -> list[SourceStatus]:
    """Where each source stands (one, or every registered source).

    Read on every /metrics scrape, so nothing here scans the inbox (migration 0009's
    indexes): the counts per (source, state) are index-only ranges of (source, state,
    processed_at); per source, its newest row by (source, id), the end of its "processed"
    range, the rows handled in the last 60 s (ranges bounded by time) and its last error
    (the partial (source, id) index of rows with an error) are correlated subqueries, one
    statement for all sources."""
    m, s = connector_message.c, connector_source.c
    since = now() - timedelta(seconds=60)
    mine = m.source == s.name
    # Each subquery reads the inbox of the outer row's source (explicitly: the nested one
    # would otherwise correlate to the inbox row of its enclosing subquery).
    newest = sa.select(sa.func.max(m.id)).where(mine).correlate_except(connector_message).scalar_subquery()
    # Handled in the last 60 s: one bounded range of (source, state, processed_at) per state
    # (an IN over the states would let PostgreSQL walk the source's whole range).
    handled = [
        sa.select(sa.func.count()).where(mine, m.state == state, m.processed_at >= since).scalar_subquery()
        for state in ("processed", "rejected", "failed", "dead")
    ]
    sources = sa.select(
        s.name,
        s.facility_code,
        s.facility_name,
        s.kind,
        s.paused,
        sa.select(m.received_at).where(m.id == newest).scalar_subquery().label("received"),
        sa.select(sa.func.max(m.processed_at))
        .where(mine, m.state == "processed")
        .scalar_subquery()
        .label("processed"),
        sum(handled[1:], handled[0]).label("recent"),
        sa.select(sa.func.max(m.id)).where(mine, m.error.is_not(None)).scalar_subquery().label("error_id"),
    ).order_by(s.name)
    if source is not None:
        sources = sources.where(s.name == source)
    with engine.connect() as conn:
        source_rows = conn.execute(sources).all()
        names = [row.name for row in source_rows]
        by_state: dict[str, dict[str, int]] = {}
        if names:
            counts = (
                sa.select(m.source, m.state, sa.func.count().label("n"))
                .where(m.source.in_(names))
                .group_by(m.source, m.state)
            )
            for row in conn.execute(counts):
                by_state.setdefault(row.source, {})[row.state] = int(row.n)
        error_ids = [int(row.error_id) for row in source_rows if row.error_id is not None]
        errors: dict[str, Any] = {}
        if error_ids:
            for row in conn.execute(
                sa.select(m.source, m.error, m.error_where, m.processed_at, m.received_at).where(
                    m.id.in_(error_ids)
                )
            ):
                errors[row.source] = row
    result = []
    for row in source_rows:
        states = {name: by_state.get(row.name, {}).get(name, 0) for name in STATES}
        error = errors.get(row.name)
        last_error = None
        if error is not None:
            last_error = f"{error.error_where}: {error.error}" if error.error_where else error.error
        error_at = (error.processed_at or error.received_at) if error is not None else None
        result.append(
            SourceStatus(
                name=row.name,
                facility_code=row.facility_code,
                facility_name=row.facility_name,
                kind=row.kind,
                paused=bool(row.paused),
                last_received_at=utc(row.received) if row.received is not None else None,
                last_processed_at=utc(row.processed) if row.processed is not None else None,
                counts=states,
                backlog=sum(states[name] for name in PENDING_STATES),
                messages_per_second=round(int(row.recent or 0) / 60.0, 3),
                failures=states["failed"] + states["dead"] + states["rejected"],
                last_error=last_error,
                last_error_at=utc(error_at) if error_at is not None else None,
            )
        )
    return result
