"""Request-path benchmark (issue 10): read by id and a search mix as a clinician, over HTTP.

What it measures: the whole request path of ``hub serve`` on PostgreSQL: uvicorn, the
adapter (``hub.api``), bearer-token verification, the access decision, the store or search
engine, response building and the AuditEvent every request writes. Auth is on (a clinician's
ES256 token; ``AUTH_REQUIRED`` true), audit is on (it cannot be turned off); the rate limits
are lifted, because all load comes from one address and one token.

Data: the Synthea set in ``--data`` (default ``../shared/data/synthea/bundles_r4_small``, 20
patients) through ``hub import`` into a fresh database, then ``ANALYZE``. Organization
``bench-org-a`` manages every Patient (a treatment grant under the ``moh`` policy) and the
clinician ``bench-dr`` acts for it, so every planned request answers 200: the probe drops the
few ids the clinician may not see (sensitive labels).

Kinds, per server:

    read      GET Patient/{id}, Observation/{id}, Condition/{id}, Encounter/{id} (random ids)
    search    Observation?patient={id}&code={code}&_sort=-date, Condition?patient={id}&clinical-status=active,
              Encounter?patient={id}&date=ge{year}, Patient?name={family}
    healthz   GET /healthz: the floor of the HTTP stack (no auth, no FHIR, one SELECT 1)

Servers, started side by side and measured in turn (only one is under load at a time):

    clinician   the hub as deployed: auth on, audit on
    open        the same hub with ``AUTH_REQUIRED=false`` (an unrestricted anonymous principal:
                no token verification, no consent filter; audit still on): the baseline
    --compare   both again from another checkout (``git worktree add /tmp/before <sha>``),
                labelled ``before``: before/after in the same run, interleaved

Each round runs every (server, kind) once, ``--requests`` requests at ``--concurrency`` in
flight (aiohttp, keep-alive); rounds interleave so that the machine's load, which other work
changes, falls on every cell alike. It prints the conditions (backend, workers, auth, audit,
concurrency, cores, load average at start and end), then per cell: req/s (requests / wall time
over all rounds), p50/p95/p99 in ms and errors. Latencies include the client, which shares the
machine's cores with the servers and the database.

    .venv/bin/python bench/read.py --requests 2000 --rounds 3 --concurrency 16
    .venv/bin/python bench/read.py --compare /tmp/before --reuse-db
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from search import sql  # noqa: E402  (one helper for the bench scripts' admin SQL)

BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432"
# ../shared beside the checkout; SHARED_DIR for a checkout elsewhere (a git worktree).
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
DEFAULT_DATA = SHARED / "data" / "synthea" / "bundles_r4_small"
ORG = "bench-org-a"
CLINICIAN = "bench-dr"
ADMIN = "bench-admin"
UNLIMITED = {"RATE_LIMIT_PER_IP": "1000000/second", "RATE_LIMIT_PER_TOKEN": "1000000/second"}
KINDS = ("read", "search", "healthz")
GOALS = "goals (PostgreSQL, clinician, auth and audit on, concurrency 16): read ≥ 3000 req/s p95 ≤ 10 ms; search ≥ 1000 req/s p95 ≤ 50 ms"


@dataclass
class Cell:
    requests: int = 0
    errors: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


# --- setup -----------------------------------------------------------------------------------


def hub(command: list[str], env: dict[str, str], repo: Path = REPO) -> str:
    done = subprocess.run(
        [str(BIN / "hub"), *command], env=env, cwd=repo, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise SystemExit(f"hub {' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def load(url: str, data: Path, env: dict[str, str]) -> None:
    if not data.exists():
        raise SystemExit(f"{data} is missing (set SHARED_DIR or --data)")
    name = url.rsplit("/", 1)[1]
    sql(f"{PG}/postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    sql(f"{PG}/postgres", f'CREATE DATABASE "{name}"')
    hub(["db", "upgrade"], env)
    hub(["import", str(data)], env)
    hub(["users", "add", ADMIN, "--role", "hub-admin", "--no-password"], env)
    hub(
        ["users", "add", CLINICIAN, "--role", "clinician", "--fhir-user", f"Practitioner/{CLINICIAN}"]
        + ["--org", ORG, "--no-password"],
        env,
    )


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, body: object = None
) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None else None
    async with session.request(method, url, data=data) as response:
        return response.status, await response.read()


async def grant(base: str, admin_token: str, patients: list[str]) -> None:
    """Organization A manages every Patient: the clinician's treatment grant (policy moh)."""
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/fhir+json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        await _call(
            session,
            "PUT",
            f"{base}/Organization/{ORG}",
            {"resourceType": "Organization", "id": ORG, "name": "Bench A"},
        )
        practitioner = {"resourceType": "Practitioner", "id": CLINICIAN}
        await _call(session, "PUT", f"{base}/Practitioner/{CLINICIAN}", practitioner)
        for patient_id in patients:
            status, body = await _call(session, "GET", f"{base}/Patient/{patient_id}")
            patient = orjson.loads(body)
            if patient.get("managingOrganization", {}).get("reference") == f"Organization/{ORG}":
                continue
            patient["managingOrganization"] = {"reference": f"Organization/{ORG}"}
            patient.pop("meta", None)
            status, body = await _call(session, "PUT", f"{base}/Patient/{patient_id}", patient)
            if status != 200:
                raise SystemExit(f"could not update Patient/{patient_id}: {status} {body[:300]!r}")


