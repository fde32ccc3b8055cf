"""The FHIR pull: polls a facility's FHIR server and stores what changed in the inbox.

Owns: ``Poller`` (one per ``fhir-pull`` source), its HTTP client and token, and the cursor it
keeps in ``connector_cursor`` (one JSON document per source, shape below).
Calls: the facility's server (httpx), ``connectors.inbox.receive`` (each page stored, committed)
and the envelopes of ``connectors.fhirpull.mapping``.
Called by: the in-process worker and the arq cron (``connectors.worker``: ``poll_once`` every
``settings["interval"]`` seconds per source), ``hub connectors``, the tests.

Settings of a ``fhir-pull`` source: ``base_url``; ``token`` (a static bearer token) or
``token_url`` + ``client_id`` + ``client_secret`` (OAuth2 client credentials, HTTP Basic);
``types`` (the resource types; Patient is always pulled, first); ``page_size`` (50); ``bulk``
(absent: when the CapabilityStatement offers ``$export``; ``true``; ``false``);
``overlap_seconds`` (5); ``timeout`` (30); ``bulk_wait_seconds`` (60). The token is sent only to
the origin of ``base_url`` (a next link or an export file elsewhere gets none).

Two ways, one rule: **a page is stored before the cursor moves past it**, so a restart
resumes where the last stored page ended and loses nothing; a page fetched twice (a crash
between the two commits) is the same bytes, which the inbox keeps once.

- Search: per type ``GET [base]/T?_lastUpdated=ge<since - overlap>&_sort=_lastUpdated&_count=n``,
  following ``next`` links (the hub's keyset cursor; a walk sees rows written meanwhile). The
  cursor keeps, per type, ``since`` (the highest ``meta.lastUpdated`` of the last finished walk),
  ``seen`` (versions updated within ``overlap_seconds`` of it: they come back in the next walk
  and are dropped, so an unchanged facility yields nothing) and, during a walk, the ``next``
  link to resume from. The overlap catches a write whose transaction committed after a later
  one's (its ``lastUpdated`` is older than what the previous walk saw).
- Bulk: ``GET [base]/$export?_type=…&_since=<transactionTime of the last export>`` with
  ``Prefer: respond-async``; the status URL is polled (``Retry-After``) for up to
  ``bulk_wait_seconds`` per ``poll_once`` (the job is kept in the cursor; the next call goes on);
  the NDJSON files are read with the token, in pull order, stored ``page_size`` lines at a time,
  the cursor recording file and line after each chunk.

Errors: connection failures, timeouts, 429 and 5xx raise ``Transient`` after whatever was stored
(the worker retries later); other 4xx raise ``PullError`` (a setting to fix). Deletions at the
facility are not pulled (a search does not return deleted resources; ``_history`` would).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import sqlalchemy as sa

from connectors.fhirpull.mapping import (
    ORDERING_SYSTEM,
    SKIPPED,
    configured_types,
    ndjson_envelope,
    page_envelope,
    pull_order,
)
from connectors.model import Source, Transient
from hub.db.schema import connector_cursor
from hub.store.records import now

__all__ = ["Poller", "PullError"]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class PullError(Exception):
    """The facility refused the pull (401, 403, 404, a bad request): a setting to fix."""


class Poller:
    """Pulls one source. Not thread-safe: one poller per source at a time."""

    def __init__(
        self, engine: sa.Engine, source: Source, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        settings = source.settings
        if not settings.get("base_url"):
            raise PullError(f"source {source.name}: settings.base_url is required")
        refused = [t for t in configured_types(settings) if t in SKIPPED]
        if refused:
            raise PullError(f"source {source.name}: the hub does not pull {', '.join(refused)}")
        self.engine = engine
        self.source = source
        self.base = str(settings["base_url"]).rstrip("/")
        self.types = pull_order(configured_types(settings))
        self.page_size = int(settings.get("page_size", 50))
        self.overlap = timedelta(seconds=float(settings.get("overlap_seconds", 5)))
        self.bulk_wait = float(settings.get("bulk_wait_seconds", 60))
        self.order = f"{ORDERING_SYSTEM}|{source.name}"
        self.client = httpx.Client(
            timeout=float(settings.get("timeout", 30)), transport=transport, follow_redirects=False
        )
        self._token: str | None = settings.get("token")
        self._token_expires = float("inf") if self._token else 0.0
        bulk = settings.get("bulk")  # absent: whatever the CapabilityStatement offers
        self._bulk: bool | None = None if bulk is None else bool(bulk)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the poll ----------------------------------------------------------------------------

    def poll_once(self) -> int:
        """Pull what changed since the cursor; the number of pages (or chunks) newly stored.
        Raises ``Transient`` when the facility is unreachable or failing (what was stored before
        stays stored, the cursor with it)."""
        if self.source.paused:
            return 0
        state = self._load()
        if self._bulk is None:
            self._bulk = self._offers_export()
        if self._bulk:
            return self._poll_bulk(state)
        return sum(self._walk(state, res_type) for res_type in self.types)

    def _walk(self, state: dict[str, Any], res_type: str) -> int:
        kept: dict[str, Any] = state.setdefault("search", {}).setdefault(res_type, {})
        seen: dict[str, str] = kept.get("seen") or {}
        url: str | None = kept.get("next")
        resumed = url is not None  # from a stored next link, which the facility may have forgotten
        if url is None:
            query: dict[str, Any] = {"_sort": "_lastUpdated", "_count": self.page_size}
            if kept.get("since"):
                query["_lastUpdated"] = f"ge{_instant(_parse(kept['since']) - self.overlap)}"
            url = f"{self.base}/{res_type}?{urlencode(query)}"
            kept["walk"] = {"high": kept.get("since"), "seen": dict(seen)}
        stored = 0
        while url is not None:
            response = self._get(url, resumed=resumed)
            if response is None:  # the facility forgot the walk's cursor: start it again
                kept.pop("next", None)
                return stored + self._walk(state, res_type)
            resumed = False
            bundle = _json(response)
            walk = kept.setdefault("walk", {"high": kept.get("since"), "seen": dict(seen)})
            resources = []
            for entry in bundle.get("entry") or []:
                item = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(item, dict) or (entry.get("search") or {}).get("mode") == "outcome":
                    continue
                version = _version_key(item)
                updated = (item.get("meta") or {}).get("lastUpdated")
                if updated:
                    walk["high"] = max(walk["high"] or updated, updated, key=_parse_key)
                    walk["seen"][version] = updated
                if version not in seen:
                    resources.append(item)
            if walk["high"] is not None:  # only the overlap window is kept: the cursor stays small
                floor = _parse(walk["high"]) - self.overlap
                walk["seen"] = {k: v for k, v in walk["seen"].items() if _parse(v) >= floor}
            following = next(
                (li.get("url") for li in bundle.get("link", []) if li.get("relation") == "next"), None
            )
            if resources and self._store([page_envelope(url, res_type, resources, self.order)]):
                stored += 1
            if following is None:
                kept.pop("next", None)
                kept["since"], kept["seen"] = walk["high"], walk["seen"]
                kept.pop("walk", None)
            else:
                kept["next"] = following
            self._save(state)  # after the page is stored, never before
            url = following
        return stored

    # --- Bulk $export ------------------------------------------------------------------------

    def _offers_export(self) -> bool:
        response = self._get(f"{self.base}/metadata")
        assert response is not None
        statement = _json(response)
        for rest in statement.get("rest") or []:
            for operation in rest.get("operation") or []:
                if operation.get("name") == "export" or str(operation.get("definition", "")).endswith(
                    "/export"
                ):
                    return True
        return False

    def _poll_bulk(self, state: dict[str, Any]) -> int:
        bulk: dict[str, Any] = state.setdefault("bulk", {})
        job = bulk.get("job")
        if job is None:
            query: dict[str, str] = {"_type": ",".join(self.types)}
            if bulk.get("since"):
                query["_since"] = bulk["since"]
            response = self._request(
                "GET", f"{self.base}/$export?{urlencode(query)}", headers={"Prefer": "respond-async"}
            )
            location = response.headers.get("Content-Location")
            if response.status_code != 202 or not location:
                raise PullError(f"$export kick-off answered {response.status_code} without a status URL")
            job = bulk["job"] = {"status": location, "since": bulk.get("since"), "file": 0, "line": 0}
            self._save(state)
        manifest = self._wait_for(state, job)
        if manifest is None:
            return 0
        outputs = sorted(
            (o for o in manifest.get("output") or [] if o.get("count", 1) and o.get("type") in self.types),
            key=lambda o: (self.types.index(o["type"]), str(o.get("url"))),
        )
        stored = 0
        for position in range(job["file"], len(outputs)):
            stored += self._read_file(state, job, outputs[position])
            job["file"], job["line"] = position + 1, 0
            self._save(state)
        bulk["since"] = manifest.get("transactionTime") or bulk.get("since")
        bulk.pop("job", None)
        self._save(state)
        try:  # the facility may remove its files now; a failure here costs it only disk
            self._request("DELETE", job["status"])
        except (Transient, PullError):
            log.info("source %s: could not delete export job %s", self.source.name, job["status"])
        return stored

    def _wait_for(self, state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
        """The job's manifest; None while it runs past ``bulk_wait_seconds`` or when it is gone
        (then it is dropped from the cursor: the next poll kicks off again from the same
        ``_since``)."""
        deadline = time.monotonic() + self.bulk_wait
        while True:
            response = self._request("GET", job["status"], accept_codes=(404, 410, 500))
            if response.status_code == 200:
                manifest: dict[str, Any] = _json(response)
                return manifest
            if response.status_code in (404, 410, 500):
                log.warning(
                    "source %s: export job %s is gone or failed (%d); kicking off again next poll",
                    self.source.name,
                    job["status"],
                    response.status_code,
                )
                state["bulk"].pop("job", None)
                self._save(state)
                if response.status_code == 500:
                    raise Transient(f"the facility's export job failed: {response.text[:200]}")
                return None
            wait = _retry_after(response.headers.get("Retry-After"))
            if time.monotonic() + wait > deadline:
                return None
            time.sleep(wait)

    def _read_file(self, state: dict[str, Any], job: dict[str, Any], output: dict[str, Any]) -> int:
        res_type, skip = str(output["type"]), int(job["line"])
        stored, chunk, offset, line_no = 0, [], skip, 0
        headers = self._auth_headers(str(output["url"]))
        headers["Accept"] = "application/fhir+ndjson"
        try:
            with self.client.stream("GET", str(output["url"]), headers=headers) as response:
                self._check(response)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    line_no += 1
                    if line_no <= skip:
                        continue
                    chunk.append(line.encode())
                    if len(chunk) == self.page_size:
                        stored += self._store_chunk(state, job, res_type, offset, chunk)
                        offset, chunk = offset + len(chunk), []
        except httpx.HTTPError as error:
            raise Transient(f"{output['url']}: {error}") from error
        if chunk:
            stored += self._store_chunk(state, job, res_type, offset, chunk)
        return stored

    def _store_chunk(
        self, state: dict[str, Any], job: dict[str, Any], res_type: str, offset: int, lines: list[bytes]
    ) -> int:
        raw = ndjson_envelope(res_type, job.get("since"), offset, b"\n".join(lines), self.order)
        fresh = self._store([raw])
        job["line"] = offset + len(lines)
        self._save(state)
        return 1 if fresh else 0

    # --- the inbox and the cursor -------------------------------------------------------------

    def _store(self, raws: list[bytes]) -> bool:
        """Store pages in the inbox (committed when this returns); whether any was new."""
        from connectors import inbox

        received = inbox.receive(self.engine, self.source, raws)
        return any(not r.duplicate for r in received)

    def _load(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            text = conn.execute(
                sa.select(connector_cursor.c.cursor).where(connector_cursor.c.source == self.source.name)
            ).scalar()
        state: dict[str, Any] = orjson.loads(text) if text else {}
        return state

    def _save(self, state: dict[str, Any]) -> None:
        text = orjson.dumps(state, option=orjson.OPT_SORT_KEYS).decode()
        with self.engine.begin() as conn:
            updated = conn.execute(
                connector_cursor.update()
                .where(connector_cursor.c.source == self.source.name)
                .values(cursor=text, updated_at=now())
            )
            if updated.rowcount == 0:
                conn.execute(
                    connector_cursor.insert().values(source=self.source.name, cursor=text, updated_at=now())
                )

    def cursor(self) -> dict[str, Any]:
        """The stored cursor (for status pages and tests)."""
        return self._load()

    # --- HTTP --------------------------------------------------------------------------------

    def _get(self, url: str, *, resumed: bool = False) -> httpx.Response | None:
        """GET as FHIR JSON. When resuming a walk from a stored ``next`` link, a 4xx means the
        facility no longer knows that cursor: None, and the walk starts again from ``since``."""
        try:
            return self._request("GET", url)
        except PullError:
            if not resumed:
                raise
            log.warning("source %s: stored next link refused; walking again from since", self.source.name)
            return None

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        accept_codes: tuple[int, ...] = (),
    ) -> httpx.Response:
        for attempt in (1, 2):
            sent = {"Accept": FHIR_JSON, **self._auth_headers(url), **(headers or {})}
            try:
                response = self.client.request(method, url, headers=sent)
            except httpx.HTTPError as error:
                raise Transient(f"{method} {url}: {error}") from error
            if response.status_code == 401 and attempt == 1 and self.source.settings.get("token_url"):
                self._token_expires = 0.0  # the token expired early or was revoked: a new one
                continue
            if response.status_code in accept_codes:
                return response
            self._check(response)
            return response
        raise PullError(f"{method} {url}: 401 after a fresh token")

    def _check(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 429 or status >= 500:
            raise Transient(f"{response.request.method} {response.request.url}: {status}")
        if status >= 400:
            body = response.read()[:300].decode("utf-8", "replace")
            raise PullError(f"{response.request.method} {response.request.url}: {status} {body}")

    def _auth_headers(self, url: str) -> dict[str, str]:
        """The bearer token, for the facility's own server only: a next link or a file URL
        elsewhere (storage that signs its own URLs) never receives it."""
        if _origin(url) != _origin(self.base):
            return {}
        settings = self.source.settings
        if settings.get("token_url") and time.time() >= self._token_expires:
            try:
                answer = self.client.post(
                    str(settings["token_url"]),
                    data={"grant_type": "client_credentials"},
                    auth=(str(settings["client_id"]), str(settings["client_secret"])),
                )
            except httpx.HTTPError as error:
                raise Transient(f"token endpoint: {error}") from error
            self._check(answer)
            grant = answer.json()
            self._token = str(grant["access_token"])
            # Renewed a minute early, so a page is not refused halfway through a walk.
            self._token_expires = time.time() + float(grant.get("expires_in", 300)) - 60
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError as error:
        raise Transient(f"{response.request.url}: not JSON ({error})") from error
    if not isinstance(document, dict):
        raise Transient(f"{response.request.url}: not a JSON object")
    return document


def _version_key(item: dict[str, Any]) -> str:
    return f"{item.get('resourceType')}/{item.get('id')}/{(item.get('meta') or {}).get('versionId', '')}"


def _parse(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parse_key(value: str) -> datetime:
    return _parse(value)


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.1), 30.0)
    except ValueError:
        return 1.0
