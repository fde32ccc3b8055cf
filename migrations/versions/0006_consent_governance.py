"""Consent governance and break-glass reviews (issue 8).

``break_glass_review``: append-only reviews of break-glass alerts (earlier single reviews,
kept in ``break_glass.reviewed_*``, are copied over with no verdict). ``consent_alert``:
Consents written by someone other than the patient they protect.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 07:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "break_glass_review",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_break_glass_review")),
    )
    with op.batch_alter_table("break_glass_review", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_break_glass_review_alert_id"), ["alert_id"], unique=False)
    op.execute(
        "INSERT INTO break_glass_review (alert_id, reviewer, role, verdict, note, at)"
        " SELECT id, reviewed_by, 'unknown', NULL, COALESCE(review_note, ''), reviewed_at"
        " FROM break_glass WHERE reviewed_at IS NOT NULL AND reviewed_by IS NOT NULL"
    )

    op.create_table(
        "consent_alert",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("consent_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("fhir_user", sa.String(length=130), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("organizations", sa.JSON(), nullable=False),
        sa.Column("witness", sa.String(length=130), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_alert")),
    )
    with op.batch_alter_table("consent_alert", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_consent_alert_patient_id"), ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("consent_alert", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_alert_patient_id"))
    op.drop_table("consent_alert")
    with op.batch_alter_table("break_glass_review", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_break_glass_review_alert_id"))
    op.drop_table("break_glass_review")
