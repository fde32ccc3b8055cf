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
- ``head``: the head kept outside the database (``--expect-head``) is not in the chain.

What the chain cannot show on its own: removing the newest entries together with their
AuditEvents (truncating the tail) leaves a shorter chain that is perfectly consistent, and
someone able to write the database could recompute every later link after an edit. Both
are caught only against a head kept elsewhere: record ``hub audit head`` periodically
(a ticket system, a signed mail, another server) and check with
``hub audit verify --expect-head <hex>``; an old head is fine as long as the chain still
passes through it.
Calls: trail (digest and link), the schema.  Called by: the CLI (``hub audit verify``), tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import sqlalchemy as sa

from hub.audit.trail import GENESIS, chain_head, content_digest, link
from hub.db.schema import audit_chain, resource, resource_history

AUDIT_TYPE = "AuditEvent"
MAX_LISTED = 1000  # problems kept in the report; all are counted


@dataclass(frozen=True)
class Problem:
    kind: str  # edited | updated | deleted | gap | chain | unchained | head
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
    with _snapshot(engine) as conn:
        _walk(conn, report, expect_head)
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


def _walk(conn: sa.Connection, report: VerifyReport, expect_head: str | None) -> None:
    current = resource.alias("current")
    query = (
        sa.select(
            audit_chain.c.seq,
            audit_chain.c.res_id,
            audit_chain.c.digest,
            audit_chain.c.chain,
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
            # A broken link already explains a digest mismatch (the chain row was changed).
            if link_ok and content_digest(row.content) != row.digest:
                report.add("edited", seq, res_id, "the AuditEvent differs from what was recorded")
        if expect_head is not None and row.chain == expect_head:
            report.anchored_at = seq
        previous_seq, previous_chain = seq, str(row.chain)
    report.head_seq, report.head = previous_seq, previous_chain


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
