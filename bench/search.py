"""Search benchmark: a clinician's query mix at 1k and 10k patients, on PostgreSQL and SQLite.

For each backend and size it loads N synthetic Vietnamese patients (Synthea bundles replicated
with fresh ids, Vietnamese names and CCCD numbers: ``bench/_synthetic.py``, seeded, cached in
``--cache``) into a fresh database with ``hub import`` (on PostgreSQL with ``ANALYZE resource``
every 30 s meanwhile), then runs ``ANALYZE`` (``--no-analyze``
measures the database as the hub leaves it: neither ``hub import`` nor SQLite analyzes, and
PostgreSQL's autovacuum is off on some hosts, this one included; without statistics both
planners pick plans that scan every resource of a type). It serves the
database with ``hub serve`` (2 workers on PostgreSQL, 1 on SQLite; ``--quiet-server`` runs the
same app with uvicorn minus access logs) and fires a fixed, seeded sequence of requests over
random patients, ``--concurrency`` in flight (aiohttp). The kinds:

    identifier   Patient?identifier=https://ehealth-hub.vn/sid/cccd|{cccd}
    name         Patient?name={family} {first given}     ("nguyen van": no accents)
    obs_sorted   Observation?patient={id}&code=http://loinc.org|{code}&_sort=-date
    enc_dates    Encounter?patient={id}&date=ge{d1}&date=le{d2}
    cond_active  Condition?patient={id}&clinical-status=active
    everything   Patient/{id}/$everything

Each kind runs alone (req/s, p50/p95/p99 in ms), then the five search kinds run interleaved
("mixed", the figure for the req/s goal). It prints a table per run, the growth from the
smallest to the largest size, the goals, and with ``--explain`` the PostgreSQL EXPLAIN
(ANALYZE, BUFFERS) of every SELECT the hub runs for the p95 request of the slowest kind
(captured from the hub's engine while it answers that request in-process). Latencies include
the client, which shares the machine's cores with the server and the database.

    .venv/bin/python bench/search.py --sizes 1000,10000 --backends postgresql,sqlite \\
        --mix core --requests 2000 --concurrency 16 --explain
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import aiohttp
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import CCCD, PatientInfo, ensure_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432"
# Rate limits (hub.api.ratelimit) lifted for the server under test: all load is one client.
# The benchmarked server: no rate limits (all load comes from one address), and no bearer
# tokens (an unrestricted anonymous principal: the admin baseline; bench/access.py measures
# what consent enforcement adds).
UNLIMITED = {
    "RATE_LIMIT_PER_IP": "1000000/second",
    "RATE_LIMIT_PER_TOKEN": "1000000/second",
    "AUTH_REQUIRED": "false",
}
SEARCH_KINDS = ("identifier", "name", "obs_sorted", "enc_dates", "cond_active")
KINDS = (*SEARCH_KINDS, "everything")
GOALS = (
    "goals (PostgreSQL, 10k): mixed ≥ 1000 req/s; search p95 ≤ 50 ms; growth ≤ 1.5×; $everything p95 ≤ 300 ms"
)


@dataclass
class Request:
    kind: str
    path: str  # below the FHIR base, with the query string
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stats:
    count: int
    errors: int
    seconds: float
    latencies: list[float]  # seconds, successful requests only
    requests: list[Request]  # the request of each latency

    @property
    def rps(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def _rank(self, q: float) -> int:
        order = sorted(range(len(self.latencies)), key=self.latencies.__getitem__)
        return order[min(len(order) - 1, int(q / 100 * len(order)))]

    def pct(self, q: float) -> float:
        return self.latencies[self._rank(q)] * 1000 if self.latencies else float("nan")

    def at(self, q: float) -> Request:
        return self.requests[self._rank(q)]


@dataclass
class Run:
    backend: str
    size: int
    load_seconds: float
    resources: int
    stats: dict[str, Stats]  # by kind, plus "mixed"
    notes: list[str]


# --- requests --------------------------------------------------------------------------------


def make_request(kind: str, p: PatientInfo, rng: random.Random) -> Request | None:
    if kind == "identifier":
        return Request(kind, "Patient?" + urlencode({"identifier": f"{CCCD}|{p.cccd}"}))
    if kind == "name":
        return Request(kind, "Patient?" + urlencode({"name": p.name_query}))
    if kind == "obs_sorted" and p.loinc:
        query = {"patient": p.id, "code": f"http://loinc.org|{rng.choice(p.loinc[:6])}", "_sort": "-date"}
        return Request(kind, "Observation?" + urlencode(query))
    if kind == "enc_dates" and p.encounter_days:
        first, last = sorted(rng.choice(p.encounter_days) for _ in range(2))
        pairs = [("patient", p.id), ("date", f"ge{first}"), ("date", f"le{last}")]
        return Request(kind, "Encounter?" + urlencode(pairs))
    if kind == "cond_active":
        return Request(kind, "Condition?" + urlencode({"patient": p.id, "clinical-status": "active"}))
    if kind == "everything":
        return Request(kind, f"Patient/{p.id}/$everything")
    return None


def plan(kind: str, patients: list[PatientInfo], count: int, rng: random.Random) -> list[Request]:
    out: list[Request] = []
    while len(out) < count:
        if request := make_request(kind, rng.choice(patients), rng):
            out.append(request)
    return out


# --- databases and the server ----------------------------------------------------------------


def database_url(backend: str, size: int, args: argparse.Namespace) -> str:
    name = f"bench_search_{args.mix}_{size}"
    if backend == "sqlite":
        (args.cache / "db").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{args.cache / 'db' / name}.sqlite3"
    return f"{PG}/{name}"


def sql(url: str, statement: str) -> list[sa.Row]:
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(statement))
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def drop_database(url: str, create: bool = False) -> None:
    if url.startswith("sqlite:///"):
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
        return
    name = url.rsplit("/", 1)[1]
    sql(f"{PG}/postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if create:
        sql(f"{PG}/postgres", f'CREATE DATABASE "{name}"')


def count_resources(url: str) -> dict[str, int]:
    try:
        return dict(sql(url, "SELECT res_type, count(*) FROM resource GROUP BY res_type"))  # type: ignore[arg-type]
    except sa.exc.SQLAlchemyError:
        return {}


def hub(args: list[str], url: str, log: Path) -> float:
    started = time.perf_counter()
    with log.open("ab") as out:
        env = {**os.environ, "DATABASE_URL": url, "COLUMNS": "120"}
        done = subprocess.run([str(BIN / "hub"), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"hub {args[0]} failed; see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


@contextmanager
def analyzing(url: str | None, notes: list[str], every: float = 30.0) -> Iterator[None]:
    """ANALYZE ``resource`` every 30 s while a PostgreSQL load runs, as autovacuum would.

    Without statistics the importer's id lookups (``res_id IN (...)``) become sequential scans
    and the load turns quadratic; autovacuum is off on some hosts (this one included)."""
    stop, runs = threading.Event(), []

    def loop() -> None:
        while url and not stop.wait(every):
            sql(url, "ANALYZE resource")
            runs.append(1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if url:
            notes.append(f"ANALYZE resource ran {len(runs)} times during the load (every {every:.0f} s)")


@contextmanager
def serve(
    url: str, workers: int, quiet: bool, log: Path, settings: dict[str, str] | None = None
) -> Iterator[str]:
    """``hub serve`` (or the same app under uvicorn without access logs); yields the FHIR base.
    ``settings`` override the environment last (bench/peer.py: ``AUTH_REQUIRED=true``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    base = f"http://127.0.0.1:{port}/fhir"
    command = [str(BIN / "hub"), "serve"]
    if quiet:
        command = [str(BIN / "uvicorn"), "hub.api.app:create_app", "--factory", "--no-access-log"]
    command += ["--workers", str(workers), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        # The load comes from one IP, far past the per-IP limit; the bench measures search.
        env = {**os.environ, "DATABASE_URL": url, "BASE_URL": base, **UNLIMITED, **(settings or {})}
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.2)
            else:
                raise SystemExit(f"the server did not start; see {log}")
            time.sleep(1.0)  # let every worker finish starting
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


# --- the client ------------------------------------------------------------------------------


async def fire(base: str, requests: list[Request], concurrency: int) -> dict[str, Stats]:
    latencies: dict[str, list[float]] = defaultdict(list)
    done: dict[str, list[Request]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    queue = iter(requests)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers={"Accept": "application/fhir+json"}
    ) as session:

        async def worker() -> None:
            for request in queue:
                started = time.perf_counter()
                try:
                    async with session.get(f"{base}/{request.path}", headers=request.headers) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies[request.kind].append(time.perf_counter() - started)
                    done[request.kind].append(request)
                else:
                    errors[request.kind] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    kinds = set(done) | set(errors)
    return {k: Stats(len(done[k]) + errors[k], errors[k], wall, latencies[k], done[k]) for k in kinds}


async def _get(base: str, request: Request) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(headers=request.headers) as session,
        session.get(f"{base}/{request.path}") as response,
    ):
        return response.status, (await response.text())[:200]


