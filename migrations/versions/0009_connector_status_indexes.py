"""Indexes for the connectors' status (``connectors.inbox.status``, read on every /metrics
scrape), so it never scans the whole inbox:

- (source, state, processed_at): the count of each (source, state) as an index-only range,
  the last processed time (the range's end) and the messages of the last 60 s (a range
  bounded by time);
- (source, id) of rows with an error (partial): a source's last error at the end of a
  small index.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_HAS_ERROR = sa.text("error IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("connector_message", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_connector_message_source_state_processed_at"), ["source", "state", "processed_at"]
        )
        batch_op.create_index(
            batch_op.f("ix_connector_message_source_id_error"),
            ["source", "id"],
            sqlite_where=_HAS_ERROR,
            postgresql_where=_HAS_ERROR,
        )


def downgrade() -> None:
    with op.batch_alter_table("connector_message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_connector_message_source_id_error"))
        batch_op.drop_index(batch_op.f("ix_connector_message_source_state_processed_at"))
