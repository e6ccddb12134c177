"""Replicas, what runs on them, and the pools of replicas that serve one model."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from flexserve.engines.base import Engine, EngineLoad, Feature, SequenceControl, monotonic_now
from flexserve.scheduler.estimates import FlexHistory
from flexserve.scheduler.holds import HeldPlaces
from flexserve.scheduler.prefill import PrefillBudget
from flexserve.scheduler.queue import TierQueue
from flexserve.tiers import ServiceTier


class SlotAsk(NamedTuple):
    """What a gateway asks of a replica other gateways send to too
    (``flexserve.shared.capacity``)."""

    replica: str
    # Sequences the replica runs at once, and those of them flex may fill,
    # whoever sends them.
    capacity: int
    flex_capacity: int
    # This gateway's sequences in flight there, and the flex (or batch) ones.
    in_use: int
    flex_in_use: int
    # The slots it wants there per organization.
    wants: dict[str, int]


class SlotLease(NamedTuple):
    """What a gateway may run on a shared replica until its next ask."""

    slots: int
    # In flight below this, flex may start (part of ``SlotAsk.flex_capacity``).
    flex_room: int
    # Of ``slots``, the part meant for each organization's work.
    shares: dict[str, float]
    # The organizations that ask for slots on other gateways too.
    spread: set[str]


@dataclass(eq=False)
class Running:
    """One sequence the gateway has released onto a replica."""

    tier: ServiceTier
    org_id: str
    cost_tokens: int
    # True for a stream: once a token has reached the client the work cannot restart
    # (a non-streamed flex run is held back by the scheduler until it ends).
    stream: bool
    # Estimated prompt tokens, for the replica's prefill budget.
    prompt_tokens: int = 0
    started_at: float = field(default_factory=monotonic_now)
    # time.monotonic() when it was put on a replica, and the seconds it was
    # then predicted to hold its slot (flex: for wait estimates).
    granted_at: float = 0.0
    expected_seconds: float = 0.0
    # True when its engine sends it several tokens a delta (its client reads
    # it whole and the engine has a ``stream_interval``).
    chunked: bool = False
    # Output deltas it has produced, and time.monotonic() of its first and latest.
    num_output: int = 0
    # Output tokens counted for it as its deltas came (``Replica.delta_tokens``).
    tokens_counted: float = 0.0
    first_output_at: float = 0.0
    last_output_at: float = 0.0
    control: SequenceControl = field(default_factory=SequenceControl)
    # Set when output has been handed to the client.
    delivered: bool = False
    # Set by the scheduler when it aborts this sequence to make room.
    preempted: bool = False
    # Set by the scheduler when it ends this sequence because its replica
    # stopped answering (its load signals went unread).
    hung: bool = False
    # The task iterating the run while it awaits the engine (None between
    # deltas, and for a stream once output reached its client): cancelled to
    # abort the run.
    pump: asyncio.Task[Any] | None = None

    @property
    def seconds_per_delta(self) -> float:
        """Its pace so far: seconds between output deltas (after two or more)."""
        return (self.last_output_at - self.first_output_at) / max(1, self.num_output - 1)

    @property
    def can_restart(self) -> bool:
        """Aborting it loses nothing the client has seen."""
        return not (self.stream and self.delivered)


@dataclass(eq=False)
class Replica:
    """One engine replica and what the gateway has in flight on it."""

    engine: Engine
    # Sequences the gateway runs on this replica at once: all it runs at once,
    # or, where gateways share the replica, this gateway's lease on them.
    capacity: int
    running: list[Running] = field(default_factory=list)
    num_in_flight_by_tier: dict[ServiceTier, int] = field(
        default_factory=lambda: dict.fromkeys(ServiceTier, 0)
    )
    # Expected tokens (prompt + output) of the sequences in flight.
    tokens_in_flight: int = 0
    load: EngineLoad = field(default_factory=lambda: EngineLoad(updated_at=float("-inf")))
    # When the engine was asked for ``load``: it counts none of the runs this
    # gateway started later. Then, on a replica this gateway shares
    # (``policy.shared_flex_starts``): a draw in [0, 1) made with each
    # reading, by which it rounds its part of the flex room the reading
    # shows free; and how many of its runs the reading counts have ended
    # since it came (their room is this gateway's to refill).
    load_asked_at: float = float("-inf")
    load_draw: float = 0.0
    load_ends: int = 0
    # False for engines without load signals: capacity then comes from in-flight counts.
    has_signals: bool = True
    healthy: bool = True
    num_failed_reads: int = 0
    last_preempted_at: float = float("-inf")
    # No work is offered before this time.monotonic(): the replica turned a
    # request away (429, 503, a failed connection) and is given a pause.
    backoff_until: float = float("-inf")
    # Requests the replica turned away before any output.
    num_refusals: int = 0
    # time.monotonic() of the last output any run on it produced: a sign of
    # life when its load signals are slow to answer.
    last_output_at: float = float("-inf")
    # Observed / predicted TPOT (EWMA): calibrates the step-time model to this replica.
    tpot_scale: float = 1.0
    # Engine's / gateway's prompt token counts (EWMA): corrects the gateway's estimate.
    prompt_scale: float = 1.0
    # Output tokens per streamed delta (EWMA): engines may send several at once
    # (vLLM's --stream-interval); and per delta of chunked runs (its
    # per-request `stream_interval`; 0 until one has ended: the engine's own).
    tokens_per_delta: float = 1.0
    tokens_per_chunk: float = 0.0
    # Prompt tokens other gateways sharing the replica have sent there and had
    # no output for, as they last said (``shared/prefills.py``; 0 without Redis).
    others_unprefilled: int = 0
    # ... and the default and priority sequences they run there.
    others_default_runs: int = 0
    # In a pool of several replicas whose default is packed, and one of the
    # replicas it is packed onto (``placement.mark_default_replicas``).
    packs_default: bool = False
    default_packed: bool = False
    # When this gateway last placed a default with the replica so marked
    # (monotonic seconds): ``policy.pack_reserve`` lapses some time after.
    default_packed_at: float = -math.inf
    # Its lease is being renewed (shared replicas): admission is held to
    # what runs until the answer (``Scheduler.slot_demand``).
    lease_pending: bool = False
    # Engine time prompts may still take without pushing default's TPOT past the SLO.
    prefill: PrefillBudget = field(default_factory=PrefillBudget)
    # Slots flex holds here, smoothed (scheduler/drain.py), and when last looked at.
    flex_slots_smoothed: float = 0.0
    flex_slots_seen_at: float | None = None
    # Sequences the replica runs at once, whoever sends them (``capacity``
    # before any lease).
    full_capacity: int = 0
    # Where gateways share the replica: of this gateway's lease, the slots
    # meant for each organization's work (``flexserve.shared.capacity``).
    org_shares: dict[str, float] = field(default_factory=dict)
    # ... and the organizations that ask for slots on other gateways too.
    orgs_spread: set[str] = field(default_factory=set)
    # ... and the sequences this gateway may have in flight here and still
    # start flex: its part of the replica's flex room (capacity less
    # headroom), which the gateways' parts never exceed together. None: the
    # replica is this gateway's alone (``capacity`` less headroom).
    flex_room: int | None = None
    # Whether the engine keeps prompts' prefixes cached for the gateway's
    # split prefill (scheduler/split_prefill.py): None until a warm-up tells.
    caches_prefixes: bool | None = None
    # Flex prefill pieces in flight on this replica at once (made on first
    # use, ``split_prefill_concurrency`` wide).
    warm_gate: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        self.full_capacity = self.full_capacity or self.capacity

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def num_in_flight(self) -> int:
        return len(self.running)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running)

    def mean_cost_tokens(self) -> int:
        return self.tokens_in_flight // len(self.running) if self.running else 0

    def add(self, run: Running, now: float) -> None:
        run.granted_at = now
        self.running.append(run)
        self.num_in_flight_by_tier[run.tier] += 1
        self.tokens_in_flight += run.cost_tokens
        self.prefill.charge(now, self.prefill_seconds(run.prompt_tokens))

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Engine seconds a prompt of ``prompt_tokens`` (gateway's estimate) takes to prefill."""
        model = self.engine.step_time_model()
        if model is None:
            return 0.0
        return model.a * prompt_tokens * self.prompt_scale

    def backed_off(self, now: float) -> bool:
        return now < self.backoff_until

    def flex_started_since(self, since: float) -> int:
        """Flex and batch runs started here at ``since`` or later, still running."""
        return sum(1 for run in self.running if run.tier.is_preemptible and run.granted_at >= since)

    def discard(self, run: Running) -> None:
        if run.granted_at < self.load_asked_at:
            self.load_ends += 1
        self.running.remove(run)
        self.num_in_flight_by_tier[run.tier] -= 1
        self.tokens_in_flight -= run.cost_tokens

    def observe_tpot(self, observed: float, predicted: float, weight: float = 0.1) -> None:
        if predicted > 0 and observed > 0:
            self.tpot_scale += weight * (observed / predicted - self.tpot_scale)

    def observe_prompt(self, engine_tokens: int, estimated: int, weight: float = 0.1) -> None:
        if engine_tokens > 0 and estimated > 0:
            self.prompt_scale += weight * (engine_tokens / estimated - self.prompt_scale)

    def observe_deltas(self, completion_tokens: int, num_deltas: int, chunked: bool = False,
                       weight: float = 0.1) -> None:
        if completion_tokens > 0 and num_deltas > 0:
            per_delta = max(1.0, completion_tokens / num_deltas)
            if chunked:
                before = self.delta_tokens(chunked)
                self.tokens_per_chunk = before + weight * (per_delta - before)
            else:
                self.tokens_per_delta += weight * (per_delta - self.tokens_per_delta)

    def delta_tokens(self, chunked: bool) -> float:
        """Output tokens a delta carries, for runs chunked or not, as this
        replica's finished runs showed (before any: the engine's interval)."""
        if not chunked:
            return self.tokens_per_delta
        return self.tokens_per_chunk or float(self.engine.stream_interval)