def probe(base: str, plans: dict[str, list[Request]], notes: list[str]) -> list[str]:
    """One request per kind; adapt to missing features. Returns the kinds to run."""
    kinds = []
    for kind, requests in plans.items():
        status, body = asyncio.run(_get(base, requests[0]))
        if status == 400 and kind == "obs_sorted":
            notes.append(f"obs_sorted: _sort=-date gave 400 ({body}); ran with Prefer: handling=lenient")
            for request in requests:
                request.headers["Prefer"] = "handling=lenient"
            status, body = asyncio.run(_get(base, requests[0]))
        if status == 200:
            kinds.append(kind)
        else:
            notes.append(f"{kind}: HTTP {status} ({body}); kind skipped")
    return kinds


def explain(url: str, request: Request) -> str:
    """EXPLAIN ANALYZE every SELECT the hub runs to answer ``request`` (in-process, same code)."""
    from hub.app_factory import build_router
    from hub.auth.principal import system_principal
    from hub.rest import FhirRequest
    from hub.settings import Settings

    router = build_router(Settings(database_url=url))
    engine = router.ctx.store.engine
    captured: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, params, context, many):  # type: ignore[no-untyped-def]
        captured.append((statement, params))

    path, _, query = request.path.partition("?")
    headers = {k.lower(): v for k, v in request.headers.items()}
    fhir = FhirRequest(
        "GET",
        path,
        query=parse_qsl(query, keep_blank_values=True),
        headers=headers,
        principal=system_principal("bench"),
    )
    router.handle(fhir)  # warm caches, as the benchmark's warm-up did
    sa.event.listen(engine, "before_cursor_execute", grab)
    response = router.handle(fhir)
    sa.event.remove(engine, "before_cursor_execute", grab)
    out = [f"GET {request.path}  -> HTTP {response.status}, {len(captured)} statements"]
    with engine.connect() as conn:
        for statement, params in captured:
            if statement.lstrip().upper().startswith(("SELECT", "WITH")):
                plan_rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()  # type: ignore[arg-type]
                out += [
                    "",
                    "SQL: " + " ".join(statement.split()),
                    f"params: {params}",
                    *(r[0] for r in plan_rows),
                ]
    engine.dispose()
    return "\n".join(out)


