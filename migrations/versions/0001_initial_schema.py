"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21

The whole storage layout of docs/storage.md: resources, history, and one index table per
search parameter type keyed by 64-bit hashes (hub.search.hashing).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # Pids are allocated in blocks for COPY-based bulk ingest (hub.store.writer).
        op.execute(sa.schema.CreateSequence(sa.Sequence("resource_pid_seq", cache=1000)))
    op.create_table(
        "fullurl_alias",
        sa.Column("full_url", sa.String(length=200), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("full_url", name=op.f("pk_fullurl_alias")),
    )
    op.create_table(
        "idx_date",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("low", sa.BigInteger(), nullable=False),
        sa.Column("high", sa.BigInteger(), nullable=False),
    )
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_date_hash_identity_low_pid"), ["hash_identity", "low", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_date_pid"), ["pid"], unique=False)

    op.create_table(
        "idx_number",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("idx_number", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_number_hash_identity_low_pid"), ["hash_identity", "low", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_number_pid"), ["pid"], unique=False)

    op.create_table(
        "idx_quantity",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_sys_code", sa.BigInteger(), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("code", sa.Text(), nullable=True),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("idx_quantity", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_quantity_hash_identity_low_pid"), ["hash_identity", "low", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_quantity_pid"), ["pid"], unique=False)

    op.create_table(
        "idx_reference",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_target", sa.BigInteger(), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("target_url", sa.Text(), nullable=True),
    )
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_reference_hash_target_pid"), ["hash_target", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_reference_pid"), ["pid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_idx_reference_target_id_target_type"), ["target_id", "target_type"], unique=False
        )

    op.create_table(
        "idx_string",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_exact", sa.BigInteger(), nullable=False),
        sa.Column(
            "value_norm",
            sa.String(length=200).with_variant(sa.String(length=200, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("value_exact", sa.Text(), nullable=False),
    )
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idx_string_hash_exact_pid"), ["hash_exact", "pid"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_idx_string_hash_identity_value_norm_pid"),
            ["hash_identity", "value_norm", "pid"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_idx_string_pid"), ["pid"], unique=False)

    op.create_table(
        "idx_token",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_value", sa.BigInteger(), nullable=False),
        sa.Column("hash_sys", sa.BigInteger(), nullable=False),
        sa.Column("hash_sys_value", sa.BigInteger(), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("value", sa.Text(), nullable=True),
        sa.Column("display", sa.Text(), nullable=True),
    )
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idx_token_hash_sys_value_pid"), ["hash_sys_value", "pid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_idx_token_hash_value_pid"), ["hash_value", "pid"], unique=False)
        batch_op.create_index(batch_op.f("ix_idx_token_pid"), ["pid"], unique=False)

    op.create_table(
        "idx_uri",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash_identity", sa.BigInteger(), nullable=False),
        sa.Column("hash_uri", sa.BigInteger(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
    )
    with op.batch_alter_table("idx_uri", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idx_uri_hash_uri_pid"), ["hash_uri", "pid"], unique=False)
        batch_op.create_index(batch_op.f("ix_idx_uri_pid"), ["pid"], unique=False)

    op.create_table(
        "resource",
        sa.Column(
            "pid",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            server_default=sa.text("nextval('resource_pid_seq')") if postgres else None,
            autoincrement=not postgres,
            nullable=False,
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "content",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("pid", name=op.f("pk_resource")),
        sa.UniqueConstraint("res_id", "res_type", name=op.f("uq_resource_res_id_res_type")),
    )
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_resource_last_updated"), ["last_updated"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_resource_res_type_last_updated"), ["res_type", "last_updated"], unique=False
        )

    op.create_table(
        "resource_history",
        sa.Column("pid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "content",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("pid", "version", name=op.f("pk_resource_history")),
    )
    with op.batch_alter_table("resource_history", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_resource_history_last_updated"), ["last_updated"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_resource_history_res_type_last_updated"),
            ["res_type", "last_updated"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("resource_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resource_history_res_type_last_updated"))
        batch_op.drop_index(batch_op.f("ix_resource_history_last_updated"))

    op.drop_table("resource_history")
    with op.batch_alter_table("resource", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resource_res_type_last_updated"))
        batch_op.drop_index(batch_op.f("ix_resource_last_updated"))

    op.drop_table("resource")
    with op.batch_alter_table("idx_uri", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_uri_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_uri_hash_uri_pid"))

    op.drop_table("idx_uri")
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_token_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_token_hash_value_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_token_hash_sys_value_pid"))

    op.drop_table("idx_token")
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_string_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_string_hash_identity_value_norm_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_string_hash_exact_pid"))

    op.drop_table("idx_string")
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_reference_target_id_target_type"))
        batch_op.drop_index(batch_op.f("ix_idx_reference_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_reference_hash_target_pid"))

    op.drop_table("idx_reference")
    with op.batch_alter_table("idx_quantity", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_quantity_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_quantity_hash_identity_low_pid"))

    op.drop_table("idx_quantity")
    with op.batch_alter_table("idx_number", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_number_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_number_hash_identity_low_pid"))

    op.drop_table("idx_number")
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_date_pid"))
        batch_op.drop_index(batch_op.f("ix_idx_date_hash_identity_low_pid"))

    op.drop_table("idx_date")
    op.drop_table("fullurl_alias")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("resource_pid_seq")))
