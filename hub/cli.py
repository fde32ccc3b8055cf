"""The ``hub`` command line.

Owns: the commands an operator runs: serve, db upgrade, import, demo, registry, audit, users, token, keys.
Commands that read or change stored resources run inside an explicit, named system access
(``consent.context.system_access("cli-<command>")``: nothing reads unfiltered by default), and
those that touch citizens' data (import, demo loading, reindex, keys rotate --reencrypt)
write one AuditEvent per command through the audit trail (``_system_command``).
Calls: the app factory, migrations, the import pipeline, consent.context, the audit trail,
uvicorn.  Called by: people, make, CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connectors.cli import app as connectors_app
from hub.settings import REPO_ROOT, get_settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from consent.decision import Access

app = typer.Typer(help="Vietnam e-health integration hub", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations)", no_args_is_help=True)
registry_app = typer.Typer(help="The search-parameter registry in fhir/", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(registry_app, name="registry")
keys_app = typer.Typer(help="Encryption at rest: master key and data keys", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(help="The hub's own accounts (people and service accounts)", no_args_is_help=True)
app.add_typer(users_app, name="users")
audit_app = typer.Typer(help="The audit trail's hash chain", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(connectors_app, name="connectors")  # connectors/cli.py (its imports are lazy)
console = Console()

DEMO_DIR = REPO_ROOT / "demo"


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(
        0, help="Worker processes; 0: one per core on PostgreSQL. SQLite: always one (one writer)"
    ),
    access_log: bool = typer.Option(
        False, "--access-log/--no-access-log", help="Log a line per request (the audit trail records each)"
    ),
) -> None:
    """Serve the FHIR API at http://HOST:PORT/fhir."""
    import uvicorn

    settings = get_settings()
    count = worker_count(settings.database_url, workers)
    base = settings.base_url or f"http://{host}:{port}/fhir"  # unset: links follow each request
    console.print(f"FHIR base: {base}  (database: {_safe_url()}; {count} worker{'s' * (count > 1)})")
    if workers > 1 and count == 1:
        console.print("SQLite has one writer: serving with one worker process")
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 and
    # rewrite the client address; the hub decides whom to believe (TRUSTED_PROXIES).
    # loop/http "auto": uvloop and httptools (uvicorn[standard]) when installed.
    uvicorn.run(
        "hub.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=count,
        log_level="info",
        access_log=access_log,
        proxy_headers=False,
    )


def worker_count(database_url: str, requested: int = 0) -> int:
    """How many processes ``hub serve`` runs: SQLite one (a single writer; more processes
    would only queue behind its lock), PostgreSQL ``requested`` or, for 0, one per core
    this process may run on."""
    from hub.db.engine import is_sqlite

    if is_sqlite(database_url):
        return 1
    if requested > 0:
        return requested
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from hub.db.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    console.print(f"[green]Database at {revision}[/] ({_safe_url()})")


@app.command("import")
def import_(
    paths: list[Path] = typer.Argument(..., exists=True, help="Bundles (.json), .ndjson, .gz, or folders"),
    workers: int = typer.Option(0, help="Validation processes (0 = one per core)"),
) -> None:
    """Load FHIR content: transaction/batch Bundles, NDJSON, gzip files and folders of them."""
    with _system_command("import", " ".join(str(p) for p in paths)):
        report = _import(paths, workers or None)
    raise typer.Exit(code=1 if report.errors else 0)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    serve_after: bool = typer.Option(True, "--serve/--no-serve", help="Start the server after loading"),
) -> None:
    """Migrate, load the demo patients (idempotent), and serve."""
    from hub.app_factory import build_router
    from hub.db.migrate import upgrade
    from hub.store import reader

    upgrade(get_settings().database_url)
    router = build_router()
    with system_access("cli-demo"), router.ctx.store.read() as conn:
        # Resources of each version of the demo file: a database loaded with an older one gets the
        # file again (PUTs, so what was there is updated, never doubled).
        sentinels = ["vn-demo-patient-1", "vn-demo-practitioner-1", "vn-demo-hoa-docref-discharge"]
        already = len(reader.resolve_bare_ids(conn, sentinels)) == len(sentinels)
    if already:
        console.print("Demo data already loaded.")
    else:
        with _system_command("demo", str(DEMO_DIR)):
            _import([DEMO_DIR], None)
    with system_access("cli-demo-users"):
        _demo_users(router.ctx.store.engine)
    if serve_after:
        serve(host=host, port=port, workers=0, access_log=False)


