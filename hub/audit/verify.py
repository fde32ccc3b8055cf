"""Checking the audit trail: is every AuditEvent still as written, in order, and chained?

Owns: ``verify_chain`` and what it reports. It walks ``audit_chain`` by ``seq`` in one
consistent snapshot and, for each entry, recomputes the digest of the AuditEvent row in
``resource`` and the chain link; then it looks for AuditEvents outside the chain and for
AuditEvents that have history (were updated). Problem kinds:

- ``edited``: the stored AuditEvent no longer has the digest its chain entry recorded;
- ``updated``: the AuditEvent has a version other than 1 or rows in ``resource_history``
  (AuditEvents are append-only: nothing may update them);
- ``deleted``: the AuditEvent row is gone or marked deleted;
- ``gap``: chain entries are missing (``seq`` is not contiguous from 1);
- ``chain``: an entry's chain value is not sha256(previous chain || its digest): the chain
  row itself was forged, reordered, or had its digest swapped;
- ``unchained``: an AuditEvent in ``resource`` that the chain does not know (inserted
  behind the trail's back);
- ``head``: the head kept outside the database (``--expect-head``) is not in the chain;
- ``index``: the AuditEvent's reference index rows (``idx_reference_audit``: ``patient``,
  ``entity``, ``agent``...) or its ``compartment`` rows are not those its content implies.
  These rows decide whose access log (``AuditEvent?patient=``) shows the event and who may
  read it, so deleting them hides an event from its patient without touching the event.
  They are recomputed from the content with ``hub.search.index.extract_index_rows``, the
  function that wrote them (deterministic), which binds them to the chained digest;
- ``unreadable``: a sealed AuditEvent that cannot be opened (its key is not configured,
  or its envelope fails authentication).

AuditEvents are stored encrypted (``hub.crypto.policy``); the digest is over the
plaintext, so each one is opened with the database's keys before hashing.

What the chain cannot show on its own: removing the newest entries together with their
AuditEvents (truncating the tail) leaves a shorter chain that is perfectly consistent, and
someone able to write the database could recompute every later link after an edit. Both
are caught only against a head kept elsewhere: record ``hub audit head`` periodically
(a ticket system, a signed mail, another server) and check with
``hub audit verify --expect-head <hex>``; an old head is fine as long as the chain still
passes through it.
Calls: trail (digest and link), the schema, ``hub.crypto`` (opening sealed events), the
search index extraction.  Called by: the CLI (``hub audit verify``), tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa

from hub.audit.trail import GENESIS, chain_head, content_digest, link
from hub.crypto import keys
from hub.crypto.envelope import DecryptionError, open_content
from hub.db.schema import audit_chain, compartment, index_table, resource, resource_history
from hub.search.index import extract_index_rows
from hub.search.registry import Registry, get_registry

AUDIT_TYPE = "AuditEvent"
MAX_LISTED = 1000  # problems kept in the report; all are counted
_BATCH = 500  # chain entries whose index rows are fetched together


@dataclass(frozen=True)
class Problem:
    kind: str  # edited | updated | deleted | gap | chain | unchained | head | index | unreadable
    seq: int | None  # the chain position, when the problem has one
    res_id: str | None
    detail: str


@dataclass
class VerifyReport:
    verified: int = 0  # chain entries walked
    head_seq: int = 0
    head: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    anchored_at: int | None = None  # seq whose chain value is the expected head

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_broken(self) -> Problem | None:
        """The problem earliest in the chain (problems without a position come last)."""
        if not self.problems:
            return None
        return min(self.problems, key=lambda p: (p.seq is None, p.seq or 0))

    def add(self, kind: str, seq: int | None, res_id: str | None, detail: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(Problem(kind, seq, res_id, detail))


@contextmanager
def _snapshot(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One read transaction that sees a single state of the chain and the resources."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def head(engine: sa.Engine) -> tuple[int, str]:
    """(seq, chain value) of the newest entry, to keep outside the database."""
    with _snapshot(engine) as conn:
        return chain_head(conn)


def verify_chain(engine: sa.Engine, expect_head: str | None = None) -> VerifyReport:
    """Walk the whole trail; see the module docstring for what each problem kind means."""
    report = VerifyReport()
    expect_head = expect_head.strip().lower() if expect_head else None
    if expect_head == GENESIS:
        report.anchored_at = 0
    with keys.bound(engine), _snapshot(engine) as conn:
        _walk(conn, report, expect_head, get_registry())
        _history(conn, report)
        _unchained(conn, report)
    if expect_head is not None and report.anchored_at is None:
        report.add(
            "head",
            None,
            None,
            f"the expected head {expect_head} is not in the chain: entries after it were "
            "removed or the chain was rewritten",
        )
    return report


def _walk(conn: sa.Connection, report: VerifyReport, expect_head: str | None, registry: Registry) -> None:
    current = resource.alias("current")
    query = (
        sa.select(
            audit_chain.c.seq,
            audit_chain.c.res_id,
            audit_chain.c.digest,
            audit_chain.c.chain,
            current.c.pid,
            current.c.version,
            current.c.deleted,
            current.c.content,
        )
        .select_from(
            audit_chain.outerjoin(
                current,
                sa.and_(current.c.res_id == audit_chain.c.res_id, current.c.res_type == AUDIT_TYPE),
            )
        )
        .order_by(audit_chain.c.seq)
    )
    previous_seq, previous_chain = 0, GENESIS
    rows = conn.execution_options(stream_results=True, yield_per=2000).execute(query)
    to_index: list[tuple[int, str, int, bytes]] = []  # (seq, res_id, pid, plaintext)
    for row in rows:
        seq, res_id = int(row.seq), str(row.res_id)
        report.verified += 1
        if seq != previous_seq + 1:
            missing = f"{previous_seq + 1}" if seq == previous_seq + 2 else f"{previous_seq + 1}..{seq - 1}"
            report.add("gap", previous_seq + 1, None, f"chain entries {missing} are missing")
            link_ok = True  # the link over a gap cannot hold; the gap is the finding
        else:
            link_ok = link(previous_chain, row.digest) == row.chain
            if not link_ok:
                report.add(
                    "chain",
                    seq,
                    res_id,
                    "chain value is not sha256(previous chain || digest): the entry was "
                    "forged, reordered or had its digest replaced",
                )
        if row.content is None and row.version is None:
            report.add("deleted", seq, res_id, "the AuditEvent row is missing from resource")
        elif row.deleted or row.content is None:
            report.add("deleted", seq, res_id, "the AuditEvent is marked deleted")
        else:
            if row.version != 1:
                report.add("updated", seq, res_id, f"the AuditEvent is at version {row.version}")
            plain = _plaintext(row.content, res_id, seq, report)
            # A broken link already explains a digest mismatch (the chain row was changed).
            if plain is not None and link_ok and content_digest(plain) != row.digest:
                report.add("edited", seq, res_id, "the AuditEvent differs from what was recorded")
            elif plain is not None:
                to_index.append((seq, res_id, int(row.pid), plain))
        if len(to_index) >= _BATCH:
            _check_index(conn, report, registry, to_index)
            to_index = []
        if expect_head is not None and row.chain == expect_head:
            report.anchored_at = seq
        previous_seq, previous_chain = seq, str(row.chain)
    _check_index(conn, report, registry, to_index)
    report.head_seq, report.head = previous_seq, previous_chain


def _plaintext(content: Any, res_id: str, seq: int, report: VerifyReport) -> bytes | None:
    """The AuditEvent's JSON as recorded: opened when sealed; None (reported) if it cannot be."""
    if isinstance(content, dict):  # a driver that parsed the jsonb: never an envelope of ours
        if "_enc" not in content:
            return orjson.dumps(content)
        content = orjson.dumps(content)
    raw = content.encode() if isinstance(content, str) else bytes(content)
    try:
        return open_content(raw, AUDIT_TYPE, res_id)
    except DecryptionError as error:
        why = error.issues[0].diagnostics if error.issues else str(error)
        report.add("unreadable", seq, res_id, f"the sealed AuditEvent cannot be opened: {why}")
        return None


