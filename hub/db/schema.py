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


def _reference_index(name: str) -> sa.Table:
    return sa.Table(
        name,
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


idx_reference = _reference_index("idx_reference")

# The audit trail's references (AuditEvent agent, entity, patient...): the same rows as
# idx_reference, in a table of their own, so the trail's growth (an AuditEvent per request,
# each naming its patients) never changes the statistics, and so the plans, of clinical
# reference lookups. ``index_table`` routes a type's rows; readers of one source type ask it.
idx_reference_audit = _reference_index("idx_reference_audit")
AUDIT_REFERENCE_TYPES = frozenset({"AuditEvent"})

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

# --- access layer (see consent/ and docs/storage.md) -------------------------------------
Moment = sa.DateTime(timezone=True)

# Which patients' records a resource belongs to (the R4 Patient compartment), with the
# sensitivity labels of the resource as a bit mask (consent.labels). Derived at write time
# like an index, but kept when the resource is deleted so its history stays protected.
compartment = sa.Table(
    "compartment",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("labels", sa.Integer, nullable=False),
    # labels too, so the visibility probe of a row (its patients and labels) reads the index
    # alone (PostgreSQL: an index-only scan; SQLite: a covering index), never the table.
    sa.Index(None, "pid", "patient_id", "labels"),
    sa.Index(None, "patient_id"),
)

# The compartment rows each archived version had (``compartment`` holds the current
# version's): a version in history is visible only to those who may see that version.
# Copied from ``compartment`` when a version is archived (hub.store.writer).
history_compartment = sa.Table(
    "history_compartment",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("labels", sa.Integer, nullable=False),
    sa.Index(None, "pid", "version", "patient_id", "labels"),  # covering, as compartment's
)

# Who may read a patient's data, for which purposes and labels, derived from the resource
# that says so (pid: a Consent, a Patient's managing organization, a CareTeam, a
# RelatedPerson). Break-glass grants have no source resource: pid is minus the
# break_glass id, so no resource write ever removes them.
access_grant = sa.Table(
    "access_grant",
    metadata,
    sa.Column("pid", Pid, nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("grantee", sa.String(130), nullable=False),  # "Organization/1", "Practitioner/2" or "*"
    sa.Column("purpose", sa.String(32), nullable=False),  # v3 ActReason code or "*"
    sa.Column("effect", sa.String(8), nullable=False),  # permit | deny
    sa.Column("labels", sa.Integer, nullable=False),
    sa.Column("basis", sa.String(16), nullable=False),  # policy | consent | break-glass
    # Unix seconds, so the hot visibility check compares integers on every backend.
    sa.Column("starts", sa.BigInteger, nullable=True),
    sa.Column("ends", sa.BigInteger, nullable=True),
    sa.Index(None, "patient_id", "grantee"),
    sa.Index(None, "grantee"),
    sa.Index(None, "pid"),
)

# Emergency access a clinician opened by stating a reason; an alert until reviewed.
break_glass = sa.Table(
    "break_glass",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("fhir_user", sa.String(130), nullable=False),
    sa.Column("organizations", sa.JSON, nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("started", Moment, nullable=False),
    sa.Column("expires", Moment, nullable=False),
    sa.Column("reviewed_at", Moment, nullable=True),
    sa.Column("reviewed_by", sa.String(200), nullable=True),
    sa.Column("review_note", sa.Text, nullable=True),
    sa.Index(None, "patient_id"),
    sa.Index(None, "fhir_user", "expires"),
)

# Reviews of break-glass alerts, append-only: every review is kept, none is overwritten
# (an auditor's "not-justified" stays next to a facility admin's "justified").
break_glass_review = sa.Table(
    "break_glass_review",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.Integer, nullable=False),  # break_glass.id
    sa.Column("reviewer", sa.String(200), nullable=False),  # the reviewer's subject
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=True),  # justified | not-justified (None: legacy)
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("at", Moment, nullable=False),
    sa.Index(None, "alert_id"),
)

# A Consent written, changed or deleted by someone other than the patient it protects
# (a clinician recording a signed form, a proxy, an integration service, a hub admin): an
# alert the patient sees (consent.governance, GET /access/consent-alerts).
consent_alert = sa.Table(
    "consent_alert",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("consent_id", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False),
    sa.Column("action", sa.String(8), nullable=False),  # create | update | delete
    sa.Column("subject", sa.String(200), nullable=False),  # who wrote it
    sa.Column("fhir_user", sa.String(130), nullable=True),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("organizations", sa.JSON, nullable=False),
    sa.Column("witness", sa.String(130), nullable=True),  # the witnessing staff (clinicians)
    sa.Column("reason", sa.Text, nullable=True),  # X-Access-Reason (a deny removed by an admin)
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", Moment, nullable=False),
    sa.Index(None, "patient_id"),
)

# Accounts for the hub's own token issuer (embedded default and demos).
hub_user = sa.Table(
    "hub_user",
    metadata,
    sa.Column("username", sa.String(200), primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=True),  # None: service account, tokens only
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("fhir_user", sa.String(130), nullable=True),
    sa.Column("organizations", sa.JSON, nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created", Moment, nullable=False),
)

# Sessions of the pages (hub.web.session): the cookie carries a random id, the row its SHA-256,
# so the table alone cannot be replayed as cookies. ``token`` is the hub access token the login
# issued (verified on every page request like a bearer token: a disabled account stops at once).
web_session = sa.Table(
    "web_session",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(200), nullable=False, index=True),
    sa.Column("token", sa.Text, nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created", Moment, nullable=False),
    sa.Column("last_seen", Moment, nullable=False),
    sa.Column("expires", Moment, nullable=False, index=True),
)

# The audit trail's hash chain: one row per AuditEvent, in commit order. chain =
# sha256(previous chain || digest of the AuditEvent's stored JSON); `hub audit verify`
# recomputes it to detect edits, deletions and reordering.
audit_chain = sa.Table(
    "audit_chain",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("res_id", sa.String(64), nullable=False, unique=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("chain", sa.String(64), nullable=False),
    sa.Column("recorded", Moment, nullable=False),
)

# Envelope encryption: data keys wrapped by a master key (hub.crypto).
data_key = sa.Table(
    "data_key",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("master_kid", sa.String(64), nullable=False),
    sa.Column("created", Moment, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
)

INDEX_TABLES: dict[str, sa.Table] = {
    "string": idx_string,
    "token": idx_token,
    "date": idx_date,
    "number": idx_number,
    "quantity": idx_quantity,
    "uri": idx_uri,
    "reference": idx_reference,
    "reference_audit": idx_reference_audit,  # what index_table gives AuditEvent's references
    "composite": idx_composite,
    # Not search parameters, but derived from content the same way (see consent.derive).
    "compartment": compartment,
    "access_grant": access_grant,
}


def index_table(kind: str, res_type: str) -> sa.Table:
    """The table holding ``kind`` index rows of resources of ``res_type``: the audit trail's
    references in ``idx_reference_audit``, everything else in ``INDEX_TABLES[kind]``."""
    if kind == "reference" and res_type in AUDIT_REFERENCE_TYPES:
        return idx_reference_audit
    return INDEX_TABLES[kind]


# --- connectors (issue 11; see connectors/ and docs/storage.md) --------------------------

# A registered channel: one feed of one facility (connectors.sources).
connector_source = sa.Table(
    "connector_source",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("facility_code", sa.String(5), nullable=False),  # MA_CSKCB, leading zeros kept
    sa.Column("facility_name", sa.String(200), nullable=False),
    sa.Column("facility_level", sa.String(16), nullable=False),  # commune|district|provincial|other
    sa.Column("kind", sa.String(16), nullable=False),  # hl7v2-mllp|xml130|fhir-pull
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", Moment, nullable=False),
    sa.Column("updated_at", Moment, nullable=False),
)

# The inbox: every inbound message, stored (sealed) before it is acknowledged, with where its
# processing stands (connectors.inbox, connectors.pipeline). Never deleted by processing.
connector_message = sa.Table(
    "connector_message",
    metadata,
    sa.Column("id", Pid, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(64), sa.ForeignKey("connector_source.name"), nullable=False),
    sa.Column("received_at", Moment, nullable=False),
    sa.Column("message_type", sa.String(64), nullable=True),
    sa.Column("control_id", sa.String(200), nullable=True),
    # Keyed hash of the patient identifier Peek gave (messages of one key run in id order).
    sa.Column("ordering_key", sa.String(32), nullable=True),
    sa.Column("raw_sha256", sa.String(64), nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),  # sealed (connectors.inbox.seal_raw)
    sa.Column("state", sa.String(16), nullable=False),  # queued|processing|processed|rejected|failed|dead
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", Moment, nullable=True),
    sa.Column("lease_until", Moment, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("error_where", sa.String(200), nullable=True),
    sa.Column("processed_at", Moment, nullable=True),
    sa.Column("resources", sa.JSON, nullable=True),  # ["Type/id", ...] written
    sa.Column("warnings", sa.JSON, nullable=True),  # Mapped.warnings
    sa.UniqueConstraint("source", "raw_sha256"),
    sa.Index(None, "state", "next_attempt_at"),
    sa.Index(None, "source", "id"),
    sa.Index(None, "ordering_key", "id"),
    # inbox.status (every /metrics scrape): counts per (source, state), last processed, the
    # last 60 s; and each source's last error (partial: rows with an error only).
    sa.Index(None, "source", "state", "processed_at"),
    sa.Index(
        "ix_connector_message_source_id_error",
        "source",
        "id",
        sqlite_where=sa.text("error IS NOT NULL"),
        postgresql_where=sa.text("error IS NOT NULL"),
    ),
)

# Where a FHIR pull source stands in its facility's history (connectors.fhirpull).
connector_cursor = sa.Table(
    "connector_cursor",
    metadata,
    sa.Column("source", sa.String(64), primary_key=True),
    sa.Column("cursor", sa.Text, nullable=True),
    sa.Column("updated_at", Moment, nullable=False),
)
