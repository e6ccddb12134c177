"""Stored responses (`POST /v1/responses` with `store`).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=False),
        sa.Column("project_id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("input_items", sa.Text(), nullable=False),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name="fk_stored_responses_org_id_organizations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_stored_responses"),
    )
    op.create_index(
        "ix_stored_responses_org_id_created_at", "stored_responses", ["org_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_stored_responses_org_id_created_at", table_name="stored_responses")
    op.drop_table("stored_responses")
