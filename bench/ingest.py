"""Ingest benchmark: Synthea transaction Bundles into SQLite and PostgreSQL.

Loads the first N patients of the 300-patient Synthea set (after the hospital and practitioner
bundles they refer to) into a fresh database per run, through ``hub import`` (a subprocess;
wall time, plus the importer's own clock) and through ``hub serve`` (``POST /fhir``
transactions; 2 workers on PostgreSQL). Prints resources/s, peak memory (sampled PSS sum of
the hub's process tree, PostgreSQL excluded), the largest VmHWM, CPU seconds by process, and
per-bundle latency; checks the ``resource`` row count. For PostgreSQL it also times the limit,
a raw COPY of the same JSON (pre-serialized with orjson) into ``raw(id text, content jsonb)``,
and the ratio of ours to it. Since a VM's cores may be shared, it measures how fast two
concurrent CPU-bound processes run compared with one. ``--profile [PATIENTS]`` (default 50)
profiles the PostgreSQL import in-process with pyinstrument: the worker half (``prepare``
over every unit), then the main-process half (resolve, renumber, COPY).

    .venv/bin/python bench/ingest.py --patients 300
    .venv/bin/python bench/ingest.py --patients 300 --backends postgresql --modes import --profile
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import os
import re
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/work/shared/data/synthea/bundles_r4_300_patients_gz")
HUB = str(Path(sys.executable).parent / "hub")
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
LOAD_FIRST = ("hospitalInformation", "practitionerInformation")


@dataclass
class Result:
    backend: str
    mode: str
    resources: int
    seconds: float
    peak_mb: float
    max_proc_mb: float
    cpu: dict[str, float]  # CPU seconds by process group
    latency: tuple[float, float] | None = None  # p50, p95 seconds per bundle
    note: str = ""

    @property
    def rate(self) -> float:
        return self.resources / self.seconds


# --- inputs and databases ------------------------------------------------------------------


def choose_files(folder: Path, patients: int) -> list[Path]:
    files = sorted(folder.glob("*.json.gz"))
    first = [p for p in files if p.name.startswith(LOAD_FIRST)]
    return first + [p for p in files if not p.name.startswith(LOAD_FIRST)][:patients]


def read_json(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def count_entries(files: list[Path]) -> int:
    return sum(len(orjson.loads(read_json(p)).get("entry") or []) for p in files)


def pg_admin(sql: str) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def pg_drop(name: str) -> None:
    assert name.startswith("bench_")
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def fresh_database(backend: str, name: str, tmp: Path) -> str:
    """An empty database with the hub's schema, migrated by ``hub db upgrade``."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp / (name + '.sqlite3')}"
    else:
        pg_drop(name)
        pg_admin(f"CREATE DATABASE {name}")
        url = f"{PG}/{name}"
    subprocess.run(
        [HUB, "db", "upgrade"], env={**os.environ, "DATABASE_URL": url}, check=True, capture_output=True
    )
    return url


def database(url: str) -> str | None:
    return None if url.startswith("sqlite") else url.rsplit("/", 1)[1]


def check_rows(url: str, expected: int, strict: bool = True) -> int:
    # The hub audits itself into the same table (the import command, each transaction): those
    # AuditEvents are not the input's resources (Synthea has no AuditEvent).
    sql = "SELECT count(*) FROM resource WHERE res_type <> 'AuditEvent'"
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(sql).fetchone()[0]
    else:
        with psycopg.connect(url) as conn:
            rows = conn.execute(sql).fetchone()[0]  # type: ignore[index]
    if strict and rows != expected:
        raise SystemExit(f"{url}: {rows} rows in resource, expected {expected}")
    return rows


# --- processes: memory and CPU ---------------------------------------------------------------


def _stat(pid: int | str) -> tuple[str, list[str]]:
    """The command name and fields 3.. of /proc/PID/stat (state, ppid, ..., utime at [11], stime)."""
    try:
        head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    except OSError:
        return "", []
    return head.partition("(")[2], rest.split()


