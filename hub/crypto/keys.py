"""Keys for encryption at rest: the master key, the data keys it wraps, and the keyring.

Owns: the key hierarchy. The master key (KEK, 32 bytes) comes from ``HUB_MASTER_KEY``
(base64) or ``master_key_file`` (created 0600 with random bytes at first use); its id is
the first 16 hex digits of its SHA-256. Data keys (DEK, 32 random bytes each) live in the
``data_key`` table, each wrapped with AES-GCM under the master key (AAD: the data key's
kid). Exactly one ``dek-`` row is active: new writes use it; older ones stay for
decryption. One ``hmac-`` row holds the key of the search index's keyed hashes (see
``hub.crypto.blind``); rotation re-wraps it but never replaces it, or every hashed index
value would have to be recomputed.

A ``Keyring`` is what one database's unwrapped keys look like in a process (loaded once,
reloaded when a row names a kid it has not seen: another process rotated). It is part of
the object graph built at start-up: ``configure(settings, engine)``, called by the app
factory and the CLI with their settings, makes it, and the ``Store`` holds it; nothing here
reads the environment. ``configure`` also registers it for its database so code holding
only an engine (``bound``, ``keyring_for``) finds it; a database nobody configured has no
keyring (``KeyConfigError``), never another database's nor one built from the environment.
The master key itself is not kept after unwrapping. Code that has no database connection
in hand (index extraction, search predicates, ``open_content``) finds the keyring of the
transaction it runs in through a context variable set by ``Store.read`` and ``Store.write``
(``using``/``bound``), and only that one; ingest worker processes get only what they need
(the index key and whether to encrypt, ``worker_state``/``install_worker``), never a DEK or
the master key, because sealing happens in the writer of the main process.
Calls: cryptography (AES-GCM), SQLAlchemy (``data_key``), settings (as passed in).
Called by: ``hub.crypto.envelope``/``blind``/``admin``, the store, ingest, the app factory,
the CLI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hub.db.schema import data_key
from hub.errors import FhirError, Issue
from hub.settings import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
DEK_PREFIX = "dek-"
INDEX_PREFIX = "hmac-"
_INDEX_KEY_INFO = b"hub search index v1"
_RELOAD_EVERY = 1.0  # seconds


class KeyConfigError(FhirError):
    """The keys cannot be used: a master key is missing or does not fit the data keys.
    A FhirError, so a request that meets it gets a 500 OperationOutcome saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(500, [Issue("exception", f"Encryption keys: {message}")])


# --- the master key --------------------------------------------------------------------


@dataclass(frozen=True)
class MasterKey:
    key: bytes
    kid: str
    source: str  # "HUB_MASTER_KEY" or the file it was read from

    def __repr__(self) -> str:  # never print key material
        return f"MasterKey(kid={self.kid!r}, source={self.source!r})"


