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
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
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
    # unverified, pending, verified or rejected: gates the models that need it.
    Column("verification_status", String(16), nullable=False, server_default="unverified"),
    Column("created_at", BigInteger, nullable=False),
    # Hard monthly budget in micro-dollars; NULL: no budget.
    Column("monthly_budget_micro", BigInteger, nullable=True),
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
    # Hard monthly budget in micro-dollars; NULL: no budget of its own.
    Column("monthly_budget_micro", BigInteger, nullable=True),
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
    # The part of prompt_tokens served from a prompt cache.
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    # The served tier's price the costs below were made from, in micro-dollars
    # per 1M tokens (= pico-dollars per token); NULL: the model had no price.
    Column("input_price_micro", BigInteger, nullable=True),
    Column("cached_input_price_micro", BigInteger, nullable=True),
    Column("output_price_micro", BigInteger, nullable=True),
    # What the request was charged, per line item, in pico-dollars (0 when the
    # status is not billable: see billing.cost.is_billable).
    Column("input_cost_pico", BigInteger, nullable=False, server_default="0"),
    Column("cached_input_cost_pico", BigInteger, nullable=False, server_default="0"),
    Column("output_cost_pico", BigInteger, nullable=False, server_default="0"),
    # What the same tokens cost at the default tier's (list) price: the
    # difference is what flex and batch saved.
    Column("list_cost_pico", BigInteger, nullable=False, server_default="0"),
    # Usage and cost reports read one organization's rows over a time range.
    Index("ix_usage_records_org_id_created_at", "org_id", "created_at"),
)

