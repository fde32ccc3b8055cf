"""The registry of sources (channels): which facility feeds the hub, by which kind of feed,
with which settings. Channels are data, not code (as in OpenHIM and Mirth).

Owns: the ``connector_source`` table, the rules a source must meet (name, MA_CSKCB facility
code, level, kind, settings per kind), and the facility's Organization in the record: adding
a source upserts ``Organization?identifier=<FACILITY>|<code>`` through the router as the hub
itself, so every mapping can reference it conditionally (``identifiers.facility_reference``).
Secrets among the settings (``SECRET_SETTINGS``: a FHIR server's bearer ``token``, an OAuth2
``client_secret``) are sealed at rest like the inbox's raw bytes (AES-GCM under the database's
data key, AAD ``connector_source/<name>/<key>``; stored as ``"$sealed:" + base64``), opened
when a ``Source`` is read, and never shown: ``masked`` is what the CLI and the admin API print.
Calls: ``hub.db.schema`` (the table), the router (the Organization, audited as any write),
``connectors.model`` (``Source``), ``connectors.identifiers`` (the facility system),
``hub.crypto.keys`` and ``connectors.inbox`` (sealing of secrets).
Called by: the admin API and CLI (``connectors.api``, ``hub connectors add|list|pause``),
the inbox (status), the pipeline (a message's source), listeners and pollers.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from connectors.identifiers import FACILITY
from connectors.model import FACILITY_LEVELS, FORMAT_OF_KIND, Source
from hub.crypto.keys import Keyring, keyring_for
from hub.db.schema import connector_source

if TYPE_CHECKING:
    from hub.rest.router import FhirRouter

__all__ = [
    "MASK",
    "SECRET_SETTINGS",
    "SourceError",
    "add",
    "all_sources",
    "from_row",
    "get",
    "masked",
    "organization_of",
    "reseal_settings",
    "set_paused",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_FACILITY_CODE = re.compile(r"^[0-9A-Za-z]{5}$")
# Where the facility sits in the Vietnamese system, as Organization.type.
LEVEL_SYSTEM = "https://ehealth-hub.vn/fhir/CodeSystem/facility-level"
_LEVEL_DISPLAY = {
    "commune": "Trạm y tế xã (commune health station)",
    "district": "Trung tâm y tế huyện / khu vực (district or regional centre)",
    "provincial": "Bệnh viện tuyến tỉnh (provincial hospital)",
    "other": "Cơ sở khám chữa bệnh khác (other facility)",
}
# Settings each kind accepts, with the type of each; anything else is refused (a typo in
# "folder" must not leave a source that silently watches nothing).
# One name per setting; connectors.fhirpull.poller documents the fhir-pull ones.
_SETTINGS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hl7v2-mllp": {
        "host": str,
        "port": int,
        "tls": bool,
        "certfile": str,
        "keyfile": str,  # a path: the key itself stays on disk
        "mrn_authority": str,  # PID-3 assigning authority of the facility's MRN (connectors.hl7v2)
        "allow": (list, str),  # peer addresses or networks that may connect (connectors.mllp)
        "client_cafile": str,  # CA of the client certificates that may connect (mutual TLS)
    },
    "xml130": {"folder": str, "interval": (int, float)},
    "fhir-pull": {
        "base_url": str,
        "token": str,
        "token_url": str,
        "client_id": str,
        "client_secret": str,
        "interval": (int, float),
        "types": list,
        "bulk": bool,
        "page_size": int,
        "timeout": (int, float),
        "overlap_seconds": (int, float),
        "bulk_wait_seconds": (int, float),
    },
}
# Settings that are credentials: sealed at rest, masked in every output.
SECRET_SETTINGS = frozenset({"token", "client_secret"})
MASK = "********"
_SEALED_PREFIX = "$sealed:"
# Numbers that must be positive, or at least not negative.
_POSITIVE = ("interval", "timeout", "page_size")
_NOT_NEGATIVE = ("overlap_seconds", "bulk_wait_seconds")


class SourceError(ValueError):
    """A source that breaks a rule, or an unknown or already registered name."""


def _now() -> datetime:
    return datetime.now(UTC)


def validate(source: Source) -> None:
    """Raise ``SourceError`` naming the first rule the source breaks."""
    if not _NAME.match(source.name):
        raise SourceError(
            f"source name {source.name!r}: 1-64 characters a-z, 0-9 and '-', not starting with '-'"
        )
    if not _FACILITY_CODE.match(source.facility_code):
        raise SourceError(
            f"facility code {source.facility_code!r}: the MA_CSKCB is 5 letters or digits (leading zeros kept)"
        )
    if not source.facility_name.strip():
        raise SourceError("facility name is empty")
    if source.facility_level not in FACILITY_LEVELS:
        raise SourceError(f"facility level {source.facility_level!r}: one of {', '.join(FACILITY_LEVELS)}")
    if source.kind not in FORMAT_OF_KIND:
        raise SourceError(f"kind {source.kind!r}: one of {', '.join(FORMAT_OF_KIND)}")
    allowed = {**_SETTINGS[source.kind], "format": str}  # "format": another mapper by name
    for key, value in source.settings.items():
        if key not in allowed:
            raise SourceError(f"setting {key!r} is not one of {source.kind}'s: {', '.join(sorted(allowed))}")
        wanted = allowed[key]
        # bool is an int in Python: a port of True is no port.
        if not isinstance(value, wanted) or (isinstance(value, bool) and wanted is not bool):
            raise SourceError(f"setting {key!r} has the wrong type ({type(value).__name__})")
    port = source.settings.get("port")
    if port is not None and not 1 <= port <= 65535:
        raise SourceError(f"setting 'port' {port} is not a TCP port")
    if source.kind == "hl7v2-mllp":
        from connectors.mllp import allowed_networks

        try:
            allowed_networks(source.settings)
        except ValueError as error:
            raise SourceError(str(error)) from None
        if source.settings.get("client_cafile") and (
            not source.settings.get("certfile") or source.settings.get("tls") is False
        ):
            raise SourceError("setting 'client_cafile' needs TLS: a 'certfile'")
    if source.kind == "fhir-pull":
        base = source.settings.get("base_url")
        if (
            not isinstance(base, str)
            or urlsplit(base).scheme not in ("http", "https")
            or not urlsplit(base).netloc
        ):
            raise SourceError(
                "a fhir-pull source needs setting 'base_url', an http(s) URL of the facility's FHIR base"
            )
        settings = source.settings
        if "token_url" in settings and not (settings.get("client_id") and settings.get("client_secret")):
            raise SourceError(
                "setting 'token_url' needs 'client_id' and 'client_secret' (client credentials)"
            )
        if ("client_id" in settings or "client_secret" in settings) and "token_url" not in settings:
            raise SourceError("settings 'client_id' and 'client_secret' need 'token_url'")
        if "token" in settings and "token_url" in settings:
            raise SourceError("give either 'token' or 'token_url' (with client_id, client_secret)")
        types = settings.get("types")
        if types is not None and not all(isinstance(t, str) and t for t in types):
            raise SourceError("setting 'types' is a list of resource type names")
    for key in _POSITIVE:
        value = source.settings.get(key)
        if value is not None and value <= 0:
            raise SourceError(f"setting {key!r} must be positive")
    for key in _NOT_NEGATIVE:
        value = source.settings.get(key)
        if value is not None and value < 0:
            raise SourceError(f"setting {key!r} must not be negative (seconds)")


def masked(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as they may be shown: every secret replaced by ``MASK``."""
    return {key: (MASK if key in SECRET_SETTINGS else value) for key, value in settings.items()}


