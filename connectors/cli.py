"""``hub connectors ...``: the operator's commands for sources, the inbox and the workers.

Owns: add, list, status, pause, resume, replay, messages, serve (MLLP listeners of every
hl7v2-mllp source and the in-process worker, in the foreground) and worker (arq workers).
Like ``hub``'s other commands, each one that changes or reads the inbox runs inside a
named system access and writes one AuditEvent (``hub.cli._system_command``).
Calls: ``connectors.sources``, ``connectors.inbox``, ``connectors.worker``, the app factory.
Called by: ``hub.cli`` (mounted as ``hub connectors``), people, tests.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from connectors.model import FACILITY_LEVELS, FORMAT_OF_KIND, Source
from hub.settings import get_settings

app = typer.Typer(help="Facility connectors: sources, the inbox, workers", no_args_is_help=True)
console = Console()


def _engine() -> Any:
    """The configured database with its keyring: the commands that change the inbox write an
    AuditEvent, which is sealed and blind-indexed with the database's keys."""
    from hub.cli import _engine as configured_engine

    return configured_engine()


def _setting(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (ports, lists), else text."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r}: expected key=value", param_hint="--setting")
        try:
            settings[key.strip()] = json.loads(value)
        except ValueError:
            settings[key.strip()] = value
    return settings


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/]")
    return typer.Exit(code=1)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Source name: [a-z0-9-], e.g. bvdk-gialai-lis"),
    facility_code: str = typer.Option(..., help="MA_CSKCB, 5 characters (leading zeros kept)"),
    facility_name: str = typer.Option(..., help="The facility's name"),
    level: str = typer.Option(..., help=f"Facility level: {', '.join(FACILITY_LEVELS)}"),
    kind: str = typer.Option(..., help=f"Feed kind: {', '.join(FORMAT_OF_KIND)}"),
    setting: list[str] = typer.Option(
        [], "--setting", help="key=value, repeatable: port=2575, folder=/srv/xml130, base_url=..."
    ),
    paused: bool = typer.Option(False, "--paused", help="Register it paused"),
    replace: bool = typer.Option(False, "--replace", help="Change an existing source"),
) -> None:
    """Register a source (and its facility's Organization)."""
    from connectors import sources
    from hub.app_factory import build_router
    from hub.cli import _system_command

    source = Source(name, facility_code, facility_name, level, kind, _setting(setting), paused)
    router = build_router(get_settings())
    engine = router.ctx.store.engine
    try:
        with _system_command("connectors-add", name, engine):
            stored = sources.add(router, source, replace=replace)
    except ValueError as error:
        raise _fail(str(error)) from None
    finally:
        engine.dispose()
    console.print(f"[green]Source {stored.name}[/] ({stored.kind}, facility {stored.facility_code})")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="JSON instead of a table")) -> None:
    """The registered sources and their settings (secrets masked)."""
    import dataclasses

    from connectors import sources

    engine = _engine()
    try:
        found = sources.all_sources(engine)
    finally:
        engine.dispose()
    if as_json:
        shown = [{**dataclasses.asdict(s), "settings": sources.masked(s.settings)} for s in found]
        typer.echo(json.dumps(shown, ensure_ascii=False, indent=2))
        return
    table = Table("name", "facility", "level", "kind", "paused", "settings")
    for s in found:
        table.add_row(
            s.name,
            f"{s.facility_code} {s.facility_name}",
            s.facility_level,
            s.kind,
            "yes" if s.paused else "",
            json.dumps(sources.masked(s.settings), ensure_ascii=False),
        )
    console.print(table)


@app.command("status")
def status(
    name: str | None = typer.Argument(None, help="One source (default: all)"),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table"),
) -> None:
    """Per source: last message, messages/s, backlog, failures, last error."""
    from connectors import inbox

    engine = _engine()
    try:
        found = inbox.status(engine, name)
    finally:
        engine.dispose()
    if name is not None and not found:
        raise _fail(f"No source named {name!r}")
    if as_json:
        typer.echo(json.dumps([s.as_json() for s in found], ensure_ascii=False, indent=2))
        return
    table = Table(
        "source", "facility", "kind", "paused", "last received", "msg/s", "backlog", "failures", "last error"
    )
    for s in found:
        row = s.as_json()
        table.add_row(
            row["name"],
            row["facility_code"],
            row["kind"],
            "yes" if row["paused"] else "",
            row["last_received_at"] or "-",
            f"{row['messages_per_second']:g}",
            str(row["backlog"]),
            str(row["failures"]),
            (row["last_error"] or "")[:80],
        )
    console.print(table)


def _pause(name: str, paused: bool) -> None:
    from connectors import sources
    from hub.cli import _system_command

    engine = _engine()
    try:
        with _system_command("connectors-pause" if paused else "connectors-resume", name, engine):
            sources.set_paused(engine, name, paused)
    except KeyError:
        raise _fail(f"No source named {name!r}") from None
    finally:
        engine.dispose()
    console.print(f"Source {name} {'paused' if paused else 'resumed'}")


