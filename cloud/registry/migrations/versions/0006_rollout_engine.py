"""rollouts and their targets carry what the rollout engine decides (waves, fencing, revs)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.add_column(sa.Column("model_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_rollouts_model_id_models"), "models", ["model_id"], ["id"],
            ondelete="CASCADE",
        )  # fmt: skip
        batch_op.create_index(batch_op.f("ix_rollouts_model_id"), ["model_id"], unique=False)
        batch_op.alter_column("model_version_id", existing_type=sa.Integer(), nullable=True)
        batch_op.add_column(
            sa.Column("current_wave", sa.Integer(), nullable=False, server_default="-1")
        )
        batch_op.add_column(sa.Column("wave_started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("created_by", sa.String(length=64), nullable=False, server_default="admin")
        )
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("rollout_targets") as batch_op:
        batch_op.add_column(sa.Column("rev", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_rollout_targets_rollout_id"), ["rollout_id"], unique=False
        )
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deployment_events_rollout_id"), ["rollout_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deployment_events") as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_events_rollout_id"))
    with op.batch_alter_table("rollout_targets") as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollout_targets_rollout_id"))
        batch_op.drop_column("started_at")
        batch_op.drop_column("rev")
    with op.batch_alter_table("rollouts") as batch_op:
        batch_op.drop_column("finished_at")
        batch_op.drop_column("created_by")
        batch_op.drop_column("fence")
        batch_op.drop_column("wave_started_at")
        batch_op.drop_column("current_wave")
        batch_op.alter_column("model_version_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_index(batch_op.f("ix_rollouts_model_id"))
        batch_op.drop_constraint(batch_op.f("fk_rollouts_model_id_models"), type_="foreignkey")
        batch_op.drop_column("model_id")
