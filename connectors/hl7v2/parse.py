"""The lean path: an HL7 v2 message split into segments, fields, repetitions and components.

Owns: ``Message`` and ``Segment`` (HL7 numbering: ``seg[3]`` is PID-3 and ``msh[9]`` is
MSH-9, MSH-1 being the field separator), the encoding characters read from MSH-2, escape
sequences (``\\F\\``, ``\\S\\``, ``\\T\\``, ``\\R\\``, ``\\E\\``, ``\\.br\\``, ``\\Xhh\\``),
the character set (UTF-8, else MSH-18's), batches (FHS/BHS around several MSH), and the
cheap ``peek`` that every received message goes through.
Calls: ``connectors.hl7v2.framing.normalize``, ``connectors.identifiers``.
Called by: ``connectors.hl7v2`` (FORMAT), the mappings, ``connectors.hl7v2.ack``.

Why not hl7apy or python-hl7's object tree: the mappings read a few dozen fields of a message
and nothing else. Splitting strings on demand costs microseconds; building hl7apy's validated
tree costs ~45 ms an ORU (issue 11 measured 22 ORU/s per core). A field is split only when a
mapping asks for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from connectors.hl7v2.framing import normalize
from connectors.model import Rejected

_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
# Messages in one FHS/BHS batch. A batch is one inbox message, mapped at once and written in
# one processing batch: measured here, 5,000 small ADT took 3.6 s to map, so the ~57,000 a
# 16 MiB frame holds would hold a worker for minutes (every other message behind it waiting).
MAX_BATCH_MESSAGES = 1000


def masked(value: str, limit: int = 24) -> str:
    """``value`` as an error message may show it: its shape, not its content (digits as 9,
    letters as A, other characters kept), at most ``limit`` characters. Error texts are not
    sealed (inbox ``error``, ACK ERR-8, logs): a misplaced CCCD, name, phone, birth date or
    result value must not be written there in the clear, while "9999-99-99 is not a date"
    still tells the sender what is wrong with its format."""
    shape = "".join("9" if c.isdigit() else "A" if c.isalpha() else c for c in value[:limit])
    return shape + ("…" if len(value) > limit else "")


@dataclass(frozen=True)
class Encoding:
    """MSH-1 and MSH-2: the separators this message uses."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    def unescape(self, value: str) -> str:
        """The text an escaped value stands for (HL7 v2.x chapter 2.7)."""
        esc = self.escape
        if not esc or esc not in value:
            return value
        out: list[str] = []
        i = 0
        n = len(value)
        while i < n:
            ch = value[i]
            if ch != esc:
                out.append(ch)
                i += 1
                continue
            j = value.find(esc, i + 1)
            if j < 0:  # a lone escape character: keep it as text
                out.append(value[i:])
                break
            code = value[i + 1 : j]
            out.append(self._escape_text(code))
            i = j + 1
        return "".join(out)

    def _escape_text(self, code: str) -> str:
        simple = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": self.escape,
            ".br": "\n",
        }
        if code in simple:
            return simple[code]
        if code.startswith("X") and _HEX.match(code[1:]) and len(code) % 2 == 1:
            try:
                return bytes.fromhex(code[1:]).decode("utf-8", "replace")
            except ValueError:
                return ""
        # Highlighting (\H\, \N\), formatting (.sp, .in...) and charset switches carry no text.
        return ""

    def escape_text(self, value: str) -> str:
        """``value`` with the separators escaped, safe inside one component."""
        e = self.escape
        out = value.replace(e, f"{e}E{e}")
        for char, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
        ):
            out = out.replace(char, f"{e}{code}{e}")
        return out.replace("\r\n", f"{e}.br{e}").replace("\n", f"{e}.br{e}").replace("\r", " ")


class Segment:
    """One segment; ``seg[n]`` is field n as raw (escaped) text, ``""`` when absent."""

    __slots__ = ("enc", "fields", "name", "index")

    def __init__(self, name: str, fields: list[str], enc: Encoding, index: int) -> None:
        self.name = name
        self.fields = fields  # fields[0] is the segment id, fields[n] is SEG-n
        self.enc = enc
        self.index = index  # position in the message, from 0

    def __getitem__(self, n: int) -> str:
        f = self.fields
        return f[n] if n < len(f) else ""

    def __repr__(self) -> str:
        return f"Segment({self.enc.field.join(self.fields)!r})"

    def reps(self, n: int) -> list[str]:
        """The repetitions of field n (non-empty ones)."""
        value = self[n]
        if not value:
            return []
        if self.enc.repetition in value and not (self.name == "MSH" and n == 2):
            return [r for r in value.split(self.enc.repetition) if r]
        return [value]

    def comps(self, n: int) -> list[str]:
        """The components of the first repetition of field n (escaped text)."""
        reps = self.reps(n)
        return reps[0].split(self.enc.component) if reps else []

    def text(self, n: int, comp: int = 1, sub: int = 1) -> str:
        """Field n, component ``comp``, sub-component ``sub`` (first repetition), unescaped."""
        reps = self.reps(n)
        if not reps:
            return ""
        return component(reps[0], self.enc, comp, sub)


def component(value: str, enc: Encoding, comp: int = 1, sub: int = 1) -> str:
    """Component ``comp`` (from 1), sub-component ``sub`` of one repetition, unescaped."""
    parts = value.split(enc.component) if enc.component in value else [value]
    if comp > len(parts):
        return ""
    part = parts[comp - 1]
    if enc.subcomponent in part:
        subs = part.split(enc.subcomponent)
        part = subs[sub - 1] if sub <= len(subs) else ""
    elif sub > 1:
        return ""
    return enc.unescape(part).strip()