# --- the run ---------------------------------------------------------------------------------


def say(backend: str, size: int, text: str) -> None:
    print(f"[{backend} {size}] {text}", flush=True)


def bench_one(backend: str, size: int, args: argparse.Namespace, workdir: Path) -> tuple[Run, str]:
    paths, infos = ensure_dataset(args.cache, size, args.seed, args.mix)
    infos, log, url = infos[:size], workdir / f"{backend}-{size}.log", database_url(backend, size, args)
    counts = count_resources(url) if args.reuse_db else {}
    seconds, notes = float("nan"), list[str]()
    if counts.get("Patient") != size:
        drop_database(url, create=True)
        say(backend, size, f"loading {size} patients ({args.mix} mix) ... log: {log}")
        hub(["db", "upgrade"], url, log)
        with analyzing(url if backend == "postgresql" and not args.no_analyze else None, notes):
            seconds = hub(["import", *map(str, paths), "--workers", str(args.import_workers)], url, log)
        counts = count_resources(url)
    if not args.no_analyze:
        started = time.perf_counter()
        sql(url, "ANALYZE")
        notes.append(f"ANALYZE before the queries took {time.perf_counter() - started:.1f} s")
    total = sum(counts.values())
    say(backend, size, f"{total:,} resources, loaded in {seconds:.0f} s ({total / seconds:,.0f}/s)")
    assert counts.get("Patient", 0) == size, counts

    rng = random.Random(args.seed)
    plans = {
        k: plan(k, infos, args.everything_requests if k == "everything" else args.requests, rng)
        for k in KINDS
    }
    stats: dict[str, Stats] = {}
    with serve(url, args.pg_workers if backend == "postgresql" else 1, args.quiet_server, log) as base:
        kinds = probe(base, plans, notes)
        asyncio.run(fire(base, [r for k in kinds for r in plans[k][: args.warmup]], args.concurrency))
        for kind in kinds:
            stats[kind] = asyncio.run(fire(base, plans[kind], args.concurrency))[kind]
            say(backend, size, f"{kind:12s} {stats[kind].rps:7.0f} req/s  p95 {stats[kind].pct(95):7.1f} ms")
        mixed = [r for k in kinds if k in SEARCH_KINDS for r in plans[k]]
        random.Random(args.seed).shuffle(mixed)
        parts = asyncio.run(fire(base, mixed, args.concurrency)).values()
        stats["mixed"] = Stats(
            sum(p.count for p in parts),
            sum(p.errors for p in parts),
            max(p.seconds for p in parts),
            [x for p in parts for x in p.latencies],
            [r for p in parts for r in p.requests],
        )
        say(
            backend,
            size,
            f"{'mixed':12s} {stats['mixed'].rps:7.0f} req/s  p95 {stats['mixed'].pct(95):7.1f} ms",
        )
    return Run(backend, size, seconds, total, stats, notes), url


