"""Billing: costs on usage records, prices, gates, budgets, rate limits, verification, audit.

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

# A snapshot, not an import of flexserve.store.schema (see 0001).
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_COST_COLUMNS = (
    "input_cost_pico",
    "cached_input_cost_pico",
    "output_cost_pico",
    "list_cost_pico",
)
_PRICE_COLUMNS = ("input_price_micro", "cached_input_price_micro", "output_price_micro")


def upgrade() -> None:
    with op.batch_alter_table("organizations") as batch:
        batch.add_column(sa.Column("monthly_budget_micro", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("monthly_budget_micro", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(
            sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default="0")
        )
        for name in _PRICE_COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))
        for name in _COST_COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))

    op.create_table(
        "model_prices",
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("input_micro", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_micro", sa.BigInteger(), nullable=False),
        sa.Column("output_micro", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "tier", name="pk_model_prices"),
    )
    op.create_table(
        "tier_multipliers",
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("multiplier_bp", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "tier", name="pk_tier_multipliers"),
    )
    op.create_table(
        "model_gates",
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("verification", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_model_gates"),
    )
    op.create_table(
        "rate_limits",
        sa.Column("org_id", sa.String(40), nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "tier", name="pk_rate_limits"),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name="fk_rate_limits_org_id_organizations"
        ),
    )
    op.create_table(
        "verification_requests",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=False),
        sa.Column("document_type", sa.String(32), nullable=False),
        sa.Column("country", sa.String(2), nullable=False),
        sa.Column("document_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("submitted_at", sa.BigInteger(), nullable=False),
        sa.Column("decided_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_verification_requests"),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name="fk_verification_requests_org_id_organizations"
        ),
    )
    op.create_index("ix_verification_requests_org_id", "verification_requests", ["org_id"])
    op.create_index(
        "ix_verification_requests_document_hash", "verification_requests", ["document_hash"]
    )
    op.create_table(
        "audit_log",
        sa.Column("id", _BigId, nullable=False, autoincrement=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("org_id", sa.String(40), nullable=True),
        sa.Column("detail", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_org_id_created_at", "audit_log", ["org_id", "created_at"])
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_server_secrets"),
    )


def downgrade() -> None:
    op.drop_table("server_secrets")
    op.drop_index("ix_audit_log_org_id_created_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_verification_requests_document_hash", table_name="verification_requests")
    op.drop_index("ix_verification_requests_org_id", table_name="verification_requests")
    op.drop_table("verification_requests")
    op.drop_table("rate_limits")
    op.drop_table("model_gates")
    op.drop_table("tier_multipliers")
    op.drop_table("model_prices")
    with op.batch_alter_table("usage_records") as batch:
        for name in (*_COST_COLUMNS, *_PRICE_COLUMNS, "cached_tokens"):
            batch.drop_column(name)
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("monthly_budget_micro")
    with op.batch_alter_table("organizations") as batch:
        batch.drop_column("monthly_budget_micro")
