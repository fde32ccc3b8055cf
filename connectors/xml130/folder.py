"""The watched folder of an ``xml130`` source: each QĐ 130 file dropped there goes into the
inbox, then moves out of the way (``done/``, or ``rejected/`` with a ``.error.txt``).

Owns: which files are ready (written completely), reading them in batches into the inbox
(``inbox.receive``: one database transaction per batch), and moving them afterwards.
Calls: ``connectors.inbox`` (``receive``).
Called by: ``connectors.worker.Intake`` (every ``interval`` seconds per source, in the
in-process worker or the arq cron), tests.

A file is taken once it is complete. A sender that can should write ``name.xml.part`` and
rename it to ``name.xml`` when done (a rename is atomic); a file named ``*.xml`` is taken
only when it has not changed for ``SETTLE_SECONDS`` (its modification time) and did not
change while it was read, so a slow copy is not cut in two. Only ``*.xml`` files (any
letter case) at the top of the folder are read; hidden files and other names are left alone.

Never read twice, also across a restart: a file leaves the folder only after its bytes are
committed to the inbox; if the hub stops in between, the next pass reads it again and the
inbox recognises the same bytes of the same source (``Received.duplicate``), so it is moved
without a second message. A file whose bytes cannot even be peeked (not a QĐ 130 envelope)
is stored as ``rejected`` in the inbox and moved to ``rejected/``; a file the mapping later
refuses is in ``done/`` (it was received) and its error is in the inbox's status and
message list, where it can be replayed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import sqlalchemy as sa

from connectors import inbox
from connectors.inbox import Received
from connectors.model import Source

log = logging.getLogger(__name__)

SETTLE_SECONDS = 2.0  # unchanged this long: the writer is done
MAX_FILE_BYTES = 64 * 1024 * 1024  # larger: moved to rejected/ unread (no real episode file is)
BATCH_FILES = 20  # files per inbox transaction
BATCH_BYTES = 32 * 1024 * 1024
DONE, REJECTED = "done", "rejected"


def ready_files(folder: Path, *, settle_seconds: float = SETTLE_SECONDS) -> list[Path]:
    """The complete ``*.xml`` files of ``folder``, oldest first."""
    now = time.time()
    found: list[tuple[float, str, Path]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(".xml") or not entry.is_file():
                continue
            mtime = entry.stat().st_mtime
            if now - mtime >= settle_seconds:
                found.append((mtime, name, Path(entry.path)))
    return [p for _, _, p in sorted(found)]


def watch(
    engine: sa.Engine, source: Source, folder: Path | None = None, *, settle_seconds: float = SETTLE_SECONDS
) -> list[Received]:
    """One pass over the source's folder (``folder``, else its setting "folder"): every ready
    file into the inbox, then moved. Returns what the inbox said of each, in file order."""
    folder = Path(folder if folder is not None else source.settings["folder"])
    results: list[Received] = []
    batch: list[tuple[Path, bytes]] = []
    size = 0
    for path in ready_files(folder, settle_seconds=settle_seconds):
        data = _read_complete(path)
        if data is None:
            continue
        batch.append((path, data))
        size += len(data)
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            results.extend(_receive(engine, source, folder, batch))
            batch, size = [], 0
    if batch:
        results.extend(_receive(engine, source, folder, batch))
    return results


def _read_complete(path: Path) -> bytes | None:
    """The file's bytes, or None when it is too large (moved to rejected/), vanished or
    changed while it was read (taken at a later pass)."""
    try:
        before = path.stat()
        if before.st_size > MAX_FILE_BYTES:
            _move(path, path.parent / REJECTED, f"larger than {MAX_FILE_BYTES} bytes: not read")
            return None
        data = path.read_bytes()
        after = path.stat()
    except FileNotFoundError:
        return None
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
        data
    ) != after.st_size:
        return None
    return data


def _receive(
    engine: sa.Engine, source: Source, folder: Path, batch: list[tuple[Path, bytes]]
) -> list[Received]:
    received = inbox.receive(engine, source, [data for _, data in batch])
    for (path, _), result in zip(batch, received, strict=True):
        if result.state == "rejected":
            _move(path, folder / REJECTED, result.error or "rejected", result.id)
        else:
            _move(path, folder / DONE, None, result.id)
    return received


def _move(path: Path, target: Path, error: str | None, message_id: int | None = None) -> None:
    """Move ``path`` into ``target`` (its name kept unless taken: then the inbox id is added),
    with ``<name>.error.txt`` beside it when there is an error. A failure is logged: the
    next pass finds the file again and the inbox knows its bytes."""
    try:
        target.mkdir(exist_ok=True)
        destination = target / path.name
        if destination.exists():
            tag = message_id if message_id is not None else time.time_ns()
            destination = target / f"{path.stem}.{tag}{path.suffix}"
        if error is not None:
            where = f"inbox message {message_id}: " if message_id is not None else ""
            (target / f"{destination.name}.error.txt").write_text(f"{where}{error}\n", encoding="utf-8")
        os.replace(path, destination)
    except OSError:
        log.exception("could not move %s to %s", path, target)