def _aad(name: str, key: str) -> bytes:
    return f"connector_source/{name}/{key}".encode()


def _seal_settings(ring: Keyring, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as stored: secrets sealed (in the clear when encryption at rest is off,
    as everything else then is)."""
    from connectors.inbox import seal_bytes

    stored = dict(settings)
    for key in SECRET_SETTINGS & stored.keys():
        if ring.encrypt:
            sealed = seal_bytes(ring, _aad(name, key), str(stored[key]).encode())
            stored[key] = _SEALED_PREFIX + base64.b64encode(sealed).decode()
    return stored


def _open_settings(engine: sa.Engine, name: str, stored: dict[str, Any]) -> dict[str, Any]:
    from connectors.inbox import open_bytes

    settings = dict(stored)
    for key, value in stored.items():
        if isinstance(value, str) and value.startswith(_SEALED_PREFIX):
            sealed = base64.b64decode(value[len(_SEALED_PREFIX) :])
            settings[key] = open_bytes(keyring_for(engine), _aad(name, key), sealed).decode()
    return settings


def reseal_settings(conn: sa.Connection, ring: Keyring) -> int:
    """``hub keys rotate --reencrypt``: every source's secrets sealed again under the active
    data key (and sealed when they were stored in the clear); returns how many sources
    changed. Runs in the caller's write transaction."""
    from connectors.inbox import open_bytes, sealed_kid

    if not ring.encrypt:
        return 0  # nothing is sealed while encryption at rest is off; what was stays readable
    active, _ = ring.active()
    changed = 0
    rows = conn.execute(sa.select(connector_source.c.name, connector_source.c.settings)).all()
    for row in rows:
        stored = dict(row.settings or {})
        plain = dict(stored)
        current = True  # every secret already sealed under the active data key
        for key, value in stored.items():
            if isinstance(value, str) and value.startswith(_SEALED_PREFIX):
                sealed = base64.b64decode(value[len(_SEALED_PREFIX) :])
                plain[key] = open_bytes(ring, _aad(row.name, key), sealed).decode()
                current = current and sealed_kid(sealed) == active
            elif key in SECRET_SETTINGS:
                current = False
        if current:
            continue
        conn.execute(
            connector_source.update()
            .where(connector_source.c.name == row.name)
            .values(settings=_seal_settings(ring, row.name, plain))
        )
        changed += 1
    return changed


def organization_of(source: Source) -> dict[str, Any]:
    """The facility's Organization as the hub records it."""
    return {
        "resourceType": "Organization",
        "identifier": [{"system": FACILITY, "value": source.facility_code}],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    },
                    {
                        "system": LEVEL_SYSTEM,
                        "code": source.facility_level,
                        "display": _LEVEL_DISPLAY[source.facility_level],
                    },
                ]
            }
        ],
        "name": source.facility_name,
    }


