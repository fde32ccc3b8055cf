"""Keyed hashes in place of sensitive identifiers in the search index.

Owns: which token values are never stored in ``idx_token`` in the clear, and the forms a
search for them takes. Identifier values whose system is CCCD, BHYT or BHXH, and phone
(and sms) ContactPoint values, are indexed as ``"hmac:" + hex(HMAC-SHA256(index key,
normalized value))[:32]``; the 64-bit hashes of the row are computed over that form, so
lookups stay one index probe. Normalizing first lets ``0905 120 001`` find
``0905120001``: identifiers lose whitespace, phone numbers keep digits and a leading
``+`` (no country-code folding: ``+84905120001`` and ``0905120001`` stay different).

Search asks for the plain form too (OR), so rows written while encryption was off, or
before it existed, still match. Side effects, by design: ``_sort=identifier`` orders such
values by their hash, not their digits; ``:text`` (on the identifier type's text) and
``:missing`` are unaffected; ``:not`` negates both forms; a starts-with or partial match
on these values is impossible.
Calls: ``hub.crypto.keys``, ``hub.crypto.policy`` (the systems).
Called by: index extraction (``hub.search.index``), token predicates.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

from hub.crypto import keys
from hub.crypto.policy import PHONE_CHANNELS, SENSITIVE_SYSTEMS

PREFIX = "hmac:"
_DIGEST_HEX = 32  # 128 bits: collision-free for any population, half the index bytes


def normalize_identifier(value: str) -> str:
    return "".join(value.split())


def normalize_phone(value: str) -> str:
    text = value.strip()
    digits = "".join(ch for ch in text if ch.isdigit())
    return f"+{digits}" if text.startswith("+") else digits


def _digest(key: bytes, normalized: str) -> str:
    return PREFIX + hmac.new(key, normalized.encode(), hashlib.sha256).hexdigest()[:_DIGEST_HEX]


def _write_key() -> bytes | None:
    """The index key when new index rows must hide values (encryption on), else None."""
    ring = keys.current()
    if ring is None or not ring.encrypt:
        return None
    if ring.index_key is None:
        raise keys.KeyConfigError(ring.problem or "encryption at rest is on but no index key is loaded")
    return ring.index_key


def index_identifier(system: str | None, value: str) -> str:
    """The value an Identifier is indexed under."""
    if system not in SENSITIVE_SYSTEMS:
        return value
    key = _write_key()
    return value if key is None else _digest(key, normalize_identifier(value))


def index_contact(channel: str | None, value: str) -> str:
    """The value a ContactPoint is indexed under."""
    if channel not in PHONE_CHANNELS:
        return value
    key = _write_key()
    return value if key is None else _digest(key, normalize_phone(value))


@lru_cache(maxsize=1024)
def _kind(expression: str) -> str | None:
    lowered = expression.lower()
    if "identifier" in lowered:
        return "identifier"
    if "telecom" in lowered and "system='email'" not in lowered:
        return "telecom"
    return None


def search_forms(expression: str, system: str | None, value: str) -> list[str]:
    """Hashed forms to look for besides ``value`` itself (none when nothing can be hidden).

    ``expression`` is the search parameter's FHIRPath (which tells identifiers and
    telecoms from other tokens); ``system`` is the searched system, None when the search gave none (``value`` or
    ``|value``). Works whenever the database has an index key, even with encryption
    now off: rows hashed earlier must stay findable.
    """
    kind = _kind(expression)
    if kind is None:
        return []
    ring = keys.current()
    key = ring.index_key if ring is not None else None
    if key is None:
        return []
    if kind == "identifier":
        if system is not None and system not in SENSITIVE_SYSTEMS:
            return []
        normalized = normalize_identifier(value)
    else:
        if system is not None:
            return []  # ContactPoint channels are not indexed as systems
        normalized = normalize_phone(value)
        if not normalized.lstrip("+"):
            return []
    return [_digest(key, normalized)]
