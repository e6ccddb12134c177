"""Batch lines: their expected cost (the batch's budget hold) and the order
they run in (lines sharing a prompt prefix together).

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
    with op.batch_alter_table("batch_lines") as table:
        table.add_column(sa.Column("expected_cost_pico", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        table.add_column(sa.Column("run_order", sa.Integer(), nullable=False, server_default="0"))
    op.drop_index("ix_batch_lines_batch_id_state", table_name="batch_lines")
    op.create_index("ix_batch_lines_batch_id_state_run_order", "batch_lines",
                    ["batch_id", "state", "run_order"])


def downgrade() -> None:
    op.drop_index("ix_batch_lines_batch_id_state_run_order", table_name="batch_lines")
    op.create_index("ix_batch_lines_batch_id_state", "batch_lines", ["batch_id", "state"])
    with op.batch_alter_table("batch_lines") as table:
        table.drop_column("run_order")
        table.drop_column("expected_cost_pico")
