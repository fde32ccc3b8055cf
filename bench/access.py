"""Access benchmark (issue 4): consent-enforced search against the same search as an admin.

Goal: a clinician's search, filtered by the access layer's visibility condition
(``consent.decision.Access.visible``: compartment membership, grants from Consent /
managingOrganization / CareTeam, deny grants, sensitivity labels), takes at most 1.2x the
time of the same search by an unrestricted admin.

Data (once per backend, into a seed database that each run copies, so runs start alike;
``--keep-db`` keeps it and ``--reuse-db`` skips the load when it is there): the
300-patient Synthea set (``../shared``, ~93k resources, every type) through ``hub import``
(on PostgreSQL with ``ANALYZE resource`` every 30 s meanwhile, as bench/search.py does), then
an access structure written through the router as the system principal:

- Organizations ``bench-org-a`` (the clinician's), ``-b``, ``-c`` and Practitioner ``bench-dr``;
- 50% of the Patients get ``managingOrganization`` = org A (a policy grant: TREAT, NORMAL
  data); of those, 1 in 10 also has an active Consent that *denies* org A everything (an
  opt-out that beats the policy grant) and 1 in 10 a Consent that permits org A their
  mental-health and reproductive data (labels PSY, SEX) as well;
- 20% are managed by org B but have a Consent permitting org A for TREAT;
- the other 30% are managed by org B or C, no grant to org A;
- 15% of all patients also have a research Consent (anyone, HRESCH: noise for a TREAT query);
- a third of the org B/C-only patients have a CareTeam with the clinician on it: half in force
  (since 2020, a grant through ``CareTeam/<id>``), half ended in 2016 (no access).

Sensitive labels come from the data itself: Synthea's PHQ-2/PHQ-9 Observations (PSY),
pregnancy and prenatal care (SEX), etc. (``fhir/sensitive-categories.json``). Then ``ANALYZE``
(PostgreSQL: ``VACUUM ANALYZE``, as autovacuum would).

Principals: admin = ``system_principal()`` (unrestricted, no row condition); clinician =
``Role.CLINICIAN``, ``user/*.cruds``, fhirUser ``Practitioner/bench-dr``, organization org A.

Kinds (identical requests for both principals; ``obs_patient`` asks for a patient the
clinician may see 3 times in 4, else one they may not; ``$everything`` only for patients they
may see, since for the others the clinician gets a quick 404):

    obs_code      Observation?code=http://loinc.org|{common code}&_total=accurate&_count=20
    obs_patient   Observation?patient={id}&_sort=-date
    obs_pat_code  Observation?patient={id}&code=http://loinc.org|{common code}
    name          Patient?name={3-letter prefix of a family name}
    cond_active   Condition?clinical-status=active&_count=50
    enc_date      Encounter?date=ge{year}&_count=20
    obs_include   Observation?code=http://loinc.org|{code}&_include=Observation:patient
    has           Patient?_has:Observation:patient:code={code}
    everything    Patient/{id}/$everything

Two levels, measured separately:

- ``router``: ``FhirRouter.handle`` (admission: ``decide`` reads the clinician's grants;
  dispatch; one AuditEvent written per request, the same work for both principals);
- ``engine``: ``hub.search.engine`` parse + execute (``$everything``: its page query) inside
  ``consent.context.serving(access)`` for the clinician, ``serving(system_access_for(...))``
  for the admin (unrestricted: ``visible()`` is None; ``serving(None)`` fails closed).
  This is the filter's cost alone.

Every router-level request writes its AuditEvent (about ten thousand per run, each with
compartment rows and references to the patients it names): hence the fresh copy per run.

Requests run one at a time, in process, admin and clinician interleaved (A B, then B A, ...)
after a warm-up; per kind and overall it prints p50/p95 ms per principal, the ratio
clinician/admin (p50, p95 and total time) and requests/s, plus how much each principal saw.
The overall figure is total clinician time / total admin time over the same requests.
``--explain`` prints EXPLAIN (ANALYZE, BUFFERS) of the SQL a clinician request of the kind
with the worst ratio runs (PostgreSQL), and the admin's for comparison.

    .venv/bin/python bench/access.py                              # SQLite and PostgreSQL
    .venv/bin/python bench/access.py --backends postgresql --explain
    .venv/bin/python bench/access.py --backends postgresql --pg-set jit=off   # without JIT
    .venv/bin/python bench/access.py postgresql://postgres@127.0.0.1:5432/mydb   # this database
    .venv/bin/python bench/access.py --open-set 20000   # the large case: 20,000 more patients open

``--open-set N`` (the large case) adds N policy grants of org A for patients holding no data
(a facility managing thousands), so the clinician's open set grows while the rows searched
stay the same: the visibility condition must stay a set probe, not a list per patient.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from search import analyzing, count_resources, drop_database, hub, sql  # noqa: E402

from consent import labels  # noqa: E402
from consent.context import serving, system_access, system_access_for  # noqa: E402
from consent.decision import Access, decide  # noqa: E402
from hub.app_factory import build_router  # noqa: E402
from hub.auth.principal import Principal, Role, system_principal  # noqa: E402
from hub.auth.scopes import ScopeSet  # noqa: E402
from hub.rest.messages import FhirRequest  # noqa: E402
from hub.rest.router import FhirRouter  # noqa: E402
from hub.search import engine as search_engine  # noqa: E402
from hub.settings import Settings  # noqa: E402

DATA = Path("/work/shared/data/synthea/bundles_r4_300_patients_gz")
PG = "postgresql://postgres@127.0.0.1:5432"
LOINC = "http://loinc.org"
ORG_A, ORG_B, ORG_C, DOCTOR = "bench-org-a", "bench-org-b", "bench-org-c", "bench-dr"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# Frequent LOINC codes of the Synthea set: height, BMI, pain score, BMI percentile, glucose...
COMMON_CODES = ("8302-2", "29463-7", "72514-3", "39156-5", "2339-0", "6299-2")
# _has codes: a frequent one, rarer ones, and PHQ-2 (labelled PSY: hidden unless consented).
HAS_CODES = ("2339-0", "33914-3", "6299-2", "55758-7")
KINDS = (
    "obs_code",
    "obs_patient",
    "obs_pat_code",
    "name",
    "cond_active",
    "enc_date",
    "obs_include",
    "has",
    "everything",
)
LEVELS = ("router", "engine")
GOAL = 1.2


# --- data ------------------------------------------------------------------------------------


@dataclass
class Population:
    patients: list[str]
    visible: list[str]  # the clinician may see these patients' (normal) records
    hidden: list[str]
    families: list[str]
    groups: dict[str, int] = field(default_factory=dict)


def database_url(backend: str, cache: Path, name: str = "bench_access") -> str:
    if backend == "sqlite":
        (cache / "db").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{cache / 'db' / name}.sqlite3"
    return f"{PG}/{name}"


def clone(seed: str, url: str) -> None:
    """A fresh copy of the seeded database, so every run starts from the same state (each
    run adds its AuditEvents, and with them compartment and reference rows)."""
    drop_database(url)
    if url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(seed.removeprefix("sqlite:///")) as source:
            target = sqlite3.connect(url.removeprefix("sqlite:///"))
            source.backup(target)
            target.close()
        return
    name, template = url.rsplit("/", 1)[1], seed.rsplit("/", 1)[1]
    sql(f"{PG}/postgres", f'CREATE DATABASE "{name}" TEMPLATE "{template}"')


def source_files() -> list[Path]:
    files = sorted(DATA.glob("*.json.gz"))
    first = [p for p in files if p.name.startswith(("hospitalInformation", "practitionerInformation"))]
    first.sort(key=lambda p: not p.name.startswith("hospital"))
    return first + [p for p in files if p not in first]


def load(url: str, log: Path, notes: list[str], workers: int) -> float:
    """Migrate and import the Synthea set; seconds taken."""
    if url.startswith("postgresql") and url.rsplit("/", 1)[1].startswith("bench_"):
        drop_database(url, create=True)
    elif url.startswith("sqlite:///"):
        drop_database(url)
    hub(["db", "upgrade"], url, log)
    with analyzing(url if url.startswith("postgresql") else None, notes):
        return hub(["import", *map(str, source_files()), "--workers", str(workers)], url, log)


def call(router: FhirRouter, principal: Principal, method: str, path: str, body: dict | None = None) -> dict:
    response = router.handle(
        FhirRequest(method, path, body=orjson.dumps(body) if body else None, principal=principal)
    )
    if response.status >= 300:
        raise SystemExit(f"{method} {path}: HTTP {response.status} {(response.body or b'')[:500]!r}")
    return orjson.loads(response.body) if response.body else {}


def consent(patient: str, effect: str, actor: str, purpose: str | None, labels: list[str] | None) -> dict:
    provision: dict = {"type": effect}
    if actor != "*":
        provision["actor"] = [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "IRCP",
                        }
                    ]
                },
                "reference": {"reference": actor},
            }
        ]
    if purpose:
        provision["purpose"] = [{"system": ACT_REASON, "code": purpose}]
    if labels:
        provision["securityLabel"] = [{"system": ACT_CODE, "code": code} for code in labels]
    scope = "research" if purpose == "HRESCH" else "patient-privacy"
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "provision": provision,
    }


def seed_access(router: FhirRouter, seed: int) -> None:
    """Organizations, managing organizations and Consents (see the module docstring)."""
    admin = system_principal("bench-access")
    for org in (ORG_A, ORG_B, ORG_C):
        call(
            router,
            admin,
            "PUT",
            f"Organization/{org}",
            {"resourceType": "Organization", "id": org, "name": org},
        )
    call(router, admin, "PUT", f"Practitioner/{DOCTOR}", {"resourceType": "Practitioner", "id": DOCTOR})
    with router.ctx.store.read() as conn:
        ids = sorted(
            r[0]
            for r in conn.execute(
                sa.text("SELECT res_id FROM resource WHERE res_type = 'Patient' AND NOT deleted")
            )
        )
    rng = random.Random(seed)
    rng.shuffle(ids)
    n = len(ids)
    for i, pid in enumerate(ids):
        share = i / n
        patient = call(router, admin, "GET", f"Patient/{pid}")
        org = ORG_A if share < 0.5 else (ORG_B if share < 0.8 or i % 2 else ORG_C)
        patient["managingOrganization"] = {"reference": f"Organization/{org}"}
        call(router, admin, "PUT", f"Patient/{pid}", patient)
        consents = []
        if share < 0.5 and i % 10 == 1:
            consents.append(consent(pid, "deny", f"Organization/{ORG_A}", None, None))
        elif share < 0.5 and i % 10 == 2:
            consents.append(consent(pid, "permit", f"Organization/{ORG_A}", "TREAT", ["N", "PSY", "SEX"]))
        elif 0.5 <= share < 0.7:
            consents.append(consent(pid, "permit", f"Organization/{ORG_A}", "TREAT", None))
        if rng.random() < 0.15:
            consents.append(consent(pid, "permit", "*", "HRESCH", None))
        for body in consents:
            call(router, admin, "POST", "Consent", body)
        if share >= 0.8 and i % 3 == 0:
            call(router, admin, "POST", "CareTeam", care_team(pid, current=i % 2 == 0))


def care_team(patient: str, current: bool) -> dict:
    """A care team with the clinician on it: in force since 2020, or one that ended in 2016."""
    period = {"start": "2020-01-01"} if current else {"start": "2015-01-01", "end": "2016-12-31"}
    return {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{patient}"},
        "period": period,
        "participant": [{"member": {"reference": f"Practitioner/{DOCTOR}"}}],
    }


def population(router: FhirRouter, access: Access) -> Population:
    """Which patients the clinician may see (through the access layer itself)."""
    with router.ctx.store.read() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT res_id, pid, content FROM resource WHERE res_type = 'Patient' AND NOT deleted ORDER BY res_id"
            )
        ).all()
        pids = {r.pid: r.res_id for r in rows}
        seen = {pids[p] for p in pids if access.may_see(conn, p)}
        groups = {
            "grants": conn.execute(sa.text("SELECT count(*) FROM access_grant")).scalar_one(),
            "compartment rows": conn.execute(sa.text("SELECT count(*) FROM compartment")).scalar_one(),
            "sensitive-labelled compartment rows": conn.execute(
                sa.text(f"SELECT count(*) FROM compartment WHERE (labels & {labels.SENSITIVE}) <> 0")
            ).scalar_one(),
        }
    families = []
    with system_access("bench-access"), router.ctx.store.read() as conn:
        for r in rows:
            data = router.ctx.store.get(conn, "Patient", r.res_id).parsed()
            name = (data.get("name") or [{}])[0].get("family")
            if isinstance(name, str) and len(name) >= 3:
                families.append(name[:3])
    patients = [r.res_id for r in rows]
    return Population(
        patients,
        [p for p in patients if p in seen],
        [p for p in patients if p not in seen],
        sorted(set(families)),
        groups,
    )


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    kind: str
    path: str
    query: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        from urllib.parse import urlencode

        return self.path + ("?" + urlencode(self.query) if self.query else "")


def make_request(kind: str, people: Population, rng: random.Random) -> Request:
    patient = rng.choice(people.visible if rng.random() < 0.75 or not people.hidden else people.hidden)
    if kind == "obs_code":
        code = rng.choice(COMMON_CODES)
        return Request(
            kind, "Observation", (("code", f"{LOINC}|{code}"), ("_total", "accurate"), ("_count", "20"))
        )
    if kind == "obs_patient":
        return Request(kind, "Observation", (("patient", patient), ("_sort", "-date")))
    if kind == "obs_pat_code":
        return Request(
            kind, "Observation", (("patient", patient), ("code", f"{LOINC}|{rng.choice(COMMON_CODES)}"))
        )
    if kind == "name":
        return Request(kind, "Patient", (("name", rng.choice(people.families)),))
    if kind == "cond_active":
        return Request(kind, "Condition", (("clinical-status", "active"), ("_count", "50")))
    if kind == "enc_date":
        return Request(kind, "Encounter", (("date", f"ge{rng.randint(2005, 2019)}"), ("_count", "20")))
    if kind == "obs_include":
        code = rng.choice(COMMON_CODES)
        return Request(
            kind, "Observation", (("code", f"{LOINC}|{code}"), ("_include", "Observation:patient"))
        )
    if kind == "has":
        return Request(kind, "Patient", (("_has:Observation:patient:code", rng.choice(HAS_CODES)),))
    if kind == "everything":  # for a hidden patient the clinician gets a quick 404
        return Request(kind, f"Patient/{rng.choice(people.visible)}/$everything")
    raise ValueError(kind)


# --- running one request ---------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    entries: int  # entries returned (matches and includes)
    total: int | None
    status: int


def via_router(router: FhirRouter, principal: Principal, request: Request) -> Sample:
    fhir = FhirRequest("GET", request.path, query=list(request.query), principal=principal)
    started = time.perf_counter()
    response = router.handle(fhir)
    seconds = time.perf_counter() - started
    body = orjson.loads(response.body or b"{}") if response.status == 200 else {}
    return Sample(seconds, len(body.get("entry", ())), body.get("total"), response.status)


def via_engine(router: FhirRouter, access: Access | None, request: Request) -> Sample:
    """The search (or $everything page) alone, under ``serving(access)``: no admission, no audit."""
    ctx = router.ctx
    # The admin: an unrestricted Access (visible() is None); no Access at all fails closed.
    current = system_access_for("bench-admin") if access is None else replace(access, touched=[])
    if request.kind == "everything":
        from hub.ops.everything import _everything

        patient = request.path.split("/")[1]
        fhir = FhirRequest("GET", request.path, principal=None)
        started = time.perf_counter()
        with serving(current):
            response = _everything(router, fhir, [patient], request.path, must_exist=patient)
        seconds = time.perf_counter() - started
        body = orjson.loads(response.body or b"{}")
        return Sample(seconds, len(body.get("entry", ())), body.get("total"), response.status)
    started = time.perf_counter()
    with serving(current), ctx.store.read() as conn:
        query = search_engine.parse(
            ctx.registry,
            request.path,
            list(request.query),
            base_url=ctx.base_url,
            default_count=ctx.default_count,
            max_count=ctx.max_count,
        )
        result = search_engine.execute(conn, ctx.registry, query)
    seconds = time.perf_counter() - started
    return Sample(seconds, len(result.matches) + len(result.included), result.total, 200)


# --- statistics and the table ----------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000 if ordered else float("nan")


@dataclass
class Cell:
    admin: list[Sample] = field(default_factory=list)
    clinician: list[Sample] = field(default_factory=list)

    def times(self, who: str) -> list[float]:
        return [s.seconds for s in getattr(self, who)]

    def ratio_time(self) -> float:
        return sum(self.times("clinician")) / sum(self.times("admin"))

    def ratio(self, q: float) -> float:
        return pct(self.times("clinician"), q) / pct(self.times("admin"), q)

    def rps(self, who: str) -> float:
        return len(getattr(self, who)) / sum(self.times(who))

    def seen(self) -> str:
        """Share of the admin's entries the clinician got (and of the totals, when counted)."""
        admin_entries = sum(s.entries for s in self.admin)
        shown = f"{sum(s.entries for s in self.clinician) / admin_entries:4.0%}" if admin_entries else "  - "
        totals = [s.total for s in self.admin if s.total is not None]
        if totals and sum(totals):
            clin = sum(s.total or 0 for s in self.clinician if s.total is not None)
            shown += f" (total {clin / sum(totals):3.0%})"
        return shown


