"""Index token searches by system alone; table of asynchronous $export jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idx_token_hash_sys_pid"), ["hash_sys", "pid"], unique=False)
    op.create_table(
        "export_job",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_job")),
    )


def downgrade() -> None:
    op.drop_table("export_job")
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_token_hash_sys_pid"))
