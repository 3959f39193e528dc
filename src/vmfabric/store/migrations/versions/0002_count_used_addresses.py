"""subnets: addresses in use are counted from allocations, no longer kept in `used`

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subnets") as batch:
        batch.drop_column("used")


def downgrade() -> None:
    with op.batch_alter_table("subnets") as batch:
        batch.add_column(sa.Column("used", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE subnets SET used = "
        "(SELECT count(*) FROM allocations WHERE allocations.subnet_id = subnets.id)"
    )
