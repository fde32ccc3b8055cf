"""Test fixtures: a migrated database (SQLite by default, PostgreSQL when
HUB_TEST_DATABASE_URL is set) and a real uvicorn server on a free port.

Authentication: every test server signs and verifies with one ES256 key in a temporary
directory (``KEY_FILE``; ``auth_env()`` passes it to ``hub`` subprocesses) and holds a
hub-admin account ``test-admin``. ``ADMIN_AUTH`` is that account's Authorization header,
valid on every test server; the ``http`` fixture sends it. ``make_token`` mints tokens for
other roles, ``client_for`` opens clients that send them.

CI runs the suite once per backend, both at once (``make test``, see .ci/run): every
database a run makes is named after HUB_TEST_DATABASE_URL's (PostgreSQL) or lives in the
run's temporary directory (SQLite), so the two runs never meet. When HUB_TEST_DATABASE_URL
names a PostgreSQL database that is not reachable, the run fails rather than skips.

Data sets: ``synthea_300`` imports the 300-patient Synthea set once per run; tests read it
or take writable copies (``copy(label)``), never load it again.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from consent.context import system_access
from consent.decision import Access
from hub.api.app import create_app
from hub.app_factory import build_router
from hub.auth import users
from hub.auth.principal import Role
from hub.auth.tokens import TokenService
from hub.db.engine import create_engine, normalize_url
from hub.db.migrate import downgrade, upgrade
from hub.ingest.pipeline import Importer, ImportReport
from hub.rest import FhirRouter
from hub.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PG_URL = os.environ.get("HUB_TEST_DATABASE_URL")

_KEY_DIR = Path(tempfile.mkdtemp(prefix="hub-test-keys-"))
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
KEY_FILE = _KEY_DIR / "token-signing-es256.pem"
# The master key of encryption at rest, also in the temporary directory (never var/keys):
# through the environment, so Settings() anywhere in the run and `hub` subprocesses use it.
os.environ.setdefault("MASTER_KEY_FILE", str(_KEY_DIR / "master.key"))
# Fixed, so that one token works on every test server whatever its port.
TEST_ISSUER = "http://hub.test/auth"
TEST_AUDIENCE = "http://hub.test/fhir"
ADMIN_USER = "test-admin"
ADMIN_TTL = 24 * 3600  # outlives any test session


def auth_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings of a test hub: the shared test key, issuer and audience."""
    return Settings(
        **{
            "database_url": database_url,
            "auth_signing_key_file": KEY_FILE,
            "auth_issuer": TEST_ISSUER,
            "auth_audience": TEST_AUDIENCE,
            **overrides,
        }
    )


def auth_env() -> dict[str, str]:
    """Environment for `hub serve` / `hub token` subprocesses: the same key, issuer, audience."""
    return {
        "AUTH_SIGNING_KEY_FILE": str(KEY_FILE),
        "AUTH_ISSUER": TEST_ISSUER,
        "AUTH_AUDIENCE": TEST_AUDIENCE,
    }


_ISSUER = TokenService(auth_settings("sqlite://"))  # signs only; servers check the account
ADMIN_TOKEN = _ISSUER.issue({"username": ADMIN_USER, "role": Role.ADMIN}, ttl=ADMIN_TTL)
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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


SYNTHEA_300 = SHARED / "data/synthea/bundles_r4_300_patients_gz"


