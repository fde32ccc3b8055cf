"""The storage schema, as SQLAlchemy Core tables.

Owns: every table and index the hub keeps. ``docs/storage.md`` explains the layout and
must be kept true to this file; Alembic migrations create it (a test checks they agree).
Calls: nothing.  Called by: the store, the search engine, migrations.

Layout in one breath: ``resource`` holds the current version of every resource with its
JSON; ``resource_history`` holds every earlier version; one ``idx_*`` table per search
parameter type holds the extracted search values, keyed by 64-bit hashes so that each
lookup is one index range scan (see ``hub.search.hashing``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# 64-bit surrogate key; SQLite only auto-increments an INTEGER PRIMARY KEY.
Pid = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class ResourceJson(sa.types.TypeDecorator[Any]):
    """JSONB on PostgreSQL, JSON text on SQLite, passing serialized JSON through untouched.

    The store writes JSON it serialized once and returns the stored text as-is, so neither
    direction may parse or dump it again (``model_dump_json`` is the ingest bottleneck).
    """

    impl = sa.JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else sa.JSON())

    def bind_processor(self, dialect: sa.Dialect) -> None:
        return None

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> None:
        return None


# Binary collation makes a B-tree range scan equal a prefix match on normalized strings.
SortableText = sa.String(200).with_variant(sa.String(200, collation="C"), "postgresql")

resource_pid_seq = sa.Sequence("resource_pid_seq", metadata=metadata, cache=1000)

resource = sa.Table(
    "resource",
    metadata,
    sa.Column("pid", Pid, resource_pid_seq, primary_key=True),
    sa.Column("res_type", sa.String(64), nullable=False),
    sa.Column("res_id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Column("content", ResourceJson(), nullable=True),
    # res_id first: it also serves lookups by bare id (urn:uuid resolution across bundles).
    sa.UniqueConstraint("res_id", "res_type"),
    sa.Index(None, "res_type", "last_updated"),
    sa.Index(None, "last_updated"),
)

resource_history = sa.Table(
    "resource_history",
    metadata,
    sa.Column("pid", Pid, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("res_type", sa.String(64), nullable=False),
    sa.Column("res_id", sa.String(64), nullable=False),
    sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("content", ResourceJson(), nullable=True),
    sa.Index(None, "res_type", "last_updated"),
    sa.Index(None, "last_updated"),
)

# urn:uuid fullUrls of earlier transactions whose resource did not get the uuid as its id.
# Synthea-style feeds reference such resources from later bundles.
fullurl_alias = sa.Table(
    "fullurl_alias",
    metadata,
    sa.Column("full_url", sa.String(200), primary_key=True),
    sa.Column("res_type", sa.String(64), nullable=False),
    sa.Column("res_id", sa.String(64), nullable=False),
)

# --- search indexes: one table per search parameter type -------------------------------
# hash_identity = H(resource type, parameter code); the other hashes add the value parts.

idx_string = sa.Table(
    "idx_string",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("hash_exact", sa.BigInteger, nullable=False),
    sa.Column("value_norm", SortableText, nullable=False),
    sa.Column("value_exact", sa.Text, nullable=False),
    sa.Index(None, "hash_identity", "value_norm", "pid"),
    sa.Index(None, "hash_exact", "pid"),
    sa.Index(None, "pid"),
)

idx_token = sa.Table(
    "idx_token",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("hash_value", sa.BigInteger, nullable=False),
    sa.Column("hash_sys", sa.BigInteger, nullable=False),
    sa.Column("hash_sys_value", sa.BigInteger, nullable=False),
    sa.Column("system", sa.Text, nullable=True),
    sa.Column("value", sa.Text, nullable=True),
    sa.Column("display", sa.Text, nullable=True),
    sa.Index(None, "hash_value", "pid"),
    sa.Index(None, "hash_sys_value", "pid"),
    sa.Index(None, "hash_sys", "pid"),
    sa.Index(None, "pid"),
)

idx_date = sa.Table(
    "idx_date",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    # Inclusive bounds of the value's implicit range, in microseconds since the Unix epoch.
    sa.Column("low", sa.BigInteger, nullable=False),
    sa.Column("high", sa.BigInteger, nullable=False),
    sa.Index(None, "hash_identity", "low", "pid"),
    sa.Index(None, "pid"),
)

idx_number = sa.Table(
    "idx_number",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("low", sa.Float, nullable=False),
    sa.Column("high", sa.Float, nullable=False),
    sa.Index(None, "hash_identity", "low", "pid"),
    sa.Index(None, "pid"),
)

idx_quantity = sa.Table(
    "idx_quantity",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("hash_sys_code", sa.BigInteger, nullable=False),
    sa.Column("system", sa.Text, nullable=True),
    sa.Column("code", sa.Text, nullable=True),
    sa.Column("low", sa.Float, nullable=False),
    sa.Column("high", sa.Float, nullable=False),
    sa.Index(None, "hash_identity", "low", "pid"),
    sa.Index(None, "pid"),
)

idx_uri = sa.Table(
    "idx_uri",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("hash_uri", sa.BigInteger, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Index(None, "hash_uri", "pid"),
    sa.Index(None, "pid"),
)

idx_reference = sa.Table(
    "idx_reference",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    # H(type, param, target id): "subject=123" and "subject=Patient/123" both hit it.
    sa.Column("hash_target", sa.BigInteger, nullable=False),
    sa.Column("target_type", sa.String(64), nullable=True),
    sa.Column("target_id", sa.String(64), nullable=True),
    # Absolute or canonical URL when the reference does not point into this server.
    sa.Column("target_url", sa.Text, nullable=True),
    sa.Index(None, "hash_target", "pid"),
    sa.Index(None, "target_id", "target_type"),
    sa.Index(None, "pid"),
)

# Composite parameters (code-value-quantity...): one row per pair of component values found
# on the same element. hash_key = H(type, code, first component form, second component kind
# and form); low/high carry the second component's range when it is a quantity or date.
idx_composite = sa.Table(
    "idx_composite",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("hash_identity", sa.BigInteger, nullable=False),
    sa.Column("hash_key", sa.BigInteger, nullable=False),
    sa.Column("low", sa.Float, nullable=True),
    sa.Column("high", sa.Float, nullable=True),
    sa.Column("text", SortableText, nullable=True),
    sa.Index(None, "hash_key", "low", "pid"),
    sa.Index(None, "pid"),
)

# Asynchronous Bulk Data exports ($export): one row per kick-off, polled by the client.
export_job = sa.Table(
    "export_job",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # accepted|in-progress|completed|failed|cancelled
    sa.Column("request_url", sa.Text, nullable=False),
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("output", sa.JSON, nullable=True),  # [{"type", "url", "count"}]
)

INDEX_TABLES: dict[str, sa.Table] = {
    "string": idx_string,
    "token": idx_token,
    "date": idx_date,
    "number": idx_number,
    "quantity": idx_quantity,
    "uri": idx_uri,
    "reference": idx_reference,
    "composite": idx_composite,
}
