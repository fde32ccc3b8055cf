"""Runtime configuration.

Owns: every setting the hub reads, from the environment (prefix-free names such as
``DATABASE_URL``) or a ``hub.env`` file in the working directory.
Read once at start-up (``get_settings``, by the CLI and the app's entry points) and passed
down as an object: the app factory, the web adapter, tokens, the keyring (``hub.crypto``).
``BASE_URL`` is optional: unset, each request's links follow where it was served.
Calls: nothing.  Called by: the CLI, the app factory, the web adapter (``hub.api``), tokens,
the keyring, search limits (``hub.search.query``: still ``get_settings()`` when a caller
passes none).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE = REPO_ROOT / "var" / "hub.sqlite3"
DEFAULT_EXPORT_DIR = REPO_ROOT / "var" / "exports"
KEY_DIR = REPO_ROOT / "var" / "keys"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file="hub.env", extra="ignore")

    database_url: str = f"sqlite:///{DEFAULT_SQLITE}"
    redis_url: str | None = None
    # The public FHIR base ("https://hub.example.vn/fhir"). Unset: each request's own base
    # (its scheme, Host and the /fhir mount; X-Forwarded-Proto/Host/Prefix or Forwarded
    # only from TRUSTED_PROXIES), so links point wherever the hub is served.
    base_url: str | None = None
    # Paging: what a search returns when _count is absent, and the most it may ask for.
    default_page_size: int = 20
    max_page_size: int = 1000
    sql_echo: bool = False
    # Bulk Data $export writes its NDJSON files under {export_dir}/{job id}/ (directories
    # 0700, files 0600). A finished job and its files are removed this many hours after it
    # finished (completed, failed or cancelled); its status URL then answers 404.
    export_dir: Path = DEFAULT_EXPORT_DIR
    export_retention_hours: float = 24.0
    # The most entries a transaction or batch Bundle may hold (413 before any is processed).
    # 10,000 entries of ~3 KB fill about 30 MiB, the order of the request body limit.
    max_bundle_entries: int = 10_000

    # --- access layer -------------------------------------------------------------------
    # Every FHIR request needs a bearer token. Turn off only for a private, single-user hub.
    auth_required: bool = True
    # The hub's own token issuer (users in `hub_user`, `/auth/token`, `hub token`). Its
    # ES256 key is created at first use; tokens from other issuers are verified against
    # the keys in auth_jwks_file (a JWKS document). Both are identifiers, not links: SMART
    # discovery advertises the token and JWKS endpoints at the request's base.
    auth_issuer: str = "http://127.0.0.1:8000/auth"
    auth_audience: str = "http://127.0.0.1:8000/fhir"
    auth_signing_key_file: Path = KEY_DIR / "token-signing-es256.pem"
    auth_jwks_file: Path | None = None
    token_ttl_seconds: int = 3600
    # "moh": clinicians of the patient's managing organization or care team may read for
    # treatment without explicit consent; "consent-only": every recipient needs consent.
    consent_policy: str = "moh"
    break_glass_minutes: int = 60
    # Envelope encryption of identifiers and sensitive resources: the master key wraps the
    # data keys kept in `data_key`. HUB_MASTER_KEY (base64, 32 bytes) wins over the file.
    encrypt_at_rest: bool = True
    master_key_file: Path = KEY_DIR / "master.key"
    hub_master_key: str | None = None
    # Rate limits, "count/period" with period second|minute|hour; kept in Redis when
    # REDIS_URL is set, in process memory otherwise.
    rate_limit_per_token: str = "1200/minute"
    rate_limit_per_ip: str = "2400/minute"
    rate_limit_login: str = "20/minute"
    # Redis key prefix of the rate-limit counters, so hubs (or test runs) can share a Redis.
    rate_limit_key_prefix: str = "hub-ratelimit"
    # Reverse proxies (addresses or CIDR networks) whose X-Forwarded-For (client IP of the
    # rate limits) and X-Forwarded-Proto/Host/Prefix or Forwarded (base URL) are believed.
    # Empty: the TCP peer is the client. Env: TRUSTED_PROXIES='["10.0.0.0/8"]'.
    trusted_proxies: list[str] = []

    # --- abuse limits (docs/access.md, "Limits") -------------------------------------------
    # Request bodies: checked on Content-Length and while streaming, before authentication
    # and before anything buffers them (hub/api/limits.py). Bundles for bulk loads go through
    # `hub import`, not HTTP, so 32 MiB is ample for a transaction; a login form is tiny.
    max_body_bytes: int = 32 * 1024 * 1024
    max_login_body_bytes: int = 64 * 1024
    # JSON nesting depth of a request body (an extension nested in an extension is 2 levels).
    max_json_depth: int = 100
    # Searches: sort keys, comma-separated values of one parameter, parameters per query.
    max_sort_keys: int = 3
    max_or_values: int = 100
    max_search_params: int = 50
    # Every FHIR request's database work is cancelled after this many seconds (503 timeout);
    # 0 turns the limit off. CLI jobs (import, reindex, migrations) are not limited.
    request_timeout_seconds: float = 30.0

    # --- connectors (issue 11; connectors/worker.py, docs in the README) --------------------
    # Without REDIS_URL, `hub serve` and `hub connectors serve` process inbox messages in
    # this many background threads of their own (0: none, messages wait in the inbox; the
    # MLLP listener still processes what it receives before it ACKs). With REDIS_URL, the
    # number of arq worker processes `hub connectors worker` starts.
    connector_workers: int = 1
    # `hub serve` also runs the MLLP listener of every registered hl7v2-mllp source.
    connectors_listen: bool = False
    # Where MLLP listeners bind (each source's settings give its port).
    mllp_host: str = "127.0.0.1"
    # TLS for every MLLP listener when both are set (PEM files).
    mllp_tls_cert: Path | None = None
    mllp_tls_key: Path | None = None
    # The arq queue of the connector jobs (several hubs or test runs may share one Redis).
    connectors_queue: str = "hub-connectors"
    # A bearer secret Prometheus scrapes /metrics with (besides a hub-admin token); unset:
    # only hub admins read /metrics.
    metrics_token: str | None = None

    # --- pages (issue 12; hub/web) ------------------------------------------------------------
    # A page session ends this long after login whatever happens, or after this long unused.
    web_session_hours: float = 12.0
    web_session_idle_minutes: float = 30.0


@lru_cache
def get_settings() -> Settings:
    return Settings()
