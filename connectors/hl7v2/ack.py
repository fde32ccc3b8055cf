"""HL7 v2 acknowledgements (original mode): AA, AE, AR with MSA and ERR.

Owns: the ACK message a sender gets after its message was committed (AA), refused for its
content (AE: kept in the inbox as rejected) or refused for its type or form (AR), and the
HL7 error codes (table 0357) the ERR segment carries.
Calls: ``connectors.hl7v2.parse`` (to read the MSH being answered).
Called by: ``connectors.mllp`` (after the commit), tests acting as senders.

Built lean, not with hl7apy: an ACK is three segments whose layout depends only on the
version (ERR-1 up to 2.4, ERR-2..8 from 2.5); hl7apy would parse the incoming message again
(tens of ms) and refuses malformed input, which is exactly what an AR must answer.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from datetime import UTC, datetime

from connectors.hl7v2.framing import normalize
from connectors.hl7v2.parse import Encoding, Segment, decode, encoding_of, segment_of
from connectors.model import Rejected

# HL7 table 0357 (message error condition codes) used here.
ERROR_CODES: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}
_WHERE = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\.(\d+))?)?")
_DEFAULT_VERSION = "2.5"
# MSH-18 values (table 0211) whose text is not UTF-8.
_CHARSETS = {"ASCII": "ascii", "8859/1": "latin-1", "8859/15": "iso8859-15", "": "utf-8"}
_SEQUENCE = itertools.count(1)
_PREFIX = f"{os.getpid() % 100000:05d}"


def _control_id() -> str:
    """A control id unique per process and time, within ST(20) of v2.5."""
    return f"H{_PREFIX}{int(time.time()) % 10**8:08d}{next(_SEQUENCE) % 10**6:06d}"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version)
    return tuple(int(p) for p in parts[:3]) or (2, 5)


def _header(raw: bytes) -> tuple[Segment | None, Encoding]:
    """The MSH being answered (None when there is none) and its separators."""
    try:
        text = decode(normalize(raw))
    except Exception:  # noqa: BLE001 - an ACK must be produced for any input
        return None, Encoding()
    for line in text.split("\r"):
        if line[:3] == "MSH":
            try:
                enc = encoding_of(line)
            except Rejected:
                return None, Encoding()
            return segment_of(line, enc, 0), enc
    return None, Encoding()


def error_code_for(code: str, where: str | None, has_msh: bool, error: str | None) -> str:
    """The table 0357 code an ERR carries when the caller gives none."""
    if not has_msh:
        return "100"
    if where and where.startswith("MSH-9"):
        return "201" if where.startswith("MSH-9.2") else "200"
    if where and where.startswith("MSH-12"):
        return "203"
    if code == "AR" and error and "unsupported" in error.lower():
        return "200"
    if where and "-" in where:
        if error and ("missing" in error.lower() or "required" in error.lower()):
            return "101"
        return "102"
    return "207"


def _location(where: str, enc: Encoding) -> str:
    """ERL (ERR-2) for "PID-7", "OBX[3]-5", "PID-3.1": segment^sequence^field^rep^component."""
    m = _WHERE.match(where)
    if not m:
        return ""
    seg, seq, fld, comp = m.groups()
    c = enc.component
    parts = [seg, seq or "1", fld or "", "1" if fld else "", comp or ""]
    return c.join(parts).rstrip(c)


def ack(
    raw: bytes,
    code: str,
    error: str | None = None,
    where: str | None = None,
    *,
    error_code: str | None = None,
) -> bytes:
    """The ACK to ``raw``: MSH mirroring it, MSA, and ERR when ``code`` is not AA.

    ``where`` is a location such as "PID-7" (``Rejected.where``); ``error_code`` a table 0357
    code (guessed from ``where`` and ``error`` when omitted). Works for any bytes: without an
    MSH the ACK uses "|^~\\&", version 2.5 and an empty MSA-2. Returns the message with CR
    segment separators and no MLLP framing (``framing.frame`` adds it)."""
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"acknowledgement code {code!r} is not AA, AE or AR")
    msh, enc = _header(raw)
    f, c = enc.field, enc.component
    version = (msh.text(12) if msh else "") or _DEFAULT_VERSION
    vt = _version_tuple(version)
    trigger = msh.text(9, 2) if msh else ""
    if vt >= (2, 3, 1):
        msg_type = c.join(["ACK", trigger, "ACK"]) if trigger else c.join(["ACK", "", "ACK"])
    else:
        msg_type = c.join(["ACK", trigger]) if trigger else "ACK"
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    encoding_chars = enc.component + enc.repetition + enc.escape + enc.subcomponent

    def raw_field(n: int) -> str:
        return msh[n] if msh else ""

    header = [
        "MSH",
        encoding_chars,
        raw_field(5),  # sending application <- the receiving one
        raw_field(6),
        raw_field(3),  # receiving application <- the sender
        raw_field(4),
        now,
        "",
        msg_type,
        _control_id(),
        raw_field(11) or "P",
        raw_field(12) or version,
    ]
    if msh and msh[18]:  # character set: answer in the one the sender declared
        header += [""] * (17 - len(header)) + [msh[18]]
    control = enc.escape_text(msh.text(10)) if msh else ""
    msa = ["MSA", code, control]
    if error and vt < (2, 5):
        msa.append(enc.escape_text(error)[:80])  # MSA-3 text message (withdrawn in 2.5+)
    segments = [f.join(header), f.join(msa)]
    if code != "AA":
        hl7_code = error_code or error_code_for(code, where, msh is not None, error)
        cwe = c.join([hl7_code, ERROR_CODES.get(hl7_code, ""), "HL70357"])
        location = _location(where, enc) if where else ""
        message = enc.escape_text(error or ERROR_CODES.get(hl7_code, "error"))
        if vt < (2, 5):
            # ERR-1 (ELD): segment^sequence^field^code (CE with subcomponents).
            s = enc.subcomponent
            eld_code = s.join([hl7_code, ERROR_CODES.get(hl7_code, ""), "HL70357"])
            m = _WHERE.match(where or "")
            eld = (
                c.join([m.group(1), m.group(2) or "1", m.group(3) or "", eld_code]) if m else c * 3 + eld_code
            )
            segments.append(f.join(["ERR", eld]))
        else:
            # ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 user message.
            segments.append(f.join(["ERR", "", location, cwe, "E", "", "", "", message]))
    # Answer in the sender's character set (MSH-18); UTF-8 when it names none.
    charset = _CHARSETS.get(msh.text(18).upper(), "utf-8") if msh else "utf-8"
    return ("\r".join(segments) + "\r").encode(charset, errors="replace")


def ack_for(raw: bytes, rejected: Rejected | None) -> bytes:
    """AA when ``rejected`` is None, AR for an unsupported message, AE otherwise."""
    if rejected is None:
        return ack(raw, "AA")
    code = "AR" if rejected.unsupported else "AE"
    return ack(raw, code, rejected.reason, rejected.where)
