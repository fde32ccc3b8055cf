"""The stored form of an encrypted resource version, and the one call that opens it.

Owns: the envelope format. A sealed version is stored as

    {"resourceType": T, "id": id, "meta": {"versionId": v, "lastUpdated": t},
     "_enc": {"kid": "dek-...", "alg": "A256GCM", "iv": base64, "ct": base64}}

where ``ct`` is AES-256-GCM of the exact JSON bytes the store would otherwise have kept,
with AAD ``"T/id/v"``: a ciphertext copied into another row (another resource or another
version) fails its tag instead of being served under the wrong identity. Opening gives
back those bytes unchanged, so reads never parse and re-dump a resource.
Plain rows pay one bounded ``bytes.find`` (``"_enc"`` sits within the first few hundred
bytes of every envelope: after resourceType/id/meta when the store keeps the text as
written, right after "id" in PostgreSQL's JSONB key order).
Calls: ``hub.crypto.keys``, orjson.  Called by: the writer (seal), and every place that
reads ``resource.content``/``resource_history.content`` (open): the reader, the search
engine, $everything, $export, reindex, key rotation.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag

from hub.crypto import keys
from hub.errors import FhirError, Issue

ALG = "A256GCM"
_MARK = b'"_enc"'
_WINDOW = 512  # resourceType and id are at most 64 characters each; meta is ~70 bytes


class DecryptionError(FhirError):
    """A sealed row that cannot be opened: unknown key, wrong master key, or tampering."""


def _failure(res_type: str, res_id: str, why: str) -> DecryptionError:
    return DecryptionError(
        500, [Issue("exception", f"The stored content of {res_type}/{res_id} cannot be decrypted: {why}")]
    )


def aad(res_type: str, res_id: str, version: int | str) -> bytes:
    return f"{res_type}/{res_id}/{version}".encode()


def is_sealed(content: bytes) -> bool:
    """Cheap test, exact for stored rows: FHIR has no element named "_enc"."""
    return content.find(_MARK, 0, _WINDOW) >= 0


def seal(
    ring: keys.Keyring,
    content: bytes,
    res_type: str,
    res_id: str,
    version: int,
    last_updated: str,
) -> bytes:
    """The envelope of one resource version, under the keyring's active DEK."""
    kid, cipher = ring.active()
    iv = os.urandom(12)
    ct = cipher.encrypt(iv, content, aad(res_type, res_id, version))
    return orjson.dumps(
        {
            "resourceType": res_type,
            "id": res_id,
            "meta": {"versionId": str(version), "lastUpdated": last_updated},
            "_enc": {
                "kid": kid,
                "alg": ALG,
                "iv": base64.b64encode(iv).decode(),
                "ct": base64.b64encode(ct).decode(),
            },
        }
    )


def open_content(content: bytes, res_type: str, res_id: str) -> bytes:
    """The plaintext JSON of a stored version (plain rows are returned as they are).

    ``res_type``/``res_id`` come from the row's columns, not from the envelope, so a swapped
    envelope fails authentication. Raises ``DecryptionError`` (HTTP 500) rather than ever
    returning bytes that did not authenticate.
    """
    if content.find(_MARK, 0, _WINDOW) < 0:
        return content
    return _open(content, res_type, res_id)


def _open(content: bytes, res_type: str, res_id: str) -> bytes:
    try:
        envelope: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise _failure(res_type, res_id, "the envelope is not JSON") from None
    sealed = envelope.get("_enc") if isinstance(envelope, dict) else None
    if not isinstance(sealed, dict):
        return content  # "_enc" somewhere in a plain resource, not an envelope
    try:
        version = envelope["meta"]["versionId"]
        kid, iv, ct = sealed["kid"], base64.b64decode(sealed["iv"]), base64.b64decode(sealed["ct"])
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise _failure(res_type, res_id, "the envelope is malformed") from None
    if sealed.get("alg", ALG) != ALG:
        raise _failure(res_type, res_id, f"unsupported algorithm {sealed.get('alg')!r}")
    try:
        cipher = keys.cipher_for(kid)
    except keys.KeyConfigError as error:
        raise _failure(res_type, res_id, str(error)) from None
    if cipher is None:
        ring = keys.current()
        why = ring.problem if ring is not None and ring.problem else f"data key {kid} is not known"
        raise _failure(res_type, res_id, why)
    try:
        return cipher.decrypt(iv, ct, aad(res_type, res_id, version))
    except (InvalidTag, ValueError):
        raise _failure(
            res_type, res_id, "integrity check failed (tampered, or moved from another row)"
        ) from None