def _copy_database(url: str, label: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A writable copy of the database at ``url``: PostgreSQL ``CREATE DATABASE … TEMPLATE``
    (nobody may be connected to the original), SQLite the backup API."""
    if PG_URL:
        source = sa.engine.make_url(url)
        name = f"{sa.engine.make_url(normalize_url(PG_URL)).database}_{label}"
        admin = sa.create_engine(source.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{source.database}" STRATEGY FILE_COPY'))
        admin.dispose()
        return source.set(database=name).render_as_string(hide_password=False)
    target = tmp_path_factory.mktemp(label) / "hub.sqlite3"
    source_file = sa.engine.make_url(url).database or ""
    with closing(sqlite3.connect(source_file)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return f"sqlite:///{target}"


@dataclass(frozen=True)
class LoadedSet:
    """A data set imported once per run into its own database."""

    url: str  # read it, never write it (nor serve it: a server writes audit events)
    report: ImportReport
    copy: Callable[[str], str]  # copy(label): the URL of a new writable copy


@pytest.fixture(scope="session")
def synthea_300(fresh_database_url, tmp_path_factory: pytest.TempPathFactory) -> LoadedSet:  # type: ignore[no-untyped-def]
    """The 300-patient Synthea set, imported once per run (the slowest fixture: every test
    that needs it shares this one load; tests/test_import.py checks the load itself)."""
    assert SYNTHEA_300.exists(), f"test data missing: {SYNTHEA_300} (../shared must sit beside the repo)"
    url = fresh_database_url("synthea300")
    router = build_router(Settings(database_url=url))
    with system_access("test-import"):
        report = Importer(router, workers=2).run([SYNTHEA_300])
    router.ctx.store.engine.dispose()
    return LoadedSet(url, report, lambda label: _copy_database(url, label, tmp_path_factory))


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
    def __init__(self, database_url: str, **settings: Any) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        # Limits out of the way of the functional tests (tests/test_ratelimit.py has its own).
        self.settings = auth_settings(
            database_url,
            **{
                "base_url": self.base,
                "rate_limit_per_ip": "1000000/second",
                "rate_limit_per_token": "1000000/second",
                **settings,
            },
        )
        self.app = create_app(self.settings)
        self.engine: sa.Engine = self.app.state.engine
        self.tokens: TokenService = self.app.state.tokens
        _ensure_user(self.engine, ADMIN_USER, Role.ADMIN)  # ADMIN_TOKEN's account
        self.admin_token = ADMIN_TOKEN
        self.auth = dict(ADMIN_AUTH)
        # proxy_headers off, as `hub serve` runs it: the hub alone decides whom to believe.
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def client(self, token: str | None, **kwargs: Any) -> httpx.Client:
        """A client of this server sending ``token`` (None: no Authorization header)."""
        headers = {"Accept": "application/fhir+json", **kwargs.pop("headers", {})}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.base, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def admin_client(self, **kwargs: Any) -> httpx.Client:
        return self.client(self.admin_token, **kwargs)

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
        # Its pooled connections go with it: PostgreSQL's max_connections is shared by every
        # server a test run starts.
        self.engine.dispose()


@pytest.fixture(scope="session")
def live_server(database_url: str) -> Iterator[LiveServer]:
    with LiveServer(database_url) as server:
        yield server


@pytest.fixture()
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    """A client of the shared server, as hub-admin (unrestricted by the access rules)."""
    with live_server.admin_client() as client:
        yield client


def _ensure_user(
    engine: sa.Engine,
    username: str,
    role: Role | str,
    fhir_user: str | None = None,
    organizations: Iterable[str] = (),
    scopes: str | None = None,
    password: str | None = None,
) -> users.User:
    user = users.get_user(engine, username)
    if user is None:
        try:
            user = users.add_user(
                engine,
                username,
                role,
                fhir_user=fhir_user,
                organizations=organizations,
                scopes=scopes,
                password=password,
            )
        except users.UserError:  # created meanwhile by another server of the same database
            user = users.get_user(engine, username)
            if user is None:
                raise
    return user


_engines: dict[str, tuple[sa.Engine, TokenService]] = {}


def make_token(
    target: LiveServer | str,
    *,
    role: Role | str = Role.ADMIN,
    fhir_user: str | None = None,
    organizations: Iterable[str] = (),
    scopes: str | None = None,
    username: str | None = None,
    password: str | None = None,
    ttl: int | None = None,
) -> str:
    """A token for an account of ``role`` on a test server (or a database URL), creating
    the account if needed. Without ``username`` the account is named after its fields, so
    equal calls share one. ``scopes`` are the account's allowed scopes (default: the role's)
    and the token's."""
    if isinstance(target, LiveServer):
        engine, tokens = target.engine, target.tokens
    else:
        if target not in _engines:
            engine = create_engine(target)
            _engines[target] = (engine, TokenService(auth_settings(target), engine))
        engine, tokens = _engines[target]
    organizations = tuple(organizations)
    if username is None:
        fields = repr((str(role), fhir_user, organizations, scopes))
        username = f"t-{Role(role).value}-{hashlib.sha256(fields.encode()).hexdigest()[:12]}"
    user = _ensure_user(engine, username, role, fhir_user, organizations, scopes, password)
    return tokens.issue(user, scopes=scopes, ttl=ttl)


@pytest.fixture()
def client_for(live_server: LiveServer) -> Iterator[Callable[[str | None], httpx.Client]]:
    """``client_for(token)``: a client of the shared server sending that token (None: none)."""
    clients: list[httpx.Client] = []

    def make(token: str | None) -> httpx.Client:
        client = live_server.client(token)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture()
def as_system() -> Iterator[Access]:
    """Direct store, search, import or reindex calls from a test run inside an explicit,
    named system access (fail closed: without one they raise)."""
    with system_access("test") as access:
        yield access


@pytest.fixture()
def uid() -> str:
    """A unique token, so tests sharing one database never see each other's data."""
    return uuid.uuid4().hex[:12]


