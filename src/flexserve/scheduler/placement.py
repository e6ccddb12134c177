"""Placement: which of a model's replicas a request released now goes to.

Only replicas that admit the request's tier now (``policy.can_admit``) are
candidates. Then:

* **Default and priority** go where their first token comes soonest, as long
  as that keeps them spread. A continuous-batching engine (vLLM V1, the sim)
  gives each step's token budget to the sequences it admitted earlier first,
  so a prompt arriving behind flex prompts still being prefilled waits for
  their chunks: over one engine's 30 s of default and flex traffic, default
  requests that found no prompt being prefilled had a first token in 15 ms
  (median), those that found 1,000-3,000 prompt tokens still to prefill in
  40 ms. So: of the replicas running at most one more default or priority
  sequence than the fewest do, the one with the fewest prompt tokens sent
  there that have had no output yet (``awaiting_prefill``: this gateway's,
  and with Redis the other gateways', as they last said); ties go where the
  fewest default and priority sequences run, then by free slots.

  The spread comes first for time per output token: flex fills what default
  leaves of each replica's flex room, so a replica with few default
  sequences runs much flex, and a default request there decodes beside many
  flex prefills. Placed by free slots alone, a replica whose flex had just
  ended drew the defaults, which kept its flex from starting again, which
  kept it drawing them: one of four engines ran 146 default requests in
  30 s and another 37, whose time per output token was 18 % worse. Placed by
  prompts still to prefill alone, the replica with the fewest defaults, whose
  flex prompts are the most, would draw none and the same loop would start;
  the bound of one keeps it from starting.

* **Flex** goes where the most slots are free.

* **Packed default** (``default_placement = "pack"``, with several
  replicas, while there is flex): default and priority go only to the
  first replicas in name order that hold them within their flex rooms
  (``default_replicas``), counting every gateway's; among those, where the
  fewest prompt tokens await prefill, without the spread's bound (under it,
  a default went where 5,351 tokens awaited beside a packed replica with
  none, for a first token of 121 ms); flex fills the others, and where
  default is packed or runs it keeps to half its room
  (``policy.pack_reserve``). Spread evenly,
  each default decodes beside the most flex: a replica's room less the
  defaults there (docs/scheduler.md, "Packed default").

Ties left go to the replica whose engine says it runs and queues the fewest
sequences (other gateways' included, where they share it), not to the first
listed: every gateway of a fleet would otherwise send its work to the same
engines first.

A gateway sees only its own runs, except for the prompts other gateways
say they have awaiting prefill on a replica (``shared/prefills.py``): in a
fleet of three without them, a third of the default requests went where
another engine had less waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flexserve.scheduler.policy import (
    SchedulerConfig,
    can_admit,
    default_runs,
    engine_default_runs,
    engine_flex_room,
    headroom_slots,
)
from flexserve.scheduler.replicas import ModelPool, Replica
from flexserve.tiers import ServiceTier

# Default and priority sequences a replica may run beyond the fewest any
# candidate runs and still be chosen for where a first token comes soonest.
DEFAULT_SPREAD = 1
# Packed default: prompt tokens awaiting prefill on every packed replica
# past which a default goes to the next replica instead, if half as many or
# fewer await there (2,048 tokens: 44 ms of an H100's prefill; one engine's
# defaults behind 3,000 or more had a TTFT of 72-100 ms, docs/benchmarks.md).
PACKED_PREFILL_AHEAD = 2048


def pick_replica(config: SchedulerConfig, pool: ModelPool, tier: ServiceTier, now: float) -> Replica | None:
    """The replica a request of ``tier`` goes to now; None if none admits it."""
    candidates = [replica for replica in pool.replicas if can_admit(config, replica, tier, now)]
    if not candidates:
        return None
    if not config.tiers_enabled or tier.is_preemptible:
        return max(candidates, key=lambda r: (r.free_slots, -engine_load(r)))
    if config.default_placement == "pack":
        mark_default_replicas(config, pool, now)
    if config.default_placement == "pack" and len(pool.replicas) > 1 and flex_present(pool):
        packed = [replica for replica in candidates if replica.default_packed]
        others = [replica for replica in candidates if not replica.default_packed]
        if not packed and any(r.default_packed and r.lease_pending for r in pool.replicas):
            # A packed replica's lease is being renewed: the answer, in
            # milliseconds, dispatches it there. Answers come replica by
            # replica, and the first to come would otherwise take it.
            return None
        # None has a slot for it, or every one has a long prefill ahead of
        # it and the next has far less: the next in the same order, where
        # the other gateways' overflow goes too.
        following = min(others, key=lambda r: r.name, default=None)
        ahead = min((awaiting_prefill(replica) for replica in packed), default=0)
        if following is not None and (not packed or (ahead > PACKED_PREFILL_AHEAD
                                                      and awaiting_prefill(following) * 2 <= ahead)):
            packed = [following]
        # Among the packed, where its first token comes soonest, however
        # the defaults fall: the reserve keeps flex to half of each room, so
        # the one with fewer defaults cannot fill with flex and draw none.
        return soonest_first_token(packed, engine_default_runs)
    fewest = min(default_runs(replica) for replica in candidates)
    spread = [replica for replica in candidates if default_runs(replica) <= fewest + DEFAULT_SPREAD]
    return soonest_first_token(spread, default_runs)


def soonest_first_token(replicas: list[Replica], runs: Callable[[Replica], int]) -> Replica:
    """Of ``replicas``, where a default's first token comes soonest: the
    fewest prompt tokens awaiting prefill; then the fewest default runs as
    ``runs`` counts them, the most free slots, the least engine load."""
    return max(replicas, key=lambda r: (-awaiting_prefill(r), -runs(r), r.free_slots, -engine_load(r)))


def flex_present(pool: ModelPool) -> bool:
    """Whether this gateway has flex or batch work running or waiting for the
    model: without any, default is spread (there is nothing to keep it from)."""
    return any(pool.num_in_flight_of(tier) or pool.queue.num_waiting(tier)
               for tier in (ServiceTier.FLEX, ServiceTier.BATCH))


def mark_default_replicas(config: SchedulerConfig, pool: ModelPool, now: float) -> None:
    """Mark the replicas default is packed onto (``Replica.default_packed``,
    as of ``now``), in a pool of several (one replica has nowhere else to
    put flex)."""
    several = len(pool.replicas) > 1
    packed = default_replicas(config, pool) if several else []
    for replica in pool.replicas:
        replica.packs_default = several
        replica.default_packed = replica in packed
        if replica.default_packed:
            replica.default_packed_at = now


def default_replicas(config: SchedulerConfig, pool: ModelPool) -> list[Replica]:
    """The replicas default is packed onto: the first of the pool's replicas
    (in the order of their names, the same on every gateway) whose flex rooms
    hold the default and priority sequences running and one more. The count
    rises at once and falls only when one fewer would hold them with a
    headroom to spare, so that a replica is not taken in and out of default
    work at every arrival."""
    ordered = sorted((r for r in pool.replicas if r.healthy), key=lambda r: r.name)
    if not ordered:
        return []
    room = max(1, min(engine_flex_room(config, r) for r in ordered))
    margin = headroom_slots(config, max(r.full_capacity for r in ordered))
    wanted = sum(engine_default_runs(r) for r in pool.replicas) + 1
    needed = min(len(ordered), math.ceil(wanted / room))
    count = min(len(ordered), max(1, pool.num_default_replicas))
    if needed > count:
        count = needed
    elif count > 1 and wanted <= (count - 1) * room - margin:
        count -= 1
    pool.num_default_replicas = count
    return ordered[:count]


def unprefilled_tokens(replica: Replica) -> int:
    """Prompt tokens of the runs this gateway has on the replica that have
    had no output yet: the prefill a prompt sent there now would queue behind."""
    return sum(run.prompt_tokens for run in replica.running if run.num_output == 0 and not run.preempted)


def own_counts(replica: Replica) -> tuple[int, int]:
    """What this gateway tells the others of the replica (``shared/prefills.py``):
    its prompt tokens awaiting prefill there and its default runs."""
    return unprefilled_tokens(replica), default_runs(replica)


def awaiting_prefill(replica: Replica) -> int:
    """Prompt tokens sent to the replica that have had no output yet: this
    gateway's and, as they last said, the other gateways'."""
    return unprefilled_tokens(replica) + replica.others_unprefilled


def engine_load(replica: Replica) -> int:
    """Sequences the replica's engine said it runs or queues, at its last reading."""
    return replica.load.num_running + replica.load.num_waiting
