"""Page benchmark (issue 12): the clinician's record page at 10k synthetic patients, over HTTP.

Issue 12's bar: "the record page of a typical Synthea patient renders in p95 ≤ 150 ms server time
at 10k patients; a page's own JS and CSS stay small". This script:

1. **Data.** ``--patients`` synthetic Vietnamese patients (``bench/_synthetic.py``: Synthea
   bundle ``i % 300`` with fresh ids, a Vietnamese name, CCCD and BHYT; the ``full`` mix by
   default: every Synthea resource, Claims and ExplanationOfBenefits included, so the database
   is as big as a real load of the same people) imported with ``hub import`` into a fresh
   database ``bench_pages_<mix>_<N>`` (PostgreSQL; ``--backends sqlite`` a file under
   ``--cache``), ``ANALYZE`` as in bench/search.py.
2. **Access as in production.** ``hub serve`` (``--workers``, auth ON, audit ON: one AuditEvent
   per FHIR request the page makes; rate limits lifted because all load comes from one address).
   A clinician account ``bench-pages-dr`` (role ``clinician``, ``Practitioner/bench-pages-dr``
   of ``Organization/bench-pages-org``), not a hub admin. Synthea patients carry no
   ``managingOrganization`` or ``generalPractitioner``, so an integration service
   (``bench-pages-ingest``) records, for every patient, an active Consent permitting the
   clinician's organization for treatment (ordinary data), in transactions of 50: the
   consent row filter is in every read. The clinician logs in through the login form
   (``GET /login``, ``POST /login`` with the double-submit CSRF token) and keeps the session
   cookie; the FHIR baseline uses a ``hub token`` of the same account.
3. **Kinds**, each measured alone at every ``--concurrency`` level, every request on a patient
   not requested before in the run (drawn, seeded, without replacement from the population; a
   patient's data is cold in the server and warm only as far as PostgreSQL's caches are):
     - ``record``: ``GET /clinician/patients/{id}`` (HTML);
     - ``fhir``: what the record page reads (``hub.web.record.fetch_record``), as JSON with the
       clinician's bearer token: ``Patient/{id}/$everything?_type=<the page's types and
       Observation>&_count=1000``; when that has a next page (records over 1,000 resources),
       the same without Observations then ``Observation?patient={id}&_sort=-date&_count=500``,
       one after the other as the page does. The data cost: record − fhir is what building the
       view and rendering the HTML add (less the HTTP and JSON serialisation the page skips);
     - ``login``: ``GET /login`` (the page shell: template, CSRF cookie, middleware).
   ``--warmup`` requests per kind first, on other patients, not counted.
   Printed per kind and level: requests, errors, pages/s, client latency p50/p95/p99, server
   time p50/p95/p99 (``Server-Timing: app;dur``: from the first middleware to the response's
   start, i.e. everything but sending the body; for ``fhir`` the sum of its two requests),
   the record view's own ``page;dur`` (its ``fhir``, ``build`` and ``render`` parts too), and the answer size (median and
   max bytes; gzip of the median). The record's p95 is also given for the patients whose
   Synthea record is at most the median size ("typical") and for the larger ones.
4. **Weights**: our static files (``hub/web/static/*``) and the vendor files the pages load,
   raw and gzip (level 6), fetched from the running hub; what the login and record pages load.
5. ``--profile SECONDS``: py-spy samples the server's workers while ``record`` runs at
   concurrency 1 on fresh patients; prints the inclusive and self time of the hot functions
   (``var/bench-data/runs/<time>/profile.txt`` keeps the collapsed stacks).

Conditions printed: backend and version, patients and resources (by type), resources and
Observations per measured patient, cores, load average at start and end, server workers, Python.

    .venv/bin/python bench/pages.py --patients 10000 --backends postgresql --profile 30
    .venv/bin/python bench/pages.py --patients 10000 --reuse-db --keep-db   # a kept database

Databases are dropped at the end unless ``--keep-db``; ``--reuse-db`` skips the load when the
database already holds N patients (and their Consents).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import platform
import random
import re
import secrets
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _synthetic import PatientInfo, _sources, ensure_dataset  # noqa: E402
from search import BIN, PG, analyzing, count_resources, drop_database, hub, serve, sql  # noqa: E402

REPO = BENCH.parent
ORG, DOCTOR = "bench-pages-org", "bench-pages-dr"
CLINICIAN, INGEST = "bench-pages-dr", "bench-pages-ingest"
# The types hub.web.record.fetch_record asks $everything for (kept in step by hand: the client
# does not import the hub, so its CPU stays the client's).
RECORD_TYPES = (
    "Patient,Encounter,Condition,Procedure,DiagnosticReport,AllergyIntolerance,MedicationRequest,"
    "MedicationStatement,Immunization,CarePlan,CareTeam,DocumentReference,Composition,"
    "ClinicalImpression,ImagingStudy,Consent,Organization,Practitioner"
)
GOAL = "goal (issue 12): record page p95 ≤ 150 ms server time at 10k patients (typical Synthea patient)"
KINDS = ("record", "fhir", "login")
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")
_NEXT = re.compile(rb'"relation"\s*:\s*"next"')
_ASSETS = re.compile(r'<(?:script[^>]*\bsrc|link[^>]*\bhref)="(/static/[^"]+)"')


# --- data and accounts -------------------------------------------------------------------------


def database_url(backend: str, args: argparse.Namespace) -> str:
    name = f"bench_pages_{args.mix}_{args.patients}"
    if backend == "sqlite":
        (args.cache / "db").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{args.cache / 'db' / name}.sqlite3"
    return f"{PG}/{name}"


def template_sizes() -> list[tuple[int, int]]:
    """(resources, Observations) of each of the 300 Synthea bundles; patient i is a copy of i % 300."""
    out = []
    for path in _sources()[1]:
        kinds = collections.Counter(
            e["resource"]["resourceType"] for e in json.loads(gzip.decompress(path.read_bytes()))["entry"]
        )
        # Organization/Practitioner entries are the shared hospital's: not the patient's record.
        out.append(
            (sum(kinds.values()) - kinds["Organization"] - kinds["Practitioner"], kinds["Observation"])
        )
    return out


def hub_out(args: list[str], url: str, stdin: str = "", check: bool = True) -> str:
    """A ``hub`` command's standard output (``check``: exit on failure)."""
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run([str(BIN / "hub"), *args], env=env, input=stdin, capture_output=True, text=True)
    if done.returncode != 0 and check:
        raise SystemExit(f"hub {' '.join(args)} failed: {done.stdout[-1000:]}{done.stderr[-2000:]}")
    return done.stdout.strip()


