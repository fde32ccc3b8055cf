"""Keyset-paging cursors: where the next page of a search starts.

Owns: the ``_cursor`` token format and the query key that binds a cursor to its search.
A token is ``base64url(JSON [sort values..., pid]) "." base64url(digest)``, the digest a
BLAKE2b of the query key and the JSON. The digest is a checksum, not a signature: it makes
a cursor that was altered, truncated or taken from another search (other criteria or sort)
fail with 400 instead of paging somewhere odd. It needs no secret because a cursor grants
nothing: the page statement still carries the request's consent clause, and a cursor only
says where in the visible rows to start, so a forged one can at worst skip rows the caller
could read anyway. (A secret would also have to be shared by every worker and survive
restarts, for no gain.)
Calls: orjson, hashlib.  Called by: ``hub.search.engine`` (encodes after a page, decodes
before one).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from hashlib import blake2b

import orjson

from hub.errors import bad_request

# Result parameters that change neither which rows match nor their order: a cursor made
# under one of these values works under another (e.g. a client changing _count mid-walk).
_PRESENTATION = frozenset(
    {"_count", "_offset", "_cursor", "_total", "_summary", "_elements", "_include", "_revinclude"}
    | {"_format", "_pretty"}
)
_DIGEST_BYTES = 12

Scalar = str | int | float | None


def query_key(res_type: str, used: Sequence[tuple[str, str]]) -> bytes:
    """What a cursor is bound to: the type, the criteria and the sort, in a canonical order."""
    kept = sorted((name, value) for name, value in used if name.partition(":")[0] not in _PRESENTATION)
    return orjson.dumps([res_type, kept])


def _digest(key: bytes, payload: bytes) -> bytes:
    return blake2b(key + b"\x00" + payload, digest_size=_DIGEST_BYTES).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(key: bytes, values: Sequence[Scalar]) -> str:
    """The cursor after a row whose sort values (pid last) are ``values``."""
    payload = orjson.dumps(list(values))
    return f"{_b64(payload)}.{_b64(_digest(key, payload))}"


def decode(key: bytes, token: str, length: int) -> list[Scalar]:
    """The sort values in ``token``, which must have been made for the same query key with
    ``length`` values; 400 otherwise."""
    invalid = bad_request("_cursor is not a cursor of this search (follow the Bundle's next link)")
    head, dot, tail = token.partition(".")
    if not dot or not token.isascii():
        raise invalid
    try:
        payload, digest = _unb64(head), _unb64(tail)
        values = orjson.loads(payload)
    except (binascii.Error, ValueError):
        raise invalid from None
    if digest != _digest(key, payload) or not isinstance(values, list) or len(values) != length:
        raise invalid
    if not all(v is None or isinstance(v, str | int | float) for v in values):
        raise invalid
    return values
