"""telemetry rolled up per device per minute, and the indexes the fleet-state API filters on

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

_SUMS = (
    "requests", "answers_cloud", "degraded", "errors",
    "rows_total", "rows_hard", "rows_cloud", "rows_degraded",
    *(f"lat_{i:02d}" for i in range(14)),
)  # fmt: skip


def upgrade() -> None:
    op.create_table(
        "telemetry_minutes",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _SUMS),
        sa.Column("versions", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_telemetry_minutes_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "minute", name=op.f("pk_telemetry_minutes")),
    )
    op.create_index(
        op.f("ix_telemetry_minutes_minute"), "telemetry_minutes", ["minute"], unique=False
    )
    with op.batch_alter_table("devices") as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_presence"), ["presence"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_last_seen_at"), ["last_seen_at"], unique=False)
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.create_index(
            "ix_deployment_events_device_latest", ["device_id", "id"], unique=False
        )
        batch_op.drop_index(batch_op.f("ix_deployment_events_device_id"))


def downgrade() -> None:
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deployment_events_device_id"), ["device_id"], unique=False
        )
        batch_op.drop_index("ix_deployment_events_device_latest")
    with op.batch_alter_table("devices") as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_last_seen_at"))
        batch_op.drop_index(batch_op.f("ix_devices_presence"))
    op.drop_index(op.f("ix_telemetry_minutes_minute"), table_name="telemetry_minutes")
    op.drop_table("telemetry_minutes")