def consent(patient_id: str) -> dict[str, Any]:
    """An active Consent permitting the clinician's organization to read ordinary data for treatment."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": "2026-01-15T09:00:00+07:00",
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": f"Organization/{ORG}"},
                }
            ],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
        },
    }


async def record_consents(base: str, token: str, patient_ids: list[str], clients: int = 2) -> None:
    """The clinician's Organization and Practitioner, then a Consent per patient (transactions of 50)."""
    directory: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": ORG, "name": "Bệnh viện Đa khoa tỉnh Gia Lai (bench)"},
        {
            "resourceType": "Practitioner",
            "id": DOCTOR,
            "name": [{"family": "Trần", "given": ["Thị", "Hoa"], "text": "BS. Trần Thị Hoa"}],
        },
    ]
    entries: list[dict[str, Any]] = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in directory
    ]
    entries += [
        {"resource": consent(p), "request": {"method": "POST", "url": "Consent"}} for p in patient_ids
    ]
    chunks = iter(range(0, len(entries), 50))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            for start in chunks:
                bundle = {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": entries[start : start + 50],
                }
                async with session.post(base, data=json.dumps(bundle)) as response:
                    if response.status != 200:
                        raise SystemExit(
                            f"consent transaction: HTTP {response.status} {await response.text()}"
                        )

        # The directory first (the Consents' actor must exist), then the rest in parallel.
        first = next(chunks)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries[first : first + 50]}
        async with session.post(base, data=json.dumps(bundle)) as response:
            if response.status != 200:
                raise SystemExit(f"consent transaction: HTTP {response.status} {await response.text()}")
        await asyncio.gather(*(worker() for _ in range(clients)))


