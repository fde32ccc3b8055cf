"""Compartment membership per version (issue 8): owned by the compartment work.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 07:50:00
"""

from __future__ import annotations

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