@dataclass(eq=False)
class ModelPool:
    """The replicas serving one model id, and the requests waiting for them."""

    model: str
    replicas: list[Replica]
    queue: TierQueue = field(default_factory=TierQueue)
    # What flex wait estimates have learned (service times, output rates).
    flex_history: FlexHistory = field(default_factory=FlexHistory)
    # Places in the flex queue held for refused requests until they come back.
    holds: HeldPlaces = field(default_factory=HeldPlaces)
    # Aborts of flex ordered by the scheduler and not yet carried out.
    num_preempting: int = 0
    num_preemptions: int = 0
    # Preemptions that started a replica's cooldown (those within one add no pause).
    num_cooldowns: int = 0
    num_pauses: int = 0
    num_flex_refused: int = 0
    num_downgraded: int = 0
    # Requests a replica turned away before any output, sent on to another
    # replica or back to the queue (never billed for the refused attempt).
    num_failovers: int = 0
    # Split prefill (scheduler/split_prefill.py): flex runs whose prompt was
    # warmed in pieces, the warm-up requests, the prompt tokens they had the
    # engine compute (the gateway's cost), and pieces found evicted.
    num_split_runs: int = 0
    num_warmups: int = 0
    num_warmup_tokens: int = 0
    num_split_misses: int = 0
    # Replicas default is packed onto (``placement.py``, ``default_placement="pack"``).
    num_default_replicas: int = 1

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.replicas if r.healthy)

    @property
    def features(self) -> frozenset[Feature]:
        """What every replica of the model honours (a request may land on any)."""
        features: frozenset[Feature] | None = None
        for replica in self.replicas:
            own = replica.engine.features
            features = own if features is None else features & own
        return features or frozenset()

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    def num_in_flight_of(self, tier: ServiceTier) -> int:
        return sum(r.num_in_flight_by_tier[tier] for r in self.replicas)
