"""Connector benchmark (issue 11): HL7 v2 over real MLLP sockets, and QĐ 130 episodes.

HL7 v2: a listener process (this file with ``--serve``: ``connectors.mllp.MllpServer`` over
the normal pipeline, ``connectors.worker.Runner`` in-process, every message one FHIR
transaction with its Provenance and AuditEvent, ACK after the commit) and, in this process,
``--connections`` lean asyncio senders, each sending one message and waiting for its ACK
(what MLLP senders do). The mix is one ADT^A01 then one ORU^R01 (two OBX) per patient, in
that order on one connection. Prints the conditions, messages/s, p50/p99 ACK latency, the
listener's peak RSS (VmHWM), its group-commit batches, whether hl7apy was ever imported (the
parse path), and a baseline from the same run: the same bytes COPYed into a bare table, and
INSERTed in transactions of ``--batch-size`` (the database's ceiling for storing them).

QĐ 130 (``--xml130 EPISODES``): envelopes from ``tests/xml130_factory.py`` (one episode each
unless ``--episodes-per-file``) through the upload path, ``inbox.receive`` then
``Pipeline.process_ids``, in-process; episodes/s and resources written.

``--cost N``: the processing side alone, in-process (no listener): N HL7 messages (and
``--xml130`` episodes) received in batches of ``--batch-size``, then ``Pipeline.process_ids``;
client CPU ms and SQL statements (``before_cursor_execute``: an executemany counts once) per
message, receipt excluded. ``BENCH_DATABASE`` names the PostgreSQL database (shared server).

``--profile``: py-spy samples the listener process during the HL7 run (inclusive and self
time per function), pyinstrument profiles the QĐ 130 run.

    .venv/bin/python bench/connectors.py --messages 4000 --connections 16
    .venv/bin/python bench/connectors.py --messages 2000 --xml130 400 --profile
    .venv/bin/python bench/connectors.py --cost 600 --xml130 200 --batch-size 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PG = "postgresql://postgres@127.0.0.1:5432"
DATABASE = os.environ.get("BENCH_DATABASE", "bench_connectors")  # several people share the server
FACILITY = "64010"  # tests/test_mllp.py's messages come from this facility


# --- databases -------------------------------------------------------------------------------


def fresh_database(backend: str, work: Path) -> str:
    import sqlalchemy as sa

    from hub.db.migrate import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{work / 'bench.sqlite3'}"
    else:
        admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{DATABASE}"'))
        admin.dispose()
        url = f"{PG}/{DATABASE}"
    upgrade(url)
    return url


def drop_database(backend: str) -> None:
    if backend != "postgresql":
        return
    import sqlalchemy as sa

    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
    admin.dispose()


# --- the listener process ------------------------------------------------------------------------


class ReceiptOnly:
    """``--receipt-only``: a runner that processes nothing and answers "processed", so the
    run measures the listener and the durable receipt alone (the messages stay queued)."""

    async def process(self, ids: list[int]) -> dict[int, Any]:
        from connectors.pipeline import Outcome

        return {i: Outcome("processed", None, None, False, []) for i in ids}


def serve(url: str, source_name: str, batch_size: int, lanes: int | None, receipt_only: bool) -> None:
    """``--serve``: a listener on a free port; prints "PORT n", runs until stdin closes, then
    prints its statistics as one JSON line."""
    from connectors import sources
    from connectors.mllp import MllpServer
    from connectors.model import Source
    from connectors.pipeline import Pipeline
    from connectors.worker import Runner
    from hub.app_factory import build_router
    from hub.settings import Settings

    router = build_router(Settings(database_url=url))
    source = sources.add(
        router, Source(source_name, FACILITY, "BVĐK tỉnh Gia Lai", "provincial", "hl7v2-mllp")
    )
    runner: Any = ReceiptOnly() if receipt_only else Runner(Pipeline(router))

    async def run() -> dict[str, Any]:
        server = MllpServer(
            router.ctx.store.engine,
            source,
            runner,
            host="127.0.0.1",
            port=0,
            batch_size=batch_size,
            lanes=lanes,
        )
        await server.start()
        print(f"PORT {server.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
        await server.stop()
        stats = server.stats
        return {
            "messages": stats.messages,
            "acks": stats.acks,
            "no_ack": stats.no_ack,
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
            "lanes": server.lanes,
            "hl7apy_loaded": "hl7apy" in sys.modules,
            "vmhwm_mb": _vmhwm_mb(os.getpid()),
            "cpu_s": sum(os.times()[:2]),
        }

    print(json.dumps(asyncio.run(run())), flush=True)


def _vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- senders ---------------------------------------------------------------------------------


def hl7_feed(pairs: int, tag: str) -> list[list[bytes]]:
    """Per patient: ADT^A01 then ORU^R01 (tests/test_mllp.py's synthetic messages)."""
    from test_mllp import adt_a01, cccd, oru_r01

    return [
        [
            adt_a01(f"A{tag}-{i}", cid, visit=f"V{tag}-{i}"),
            oru_r01(f"O{tag}-{i}", cid, filler=f"F{tag}-{i}"),
        ]
        for i in range(pairs)
        for cid in (cccd(),)
    ]


async def send_all(
    port: int, per_connection: list[list[bytes]]
) -> tuple[list[float], collections.Counter[str]]:
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()

    async def connection(messages: list[bytes]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for message in messages:
                started = time.perf_counter()
                writer.write(b"\x0b" + message + b"\x1c\r")
                reply = await reader.readuntil(b"\x1c\r")
                latencies.append(time.perf_counter() - started)
                msa = reply.split(b"\rMSA|", 1)[1][:2] if b"\rMSA|" in reply else b"??"
                codes[msa.decode()] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(messages) for messages in per_connection))
    return latencies, codes


