"""Bulk import: worker processes prepare, the main process resolves and writes.

Owns: the flow of ``hub import``: ordering, batching writes (COPY on PostgreSQL), id
collisions, cross-bundle ``urn:uuid`` resolution, compartment membership as the store makes
it (rows derived again where ids were renumbered or placeholders patched; identifier and
own-base references resolved against the database at write time), and the import report.
A unit is all or nothing: a Bundle is one transaction; an NDJSON chunk keeps its good lines.
Calls: sources, prepare, the store's writer, the REST router for units that need full
transaction semantics, consent.context (it runs only inside an explicit system access, whose
principal it also uses for the units it sends through the router), consent.derive (access
rows again where renumbering or patching changed ids they name), hub.crypto.keys (the
keyring, handed to the worker processes).
Called by: the CLI, the demo loader, the ingest benchmark.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from consent import context as access_context
from consent.derive import access_rows
from hub.auth.principal import Principal
from hub.crypto.keys import install_worker as install_worker_keys
from hub.crypto.keys import using as using_keys
from hub.crypto.keys import worker_state as worker_key_state
from hub.errors import FhirError
from hub.ingest.prepare import UNRESOLVED, Prepared, prepare, prepare_without_payload
from hub.ingest.sources import Unit, discover, units
from hub.ops import compartment
from hub.rest import FhirRequest, FhirRouter
from hub.search.hashing import hash64
from hub.search.registry import Registry
from hub.store import NewResource, Store, reader, writer
from hub.store import aliases as fullurl_aliases

FLUSH_RESOURCES = 5000
IN_FLIGHT_PER_WORKER = 4


# A load at least this large refreshes the planner's statistics when it ends.
ANALYZE_AFTER = 5000


@dataclass
class ImportReport:
    files: int = 0
    units: int = 0
    created: Counter[str] = field(default_factory=Counter)
    updated: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        return sum(self.created.values()) + sum(self.updated.values())

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0


class Importer:
    def __init__(self, router: FhirRouter, *, workers: int | None = None) -> None:
        self.router = router
        self.store: Store = router.ctx.store
        self.workers = workers if workers is not None else max(os.cpu_count() or 1, 1)
        self.report = ImportReport()
        self._pending: list[NewResource] = []
        # id -> type of resources queued but not yet written; after a flush the database answers.
        self._known: dict[str, str] = {}
        # fullUrls whose resource got a fresh id, recorded with the next write (as REST does).
        self._aliases: list[dict[str, str]] = []

    @property
    def processed(self) -> int:
        """Resources stored or queued for the next bulk write."""
        return self.report.stored + len(self._pending)

    def run(self, paths: list[Path], progress: Callable[[Prepared], None] | None = None) -> ImportReport:
        """Import the paths; only inside ``consent.context.system_access`` (fail closed)."""
        self._principal: Principal = access_context.required_unrestricted("Bulk import").principal
        started = time.perf_counter()
        files = discover(paths)
        self.report.files = len(files)
        for prepared in self._prepared(units(files)):
            self.report.units += 1
            self._accept(prepared)
            if progress is not None:
                progress(prepared)
        self._flush()
        self._analyze()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _analyze(self) -> None:
        """After a bulk load, PostgreSQL's planner statistics: without them (autovacuum off, or
        not yet run) the record page's membership query scanned idx_reference whole (324 ms at
        1,300 patients; 1.8 ms once analysed, bench/pages.py)."""
        if self.store.engine.dialect.name != "postgresql" or self.report.stored < ANALYZE_AFTER:
            return
        with self.store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE"))

    def _prepared(self, work: Iterable[Unit]) -> Iterator[Prepared]:
        if self.workers <= 1:
            for unit in work:
                # finalize reads the index key and encrypt flag of the database written to
                with using_keys(self.store.keys()):
                    prepared = prepare(unit)
                yield prepared
            return
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        # Executor.map would submit every unit at once and hold all their payloads in memory;
        # a bounded window keeps memory flat for any input size, and results stay in order.
        window: deque[tuple[Unit, Future[Prepared]]] = deque()

        def arrived() -> Prepared:
            unit, future = window.popleft()
            prepared = future.result()
            prepared.unit = unit  # workers send results back without the payload
            return prepared

        # Workers get the index key and the encrypt flag, no DEK and no master key: they decide
        # what is sealed, the writer in this process seals it.
        with ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=install_worker_keys,
            initargs=worker_key_state(self.store.keys()),
        ) as pool:
            for unit in work:
                window.append((unit, pool.submit(prepare_without_payload, unit)))
                if len(window) >= self.workers * IN_FLIGHT_PER_WORKER:
                    yield arrived()
            while window:
                yield arrived()

    # --- main-process side ----------------------------------------------------------------

    def _accept(self, prepared: Prepared) -> None:
        self.report.errors.extend(prepared.errors)
        self.report.rejected += prepared.rejected
        if prepared.needs_transaction:
            self._run_transaction(prepared.unit)
        elif prepared.unit.kind == "bundle":
            self._accept_bundle(prepared)
        else:
            self._accept_with_ids(prepared.resources)

    def _accept_bundle(self, prepared: Prepared) -> None:
        if not prepared.resources:
            return
        ids = [r.res_id for r in prepared.resources]
        with self.store.read() as conn:
            taken = {i for i in ids if i in self._known} | set(reader.resolve_bare_ids(conn, ids))
            targets = self._resolve(conn, prepared.unresolved)
        if targets is None:
            # A reference to an earlier bundle that is not simply "the resource with that id":
            # the full transaction path resolves aliases or reports the error.
            self._run_transaction(prepared.unit)
            return
        resources = prepared.resources
        if targets:
            resources = [_patch_unresolved(self.store.registry, r, targets) for r in resources]
        if taken:
            # POST always creates: a uuid already in use (Synthea repeats the hospital's
            # organizations in every patient bundle) gets a fresh id, as the REST path does.
            new_ids = {i: str(uuid.uuid4()) for i in taken}
            resources = _renumber(self.store.registry, resources, new_ids)
            old_by_new = {new: old for old, new in new_ids.items()}
            self._aliases += [
                {"full_url": f"urn:uuid:{old_by_new[r.res_id]}", "res_type": r.res_type, "res_id": r.res_id}
                for r in resources
                if r.res_id in old_by_new
            ]
        for item in resources:
            self._known[item.res_id] = item.res_type
        self._queue(resources)

    def _resolve(self, conn: sa.Connection, unresolved: set[str]) -> dict[str, str] | None:
        if not unresolved:
            return {}
        targets = {i: self._known[i] for i in unresolved if i in self._known}
        missing = [i for i in unresolved if i not in targets]
        if missing:
            for res_id, types in reader.resolve_bare_ids(conn, missing).items():
                if len(types) == 1:
                    targets[res_id] = types[0]
        return targets if len(targets) == len(unresolved) else None

    def _accept_with_ids(self, resources: list[NewResource]) -> None:
        """Resources that carry their own ids (NDJSON): create new ones, update the rest."""
        if not resources:
            return
        fresh: list[NewResource] = []
        existing: list[NewResource] = []
        with self.store.read() as conn:
            stored = reader.resolve_bare_ids(conn, [r.res_id for r in resources])
        seen: set[tuple[str, str]] = set()
        for item in resources:
            key = (item.res_type, item.res_id)
            if (
                item.res_type in stored.get(item.res_id, ())
                or self._known.get(item.res_id) == item.res_type
                or key in seen
            ):
                existing.append(item)
            else:
                fresh.append(item)
                seen.add(key)
        for item in fresh:
            self._known[item.res_id] = item.res_type
        self._queue(fresh)
        if existing:
            self._flush()
            for item in existing:
                self._update(item)

    def _update(self, item: NewResource) -> None:
        try:
            with self.store.write() as conn:
                self.store.update(conn, item.res_type, item.res_id, orjson.loads(item.content))
            self.report.updated[item.res_type] += 1
        except FhirError as error:
            self.report.errors.append(f"{item.res_type}/{item.res_id}: {error}")
            self.report.rejected += 1

    def _queue(self, resources: list[NewResource]) -> None:
        self._pending.extend(resources)
        if len(self._pending) >= FLUSH_RESOURCES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        # Compartment references only the database resolves (identifiers, own-base URLs) are
        # resolved as the store does, after the rest of the batch is in: a Patient of the same
        # batch is found by its identifier.
        plain = [item for item in batch if compartment.PENDING not in item.index_rows]
        waiting = [item for item in batch if compartment.PENDING in item.index_rows]
        with self.store.write() as conn:
            writer.insert_new(conn, plain)
            for item in waiting:
                compartment.resolve(conn, item.index_rows, self.store.base_url)
            writer.insert_new(conn, waiting)
            fullurl_aliases.record(conn, self._aliases)
        self._aliases = []
        self._known.clear()
        self.report.created.update(r.res_type for r in batch)

    def _run_transaction(self, unit: Unit) -> None:
        self._flush()
        body = unit.payload
        if unit.kind != "bundle":
            self.report.errors.append(f"{unit.source}: cannot be imported")
            self.report.rejected += 1
            return
        response = self.router.handle(FhirRequest("POST", "", body=body, principal=self._principal))
        if response.status >= 400:
            outcome = orjson.loads(response.body or b"{}")
            messages = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))
            self.report.errors.append(f"{unit.source}: HTTP {response.status}: {messages}")
            self.report.rejected += len(orjson.loads(body).get("entry") or [])
            return
        for entry in orjson.loads(response.body or b"{}").get("entry", []):
            location = entry.get("response", {}).get("location", "")
            status = entry.get("response", {}).get("status", "")
            res_type = location.rsplit("/_history/", 1)[0].rsplit("/", 2)[-2] if location else "?"
            if status.startswith("201"):
                self.report.created[res_type] += 1
            elif status.startswith("200") and location:
                self.report.updated[res_type] += 1


def _renumber(registry: Registry, items: list[NewResource], new_ids: dict[str, str]) -> list[NewResource]:
    """Give resources fresh ids and repoint the bundle's references to them."""
    by_type = {(it.res_type, it.res_id) for it in items if it.res_id in new_ids}
    replacements = [(f'"{t}/{i}"'.encode(), f'"{t}/{new_ids[i]}"'.encode()) for t, i in by_type]
    renumbered_types = {t for t, _ in by_type}
    renumbered = []
    for item in items:
        content, rows = item.content, item.index_rows
        if item.res_id in new_ids:
            body = orjson.loads(content)
            body["id"] = new_ids[item.res_id]
            content = orjson.dumps(body)
        if any(old in content for old, _ in replacements):
            for old, new in replacements:
                content = content.replace(old, new)
            rows = dict(rows)
            rows["reference"] = [_repoint(registry, row, new_ids) for row in rows.get("reference", [])]
        if content is not item.content and _derived_rows_change(item.res_type, renumbered_types):
            rows = _rederive(registry, item.res_type, new_ids.get(item.res_id, item.res_id), content, rows)
        renumbered.append(
            replace(item, res_id=new_ids.get(item.res_id, item.res_id), content=content, index_rows=rows)
        )
    return renumbered


