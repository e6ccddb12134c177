"""Admission policy: the scheduler's settings and the decisions made from them.

The decisions only read the replicas' state, except that asking ``can_admit``
about flex brings the replica's prefill budget up to date (credit earned since
the last look).

No tier goes to a replica that is unhealthy or backing off (it turned a
request away lately: ``Replica.backoff_until``).

Default and priority go whenever a replica has a free slot (the gateway's
capacity for a replica is what the engine runs at once, so the engine's own
waiting queue — where priority inversion happens — stays short). Flex goes
only on spare capacity: fresh load signals, no engine queue, KV use under a
threshold, a headroom of slots left for default bursts, no recent preemption
on that replica (hysteresis), and a predicted default time-per-output-token
within the operator's SLO — counting both the decode step (more sequences, more
KV to read) and the share of engine time prompts take to prefill, which flex
may use only as fast as the SLO leaves room for (``prefill.PrefillBudget``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexserve.scheduler.replicas import Replica
from flexserve.tiers import ServiceTier

# Seconds the flex reserve on a replica default is packed onto outlasts this
# gateway's last default placed while it was packed, where no default runs:
# long enough to span the gaps between arrivals (a fleet's gateways each
# place a few defaults a second), short enough that flex alone soon gets
# every room back.
PACK_RESERVE_HOLD = 10.0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    # False: a tier-blind FCFS gateway (for comparison): no flex rules, no preemption.
    tiers_enabled: bool = True
    # Longest a flex request waits server-side before 429 (clients may ask for less).
    flex_max_wait: float = 600.0
    # Fraction of a replica's slots flex never takes, kept for default bursts.
    flex_headroom: float = 0.2
    # Flex is not released while the engine's KV cache is fuller than this.
    flex_kv_threshold: float = 0.8
    # Flex is not released while the engine itself has more than this many waiting.
    flex_max_engine_waiting: int = 0
    # Predicted default TPOT (seconds) that flex admission must keep; 0: no SLO.
    tpot_slo: float = 0.0
    # "spread" or "pack" (scheduler/placement.py).
    default_placement: str = "pack"
    # Flex prompts are warmed into the engine's prefix cache in pieces of
    # this many tokens before the request itself (scheduler/split_prefill.py); 0: off.
    split_prefill_tokens: int = 0
    # ... and at most this many pieces (or split requests' last pieces) in
    # flight per replica at once.
    split_prefill_concurrency: int = 1
    # Load signals older than this count as saturated (for flex).
    load_stale_after: float = 0.5
    # Seconds between reads of each replica's load signals.
    scrape_interval: float = 0.1
    # After preempting flex on a replica, flex is not released there for this long.
    preempt_cooldown: float = 1.0
    # Share of a model's capacity priority may hold; past it priority is served as default.
    priority_share: float = 0.5
    # Most requests waiting per model; past it flex gets 429 and others 503.
    max_queue: int = 20_000
    # Tokens an organization's flex flow earns per round-robin turn.
    fair_quantum: int = 2048
    # Retry-After (seconds) when no flex has been served lately to estimate from.
    unknown_wait_retry_after: float = 30.0
    # Seconds a replica that turned a request away (429, 503, a failed
    # connection) is offered no work, when it did not say for how long.
    replica_backoff: float = 1.0
    # Longest pause a replica's own Retry-After can impose on it.
    replica_backoff_max: float = 10.0
    # Seconds a replica may go without answering a read of its load signals
    # before it is taken as hung (each read may take half of it).
    replica_silent_after: float = 10.0


def headroom_slots(config: SchedulerConfig, capacity: int) -> int:
    if capacity <= 1:
        return 0
    return min(capacity - 1, math.ceil(config.flex_headroom * capacity))


def flex_room(config: SchedulerConfig, replica: Replica) -> int:
    """Sequences in flight on ``replica`` below which flex may start: its
    capacity less the headroom kept for default, or, where gateways share
    it, this gateway's part of that (``Replica.flex_room``)."""
    if replica.flex_room is not None:
        return min(replica.flex_room, replica.capacity)
    return replica.capacity - headroom_slots(config, replica.capacity)


def engine_flex_room(config: SchedulerConfig, replica: Replica) -> int:
    """Sequences the replica's engine may run, every gateway's together, below
    which flex may start there: its whole capacity less the headroom (what
    the gateways' flex rooms on it are parts of, ``SlotAsk.flex_capacity``)."""
    return replica.full_capacity - headroom_slots(config, replica.full_capacity)


def shared_flex_starts(config: SchedulerConfig, replica: Replica) -> int:
    """Flex runs this gateway may start on a replica it shares with other
    gateways between two readings of its engine: its part of the room the
    last reading left below ``engine_flex_room``, in proportion to its own
    flex room there (its lease), rounded up or down by the reading's draw so
    that the gateways' parts add up, on average, to the room; and the room
    of its own runs the reading counted that have ended since, which no
    other gateway knows of. Every gateway reads the same engine, and each
    taking all the room it saw would start flex there together, several
    times over what the room holds, until the next reading: prefills bunched
    ahead of default's first tokens, and flex in default's headroom."""
    load = replica.load
    room = engine_flex_room(config, replica)
    free = room - (load.num_running + load.num_waiting)
    if free <= 0 or room <= 0:
        # Its own ends first make up what the engine is over the room by.
        return max(0, free + replica.load_ends)
    share = min(1.0, (replica.flex_room or 0) / room)
    return math.floor(free * share + replica.load_draw) + replica.load_ends


