"""MLLP framing and the normalisation of raw HL7 v2 bytes.

Owns: the MLLP envelope (``<VT> message <FS><CR>``), a streaming de-framer for the listener,
and ``normalize``, which turns whatever a sender or a file delivers (LF or CRLF segment
endings, a UTF-8 BOM, MLLP characters left in a file, trailing blank lines) into segments
joined by CR, the form the lean parser reads.
Calls: nothing.
Called by: ``connectors.hl7v2.parse`` (normalize), ``connectors.hl7v2.ack``,
``connectors.mllp`` (frame, ``Deframer``), tests that act as MLLP senders.
"""

from __future__ import annotations

START = b"\x0b"  # VT: start block
END = b"\x1c\x0d"  # FS CR: end block
_FS = b"\x1c"
BOM = b"\xef\xbb\xbf"


def frame(msg: bytes) -> bytes:
    """``msg`` wrapped in the MLLP start and end blocks."""
    return START + msg + END


def normalize(raw: bytes) -> bytes:
    """Segments joined by CR, without BOM, MLLP characters, blank lines or trailing blanks.

    The result has no trailing CR; an empty input gives ``b""``. Only line structure is
    touched: field contents (including their spaces) are kept byte for byte, so the stored
    raw message and the parsed one say the same thing."""
    data = raw
    # Files copied from an MLLP capture keep their framing characters; senders add a BOM.
    if data.startswith(START):
        data = data[1:]
    if data.startswith(BOM):
        data = data[3:]
    data = data.replace(START, b"").replace(_FS, b"")
    if b"\n" in data:
        data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    segments = [seg.rstrip(b" \t") for seg in data.split(b"\r")]
    return b"\r".join(seg for seg in segments if seg.strip())


class Deframer:
    """Cuts MLLP frames out of a byte stream (a TCP connection delivers them in any chunks).

    ``feed`` returns the complete messages seen so far (framing removed); bytes outside a
    frame (noise between frames) are dropped. ``max_size`` bounds one message so a sender that
    never ends a frame cannot exhaust memory: ``feed`` raises ``ValueError`` beyond it."""

    def __init__(self, max_size: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages: list[bytes] = []
        while True:
            start = self._buffer.find(START)
            if start < 0:
                self._buffer.clear()  # no frame started: nothing here is a message
                break
            end = self._buffer.find(END, start + 1)
            if end < 0:
                if start:
                    del self._buffer[:start]
                if len(self._buffer) > self._max_size:
                    raise ValueError(f"MLLP frame longer than {self._max_size} bytes")
                break
            messages.append(bytes(self._buffer[start + 1 : end]))
            del self._buffer[: end + len(END)]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (0 at a message boundary)."""
        return len(self._buffer)
