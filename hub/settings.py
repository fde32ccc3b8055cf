"""Runtime configuration.

Owns: every setting the hub reads, from the environment (prefix-free names such as
``DATABASE_URL``) or a ``hub.env`` file in the working directory.
Calls: nothing.  Called by: the CLI, the app factory, the store.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE = REPO_ROOT / "var" / "hub.sqlite3"
DEFAULT_EXPORT_DIR = REPO_ROOT / "var" / "exports"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file="hub.env", extra="ignore")

    database_url: str = f"sqlite:///{DEFAULT_SQLITE}"
    redis_url: str | None = None
    base_url: str = "http://127.0.0.1:8000/fhir"
    # Paging: what a search returns when _count is absent, and the most it may ask for.
    default_page_size: int = 20
    max_page_size: int = 1000
    sql_echo: bool = False
    # Bulk Data $export writes its NDJSON files under {export_dir}/{job id}/.
    export_dir: Path = DEFAULT_EXPORT_DIR


@lru_cache
def get_settings() -> Settings:
    return Settings()