def components(value: str, enc: Encoding) -> list[str]:
    """All components of one repetition, unescaped; the non-empty sub-components of a
    component joined by a space ("1000&Hospital Lane" -> "1000 Hospital Lane")."""
    sub = enc.subcomponent
    return [
        enc.unescape(" ".join(x for x in p.split(sub) if x) if sub in p else p).strip()
        for p in value.split(enc.component)
    ]


class Message:
    """One HL7 v2 message: MSH and the segments after it, up to the next MSH."""

    __slots__ = ("enc", "segments", "_by_name")

    def __init__(self, segments: list[Segment], enc: Encoding) -> None:
        self.segments = segments
        self.enc = enc
        self._by_name: dict[str, list[Segment]] = {}
        for seg in segments:
            self._by_name.setdefault(seg.name, []).append(seg)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def all(self, name: str) -> list[Segment]:
        return self._by_name.get(name, [])

    def first(self, name: str) -> Segment | None:
        found = self._by_name.get(name)
        return found[0] if found else None

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    @property
    def message_type(self) -> str:
        """MSH-9 as ``TYPE^TRIGGER`` (the structure component dropped)."""
        code = self.msh.text(9, 1).upper()
        trigger = self.msh.text(9, 2).upper()
        return f"{code}^{trigger}" if trigger else code

    @property
    def trigger(self) -> str:
        return self.msh.text(9, 2).upper()

    @property
    def control_id(self) -> str:
        return self.msh.text(10)

    @property
    def version(self) -> str:
        return self.msh.text(12)


def decode(raw: bytes) -> str:
    """The text of a message: UTF-8 (what Vietnamese HIS send), else Windows-1258/Latin-1.

    MSH-18 often lies or is empty; UTF-8 either decodes cleanly or is not what was sent."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    head = raw[:400]
    if b"8859" not in head and b"1252" not in head:
        try:
            return raw.decode("cp1258")  # Vietnamese Windows code page
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def encoding_of(header: str) -> Encoding:
    """The separators declared by an MSH/FHS/BHS header segment."""
    if len(header) < 4:
        raise Rejected("header segment too short to declare its separators", "MSH-2")
    field_sep = header[3]
    if field_sep.isalnum() or field_sep in " \r\n":
        raise Rejected(f"{field_sep!r} is not a field separator", "MSH-1")
    chars = header[4:].split(field_sep, 1)[0]
    if len(chars) < 2:
        raise Rejected(f"encoding characters {chars!r} are incomplete", "MSH-2")
    padded = (chars + "\\&")[:4] if len(chars) < 4 else chars[:4]
    return Encoding(field_sep, padded[0], padded[1], padded[2], padded[3])


def segment_of(line: str, enc: Encoding, index: int) -> Segment:
    """One line as a Segment (MSH/FHS/BHS numbered so seg[n] is MSH-n)."""
    fields = line.split(enc.field)
    name = fields[0].strip().upper()
    if name in ("MSH", "FHS", "BHS"):
        # HL7 numbers MSH-1 as the field separator itself: insert it so seg[n] is MSH-n.
        fields = [name, enc.field, *fields[1:]]
    else:
        fields[0] = name
    return Segment(name, fields, enc, index)


def parse_messages(raw: bytes) -> list[Message]:
    """Every message in ``raw`` (one, or several inside an FHS/BHS batch).

    Raises ``Rejected`` when there is no MSH or a line is not a segment."""
    text = decode(normalize(raw))
    if not text:
        raise Rejected("empty message", "MSH")
    lines = text.split("\r")
    first_header = next((ln for ln in lines if ln[:3] in ("MSH", "FHS", "BHS")), None)
    if first_header is None:
        raise Rejected("not an HL7 v2 message: no MSH segment", "MSH")
    enc = encoding_of(first_header)
    messages: list[Message] = []
    current: list[Segment] = []
    for lineno, line in enumerate(lines):
        name = line[:3].upper()
        if name == "MSH":
            if current:
                messages.append(Message(current, enc))
            if len(messages) >= MAX_BATCH_MESSAGES:
                raise Rejected(
                    f"the batch holds more than {MAX_BATCH_MESSAGES} messages: send it in several batches",
                    "BHS",
                )
            enc = encoding_of(line)
            current = [segment_of(line, enc, 0)]
            continue
        if name in ("FHS", "BHS", "BTS", "FTS"):
            if current:
                messages.append(Message(current, enc))
                current = []
            continue
        if not current:
            if lineno == 0 or not messages:
                raise Rejected(f"segment {name!r} before MSH; a message starts with MSH", "MSH")
            raise Rejected(f"segment {name!r} outside a message of the batch", name)
        if not _SEGMENT_ID.match(line[:3]) or (len(line) > 3 and line[3] != enc.field):
            where = f"{current[-1].name} after segment {len(current)}"
            raise Rejected(f"line {lineno + 1} is not a segment: {masked(line, 20)!r}", where)
        current.append(segment_of(line, enc, len(current)))
    if current:
        messages.append(Message(current, enc))
    if not messages:
        raise Rejected("batch holds no message (no MSH segment)", "MSH")
    return messages


def parse(raw: bytes) -> Message:
    """The one message in ``raw`` (the first when a batch holds several)."""
    return parse_messages(raw)[0]
