"""Batches: running totals of their output lines' tokens and cost, so that
reading a batch does not sum over its lines.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TOTALS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_pico")


def upgrade() -> None:
    with op.batch_alter_table("batches") as table:
        for name in _TOTALS:
            table.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
    # Batches made before: their totals from their lines and ledger rows.
    for name in _TOTALS[:3]:
        op.execute(
            f"UPDATE batches SET {name} = (SELECT COALESCE(SUM(l.{name}), 0) FROM batch_lines l "
            "WHERE l.batch_id = batches.id AND l.state = 'done')"
        )
    op.execute(
        "UPDATE batches SET cost_pico = (SELECT COALESCE(SUM(u.input_cost_pico "
        "+ u.cached_input_cost_pico + u.output_cost_pico), 0) FROM usage_records u "
        "JOIN batch_lines l ON u.request_id = l.request_id WHERE l.batch_id = batches.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        for name in reversed(_TOTALS):
            table.drop_column(name)
