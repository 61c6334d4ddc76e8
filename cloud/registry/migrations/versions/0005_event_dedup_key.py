"""deployment_events.dedup_key: a status message delivered twice is stored once

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
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.add_column(sa.Column("dedup_key", sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint(
            batch_op.f("uq_deployment_events_dedup_key"), ["dedup_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_deployment_events_dedup_key"), type_="unique")
        batch_op.drop_column("dedup_key")
