"""Operating the keys: ``hub keys status`` and ``hub keys rotate [--reencrypt]``.

Owns: master-key rotation and re-encryption of stored rows.

Rotation, in an order that survives a crash at any step:
1. the current master key is copied to ``master.key.<kid>.old`` and the new one written
   to ``master.key.new`` (both 0600) - the loader looks at those files too;
2. one transaction re-wraps every ``data_key`` row under the new key (the index key
   included, which keeps its value so the search index stays valid), marks the old DEKs
   inactive and adds a fresh active DEK for new writes (old DEKs stay for decryption);
3. ``master.key.new`` replaces ``master.key``; the ``.old`` copy is removed.
With ``HUB_MASTER_KEY`` no file is touched: the new key comes from
``--new-master-key-file`` and the operator updates the variable afterwards.
Running processes keep the data keys they unwrapped; they pick up the new DEK when they
meet it in a row (reload) or restart.

``--reencrypt`` then rewrites, in batches of one transaction each, every stored version
(current and history) sealed under another DEK, and seals plaintext versions the policy
now wants sealed (data written while encryption was off). Index rows are not touched:
run ``hub reindex`` afterwards when plaintext rows were sealed, so their identifiers are
indexed as keyed hashes too. The connectors' sealed rows follow: every inbox message's raw
bytes (``connector_message.raw``, batches of one transaction) and the sealed secrets among the
sources' settings (``connectors.inbox.reseal_raw``, ``connectors.sources.reseal_settings``).
Calls: ``hub.crypto.keys``/``envelope``/``policy``, ``hub.instants``, SQLAlchemy.  Called by: the CLI, tests.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from hub.crypto import keys
from hub.crypto.envelope import open_content, seal
from hub.crypto.policy import needs_sealing
from hub.db.schema import data_key, resource, resource_history
from hub.instants import instant
from hub.settings import Settings

BATCH = 500


@dataclass
class KeyStatus:
    master_kid: str | None
    master_source: str | None
    encrypt_at_rest: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


def status(engine: sa.Engine, settings: Settings) -> KeyStatus:
    master = keys.configured_master(settings)
    report = KeyStatus(
        master.kid if master else None, master.source if master else None, settings.encrypt_at_rest
    )
    with engine.connect() as conn:
        rows = keys.read_rows(conn)
    for row in rows:
        kind = "index (HMAC)" if row.kid.startswith(keys.INDEX_PREFIX) else "data (AES-GCM)"
        report.rows.append(
            {
                "kid": row.kid,
                "kind": kind,
                "active": bool(row.active),
                "master_kid": row.master_kid,
                "created": row.created,
            }
        )
    stale = {r.master_kid for r in rows} - ({master.kid} if master else set())
    if stale:
        report.problem = (
            f"data keys wrapped by master key(s) {', '.join(sorted(stale))}, not the configured one"
        )
    return report


@dataclass
class RotateReport:
    old_master_kids: list[str]
    new_master_kid: str
    rewrapped: int
    new_dek: str


def rotate(engine: sa.Engine, settings: Settings, new_master_file: Path | None = None) -> RotateReport:
    from_env = bool(settings.hub_master_key)
    if from_env and new_master_file is None:
        raise keys.KeyConfigError(
            "the master key comes from HUB_MASTER_KEY: pass --new-master-key-file with the new key, "
            "then set HUB_MASTER_KEY to it"
        )
    candidates = keys.master_candidates(settings)
    current = keys.configured_master(settings)
    if current is None:
        raise keys.KeyConfigError("no master key is configured, so there is nothing to rotate")
    new_key = (
        keys.read_key_file(new_master_file).key if new_master_file else secrets.token_bytes(keys.KEY_BYTES)
    )
    new_kid = keys.master_kid(new_key)
    if new_kid == current.kid:
        raise keys.KeyConfigError("the new master key is the current one")

    key_file = Path(settings.master_key_file)
    backup = key_file.with_name(f"{key_file.name}.{current.kid}.old")
    staged = key_file.with_name(f"{key_file.name}.new")
    if not from_env:
        if not backup.exists():
            keys.write_key_file(backup, current.key)
        keys.write_key_file(staged, new_key, replace=True)

    with engine.connect().execution_options(write=True) as conn, conn.begin():
        keys.lock_keys(conn)
        rows = keys.read_rows(conn)
        if not rows:
            raise keys.KeyConfigError("the database has no data keys yet (nothing was encrypted)")
        old_kids = sorted({r.master_kid for r in rows})
        for row in rows:
            master = candidates.get(row.master_kid)
            if master is None:
                raise keys.KeyConfigError(f"data key {row.kid}: master key {row.master_kid} is not available")
            raw = keys.unwrap(master.key, row.kid, row.wrapped)
            conn.execute(
                data_key.update()
                .where(data_key.c.kid == row.kid)
                .values(wrapped=keys.wrap(new_key, row.kid, raw), master_kid=new_kid)
            )
        conn.execute(data_key.update().where(data_key.c.kid.startswith(keys.DEK_PREFIX)).values(active=False))
        dek = keys.new_kid(keys.DEK_PREFIX)
        conn.execute(
            data_key.insert().values(
                kid=dek,
                wrapped=keys.wrap(new_key, dek, secrets.token_bytes(keys.KEY_BYTES)),
                master_kid=new_kid,
                created=datetime.now(UTC),
                active=True,
            )
        )

    if not from_env:
        staged.replace(key_file)  # atomic: readers see the old key or the new one
        backup.unlink(missing_ok=True)
    keys.forget(engine)
    return RotateReport(old_kids, new_kid, len(rows), dek)


@dataclass
class ReencryptReport:
    resealed: int = 0  # sealed under an older DEK, now under the active one
    sealed: int = 0  # stored in the clear, now sealed (run `hub reindex` after)
    scanned: int = 0
    messages: int = 0  # connector inbox messages whose raw bytes were sealed again
    sources: int = 0  # connector sources whose secrets were sealed again


def reencrypt(engine: sa.Engine) -> ReencryptReport:
    report = ReencryptReport()
    with keys.bound(engine) as ring:
        active_kid, _ = ring.active()
        for table in (resource, resource_history):
            last: tuple[int, int] = (0, 0)
            while True:
                with engine.connect().execution_options(write=True) as conn, conn.begin():
                    rows = conn.execute(
                        sa.select(
                            table.c.pid,
                            table.c.version,
                            table.c.res_type,
                            table.c.res_id,
                            table.c.last_updated,
                            table.c.content,
                        )
                        .where(sa.tuple_(table.c.pid, table.c.version) > sa.tuple_(*last))
                        .order_by(table.c.pid, table.c.version)
                        .limit(BATCH)
                    ).all()
                    if not rows:
                        break
                    for row in rows:
                        _reencrypt_row(conn, ring, active_kid, table, row, report)
                    last = (rows[-1].pid, rows[-1].version)
                    report.scanned += len(rows)
        _reencrypt_connectors(engine, ring, report)
    return report


def _reencrypt_connectors(engine: sa.Engine, ring: keys.Keyring, report: ReencryptReport) -> None:
    # Imported here: the connectors are built on the store, not the other way round.
    from connectors.inbox import reseal_raw
    from connectors.sources import reseal_settings

    with engine.connect().execution_options(write=True) as conn:
        report.messages, _ = reseal_raw(conn, ring, batch=BATCH)
        with conn.begin():
            report.sources = reseal_settings(conn, ring)


def _reencrypt_row(
    conn: sa.Connection,
    ring: keys.Keyring,
    active_kid: str,
    table: sa.Table,
    row: Any,
    report: ReencryptReport,
) -> None:
    if row.content is None:
        return
    stored = row.content if isinstance(row.content, bytes) else row.content.encode()
    plain = open_content(stored, row.res_type, row.res_id)
    if plain is not stored:
        if orjson.loads(stored)["_enc"]["kid"] == active_kid:
            return
        report.resealed += 1
    else:
        resource_json = orjson.loads(plain)
        if not needs_sealing(row.res_type, plain, resource_json, {}):
            return
        # PostgreSQL hands back JSONB's own rendering; seal the compact form.
        plain = orjson.dumps(resource_json)
        report.sealed += 1
    sealed = seal(ring, plain, row.res_type, row.res_id, row.version, instant(row.last_updated))
    conn.execute(
        table.update()
        .where(table.c.pid == row.pid, table.c.version == row.version)
        .values(content=sealed.decode())
    )
