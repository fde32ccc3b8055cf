"""Side-by-side yardstick (issue 10): the hub and a peer FHIR server under the same load.

Given two or more FHIR servers by base URL and token (``--target``, or ``--hub`` to start the
hub here), it runs the same work against each, targets interleaved run by run (A B, then
B A, ...) so that the load of the machine falls on both alike:

1. **ingest**: the same N Synthea patients (``bench/_synthetic.py``: fresh ids, Vietnamese
   names, CCCD and BHYT numbers; the hospital and practitioner bundles first) POSTed as
   transaction Bundles to the base, ``--ingest-clients`` in flight. Figures: resources/s,
   Bundles/s and the latency of a Bundle. Each target's own ids are read from its
   transaction-response (``entry.response.location``, same order as the request).
2. **read**: ``GET {type}/{id}`` of resources drawn (seeded) from what was ingested, the same
   draws on every target, each mapped to that target's id.
3. **search**: the clinician mix of ``bench/search.py`` (identifier, name, obs_sorted,
   enc_dates, cond_active, everything), each kind alone, then the five searches shuffled
   together ("mixed": the figure for the search goal). Patient ids are each target's own;
   ``search.probe`` drops a kind a target refuses (and says so).

For every figure it prints requests, errors, 404s, req/s (ingest: res/s), p50/p95/p99 in ms,
the mean answer size and entries per answer (so one can see when two servers do not return
the same thing: a consent-filtered clinician sees less than a project admin), the ratio of
the first target to each other (throughput A/B; p50 B/A: above 1 means A is faster) and
the conditions: load average at start and end, cores, concurrency, each target's auth and
audit state. The client is one Python process on the same cores as the servers and the
database; every request loop is bounded by a count (and a per-request timeout).

``--hub NAME[:auth=off]`` starts the hub: ``hub serve`` (``--hub-workers``) on a fresh
PostgreSQL database ``bench_peer_<NAME>``, rate limits lifted, auth on. It ingests as an
integration service (``hub users add --role integration-service``, as a facility's system
would), then, before the reads, records for every ingested patient an active Consent that
permits Organization/bench-peer-org for treatment (ordinary data), and reads and searches as a
clinician of that organization (``Practitioner/bench-peer-dr``): the consent filter, the
audit trail (one AuditEvent per request) and token checks all in the path. With
``auth=off`` the hub serves anonymous requests as an unrestricted principal (an "open
server"; audit still on). ``db=`` on a target (the hub's is set) runs ``ANALYZE`` on that
database after the ingest (for a hub started here also ``ANALYZE resource`` every 30 s during
it, as bench/search.py does): autovacuum is off on this host, and without statistics
PostgreSQL plans scans whatever the server.

    # the hub against Medplum (bench/peers/medplum.sh start prints the target)
    .venv/bin/python bench/peer.py --hub hub \\
        --target "medplum=http://127.0.0.1:8103/fhir/R4,token-cmd=bench/peers/medplum.sh token,\\
db=postgresql://postgres@127.0.0.1:5432/medplum_bench,state=Medplum super admin; audit as configured"
    # the script exercised with two hubs: consent-filtered clinician vs open server
    .venv/bin/python bench/peer.py --hub hub --hub open:auth=off --patients 20

Options of a ``--target NAME=BASE``: ``token=`` (bearer token for every request), ``token-cmd=``
(a shell command printing one), ``ingest-token=`` / ``ingest-token-cmd=`` (for the ingest, if
it needs another principal), ``db=`` (its PostgreSQL database), ``state=`` (free text: auth,
audit, workers; printed with the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import re
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _synthetic import PatientInfo, make_patient, shared_sources  # noqa: E402
from search import (  # noqa: E402
    BIN,
    KINDS,
    PG,
    SEARCH_KINDS,
    Request,
    Stats,
    analyzing,
    drop_database,
    hub,
    plan,
    probe,
    serve,
    sql,
)

REPO = BENCH.parent
ORG, DOCTOR = "bench-peer-org", "bench-peer-dr"
T = TypeVar("T")
GOALS = "goals (issue 10): read by id ≥ 3× the peer's req/s; search mix ≥ 3× the peer's req/s"
TARGET_KEYS = ("token", "token-cmd", "ingest-token", "ingest-token-cmd", "db", "state")
_LOCATION = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")


@dataclass
class Target:
    name: str
    base: str
    token: str | None = None
    ingest_token: str | None = None
    db: str | None = None
    state: str = "as given (state= not set)"
    grant: Callable[[Target, list[str]], None] | None = None  # after the ingest, before reads
    patients: list[PatientInfo] = field(default_factory=list)  # with this target's Patient ids
    ids: list[list[tuple[str, str]]] = field(default_factory=list)  # per bundle: (type, id) per entry

    def headers(self, ingest: bool = False) -> dict[str, str]:
        token = self.ingest_token or self.token if ingest else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass
class Tally:
    """Requests of one kind on one target, summed over the interleaved rounds."""

    count: int = 0
    errors: int = 0
    not_found: int = 0
    seconds: float = 0.0
    units: int = 0  # resources (ingest) or answers
    size: int = 0
    entries: int = 0
    latencies: list[float] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    first_error: str = ""

    def stats(self) -> Stats:
        return Stats(self.count, self.errors, self.seconds, self.latencies, self.requests)

    @property
    def answered(self) -> int:
        return self.count - self.errors


# --- targets ---------------------------------------------------------------------------------


def persist(call: Callable[[], T], attempts: int = 20) -> T:
    """``call()``, retried while the shared PostgreSQL is out of connection slots."""
    for attempt in range(attempts):
        try:
            return call()
        except (SystemExit, sa.exc.OperationalError) as exc:
            if "too many clients" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(3)
    raise AssertionError("unreachable")


def run_text(command: str) -> str:
    done = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=REPO, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{command!r} failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def parse_target(spec: str) -> Target:
    """``name=BASE[,token=...|,token-cmd=...][,ingest-token=...][,db=...][,state=...]``."""
    head, *rest = re.split(r",(?=(?:{})=)".format("|".join(map(re.escape, TARGET_KEYS))), spec)
    name, _, base = head.partition("=")
    if not name or not base.startswith("http"):
        raise SystemExit(f"--target {spec!r}: expected NAME=BASE_URL[,key=value...]")
    options = dict(item.split("=", 1) for item in rest)
    token = options.get("token") or (run_text(options["token-cmd"]) if "token-cmd" in options else None)
    ingest = options.get("ingest-token") or (
        run_text(options["ingest-token-cmd"]) if "ingest-token-cmd" in options else None
    )
    return Target(
        name, base.rstrip("/"), token, ingest, options.get("db"), options.get("state", Target.state)
    )


def hub_out(args: list[str], url: str, stdin: str = "") -> str:
    """A ``hub`` command's standard output (``hub token``; a password on standard input)."""
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run([str(BIN / "hub"), *args], env=env, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"hub {' '.join(args)} failed: {done.stdout[-1000:]}{done.stderr[-2000:]}")
    return done.stdout.strip()