@dataclass
class Plan:
    reads: list[str]
    searches: list[str]


def plan(url: str, count: int, rng: random.Random) -> Plan:
    ids = {
        t: [
            r[0]
            for r in sql(
                url, f"SELECT res_id FROM resource WHERE res_type = '{t}' AND NOT deleted ORDER BY res_id"
            )
        ]
        for t in ("Patient", "Observation", "Condition", "Encounter")
    }
    codes = [
        r[0]
        for r in sql(url, "SELECT DISTINCT value FROM idx_token WHERE system = 'http://loinc.org' LIMIT 50")
    ]
    families = [
        r[0]
        for r in sql(
            url,
            "SELECT DISTINCT left(value_norm, 4) FROM idx_string s JOIN resource r USING (pid) WHERE r.res_type = 'Patient' LIMIT 20",
        )
    ]
    reads = [f"{t}/{rng.choice(ids[t])}" for t in rng.choices(list(ids), weights=(1, 3, 1, 1), k=count)]
    searches = []
    for _ in range(count):
        patient = rng.choice(ids["Patient"])
        searches.append(
            rng.choice(
                [
                    f"Observation?patient={patient}&code=http://loinc.org|{rng.choice(codes or ['x'])}&_sort=-date",
                    f"Condition?patient={patient}&clinical-status=active",
                    f"Encounter?patient={patient}&date=ge{rng.randint(2000, 2020)}",
                    f"Patient?name={rng.choice(families or ['a'])}",
                ]
            )
        )
    return Plan(reads, searches)