def _check_index(
    conn: sa.Connection, report: VerifyReport, registry: Registry, events: list[tuple[int, str, int, bytes]]
) -> None:
    """Compare each event's stored reference and compartment rows with those its (verified)
    content implies; report any difference as ``index``."""
    if not events:
        return
    pids = [pid for _, _, pid, _ in events]
    stored_refs: dict[int, set[tuple[Any, ...]]] = {pid: set() for pid in pids}
    stored_members: dict[int, set[tuple[Any, ...]]] = {pid: set() for pid in pids}
    references = index_table("reference", AUDIT_TYPE)  # idx_reference_audit
    ref_columns = [c for c in references.columns if c.name != "pid"]
    for row in conn.execute(sa.select(references.c.pid, *ref_columns).where(references.c.pid.in_(pids))):
        stored_refs[row[0]].add(tuple(row[1:]))
    for row in conn.execute(
        sa.select(compartment.c.pid, compartment.c.patient_id, compartment.c.labels).where(
            compartment.c.pid.in_(pids)
        )
    ):
        stored_members[row[0]].add(tuple(row[1:]))
    for seq, res_id, pid, plain in events:
        expected = extract_index_rows(registry, AUDIT_TYPE, orjson.loads(plain))
        differences = _differences(
            references.name, set(expected.get("reference", [])), stored_refs[pid], _reference_label
        ) + _differences(
            "compartment", set(expected.get("compartment", [])), stored_members[pid], _member_label
        )
        if differences:
            report.add(
                "index",
                seq,
                res_id,
                "the index rows that place the AuditEvent in access logs do not match its content: "
                + "; ".join(differences),
            )


