"""Group commit: the records of many concurrent requests written by one thread, one
transaction per batch.

Owns: ``GroupCommit``, a writer thread with a queue. A request thread hands it one item
(``submit_and_wait``) and blocks until the transaction holding that item has committed,
or gets the error it failed with. The thread takes everything queued when it wakes (up to
``max_weight``), writes it with one call of ``commit`` (one transaction), then releases
every waiter of the batch; while it commits, the next batch accumulates in the queue (as
a database's WAL group commit). So N concurrent requests cost one transaction, one lock
and one fsync instead of N, and the answer of each still leaves only after its record is
durable.
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
import queue
import threading
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
        self._queue: queue.SimpleQueue[_Pending[T] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "closed" against submissions
        self._closed = False
        self._waiting = 0  # handed in, not yet answered (queued or being written)
        self.batches = 0  # transactions committed (written by the thread only; for benchmarks)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit_and_wait(self, item: T) -> bool:
        """Queue ``item`` and wait until its batch has committed (True), or raise
        ``AuditWriteError``. False when the writer is closed: nothing was queued."""
        pending: _Pending[T] = _Pending(item)
        with self._lock:
            if self._closed:
                return False
            self._waiting += 1
            self._queue.put(pending)
        pending.done.add_done_callback(self._answered)
        try:
            pending.done.result(timeout=self._wait_seconds)
        except TimeoutError as exc:
            # The record may still commit later: then the trail holds one entry more than
            # answers sent, never one less.
            raise AuditWriteError(f"the audit writer did not commit within {self._wait_seconds:g} s") from exc
        return True

    def waiting(self) -> int:
        """How many requests wait for their records to commit (queued or being written)."""
        with self._lock:
            return self._waiting

    def _answered(self, _done: Future[None]) -> None:
        with self._lock:
            self._waiting -= 1

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, write those queued, stop the thread (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)  # after every item queued before: FIFO
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                if first is None:
                    return
                batch, weight = [first], self._weight(first.item)
                while weight < self._max_weight:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    batch.append(more)
                    weight += self._weight(more.item)
                self._write(batch)
        finally:
            # Only reached with items queued if the loop itself broke: fail them, never hang.
            while True:
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if left is not None and not left.done.done():
                    left.done.set_exception(AuditWriteError("the audit writer stopped"))

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
        self.batches += 1
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