def consent_grants(target: Target, patient_ids: list[str]) -> None:
    """An active Consent per patient permitting the clinician's organization (TREAT, ordinary
    data), written by the integration service in transactions of 50: the hub's own way for a
    clinician outside a patient's managing organization to read the record."""
    from access import consent  # the Consent of bench/access.py (imports the hub: only here)

    directory = [
        {"resourceType": "Organization", "id": ORG, "name": "Bench peer clinic"},
        {"resourceType": "Practitioner", "id": DOCTOR},
    ]
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in directory
    ]
    entries += [
        {"resource": consent(pid, "permit", f"Organization/{ORG}", "TREAT", None), "request": {"method": "POST", "url": "Consent"}}
        for pid in patient_ids
    ]  # fmt: skip
    for start in range(0, len(entries), 50):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries[start : start + 50]}
        status, text = asyncio.run(post_once(target, json.dumps(bundle).encode()))
        if status != 200:
            raise SystemExit(f"{target.name}: consent transaction: HTTP {status} {text[:500]}")


async def post_once(target: Target, body: bytes) -> tuple[int, str]:
    headers = {**target.headers(ingest=True), "Content-Type": "application/fhir+json"}
    async with aiohttp.ClientSession() as session, session.post(target.base, data=body, headers=headers) as r:
        return r.status, await r.text()


