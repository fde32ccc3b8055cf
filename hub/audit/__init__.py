"""The audit trail: one AuditEvent per access, chained by hashes so tampering shows.

Owns: what an access event records (``events``), writing AuditEvents with their hash chain
(``trail``), many requests' AuditEvents in one transaction (``group_commit``), and checking
the chain (``verify``, ``hub audit verify``).
Calls: the store, the schema.  Called by: the access layer (router and web adapter), the CLI.
"""

from __future__ import annotations

# Resource types nobody may update or delete through the REST API, administrators
# included: the access decision (``consent.decision``) refuses writes of them. AuditEvents
# are written by the hub only, and an edit would break the hash chain anyway.
APPEND_ONLY_TYPES: frozenset[str] = frozenset({"AuditEvent"})

__all__ = ["APPEND_ONLY_TYPES"]