def _cpu_s(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scan(root: int, database: str | None) -> tuple[list[int], list[int]]:
    """The process tree under root, and the PostgreSQL backends connected to the database."""
    children: dict[int, list[int]] = {}
    backends = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or not (stat := _stat(entry.name))[1]:
            continue
        children.setdefault(int(stat[1][1]), []).append(int(entry.name))
        if database and stat[0] == "postgres":
            with contextlib.suppress(OSError):
                if f" {database} ".encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    backends.append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree, backends


def _kb(pid: int, name: str, field: str) -> int:
    try:
        line = next(x for x in Path(f"/proc/{pid}/{name}").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return 0


class Sampler(threading.Thread):
    """Samples a process tree (PSS sum, each process's VmHWM and CPU) and our PostgreSQL backends."""

    def __init__(self, root: int, database: str | None, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.database, self.interval = root, database, interval
        self.peak_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.pg_cpu: dict[int, float] = {}
        self._done = threading.Event()

    def sample(self) -> None:
        pids, backends = _scan(self.root, self.database)
        self.peak_kb = max(self.peak_kb, sum(_kb(p, "smaps_rollup", "Pss:") for p in pids))
        for pid in pids:
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), _kb(pid, "status", "VmHWM:"))
        for seen, group in ((self.cpu, pids), (self.pg_cpu, backends)):
            for pid in group:
                if fields := _stat(pid)[1]:
                    seen[pid] = max(seen.get(pid, 0.0), _cpu_s(fields))

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self.join()
        return self.peak_kb / 1024, max(self.hwm_kb.values(), default=0) / 1024


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq) since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parallel_speed(loops: int = 30_000_000) -> float:
    """Speed of each of two concurrent CPU-bound processes relative to one alone (1.0: two real cores)."""
    code = (
        f"import time; t = time.perf_counter()\nfor _ in range({loops}): pass\nprint(time.perf_counter() - t)"
    )

    def loop_seconds(copies: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(copies)
        ]
        return statistics.mean(float(proc.communicate()[0]) for proc in procs)

    return loop_seconds(1) / loop_seconds(2)


# --- the ways in ---------------------------------------------------------------------------


def run_import(backend: str, files: list[Path], expected: int, workers: int | None, tmp: Path) -> Result:
    url = fresh_database(backend, "bench_ingest_import", tmp)
    cmd = [HUB, "import", *map(str, files)] + (["--workers", str(workers)] if workers else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, self_before = machine_busy_s(), self_cpu_s()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, "DATABASE_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    sampler = Sampler(proc.pid, database(url))
    sampler.start()
    output = proc.communicate()[0].decode()
    seconds = time.perf_counter() - started
    peak, max_proc = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"hub import failed ({proc.returncode}):\n{output[-3000:]}")
    total = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    workers_cpu = sum(cpu for pid, cpu in sampler.cpu.items() if pid != proc.pid)
    cpu = {"main": total - workers_cpu, "workers": workers_cpu, "pg backends": sum(sampler.pg_cpu.values())}
    if backend == "sqlite":
        del cpu["pg backends"]
    ours = sum(cpu.values()) + self_cpu_s() - self_before
    cpu["other processes"] = machine_busy_s() - busy_before - ours
    own = re.search(r"Imported\s+(\d+)\s+resources\s+from\s+\d+\s+files\s+in\s+([\d.]+)\s+s", output)
    note = f"importer's own clock: {own[2]} s ({int(own[1]) / float(own[2]):,.0f}/s)" if own else ""
    check_rows(url, expected)
    return Result(backend, "import", expected, seconds, peak, max_proc, cpu, note=note)


