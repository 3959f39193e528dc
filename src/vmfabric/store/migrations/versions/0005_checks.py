"""checks: connectivity checks through the guest agent, with their history

Revision ID: 0005
Revises: 0004
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
        "checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(length=63), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("os", sa.String(length=16), nullable=False),
        sa.Column("agent", sa.String(length=16), nullable=False),
        sa.Column("nics", sa.JSON(), nullable=False),
        sa.Column("detail", sa.String(length=1024), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_checks_vm_at", "checks", ["vm", "checked_at"])
    op.create_index("ix_checks_at", "checks", ["checked_at"])


def downgrade() -> None:
    op.drop_index("ix_checks_at", table_name="checks")
    op.drop_index("ix_checks_vm_at", table_name="checks")
    op.drop_table("checks")