def run_level(
    level: str,
    router: FhirRouter,
    plans: dict[str, list[Request]],
    admin: Principal,
    clinician: Principal,
    clinician_access: Access,
    warmup: int,
) -> dict[str, Cell]:
    def runner(who: str) -> Callable[[Request], Sample]:
        if level == "router":
            principal = admin if who == "admin" else clinician
            return lambda request: via_router(router, principal, request)
        access = None if who == "admin" else clinician_access
        return lambda request: via_engine(router, access, request)

    run = {who: runner(who) for who in ("admin", "clinician")}
    cells: dict[str, Cell] = {}
    for kind, requests in plans.items():
        for request in requests[:warmup]:
            for who in ("admin", "clinician"):
                sample = run[who](request)
                if sample.status != 200:
                    raise SystemExit(f"{level} {who} {request.text()}: HTTP {sample.status}")
        cell = cells[kind] = Cell()
        for i, request in enumerate(requests):
            order = ("admin", "clinician") if i % 2 == 0 else ("clinician", "admin")
            for who in order:
                getattr(cell, who).append(run[who](request))
    return cells


def table(title: str, cells: dict[str, Cell]) -> list[str]:
    head = "{:12s} {:>5} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>7} | {:>6} {:>6} {:>6} | {}"
    lines = [
        f"-- {title}",
        head.format(
            "kind",
            "n",
            "adm p50",
            "adm p95",
            "adm r/s",
            "cli p50",
            "cli p95",
            "cli r/s",
            "x p50",
            "x p95",
            "x time",
            "clinician saw",
        ),  # fmt: skip
    ]
    everything = Cell()
    for kind, cell in cells.items():
        everything.admin += cell.admin
        everything.clinician += cell.clinician
        lines.append(_row(head, kind, cell))
    lines.append(_row(head, "overall", everything))
    return lines