def split(feed: list[list[bytes]], connections: int) -> list[list[bytes]]:
    """Patients dealt round-robin to connections; a patient's messages stay in order."""
    out: list[list[bytes]] = [[] for _ in range(connections)]
    for i, patient in enumerate(feed):
        out[i % connections].extend(patient)
    return [messages for messages in out if messages]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


# --- py-spy --------------------------------------------------------------------------------------


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        print("  (py-spy not installed: no profile)")
        return None
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(out),
            "--rate",
            "200",
            "--threads",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_py_spy(path: Path, top: int = 28) -> None:
    """Inclusive and self share of samples per function (collapsed stacks from py-spy)."""
    if not path.exists():
        print("  (py-spy wrote no profile)")
        return
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";") if not frame.startswith("thread")]
        if not frames:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        self_time[frames[-1]] += count
    if not total:
        print("  (no samples)")
        return
    print(f"  py-spy: {total} samples of the listener process (all threads, idle excluded)")
    print("  inclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"    {100 * count / total:5.1f}%  {frame}")
    print("  self:")
    for frame, count in self_time.most_common(15):
        print(f"    {100 * count / total:5.1f}%  {frame}")


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)" with the repo's modules dotted.
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    if str(REPO) in file:
        file = file.split(str(REPO) + "/", 1)[1].removesuffix(".py").replace("/", ".")
    elif "site-packages/" in file:
        file = file.split("site-packages/", 1)[1].split("/", 1)[0]
    else:
        file = Path(file).name
    return f"{name} ({file})"


# --- baseline --------------------------------------------------------------------------------


def baseline(url: str, raws: list[bytes], batch_size: int) -> dict[str, float]:
    """The same bytes stored bare: COPY into a table, and INSERTs committed per batch."""
    import sqlalchemy as sa

    from hub.db.engine import create_engine

    engine = create_engine(url)
    result: dict[str, float] = {}
    postgres = engine.dialect.name == "postgresql"
    with engine.connect().execution_options(write=True) as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS bench_raw"))
        if postgres:
            conn.execute(sa.text("CREATE TABLE bench_raw (id bigserial PRIMARY KEY, body bytea)"))
        else:
            conn.execute(sa.text("CREATE TABLE bench_raw (id integer PRIMARY KEY, body blob)"))
        conn.commit()
        if postgres:
            started = time.perf_counter()
            dbapi = conn.connection.driver_connection
            assert dbapi is not None
            with dbapi.cursor() as cursor, cursor.copy("COPY bench_raw (body) FROM STDIN") as copy:
                for raw in raws:
                    copy.write_row((raw,))
            dbapi.commit()
            result["copy_per_s"] = len(raws) / (time.perf_counter() - started)
        insert = sa.text("INSERT INTO bench_raw (body) VALUES (:body)")
        started = time.perf_counter()
        for start in range(0, len(raws), batch_size):
            conn.execute(insert, [{"body": raw} for raw in raws[start : start + batch_size]])
            conn.commit()
        result["insert_per_s"] = len(raws) / (time.perf_counter() - started)
        conn.execute(sa.text("DROP TABLE bench_raw"))
        conn.commit()
    engine.dispose()
    return result


