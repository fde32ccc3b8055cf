"""The 64-bit hashes that lead every index table.

Owns: the hashing scheme. It is part of the on-disk format: changing it means a full
``hub reindex``. Parts are joined with a unit separator so ("ab", "c") != ("a", "bc").
Hashes of the same parts are cached: index extraction asks for the same (type, code,
system, value) over and over (a LOINC code, a code system, a status), and a cache hit
costs a fraction of a BLAKE2b.
Calls: hashlib.  Called by: index extraction and search predicates.
"""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b

_SEP = "\x1f"


@lru_cache(maxsize=1 << 16)
def hash64(*parts: str | None) -> int:
    """Signed 64-bit BLAKE2b of the parts (None counts as the empty string)."""
    joined = _SEP.join("" if p is None else p for p in parts).encode()
    return int.from_bytes(blake2b(joined, digest_size=8).digest(), "big", signed=True)
