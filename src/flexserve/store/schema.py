"""The tables, as SQLAlchemy Core ``Table`` objects.

This is the schema the code queries; the migrations in ``migrations/versions``
are what creates it, and ``tests/test_store.py`` checks that the two agree.
Times are integer unix seconds (durations integer milliseconds), so that
SQLite and PostgreSQL store and compare them the same way.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    false,
)

# Named constraints, so that a later migration can drop or alter them by name
# (SQLite's batch mode needs this too).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# A 64-bit key on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the rowid.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

organizations = Table(
    "organizations",
    metadata,
    Column("id", String(40), primary_key=True),  # "org-…"
    Column("name", String(64), nullable=False, unique=True),
    # "unverified" or "verified": gates the models and features that need it.
    Column("verification_status", String(16), nullable=False, server_default="unverified"),
    Column("created_at", BigInteger, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("id", String(40), primary_key=True),  # "proj_…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False),
    Column("name", String(64), nullable=False),
    # The tier a request with `service_tier: auto` (or none) is queued on.
    Column("default_service_tier", String(16), nullable=False, server_default="default"),
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("org_id", "name"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),  # "key_…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("project_id", String(40), ForeignKey("projects.id"), nullable=False),
    # sha256 hex of the key; the key itself is shown once and never stored.
    Column("key_hash", String(64), nullable=False, unique=True),
    # "sk-fs-ab…wxyz": enough to recognise a key in a list, useless to call with.
    Column("prefix", String(16), nullable=False),
    Column("is_admin", Boolean, nullable=False, server_default=false()),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# One row per finished request, written by billing.usage.UsageWriter. No
# foreign keys: the ledger is history that must be accepted as it comes, and
# a referential check is a cost on the busiest insert in the system.
usage_records = Table(
    "usage_records",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    # The gateway's request id; a retried write of the same row is ignored.
    # Free-form text columns have no length: PostgreSQL would refuse a longer
    # value, and a refused row is a request that is never billed.
    Column("request_id", String, nullable=False, unique=True),
    Column("org_id", String(40), nullable=False),
    Column("project_id", String(40), nullable=False),
    Column("api_key_id", String(40), nullable=False),
    Column("model", String, nullable=False),
    Column("requested_tier", String(16), nullable=False),  # as sent, `auto` included
    Column("served_tier", String(16), nullable=False),  # what it ran on: what is billed
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("queue_time_ms", Integer, nullable=False),
    Column("ttft_ms", Integer, nullable=True),  # None: no token was produced
    Column("total_time_ms", Integer, nullable=False),
    Column("status", String(32), nullable=False),  # completed, client_disconnected, error…
    Column("created_at", BigInteger, nullable=False),
    # Usage and cost reports read one organization's rows over a time range.
    Index("ix_usage_records_org_id_created_at", "org_id", "created_at"),
)
