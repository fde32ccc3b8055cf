"""Bulk Data ``$export`` (HL7 Bulk Data Access IG v2): kick-off, status, cancel, files.

Owns: the asynchronous export jobs: validating a kick-off (``Prefer: respond-async``,
``_outputFormat``, ``_type``, ``_since``, ``_typeFilter``), the ``export_job`` rows and
their states (accepted -> in-progress -> completed | failed; cancelled by DELETE), writing
one NDJSON file per resource type under ``{export_dir}/{job}/``, the completion manifest,
and resolving a file of a completed job for download.
Calls: the schema, ``hub.ops.compartment``, the search engine (``_typeFilter``), the
``_type``/``_since`` parsers of ``hub.ops.everything``.
Called by: the router (``$export``, ``$export-status``, registered by ``hub.app_factory``)
and the FastAPI route that streams
``$export-file/{job}/{Type}.ndjson`` (``hub.api.app``, via ``export_file_path``; the app
also runs ``purge_expired_at_start``).

Endpoints:

- ``GET|POST [base]/$export``, ``[base]/Patient/$export``, ``[base]/Group/{id}/$export``:
  202 + ``Content-Location: [base]/$export-status/{job}``.
- ``GET [base]/$export-status/{job}``: 202 + ``X-Progress`` while running, 200 + manifest,
  500 + OperationOutcome when the job failed, 404 for unknown or cancelled jobs.
- ``DELETE [base]/$export-status/{job}``: 202; the files are removed, later polls get 404.
- ``GET [base]/$export-file/{job}/{Type}.ndjson``: ``application/fhir+ndjson``, streamed.

Files: private (directories 0700, files 0600, whatever the umask) and plaintext (the
requester's copy; docs/storage.md §8). A job and its files are removed
``EXPORT_RETENTION_HOURS`` after it finished (``purge_expired``: at server start, and on
kick-offs and polls at most once a minute; the status and file endpoints answer 410 for an
expired job, then 404).

Scope: system = every stored type (or ``_type``); Patient = the Patient compartments of all
patients; Group = the compartments of the Group's ``member.entity`` Patients. Deleted
resources are never exported. ``transactionTime`` is the kick-off instant: the job reads one
snapshot taken after it, so nothing modified up to it is missed (a client passing it as the
next ``_since`` may see a few resources twice, never miss one).

Where jobs run: in this process, on a small thread pool (``_EXECUTOR``), which suits the
embedded single-process default. When Redis is configured, an arq worker takes this role
(a later issue): the kick-off will enqueue ``run_job(job_id)`` instead of submitting it
here, and the status/file endpoints stay as they are because all state is in
``export_job`` and the export directory (which must then be shared storage). Jobs left
``accepted``/``in-progress`` by a process that died are not resumed yet.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import orjson
import sqlalchemy as sa

from consent import context as access_context
from hub.crypto.envelope import open_content
from hub.crypto.keys import using as using_keys
from hub.db.schema import export_job, idx_reference, resource
from hub.errors import FhirError, Issue, bad_request, gone, not_found, operation_outcome
from hub.ops import compartment
from hub.ops.everything import AUDIT_TRAIL_TYPES, since_param, types_param
from hub.rest.interactions import link_base
from hub.rest.messages import FhirRequest, FhirResponse
from hub.search import engine as search_engine
from hub.search.query import RESULT_PARAMS
from hub.store.records import as_utc, instant, now

if TYPE_CHECKING:
    from consent.decision import Access
    from hub.auth.principal import Principal
    from hub.rest.interactions import Context
    from hub.rest.router import FhirRouter
    from hub.search.registry import Registry
    from hub.store import Store

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
_OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
_PARAMS = frozenset({"_outputFormat", "_type", "_since", "_typeFilter", "_format", "_pretty"})
_STREAM_ROWS = 1000  # rows per fetch from the database cursor
_CANCEL_CHECK_ROWS = 20_000  # how often a running job looks for a DELETE of itself
_RUNNING = ("accepted", "in-progress")

# Two workers: one long export does not block a small one, and the DB keeps most of the box.
_EXECUTOR = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hub-export")


@dataclass
class ExportSpec:
    """What a job exports; stored as ``export_job.parameters`` (JSON)."""

    level: str  # system | patient | group
    types: list[str]
    directory: str
    group_id: str | None = None
    since: str | None = None  # instant
    type_filters: dict[str, list[str]] = field(default_factory=dict)  # type -> search queries, ORed
    owner: str | None = None  # the principal (subject) who kicked it off: only they poll and download
    # Hours after the job finished that it and its files are kept (EXPORT_RETENTION_HOURS at
    # kick-off); then they are removed and the status URL answers 410, later 404.
    retention_hours: float | None = None
    # Who asked and why (``requester_of``): the job re-decides their Access when it runs, in
    # this process or another, so it never sees more than their searches would.
    requester: dict[str, Any] | None = None
    # The FHIR base the kick-off was sent to (BASE_URL, else where the client connected): the
    # file URLs of the manifest point there. None (jobs stored before it): the configured base.
    base_url: str | None = None


# --- kick-off ------------------------------------------------------------------------------


def export_system(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    return _kick_off(router, request, "system", None, extra)


def export_patients(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    return _kick_off(router, request, "patient", None, extra)


def export_group(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    return _kick_off(router, request, "group", res_id, extra)


def _kick_off(
    router: FhirRouter, request: FhirRequest, level: str, group_id: str | None, extra: list[str]
) -> FhirResponse:
    ctx = router.ctx
    if extra:
        raise not_found(f"No FHIR interaction at '{request.path}'")
    purge_expired(ctx, force=False)
    if request.prefer("respond-async") is None:
        raise bad_request("$export is asynchronous: send the header 'Prefer: respond-async'")
    lenient = request.prefer("handling") == "lenient"
    params = _parameters(request)
    unknown = sorted({k for k, _ in params} - _PARAMS)
    if unknown and not lenient:
        raise bad_request(f"$export does not support the parameter(s) {', '.join(unknown)}")
    values: dict[str, list[str]] = {}
    for key, value in params:
        values.setdefault(key, []).append(value)
    # An unencoded "+" in a URL arrives as a space: "application/fhir ndjson".
    formats = [f.replace(" ", "+") for f in values.get("_outputFormat", [])]
    if any(f not in _OUTPUT_FORMATS for f in formats):
        raise bad_request(f"_outputFormat must be one of {', '.join(sorted(_OUTPUT_FORMATS))}")
    since = since_param(values.get("_since", []))
    types = _export_types(ctx.registry, level, types_param(values.get("_type", [])), lenient)
    base_url = link_base(ctx, request)
    type_filters = _type_filters(ctx, values.get("_typeFilter", []), types, lenient, base_url)

    job_id = uuid.uuid4().hex
    directory = _export_dir(ctx) / job_id
    spec = ExportSpec(
        level=level,
        types=types,
        directory=str(directory),
        group_id=group_id,
        since=instant(since) if since is not None else None,
        type_filters=type_filters,
        owner=request.principal.subject if request.principal else None,
        retention_hours=ctx.export_retention_hours,
        requester=requester_of(access_context.required()),
        base_url=base_url,
    )
    query = f"?{urlencode(request.query)}" if request.query else ""
    with ctx.store.write() as conn:
        if group_id is not None:
            ctx.store.get(conn, "Group", group_id)  # 404 unknown, 410 deleted
        conn.execute(
            export_job.insert().values(
                id=job_id,
                status="accepted",
                request_url=f"{spec.base_url}/{request.path.strip('/')}{query}",
                parameters=asdict(spec),
                created=now(),
            )
        )
    # The job runs later on another thread (or process): it rebuilds the requester's Access
    # from the stored requester, so an export never sees more than their searches would.
    _EXECUTOR.submit(_run_as_requester, ctx, job_id)
    outcome = operation_outcome([Issue("informational", f"Export job {job_id} accepted", "information")])
    return FhirResponse(
        202, orjson.dumps(outcome), {"Content-Location": f"{spec.base_url}/$export-status/{job_id}"}
    )


def _parameters(request: FhirRequest) -> list[tuple[str, str]]:
    """The query, plus the primitive parameters of a POSTed Parameters resource."""
    pairs = list(request.query)
    if request.method == "POST" and request.body:
        body = request.json_body()
        if body.get("resourceType") != "Parameters":
            raise bad_request("POST $export takes a Parameters resource")
        for parameter in body.get("parameter", []):
            value = next((v for k, v in parameter.items() if k.startswith("value")), None)
            if not isinstance(value, str):
                raise bad_request(f"Parameter '{parameter.get('name')}' needs a primitive value[x]")
            pairs.append((str(parameter.get("name")), value))
    return pairs


def _export_dir(ctx: Context) -> Path:
    return Path(ctx.export_dir)


def _export_types(registry: Registry, level: str, requested: list[str] | None, lenient: bool) -> list[str]:
    """The types to write, sorted. An empty list for a system export means "every stored type"."""
    if level == "system":
        return requested or []
    allowed = set(compartment.compartment_types(registry))
    if requested is None:
        return sorted(allowed - AUDIT_TRAIL_TYPES)
    outside = [t for t in requested if t not in allowed]
    if outside and not lenient:
        raise bad_request(
            f"Outside the Patient compartment (or not supported): {', '.join(outside)}; "
            "a Patient or Group export cannot include them"
        )
    return [t for t in requested if t in allowed]


def _type_filters(
    ctx: Context, values: list[str], types: list[str], lenient: bool, base_url: str
) -> dict[str, list[str]]:
    """``_typeFilter`` values (``Type?query``) by type, each checked by parsing it now."""
    filters: dict[str, list[str]] = {}
    for raw in (v for value in values for v in _split_filters(value)):
        res_type, _, query = raw.partition("?")
        if not ctx.registry.supports(res_type) or not query:
            raise bad_request(f"_typeFilter '{raw}' must be 'Type?criteria' for a supported type")
        if types and res_type not in types:
            if lenient:
                continue
            raise bad_request(f"_typeFilter names {res_type}, which _type does not include")
        with using_keys(ctx.store.keys()):  # predicates of blinded parameters hash with its keys
            parsed = _parse_filter(ctx, res_type, query, base_url)
        if any(name.partition(":")[0] in RESULT_PARAMS for name, _ in parsed.used):
            raise bad_request(f"_typeFilter '{raw}' may only hold search criteria")
        filters.setdefault(res_type, []).append(query)
    return filters


def _split_filters(value: str) -> list[str]:
    """Several filters may share one _typeFilter, comma-separated. A piece that does not start
    with ``Type?`` continues the previous filter (an OR-list of values such as ``code=a,b``)."""
    parts: list[str] = []
    for piece in value.split(","):
        if parts and "?" not in piece.split("=")[0]:
            parts[-1] += "," + piece  # an OR-list of the previous criteria, not a new filter
        else:
            parts.append(piece)
    return [p for p in parts if p]


def _parse_filter(ctx: Context, res_type: str, query: str, base_url: str) -> search_engine.SearchQuery:
    """A ``_typeFilter`` query; references under ``base_url`` (the kick-off's) are local."""
    return search_engine.parse(
        ctx.registry, res_type, parse_qsl(query, keep_blank_values=True), base_url=base_url
    )


# --- the job -------------------------------------------------------------------------------


def requester_of(access: Access) -> dict[str, Any]:
    """What a background job needs to decide its requester's Access again later."""
    principal = access.principal
    return {
        "subject": principal.subject,
        "role": principal.role.value,
        "scopes": str(principal.scopes),
        "fhir_user": principal.fhir_user,
        "organizations": list(principal.organizations),
        "patient": principal.patient,
        "token_id": principal.token_id,
        "client_id": principal.client_id,
        "issuer": principal.issuer,
        "purpose": access.purpose,
        "policy": access.policy,
    }


def requester_access(conn: sa.Connection, registry: Registry, requester: dict[str, Any]) -> Access:
    """The requester's Access as of now (grants, consents and break-glass in force now)."""
    from consent.decision import decide
    from hub.auth.principal import Principal, Role
    from hub.auth.scopes import ScopeSet

    principal = Principal(
        subject=str(requester["subject"]),
        role=Role(requester["role"]),
        scopes=ScopeSet.parse(str(requester["scopes"])),
        fhir_user=requester.get("fhir_user"),
        organizations=tuple(requester.get("organizations") or ()),
        patient=requester.get("patient"),
        token_id=requester.get("token_id"),
        client_id=requester.get("client_id"),
        issuer=requester.get("issuer"),
    )
    return decide(
        conn,
        principal,
        registry,
        purpose=requester.get("purpose"),
        policy=str(requester.get("policy", "moh")),
    )


def _run_as_requester(ctx: Context, job_id: str) -> None:
    """Run a job as the requester stored with it; a job without one fails (fail closed)."""
    try:
        with ctx.store.read() as conn:
            row = conn.execute(sa.select(export_job.c.parameters).where(export_job.c.id == job_id)).first()
            requester = (row.parameters or {}).get("requester") if row is not None else None
            access = None if requester is None else requester_access(conn, ctx.registry, requester)
        if access is None:
            if row is not None:
                _set_status(ctx.store, job_id, "failed", error="The job names no requester")
            return
    except Exception as exc:  # noqa: BLE001  (the requester may no longer be allowed)
        log.exception("export job %s: could not decide its requester's access", job_id)
        _set_status(ctx.store, job_id, "failed", error=f"{type(exc).__name__}: {exc}")
        return
    with access_context.serving(access):
        run_job(ctx, job_id)
    if ctx.disclosed is not None:
        ctx.disclosed(access, f"$export job {job_id}")


def run_job(ctx: Context, job_id: str) -> None:
    """Run one accepted job to completion (or failure, or until it is cancelled)."""
    store = ctx.store
    directory: Path | None = None
    try:
        with store.write() as conn:
            row = conn.execute(sa.select(export_job).where(export_job.c.id == job_id)).one_or_none()
            if row is None or row.status != "accepted":
                return
            spec = ExportSpec(**row.parameters)
            if not spec.types:
                # Resolved now, so progress can say "k of n"; types first stored after the
                # kick-off only hold resources newer than transactionTime.
                spec.types = _stored_types(conn)
            conn.execute(
                export_job.update()
                .where(export_job.c.id == job_id)
                .values(status="in-progress", parameters=asdict(spec), output=[])
            )
        directory = Path(spec.directory)
        _private_dir(directory)
        outputs = _write_files(ctx, job_id, spec, directory)
        done = outputs is not None and _set_status(
            store, job_id, "completed", output=[o for o in outputs if o["count"]]
        )
        if not done:
            _remove(directory)  # cancelled meanwhile
    except Exception as exc:  # noqa: BLE001  (any failure must reach the client as "failed")
        log.exception("export job %s failed", job_id)
        if directory is not None:
            _remove(directory)
        try:
            _set_status(store, job_id, "failed", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001  (the database itself may be what failed)
            log.exception("export job %s: could not record the failure", job_id)


def _write_files(ctx: Context, job_id: str, spec: ExportSpec, directory: Path) -> list[dict[str, Any]] | None:
    """Write one file per type. The output entries of every type done (count 0 included: the
    progress report counts them), or None when the job was cancelled."""
    store = ctx.store
    outputs: list[dict[str, Any]] = []
    # The job runs on its own thread: bind the database's keys for _typeFilter predicates.
    with _snapshot(store) as conn, using_keys(store.keys()):
        for res_type in spec.types:
            if _cancelled(store, job_id):
                return None
            path = directory / f"{res_type}.ndjson"
            written = _write_type(ctx, conn, job_id, spec, res_type, path)
            if written is None:
                return None
            if not written:
                path.unlink(missing_ok=True)  # the manifest lists no empty files
            url = f"{spec.base_url or ctx.base_url}/$export-file/{job_id}/{path.name}"
            outputs.append({"type": res_type, "url": url, "count": written})
            _set_progress(store, job_id, outputs)
    return outputs


def _write_type(
    ctx: Context, conn: sa.Connection, job_id: str, spec: ExportSpec, res_type: str, path: Path
) -> int | None:
    """Stream the type's rows into its file, as stored, one per line. None when cancelled."""
    statement = sa.select(resource.c.pid, resource.c.res_id, resource.c.content).where(
        resource.c.res_type == res_type, resource.c.deleted.is_(False), *_conditions(ctx, spec, res_type)
    )
    visible = access_context.visible_clause(resource)
    if visible is not None:
        statement = statement.where(visible)
    written, next_check = 0, _CANCEL_CHECK_ROWS
    with _private_file(path) as out:
        result = conn.execute(statement.execution_options(stream_results=True, yield_per=_STREAM_ROWS))
        for batch in result.partitions():
            access_context.report(row.pid for row in batch)
            # Encrypted rows are written decrypted: the export is the client's plaintext copy.
            out.write(b"\n".join(open_content(_bytes(r.content), res_type, r.res_id) for r in batch) + b"\n")
            written += len(batch)
            if written >= next_check:
                next_check += _CANCEL_CHECK_ROWS
                if _cancelled(ctx.store, job_id):
                    result.close()
                    return None
    return written


def _bytes(content: str | bytes) -> bytes:
    return content if isinstance(content, bytes) else content.encode()


def _conditions(ctx: Context, spec: ExportSpec, res_type: str) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if spec.since is not None:
        since = since_param([spec.since])
        assert since is not None
        conditions.append(resource.c.last_updated >= since)
    filters = spec.type_filters.get(res_type)
    if filters:
        base_url = spec.base_url or ctx.base_url
        parsed = [_parse_filter(ctx, res_type, q, base_url) for q in filters]
        conditions.append(sa.or_(*(sa.and_(*p.conditions) for p in parsed)))
    if spec.level == "patient":
        members = compartment.member_pids(ctx.registry, compartment.all_patient_ids(), (res_type,))
        conditions.append(resource.c.pid.in_(members))
    elif spec.level == "group":
        assert spec.group_id is not None
        members = compartment.member_pids(
            ctx.registry, group_patient_ids(ctx.registry, spec.group_id), (res_type,)
        )
        conditions.append(resource.c.pid.in_(members))
    return conditions


def group_patient_ids(registry: Registry, group_id: str) -> sa.Select[Any]:
    """Ids of the non-deleted Patients a Group lists in ``member.entity`` (from the index)."""
    member = registry.get("Group", "member")
    assert member is not None
    group_pid = sa.select(resource.c.pid).where(
        resource.c.res_type == "Group", resource.c.res_id == group_id, resource.c.deleted.is_(False)
    )
    listed = sa.select(idx_reference.c.target_id).where(
        idx_reference.c.pid.in_(group_pid),
        idx_reference.c.hash_identity == member.hash_identity,
        idx_reference.c.target_type == "Patient",
    )
    return compartment.all_patient_ids().where(resource.c.res_id.in_(listed))


def _stored_types(conn: sa.Connection) -> list[str]:
    """Every res_type in ``resource``, by a loose index scan (one seek per type, not a full scan)."""
    seen = sa.select(sa.func.min(resource.c.res_type).label("res_type")).cte("seen", recursive=True)
    following = (
        sa.select(sa.func.min(resource.c.res_type))
        .where(resource.c.res_type > seen.c.res_type)
        .scalar_subquery()
    )
    seen = seen.union_all(sa.select(following.label("res_type")).where(seen.c.res_type.is_not(None)))
    found = [t for (t,) in conn.execute(sa.select(seen.c.res_type)) if t is not None]
    return [t for t in found if t not in AUDIT_TRAIL_TYPES]


@contextmanager
def _snapshot(store: Store) -> Iterator[sa.Connection]:
    """One read transaction for the whole job, so every file shows the same moment."""
    conn = store.engine.connect()
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    with conn, conn.begin():
        if postgres:
            # Every row is read, so plan cursors for the whole result rather than the first
            # 10 % (the default picks index walks that made a Patient export 4x slower).
            conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
        yield conn


# --- job state -----------------------------------------------------------------------------


def _set_status(store: Store, job_id: str, status: str, **values: Any) -> bool:
    """Move a running job to a final state; False when it was cancelled (or finished) already."""
    with store.write() as conn:
        result = conn.execute(
            export_job.update()
            .where(export_job.c.id == job_id, export_job.c.status.in_(_RUNNING))
            .values(status=status, finished=now(), **values)
        )
    return result.rowcount == 1


def _set_progress(store: Store, job_id: str, outputs: list[dict[str, Any]]) -> None:
    with store.write() as conn:
        conn.execute(
            export_job.update()
            .where(export_job.c.id == job_id, export_job.c.status == "in-progress")
            .values(output=outputs)
        )


def _cancelled(store: Store, job_id: str) -> bool:
    with store.read() as conn:
        status = conn.execute(sa.select(export_job.c.status).where(export_job.c.id == job_id)).scalar()
    return status not in _RUNNING


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


# --- private files ---------------------------------------------------------------------------
# The files hold decrypted records (the client's plaintext copy, see docs/storage.md): only
# the hub's own user may read them, whatever the process umask. Directories are 0700 (the
# export root too), files 0600 from the moment they exist (os.open with the mode, then an
# explicit chmod, since the umask can only remove bits and an existing file keeps its mode).

_DIR_MODE, _FILE_MODE = 0o700, 0o600


def _private_dir(directory: Path) -> None:
    for folder in (directory.parent, directory):
        folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(folder, _DIR_MODE)


@contextmanager
def _private_file(path: Path) -> Iterator[Any]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, _FILE_MODE)
    try:
        os.fchmod(descriptor, _FILE_MODE)
    except BaseException:
        os.close(descriptor)
        raise
    with os.fdopen(descriptor, "wb", buffering=1 << 20) as out:
        yield out


# --- expiry ----------------------------------------------------------------------------------
# A finished job (completed, failed or cancelled) is kept ``retention_hours`` after
# ``finished`` (its own, from the kick-off, or the hub's if shorter); a job still marked
# running that was created longer ago than that was left by a process that died. Either way
# its files and row are removed: by ``purge_expired`` (at server start and, at most once a
# minute, when jobs are created or polled) and, for the job asked about, by the status and
# file endpoints themselves, which answer 410 for it.

_SWEEP_SECONDS = 60.0
_sweep_lock = threading.Lock()
_last_sweep: dict[str, float] = {}  # database URL -> monotonic time of the last sweep


def _retention(row: Any, hub_hours: float) -> float:
    own = (row.parameters or {}).get("retention_hours")
    return hub_hours if own is None else min(float(own), hub_hours)


def _expired(row: Any, hub_hours: float, moment: datetime) -> bool:
    """Whether the job is past its retention: counted from ``finished``, or from ``created``
    for a job never finished (left running by a process that died)."""
    hours = _retention(row, hub_hours)
    stamp = row.created if row.status in _RUNNING or row.finished is None else row.finished
    return float(as_utc(stamp).timestamp()) + hours * 3600 < moment.timestamp()


def _forget(store: Store, row: Any) -> None:
    """Remove an expired job: its files first, then its row (later polls: 404)."""
    _remove(Path(row.parameters["directory"]))
    with store.write() as conn:
        conn.execute(export_job.delete().where(export_job.c.id == row.id))


def purge_expired(ctx: Context, *, force: bool = True) -> int:
    """Remove every expired job and its files; the number removed. Without ``force`` it
    runs at most once per ``_SWEEP_SECONDS`` per database in this process."""
    key = str(ctx.store.engine.url)
    with _sweep_lock:
        if not force and time.monotonic() - _last_sweep.get(key, -_SWEEP_SECONDS) < _SWEEP_SECONDS:
            return 0
        _last_sweep[key] = time.monotonic()
    moment = now()
    cutoff = moment - timedelta(hours=ctx.export_retention_hours)
    with ctx.store.read() as conn:
        rows = conn.execute(
            sa.select(export_job).where(
                sa.or_(
                    export_job.c.finished < cutoff,
                    sa.and_(export_job.c.finished.is_(None), export_job.c.created < cutoff),
                )
            )
        ).all()
    removed = 0
    for row in rows:
        if _expired(row, ctx.export_retention_hours, moment):
            try:
                _forget(ctx.store, row)
                removed += 1
            except Exception:  # noqa: BLE001  (one job's failure must not stop the sweep)
                log.exception("export job %s: could not remove it after expiry", row.id)
    return removed


def purge_expired_at_start(ctx: Context) -> None:
    """The sweep at server start; a database not migrated yet (or unreachable) is no reason
    not to start: the next kick-off or poll sweeps again."""
    try:
        removed = purge_expired(ctx)
    except Exception:  # noqa: BLE001
        log.warning("could not remove expired $export jobs at start", exc_info=True)
        return
    if removed:
        log.info("removed %d expired $export job(s) and their files", removed)


def _expired_error(job_id: str) -> FhirError:
    return gone(f"Export job '{job_id}' expired: its files are removed after its retention period")


# --- status, cancel, files -----------------------------------------------------------------


def export_status(
    router: FhirRouter, request: FhirRequest, res_type: str | None, res_id: str | None, extra: list[str]
) -> FhirResponse:
    if len(extra) != 1:
        raise not_found("Use $export-status/{job id}")
    job_id = extra[0]
    ctx = router.ctx
    store = ctx.store
    purge_expired(ctx, force=False)
    with store.read() as conn:
        row = conn.execute(sa.select(export_job).where(export_job.c.id == job_id)).one_or_none()
    if row is None or row.status == "cancelled" or not _owned_by(row, request.principal):
        raise not_found(f"No export job '{job_id}'")
    if _expired(row, ctx.export_retention_hours, now()):
        _forget(store, row)
        raise _expired_error(job_id)
    if request.method == "DELETE":
        return _cancel(store, row)
    if row.status in _RUNNING:
        return FhirResponse(202, None, {"X-Progress": _progress(row), "Retry-After": "2"})
    if row.status == "failed":
        return FhirResponse(
            500,
            FhirError(500, [Issue("exception", f"Export job {job_id} failed: {row.error}")]).outcome_bytes(),
        )
    manifest = {
        "transactionTime": instant(as_utc(row.created)),
        "request": row.request_url,
        "requiresAccessToken": True,
        "output": row.output or [],
        "error": [],
    }
    return FhirResponse(200, orjson.dumps(manifest), {"Content-Type": "application/json"})


def _progress(row: Any) -> str:
    if row.status == "accepted":
        return "queued"
    done, total = len(row.output or []), len(row.parameters.get("types") or [])
    return f"{done} of {total} resource types exported"


def _cancel(store: Store, row: Any) -> FhirResponse:
    with store.write() as conn:
        conn.execute(
            export_job.update().where(export_job.c.id == row.id).values(status="cancelled", finished=now())
        )
    # A running job notices the status and removes what it writes after this, too.
    _remove(Path(row.parameters["directory"]))
    outcome = operation_outcome([Issue("informational", f"Export job {row.id} cancelled", "information")])
    return FhirResponse(202, orjson.dumps(outcome))


def _owned_by(row: Any, principal: Principal | None) -> bool:
    """Jobs are private to whoever started them (another user's job reads as unknown)."""
    owner = row.parameters.get("owner")
    return owner is None or (principal is not None and principal.subject == owner)


def export_file_path(store: Store, job_id: str, file_name: str, principal: Principal | None = None) -> Path:
    """The file of a completed job named in its manifest; FhirError 404 otherwise.

    The name is matched against the job's output, never joined blindly onto the directory.
    """
    with store.read() as conn:
        row = conn.execute(sa.select(export_job).where(export_job.c.id == job_id)).one_or_none()
    if row is None or row.status != "completed" or not _owned_by(row, principal):
        raise not_found(f"No completed export job '{job_id}'")
    if _expired(row, float("inf"), now()):  # by the job's own retention
        _forget(store, row)
        raise _expired_error(job_id)
    names = {f"{entry['type']}.ndjson" for entry in row.output or []}
    path = Path(row.parameters["directory"]) / file_name
    if file_name not in names or not path.is_file():
        raise not_found(f"Export job '{job_id}' has no file '{file_name}'")
    return path