def default_runs(replica: Replica) -> int:
    """Default and priority sequences this gateway runs on the replica."""
    by_tier = replica.num_in_flight_by_tier
    return by_tier[ServiceTier.DEFAULT] + by_tier[ServiceTier.PRIORITY]


def engine_default_runs(replica: Replica) -> int:
    """Default and priority sequences on the replica: this gateway's and, as
    they last said, the other gateways'."""
    return default_runs(replica) + replica.others_default_runs


def flex_runs(replica: Replica) -> int:
    """Flex and batch sequences this gateway runs on the replica."""
    by_tier = replica.num_in_flight_by_tier
    return by_tier[ServiceTier.FLEX] + by_tier[ServiceTier.BATCH]


def pack_reserve(config: SchedulerConfig, replica: Replica, now: float) -> int:
    """With default packed (``default_placement="pack"``): the part of the
    replica's flex room flex leaves to default where default is packed or
    runs, half of it. Flex fills what default leaves of a room, and where
    default runs, every flex start is a prompt prefilled in the steps its
    decodes wait through: without it, when default traffic ebbs the flex
    that refills a packed replica's room is prefilled beside the defaults
    still decoding there (docs/scheduler.md). None where the pool has one
    replica: flex has nowhere else to run; nor, where no default runs, once
    this gateway has placed none for ``PACK_RESERVE_HOLD`` seconds: a fleet
    that turned to flex alone gets every room back."""
    if config.default_placement != "pack" or not replica.packs_default:
        return 0
    packed = replica.default_packed and now - replica.default_packed_at < PACK_RESERVE_HOLD
    if not packed and not engine_default_runs(replica):
        return 0
    return math.ceil(engine_flex_room(config, replica) / 2)


def engine_flex_runs(replica: Replica) -> int:
    """Flex and batch sequences on the replica's engine: this gateway's, and
    what its last reading counted beyond this gateway's runs then (those
    still running and those ended since) and the other gateways' default
    runs."""
    load = replica.load
    counted = sum(1 for run in replica.running if run.granted_at < replica.load_asked_at) + replica.load_ends
    others = load.num_running + load.num_waiting - counted - replica.others_default_runs
    return flex_runs(replica) + max(0, others)


def predicted_tpot(
    replica: Replica, num_sequences: int, tokens_held: int, *, calibrated: bool = True
) -> float | None:
    """Seconds per output token for a batch of ``num_sequences`` holding
    ``tokens_held`` KV tokens; ``calibrated`` scales the step-time model by what
    this replica has been observed to do."""
    model = replica.engine.step_time_model()
    if model is None:
        return None
    raw = model.step_time(num_sequences, tokens_held)
    return raw * replica.tpot_scale if calibrated else raw


def can_admit(
    config: SchedulerConfig, replica: Replica, tier: ServiceTier, now: float
) -> bool:
    """Whether a request of ``tier`` may start on ``replica`` now."""
    if not replica.healthy or replica.free_slots <= 0 or now < replica.backoff_until:
        return False
    if not config.tiers_enabled or not tier.is_preemptible:
        return True
    if replica.num_in_flight >= flex_room(config, replica):
        return False
    if now - replica.last_preempted_at < config.preempt_cooldown:
        return False
    if replica.has_signals:
        load = replica.load
        if load.age(now) > config.load_stale_after:
            return False
        if load.num_waiting > config.flex_max_engine_waiting:
            return False
        if replica.flex_room is not None and replica.flex_started_since(replica.load_asked_at) >= shared_flex_starts(
            config, replica
        ):
            # Shared with other gateways: their default runs there count
            # against no room of this gateway's, so the engine's own count
            # keeps flex out of default's headroom on the replica as a whole,
            # each gateway taking its part of what the count leaves free.
            return False
        if load.kv_cache_usage is not None and load.kv_cache_usage >= config.flex_kv_threshold:
            return False
        reserve = pack_reserve(config, replica, now)
        if reserve and engine_flex_runs(replica) >= engine_flex_room(config, replica) - reserve:
            return False
    if config.tpot_slo > 0:
        step = predicted_tpot(
            replica, replica.num_in_flight + 1, replica.tokens_in_flight + replica.mean_cost_tokens()
        )
        if step is not None:
            if step > config.tpot_slo:
                return False
            # Prefill may take the rest of the SLO (see scheduler/prefill.py).
            if replica.prefill.credit(now, 1.0 - step / config.tpot_slo) < 0:
                return False
    return True


def spare_capacity(config: SchedulerConfig, replicas: list[Replica], now: float) -> float:
    """Fraction (0–1) of the model's slots flex could take right now."""
    total = sum(r.capacity for r in replicas if r.healthy)
    if total == 0:
        return 0.0
    spare = 0
    for replica in replicas:
        if can_admit(config, replica, ServiceTier.FLEX, now):
            limit = flex_room(config, replica)
            spare += max(0, limit - replica.num_in_flight)
    return spare / total
