"""devices.desired_document: the signed desired state kept in SQL, and when to renew it

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.add_column(sa.Column("desired_document", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("desired_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("desired_renew_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            batch_op.f("ix_devices_desired_renew_at"), ["desired_renew_at"], unique=False
        )
    # Documents signed before this revision lived only in Redis and on the broker: make
    # them due at once, so the fleet service re-signs each (same rev) into SQL on start.
    devices = sa.table(
        "devices",
        sa.column("desired_rev", sa.Integer()),
        sa.column("desired_renew_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        devices.update()
        .where(devices.c.desired_rev > 0)
        .values(desired_renew_at=datetime(1970, 1, 1, tzinfo=UTC))
    )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_desired_renew_at"))
        batch_op.drop_column("desired_renew_at")
        batch_op.drop_column("desired_expires_at")
        batch_op.drop_column("desired_document")
