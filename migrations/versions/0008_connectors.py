"""Connector tables (issue 11): sources (channels), the inbox of every inbound message, and
the cursors of FHIR pull sources.

``connector_message`` keeps each message's raw bytes sealed (``connectors.inbox``), its
processing state and attempts; indexes serve the claim of due messages (state,
next_attempt_at), per-source listings (source, id), per-patient order (ordering_key, id), and
duplicate receipt (unique source, raw_sha256).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 12:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_PID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_MOMENT = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "connector_source",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("facility_code", sa.String(length=5), nullable=False),
        sa.Column("facility_name", sa.String(length=200), nullable=False),
        sa.Column("facility_level", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", _MOMENT, nullable=False),
        sa.Column("updated_at", _MOMENT, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_connector_source")),
    )
    op.create_table(
        "connector_message",
        sa.Column("id", _PID, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("received_at", _MOMENT, nullable=False),
        sa.Column("message_type", sa.String(length=64), nullable=True),
        sa.Column("control_id", sa.String(length=200), nullable=True),
        sa.Column("ordering_key", sa.String(length=32), nullable=True),
        sa.Column("raw_sha256", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _MOMENT, nullable=True),
        sa.Column("lease_until", _MOMENT, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_where", sa.String(length=200), nullable=True),
        sa.Column("processed_at", _MOMENT, nullable=True),
        sa.Column("resources", sa.JSON(), nullable=True),
        sa.Column("warnings", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["source"], ["connector_source.name"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connector_message")),
        sa.UniqueConstraint("source", "raw_sha256", name=op.f("uq_connector_message_source_raw_sha256")),
    )
    with op.batch_alter_table("connector_message", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_connector_message_state_next_attempt_at"), ["state", "next_attempt_at"]
        )
        batch_op.create_index(batch_op.f("ix_connector_message_source_id"), ["source", "id"])
        batch_op.create_index(batch_op.f("ix_connector_message_ordering_key_id"), ["ordering_key", "id"])
    op.create_table(
        "connector_cursor",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("updated_at", _MOMENT, nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_connector_cursor")),
    )


def downgrade() -> None:
    op.drop_table("connector_cursor")
    with op.batch_alter_table("connector_message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_connector_message_ordering_key_id"))
        batch_op.drop_index(batch_op.f("ix_connector_message_source_id"))
        batch_op.drop_index(batch_op.f("ix_connector_message_state_next_attempt_at"))
    op.drop_table("connector_message")
    op.drop_table("connector_source")