# The price catalog as operators set it (billing.price_book). Tier `default`
# is a model's list price; a row for another tier overrides the multiplier.
model_prices = Table(
    "model_prices",
    metadata,
    Column("model", String, primary_key=True),
    Column("tier", String(16), primary_key=True),
    # Micro-dollars per 1M tokens.
    Column("input_micro", BigInteger, nullable=False),
    Column("cached_input_micro", BigInteger, nullable=False),
    Column("output_micro", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Tier multipliers in basis points; model "*" applies to every model without its own.
tier_multipliers = Table(
    "tier_multipliers",
    metadata,
    Column("model", String, primary_key=True),
    Column("tier", String(16), primary_key=True),
    Column("multiplier_bp", Integer, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Which models need a verified organization: "none", "streaming" or "all".
model_gates = Table(
    "model_gates",
    metadata,
    Column("model", String, primary_key=True),
    Column("verification", String(16), nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Requests and tokens per minute, per organization and tier; NULL: no limit.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("org_id", String(40), ForeignKey("organizations.id"), primary_key=True),
    Column("tier", String(16), primary_key=True),
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
)

# Operators' keys (accounts.operators): they open the operator's dashboard.
# Like API keys, stored as a SHA-256 hash; the key is shown once.
operator_keys = Table(
    "operator_keys",
    metadata,
    Column("id", String(40), primary_key=True),  # "opk_…"
    Column("name", String(64), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# Identity documents submitted for verification (accounts.verification). The
# document number is never stored: only a keyed hash that finds the same
# document again (the one-organization-per-90-days rule).
verification_requests = Table(
    "verification_requests",
    metadata,
    Column("id", String(40), primary_key=True),  # "vrq_…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False, index=True),
    Column("document_type", String(32), nullable=False),
    Column("country", String(2), nullable=False),
    Column("document_hash", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # pending, verified, rejected, superseded
    Column("reason", String, nullable=True),  # why it was rejected
    Column("submitted_at", BigInteger, nullable=False),
    Column("decided_at", BigInteger, nullable=True),
)

# Every verification decision (and other operator changes), append-only.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("created_at", BigInteger, nullable=False),
    Column("actor", String, nullable=False),  # "cli:alice", "key:key_…", "system"
    Column("action", String(64), nullable=False),  # "verification.rejected", …
    Column("org_id", String(40), nullable=True),
    Column("detail", String, nullable=False),  # JSON object
    Index("ix_audit_log_org_id_created_at", "org_id", "created_at"),
)

# Secrets the server generates for itself once (the verification hash key).
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

# Responses created with `store` (the default), for `GET /v1/responses/{id}`
# and for a later request that continues them (`previous_response_id`).
stored_responses = Table(
    "stored_responses",
    metadata,
    Column("id", String(64), primary_key=True),  # "resp_…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(40), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("previous_response_id", String(64), nullable=True),
    # The Response object as the API returned it (JSON).
    Column("response", Text, nullable=False),
    # This request's input items, with ids (JSON), for `input_items`.
    Column("input_items", Text, nullable=False),
    # The whole conversation so far as chat messages, this response's output
    # included (JSON): what a request continuing it is sent.
    Column("conversation", Text, nullable=False),
    Index("ix_stored_responses_org_id_created_at", "org_id", "created_at"),
)

# Uploaded files (`/v1/files`) and the batch output files; the content lives
# in the file store (a directory under `home` by default), named by `id`.
files = Table(
    "files",
    metadata,
    Column("id", String(40), primary_key=True),  # "file-…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # NULL: kept until deleted.
    Column("expires_at", BigInteger, nullable=True),
    Index("ix_files_org_id_created_at", "org_id", "created_at"),
    Index("ix_files_expires_at", "expires_at"),
)

# Files' bytes, where the gateways keep them in the database (the setting
# `files_in_database`): 1 MiB chunks in order, so that every gateway of a
# fleet reads what any other stored. Without it, only files_dir holds them.
file_contents = Table(
    "file_contents",
    metadata,
    Column("file_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

# Batches (`/v1/batches`): the batch object, and each input line's durable
# state, so that a restarted gateway resumes a batch without running a
# finished line again.
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),  # "batch_…"
    Column("org_id", String(40), ForeignKey("organizations.id"), nullable=False),
    Column("project_id", String(40), nullable=False),
    # The key that created it: its lines are billed and rate-limited as that key's.
    Column("api_key_id", String(40), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    # validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled.
    Column("status", String(16), nullable=False),
    Column("model", String, nullable=True),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    # `errors.data` of a batch that failed validation (JSON list); NULL: none.
    Column("errors", Text, nullable=True),
    Column("metadata", Text, nullable=True),  # JSON object
    # `output_expires_after.seconds`: the output and error files expire that
    # long after they are made; NULL: kept until deleted.
    Column("output_ttl", Integer, nullable=True),
    Column("total", Integer, nullable=False, server_default="0"),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    # Sums over the output lines, kept as they are recorded: the batch's
    # `usage`, and what its ledger rows cost (pico-USD).
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
    Column("cached_tokens", BigInteger, nullable=False, server_default="0"),
    Column("cost_pico", BigInteger, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    Index("ix_batches_org_id_created_at", "org_id", "created_at"),
    Index("ix_batches_status", "status"),
)

batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id"), primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based, as in the input file
    Column("custom_id", String, nullable=False),
    Column("body", Text, nullable=False),  # the request body (JSON)
    # pending, running, done (an output line) or failed (an error line).
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("request_id", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response", Text, nullable=True),  # the response body (JSON)
    # A failure outside HTTP (batch_cancelled, batch_expired…): code and message.
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    # What the line is expected to cost at the batch's price (pico-USD): its
    # share of the batch's budget hold.
    Column("expected_cost_pico", BigInteger, nullable=False, server_default="0"),
    # The order lines are run in: lines whose prompts share a prefix run
    # together, so an engine with a prefix cache computes it once.
    Column("run_order", Integer, nullable=False, server_default="0"),
    # A running line: the runner that claimed it, and until when (Unix
    # seconds) its claim holds unless that runner renews it.
    Column("claimed_by", String(64), nullable=True),
    Column("lease_until", BigInteger, nullable=True),
    Index("ix_batch_lines_batch_id_state_run_order", "batch_id", "state", "run_order"),
)

# Batch webhooks (batches/webhooks.py): an outbox of the events announcing
# that a batch ended, written before its final status and sent from here until
# the endpoint answers 2xx, so a restarted gateway sends what a killed one had not.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", String(64), primary_key=True),  # "evt_…", the webhook-id of every attempt
    # One event per batch: the status it ended with.
    Column("batch_id", String(64), ForeignKey("batches.id"), nullable=False, unique=True),
    Column("type", String(32), nullable=False),  # batch.completed, batch.failed, …
    Column("body", Text, nullable=False),  # the JSON sent, the same bytes on every attempt
    Column("created_at", BigInteger, nullable=False),
    # pending, delivered, or failed (not delivered within batch_webhook_retry_for).
    Column("state", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # When it is sent next, in unix milliseconds: retries may be under a second apart.
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),  # what the last failed attempt got
    Column("delivered_at", BigInteger, nullable=True),
    Index("ix_webhook_events_state_next_attempt_ms", "state", "next_attempt_ms"),
)