# --- pages (issue 12) -------------------------------------------------------------------
# Pages tests run on PostgreSQL (+ Redis) only: the SQLite run keeps its smoke test
# (tests/test_pages_web.py), as the tests above the storage layer do.
DEMO_DIR = REPO / "demo"
CHROMIUM = Path(os.environ.get("HUB_TEST_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = REPO / "var" / "screenshots"
AXE_JS = REPO / "node_modules" / "axe-core" / "axe.min.js"
_CSRF_IN_PAGE = re.compile(r'"X-CSRF-Token": "([^"]+)"')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backend() == "sqlite":
        skip = pytest.mark.skip(reason="pages tests run on PostgreSQL (the SQLite run has the smoke test)")
        for item in items:
            if "pages" in item.keywords:
                item.add_marker(skip)


class WebHub(LiveServer):
    """A running hub with the demo data and the demo accounts (passwords ``demo-<role>``)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def load_demo(server: LiveServer) -> None:
    from hub.cli import _demo_users

    router = build_router(server.settings)
    try:
        with system_access("test-demo"):
            report = Importer(router, workers=1).run([DEMO_DIR])
        assert not report.errors, report.errors[:3]
    finally:
        router.ctx.store.engine.dispose()
    with system_access("test-demo-users"):
        _demo_users(server.engine)


@pytest.fixture(scope="session")
def web_hub(fresh_database_url) -> Iterator[WebHub]:  # type: ignore[no-untyped-def]
    """The pages tests' shared hub: demo data and accounts, loaded once per run. Tests that
    change what others see (consents, accounts) make their own or undo their change."""
    # Login limits out of the way too: every pages test logs in from 127.0.0.1 on this one
    # server (tests/test_ratelimit.py and test_pages_attacks.py test the limits themselves).
    with WebHub(fresh_database_url("web"), rate_limit_login="1000000/second") as server:
        load_demo(server)
        yield server


class _LoggedInClient(httpx.Client):
    """An httpx client already used (to log in) that may still open a ``with`` block."""

    def __enter__(self) -> _LoggedInClient:
        return self


def web_login(hub: WebHub, username: str, password: str | None = None) -> httpx.Client:
    """An httpx client logged in through the login form; ``X-CSRF-Token`` header set."""
    client = _LoggedInClient(base_url=hub.url, timeout=60, headers={"Accept": "text/html"})
    form = client.get("/login")
    token = client.cookies.get("hub_login_csrf")
    answer = client.post(
        "/login",
        data={
            "username": username,
            "password": password or f"demo-{_demo_role(username)}",
            "csrf_token": token or "",
            "grant_type": "password",
        },
    )
    assert form.status_code == 200 and answer.status_code == 303, (answer.status_code, answer.text[:300])
    account = client.get("/account")
    found = _CSRF_IN_PAGE.search(account.text)
    assert found and client.cookies.get("hub_session"), f"login as {username} failed"
    client.headers["X-CSRF-Token"] = found.group(1)
    return client


def _demo_role(username: str) -> str:
    from hub.cli import DEMO_USERS

    return next((role for name, role, *_ in DEMO_USERS if name == username), "clinician")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (``playwright install`` cannot download here).

    Per module, not per session: while Playwright's sync API runs it holds an event loop
    running in the main thread, and every later ``asyncio.run`` (connector workers, MLLP
    clients, async tests) would fail with "cannot be called from a running event loop"."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} missing: `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


def new_page(browser: Any, viewport: tuple[int, int] = (1280, 900), locale: str = "vi-VN") -> Any:
    """A page in a fresh context (its own cookies): one person per context."""
    context = browser.new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, locale=locale, timezone_id="Asia/Ho_Chi_Minh"
    )
    context.set_default_timeout(15000)
    return context.new_page()


def login_page(page: Any, hub: WebHub, username: str, password: str | None = None) -> None:
    page.goto(f"{hub.url}/login")
    page.fill("#username", username)
    page.fill("#password", password or f"demo-{_demo_role(username)}")
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_load_state("networkidle")
    assert "/login" not in page.url, f"login as {username} failed: {page.url}"


def axe_check(page: Any) -> list[dict[str, Any]]:
    """Runs axe-core (WCAG 2.1 A/AA rules) in the page; fails on serious or critical
    violations, returns all violations."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(AXE_JS.read_text(encoding="utf-8"))  # DevTools evaluation: CSP does not apply
    result = page.evaluate(
        "async () => await axe.run(document, {runOnly: {type: 'tag', values: "
        "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})"
    )
    violations: list[dict[str, Any]] = result["violations"]
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in violations
        if v.get("impact") in ("serious", "critical")
    ]
    assert not bad, f"axe on {page.url}: " + "; ".join(bad)
    return violations


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    """``var/screenshots/<name>.png`` (not committed; README pictures are chosen from these)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


__all__ = [
    "ADMIN_AUTH",
    "KEY_FILE",
    "SHARED",
    "LiveServer",
    "auth_env",
    "auth_settings",
    "backend",
    "downgrade",
    "make_token",
    "system_access",
    "WebHub",
    "web_login",
    "new_page",
    "login_page",
    "axe_check",
    "screenshot",
]