def _differences(
    table: str, expected: set[tuple[Any, ...]], stored: set[tuple[Any, ...]], label: Any
) -> list[str]:
    found = []
    missing, extra = expected - stored, stored - expected
    if missing:
        found.append(f"{table} rows missing for {', '.join(sorted({label(r) for r in missing}))}")
    if extra:
        found.append(
            f"{table} rows not implied by the content for {', '.join(sorted({label(r) for r in extra}))}"
        )
    return found


def _reference_label(row: tuple[Any, ...]) -> str:
    # (hash_identity, hash_target, target_type, target_id, target_url)
    target = f"{row[2]}/{row[3]}" if row[2] and row[3] else (row[3] or row[4] or "?")
    return str(target)


def _member_label(row: tuple[Any, ...]) -> str:
    return f"Patient/{row[0]}" if row[0] else "no patient"


def _history(conn: sa.Connection, report: VerifyReport) -> None:
    query = (
        sa.select(resource_history.c.res_id, sa.func.min(audit_chain.c.seq).label("seq"))
        .select_from(
            resource_history.outerjoin(audit_chain, audit_chain.c.res_id == resource_history.c.res_id)
        )
        .where(resource_history.c.res_type == AUDIT_TYPE)
        .group_by(resource_history.c.res_id)
    )
    for row in conn.execute(query):
        report.add(
            "updated",
            None if row.seq is None else int(row.seq),
            str(row.res_id),
            "the AuditEvent has earlier versions in resource_history",
        )


def _unchained(conn: sa.Connection, report: VerifyReport) -> None:
    chained = sa.select(audit_chain.c.seq).where(audit_chain.c.res_id == resource.c.res_id).exists()
    query = (
        sa.select(resource.c.res_id)
        .where(resource.c.res_type == AUDIT_TYPE, ~chained)
        .order_by(resource.c.pid)
    )
    for row in conn.execute(query):
        report.add("unchained", None, str(row.res_id), "the AuditEvent is not in the audit chain")
