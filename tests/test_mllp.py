"""The MLLP listener end to end (issue 11): python-hl7's own MLLP clients as the senders,
over real sockets (plain and TLS), into the store through the inbox and the pipeline.

Each test registers its own source and patients (unique CCCDs and control ids), so tests
share the session database. What was stored is read back over HTTP from the live server
(hub-admin). Both backends. Also used by tests/test_connector_outage.py and
bench/connectors.py: ``adt_a01``, ``oru_r01`` (a synthetic feed) and ``Listener`` (a
listener in its own event-loop thread, as ``hub connectors serve`` runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import hl7.client
import hl7.mllp
import httpx
import pytest
import sqlalchemy as sa

from connectors import inbox, sources
from connectors.identifiers import CCCD, facility_system
from connectors.mllp import MllpServer, Runner
from connectors.model import Source
from connectors.pipeline import Pipeline
from connectors.worker import Runner as WorkerRunner
from hub.rest import FhirRouter

FACILITY = "64010"
LOINC = "http://loinc.org"

# --- a synthetic feed -----------------------------------------------------------------------


def cccd() -> str:
    """A CCCD that passes the structure check (province 064, a man born in the 1970s)."""
    return f"0640{random.randrange(70, 100)}{random.randrange(10**6):06d}"


def _segment(name: str, fields: dict[int, str]) -> str:
    values = [""] * max(fields)
    for n, value in fields.items():
        values[n - 1] = value
    return "|".join([name, *values])


def adt_a01(
    control_id: str, cid: str, *, visit: str, mrn: str | None = None, birth: str = "19750412"
) -> bytes:
    """ADT^A01 (admit) of a patient with a CCCD and an MRN, v2.5, CR segment separators."""
    mrn = mrn or f"MRN{cid[-6:]}"
    segments = [
        f"MSH|^~\\&|HIS|{FACILITY}|HUB|SYT|20240312083000+0700||ADT^A01^ADT_A01|{control_id}|P|2.5|||AL|NE||UNICODE UTF-8",
        "EVN|A01|20240312083000+0700",
        f"PID|1||{cid}^^^BCA^NI~{mrn}^^^{FACILITY}^MR||NGUYEN^VAN AN^^^^^L||{birth}|M|||"
        "12 Tran Phu^^Pleiku^64^^VNM||0905123456",
        _segment(
            "PV1",
            {
                1: "1",
                2: "I",
                3: f"NOI^101^1^{FACILITY}",
                7: "BS01^TRAN^THI BINH",
                10: "MED",
                19: visit,
                44: "20240312083000+0700",
            },
        ),
    ]
    return "\r".join(segments).encode("utf-8")


def oru_r01(control_id: str, cid: str, *, filler: str, mrn: str | None = None) -> bytes:
    """ORU^R01 with two numeric results (glucose high, creatinine normal), v2.5."""
    mrn = mrn or f"MRN{cid[-6:]}"
    segments = [
        f"MSH|^~\\&|LIS|{FACILITY}|HUB|SYT|20240312101500+0700||ORU^R01^ORU_R01|{control_id}|P|2.5|||AL|NE",
        f"PID|1||{cid}^^^BCA^NI~{mrn}^^^{FACILITY}^MR||NGUYEN^VAN AN^^^^^L||19750412|M",
        f"OBR|1|P{filler}|{filler}|24323-8^Comprehensive metabolic panel^LN|||20240312090000+0700|||||||"
        "||BS01^TRAN^THI BINH||||||20240312101000+0700|||F",
        "OBX|1|NM|2345-7^Glucose [Mass/volume] in Serum or Plasma^LN||182|mg/dL^mg/dL^UCUM|70-99|H|||F|||20240312100000+0700",
        "OBX|2|NM|2160-0^Creatinine [Mass/volume] in Serum or Plasma^LN||0.9|mg/dL^mg/dL^UCUM|0.7-1.3|N|||F|||20240312100000+0700",
    ]
    return "\r".join(segments).encode("utf-8")


# --- the listener in its own thread ------------------------------------------------------------


class Listener:
    """An ``MllpServer`` on a free port, in an event loop of its own thread."""

    def __init__(self, engine: sa.Engine, source: Source, runner: Runner, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = MllpServer(engine, source, runner, host="127.0.0.1", port=0, **options)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> Listener:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def PipelineThreadRunner(router: FhirRouter, **options: Any) -> WorkerRunner:  # noqa: N802
    """The in-process runner ``hub connectors serve`` uses without Redis."""
    return WorkerRunner(Pipeline(router, **options))


def exchange(client: hl7.client.MLLPClient, message: bytes) -> bytes:
    """Send one message with python-hl7's client; the whole ACK frame (``MLLPClient.send``
    reads once: a frame split over two TCP segments needs the rest), b"" when none came."""
    reply: bytes = client.send_message(message)
    while reply and not reply.endswith(b"\x1c\r"):
        more = client.socket.recv(4096)
        if not more:
            break
        reply += more
    return reply


def send(port: int, message: bytes) -> bytes:
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        return exchange(client, message)


def ack_of(reply: bytes) -> hl7.Message:
    assert reply.startswith(b"\x0b") and reply.endswith(b"\x1c\r"), reply
    return hl7.parse(reply[1:-2].decode("utf-8"))


def code_of(reply: bytes) -> str:
    return str(ack_of(reply).segment("MSA")[1])


def new_source(router: FhirRouter, **settings: Any) -> Source:
    name = f"mllp-{uuid.uuid4().hex[:10]}"
    return sources.add(
        router, Source(name, FACILITY, "BVĐK tỉnh Gia Lai", "provincial", "hl7v2-mllp", settings)
    )


def search(http: httpx.Client, path: str, **params: str) -> list[dict[str, Any]]:
    response = http.get(path, params={**params, "_count": "100"})
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", [])]


@pytest.fixture()
def listener(router: FhirRouter) -> Iterator[Listener]:
    source = new_source(router)
    with Listener(router.ctx.store.engine, source, PipelineThreadRunner(router)) as running:
        yield running


# --- tests ---------------------------------------------------------------------------------


def test_adt_then_oru_stored_once_even_when_the_feed_is_sent_again(
    listener: Listener, http: httpx.Client
) -> None:
    cid, tag = cccd(), uuid.uuid4().hex[:8]
    feed = [
        adt_a01(f"A{tag}", cid, visit=f"V{tag}"),
        oru_r01(f"O{tag}", cid, filler=f"F{tag}"),
    ]
    with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
        acks = [ack_of(exchange(client, message)) for message in feed]
    assert [str(a.segment("MSA")[1]) for a in acks] == ["AA", "AA"]
    assert [str(a.segment("MSA")[2]) for a in acks] == [f"A{tag}", f"O{tag}"]  # MSA-2: the control id
    assert str(acks[0].segment("MSH")[9]) == "ACK^A01^ACK"

    def stored() -> tuple[list[dict[str, Any]], ...]:
        (patient,) = search(http, "/Patient", identifier=f"{CCCD}|{cid}")
        encounters = search(http, "/Encounter", identifier=f"{facility_system('visit', FACILITY)}|V{tag}")
        observations = search(http, "/Observation", subject=f"Patient/{patient['id']}")
        reports = search(http, "/DiagnosticReport", subject=f"Patient/{patient['id']}")
        return [patient], encounters, observations, reports

    (patient,), (encounter,), observations, (report,) = stored()
    assert patient["gender"] == "male" and patient["birthDate"] == "1975-04-12"
    assert patient["name"][0]["family"] == "NGUYEN"
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    assert encounter["status"] == "in-progress"
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert set(by_code) == {"2345-7", "2160-0"}
    glucose = by_code["2345-7"]
    assert glucose["code"]["coding"][0]["system"] == LOINC
    assert glucose["valueQuantity"]["value"] == 182 and glucose["valueQuantity"]["unit"] == "mg/dL"
    assert glucose["referenceRange"][0]["low"]["value"] == 70
    assert glucose["interpretation"][0]["coding"][0]["code"] == "H"
    assert {r["reference"] for r in report["result"]} == {f"Observation/{o['id']}" for o in observations}

    # The whole feed again (a sender that lost its ACKs): AA again, nothing new.
    with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
        assert [code_of(exchange(client, message)) for message in feed] == ["AA", "AA"]
    again = stored()
    assert [[r["id"] for r in group] for group in again] == [
        [patient["id"]],
        [encounter["id"]],
        [o["id"] for o in observations],
        [report["id"]],
    ]
    rows = inbox.messages(listener.server.engine, source=listener.server.source.name)
    assert sorted((row.control_id, row.state) for row in rows) == [
        (f"A{tag}", "processed"),
        (f"O{tag}", "processed"),
    ]
    # MSH-4 is recorded as sent; the source stays the listener's.
    assert listener.server.stats.sending_facilities == {FACILITY: 4}


def test_poison_messages_are_refused_and_never_block_the_ones_behind(
    listener: Listener, http: httpx.Client
) -> None:
    cid, tag = cccd(), uuid.uuid4().hex[:8]
    bad_date = adt_a01(f"B{tag}", cccd(), visit=f"VB{tag}", birth="19751345")
    unsupported = f"MSH|^~\\&|HIS|{FACILITY}|HUB|SYT|20240312083000||ZZZ^Z99|U{tag}|P|2.5\rPID|1||{cid}^^^BCA^NI".encode()
    garbage = b"this is not an HL7 message " + tag.encode()
    good = adt_a01(f"G{tag}", cid, visit=f"VG{tag}")
    with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
        replies = [exchange(client, m) for m in (bad_date, unsupported, garbage, good)]
    bad_ack, unsupported_ack, garbage_ack, good_ack = (ack_of(r) for r in replies)

    assert str(bad_ack.segment("MSA")[1]) == "AE"
    assert str(bad_ack.segment("MSA")[2]) == f"B{tag}"
    err = bad_ack.segment("ERR")
    assert "PID" in str(err[2]) and "7" in str(err[2])  # ERR-2: where (PID-7)
    assert "19751345" in str(err[8]) or "date" in str(err[8]).lower()  # ERR-8: why

    assert str(unsupported_ack.segment("MSA")[1]) == "AR"
    assert str(unsupported_ack.segment("ERR")[3]).startswith("200")  # unsupported message type

    assert str(garbage_ack.segment("MSA")[1]) in ("AE", "AR")  # no MSH to answer
    assert str(good_ack.segment("MSA")[1]) == "AA"
    assert search(http, "/Patient", identifier=f"{CCCD}|{cid}")

    # Refused messages stay in the inbox, with their error, for an operator (those refused
    # before their MSH could be read have no control id).
    rows = inbox.messages(listener.server.engine, source=listener.server.source.name)
    assert sorted((row.control_id or "-", row.state) for row in rows) == sorted(
        [(f"B{tag}", "rejected"), ("-", "rejected"), ("-", "rejected"), (f"G{tag}", "processed")]
    )
    assert all(row.error for row in rows if row.state == "rejected")
    # Sent again, the refused message is answered the same way and stored once.
    assert code_of(send(listener.port, bad_date)) == "AE"
    assert len(inbox.messages(listener.server.engine, source=listener.server.source.name)) == 4


def test_framing_quirks_bom_lf_missing_final_cr_and_pipelined_messages(
    listener: Listener, http: httpx.Client
) -> None:
    cid, tag = cccd(), uuid.uuid4().hex[:8]
    first = b"\xef\xbb\xbf" + adt_a01(f"Q1{tag}", cid, visit=f"VQ{tag}").replace(b"\r", b"\n") + b"\n"
    second = oru_r01(f"Q2{tag}", cid, filler=f"FQ{tag}").replace(b"\r", b"\r\n")
    with socket.create_connection(("127.0.0.1", listener.port), timeout=30) as sock:
        # Noise before the first frame, the first without its final CR, both in one write.
        sock.sendall(b"\r\n\x0b" + first + b"\x1c" + b"\x0b" + second + b"\x1c\r")
        data = b""
        while data.count(b"\x1c\r") < 2:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    replies = [ack_of(frame + b"\x1c\r") for frame in data.split(b"\x1c\r")[:2]]
    assert [(str(a.segment("MSA")[1]), str(a.segment("MSA")[2])) for a in replies] == [
        ("AA", f"Q1{tag}"),
        ("AA", f"Q2{tag}"),
    ]
    (patient,) = search(http, "/Patient", identifier=f"{CCCD}|{cid}")
    assert len(search(http, "/Observation", subject=f"Patient/{patient['id']}")) == 2


@pytest.mark.parametrize("lanes", [1, 3])
def test_many_connections_make_group_commits(router: FhirRouter, http: httpx.Client, lanes: int) -> None:
    source = new_source(router)
    with Listener(router.ctx.store.engine, source, PipelineThreadRunner(router), lanes=lanes) as listener:
        _group_commits(listener, http)


def _group_commits(listener: Listener, http: httpx.Client) -> None:
    tag = uuid.uuid4().hex[:8]
    patients = [cccd() for _ in range(8)]

    def sender(index: int) -> list[str]:
        cid = patients[index]
        with hl7.client.MLLPClient("127.0.0.1", listener.port) as client:
            return [
                code_of(exchange(client, adt_a01(f"M{tag}-{index}-{n}", cid, visit=f"VM{tag}-{index}-{n}")))
                for n in range(5)
            ]

    with ThreadPoolExecutor(len(patients)) as pool:
        codes = list(pool.map(sender, range(len(patients))))
    assert codes == [["AA"] * 5] * len(patients)
    stats = listener.server.stats
    assert stats.acks["AA"] == 40
    # Eight senders waiting at once: receipts are grouped (fewer transactions than messages).
    assert stats.largest_batch > 1 and stats.batches < 40
    for index, cid in enumerate(patients):
        (patient,) = search(http, "/Patient", identifier=f"{CCCD}|{cid}")
        encounters = search(http, "/Encounter", subject=f"Patient/{patient['id']}")
        assert len(encounters) == 5, index


def test_oversized_message_gets_an_ae_and_the_connection_closes(router: FhirRouter) -> None:
    source = new_source(router)
    runner = PipelineThreadRunner(router)
    with Listener(router.ctx.store.engine, source, runner, max_message_bytes=2000) as small:
        big = adt_a01("BIG1", cccd(), visit="VBIG") + b"\rNTE|1||" + b"x" * 5000
        with socket.create_connection(("127.0.0.1", small.port), timeout=30) as sock:
            sock.sendall(b"\x0b" + big + b"\x1c\r")
            data = b""
            while chunk := sock.recv(4096):  # the server closes after its AE
                data += chunk
        reply = ack_of(data)
        assert str(reply.segment("MSA")[1]) == "AE" and str(reply.segment("MSA")[2]) == "BIG1"
        assert "2000 bytes" in str(reply.segment("ERR")[8])
        assert inbox.messages(router.ctx.store.engine, source=source.name) == []  # never stored


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "mllp.crt", directory / "mllp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_tls_with_python_hl7_asyncio_client(router: FhirRouter, http: httpx.Client, tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    source = new_source(router, tls=True, certfile=str(cert_file), keyfile=str(key_file))
    cid, tag = cccd(), uuid.uuid4().hex[:8]
    with Listener(router.ctx.store.engine, source, PipelineThreadRunner(router)) as secure:

        async def sender() -> str:
            context = ssl.create_default_context(cafile=str(cert_file))
            reader, writer = await hl7.mllp.open_hl7_connection(
                "127.0.0.1", secure.port, ssl=context, server_hostname="localhost", encoding="utf-8"
            )
            try:
                writer.writeblock(adt_a01(f"T{tag}", cid, visit=f"VT{tag}"))
                await writer.drain()
                ack = await asyncio.wait_for(reader.readmessage(), 30)
                return str(ack.segment("MSA")[1])
            finally:
                writer.close()
                await writer.wait_closed()

        assert asyncio.run(sender()) == "AA"
        # A plain-TCP client gets nothing from a TLS listener.
        with socket.create_connection(("127.0.0.1", secure.port), timeout=10) as sock:
            sock.sendall(b"\x0b" + adt_a01(f"P{tag}", cid, visit=f"VP{tag}") + b"\x1c\r")
            sock.settimeout(10)
            with contextlib.suppress(ConnectionError, TimeoutError):
                assert b"MSA" not in sock.recv(4096)
    assert search(http, "/Patient", identifier=f"{CCCD}|{cid}")
    stored = {row.control_id for row in inbox.messages(router.ctx.store.engine, source=source.name)}
    assert stored == {f"T{tag}"}


def test_idle_connection_is_closed(router: FhirRouter) -> None:
    source = new_source(router)
    runner = PipelineThreadRunner(router)
    with (
        Listener(router.ctx.store.engine, source, runner, idle_seconds=0.5) as idle,
        socket.create_connection(("127.0.0.1", idle.port), timeout=10) as sock,
    ):
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the listener
        assert time.monotonic() - started < 5