def report(runs: list[Run], args: argparse.Namespace) -> None:
    row = "{:12s} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8}"
    for run in runs:
        print(f"\n== {run.backend}, {run.size:,} patients ({args.mix} mix, {run.resources:,} resources, loaded in "
              f"{run.load_seconds:.0f} s); concurrency {args.concurrency}")  # fmt: skip
        print(row.format("kind", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"))
        for kind, s in run.stats.items():
            figures = (f"{x:.1f}" for x in (s.rps, s.pct(50), s.pct(95), s.pct(99)))
            print(row.format(kind, s.count, s.errors, *figures))
        print("".join(f"  note: {note}\n" for note in run.notes), end="")
    for backend in args.backends:
        mine = sorted((r for r in runs if r.backend == backend), key=lambda r: r.size)
        if len(mine) < 2:
            continue
        small, large = mine[0].stats, mine[-1].stats
        print(f"\n== growth, {backend}: {mine[0].size:,} -> {mine[-1].size:,} patients")
        for kind in (k for k in large if k in small):
            a, b = small[kind], large[kind]
            print(f"{kind:12s} p95 {a.pct(95):7.1f} -> {b.pct(95):7.1f} ms  x{b.pct(95) / a.pct(95):5.2f}   "
                  f"req/s {a.rps:6.0f} -> {b.rps:6.0f}  x{a.rps / b.rps:5.2f} slower")  # fmt: skip
    pg = sorted((r for r in runs if r.backend == "postgresql"), key=lambda r: r.size)
    if pg:
        big = pg[-1].stats
        searches = [k for k in SEARCH_KINDS if k in big]
        worst = max(searches, key=lambda k: big[k].pct(95))
        line = f"mixed {big['mixed'].rps:.0f} req/s; worst search p95 {big[worst].pct(95):.1f} ms ({worst})"
        if "everything" in big:
            line += f"; $everything p95 {big['everything'].pct(95):.1f} ms"
        if len(pg) > 1:
            growth = max(big[k].pct(95) / pg[0].stats[k].pct(95) for k in searches if k in pg[0].stats)
            line += f"; worst p95 growth x{growth:.2f}"
        print(f"\n{GOALS}\nmeasured at {pg[-1].size:,} patients: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--sizes", default="1000,10000", help="patient counts, comma-separated")
    add("--backends", default="postgresql,sqlite")
    add("--mix", choices=("core", "full"), default="core", help="resource types kept (see _synthetic.py)")
    add("--requests", type=int, default=2000, help="requests per search kind")
    add("--everything-requests", type=int, default=200)
    add("--concurrency", type=int, default=16, help="requests in flight")
    add("--warmup", type=int, default=50, help="unmeasured requests per kind first")
    add("--seed", type=int, default=20240601)
    add("--pg-workers", type=int, default=2, help="server workers on PostgreSQL (SQLite: 1)")
    add("--import-workers", type=int, default=2)
    add("--quiet-server", action="store_true", help="uvicorn --no-access-log instead of hub serve")
    add("--explain", action="store_true", help="EXPLAIN ANALYZE the slowest kind on PostgreSQL")
    add("--no-analyze", action="store_true", help="no ANALYZE during and after the load")
    add("--keep-db", action="store_true", help="keep the bench_search_* databases")
    add("--reuse-db", action="store_true", help="skip the load when a kept database has N patients")
    add("--cache", type=Path, default=REPO / "var" / "bench-data", help="generated data, logs, SQLite files")
    args = parser.parse_args()
    args.backends = args.backends.split(",")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    workdir = args.cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    print(f"data cache: {args.cache}   logs: {workdir}", flush=True)
    runs: list[Run] = []
    try:
        for backend in args.backends:
            for size in sizes:
                run, url = bench_one(backend, size, args, workdir)
                runs.append(run)
                if args.explain and backend == "postgresql" and size == sizes[-1]:
                    # The slowest kind by p95, and the slowest search kind if that was $everything.
                    p95 = {k: s.pct(95) for k, s in run.stats.items() if k in KINDS}
                    for kind in dict.fromkeys(
                        [max(p95, key=p95.__getitem__), max(SEARCH_KINDS, key=lambda k: p95.get(k, 0))]
                    ):
                        print(f"\n== EXPLAIN ANALYZE, {backend} {size:,} patients, {kind}, its p95 request")
                        print(explain(url, run.stats[kind].at(95)), flush=True)
                if not args.keep_db:
                    drop_database(url)
    finally:
        report(runs, args)


if __name__ == "__main__":
    main()
