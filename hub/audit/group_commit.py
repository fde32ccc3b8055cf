"""Group commit: the records of many concurrent requests written by one thread, one
transaction per batch.

Owns: ``GroupCommit``, a writer thread with a queue. A request thread hands it one item
(``submit_and_wait``) and blocks until the transaction holding that item has committed,
or gets the error it failed with. One commit runs at a time per process. The thread takes
everything queued when the previous commit ends (up to ``max_weight``), writes it with one
call of ``commit`` (one transaction), then releases every waiter of the batch; while it
commits, the next batch accumulates in the queue (as a database's WAL group commit). So
N concurrent requests cost one transaction, one lock and one fsync instead of N, and the
answer of each still leaves only after its record is durable. A request that finds no
commit under way and nothing queued commits its item itself, in its own thread (then
requests arriving meanwhile queue for the thread): alone, a hand-over would only add
latency.
Calls: the ``commit`` function it is given, ``hub.db.engine`` (a time limit on each
batch's transaction).  Called by: ``hub.audit.trail`` (``AuditTrail.start_group_commit``).

Failure: when a batch fails, each request of it is written again alone, so one request's
bad record cannot fail the requests it was batched with; for errors of the database itself
(unavailable, time limit: ``OperationalError`` and the like) the batch's error goes to
every waiter straight away, since writing alone would fail the same way, once per request.
Each waiter gets its own ``AuditWriteError`` whose cause is the database's error.

Closing: ``close`` refuses new items (``submit_and_wait`` then returns False and the
caller writes its record itself), lets the thread write everything already queued, and
joins it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import sqlalchemy as sa

from hub.db.engine import RequestGuard, guarded

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors of the database as a whole: a request written alone would fail the same way.
_DATABASE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


class AuditWriteError(RuntimeError):
    """The batch holding a request's record did not commit (``__cause__``: why)."""


@dataclass
class _Pending(Generic[T]):
    item: T
    done: Future[None] = field(default_factory=Future)


class GroupCommit(Generic[T]):
    def __init__(
        self,
        commit: Callable[[Sequence[T]], None],
        *,
        weight: Callable[[T], int] = lambda _item: 1,
        max_weight: int = 500,
        time_limit_seconds: float | None = None,
        wait_seconds: float = 300.0,
        name: str = "group-commit",
    ) -> None:
        """``commit`` writes items in one transaction of its own; ``weight`` is an item's
        size (records) and a batch holds at most ``max_weight`` of it (always at least one
        item); ``time_limit_seconds`` bounds each batch's transaction as a request's is
        bounded (``hub.db.engine.RequestGuard``); ``wait_seconds`` is how long a waiter
        waits at most before it fails (the writer is stuck: no answer without its record)."""
        self._commit = commit
        self._weight = weight
        self._max_weight = max_weight
        self._time_limit = time_limit_seconds
        self._wait_seconds = wait_seconds
        self._queue: deque[_Pending[T]] = deque()
        # Guards the queue, ``_busy``, ``_closed`` and the counters; signalled when an item is
        # queued, a commit ends, or the writer closes.
        self._changed = threading.Condition()
        self._busy = False  # a commit is under way (by the thread or by a caller, alone)
        self._closed = False
        self._waiting = 0  # handed in, not yet answered (queued or being written)
        self.batches = 0  # transactions committed (for benchmarks)
        # time.time() of the start and of the last committed batch (read by the health report)
        self.started = time.time()
        self.last_commit: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit_and_wait(self, item: T) -> bool:
        """Write ``item`` and return True once it has committed, or raise
        ``AuditWriteError``. False when the writer is closed: nothing was written.

        Uncontended (no commit under way, nothing queued) the caller commits its item
        itself: a hand-over to the thread and back would only add two thread switches.
        Otherwise it queues the item and waits for the thread's next batch."""
        pending: _Pending[T] = _Pending(item)
        with self._changed:
            if self._closed:
                return False
            self._waiting += 1
            alone = not self._busy and not self._queue
            if alone:
                self._busy = True
            else:
                self._queue.append(pending)
                self._changed.notify_all()
        if alone:
            try:
                self._write([pending])
            finally:
                self._committed()
        try:
            pending.done.result(timeout=self._wait_seconds)
        except TimeoutError as exc:
            # The record may still commit later: then the trail holds one entry more than
            # answers sent, never one less.
            raise AuditWriteError(f"the audit writer did not commit within {self._wait_seconds:g} s") from exc
        finally:
            with self._changed:
                self._waiting -= 1
        return True

    def waiting(self) -> int:
        """How many requests wait for their records to commit (queued or being written)."""
        with self._changed:
            return self._waiting

    def running(self) -> bool:
        """Whether the writer thread is alive and takes items (the health report)."""
        with self._changed:
            return self._thread.is_alive() and not self._closed

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, write those queued, stop the thread (idempotent)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _committed(self) -> None:
        with self._changed:
            self._busy = False
            self._changed.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    # One commit at a time: while a caller commits alone, the queue fills.
                    while (self._busy or not self._queue) and not (self._closed and not self._busy):
                        self._changed.wait()
                    if not self._queue:
                        return  # closed, and everything queued before is written
                    batch: list[_Pending[T]] = []
                    weight = 0
                    while self._queue and (not batch or weight < self._max_weight):
                        batch.append(self._queue.popleft())
                        weight += self._weight(batch[-1].item)
                    self._busy = True
                try:
                    self._write(batch)
                finally:
                    self._committed()
        finally:
            # Only reached with items queued if the loop itself broke: fail them, never hang.
            with self._changed:
                left, self._queue = list(self._queue), deque()
            for pending in left:
                if not pending.done.done():
                    pending.done.set_exception(AuditWriteError("the audit writer stopped"))

    def _write(self, batch: list[_Pending[T]]) -> None:
        try:
            self._commit_guarded([pending.item for pending in batch])
        except Exception as exc:  # noqa: BLE001  (every waiter gets the error)
            if len(batch) == 1 or isinstance(exc, _DATABASE_ERRORS):
                log.warning("audit batch of %d requests failed: %s", len(batch), exc)
                for pending in batch:
                    pending.done.set_exception(_failure(exc))
                return
            log.warning("audit batch of %d requests failed (%s); writing each alone", len(batch), exc)
            for pending in batch:
                self._write([pending])
            return
        with self._changed:
            self.batches += 1
            self.last_commit = time.time()
        for pending in batch:
            pending.done.set_result(None)

    def _commit_guarded(self, items: list[T]) -> None:
        with guarded(RequestGuard(self._time_limit)):
            self._commit(items)


def _failure(cause: Exception) -> AuditWriteError:
    """One error per waiter (an exception object raised in several threads at once would
    share, and garble, one traceback)."""
    error = AuditWriteError(str(cause))
    error.__cause__ = cause
    return error