# --- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(repo: Path, env: dict[str, str], workers: int, log: Path) -> Iterator[str]:
    """``hub serve`` from ``repo`` (its own code, this venv); yields its FHIR base."""
    port = free_port()
    command = [str(BIN / "hub"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    # The checkout's own package first: the venv's editable install points at this one.
    env = {**env, "PYTHONPATH": str(repo)}
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start; see {log}") from None
                    time.sleep(0.2)
            time.sleep(1.5)  # every worker up
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


# --- the client ------------------------------------------------------------------------------


async def fire(origin: str, paths: list[str], token: str | None, concurrency: int, cell: Cell) -> None:
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    queue = iter(paths)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for path in queue:
                started = time.perf_counter()
                try:
                    async with session.get(f"{origin}{path}") as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                cell.statuses[status] += 1
                if status == 200:
                    cell.latencies.append(time.perf_counter() - started)
                else:
                    cell.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.wall += time.perf_counter() - started
    cell.requests += len(paths)


async def visible(origin: str, token: str, paths: list[str]) -> list[str]:
    """The planned requests that answer 200 to the clinician (others are access decisions)."""
    unique = sorted(set(paths))
    ok: set[str] = set()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for path in unique:
            async with session.get(f"{origin}/fhir/{path}") as response:
                await response.read()
                if response.status == 200:
                    ok.add(path)
    return [p for p in paths if p in ok]


def git_head(repo: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--database",
        default=f"{PG}/bench_read",
        help="PostgreSQL database (dropped and loaded unless --reuse-db)",
    )
    add("--data", type=Path, default=DEFAULT_DATA, help="what `hub import` loads")
    add("--reuse-db", action="store_true", help="keep a database loaded by an earlier run")
    add("--requests", type=int, default=2000, help="requests per cell per round")
    add("--rounds", type=int, default=3)
    add("--concurrency", type=int, default=16)
    add("--workers", type=int, default=0, help="hub serve --workers (0: its default, one per core)")
    add("--kinds", default=",".join(KINDS))
    add("--compare", type=Path, help="another checkout to serve too, labelled 'before'")
    add("--no-open", action="store_true", help="skip the open (auth off) servers")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]

    work = Path(tempfile.mkdtemp(prefix="bench-read-"))  # server logs
    # The keys stay with the database between runs (--reuse-db): its data keys are wrapped
    # by this master key, and the users' tokens are signed by this key.
    keys = Path(tempfile.gettempdir()) / "bench-read-keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": args.database,
        "AUTH_SIGNING_KEY_FILE": str(keys / "sign.pem"),
        "MASTER_KEY_FILE": str(keys / "master.key"),
        "EXPORT_DIR": str(work / "exports"),
        "COLUMNS": "200",
        "PYTHONPATH": str(REPO),  # this checkout's code, whichever checkout the venv installed
        **UNLIMITED,
    }
    env.pop("BASE_URL", None)
    loaded = bool(
        args.reuse_db
        and sql(
            f"{PG}/postgres", f"SELECT 1 FROM pg_database WHERE datname = '{args.database.rsplit('/', 1)[1]}'"
        )
    )
    if not loaded:
        print(f"loading {args.data} into {args.database} ...", flush=True)
        load(args.database, args.data, env)
    else:
        hub(["db", "upgrade"], env)  # a database loaded by an older checkout
    sql(args.database, "ANALYZE")
    admin_token = hub(["token", ADMIN, "--ttl", "86400"], env).strip()
    clinician_token = hub(["token", CLINICIAN, "--ttl", "86400"], env).strip()
    rng = random.Random(10)
    workplan = plan(args.database, args.requests, rng)
    patients = sorted(
        {p.split("=", 1)[1].split("&")[0] for p in workplan.searches if p.startswith("Condition")}
    )
    open_env = {**env, "AUTH_REQUIRED": "false"}

    servers: list[tuple[str, Path, dict[str, str], str | None]] = [("clinician", REPO, env, clinician_token)]
    if not args.no_open:
        servers.append(("open", REPO, open_env, None))
    if args.compare:
        servers.append(("before clinician", args.compare.resolve(), env, clinician_token))
        if not args.no_open:
            servers.append(("before open", args.compare.resolve(), open_env, None))

    with ExitStack() as stack:
        origins = {
            label: stack.enter_context(
                serve(repo, server_env, args.workers, work / f"{label.replace(' ', '-')}.log")
            )
            for label, repo, server_env, _ in servers
        }
        first = origins["clinician"]
        all_patients = [
            r[0]
            for r in sql(
                args.database, "SELECT res_id FROM resource WHERE res_type = 'Patient' AND NOT deleted"
            )
        ]
        asyncio.run(grant(f"{first}/fhir", admin_token, all_patients or patients))
        reads = asyncio.run(visible(first, clinician_token, workplan.reads))
        searches = asyncio.run(visible(first, clinician_token, workplan.searches))
        paths = {
            "read": [f"/fhir/{p}" for p in reads],
            "search": [f"/fhir/{p}" for p in searches],
            "healthz": ["/healthz"] * args.requests,
        }
        # Warm up each server (pools, prepared statements, the account check).
        for label, _, _, token in servers:
            for kind in kinds:
                asyncio.run(fire(origins[label], paths[kind][:200], token, args.concurrency, Cell()))

        load_start = os.getloadavg()
        cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
        for round_number in range(args.rounds):
            order = servers if round_number % 2 == 0 else list(reversed(servers))
            for kind in kinds:
                for label, _, _, token in order:
                    asyncio.run(
                        fire(origins[label], paths[kind], token, args.concurrency, cells[(label, kind)])
                    )
            print(
                f"round {round_number + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        load_end = os.getloadavg()

    workers = args.workers or "hub serve default (one per core)"
    print()
    print(f"backend: PostgreSQL ({args.database}); data: {args.data.name}; cores: {os.cpu_count()}")
    print(
        f"servers: hub serve, workers: {workers}; auth: on (clinician ES256 token)"
        + ("" if args.no_open else ", off for 'open'")
        + "; audit: on; rate limits lifted"
    )
    print(
        f"this checkout: {git_head(REPO)}" + (f"; before: {git_head(args.compare)}" if args.compare else "")
    )
    print(
        f"concurrency: {args.concurrency}; requests per cell per round: {args.requests} (read: {len(reads)}, search: {len(searches)}); rounds: {args.rounds}"
    )
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}; at end: {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    print()
    print(f"{'server':<18} {'kind':<8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for kind in kinds:
        for label, _, _, _ in servers:
            cell = cells[(label, kind)]
            rps = cell.requests / cell.wall if cell.wall else 0.0
            errors = f"{cell.errors}" + (f" {dict(cell.statuses)}" if cell.errors else "")
            print(
                f"{label:<18} {kind:<8} {rps:8.0f} {cell.pct(0.5):8.1f} {cell.pct(0.95):8.1f} {cell.pct(0.99):8.1f} {errors:>7}"
            )
    print()
    print(GOALS)


if __name__ == "__main__":
    main()
