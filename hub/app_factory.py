"""Wiring: settings -> engine -> store -> router. One place builds the object graph.

Calls: settings, engine, registry, store, router.  Called by: the CLI, the API, tests, bench.
"""

from __future__ import annotations

import sqlalchemy as sa

from hub.db.engine import create_engine
from hub.rest import FhirRouter
from hub.rest.interactions import Context
from hub.search.registry import get_registry
from hub.settings import Settings, get_settings
from hub.store import Store


def build_router(settings: Settings | None = None, engine: sa.Engine | None = None) -> FhirRouter:
    settings = settings or get_settings()
    engine = engine or create_engine(settings.database_url, echo=settings.sql_echo)
    registry = get_registry()
    return FhirRouter(
        Context(
            store=Store(engine, registry),
            registry=registry,
            base_url=settings.base_url.rstrip("/"),
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            export_dir=settings.export_dir,
        )
    )