@app.command("pause")
def pause(name: str = typer.Argument(...)) -> None:
    """Stop processing a source's messages (they are still received and stored)."""
    _pause(name, True)


@app.command("resume")
def resume(name: str = typer.Argument(...)) -> None:
    """Process a paused source's messages again."""
    _pause(name, False)


def _check_state(state: str | None) -> None:
    from connectors.metrics import STATES

    if state is not None and state not in STATES:
        raise typer.BadParameter(f"one of {', '.join(STATES)}", param_hint="--state")


@app.command("replay")
def replay(
    ids: list[int] = typer.Option([], "--id", help="Message id, repeatable"),
    state: str | None = typer.Option(None, help="All messages in this state (failed, dead, rejected...)"),
    source: str | None = typer.Option(None, help="Only this source's messages"),
) -> None:
    """Queue messages again, attempts reset: by id, or by state and/or source, in bulk."""
    from connectors import inbox
    from hub.cli import _system_command

    _check_state(state)
    if not ids and state is None and source is None:
        raise typer.BadParameter("give --id, or --state and/or --source")
    detail = " ".join(
        [*(f"id={i}" for i in ids), f"state={state}" if state else "", f"source={source}" if source else ""]
    )
    engine = _engine()
    try:
        with _system_command("connectors-replay", detail.strip(), engine):
            count = inbox.replay(engine, ids=ids or None, state=state, source=source)
    finally:
        engine.dispose()
    console.print(f"{count} message{'s' * (count != 1)} queued again")


@app.command("messages")
def messages(
    source: str | None = typer.Option(None, help="Only this source's messages"),
    state: str | None = typer.Option(None, help="Only messages in this state"),
    limit: int = typer.Option(50, min=1, max=1000),
    before_id: int | None = typer.Option(None, help="Page: messages older than this id"),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table"),
) -> None:
    """Inbox messages, newest first: type, control id, state, attempts, error (never the body)."""
    from connectors import inbox

    _check_state(state)
    engine = _engine()
    try:
        rows = inbox.messages(engine, source=source, state=state, limit=limit, before_id=before_id)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in rows], ensure_ascii=False, indent=2))
        return
    table = Table("id", "source", "received", "type", "control id", "state", "attempts", "error")
    for r in rows:
        row = r.as_json()
        error = f"{row['error_where']}: {row['error']}" if row.get("error_where") else row["error"] or ""
        table.add_row(
            str(row["id"]),
            row["source"],
            row["received_at"],
            row["message_type"] or "",
            row["control_id"] or "",
            row["state"],
            str(row["attempts"]),
            error[:80],
        )
    console.print(table)


@app.command("serve")
def serve(
    listen: bool = typer.Option(True, "--listen/--no-listen", help="Run the MLLP listeners"),
    source: list[str] = typer.Option([], "--source", help="Listen for these sources only (repeatable)"),
) -> None:
    """Run the MLLP listeners of every hl7v2-mllp source and, without REDIS_URL, the
    in-process worker (processing, retries, folder and FHIR pull intake), until Ctrl-C."""
    from connectors.worker import ConnectorRuntime
    from hub.app_factory import build_router

    settings = get_settings()
    router = build_router(settings)

    async def main() -> None:
        runtime = ConnectorRuntime(router, settings, listen=listen, only=source or None, tolerate_busy=False)
        await runtime.start()
        for server in runtime.servers:
            console.print(f"MLLP {server.source.name} on {server.host}:{server.port}")
        mode = (
            "arq workers (REDIS_URL)"
            if settings.redis_url
            else f"{len(runtime.workers)} in-process worker(s)"
        )
        console.print(f"Processing: {mode}. Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runtime.stop()

    try:
        asyncio.run(main())
    finally:
        router.ctx.store.engine.dispose()


@app.command("worker")
def worker(
    processes: int = typer.Option(0, help="arq worker processes (0: CONNECTOR_WORKERS)"),
    metrics_port: int | None = typer.Option(
        None, help="Serve this process's batch histograms for Prometheus on this port (worker i: port+i)"
    ),
) -> None:
    """Run arq workers (REDIS_URL): process queued messages and listener jobs, retry
    failures, poll folders and FHIR sources. Start as many as the machines allow."""
    from connectors.worker import run_worker

    settings = get_settings()
    if not settings.redis_url:
        raise _fail("hub connectors worker needs REDIS_URL (without it `hub serve` processes in-process)")
    count = processes or max(1, settings.connector_workers)
    console.print(f"arq connector workers: {count} (queue {settings.connectors_queue})")
    run_worker(settings, count, metrics_port=metrics_port)