def run_http(backend: str, files: list[Path], expected: int, concurrency: int, tmp: Path) -> Result:
    url = fresh_database(backend, "bench_ingest_http", tmp)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/fhir"
    cmd = [HUB, "serve", "--port", str(port), "--workers", "2" if backend == "postgresql" else "1"]
    log = (tmp / f"serve-{backend}.log").open("wb")
    server = subprocess.Popen(
        cmd, env={**os.environ, "DATABASE_URL": url, "BASE_URL": base, **UNLIMITED}, stdout=log, stderr=log
    )
    local = threading.local()

    def post(body: bytes) -> tuple[int, float, str]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        began = time.perf_counter()
        response = local.client.post(base, content=body, headers={"Content-Type": "application/fhir+json"})
        return response.status_code, time.perf_counter() - began, response.text[:300]

    try:
        wait_ready(base, server)
        first = [read_json(p) for p in files if p.name.startswith(LOAD_FIRST)]
        patients = [read_json(p) for p in files if not p.name.startswith(LOAD_FIRST)]
        sampler = Sampler(server.pid, database(url))
        sampler.sample()  # the server's start-up (imports, connection pools) is not ingest
        started_cpu = sum(sampler.cpu.values()), sum(sampler.pg_cpu.values())
        sampler.start()
        busy_before, client_before = machine_busy_s(), self_cpu_s()
        started = time.perf_counter()
        outcomes = [post(body) for body in first]  # sequential: the patients refer to them
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes += list(pool.map(post, patients))
        seconds = time.perf_counter() - started
        sampler.sample()  # the server is still up: a last VmHWM reading
        peak, max_proc = sampler.stop()
        cpu = {
            "server": sum(sampler.cpu.values()) - started_cpu[0],
            "pg backends": sum(sampler.pg_cpu.values()) - started_cpu[1],
        }
        cpu["client"] = self_cpu_s() - client_before
        if backend == "sqlite":
            del cpu["pg backends"]
        cpu["other processes"] = machine_busy_s() - busy_before - sum(cpu.values())
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    failed = [(status, text) for status, _, text in outcomes if status != 200]
    if failed:
        print(f"  {len(failed)} bundles failed over HTTP ({backend}); first: {failed[0]}", file=sys.stderr)
    latencies = sorted(latency for _, latency, _ in outcomes[len(first) :])
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    stored = check_rows(url, expected, strict=not failed)
    workers = cmd[-1]
    note = (
        f"{concurrency} clients, {workers} server worker(s), auth off (AUTH_REQUIRED=false: an"
        " unrestricted anonymous principal), audit on (an AuditEvent per transaction),"
        f" encryption at rest {os.environ.get('ENCRYPT_AT_REST', 'on (default)')}"
    )
    if failed:
        note += f"; {len(failed)} bundles failed"
    return Result(
        backend, "http", stored, seconds, peak, max_proc, cpu, (statistics.median(latencies), p95), note
    )


def wait_ready(base: str, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"hub serve did not answer /metadata (exit code {server.poll()})")