@contextmanager
def managed_hub(spec: str, args: argparse.Namespace, workdir: Path) -> Iterator[Target]:
    """``hub serve`` on a fresh PostgreSQL database, with an ingest and a clinician account."""
    name, _, option = spec.partition(":")
    auth = option != "auth=off"
    url, log = f"{PG}/bench_peer_{name}", workdir / f"hub-{name}.log"
    # One signing key for `hub users`, `hub token` and the served workers (docs/auth.md).
    os.environ["AUTH_SIGNING_KEY_FILE"] = str(workdir / "token-signing-es256.pem")
    persist(lambda: drop_database(url, create=True))
    persist(lambda: hub(["db", "upgrade"], url, log))
    persist(lambda: hub(["users", "add", "bench-ingest", "--role", "integration-service"], url, log))
    fhir_user = f"Practitioner/{DOCTOR}"
    clinician = [
        "users",
        "add",
        "bench-clinician",
        "--role",
        "clinician",
        "--fhir-user",
        fhir_user,
        "--org",
        ORG,
    ]
    password = secrets.token_urlsafe(16) + "\n"  # never used: the benchmark takes `hub token`s
    persist(lambda: hub_out([*clinician, "--password-stdin"], url, stdin=password))
    workers = args.hub_workers
    with serve(url, workers, args.quiet_server, log, {"AUTH_REQUIRED": str(auth).lower()}) as base:
        if auth:
            state = (
                f"hub, {workers} workers: auth on, clinician token (consent-filtered: a Consent per "
                "patient permits the clinician's organization), audit on (one AuditEvent per request)"
            )
            clinician_token, ingest_token = (
                hub_out(["token", user, "--ttl", "86400"], url)
                for user in ("bench-clinician", "bench-ingest")
            )
            yield Target(name, base, clinician_token, ingest_token, url, state, consent_grants)
        else:
            state = f"hub, {workers} workers: auth off (anonymous, unrestricted), audit on"
            yield Target(name, base, db=url, state=state)
    if not args.keep_db:
        persist(lambda: drop_database(url))


# --- the client ------------------------------------------------------------------------------


async def drive(
    session: aiohttp.ClientSession,
    target: Target,
    jobs: list[tuple[Request, bytes | None]],
    concurrency: int,
    tallies: dict[str, Tally],
    on_answer: Callable[[int, dict[str, Any]], None] | None = None,
) -> None:
    """Send ``jobs`` (a POST when there is a body), ``concurrency`` in flight; add to ``tallies``.
    ``on_answer(index, parsed body)`` sees each successful POST's answer."""
    queue = iter(enumerate(jobs))
    timeout = aiohttp.ClientTimeout(total=600)

    async def worker() -> None:
        for index, (request, body) in queue:
            tally = tallies.setdefault(request.kind, Tally())
            headers = {**target.headers(ingest=body is not None), **request.headers}
            url = f"{target.base}/{request.path}".rstrip("/")
            started = time.perf_counter()
            try:
                if body is None:
                    response = await session.get(url, headers=headers, timeout=timeout)
                else:
                    headers["Content-Type"] = "application/fhir+json"
                    response = await session.post(url, data=body, headers=headers, timeout=timeout)
                async with response:
                    data = await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, data = 0, repr(exc).encode()
            elapsed = time.perf_counter() - started
            tally.count += 1
            if status in (200, 201) or (status == 404 and body is None):
                tally.not_found += status == 404
                tally.latencies.append(elapsed)
                tally.requests.append(request)
                tally.size += len(data)
                tally.entries += data.count(b'"fullUrl"') if status != 404 else 0
                if body is not None:
                    tally.units += body.count(b'"request"')
                    if on_answer:
                        on_answer(index, json.loads(data))
                else:
                    tally.units += 1
            else:
                tally.errors += 1
                tally.first_error = tally.first_error or f"HTTP {status} {request.path[:80]}: {data[:300]!r}"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    for kind in {r.kind for r, _ in jobs}:
        tallies[kind].seconds += time.perf_counter() - started