# --- runs ------------------------------------------------------------------------------------------


def run_hl7(args: argparse.Namespace, url: str, env: dict[str, str], work: Path) -> None:
    source_name = f"bench-mllp-{uuid.uuid4().hex[:6]}"
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            url,
            "--source",
            source_name,
            "--batch-size",
            str(args.batch_size),
            *(["--lanes", str(args.lanes)] if args.lanes else []),
            *(["--receipt-only"] if args.receipt_only else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert server.stdout is not None and server.stdin is not None
    line = server.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise SystemExit(f"the listener did not start: {line!r}")
    port = int(line.split()[1])
    tag = uuid.uuid4().hex[:6]
    warm = hl7_feed(20, "w" + tag)
    asyncio.run(send_all(port, split(warm, 4)))
    feed = hl7_feed(args.messages // 2, tag)
    per_connection = split(feed, args.connections)
    spy_out = work / "py-spy.txt"
    spy = start_py_spy(server.pid, spy_out) if args.profile else None
    cpu_before = _cpu_of(server.pid)
    started = time.perf_counter()
    latencies, codes = asyncio.run(send_all(port, per_connection))
    seconds = time.perf_counter() - started
    cpu_listener = _cpu_of(server.pid) - cpu_before
    if spy is not None:
        spy.send_signal(2)  # SIGINT: py-spy writes its file
        spy.wait(timeout=60)
    server.stdin.close()
    stats = json.loads(server.stdout.readline() or b"{}")
    server.wait(timeout=60)
    sent = len(latencies)
    what = "RECEIPT ONLY: stored in the inbox, not processed" if args.receipt_only else "ACK after commit"
    print(f"\nHL7 v2 over MLLP (ADT^A01 + ORU^R01 per patient, {what})")
    print(f"  messages: {sent} over {len(per_connection)} connections; ACKs {dict(codes)}")
    print(f"  throughput: {sent / seconds:,.0f} messages/s ({seconds:.1f} s)")
    print(
        f"  ACK latency: p50 {1000 * percentile(latencies, 0.5):.1f} ms, p99 {1000 * percentile(latencies, 0.99):.1f} ms,"
        f" mean {1000 * statistics.fmean(latencies):.1f} ms"
    )
    print(
        f"  group commit: {stats.get('batches')} receipt batches for {stats.get('messages')} messages"
        f" (incl. {len(warm) * 2} warm-up), largest {stats.get('largest_batch')}; {stats.get('lanes')} processing lanes"
    )
    print(
        f"  listener: peak RSS {stats.get('vmhwm_mb', 0):.0f} MB, CPU {cpu_listener:.1f} s"
        f" ({cpu_listener / seconds:.2f} cores); hl7apy imported: {stats.get('hl7apy_loaded')}"
    )
    print(f"  sender process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    raws = [m for patient in feed for m in patient]
    base = baseline(url, raws, args.batch_size)
    for name, rate in base.items():
        print(
            f"  baseline {name.replace('_per_s', '')} of the same bytes: {rate:,.0f} messages/s"
            f" (hub = {sent / seconds / rate:.1%} of it)"
        )
    if not args.receipt_only:
        _check_inbox(url, source_name, sent + len(warm) * 2)
    if spy is not None:
        summarize_py_spy(spy_out)


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _check_inbox(url: str, source: str, expected: int) -> None:
    from connectors import inbox
    from hub.db.engine import create_engine

    engine = create_engine(url)
    (status,) = inbox.status(engine, source)
    engine.dispose()
    ok = status.counts.get("processed", 0) == expected
    print(
        f"  inbox of the source: {status.counts} ({'as expected' if ok else f'EXPECTED {expected} processed'})"
    )


def run_xml130(args: argparse.Namespace, url: str) -> None:
    try:
        from xml130_factory import FACILITY as XML_FACILITY
        from xml130_factory import envelope, episode
    except ImportError:
        print("\nQĐ 130: tests/xml130_factory.py not found: skipped")
        return
    from connectors import inbox, sources
    from connectors.model import Source
    from connectors.pipeline import Pipeline
    from hub.app_factory import build_router
    from hub.settings import Settings

    router = build_router(Settings(database_url=url))
    engine = router.ctx.store.engine
    source = sources.add(
        router, Source(f"bench-xml-{uuid.uuid4().hex[:6]}", XML_FACILITY, "TTYT Chư Sê", "district", "xml130")
    )
    pipeline = Pipeline(router)
    base = int(time.time()) % 100_000 * 1000
    per_file = args.episodes_per_file
    files = [
        envelope([episode(base + i + j) for j in range(per_file)]) for i in range(0, args.xml130, per_file)
    ]
    # Warm-up (imports, caches): one file, not counted.
    warm = inbox.receive(engine, source, [envelope([episode(base + 10**6)])])
    pipeline.process_ids([r.id for r in warm])
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler()
        profiler.start()
    started = time.perf_counter()
    resources = 0
    states: collections.Counter[str] = collections.Counter()
    for start in range(0, len(files), args.xml_batch):
        received = inbox.receive(engine, source, files[start : start + args.xml_batch])
        outcomes = pipeline.process_ids([r.id for r in received])
        for outcome in outcomes.values():
            states[outcome.state] += 1
            resources += len(outcome.resources)
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    episodes = len(files) * per_file
    print("\nQĐ 130 XML through the upload path (inbox.receive + Pipeline.process_ids, in-process)")
    print(
        f"  episodes: {episodes} in {len(files)} files ({per_file} per file), {args.xml_batch} files per batch;"
        f" outcomes {dict(states)}"
    )
    print(
        f"  throughput: {episodes / seconds:,.1f} episodes/s ({seconds:.1f} s); {resources} resources written"
        f" ({resources / max(episodes, 1):.1f} per episode, {resources / seconds:,.0f}/s)"
    )
    print(f"  process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    engine.dispose()
    if profiler is not None:
        print(profiler.output_text(unicode=True, color=False, show_all=False)[:12000])


def run_cost(args: argparse.Namespace, url: str) -> None:
    """``--cost N``: the processing side alone, in-process: N HL7 messages (ADT^A01 + ORU^R01
    per patient) received in batches of ``--batch-size`` and processed by
    ``Pipeline.process_ids``; the client CPU (thread time) and the SQL statements
    (SQLAlchemy ``before_cursor_execute``) per message of the processing, receipt excluded.
    With ``--xml130``, the same for that many QĐ 130 episodes (one per file)."""
    import sqlalchemy as sa

    from connectors import inbox, sources
    from connectors.model import Source
    from connectors.pipeline import Pipeline
    from hub.app_factory import build_router
    from hub.settings import Settings

    router = build_router(Settings(database_url=url))
    engine = router.ctx.store.engine
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    sa.event.listen(engine, "before_cursor_execute", count)
    pipeline = Pipeline(router, batch_size=args.batch_size)

    def measure(label: str, source: Any, raws: list[bytes], unit: str) -> None:
        warm = raws[: args.batch_size]
        pipeline.process_ids([r.id for r in inbox.receive(engine, source, warm)])
        cpu = wall = 0.0
        counted = 0
        states: collections.Counter[str] = collections.Counter()
        for start in range(len(warm), len(raws), args.batch_size):
            received = inbox.receive(engine, source, raws[start : start + args.batch_size])
            counted -= statements[0]
            started_cpu, started = time.thread_time(), time.perf_counter()
            outcomes = pipeline.process_ids([r.id for r in received])
            cpu += time.thread_time() - started_cpu
            wall += time.perf_counter() - started
            counted += statements[0]
            states.update(o.state for o in outcomes.values())
        n = len(raws) - len(warm)
        print(
            f"  {label}: {n} {unit} in batches of {args.batch_size}: {1000 * cpu / n:.2f} ms CPU/{unit[:-1]},"
            f" {counted / n:.1f} SQL statements/{unit[:-1]}, {n / wall:,.0f} {unit}/s processing alone"
            f" (wall {wall:.1f} s); outcomes {dict(states)}"
        )

    print(f"\nProcessing cost (in-process Pipeline.process_ids, receipt excluded, {args.backend})")
    if args.cost:
        hl7_source = sources.add(
            router,
            Source(
                f"bench-cost-{uuid.uuid4().hex[:6]}",
                FACILITY,
                "BVĐK tỉnh Gia Lai",
                "provincial",
                "hl7v2-mllp",
            ),
        )
        feed = hl7_feed((args.cost + args.batch_size) // 2, uuid.uuid4().hex[:6])
        measure("HL7 v2", hl7_source, [m for patient in feed for m in patient], "messages")
    if args.xml130:
        from xml130_factory import FACILITY as XML_FACILITY
        from xml130_factory import envelope, episode

        xml_source = sources.add(
            router,
            Source(f"bench-xmlc-{uuid.uuid4().hex[:6]}", XML_FACILITY, "TTYT Chư Sê", "district", "xml130"),
        )
        base = int(time.time()) % 100_000 * 1000
        files = [envelope([episode(base + i)]) for i in range(args.xml130 + args.batch_size)]
        measure("QĐ 130", xml_source, files, "episodes")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument(
        "--messages", type=int, default=4000, help="HL7 messages (half ADT, half ORU); 0: none"
    )
    parser.add_argument("--connections", type=int, default=16, help="concurrent MLLP sender connections")
    parser.add_argument(
        "--batch-size", type=int, default=200, help="listener group commit: most messages per batch"
    )
    parser.add_argument(
        "--lanes", type=int, help="listener processing lanes (default: connectors.mllp.LANES)"
    )
    parser.add_argument(
        "--receipt-only",
        action="store_true",
        help="no processing: the listener and inbox.receive alone (ACK AA after the receipt commits)",
    )
    parser.add_argument("--xml130", type=int, default=0, metavar="EPISODES", help="QĐ 130 episodes; 0: skip")
    parser.add_argument("--episodes-per-file", type=int, default=1)
    parser.add_argument("--xml-batch", type=int, default=20, help="QĐ 130 files per receive/process batch")
    parser.add_argument(
        "--cost",
        type=int,
        default=0,
        metavar="MESSAGES",
        help="in-process processing cost only (CPU ms and SQL statements per message; with --xml130 per episode too)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.source, args.batch_size, args.lanes, args.receipt_only)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-connectors-"))
    # The master key stays with the database between runs (--keep-db: its data keys are
    # wrapped by it), like bench/read.py's.
    keys = Path(tempfile.gettempdir()) / "bench-connectors-keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("MASTER_KEY_FILE", str(keys / "master.key"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("Conditions")
    print(f"  cores: {os.cpu_count()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  backend: {args.backend}; audit on (each transaction's AuditEvent), Provenance per message")
    print(
        f"  listener: connectors.mllp in its own process, runner in-process (connectors.worker.Runner),"
        f" group commit up to {args.batch_size}"
    )
    print(
        "  parse path: connectors.hl7v2.parse (lean segment split); ACK connectors.hl7v2.ack (lean);"
        " hl7apy only if reported imported below"
    )
    url = fresh_database(args.backend, work)
    try:
        if args.cost:
            run_cost(args, url)
            return
        if args.messages:
            run_hl7(args, url, env, work)
        if args.xml130:
            run_xml130(args, url)
    finally:
        if not args.keep_db:
            drop_database(args.backend)


if __name__ == "__main__":
    main()
