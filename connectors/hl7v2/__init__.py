"""The HL7 v2 feed: ``FORMAT`` (name "hl7v2") reads what a sender delivers over MLLP.

Owns: ``peek`` (MSH-9 type^trigger read from the MSH, never a file name; MSH-10 control id;
the ordering key of the strongest PID identifier; unsupported types refused here with
``Rejected(unsupported=True)``), the table of supported message types and the dispatch of
``map`` to one mapping module per message family (``mapping.adt``, ``oru``, ``orders``,
``siu``, ``vxu``).
Calls: ``connectors.hl7v2.parse`` (the lean path), ``connectors.hl7v2.mapping``.
Called by: ``connectors.inbox.receive`` (peek), ``connectors.pipeline`` (map),
``connectors.mllp`` (with ``ack`` and ``framing``).

Versions 2.3 to 2.8 are read alike: the fields the mappings use kept their positions.
"""

from __future__ import annotations

from collections.abc import Callable

from connectors.hl7v2.mapping import MAPPERS, REFUSED
from connectors.hl7v2.mapping.common import ordering_key
from connectors.hl7v2.parse import Message, parse_messages
from connectors.model import Mapped, Peek, Rejected, Source

__all__ = ["FORMAT", "Hl7v2Format", "SUPPORTED"]

SUPPORTED: frozenset[str] = frozenset(MAPPERS)
_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")


def _check_supported(msg: Message) -> Callable[[Message, Source], Mapped]:
    mtype = msg.message_type
    if not msg.msh.text(9):
        raise Rejected("MSH-9 (message type) is empty", "MSH-9")
    if "^" not in mtype:
        raise Rejected(f"MSH-9 {mtype!r} has no trigger event", "MSH-9")
    version = msg.version
    if version and version not in _VERSIONS:
        raise Rejected(f"version {version!r} is not one of 2.3 to 2.8", "MSH-12", unsupported=True)
    mapper = MAPPERS.get(mtype)
    if mapper is None:
        reason = REFUSED.get(mtype) or f"message type {mtype} is not supported by the hub"
        raise Rejected(reason, "MSH-9", unsupported=True)
    if not msg.control_id:
        raise Rejected("MSH-10 (message control id) is empty", "MSH-10")
    return mapper


class Hl7v2Format:
    """``connectors.model.Format`` for HL7 v2 (one message, or an FHS/BHS batch of them)."""

    name = "hl7v2"

    def peek(self, raw: bytes) -> Peek:
        messages = parse_messages(raw)
        for msg in messages:
            _check_supported(msg)
        first = messages[0]
        if len(messages) == 1:
            return Peek(first.message_type, first.control_id, ordering_key(first))
        # A batch: its messages may concern several patients; order by the first one's.
        ids = ",".join(m.control_id for m in messages)
        return Peek(first.message_type, ids[:200], ordering_key(first))

    def map(self, raw: bytes, source: Source) -> list[Mapped]:
        out: list[Mapped] = []
        for msg in parse_messages(raw):
            mapper = _check_supported(msg)
            out.append(mapper(msg, source))
        return out


FORMAT = Hl7v2Format()
