"""Reading a QĐ 130 file: the ``GIAMDINHHS`` envelope, its ``HOSO`` (one per episode) and the
base64 ``NOIDUNGFILE`` document of each table, down to records of named fields.

Owns: safe XML parsing of untrusted files (no DTD, hence no entity of any kind: no XML bomb,
no external entity), the tolerated quirks (BOM, CRLF, one-line files, self-closing empty
elements, a malformed ``xmlns:xsi`` URI, namespaced tags, base64 in lines) and where each
part is, for error messages ("HOSO[2]/XML3").
Calls: ``xml.etree.ElementTree`` (the C parser), ``connectors.model`` (``Rejected``).
Called by: ``connectors.xml130`` (peek, map).

Why not ``defusedxml``: it forbids DTDs the same way but parses with ElementTree's pure
Python parser class (it has to hook expat's DTD callbacks): 1.15 ms against 0.54 ms for the
tables of one typical episode, measured on this machine (CPU time, defusedxml 0.7.1). Here the C parser reads the bytes with its encoding forced to UTF-8, so a byte
search for ``<!DOCTYPE`` sees exactly what the parser reads: without a DOCTYPE no entity
can be declared, and only the five predefined ones and character references exist.
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import NoReturn

from connectors.model import Rejected

# A table's records are the elements with a direct MA_LK child: the roots of the tables
# whose roots are unconfirmed (XML13, XML14...) need not be known.
KEY = "MA_LK"
MAX_TABLE_BYTES = 64 * 1024 * 1024  # one decoded table: far above any real episode
# HOSO in one file. A file is one inbox message, mapped at once and written in one batch, so
# its size is how long one message holds a worker: measured here, 100,000 minimal HOSO (17 MiB)
# took 4 s to peek and 28 s and 500 MB to map, starving every other source of that worker.
# 1,000 typical episodes are ~28 MB (about the upload body limit) and ~8 s of mapping; real
# exports send one HOSO per file, or a day's few hundred.
MAX_HOSO = 1000


@dataclass
class Hoso:
    """One episode's files: LOAIHOSO -> the decoded XML document (bytes)."""

    index: int  # 1-based position in the envelope
    tables: dict[str, bytes] = field(default_factory=dict)

    def where(self, table: str | None = None) -> str:
        return f"HOSO[{self.index}]" + (f"/{table}" if table else "")


@dataclass
class Envelope:
    facility: str | None  # THONGTINDONVI/MACSKCB
    created: str | None  # THONGTINHOSO/NGAYLAP
    hosos: list[Hoso]


def _local(tag: str) -> str:
    return tag.rpartition("}")[2] if tag[:1] == "{" else tag


def parse_xml(raw: bytes, where: str) -> ET.Element:
    """The document's root. UTF-8 (a BOM is dropped; UTF-16 with a BOM is converted), read
    as UTF-8 whatever its declaration says; no DTD."""
    if raw[:3] == b"\xef\xbb\xbf":
        raw = raw[3:]
    elif raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            raw = raw.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("not UTF-16 text, though it starts with a UTF-16 byte order mark", where) from None
    # Read as UTF-8 (the parser's encoding is forced), so this byte search sees exactly what
    # the parser reads: without a DOCTYPE no entity can be declared.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise Rejected("a DTD or entity declaration is not allowed in QĐ 130 files", where)
    parser = ET.XMLParser(encoding="utf-8")
    try:
        parser.feed(raw)
        return parser.close()
    except ET.ParseError as error:
        line, column = error.position
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise Rejected(f"not UTF-8 text (byte {bad.start})", where) from None
        raise Rejected(f"not well-formed XML (line {line}, column {column}): {error.msg}", where) from None


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def read(raw: bytes) -> Envelope:
    """The envelope's header and each HOSO's tables (base64-decoded, not yet parsed)."""
    if raw.count(b"<HOSO") > MAX_HOSO:  # before building the tree (1.5 s for 100,000)
        _too_many()
    root = parse_xml(raw, "GIAMDINHHS")
    if _local(root.tag) != "GIAMDINHHS":
        raise Rejected(f"the root element is {_local(root.tag)!r}, not GIAMDINHHS", "GIAMDINHHS")
    facility = created = None
    hosos: list[Hoso] = []
    for element in root.iter():
        name = _local(element.tag)
        if name == "MACSKCB" and facility is None:
            facility = (element.text or "").strip() or None
        elif name == "NGAYLAP" and created is None:
            created = (element.text or "").strip() or None
        elif name == "HOSO":
            if len(hosos) == MAX_HOSO:  # prefixed tags (<x:HOSO>) escape the byte count
                _too_many()
            hosos.append(_hoso(element, len(hosos) + 1))
    if not hosos:
        raise Rejected("the envelope holds no HOSO", "GIAMDINHHS/THONGTINHOSO/DANHSACHHOSO")
    return Envelope(facility, created, hosos)


def _too_many() -> NoReturn:
    raise Rejected(
        f"the envelope holds more than {MAX_HOSO} HOSO: send them in several files",
        "GIAMDINHHS/THONGTINHOSO/DANHSACHHOSO",
    )


def _hoso(element: ET.Element, index: int) -> Hoso:
    hoso = Hoso(index)
    for part in element:
        if _local(part.tag) != "FILEHOSO":
            continue
        table = (_child_text(part, "LOAIHOSO") or "").upper()
        content = _child_text(part, "NOIDUNGFILE")
        if not table:
            raise Rejected("a FILEHOSO without LOAIHOSO", hoso.where("FILEHOSO"))
        if table in hoso.tables:
            raise Rejected(f"{table} appears twice in one HOSO", hoso.where(table))
        if not content:
            raise Rejected("NOIDUNGFILE is empty", hoso.where(table))
        hoso.tables[table] = _unbase64(content, hoso.where(table))
    if not hoso.tables:
        raise Rejected("a HOSO without FILEHOSO", hoso.where())
    return hoso


def _unbase64(content: str, where: str) -> bytes:
    compact = "".join(content.split())  # some exporters wrap base64 in lines
    if len(compact) > MAX_TABLE_BYTES * 4 // 3 + 4:
        raise Rejected("NOIDUNGFILE is too large", where)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("NOIDUNGFILE is not base64", where) from None


def records(document: bytes, where: str) -> list[dict[str, str]]:
    """The records of one table's document: each element with a direct MA_LK child, as
    {field: text} (whitespace around values dropped; a self-closing element is "")."""
    root = parse_xml(document, where)
    # Records sit at depth 0 (XML1's TONG_HOP), 2 (root/list/item) or, in tables whose
    # roots are unconfirmed, 1: only those levels are looked at, not the fields below.
    candidates = [root, *root, *(item for child in root for item in child)]
    found = []
    if root.tag[:1] == "{":  # a default namespace: every tag is "{uri}NAME"
        for element in candidates:
            if len(element):
                names = [_local(c.tag) for c in element]
                if KEY in names:
                    found.append({n: (c.text or "").strip() for n, c in zip(names, element, strict=True)})
        return found
    for element in candidates:
        if len(element) and element.find(KEY) is not None:
            found.append({c.tag: (c.text or "").strip() for c in element})
    return found
