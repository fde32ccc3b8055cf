"""Wiring: settings -> engine -> store -> router. One place builds the object graph.

Calls: settings, engine, key configuration (hub.crypto), registry, store, router, and the
operations it registers (``hub.ops``).  Called by: the CLI, the API, tests, bench.
"""

from __future__ import annotations

import socket

import sqlalchemy as sa

from hub.audit.trail import AuditTrail
from hub.crypto.keys import configure as configure_keys
from hub.db.engine import create_engine
from hub.ops import everything, export
from hub.rest import FhirRouter
from hub.rest.gate import Gate
from hub.rest.interactions import Context
from hub.rest.operations import Operations
from hub.search.registry import get_registry
from hub.settings import Settings, get_settings
from hub.store import Store

LOCAL_BASE_URL = "http://127.0.0.1:8000/fhir"


def audit_identity(settings: Settings) -> str:
    """How AuditEvents name this hub (source.site, observer, network address): BASE_URL, else
    a URN of the host name: no request's Host header becomes the hub's identity."""
    return settings.base_url.rstrip("/") if settings.base_url else f"urn:hub:{socket.gethostname()}"


def build_router(settings: Settings | None = None, engine: sa.Engine | None = None) -> FhirRouter:
    settings = settings or get_settings()
    engine = engine or create_engine(settings.database_url, echo=settings.sql_echo)
    # The database's keyring (master key, encrypt_at_rest), built once here and held by the store.
    keyring = configure_keys(settings, engine)
    registry = get_registry()
    # References under BASE_URL are this hub's (compartment rules); without it only relative
    # ones are, whatever host a request came in by, so `hub reindex` resolves them the same.
    store = Store(engine, registry, settings.base_url, keyring)
    # Requests from the web adapter carry their own base (BASE_URL or where they reached us);
    # this one is for the rest (the CLI, tests driving the router).
    base_url = (settings.base_url or LOCAL_BASE_URL).rstrip("/")
    gate = Gate(
        store,
        AuditTrail(store, audit_identity(settings)),
        policy=settings.consent_policy,
        break_glass_minutes=settings.break_glass_minutes,
    )
    context = Context(
        store=store,
        registry=registry,
        base_url=base_url,
        default_count=settings.default_page_size,
        max_count=settings.max_page_size,
        export_dir=settings.export_dir,
        export_retention_hours=settings.export_retention_hours,
        max_bundle_entries=settings.max_bundle_entries,
        disclosed=gate.disclosed,
    )
    return FhirRouter(context, gate, operations())


def operations() -> Operations:
    """The FHIR operations the hub answers, registered here and nowhere else."""
    return (
        Operations()
        .register("everything", "instance", everything.patient_everything, "Patient", methods=("GET",))
        .register("everything", "type", everything.all_patients_everything, "Patient", methods=("GET",))
        .register("export", "system", export.export_system)
        .register("export", "type", export.export_patients, "Patient")
        .register("export", "instance", export.export_group, "Group")
        .register(
            "export-status",
            "system",
            export.export_status,
            methods=("GET", "DELETE"),
            permission=None,  # only the job's owner: checked by the handler
            arguments=("job_id",),
        )
    )
