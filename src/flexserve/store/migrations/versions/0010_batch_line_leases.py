"""Batch lines: which runner claimed a running line, and until when its
claim holds unless renewed, so that a runner taking a batch up takes only
the lines of runners that stopped renewing (not those of live gateways).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batch_lines") as table:
        table.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        # Unix seconds; NULL on lines claimed before: taken as lapsed.
        table.add_column(sa.Column("lease_until", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch_lines") as table:
        table.drop_column("lease_until")
        table.drop_column("claimed_by")
