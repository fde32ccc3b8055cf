"""The ``hub`` command line.

Owns: the commands an operator runs: serve, db upgrade, import, demo, registry, audit.
Calls: the app factory, migrations, the import pipeline, uvicorn.  Called by: people, make, CI.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hub.settings import REPO_ROOT, get_settings

app = typer.Typer(help="Vietnam e-health integration hub", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations)", no_args_is_help=True)
registry_app = typer.Typer(help="The search-parameter registry in fhir/", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(registry_app, name="registry")
audit_app = typer.Typer(help="The audit trail's hash chain", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
console = Console()

DEMO_DIR = REPO_ROOT / "demo"


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    workers: int = typer.Option(1, help="Worker processes (PostgreSQL only; SQLite takes one writer)"),
) -> None:
    """Serve the FHIR API at http://HOST:PORT/fhir."""
    import uvicorn

    console.print(f"FHIR base: http://{host}:{port}/fhir  (database: {_safe_url()})")
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 and
    # rewrite the client address; the hub decides whom to believe (TRUSTED_PROXIES).
    uvicorn.run(
        "hub.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=False,
    )


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
    with router.ctx.store.read() as conn:
        already = reader.resolve_bare_ids(conn, ["vn-demo-patient-1"])
    if already:
        console.print("Demo data already loaded.")
    else:
        _import([DEMO_DIR], None)
    if serve_after:
        serve(host=host, port=port, workers=1)


@app.command()
def reindex(
    resource_type: str = typer.Option(None, "--type", help="Only this resource type"),
) -> None:
    """Rebuild the search indexes of current resources (after the registry changed)."""
    from hub.app_factory import build_router
    from hub.store.reindex import reindex as run_reindex

    store = build_router().ctx.store
    with Progress(
        TextColumn("[bold]Reindexing"),
        TextColumn("{task.completed} resources"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
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
    from hub.db.engine import create_engine

    engine = create_engine(get_settings().database_url)
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
    from hub.db.engine import create_engine

    engine = create_engine(get_settings().database_url)
    try:
        _, value = head(engine)
    finally:
        engine.dispose()
    typer.echo(value)


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


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    from hub.db.engine import normalize_url

    return make_url(normalize_url(get_settings().database_url)).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
