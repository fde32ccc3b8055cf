"""The FHIR ``instant`` text of a moment: ``meta.lastUpdated`` and what the cipher binds to.

Owns: one formatting of a datetime as a FHIR instant (UTC, milliseconds, ``Z``). The store
writes ``meta.lastUpdated`` with it and seals each version with it in the associated data,
so the two must agree byte for byte: defined here, below both, so that ``hub.crypto`` needs
nothing from ``hub.store``.
Calls: nothing.  Called by: ``hub.store.records`` (which re-exports it), ``hub.crypto.admin``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def instant(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
