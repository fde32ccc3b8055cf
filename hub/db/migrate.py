"""Schema migrations through Alembic (``migrations/``).

Owns: the Alembic configuration used by ``hub db upgrade`` and by tests.
Calls: Alembic.  Called by: the CLI, tests, the demo.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from hub.db.engine import normalize_url
from hub.settings import REPO_ROOT


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)