def _repoint(registry: Registry, row: tuple[Any, ...], new_ids: dict[str, str]) -> tuple[Any, ...]:
    hash_identity, _, target_type, target_id, url = row
    if target_id not in new_ids:
        return row
    param = registry.param_by_identity(hash_identity)
    assert param is not None
    new_id = new_ids[target_id]
    return (hash_identity, hash64(param.resource_type, param.code, new_id), target_type, new_id, url)


def _patch_unresolved(registry: Registry, item: NewResource, targets: dict[str, str]) -> NewResource:
    """Swap the placeholder type of cross-bundle references for the real one."""
    if UNRESOLVED.encode() not in item.content:
        return item
    content = item.content
    patched_types = set()
    for res_id, res_type in targets.items():
        placeholder = f'"{UNRESOLVED}/{res_id}"'.encode()
        if placeholder in content:
            content = content.replace(placeholder, f'"{res_type}/{res_id}"'.encode())
            patched_types.add(res_type)
    rows = dict(item.index_rows)
    if "reference" in rows:
        rows["reference"] = [
            (row[0], row[1], targets.get(row[3], row[2]), row[3], row[4]) if row[2] == UNRESOLVED else row
            for row in rows["reference"]
        ]
    if _derived_rows_change(item.res_type, patched_types):
        rows = _rederive(registry, item.res_type, item.res_id, content, rows)
    return replace(item, content=content, index_rows=rows)


