"""Test fixtures: a migrated database (SQLite by default, PostgreSQL when
HUB_TEST_DATABASE_URL is set) and a real uvicorn server on a free port.

CI runs the suite once per backend (see .ci/run). When HUB_TEST_DATABASE_URL names a
PostgreSQL database that is not reachable, the run fails rather than skips.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from hub.api.app import create_app
from hub.app_factory import build_router
from hub.db.engine import create_engine, normalize_url
from hub.db.migrate import downgrade, upgrade
from hub.rest import FhirRouter
from hub.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PG_URL = os.environ.get("HUB_TEST_DATABASE_URL")


def backend() -> str:
    return "postgresql" if PG_URL else "sqlite"


def _fresh_postgres(url: str, suffix: str) -> str:
    """A new empty database named after the given one plus a suffix."""
    parsed = sa.engine.make_url(normalize_url(url))
    name = f"{parsed.database}_{suffix}"
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return parsed.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def fresh_database_url(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A factory of new, migrated, empty databases on the backend under test."""

    def make(label: str) -> str:
        if PG_URL:
            url = _fresh_postgres(PG_URL, label)
        else:
            url = f"sqlite:///{tmp_path_factory.mktemp(label) / 'hub.sqlite3'}"
        upgrade(url)
        return url

    return make


@pytest.fixture(scope="session")
def database_url(fresh_database_url) -> str:  # type: ignore[no-untyped-def]
    return fresh_database_url("main")


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def router(engine: sa.Engine) -> FhirRouter:
    return build_router(Settings(database_url=str(engine.url)), engine)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    def __init__(self, database_url: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        # Limits out of the way of the functional tests (tests/test_ratelimit.py has its own).
        settings = Settings(
            database_url=database_url,
            base_url=self.base,
            rate_limit_per_ip="1000000/second",
            rate_limit_per_token="1000000/second",
        )
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server(database_url: str) -> Iterator[LiveServer]:
    with LiveServer(database_url) as server:
        yield server


@pytest.fixture()
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=live_server.base, headers={"Accept": "application/fhir+json"}, timeout=60
    ) as client:
        yield client


@pytest.fixture()
def uid() -> str:
    """A unique token, so tests sharing one database never see each other's data."""
    return uuid.uuid4().hex[:12]


__all__ = ["LiveServer", "SHARED", "backend", "downgrade"]