def rotations(targets: list[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """A B, B A, A B, ...: each round's targets, the order reversed every other round."""
    for number in range(rounds):
        for target in targets if number % 2 == 0 else targets[::-1]:
            yield number, target


def slices(items: list[Any], rounds: int) -> list[list[Any]]:
    return [items[r::rounds] for r in range(rounds)]


def session_for(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency)
    return aiohttp.ClientSession(connector=connector, headers={"Accept": "application/fhir+json"})


def location(entry: dict[str, Any]) -> tuple[str, str]:
    match = _LOCATION.search((entry.get("response") or {}).get("location", ""))
    if match:
        return match.group(1), match.group(2)
    resource = entry.get("resource") or {}
    return resource.get("resourceType", "?"), resource.get("id", "?")


# --- the phases ------------------------------------------------------------------------------


def ingest(targets: list[Target], args: argparse.Namespace) -> dict[str, dict[str, Tally]]:
    """Shared bundles, then the patients in ``--rounds`` interleaved slices; fills each target's
    ``patients`` and ``ids`` from its transaction-responses."""
    shared = [gzip.decompress(path.read_bytes()) for path in shared_sources()]
    made = [make_patient(i, args.seed, args.mix) for i in range(args.patients)]
    results: dict[str, dict[str, Tally]] = {t.name: {} for t in targets}
    for target in targets:
        target.ids = [[] for _ in made]
        target.patients = [info for _, info in made]

    async def run() -> None:
        for target in targets:  # not measured: the hospital's directory, once per target
            async with session_for(1) as session:
                jobs = [(Request("shared", ""), body) for body in shared]
                await drive(session, target, jobs, 1, {})
        for number, target in rotations(targets, args.rounds):
            order = list(range(args.patients))[number :: args.rounds]

            def keep(
                index: int, answer: dict[str, Any], target: Target = target, order: list[int] = order
            ) -> None:
                patient = order[index]
                target.ids[patient] = [location(e) for e in answer.get("entry", [])]
                kind, pid = target.ids[patient][0] if target.ids[patient] else ("?", "?")
                if kind == "Patient":
                    target.patients[patient] = replace(target.patients[patient], id=pid)

            jobs = [(Request("ingest", ""), made[i][0]) for i in order]
            async with session_for(args.ingest_clients) as session:
                await drive(session, target, jobs, args.ingest_clients, results[target.name], keep)
            say(f"ingest round {number + 1}/{args.rounds} {target.name}: {len(jobs)} bundles")

    asyncio.run(run())
    return results


def read_plan(target: Target, args: argparse.Namespace) -> list[Request]:
    """``--reads`` draws of (patient bundle, position in it): the same on every target."""
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.reads):
        ids = target.ids[rng.randrange(args.patients)]
        where = rng.random()
        if ids:
            kind, rid = ids[int(where * len(ids))]
            requests.append(Request("read", f"{kind}/{rid}"))
    return requests


def search_plans(target: Target, args: argparse.Namespace) -> dict[str, list[Request]]:
    """The same draws on every target (a fresh seeded rng), with this target's Patient ids."""
    rng = random.Random(args.seed)
    patients = [p for p, ids in zip(target.patients, target.ids, strict=True) if ids]
    return {
        k: plan(k, patients, args.everything_requests if k == "everything" else args.requests, rng)
        for k in KINDS
    }


def measure(targets: list[Target], args: argparse.Namespace, notes: list[str]) -> dict[str, dict[str, Tally]]:
    results: dict[str, dict[str, Tally]] = {t.name: {} for t in targets}
    work: dict[str, list[Request]] = {}
    for target in targets:
        plans = search_plans(target, args)
        kinds = probe(target.base, {k: authorized(plans[k], target) for k in plans}, tagged(notes, target))
        mixed = [r for k in kinds if k in SEARCH_KINDS for r in plans[k]]
        random.Random(args.seed).shuffle(mixed)
        work[target.name] = read_plan(target, args) + [r for k in kinds for r in plans[k]]
        work[target.name] += [replace(r, kind="mixed") for r in mixed]
        for request in work[target.name]:
            request.headers.pop("Authorization", None)  # drive() adds the target's token

    async def run() -> None:
        for target in targets:  # warm-up: a few of each kind, unmeasured
            by_kind: dict[str, list[Request]] = defaultdict(list)
            for request in work[target.name]:
                by_kind[request.kind].append(request)
            warm = [(r, None) for requests in by_kind.values() for r in requests[: args.warmup]]
            async with session_for(args.concurrency) as session:
                await drive(session, target, warm, args.concurrency, {})
        for number, target in rotations(targets, args.rounds):
            by_kind = defaultdict(list)
            for request in work[target.name]:
                by_kind[request.kind].append(request)
            async with session_for(args.concurrency) as session:
                for requests in by_kind.values():
                    jobs = [(r, None) for r in slices(requests, args.rounds)[number]]
                    await drive(session, target, jobs, args.concurrency, results[target.name])
            say(f"round {number + 1}/{args.rounds} {target.name}: " + ", ".join(
                f"{k} {t.answered / t.seconds:.0f}/s" for k, t in results[target.name].items() if t.seconds
            ))  # fmt: skip

    asyncio.run(run())
    return results


def authorized(requests: list[Request], target: Target) -> list[Request]:
    for request in requests:
        request.headers.update(target.headers())
    return requests


def tagged(notes: list[str], target: Target) -> list[str]:
    class Tagged(list[str]):
        def append(self, note: str) -> None:
            notes.append(f"{target.name}: {note}")

    return Tagged()


# --- the report ------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[peer] {text}", flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(
    targets: list[Target],
    phases: dict[str, dict[str, dict[str, Tally]]],
    args: argparse.Namespace,
    notes: list[str],
) -> None:
    head = "{:12s} {:10s} {:>7} {:>6} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}"
    print("\n== conditions")
    print(f"cores {os.cpu_count()}; load average at start {args.load_start}, at end {loadavg()}")
    print(
        f"{args.patients} patients ({args.mix} mix, seed {args.seed}); ingest {args.ingest_clients} clients; "
        f"reads and searches {args.concurrency} in flight; {args.rounds} interleaved rounds; "
        f"warm-up {args.warmup} per kind; one client process (aiohttp) on the same machine"
    )
    for target in targets:
        print(f"{target.name:10s} {target.base}  —  {target.state}")
    print("\n== figures (ingest: the unit is a resource, the latency a Bundle's)")
    print(
        head.format(
            "kind",
            "target",
            "requests",
            "errors",
            "404",
            "per s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "KB/ans",
            "entries",
        )
    )
    for phase in phases.values():
        kinds = dict.fromkeys(k for t in targets for k in phase.get(t.name, {}))
        for kind in kinds:
            for target in targets:
                tally = phase[target.name].get(kind)
                if tally is None:
                    continue
                s, per = tally.stats(), tally.units / tally.seconds if tally.seconds else 0.0
                answered = max(tally.answered, 1)
                print(head.format(
                    kind, target.name, tally.count, tally.errors, tally.not_found, f"{per:.1f}",
                    *(f"{s.pct(q):.1f}" for q in (50, 95, 99)),
                    f"{tally.size / answered / 1024:.1f}", f"{tally.entries / answered:.1f}",
                ))  # fmt: skip
    first, others = targets[0], targets[1:]
    for other in others:
        print(f"\n== ratio {first.name}/{other.name}: throughput {first.name} ÷ {other.name}; "
              f"p50 {other.name} ÷ {first.name} (above 1: {first.name} is faster)")  # fmt: skip
        for phase in phases.values():
            for kind, a in phase[first.name].items():
                b = phase[other.name].get(kind)
                if not b or not (a.seconds and b.seconds and b.units):
                    continue
                ra = (a.units / a.seconds) / (b.units / b.seconds)
                rp = b.stats().pct(50) / a.stats().pct(50)
                print(f"{kind:12s} throughput ×{ra:5.2f}   p50 ×{rp:5.2f}")
    print(f"\n{GOALS}")
    for other in others:
        figures = []
        for kind in ("read", "mixed"):
            a, b = phases["queries"][first.name].get(kind), phases["queries"][other.name].get(kind)
            if a and b and a.seconds and b.seconds and b.units:
                figures.append(f"{kind} ×{(a.units / a.seconds) / (b.units / b.seconds):.2f}")
        print(f"measured, {first.name}/{other.name}: " + ", ".join(figures))
    for target in targets:
        for phase in phases.values():
            for kind, tally in phase[target.name].items():
                if tally.first_error:
                    notes.append(f"{target.name} {kind}: {tally.errors} errors, first: {tally.first_error}")
    print("".join(f"  note: {note}\n" for note in notes), end="")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--target",
        action="append",
        default=[],
        help="NAME=BASE_URL[,token=...|,token-cmd=...][,db=...][,state=...]",
    )
    add(
        "--hub",
        action="append",
        default=[],
        help="NAME[:auth=off]: start the hub (fresh database bench_peer_NAME)",
    )
    add("--patients", type=int, default=100, help="Synthea patients to ingest into each target")
    add("--mix", choices=("core", "full"), default="full", help="resource types kept (see _synthetic.py)")
    add("--seed", type=int, default=20240601)
    add("--ingest-clients", type=int, default=4, help="transaction Bundles in flight")
    add("--reads", type=int, default=2000, help="reads by id per target")
    add("--requests", type=int, default=500, help="requests per search kind per target")
    add("--everything-requests", type=int, default=100)
    add("--concurrency", type=int, default=16, help="reads and searches in flight")
    add("--rounds", type=int, default=4, help="interleaved rounds (A B, B A, ...)")
    add("--warmup", type=int, default=20, help="unmeasured requests per kind and target first")
    add("--hub-workers", type=int, default=2)
    add("--quiet-server", action="store_true", help="uvicorn --no-access-log instead of hub serve")
    add("--keep-db", action="store_true", help="keep the bench_peer_* databases")
    add("--cache", type=Path, default=REPO / "var" / "bench-data", help="logs go to CACHE/runs/peer-*")
    args = parser.parse_args()
    if len(args.target) + len(args.hub) < 2:
        parser.error("give at least two targets (--target and/or --hub)")
    args.load_start = loadavg()
    workdir = args.cache / "runs" / time.strftime("peer-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    say(f"logs: {workdir}; load average {args.load_start}; cores {os.cpu_count()}")
    notes: list[str] = []
    with ExitStack() as stack:
        targets = [stack.enter_context(managed_hub(spec, args, workdir)) for spec in args.hub]
        targets += [parse_target(spec) for spec in args.target]
        if len({t.name for t in targets}) != len(targets):
            raise SystemExit("target names must differ")
        databases = [t.db for t in targets if t.db]
        with ExitStack() as analyze:
            for target in targets[: len(args.hub)]:  # the hub's table; a peer's are analyzed after
                analyze.enter_context(analyzing(target.db, tagged(notes, target)))
            phases = {"ingest": ingest(targets, args)}
        for db in databases:
            persist(lambda db=db: sql(db, "ANALYZE"))
        for target in targets:
            if target.grant:
                target.grant(
                    target, [p.id for p, ids in zip(target.patients, target.ids, strict=True) if ids]
                )
                if target.db:
                    persist(lambda url=target.db: sql(url, "ANALYZE"))
        phases["queries"] = measure(targets, args, notes)
        report(targets, phases, args, notes)


if __name__ == "__main__":
    main()