def _row(head: str, kind: str, cell: Cell) -> str:
    a, c = cell.times("admin"), cell.times("clinician")
    return head.format(
        kind,
        len(a),
        f"{pct(a, 50):.2f}",
        f"{pct(a, 95):.2f}",
        f"{cell.rps('admin'):.0f}",
        f"{pct(c, 50):.2f}",
        f"{pct(c, 95):.2f}",
        f"{cell.rps('clinician'):.0f}",
        f"{cell.ratio(50):.2f}",
        f"{cell.ratio(95):.2f}",
        f"{cell.ratio_time():.2f}",
        cell.seen(),
    )


# --- EXPLAIN ---------------------------------------------------------------------------------


def explain(router: FhirRouter, principal: Principal, request: Request, full: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of every SELECT the router runs for this request."""
    engine = router.ctx.store.engine
    captured: list[tuple[str, Any]] = []

    def grab(conn, cursor, statement, params, context, many):  # type: ignore[no-untyped-def]
        captured.append((statement, params))

    via_router(router, principal, request)  # warm
    sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        sample = via_router(router, principal, request)
    finally:
        sa.event.remove(engine, "before_cursor_execute", grab)
    out = [
        f"{principal.role.value}: GET {request.text()} -> HTTP {sample.status}, {len(captured)} statements"
    ]
    with engine.connect() as conn:
        for statement, params in captured:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            if "audit_chain" in statement or statement.lstrip().upper().startswith("SELECT PG_ADVISORY"):
                continue
            rows = [
                r[0] for r in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()
            ]  # type: ignore[arg-type]
            timing = next((r for r in rows if r.startswith("Execution Time")), "")
            out.append(f"  [{timing}] " + " ".join(statement.split())[:160])
            if full:
                out += [
                    "    SQL: " + " ".join(statement.split()),
                    f"    params: {params}",
                    *("    " + r for r in rows),
                ]
    return "\n".join(out)


# --- the run ---------------------------------------------------------------------------------


def widen_open_set(url: str, extra: int) -> str:
    """The large case: org A manages ``extra`` more patients (policy grants, as a Patient's
    managingOrganization makes them) who hold no data in this hub, so the set of patients
    open to the clinician is thousands, while the rows searched stay the same. Written
    straight into ``access_grant`` (source pids below any break-glass id), once per copy."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    rows = [
        {
            "pid": -(10**9) - i,
            "patient_id": f"bench-far-{i}",
            "grantee": f"Organization/{ORG_A}",
            "purpose": "TREAT",
            "effect": "permit",
            "labels": labels.NORMAL,
            "basis": "policy",
        }
        for i in range(extra)
    ]
    statement = sa.text(
        "INSERT INTO access_grant (pid, patient_id, grantee, purpose, effect, labels, basis)"
        " VALUES (:pid, :patient_id, :grantee, :purpose, :effect, :labels, :basis)"
    )
    with engine.begin() as conn:
        present = conn.execute(sa.text("SELECT count(*) FROM access_grant WHERE pid <= -1000000000"))
        if not present.scalar_one():
            conn.execute(statement, rows)
    engine.dispose()
    return f"open set widened: {extra:,} more policy-granted patients of org A (no data)"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def seeded(url: str, reuse: bool) -> tuple[bool, dict[str, int]]:
    counts = count_resources(url) if reuse else {}
    marker = f"SELECT 1 FROM resource WHERE res_type = 'Organization' AND res_id = '{ORG_A}'"
    return bool(counts) and bool(sql(url, marker)), counts


