"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from hub.db.engine import create_engine
from hub.db.migrate import downgrade, upgrade
from hub.db.schema import metadata


def _differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_models_match_migrations(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("migrations")
    assert _differences(url) == []


def test_downgrade_and_upgrade_round_trip(fresh_database_url) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database_url("roundtrip")
    downgrade(url, "base")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert "resource" not in sa.inspect(conn).get_table_names()
    engine.dispose()
    upgrade(url)
    assert _differences(url) == []