def load(
    backend: str, args: argparse.Namespace, workdir: Path
) -> tuple[str, list[PatientInfo], dict[str, int]]:
    """The database with N patients and a Consent each: loaded, or kept from a run with
    ``--keep-db`` (``--reuse-db``; the Consents are added when a kept load lacks them)."""
    paths, infos = ensure_dataset(args.cache, args.patients, args.seed, args.mix)
    infos = infos[: args.patients]
    url, log = database_url(backend, args), workdir / f"{backend}.log"
    counts = count_resources(url) if args.reuse_db else {}
    if args.loaded_only and counts.get("Patient"):
        # A load stopped part-way (each Bundle is all or nothing): measure the patients it holds.
        present = {str(row[0]) for row in sql(url, "SELECT res_id FROM resource WHERE res_type = 'Patient'")}
        infos = [p for p in infos if p.id in present]
        print(
            f"[{backend}] --loaded-only: {len(infos)} of the {args.patients} patients are loaded", flush=True
        )
    elif counts.get("Patient") != args.patients:
        drop_database(url, create=True)
        print(f"[{backend}] loading {args.patients} patients ({args.mix} mix) ... log: {log}", flush=True)
        hub(["db", "upgrade"], url, log)
        notes: list[str] = []
        with analyzing(url if backend == "postgresql" else None, notes):
            seconds = hub(["import", *map(str, paths), "--workers", str(args.import_workers)], url, log)
        print(f"[{backend}] imported in {seconds:.0f} s; {'; '.join(notes)}", flush=True)
        counts = count_resources(url)
    if counts.get("Consent", 0) < len(infos):
        started = time.perf_counter()
        hub_out(["users", "add", INGEST, "--role", "integration-service"], url, check=False)
        sql_analyze(url)
        workers = args.workers if backend == "postgresql" else 1
        with serve(url, workers, True, log, {"AUTH_REQUIRED": "true"}) as base:
            token = hub_out(["token", INGEST, "--ttl", "3600"], url)
            asyncio.run(record_consents(base, token, [p.id for p in infos]))
        seconds = time.perf_counter() - started
        print(f"[{backend}] {len(infos)} Consents recorded in {seconds:.0f} s", flush=True)
        counts = count_resources(url)
    sql_analyze(url)
    return url, infos, counts


def sql_analyze(url: str) -> None:
    sql(url, "ANALYZE")


def ensure_clinician(url: str) -> str:
    """The clinician account (password login), created or given a fresh password; returns it."""
    password = secrets.token_urlsafe(16)
    command = ["users", "add", CLINICIAN, "--role", "clinician", "--fhir-user", f"Practitioner/{DOCTOR}"]
    hub_out([*command, "--org", ORG, "--password-stdin"], url, stdin=password + "\n", check=False)
    # A kept database: the account exists; either way the password is this run's.
    hub_out(["users", "passwd", CLINICIAN, "--password-stdin"], url, stdin=password + "\n")
    return password


# --- the client --------------------------------------------------------------------------------


@dataclass
class Sample:
    patient: int  # index in the population (-1: none)
    client_ms: float
    server_ms: float  # Server-Timing app;dur (summed over a kind's requests)
    page_ms: float | None  # Server-Timing page;dur of the record view
    parts: dict[str, float]  # the record view's Server-Timing: page, fhir, build, render
    size: int  # bytes of the answer(s)
    gzip_size: int


@dataclass
class Stats:
    kind: str
    concurrency: int
    seconds: float
    samples: list[Sample]
    errors: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds if self.seconds else 0.0


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def timings(response: aiohttp.ClientResponse) -> dict[str, float]:
    found: dict[str, float] = {}
    for header in response.headers.getall("Server-Timing", []):
        for name, value in _TIMING.findall(header):
            found[name] = float(value)
    return found


async def login(session: aiohttp.ClientSession, root: str, username: str, password: str) -> None:
    """Through the form, as a browser: GET /login (CSRF cookie), POST the form, keep the session."""
    async with session.get(f"{root}/login") as response:
        await response.read()
    token = next((c.value for c in session.cookie_jar if c.key == "hub_login_csrf"), "")
    form = {"username": username, "password": password, "csrf_token": token, "grant_type": "password"}
    async with session.post(f"{root}/login", data=form, allow_redirects=False) as response:
        await response.read()
        if response.status != 303 or not any(c.key == "hub_session" for c in session.cookie_jar):
            raise SystemExit(f"login as {username} failed: HTTP {response.status}")


