"""group blocks in force and the audit trail of blocks and unblocks

Revision ID: 0003
Revises: 0002
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
        "group_blocks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=127), nullable=False),
        sa.Column("host", sa.String(length=63), nullable=True),
        sa.Column("image", sa.String(length=63), nullable=False),
        sa.Column("reason", sa.String(length=1024), nullable=False),
        sa.Column("allowed", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("scope", "target"),
    )
    op.create_table(
        "group_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=127), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=1024), nullable=False),
        sa.Column("allowed", sa.JSON(), nullable=False),
        sa.Column("vms", sa.JSON(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_group_audit_target", "group_audit", ["scope", "target"])


def downgrade() -> None:
    op.drop_index("ix_group_audit_target", table_name="group_audit")
    op.drop_table("group_audit")
    op.drop_table("group_blocks")