# Types whose access rows (consent.derive) name resources by their ids, beyond the Patient
# references every compartment type follows: a Patient's own row and policy grants, a
# Binary's securityContext, a stored Bundle's entries, the grants of Consent, CareTeam and
# RelatedPerson (grantees such as ``Practitioner/id``, ``CareTeam/id``).
_ACCESS_ROWS_NAME_IDS = frozenset({"Patient", "Binary", "Bundle", "Consent", "CareTeam", "RelatedPerson"})


def _derived_rows_change(res_type: str, changed_types: set[str]) -> bool:
    """Whether a resource's access rows can change when references to resources of
    ``changed_types`` (or its own id) got other ids or types after the worker indexed it.

    Compartment membership of every other type follows only references to Patients (a
    reference to ``Organization/a`` and one to ``Organization/b`` or ``Unresolved/b`` both
    name no patient), so re-deriving is needed only when a Patient's id changed or the
    type itself names ids in its rows. Skipping it saves a parse and a derivation for
    nearly every resource of a Synthea bundle (each repeats its hospital's Organization)."""
    return res_type in _ACCESS_ROWS_NAME_IDS or "Patient" in changed_types


def _rederive(
    registry: Registry, res_type: str, res_id: str, content: bytes, rows: dict[str, Any]
) -> dict[str, Any]:
    """Access rows (compartment, pending compartment references, grants) again, from content
    whose ids or references changed after the worker indexed it (the patient a resource
    belongs to, a grant's grantee or patient, may have a new id now)."""
    derived = ("compartment", compartment.PENDING, "access_grant")
    rows = {k: v for k, v in rows.items() if k not in derived}
    parsed = orjson.loads(content)
    rows.update(access_rows(registry, res_type, res_id, parsed, rows))
    return rows
