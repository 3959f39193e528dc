"""access credentials: grants for a VM's port and the log of their uses

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_grants",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(length=63), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("granted_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_access_grants_vm", "access_grants", ["vm_id"])
    op.create_index("ix_access_grants_expires", "access_grants", ["expires_at"])
    op.create_table(
        "access_uses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("grant_id", sa.String(length=32), nullable=True),
        sa.Column("vm", sa.String(length=63), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=1024), nullable=True),
        sa.ForeignKeyConstraint(["grant_id"], ["access_grants.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_access_uses_grant_at", "access_uses", ["grant_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_access_uses_grant_at", table_name="access_uses")
    op.drop_table("access_uses")
    op.drop_index("ix_access_grants_expires", table_name="access_grants")
    op.drop_index("ix_access_grants_vm", table_name="access_grants")
    op.drop_table("access_grants")
