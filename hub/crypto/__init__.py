"""Encryption at rest: envelope-encrypted resources and keyed-hash search on identifiers.

Owns: nothing itself; the public face of ``keys`` (master key, data keys, keyring),
``envelope`` (the stored form, ``seal``/``open_content``), ``policy`` (what is sealed),
``blind`` (HMAC index values) and ``admin`` (``hub keys status|rotate``).
See docs/storage.md, "Encryption at rest".
"""

from __future__ import annotations

from hub.crypto.envelope import DecryptionError, is_sealed, open_content, seal
from hub.crypto.keys import (
    KeyConfigError,
    Keyring,
    bound,
    configure,
    current,
    install_worker,
    keyring_for,
    worker_state,
)
from hub.crypto.policy import needs_sealing

__all__ = [
    "DecryptionError",
    "KeyConfigError",
    "Keyring",
    "bound",
    "configure",
    "current",
    "install_worker",
    "is_sealed",
    "keyring_for",
    "needs_sealing",
    "open_content",
    "seal",
    "worker_state",
]
