"""federated runs carry their Flower run, reason, selector, results and rollout; their rounds

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("federated_runs") as batch_op:
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("flower_run_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("selector", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("result_int8_version_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rollout_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("created_by", sa.String(length=64), nullable=False, server_default="admin")
        )
        batch_op.add_column(sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column(
                "updated_at",
                sa.DateTime(timezone=True),
                nullable=False,
                server_default=sa.func.current_timestamp(),
            )
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_federated_runs_result_int8_version_id_model_versions"),
            "model_versions",
            ["result_int8_version_id"],
            ["id"],
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_federated_runs_rollout_id_rollouts"), "rollouts", ["rollout_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_federated_runs_state"), ["state"], unique=False)
    op.create_table(
        "federated_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("clients", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), nullable=False),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["federated_runs.id"],
            name=op.f("fk_federated_rounds_run_id_federated_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_federated_rounds")),
        sa.UniqueConstraint("run_id", "round", name="uq_federated_rounds_run_round"),
    )
    with op.batch_alter_table("federated_rounds") as batch_op:
        batch_op.create_index(batch_op.f("ix_federated_rounds_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("federated_rounds") as batch_op:
        batch_op.drop_index(batch_op.f("ix_federated_rounds_run_id"))
    op.drop_table("federated_rounds")
    with op.batch_alter_table("federated_runs") as batch_op:
        batch_op.drop_index(batch_op.f("ix_federated_runs_state"))
        batch_op.drop_constraint(
            batch_op.f("fk_federated_runs_rollout_id_rollouts"), type_="foreignkey"
        )
        batch_op.drop_constraint(
            batch_op.f("fk_federated_runs_result_int8_version_id_model_versions"),
            type_="foreignkey",
        )
        for column in (
            "updated_at",
            "submitted_at",
            "created_by",
            "rollout_id",
            "result_int8_version_id",
            "selector",
            "flower_run_id",
            "reason",
        ):
            batch_op.drop_column(column)