def _upsert_organization(router: FhirRouter, source: Source) -> None:
    from hub.auth.principal import system_principal
    from hub.rest.messages import FhirRequest

    # A conditional update: the facility's one Organization, created the first time, its
    # name and level refreshed afterwards (a no-op when unchanged: no new version).
    request = FhirRequest(
        "PUT",
        "Organization",
        query=[("identifier", f"{FACILITY}|{source.facility_code}")],
        parsed_body=organization_of(source),
        principal=system_principal(f"system:connector-{source.name}"),
    )
    response = router.handle(request)
    if response.status >= 300:
        detail = (response.body or b"").decode(errors="replace")[:500]
        raise SourceError(f"the facility's Organization could not be stored ({response.status}): {detail}")


def from_row(engine: sa.Engine, row: Any) -> Source:
    """A ``connector_source`` row as a Source, its secrets opened (``KeyConfigError`` when
    they cannot be)."""
    return Source(
        name=row.name,
        facility_code=row.facility_code,
        facility_name=row.facility_name,
        facility_level=row.facility_level,
        kind=row.kind,
        settings=_open_settings(engine, row.name, dict(row.settings or {})),
        paused=bool(row.paused),
    )


def _write(engine: sa.Engine) -> sa.Connection:
    return engine.connect().execution_options(write=True)


def add(router: FhirRouter, source: Source, *, replace: bool = False) -> Source:
    """Validate and store a source (``replace``: overwrite one of that name, keeping whether
    it is paused only if the new one says so), after upserting its facility's Organization."""
    engine = router.ctx.store.engine
    before = get(engine, source.name)
    if not replace and before is not None:
        raise SourceError(f"source {source.name!r} already exists (replace it explicitly)")
    kept = [key for key in SECRET_SETTINGS if source.settings.get(key) == MASK]
    if kept:
        # Settings read back from the API or `list --json` carry the mask: the secret stays.
        if before is None or not all(key in before.settings for key in kept):
            raise SourceError(f"setting(s) {', '.join(sorted(kept))}: give the value, not the mask")
        source = dataclasses.replace(
            source, settings={**source.settings, **{key: before.settings[key] for key in kept}}
        )
    validate(source)
    _upsert_organization(router, source)
    moment = _now()
    values = {
        "facility_code": source.facility_code,
        "facility_name": source.facility_name,
        "facility_level": source.facility_level,
        "kind": source.kind,
        "settings": _seal_settings(keyring_for(engine), source.name, dict(source.settings)),
        "paused": source.paused,
        "updated_at": moment,
    }
    with _write(engine) as conn, conn.begin():
        exists = conn.execute(
            sa.select(connector_source.c.name).where(connector_source.c.name == source.name)
        ).first()
        if exists is not None:
            if not replace:
                raise SourceError(f"source {source.name!r} already exists (replace it explicitly)")
            conn.execute(
                connector_source.update().where(connector_source.c.name == source.name).values(values)
            )
        else:
            conn.execute(connector_source.insert().values(name=source.name, created_at=moment, **values))
    found = get(engine, source.name)
    assert found is not None
    return found


def get(engine: sa.Engine, name: str) -> Source | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(connector_source).where(connector_source.c.name == name)).first()
    return from_row(engine, row) if row is not None else None


def all_sources(engine: sa.Engine) -> list[Source]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(connector_source).order_by(connector_source.c.name)).all()
    return [from_row(engine, row) for row in rows]


def set_paused(engine: sa.Engine, name: str, paused: bool) -> Source:
    """Pause or resume a source's processing (its messages are still received and stored).
    ``KeyError`` when no source has that name."""
    with _write(engine) as conn, conn.begin():
        result = conn.execute(
            connector_source.update()
            .where(connector_source.c.name == name)
            .values(paused=paused, updated_at=_now())
        )
        if result.rowcount == 0:
            raise KeyError(name)
    found = get(engine, name)
    assert found is not None
    return found