async def fhir_record(
    get: Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes, dict[str, float]]]],
    base: str,
    patient_id: str,
    token: str,
) -> list[tuple[int, bytes, dict[str, float]]]:
    """What ``hub.web.record.fetch_record`` asks the router for, as JSON over HTTP: one
    ``$everything`` of the page's types with Observations; when that does not fit one page (a
    ``next`` link), the same without Observations plus the newest 500 Observations."""
    headers = {"Accept": "application/fhir+json", "Authorization": f"Bearer {token}"}
    url = f"{base}/Patient/{patient_id}/$everything?_count=1000&_type="
    parts = [await get(url + RECORD_TYPES + ",Observation", headers)]
    if parts[0][0] == 200 and _NEXT.search(parts[0][1]):
        parts.append(await get(url + RECORD_TYPES, headers))
        query = f"Observation?patient={patient_id}&_sort=-date&_count=500"
        parts.append(await get(f"{base}/{query}", headers))
    return parts


async def fire(
    root: str,
    kind: str,
    patients: list[PatientInfo],
    concurrency: int,
    password: str,
    token: str,
    keep_body: bool = False,
    after_login: Profiler | None = None,
) -> tuple[Stats, bytes]:
    """One request unit per patient (``login``: one per item), ``concurrency`` in flight."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    stats, body_kept = Stats(kind, concurrency, 0.0, []), b""
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar, timeout=timeout) as session:
        if kind == "record":
            await login(session, root, CLINICIAN, password)
        if after_login:
            after_login.start()
        queue = iter(patients)

        async def get(url: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, float]]:
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                return response.status, await response.read(), timings(response)

        async def worker() -> None:
            nonlocal body_kept
            for patient in queue:
                started = time.perf_counter()
                if kind == "record":
                    parts = [await get(f"{root}/clinician/patients/{patient.id}", {"Accept": "text/html"})]
                elif kind == "login":
                    parts = [await get(f"{root}/login", {"Accept": "text/html"})]
                else:
                    parts = await fhir_record(get, f"{root}/fhir", patient.id, token)
                elapsed = (time.perf_counter() - started) * 1000
                bad = [status for status, _, _ in parts if status != 200]
                if bad:
                    stats.errors[bad[0]] += 1
                    continue
                body = b"".join(b for _, b, _ in parts)
                if keep_body and not body_kept:
                    body_kept = body
                stats.samples.append(
                    Sample(
                        patient.index,
                        elapsed,
                        sum(t.get("app", float("nan")) for _, _, t in parts),
                        parts[0][2].get("page"),
                        parts[0][2] if kind == "record" else {},
                        len(body),
                        len(zlib.compress(body, 6)),
                    )
                )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stats.seconds = time.perf_counter() - started
    return stats, body_kept


# --- weights -----------------------------------------------------------------------------------


async def weigh(root: str, pages: dict[str, bytes]) -> list[str]:
    """Raw and gzip bytes of every static file the pages reference, fetched from the hub."""
    assets: dict[str, set[str]] = collections.defaultdict(set)
    for name, html in pages.items():
        for path in _ASSETS.findall(html.decode("utf-8", "replace")):
            assets[path].add(name)
    for path in sorted((REPO / "hub" / "web" / "static").glob("*.*")):
        assets.setdefault(f"/static/{path.name}", set())
    rows: list[str] = []
    totals: collections.defaultdict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    async with aiohttp.ClientSession() as session:
        for path in sorted(assets, key=lambda p: ("/vendor/" in p, p)):
            async with session.get(root + path) as response:
                body = await response.read()
                status = response.status
            raw, packed = len(body), len(gzip.compress(body, 6))
            origin = "vendor (npm)" if "/vendor/" in path else "ours"
            used = ", ".join(sorted(assets[path])) or "-"
            rows.append(f"{path:38s} {origin:13s} {raw:9,d} {packed:9,d}  HTTP {status}  loaded by: {used}")
            for name in assets[path]:
                for key in (name, f"{name} ({origin})"):
                    totals[key][0] += raw
                    totals[key][1] += packed
    rows.append("")
    for key in sorted(totals):
        raw, packed = totals[key]
        rows.append(f"{'total, ' + key:52s} {raw:9,d} {packed:9,d}")
    return rows


# --- profile -----------------------------------------------------------------------------------


AREAS = (  # (area, marker frame) of the record view, outermost first
    ("fetch: FHIR requests (router, search, audit)", "fetch_record ("),
    ("build the view model (hub.web.record)", "build_record ("),
    ("consent state in words", "_consent_sentences ("),
    ("render the templates (Jinja2)", "Page.render ("),
)
DETAILS = (  # what inside an area, innermost marker wins
    ("waiting for PostgreSQL / SQLite", ("Connection.wait (psycopg", "_execute_send (psycopg", "sqlite3")),
    ("SQLAlchemy (compile, execute, rows)", ("sqlalchemy/sql/", "sqlalchemy/engine/")),
    ("JSON decode/encode", ("raw_decode", "json/", "orjson", "dumps (")),
    ("audit trail", ("hub/audit/",)),
    ("Babel formatting (dates, numbers)", ("babel/",)),
    ("markupsafe escaping", ("markupsafe/",)),
)


def summarize_profile(raw: Path, top: int = 25) -> list[str]:
    """Where the server's busy samples go: the record view's areas (with what inside them), then
    the inclusive and self share of the hottest functions (idle waits and process roots dropped)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    details: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    idle = (
        "select (selectors",
        "wait (threading",
        "_worker (concurrent",
        "run_forever",
        "_run_once",
        "poll (",
    )
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [
            re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if not f.startswith(("process ", " spawn"))
        ]
        if not frames or any(marker in frames[-1] for marker in idle):
            continue
        count = int(count_text)
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        joined = ";".join(frames)
        area = "outside the record view (HTTP, middleware, session, event loop)"
        if "_record_page (" in joined:
            area = next((name for name, marker in AREAS if marker in joined), "record view, other")
        detail = next(
            (name for name, markers in DETAILS if any(m in joined for m in markers)), "other Python"
        )
        areas[area] += count
        details[(area, detail)] += count
    if not total:
        return ["(no samples)"]
    out = [f"{total} busy samples (idle event-loop and thread-pool waits dropped)", "", "by area:"]
    for area, n in areas.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {area}")
        for (name, detail), m in details.most_common():
            if name == area and m / total >= 0.005:
                out.append(f"  {'':6s}  {100 * m / total:5.1f}%  {detail}")
    out += ["", "inclusive (hottest functions):"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return out


class Profiler:
    """py-spy on the server and its workers for ``seconds``, started once the client is logged in
    (the Argon2 check of the login is not the page's cost)."""

    def __init__(self, pid: int, seconds: float, output: Path) -> None:
        self.command = [str(BIN / "py-spy"), "record", "--pid", str(pid), "--subprocesses"]
        self.command += ["--duration", str(int(seconds)), "--rate", "200", "--format", "raw"]
        self.command += ["--output", str(output), "--nonblocking"]
        self.seconds = seconds
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches

    def finish(self) -> None:
        if self.process is not None:
            _, err = self.process.communicate(timeout=self.seconds + 60)
            if self.process.returncode != 0:
                print(f"py-spy failed: {err.decode()[-500:]}")


# --- the run -----------------------------------------------------------------------------------


def print_stats(stats: Stats, sizes: list[tuple[int, int]]) -> None:
    s = stats.samples
    client = [x.client_ms for x in s]
    server = [x.server_ms for x in s]
    page = [x.page_ms for x in s if x.page_ms is not None]
    size = sorted(x.size for x in s)
    median_sample = sorted(s, key=lambda x: x.size)[len(s) // 2] if s else None
    errors = ", ".join(f"{n}×{code}" for code, n in stats.errors.items()) or "0"

    def triple(values: list[float]) -> str:
        return "/".join(f"{pct(values, q):.0f}" for q in (50, 95, 99)) if values else "-"

    print(
        f"{stats.kind:7s} c={stats.concurrency:<2d} {len(s):5d} {errors:>6s} {stats.rate:7.1f}  "
        f"{triple(client):>14s}  {triple(server):>14s}  {triple(page):>14s}  "
        f"{size[len(size) // 2] if size else 0:9,d} {size[-1] if size else 0:9,d} "
        f"{median_sample.gzip_size if median_sample else 0:8,d}"
    )


def bands(stats: Stats, sizes: list[tuple[int, int]]) -> str:
    median = statistics.median(r for r, _ in sizes)
    typical = [x.server_ms for x in stats.samples if sizes[x.patient % 300][0] <= median]
    large = [x.server_ms for x in stats.samples if sizes[x.patient % 300][0] > median]
    return (
        f"server p50/p95 by record size: ≤ median ({median:.0f} resources, {len(typical)} pages) "
        f"{pct(typical, 50):.0f}/{pct(typical, 95):.0f} ms; larger ({len(large)} pages) "
        f"{pct(large, 50):.0f}/{pct(large, 95):.0f} ms"
    )


def pg_version(url: str) -> str:
    if url.startswith("sqlite"):
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    return str(sql(url, "SHOW server_version")[0][0]).split()[0]


def bench_backend(
    backend: str, args: argparse.Namespace, workdir: Path, sizes: list[tuple[int, int]]
) -> None:
    load_start = os.getloadavg()
    url, infos, counts = load(backend, args, workdir)
    log = workdir / f"{backend}.log"
    password = ensure_clinician(url)
    token = hub_out(["token", CLINICIAN, "--ttl", "7200"], url)
    rng = random.Random(args.draw_seed if args.draw_seed is not None else args.seed)
    pool = list(infos)
    rng.shuffle(pool)
    drawn = 0

    def take(n: int) -> list[PatientInfo]:
        """The next ``n`` patients of the seeded shuffle (cycling when the population runs out)."""
        nonlocal drawn
        out = [pool[(drawn + i) % len(pool)] for i in range(n)]
        drawn += n
        return out

    levels = [int(c) for c in args.concurrency.split(",")]
    workers = args.workers if backend == "postgresql" else 1
    measured: list[Stats] = []
    pages: dict[str, bytes] = {}
    settings = {"AUTH_REQUIRED": "true", "RATE_LIMIT_LOGIN": "1000000/second"}
    with serve(url, workers, args.quiet_server, log, settings) as base:
        root = base.removesuffix("/fhir")
        for kind in KINDS:
            asyncio.run(fire(root, kind, take(args.warmup), 2, password, token))
        for level in levels:
            for kind in KINDS:
                count = args.pages * (1 if kind != "login" else 2)
                stats, body = asyncio.run(
                    fire(
                        root,
                        kind,
                        take(count) if kind != "login" else [infos[0]] * count,
                        level,
                        password,
                        token,
                        keep_body=True,
                    )
                )
                measured.append(stats)
                if kind in ("record", "login") and body:
                    pages[kind] = body
                print(
                    f"[{backend}] {kind} c={level}: {stats.rate:.1f}/s, server p95 "
                    f"{pct([x.server_ms for x in stats.samples], 95):.0f} ms",
                    flush=True,
                )
        weights = asyncio.run(weigh(root, pages))
        profile_lines: list[str] = []
        if args.profile:
            port = root.rsplit(":", 1)[1]
            found = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True, text=True)
            server_pid = int(found.stdout.split()[0])
            raw = workdir / f"profile-{backend}.txt"
            # Enough pages to outlast py-spy's duration at the rate measured at concurrency 1.
            rate = next(s.rate for s in measured if s.kind == "record" and s.concurrency == levels[0])
            profiler = Profiler(server_pid, args.profile, raw)
            patients = take(int(args.profile * rate * 1.5) + 10)
            stats, _ = asyncio.run(fire(root, "record", patients, 1, password, token, after_login=profiler))
            profiler.finish()
            profile_lines = [
                f"record pages during the profile: {len(stats.samples)}",
                *summarize_profile(raw),
            ]
    load_end = os.getloadavg()

    measured_patients = [x.patient for s in measured if s.kind == "record" for x in s.samples]
    res = [sizes[i % 300][0] for i in measured_patients]
    obs = [sizes[i % 300][1] for i in measured_patients]
    total = sum(counts.values())
    print(
        f"\n== {backend} ({pg_version(url)}), {counts.get('Patient', 0):,} patients, {args.mix} mix, "
        f"{total:,} resources"
    )
    print(
        "   by type: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:14])
    )
    print(
        f"   measured patients' records: resources median {statistics.median(res):.0f} "
        f"(p10 {pct(res, 10):.0f}, p90 {pct(res, 90):.0f}), Observations median {statistics.median(obs):.0f} "
        f"(p90 {pct(obs, 90):.0f})"
    )
    print(
        f"   hub serve: {workers} workers, auth on (clinician {CLINICIAN}, consent-filtered), audit on; "
        f"{os.cpu_count()} cores; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; "
        f"Python {platform.python_version()}; client: one aiohttp process on the same cores"
    )
    print("   latencies in ms (p50/p95/p99); fhir = the requests fetch_record makes, summed; sizes in bytes")
    print(
        f"{'kind':7s} {'level':4s} {'pages':>5s} {'errors':>6s} {'pages/s':>7s}  {'client':>14s}  "
        f"{'server (app)':>14s}  {'page;dur':>14s}  {'median B':>9s} {'max B':>9s} {'gzip med':>8s}"
    )
    for stats in measured:
        print_stats(stats, sizes)
    for stats in measured:
        if stats.kind == "record":
            print(f"record c={stats.concurrency}: {bands(stats, sizes)}")
            split = ", ".join(
                f"{name} {pct(v, 50):.0f}/{pct(v, 95):.0f}"
                for name in ("fhir", "build", "render")
                if (v := [x.parts[name] for x in stats.samples if name in x.parts])
            )
            print(f"record c={stats.concurrency}: the view's Server-Timing p50/p95 ms: {split}")
    print(f"\n{GOAL}")
    one = next(s for s in measured if s.kind == "record" and s.concurrency == levels[0])
    p95 = pct([x.server_ms for x in one.samples], 95)
    print(
        f"measured at {counts.get('Patient', 0):,} patients: record page p95 {p95:.0f} ms server time at "
        f"concurrency {levels[0]} over all drawn patients: {'met' if p95 <= 150 else 'NOT met'}"
    )
    print("\n== static files (bytes raw, gzip -6)")
    print("\n".join(weights))
    if profile_lines:
        print(
            f"\n== profile of the record page (py-spy, {args.profile:.0f} s, concurrency 1; stacks in {raw})"
        )
        print("\n".join(profile_lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--patients", type=int, default=10000)
    add("--backends", default="postgresql", help="postgresql, sqlite, or both comma-separated")
    add("--mix", choices=("core", "full"), default="full")
    add("--pages", type=int, default=200, help="patients (pages) per kind and concurrency level")
    add("--concurrency", default="1,4,8", help="clients in flight, comma-separated")
    add("--warmup", type=int, default=20)
    add("--workers", type=int, default=2, help="hub serve workers on PostgreSQL (SQLite: 1)")
    add("--import-workers", type=int, default=2)
    add("--quiet-server", action="store_true", help="uvicorn without access logs instead of hub serve")
    add("--profile", type=float, default=0, help="seconds of py-spy on the record page (0: none)")
    add("--seed", type=int, default=20240601, help="the synthetic data set's seed")
    add("--draw-seed", type=int, help="seed of the patients drawn (default --seed): a rerun on new patients")
    add("--keep-db", action="store_true")
    add("--reuse-db", action="store_true", help="keep a kept database that holds N patients")
    add(
        "--loaded-only",
        action="store_true",
        help="with --reuse-db: measure the patients a partial load holds",
    )
    add("--cache", type=Path, default=REPO / "var" / "bench-data")
    args = parser.parse_args()
    workdir = args.cache / "runs" / ("pages-" + time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True)
    # One signing key for `hub users`, `hub token` and the served workers (docs/auth.md).
    os.environ["AUTH_SIGNING_KEY_FILE"] = str(args.cache / "bench-pages-signing-es256.pem")
    print(f"data cache: {args.cache}   logs: {workdir}", flush=True)
    sizes = template_sizes()
    for backend in args.backends.split(","):
        try:
            bench_backend(backend, args, workdir, sizes)
        finally:
            if not args.keep_db:
                drop_database(database_url(backend, args))


if __name__ == "__main__":
    main()
