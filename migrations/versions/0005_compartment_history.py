"""Compartment membership per version (issue 8): ``history_compartment``.

Each archived version keeps the compartment rows it had, so a version in history is
visible only to those who could see that version. Existing history is filled from the
current rows (the best this migration knows without decoding content: until now a new
version kept every earlier version's patients and labels); `hub reindex` rebuilds both
tables from each version's content, and also moves unresolvable resources of patient
compartment types to the NO_PATIENT row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "history_compartment",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
    )
    with op.batch_alter_table("history_compartment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_history_compartment_pid_version_patient_id"),
            ["pid", "version", "patient_id"],
            unique=False,
        )
    op.execute(
        "INSERT INTO history_compartment (pid, version, patient_id, labels) "
        "SELECT h.pid, h.version, c.patient_id, c.labels "
        "FROM resource_history h JOIN compartment c ON c.pid = h.pid"
    )


def downgrade() -> None:
    with op.batch_alter_table("history_compartment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_history_compartment_pid_version_patient_id"))
    op.drop_table("history_compartment")
