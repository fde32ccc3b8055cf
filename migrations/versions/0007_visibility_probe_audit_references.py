"""Covering indexes for the visibility probe; the audit trail's references apart (issue 10).

Every read by a principal that is not unrestricted probes the ``compartment`` rows of each
candidate row (``consent.decision``: its patients and their labels). ``(pid, patient_id)``
became ``(pid, patient_id, labels)``, and ``history_compartment``'s ``(pid, version,
patient_id)`` became ``(pid, version, patient_id, labels)``, so the probe reads the index
alone (PostgreSQL: index-only scans once the visibility map is set) instead of a heap row
per compartment row. The new indexes serve every lookup the old ones did (same leading
columns).

``idx_reference_audit``: AuditEvent's reference rows move out of ``idx_reference`` (same
columns and indexes), so the audit trail's growth cannot change the statistics and plans of
clinical reference lookups.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 10:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

_AUDIT_PIDS = "SELECT pid FROM resource WHERE res_type = 'AuditEvent'"
_COLUMNS = "pid, hash_identity, hash_target, target_type, target_id, target_url"

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idx_reference_audit",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_target", sa.BigInteger(), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("target_url", sa.Text(), nullable=True),
    )
    with op.batch_alter_table("idx_reference_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idx_reference_audit_hash_target_pid"), ["hash_target", "pid"])
        batch_op.create_index(
            batch_op.f("ix_idx_reference_audit_target_id_target_type"), ["target_id", "target_type"]
        )
        batch_op.create_index(batch_op.f("ix_idx_reference_audit_pid"), ["pid"])
    op.execute(
        f"INSERT INTO idx_reference_audit ({_COLUMNS}) SELECT {_COLUMNS} FROM idx_reference"
        f" WHERE pid IN ({_AUDIT_PIDS})"
    )
    op.execute(f"DELETE FROM idx_reference WHERE pid IN ({_AUDIT_PIDS})")
    with op.batch_alter_table("compartment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_compartment_pid_patient_id_labels"), ["pid", "patient_id", "labels"], unique=False
        )
        batch_op.drop_index(batch_op.f("ix_compartment_pid_patient_id"))
    with op.batch_alter_table("history_compartment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_history_compartment_pid_version_patient_id_labels"),
            ["pid", "version", "patient_id", "labels"],
            unique=False,
        )
        batch_op.drop_index(batch_op.f("ix_history_compartment_pid_version_patient_id"))


def downgrade() -> None:
    op.execute(f"INSERT INTO idx_reference ({_COLUMNS}) SELECT {_COLUMNS} FROM idx_reference_audit")
    with op.batch_alter_table("idx_reference_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_reference_audit_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_reference_audit_target_id_target_type"))
        batch_op.drop_index(batch_op.f("ix_idx_reference_audit_hash_target_pid"))
    op.drop_table("idx_reference_audit")
    with op.batch_alter_table("history_compartment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_history_compartment_pid_version_patient_id"),
            ["pid", "version", "patient_id"],
            unique=False,
        )
        batch_op.drop_index(batch_op.f("ix_history_compartment_pid_version_patient_id_labels"))
    with op.batch_alter_table("compartment", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_compartment_pid_patient_id"), ["pid", "patient_id"], unique=False
        )
        batch_op.drop_index(batch_op.f("ix_compartment_pid_patient_id_labels"))