@app.command()
def reindex(
    resource_type: str = typer.Option(None, "--type", help="Only this resource type"),
) -> None:
    """Rebuild the search indexes of current resources (after the registry changed)."""
    from hub.app_factory import build_router
    from hub.store.reindex import reindex as run_reindex

    store = build_router().ctx.store
    with (
        _system_command("reindex", f"_type={resource_type}" if resource_type else None),
        Progress(
            TextColumn("[bold]Reindexing"),
            TextColumn("{task.completed} resources"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("reindex", total=None)
        report = run_reindex(store, resource_type, lambda n: progress.update(task, advance=n))
    console.print(f"[green]Reindexed {report.resources} resources ({report.rows} index rows)[/]")


@registry_app.command("import-official")
def registry_import_official(
    bundle: Path = typer.Argument(..., exists=True, help="The official R4 search-parameters.json"),
) -> None:
    """Rewrite fhir/search-parameters.json from the official definitions."""
    from hub.search.registry import import_official

    console.print(f"Kept {import_official(bundle)} search parameters")


@audit_app.command("verify")
def audit_verify(
    expect_head: str = typer.Option(
        None,
        "--expect-head",
        help="A head printed earlier by `hub audit head`; the chain must pass through it",
    ),
) -> None:
    """Check every AuditEvent against the hash chain; exit 1 on any problem.

    Removing the newest entries leaves a consistent shorter chain: only a head kept outside
    the database (--expect-head) shows that.
    """
    from hub.audit.verify import verify_chain

    engine = _engine()
    try:
        report = verify_chain(engine, expect_head)
    finally:
        engine.dispose()
    console.print(f"Audit chain of {_safe_url()}: {report.verified} entries, head seq {report.head_seq}")
    console.print(f"head {report.head}")
    if report.anchored_at is not None and expect_head:
        console.print(f"expected head found at seq {report.anchored_at}")
    if report.ok:
        console.print(f"[green]Intact: {report.verified} entries verified[/]")
        raise typer.Exit(code=0)
    table = Table("seq", "kind", "AuditEvent", "detail", title=f"{report.problem_count} problems")
    for problem in sorted(report.problems, key=lambda p: (p.seq is None, p.seq or 0))[:50]:
        table.add_row(str(problem.seq or ""), problem.kind, problem.res_id or "", problem.detail)
    console.print(table)
    first = report.first_broken
    if first is not None:
        where = f"seq {first.seq}" if first.seq is not None else "outside the chain"
        console.print(f"[red]Broken: first problem at {where} ({first.kind})[/]")
    raise typer.Exit(code=1)


@audit_app.command("head")
def audit_head() -> None:
    """Print the chain head (hex) to keep outside the database, for --expect-head."""
    from hub.audit.verify import head

    engine = _engine()
    try:
        _, value = head(engine)
    finally:
        engine.dispose()
    typer.echo(value)


# --- accounts and tokens ----------------------------------------------------------------------

# `hub demo` accounts: (username, role, fhirUser, organizations: Organization ids, as `hub_orgs`
# and the consent grants name them). Their password is "demo-<role>": for the demo database only,
# printed by `hub demo`. demo/README.md says who sees what.
DEMO_USERS: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("admin", "hub-admin", None, ()),
    # The commune station's doctor: Hoa's family doctor (generalPractitioner), her station manages her record.
    ("bs.tuan", "clinician", "Practitioner/vn-demo-practitioner-1", ("vn-demo-org-tyt-iakrai",)),
    # The provincial hospital's doctor: sees Hoa's ordinary data through her Consent (until 31/12/2027).
    ("bs.ha", "clinician", "Practitioner/vn-demo-practitioner-2", ("vn-demo-org-bvdk-gialai",)),
    # The An Khê hospital's doctor: nothing of Hoa until she consents, or by break-glass.
    ("bs.khanh", "clinician", "Practitioner/vn-demo-practitioner-4", ("vn-demo-org-bvdk-ankhe",)),
    ("hoa.nguyen", "patient", "Patient/vn-demo-patient-1", ()),
    # Her husband (proxy of Hoa) and Hoa as the mother of her son (proxy of the child).
    ("proxy", "proxy", "RelatedPerson/vn-demo-relatedperson-1", ()),
    ("hoa.proxy", "proxy", "RelatedPerson/vn-demo-relatedperson-2", ()),
    ("auditor", "auditor", None, ()),
    ("qtv.iakrai", "facility-admin", None, ("vn-demo-org-tyt-iakrai",)),
    ("qtv.bvdk", "facility-admin", None, ("vn-demo-org-bvdk-gialai",)),
)


def _engine() -> sa.Engine:
    """The configured database, with its keyring (hub.crypto) built from the same settings."""
    from hub.crypto.keys import configure
    from hub.db.engine import create_engine

    settings = get_settings()
    engine = create_engine(settings.database_url)
    configure(settings, engine)
    return engine


def _read_password(password: str | None, password_stdin: bool, username: str) -> str:
    import sys

    if password_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    elif password is not None:
        value = password
    else:
        value = typer.prompt(f"Password for {username}", hide_input=True, confirmation_prompt=True)
    if not value:
        raise typer.BadParameter("The password must not be empty")
    return value


@users_app.command("add")
def users_add(
    username: str = typer.Argument(..., help="Login name (service accounts: the client_id)"),
    role: str = typer.Option(
        ...,
        "--role",
        help="clinician, patient, proxy, facility-admin, food-safety-inspector, integration-service, auditor, hub-admin",
    ),
    fhir_user: str = typer.Option(
        None, "--fhir-user", help="Practitioner/<id>, Patient/<id> or RelatedPerson/<id>"
    ),
    organizations: list[str] = typer.Option(
        [], "--org", help="An Organization id the account acts for (repeatable)"
    ),
    scopes: str = typer.Option(None, "--scopes", help="SMART v2 scopes (default: the role's)"),
    password: str = typer.Option(
        None, "--password", help="The password (visible in the process list: prefer --password-stdin)"
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin"
    ),
    no_password: bool = typer.Option(
        False, "--no-password", help="No password: tokens only from `hub token`"
    ),
) -> None:
    """Add an account. Service accounts (integration-service) get no password unless given one."""
    from hub.auth import users

    service = role == "integration-service"
    secret: str | None = None
    if password is not None or password_stdin or not (service or no_password):
        secret = _read_password(password, password_stdin, username)
    engine = _engine()
    try:
        user = users.add_user(
            engine,
            username,
            role,
            fhir_user=fhir_user,
            organizations=organizations,
            scopes=scopes,
            password=secret,
        )
    except users.UserError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(code=1) from None
    finally:
        engine.dispose()
    kind = "password" if user.has_password else "no password (service account: `hub token`)"
    console.print(f"[green]Added {user.username}[/] ({user.role.value}, {kind}); scopes: {user.scopes}")


@users_app.command("list")
def users_list() -> None:
    """List the accounts."""
    from hub.auth import users

    engine = _engine()
    try:
        accounts = users.list_users(engine)
    finally:
        engine.dispose()
    table = Table()
    for column in ("username", "role", "fhirUser", "organizations", "password", "disabled", "scopes"):
        table.add_column(column, overflow="fold")  # narrow terminals wrap cells, never cut them
    for user in accounts:
        table.add_row(
            user.username,
            user.role.value,
            user.fhir_user or "",
            " ".join(user.organizations),
            "yes" if user.has_password else "no",
            "yes" if user.disabled else "",
            user.scopes,
        )
    console.print(table)


@users_app.command("disable")
def users_disable(
    username: str,
    enable: bool = typer.Option(False, "--enable", help="Enable the account again instead"),
) -> None:
    """Disable an account: its tokens stop working within 30 seconds, its logins and page sessions at once."""
    from hub.auth import users
    from hub.web.session import end_sessions_of

    engine = _engine()
    try:
        users.disable_user(engine, username, disabled=not enable)
        if not enable:
            end_sessions_of(engine, username)  # its page sessions stop now, not at the token re-check
    except users.UserError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(code=1) from None
    finally:
        engine.dispose()
    console.print(f"{username} {'enabled' if enable else 'disabled'}")


@users_app.command("passwd")
def users_passwd(
    username: str,
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin"
    ),
    remove: bool = typer.Option(False, "--remove", help="Remove the password (a service account again)"),
) -> None:
    """Set (or remove) an account's password; its page sessions end."""
    from hub.auth import users
    from hub.web.session import end_sessions_of

    secret = None if remove else _read_password(None, password_stdin, username)
    engine = _engine()
    try:
        users.set_password(engine, username, secret)
        end_sessions_of(engine, username)  # a new password is the answer to a stolen session
    except users.UserError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(code=1) from None
    finally:
        engine.dispose()
    console.print(f"Password of {username} {'removed' if remove else 'set'}")


@app.command("token")
def token(
    username: str,
    scopes: str = typer.Option(None, "--scopes", help="Ask for fewer scopes than the account allows"),
    ttl: int = typer.Option(None, "--ttl", help="Lifetime in seconds (default: TOKEN_TTL_SECONDS)"),
) -> None:
    """Print an access token (JWT) for an account, e.g. a service account's connector."""
    from hub.auth import users
    from hub.auth.tokens import AuthError, TokenService

    settings = get_settings()
    engine = _engine()
    try:
        user = users.get_user(engine, username)
        if user is None:
            console.print(f"[red]No user {username!r}[/]")
            raise typer.Exit(code=1)
        try:
            value = TokenService(settings, engine).issue(user, scopes=scopes, ttl=ttl)
        except AuthError as error:
            console.print(f"[red]{error.message}[/]")
            raise typer.Exit(code=1) from None
    finally:
        engine.dispose()
    typer.echo(value)  # plain stdout, unwrapped: scripts capture it


def _demo_users(engine) -> None:  # type: ignore[no-untyped-def]
    """Create the demo accounts that are missing, and print all of them. An account bound to a
    RelatedPerson (a proxy) is made only when the database holds that RelatedPerson."""
    from hub.auth import users
    from hub.store import reader

    wanted: list[tuple[str, str, str | None, tuple[str, ...]]] = []
    with engine.connect() as conn:
        for username, role, fhir_user, orgs in DEMO_USERS:
            if fhir_user and fhir_user.startswith("RelatedPerson/"):
                rid = fhir_user.split("/", 1)[1]
                if "RelatedPerson" not in reader.resolve_bare_ids(conn, [rid]).get(rid, []):
                    continue
            wanted.append((username, role, fhir_user, orgs))
    console.print("Demo accounts (POST /auth/token with grant_type=password; demo passwords only):")
    for username, role, fhir_user, orgs in wanted:
        if users.get_user(engine, username) is None:
            users.add_user(
                engine, username, role, fhir_user=fhir_user, organizations=orgs, password=f"demo-{role}"
            )
        bound = f"  {fhir_user}" if fhir_user else ""
        at = f" at Organization/{', '.join(orgs)}" if orgs else ""
        # One line per account, never wrapped, so it can be copied (and grepped by tests).
        console.print(f"  {username:<11} password {f'demo-{role}':<16} {role}{bound}{at}", soft_wrap=True)


@keys_app.command("status")
def keys_status() -> None:
    """List the data keys, which is active, and the master key wrapping them."""
    from hub.crypto.admin import status

    settings = get_settings()
    engine = _engine()
    try:
        report = status(engine, settings)
    finally:
        engine.dispose()
    state = "on" if report.encrypt_at_rest else "off"
    console.print(
        f"Encryption at rest: {state}; master key {report.master_kid or '(none)'} ({report.master_source or '-'})"
    )
    table = Table("kid", "kind", "active", "wrapped by", "created", title=f"Data keys of {_safe_url()}")
    for row in report.rows:
        table.add_row(
            row["kid"], row["kind"], "yes" if row["active"] else "", row["master_kid"], str(row["created"])
        )
    console.print(table)
    if report.problem:
        console.print(f"[red]{report.problem}[/]")
        raise typer.Exit(code=1)


@keys_app.command("rotate")
def keys_rotate(
    new_master_key_file: Path = typer.Option(
        None,
        "--new-master-key-file",
        exists=True,
        help="The new master key (32 bytes, raw or base64); default: a random one",
    ),
    reencrypt: bool = typer.Option(
        False, "--reencrypt", help="Then re-encrypt stored rows with the new data key"
    ),
) -> None:
    """New master key: re-wrap every data key under it, and start a fresh data key for new writes."""
    from hub.crypto.admin import reencrypt as run_reencrypt
    from hub.crypto.admin import rotate
    from hub.crypto.keys import KeyConfigError

    settings = get_settings()
    engine = _engine()
    try:
        try:
            done = rotate(engine, settings, new_master_key_file)
        except KeyConfigError as error:
            console.print(f"[red]{error}[/]")
            raise typer.Exit(code=1) from None
        console.print(
            f"[green]Re-wrapped {done.rewrapped} data keys under master key {done.new_master_kid}[/] "
            f"(was {', '.join(done.old_master_kids)}); new writes use {done.new_dek}"
        )
        if settings.hub_master_key:
            console.print("[yellow]Set HUB_MASTER_KEY to the new key and restart the hub.[/]")
        if reencrypt:
            with _system_command("keys-rotate-reencrypt", None, engine):
                report = run_reencrypt(engine)
            console.print(
                f"Re-encrypted {report.resealed} stored versions, sealed {report.sealed} plaintext ones "
                f"({report.scanned} scanned); connectors: {report.messages} inbox messages, "
                f"{report.sources} sources' secrets"
            )
            if report.sealed:
                console.print("Run `hub reindex` so their identifiers are indexed as keyed hashes.")
    finally:
        engine.dispose()


def _import(paths: list[Path], workers: int | None):  # type: ignore[no-untyped-def]
    from hub.app_factory import build_router
    from hub.ingest.pipeline import Importer
    from hub.ingest.prepare import Prepared
    from hub.ingest.sources import discover

    router = build_router()
    total_files = len(discover(paths))
    importer = Importer(router, workers=workers)
    files_seen: set[str] = set()
    columns = (
        TextColumn("[bold]Importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files"),
        TextColumn("{task.fields[stored]} resources"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("import", total=total_files, stored=0)

        def advance(prepared: Prepared) -> None:
            source = prepared.unit.source
            file_name = source.rsplit(":", 1)[0] if prepared.unit.kind == "ndjson" else source
            new_file = file_name not in files_seen
            files_seen.add(file_name)
            progress.update(task, advance=1 if new_file else 0, stored=importer.processed)

        report = importer.run(paths, advance)
    table = Table(
        title=f"Imported {report.stored} resources from {report.files} files in {report.seconds:.1f} s ({report.rate:,.0f}/s)"
    )
    table.add_column("type")
    table.add_column("created", justify="right")
    table.add_column("updated", justify="right")
    for res_type in sorted(set(report.created) | set(report.updated)):
        table.add_row(res_type, str(report.created[res_type]), str(report.updated[res_type]))
    console.print(table)
    if report.errors:
        console.print(f"[red]{len(report.errors)} errors, {report.rejected} resources rejected[/]")
        for line in report.errors[:50]:
            console.print(f"  [red]-[/] {line}", markup=False, highlight=False)
        if len(report.errors) > 50:
            console.print(f"  ... and {len(report.errors) - 50} more")
    else:
        console.print("[green]No errors[/]")
    return report


@contextmanager
def _system_command(command: str, detail: str | None, engine: sa.Engine | None = None) -> Iterator[Access]:
    """Run a command that touches citizens' data inside the system access ``cli-<command>``
    and write its AuditEvent (one per command; outcome 200, or 500 when it failed)."""
    from consent.context import system_access
    from hub.app_factory import audit_identity
    from hub.audit.events import AccessEvent
    from hub.audit.trail import AuditTrail
    from hub.search.registry import get_registry
    from hub.store import Store

    settings = get_settings()
    own = engine is None
    audit_engine = _engine() if engine is None else engine
    status = 500
    with system_access(f"cli-{command}") as access:
        try:
            yield access
            status = 200
        finally:
            try:
                trail = AuditTrail(Store(audit_engine, get_registry()), audit_identity(settings))
                trail.record(
                    [
                        AccessEvent(
                            principal=access.principal,
                            interaction="operation",
                            action="E",
                            operation=f"hub-{command}",
                            query=detail,
                            outcome_status=status,
                            purpose=access.purpose,
                        )
                    ]
                )
            finally:
                if own:
                    audit_engine.dispose()


def system_access(reason: str):  # type: ignore[no-untyped-def]
    """``consent.context.system_access`` (imported late: the CLI starts fast)."""
    from consent.context import system_access as named_access

    return named_access(reason)


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    from hub.db.engine import normalize_url

    return make_url(normalize_url(get_settings().database_url)).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
