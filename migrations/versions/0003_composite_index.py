"""Index table for composite search parameters (Observation code-value-quantity...).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idx_composite",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_key", sa.BigInteger(), nullable=False),
        sa.Column("low", sa.Float(), nullable=True),
        sa.Column("high", sa.Float(), nullable=True),
        sa.Column(
            "text",
            sa.String(length=200).with_variant(sa.String(length=200, collation="C"), "postgresql"),
            nullable=True,
        ),
    )
    with op.batch_alter_table("idx_composite", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_composite_hash_key_low_pid"), ["hash_key", "low", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_composite_pid"), ["pid"], unique=False)


def downgrade() -> None:
    op.drop_table("idx_composite")
