"""The mapping tables of HL7 v2 message types: which module maps which MSH-9, and why the
others are refused.

Owns: ``MAPPERS`` (MSH-9 ``TYPE^TRIGGER`` -> function(message, source) -> Mapped) and
``REFUSED`` (the reasons given for known but unmapped types).
Calls: the mapping modules.  Called by: ``connectors.hl7v2`` (peek and map).
"""

from __future__ import annotations

from collections.abc import Callable

from connectors.hl7v2.parse import Message
from connectors.model import Mapped, Source

Mapper = Callable[[Message, Source], Mapped]
MAPPERS: dict[str, Mapper] = {}
REFUSED: dict[str, str] = {}


def _load() -> None:
    from connectors.hl7v2.mapping import adt, orders, oru, siu, vxu

    for module in (adt, oru, orders, siu, vxu):
        MAPPERS.update(module.MAPPERS)
        REFUSED.update(getattr(module, "REFUSED", {}))


_load()
