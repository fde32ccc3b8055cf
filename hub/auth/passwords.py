"""Password hashing: Argon2id with the argon2-cffi defaults (RFC 9106 low-memory profile).

Owns: turning a password into a stored hash and checking one against it.
Calls: argon2-cffi.  Called by: ``hub.auth.users`` (set_password, authenticate).

Verifying costs tens of milliseconds of CPU on purpose; async callers run it in a thread.
"""

from __future__ import annotations

from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("A password must not be empty")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches; False for a mismatch or a hash that is not Argon2."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with weaker parameters than the current defaults."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("not a password of anyone")


def burn_verification(password: str) -> None:
    """Spend what a real verification costs, so an unknown user is not told apart by timing."""
    verify_password(_dummy_hash(), password)