def raw_copy(files: list[Path]) -> dict[str, float]:
    """COPY the bundles' resources, one JSONB row each, into a bare table: the database's limit."""
    pg_drop("bench_ingest_raw")
    pg_admin("CREATE DATABASE bench_ingest_raw")
    started = time.perf_counter()
    rows = [
        (entry.get("fullUrl", "").removeprefix("urn:uuid:"), orjson.dumps(entry["resource"]).decode())
        for path in files
        for entry in orjson.loads(read_json(path)).get("entry") or []
    ]
    serialize = time.perf_counter() - started
    with psycopg.connect(f"{PG}/bench_ingest_raw") as conn:
        conn.execute("CREATE TABLE raw (id text, content jsonb)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cursor, cursor.copy("COPY raw (id, content) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - started
        assert conn.execute("SELECT count(*) FROM raw").fetchone() == (len(rows),)
    pg_drop("bench_ingest_raw")
    return {
        "rows": len(rows),
        "copy_s": seconds,
        "serialize_s": serialize,
        "mb": sum(len(r[1]) for r in rows) / 1e6,
    }


# --- profile -------------------------------------------------------------------------------

DATABASE = "database (psycopg: COPY, queries, waiting for the server)"
CATEGORIES = {
    "validate_resource": "validation (fhir.resources + JSON type walk)",
    "extract_index_rows": "search index extraction",
    "rewrite": "reference rewriting",
    "_read": "gzip read",
    "resolve_bare_ids": "id lookups (SQLAlchemy side)",
    "_renumber": "renumbering repeated ids",
    "_patch_unresolved": "patching cross-bundle references",
    "insert_new": "building COPY rows (insert_new)",
}


def categorize(frame: Any, totals: dict[str, float], label: str = "other (JSON parsing, glue)") -> None:
    """Charge each frame's self time to its innermost category, and psycopg calls to the database."""
    if "psycopg" in (frame.file_path or ""):
        totals[DATABASE] = totals.get(DATABASE, 0.0) + frame.time
        return
    label = CATEGORIES.get(frame.function, label)
    totals[label] = totals.get(label, 0.0) + frame.time - sum(child.time for child in frame.children)
    for child in frame.children:
        categorize(child, totals, label)


def profile(files: list[Path], expected: int, tmp: Path) -> None:
    from pyinstrument import Profiler
    from pyinstrument.renderers import ConsoleRenderer

    from consent.context import system_access
    from hub.app_factory import build_router
    from hub.ingest.pipeline import Importer
    from hub.ingest.prepare import prepare
    from hub.ingest.sources import discover, units
    from hub.settings import Settings

    url = fresh_database("postgresql", "bench_ingest_profile", tmp)
    router = build_router(Settings(database_url=url, base_url="http://127.0.0.1/fhir"))
    with Profiler(interval=0.001) as worker_half:
        prepared = [prepare(unit) for unit in units(discover(files))]

    class Replay(Importer):  # the main-process half, fed the units prepared above
        def _prepared(self, work: Any) -> Any:
            return iter(prepared)

    with system_access("bench-ingest"), Profiler(interval=0.001) as main_half:
        report = Replay(router, workers=1).run(files)
    assert report.stored == expected and not report.errors, report.errors[:3]
    check_rows(url, expected)
    pg_drop("bench_ingest_profile")

    for title, prof in (
        ("worker half: prepare()", worker_half),
        ("main half: resolve, renumber, COPY", main_half),
    ):
        root = prof.last_session.root_frame() if prof.last_session else None
        if root is None:
            continue
        print(f"\n=== {title}: {root.time:.1f} s for {expected:,} resources under the profiler ===")
        totals: dict[str, float] = {}
        categorize(root, totals)
        for label, spent in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {spent:7.2f} s  {100 * spent / root.time:5.1f} %  {label}")
        saved = Path(tempfile.gettempdir(), f"bench-ingest-profile-{title.split()[0]}.txt")
        saved.write_text(prof.output(ConsoleRenderer(unicode=False, color=False)))
        print(f"  top functions by self time (call tree in {saved}):")
        flat = prof.output(ConsoleRenderer(flat=True, unicode=False, color=False)).splitlines()
        print("\n".join("    " + line for line in flat[6:26] if line.strip()))


# --- main ----------------------------------------------------------------------------------


def report(results: list[Result], raw: dict[str, float] | None) -> None:
    head = (
        f"{'backend':<11}{'mode':<7}{'resources':>10}{'seconds':>9}{'res/s':>8}{'peak MB':>9}{'max proc':>9}"
    )
    print(f"\n{head}{'p50 s':>7}{'p95 s':>7}\n{'-' * (len(head) + 14)}")
    for r in results:
        lat = f"{r.latency[0]:7.2f}{r.latency[1]:7.2f}" if r.latency else ""
        print(
            f"{r.backend:<11}{r.mode:<7}{r.resources:>10,}{r.seconds:>9.1f}{r.rate:>8,.0f}"
            f"{r.peak_mb:>9.0f}{r.max_proc_mb:>9.0f}{lat}"
        )
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r.cpu.items())
        ours = sum(v for k, v in r.cpu.items() if k not in ("client", "other processes"))
        cost = f"{1e6 * ours / r.resources:,.0f} us of CPU per resource"
        cost += f" (at most {2 * r.resources / ours:,.0f}/s on 2 idle cores)"
        for extra in (r.note, f"CPU s: {cpu}", cost):
            if extra:
                print(f"{'':18}{extra}")
    if raw is None:
        return
    limit = raw["rows"] / raw["copy_s"]
    with_json = raw["rows"] / (raw["copy_s"] + raw["serialize_s"])
    print(f"\nraw COPY into raw(id text, content jsonb): {raw['rows']:,} rows, {raw['mb']:.0f} MB of JSON")
    print(f"  pre-serialized rows, COPY + commit: {raw['copy_s']:.1f} s = {limit:,.0f} rows/s (the limit)")
    total = raw["copy_s"] + raw["serialize_s"]
    print(f"  with gunzip + parse + orjson.dumps first: {total:.1f} s = {with_json:,.0f} rows/s")
    for r in results:
        if r.backend == "postgresql":
            ratios = f"{r.rate / limit:.1%}  (/ COPY with JSON: {r.rate / with_json:.1%})"
            print(f"  PostgreSQL {r.mode:<6} / raw COPY = {ratios}")
            if r.mode == "import":
                met = r.rate >= 5000 and r.rate >= 0.25 * limit
                print(f"  goal (>= 5,000/s and >= 25% of raw COPY): {'met' if met else 'NOT met'}")
            else:
                print(f"  goal (>= 3,000/s over HTTP): {'met' if r.rate >= 3000 else 'NOT met'}")