def prepare(url: str, args: argparse.Namespace, log: Path, notes: list[str]) -> None:
    """Load the Synthea set into ``url`` and give it its access structure."""
    backend = "sqlite" if url.startswith("sqlite") else "postgresql"
    print(f"[{backend}] loading the 300-patient Synthea set ... log: {log}", flush=True)
    seconds = load(url, log, notes, args.import_workers)
    notes.append(f"hub import took {seconds:.0f} s")
    router = build_router(Settings(database_url=url))
    started = time.perf_counter()
    seed_access(router, args.seed)
    notes.append(f"access structure written through the router in {time.perf_counter() - started:.0f} s")
    router.ctx.store.engine.dispose()


def bench(url: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    backend = "sqlite" if url.startswith("sqlite") else "postgresql"
    notes: list[str] = []
    log = workdir / f"{backend}.log"
    if args.urls:  # the given database itself: loaded when empty, used as it is when seeded
        ready, counts = seeded(url, True)
        if not ready and counts:
            raise SystemExit(f"{url} holds data but not this benchmark's: give an empty database")
        if not ready:
            prepare(url, args, log, notes)
    else:  # a seeded template (kept with --keep-db, reused with --reuse-db), cloned per run
        seed = database_url(backend, args.cache, "bench_access_seed")
        if not seeded(seed, args.reuse_db)[0]:
            prepare(seed, args, log, notes)
        clone(seed, url)
        notes.append("run on a fresh copy of the seeded database")
    if args.open_set:
        notes.append(widen_open_set(url, args.open_set))
    started = time.perf_counter()
    # PostgreSQL: VACUUM too, as autovacuum would have (it is off on some hosts): without
    # the visibility map, index-only scans of compartment and the indexes visit the heap.
    analyze = "ANALYZE" if backend == "sqlite" else "VACUUM ANALYZE"
    sql(url, analyze)
    notes.append(f"{analyze} took {time.perf_counter() - started:.1f} s")
    counts = count_resources(url)

    router = build_router(Settings(database_url=url))
    if args.pg_set and backend == "postgresql":
        settings = [x.split("=", 1) for x in args.pg_set]
        notes.append("PostgreSQL session settings: " + ", ".join(f"{k}={v}" for k, v in settings))

        @sa.event.listens_for(router.ctx.store.engine, "connect")
        def _settings(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            with dbapi_connection.cursor() as cursor:
                for name, value in settings:
                    cursor.execute(f"SET {name} = {value}")
            dbapi_connection.commit()

        router.ctx.store.engine.dispose()  # connections opened before the listener: gone

    admin = system_principal("bench-admin")
    clinician = Principal(
        subject="bench-dr",
        role=Role.CLINICIAN,
        scopes=ScopeSet.parse("user/*.cruds"),
        fhir_user=f"Practitioner/{DOCTOR}",
        organizations=(ORG_A,),
    )
    with router.ctx.store.read() as conn:
        access = decide(conn, clinician, router.ctx.registry, purpose=None, policy=router.gate.policy)
    people = population(router, access)
    rng = random.Random(args.seed)
    kinds = [k for k in KINDS if k in args.kinds]
    plans = {
        k: [
            make_request(k, people, rng)
            for _ in range(args.everything_requests if k == "everything" else args.requests)
        ]
        for k in kinds
    }
    out = [
        f"== {backend}: {url}",
        f"   {sum(counts.values()):,} resources ({counts.get('Patient', 0)} Patients, "
        f"{counts.get('Observation', 0):,} Observations, {counts.get('AuditEvent', 0):,} AuditEvents); "
        + ", ".join(f"{v:,} {k}" for k, v in people.groups.items()),
        f"   the clinician may see {len(people.visible)} of {len(people.patients)} patients' records; "
        f"{len(access.identities)} identities ({', '.join(sorted({i.split('/')[0] for i in access.identities}))})",
    ]
    print("\n".join(out), flush=True)
    results: dict[str, dict[str, Cell]] = {}
    for level in args.levels:
        before = loadavg()
        started = time.perf_counter()
        results[level] = run_level(level, router, plans, admin, clinician, access, args.warmup)
        lines = table(
            f"{backend}, {level} level ({time.perf_counter() - started:.0f} s; load average {before} -> {loadavg()})",
            results[level],
        )
        print("\n".join(lines), flush=True)
        out += lines
    if args.explain and backend == "postgresql":
        level = "engine" if "engine" in results else next(iter(results))
        worst = max(results[level], key=lambda k: results[level][k].ratio(50))
        kinds_to_explain = args.explain_kinds or [worst]
        for kind in kinds_to_explain:
            request = plans[kind][0]
            text = [
                f"-- EXPLAIN ANALYZE, {kind}",
                explain(router, clinician, request, True),
                explain(router, admin, request, False),
            ]
            print("\n".join(text), flush=True)
            out += text
    out += [f"   note: {n}" for n in notes]
    router.ctx.store.engine.dispose()
    if not args.keep_db and not args.urls:
        drop_database(url)
        drop_database(database_url(backend, args.cache, "bench_access_seed"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("urls", nargs="*", help="databases to use instead of fresh ones (empty: loaded; seeded: reused)")
    add("--backends", default="sqlite,postgresql")
    add("--levels", default=",".join(LEVELS))
    add("--kinds", default=",".join(KINDS))
    add("--requests", type=int, default=300, help="measured requests per kind and principal")
    add("--everything-requests", type=int, default=150)
    add("--warmup", type=int, default=10, help="unmeasured requests per kind and principal first")
    add("--seed", type=int, default=20240601)
    add("--import-workers", type=int, default=2)
    add("--explain", action="store_true", help="EXPLAIN ANALYZE the worst kind on PostgreSQL")
    add("--explain-kinds", default="", help="explain these kinds instead (comma-separated)")
    add(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="SET on each PostgreSQL connection (e.g. jit=off)",
    )
    add(
        "--open-set",
        type=int,
        default=0,
        metavar="N",
        help="the large case: N more patients (no data) policy-granted to the clinician's org",
    )
    add("--keep-db", action="store_true", help="keep the bench_access(_seed) databases")
    add("--reuse-db", action="store_true", help="skip the load when a kept seed database is there")
    add("--cache", type=Path, default=REPO / "var" / "bench-data", help="SQLite files and logs")
    args = parser.parse_args()
    args.levels = [x for x in args.levels.split(",") if x]
    args.kinds = [x for x in args.kinds.split(",") if x]
    args.explain_kinds = [x for x in args.explain_kinds.split(",") if x]
    urls = args.urls or [database_url(b, args.cache) for b in args.backends.split(",")]
    workdir = args.cache / "runs" / time.strftime("access-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    print(f"logs: {workdir}; {os.cpu_count()} cores, load average {loadavg()}", flush=True)
    report: list[str] = []
    for url in urls:
        report += bench(url, args, workdir)
    print("\n\n".join(["", "\n".join(report)]))
    print(
        f"\ngoal: clinician (consent-enforced) time <= {GOAL}x admin time, same requests; "
        "'x time' = total clinician time / total admin time; 'x p50'/'x p95' = ratio of percentiles."
        "\nSequential, in-process requests; the machine's load is shown per level (shared cores inflate p95)."
    )


if __name__ == "__main__":
    main()