def master_kid(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def parse_key(data: bytes, where: str) -> bytes:
    """32 raw bytes, or their base64 text (what an operator pastes into a file or variable)."""
    if len(data) == KEY_BYTES:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyConfigError(f"{where}: a master key is {KEY_BYTES} bytes, raw or base64")
    return key


def read_key_file(path: Path) -> MasterKey:
    key = parse_key(path.read_bytes(), str(path))
    return MasterKey(key, master_kid(key), str(path))


def write_key_file(path: Path, key: bytes, *, replace: bool = False) -> None:
    """Write a key readable by the owner only. Without ``replace`` it fails if the file
    exists (FileExistsError), so two processes starting at once cannot each create one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(staging, path)
        else:
            os.link(staging, path)  # atomic, and refuses to overwrite
    finally:
        staging.unlink(missing_ok=True)


def configured_master(settings: Settings, *, create: bool = False) -> MasterKey | None:
    """The master key the settings name (None when there is none and ``create`` is off)."""
    if settings.hub_master_key:
        key = parse_key(settings.hub_master_key.encode(), "HUB_MASTER_KEY")
        return MasterKey(key, master_kid(key), "HUB_MASTER_KEY")
    path = Path(settings.master_key_file)
    if not path.exists():
        if not create:
            return None
        try:
            write_key_file(path, secrets.token_bytes(KEY_BYTES))
            log.warning("Created master key %s: back it up, data cannot be read without it", path)
        except FileExistsError:
            pass  # another process created it first; use theirs
    return read_key_file(path)


def master_candidates(settings: Settings) -> dict[str, MasterKey]:
    """Every master key this process can find, by kid: the configured one, plus the files
    a rotation leaves beside the key file until it is done (``master.key.<kid>.old``,
    ``master.key.new``), so an interrupted rotation is recovered from without help."""
    found: dict[str, MasterKey] = {}
    configured = configured_master(settings)
    if configured is not None:
        found[configured.kid] = configured
    path = Path(settings.master_key_file)
    if path.parent.is_dir():
        for leftover in sorted(path.parent.glob(f"{path.name}.*")):
            try:
                candidate = read_key_file(leftover)
            except (KeyConfigError, OSError):
                continue
            found.setdefault(candidate.kid, candidate)
    return found


# --- wrapping ---------------------------------------------------------------------------


def wrap(kek: bytes, kid: str, dek: bytes) -> bytes:
    """nonce (12 bytes) || AES-GCM(dek), bound to its kid so rows cannot trade keys."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(kek).encrypt(nonce, dek, f"hub-data-key:{kid}".encode())


def unwrap(kek: bytes, kid: str, wrapped: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(bytes(wrapped[:12]), bytes(wrapped[12:]), f"hub-data-key:{kid}".encode())
    except InvalidTag:
        raise KeyConfigError(f"data key {kid} does not unwrap with its master key") from None


def new_kid(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


def index_key_of(raw: bytes) -> bytes:
    # A derived key, so the stored row's bytes are never used as an HMAC key directly.
    return hmac.new(raw, _INDEX_KEY_INFO, hashlib.sha256).digest()


def read_rows(conn: sa.Connection) -> list[Any]:
    return list(conn.execute(sa.select(data_key).order_by(data_key.c.created, data_key.c.kid)).all())


def lock_keys(conn: sa.Connection) -> None:
    """Serialize key creation and rotation across processes (SQLite: BEGIN IMMEDIATE does)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE data_key IN SHARE ROW EXCLUSIVE MODE")


# --- the keyring ------------------------------------------------------------------------


class Keyring:
    """The unwrapped keys of one database, as this process holds them."""

    def __init__(self, engine: sa.Engine | None, settings: Settings | None, *, encrypt: bool) -> None:
        self.engine = engine
        self.settings = settings
        self.encrypt = encrypt  # seal new writes (settings.encrypt_at_rest)
        self.active_kid: str | None = None
        self.index_key: bytes | None = None
        self._ciphers: dict[str, AESGCM] = {}
        self._loaded = False
        self._problem: str | None = None  # why the keys could not be loaded (encryption off)
        self._lock = threading.Lock()
        self._reloaded = float("-inf")

    @classmethod
    def empty(cls) -> Keyring:
        """A keyring with no keys: index values stay plain, nothing is sealed."""
        ring = cls(None, None, encrypt=False)
        ring._loaded = True
        return ring

    # Loading happens before the caller opens its own transaction (see ``bound``): creating
    # the first keys is a write, which on SQLite would wait behind that transaction's lock.
    def ensure_loaded(self) -> Keyring:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load(create=self.encrypt)
        return self

    def reload(self) -> None:
        with self._lock:
            self._load(create=False)
            self._reloaded = time.monotonic()

    def _load(self, *, create: bool) -> None:
        if self.engine is None or self.settings is None:
            self._loaded = True
            return
        with self.engine.connect() as conn:
            rows = read_rows(conn)
        if not rows and create:
            rows = create_first_keys(self.engine, self.settings)
        try:
            self._install(rows)
            self._problem = None
        except KeyConfigError as error:
            if self.encrypt:
                raise
            # Encryption is off: plaintext keeps working; only sealed rows fail, with this.
            self._problem = str(error)
        self._loaded = True

    def _install(self, rows: list[Any]) -> None:
        if not rows or self.settings is None:
            return
        masters = master_candidates(self.settings)
        ciphers: dict[str, AESGCM] = {}
        active, index_key = None, None
        for row in rows:
            master = masters.get(row.master_kid)
            if master is None:
                raise KeyConfigError(
                    f"data key {row.kid} is wrapped by master key {row.master_kid}, which is not "
                    f"configured (HUB_MASTER_KEY or {self.settings.master_key_file})"
                )
            raw = unwrap(master.key, row.kid, row.wrapped)
            if row.kid.startswith(INDEX_PREFIX):
                index_key = index_key or index_key_of(raw)  # the oldest, should there be two
            else:
                ciphers[row.kid] = AESGCM(raw)
                if row.active:
                    active = row.kid
        self._ciphers, self.active_kid, self.index_key = ciphers, active, index_key

    def cipher(self, kid: str) -> AESGCM | None:
        found = self._ciphers.get(kid)
        # A key another process created after we loaded. At most one reload a second, so rows
        # naming a bogus kid cannot turn every read into a query of data_key.
        if found is None and self.engine is not None and time.monotonic() - self._reloaded > _RELOAD_EVERY:
            self.reload()
            found = self._ciphers.get(kid)
        return found

    def active(self) -> tuple[str, AESGCM]:
        self.ensure_loaded()
        if self.active_kid is None:
            raise KeyConfigError(self._problem or "no active data key: encryption at rest is not set up")
        return self.active_kid, self._ciphers[self.active_kid]

    @property
    def problem(self) -> str | None:
        return self._problem

    def knows(self, kid: str) -> bool:
        return kid in self._ciphers


def create_first_keys(engine: sa.Engine, settings: Settings) -> list[Any]:
    """The index key and the first DEK of a database, unless another process made them."""
    master = configured_master(settings, create=True)
    assert master is not None
    with engine.connect().execution_options(write=True) as conn, conn.begin():
        lock_keys(conn)
        rows = read_rows(conn)
        if rows:
            return rows
        moment = sa.func.now() if conn.dialect.name == "postgresql" else _utcnow()
        for kid, active in ((new_kid(INDEX_PREFIX), True), (new_kid(DEK_PREFIX), True)):
            conn.execute(
                data_key.insert().values(
                    kid=kid,
                    wrapped=wrap(master.key, kid, secrets.token_bytes(KEY_BYTES)),
                    master_kid=master.kid,
                    created=moment,
                    active=active,
                )
            )
        return read_rows(conn)


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


# --- which keyring: per engine, per transaction, per worker process --------------------

_settings_by_url: dict[str, Settings] = {}
_rings_by_url: dict[str, Keyring] = {}
_rings_by_engine: weakref.WeakKeyDictionary[sa.Engine, Keyring] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
_current: ContextVar[Keyring | None] = ContextVar("hub_keyring", default=None)


def _url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def configure(settings: Settings, engine: sa.Engine) -> Keyring:
    """The keyring of a database with these settings (master key, encrypt_at_rest), for the
    object graph built at start-up (the app factory hands it to the Store). Registered for
    the engine and its URL, for ``bound``. Keys load on first use, so this works before
    migrations ran."""
    url = _url(engine)
    with _registry_lock:
        ring = _rings_by_url.get(url)
        if ring is None or _settings_by_url.get(url) != settings:
            ring = Keyring(engine, settings, encrypt=settings.encrypt_at_rest)
            _rings_by_url[url] = ring
            _settings_by_url[url] = settings
        _rings_by_engine[engine] = ring
    return ring


def keyring_for(engine: sa.Engine) -> Keyring:
    """The keyring ``configure`` made for this database (this engine or another one on the
    same URL), loaded. None configured: ``KeyConfigError``, rather than keys guessed from
    the environment."""
    ring = _rings_by_engine.get(engine)
    if ring is None:
        url = _url(engine)
        with _registry_lock:
            ring = _rings_by_url.get(url)
            if ring is None:
                where = engine.url.render_as_string(hide_password=True)
                raise KeyConfigError(
                    f"no keyring is configured for {where} (the app factory or the CLI builds it "
                    "with hub.crypto.keys.configure)"
                )
            _rings_by_engine[engine] = ring
    return ring.ensure_loaded()


def forget(engine: sa.Engine) -> None:
    """Drop a database's cached keys (after a rotation in this process)."""
    with _registry_lock:
        _rings_by_engine.pop(engine, None)
        ring = _rings_by_url.get(_url(engine))
    if ring is not None:
        with ring._lock:
            ring._loaded = False


@contextmanager
def bound(engine: sa.Engine) -> Iterator[Keyring]:
    """Make the engine's keyring the current one for the code run inside."""
    with using(keyring_for(engine)) as ring:
        yield ring


@contextmanager
def using(ring: Keyring) -> Iterator[Keyring]:
    """Make this keyring the current one (``Keyring.empty()``: no keys, nothing hidden)."""
    token = _current.set(ring)
    try:
        yield ring
    finally:
        _current.reset(token)


def current() -> Keyring | None:
    """The keyring bound to the code being run (``Store.read``/``write``, ``using``, a
    worker's); None outside any: no process-wide default stands in for it."""
    return _current.get()


def cipher_for(kid: str) -> AESGCM | None:
    """The DEK of a kid in the current database's keyring (never another database's)."""
    ring = current()
    return ring.cipher(kid) if ring is not None else None


def worker_state(ring: Keyring) -> tuple[bool, bytes | None]:
    """What an ingest worker process needs of a keyring: whether to encrypt, the index key."""
    ring.ensure_loaded()
    return ring.encrypt, ring.index_key


def install_worker(encrypt: bool, index_key: bytes | None) -> None:
    """ProcessPoolExecutor initializer: keys for index extraction and the encrypt flag only
    (bound for the worker's thread, which runs every task it is given)."""
    # A forked worker inherits the parent's unwrapped data keys: drop them, it needs none.
    with _registry_lock:
        _rings_by_url.clear()
        _rings_by_engine.clear()
        _settings_by_url.clear()
    ring = Keyring.empty()
    ring.encrypt, ring.index_key = encrypt, index_key
    _current.set(ring)