@contextlib.contextmanager
def cleanup(postgres: bool) -> Iterator[None]:
    """Drop the benchmark's PostgreSQL databases at the end, also after a failure."""
    try:
        yield
    finally:
        for name in ("import", "http", "raw", "profile") if postgres else ():
            pg_drop(f"bench_ingest_{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--modes", default="import,http")
    parser.add_argument("--workers", type=int, default=None, help="hub import --workers (default: per core)")
    parser.add_argument("--http-concurrency", type=int, default=4, help="clients posting bundles at once")
    parser.add_argument("--profile", nargs="?", type=int, const=50, metavar="PATIENTS")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    backends = args.backends.split(",")
    modes = ["http" if m == "serve" else m for m in args.modes.split(",")]  # serve: the HTTP way in

    files = choose_files(args.data, args.patients)
    expected = count_entries(files)
    spec = importlib.util.find_spec("hub")
    tree = Path(spec.origin).parent.parent if spec and spec.origin else REPO  # PYTHONPATH may point elsewhere
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=tree, capture_output=True, text=True
    )
    print(f"{len(files)} files ({args.patients} patients), {expected:,} resources")
    print(f"load average at start: {_load()}")
    print(f"hub from {tree} ({head.stdout.strip() or 'not a git checkout'})")
    print(
        f"{os.cpu_count()} cores; two concurrent processes each run at {parallel_speed():.0%} of solo speed"
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder, cleanup("postgresql" in backends):
        tmp = Path(folder)
        for backend in backends:
            for mode in modes:
                print(f"-- {backend} / {mode} (load average {_load()}) ...", flush=True)
                if mode == "import":
                    results.append(run_import(backend, files, expected, args.workers, tmp))
                else:
                    results.append(run_http(backend, files, expected, args.http_concurrency, tmp))
                print(f"   {results[-1].rate:,.0f} resources/s", flush=True)
        raw = raw_copy(files) if "postgresql" in backends else None
        if args.profile:
            subset = choose_files(args.data, min(args.profile, args.patients))
            profile(subset, count_entries(subset), tmp)
    print(f"\nafter the runs, two concurrent processes each run at {parallel_speed():.0%} of solo speed")
    report(results, raw)


if __name__ == "__main__":
    main()
