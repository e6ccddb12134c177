"""The scheduler: tier queues in front of replicas, admission by live load.

The API hands the scheduler a ``Ticket`` and an ``EngineRequest`` and iterates
``Scheduler.stream``. The scheduler:

* queues the request by ``(tier_rank, arrival)`` — flex fairly across
  organizations — and releases it when ``policy.can_admit`` says a replica has
  room for its tier (waiters are woken by futures, never by polling);
* estimates each flex request's wait on arrival from how fast the queue can
  drain now (``estimates.py``), refuses it at once with 429 only when even
  the optimistic end of that estimate is past its deadline, and later when
  the deadline passes (a timer per waiter);
* makes room for default and priority work by preempting flex: on engines that
  pause between tokens (embedded) the newest flex sequences are paused while
  higher tiers need the decode slots; elsewhere the newest flex sequence whose
  output has not reached its client is aborted and requeued at the head of its
  organization's flow, to be run again from scratch (never billed twice: only
  the run that finishes is metered);
* on engines that cache prefixes, may warm a flex prompt into the cache in
  small pieces before sending it (``split_prefill.py``), so that its prefill
  never takes a long engine step beside default's decodes;
* downgrades priority to default once priority holds its share of capacity;
* fails over: a replica that turns a run away before any output (429, 503,
  a failed connection) is offered no work for a while (its own Retry-After,
  or ``replica_backoff``), and the request goes to another replica; with none
  left to try, flex goes back to the head of the queue to wait for one until
  its deadline, and default and priority get 503 with Retry-After. The
  refused attempt yielded nothing, so nothing of it is billed;
* watches health: a replica whose load signals go unread for
  ``replica_silent_after`` seconds is taken as hung: it is offered no work,
  and the runs waiting on it whose output has not reached a client are ended
  and tried elsewhere as if it had turned them away;
* gives the room back however a generation ends, and releases the next waiter.

What happened is written on the ticket (served tier, queue time, preemptions)
for the response, the metrics and the usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from flexserve.engines.base import Delta, Engine, EngineRequest, Feature, NoLoadSignalsError, monotonic_now
from flexserve.errors import (
    EngineOverloadedError,
    EngineTimeoutError,
    EngineUnavailableError,
    FlexServeError,
    ModelNotFoundError,
)
from flexserve.observability.requests import log_decision
from flexserve.scheduler.drain import (
    estimate_for,
    expected_run_seconds,
)
from flexserve.scheduler.estimates import NO_WAIT, WaitEstimate
from flexserve.scheduler.flex_waits import FlexWaits
from flexserve.scheduler.split_prefill import SplitPrefill
from flexserve.scheduler.placement import pick_replica
from flexserve.scheduler.policy import SchedulerConfig, engine_flex_room, flex_runs, predicted_tpot
from flexserve.scheduler.queue import TierQueue, Waiter
from flexserve.scheduler.replicas import ModelPool, Replica, Running, SlotAsk, SlotLease
from flexserve.tiers import ServiceTier

log = logging.getLogger(__name__)


class _Preempted(Exception):
    """Internal: the run was aborted to make room; requeue it."""


class _ReplicaHung(Exception):
    """Internal: the run was ended because its replica stopped answering."""


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's passage through the scheduler."""

    request_id: str
    model: str
    # The tier the request asked for, after `auto` was resolved.
    tier: ServiceTier
    org_id: str
    # Expected prompt tokens (the gateway's estimate), for the prefill budget.
    prompt_tokens: int = 0
    # Expected prompt + output tokens, for fair shares and TPOT predictions.
    cost_tokens: int = 0
    stream: bool = False
    # Client's own limit on the flex wait (X-Flex-Max-Wait), seconds.
    max_wait: float | None = None
    # Flex: a hash of the request's body, under which its place in the queue
    # is held if it is refused (``holds.py``); None: no place is kept for it.
    fingerprint: bytes | None = None
    # Flex: the place a status read reported, named by the client
    # (``X-Flex-Place``), as ``flex_waits.place_key`` keys it.
    place: bytes | None = None
    # Filled in by the scheduler:
    served_tier: ServiceTier | None = None
    enqueued_at: float = field(default_factory=monotonic_now)
    admitted_at: float | None = None
    replica_name: str | None = None
    num_preemptions: int = 0
    # time.monotonic() of the first generated token of the run that counts.
    first_token_at: float | None = None
    # Flex: the wait estimated when it arrived (None: none could be made).
    estimated_wait: WaitEstimate | None = None

    @property
    def queue_time(self) -> float:
        if self.admitted_at is None:
            return time.monotonic() - self.enqueued_at
        return self.admitted_at - self.enqueued_at


class Scheduler:
    """Per-model tier queues in front of a set of replicas."""

    def __init__(self, pools: dict[str, ModelPool], config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._pools = pools
        for pool in pools.values():
            pool.queue = TierQueue(
                tiers_enabled=self.config.tiers_enabled, fair_quantum=self.config.fair_quantum
            )
        self.waits = FlexWaits(self.config)
        self._watchers: list[asyncio.Task[None]] = []
        # Per replica backing off: the timer that offers it work again.
        self._backoff_timers: dict[Replica, asyncio.TimerHandle] = {}
        # Told when the prompts this gateway has awaiting prefill on a replica
        # may have changed (a run put there, its first output, its end), to
        # tell other gateways (``shared/prefills.py``).
        self.on_prefill_change: Callable[[Replica], None] | None = None

    @classmethod
    def from_engines(
        cls, engines: list[Engine], config: SchedulerConfig | None = None,
        capacity: dict[Engine, int] | None = None,
    ) -> Scheduler:
        """Group started engines into one pool per model they serve."""
        pools: dict[str, ModelPool] = {}
        for engine in engines:
            replica = Replica(engine, (capacity or {}).get(engine, engine.capacity))
            for card in engine.models():
                pools.setdefault(card.id, ModelPool(card.id, [])).replicas.append(replica)
        return cls(pools, config)

    @property
    def pools(self) -> dict[str, ModelPool]:
        return self._pools

    def replicas(self) -> list[Replica]:
        seen: dict[int, Replica] = {}
        for pool in self._pools.values():
            for replica in pool.replicas:
                seen.setdefault(id(replica), replica)
        return list(seen.values())

    def pool(self, model: str) -> ModelPool:
        try:
            return self._pools[model]
        except KeyError:
            raise ModelNotFoundError(model) from None

    # --- load signals ---------------------------------------------------------

    async def start(self) -> None:
        """Start reading every replica's load signals."""
        for replica in self.replicas():
            self._watchers.append(asyncio.create_task(self._watch_load(replica)))

    async def close(self) -> None:
        for timer in self._backoff_timers.values():
            timer.cancel()
        self._backoff_timers.clear()
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()

    async def _watch_load(self, replica: Replica) -> None:
        """Read ``replica``'s load signals; they are also its health: a replica
        that fails three reads in a row (refused, errors), or is silent for
        ``replica_silent_after`` seconds — no read answered and no output
        from any of its runs (a frozen process answers nothing and refuses
        nothing; a busy one may answer its metrics slowly, but its runs go on
        producing) — is unhealthy until a read succeeds again."""
        pools = self._pools_of(replica)
        silent_after = self.config.replica_silent_after
        heard_at = time.monotonic()
        while True:
            try:
                asked_at = time.monotonic()
                async with asyncio.timeout(silent_after / 2):
                    replica.load = await replica.engine.read_load()
                replica.load_asked_at, replica.load_draw, replica.load_ends = asked_at, random.random(), 0
                heard_at = time.monotonic()
                replica.num_failed_reads = 0
                if not replica.healthy:
                    log.warning("replica %s is healthy again", replica.name)
                replica.healthy = True
            except NoLoadSignalsError:
                # No metrics endpoint (a provider, Ollama): in-flight counts alone,
                # which may admit flex that waited for a first reading.
                replica.has_signals = False
                for pool in pools:
                    self._dispatch(pool)
                return
            except (FlexServeError, TimeoutError) as exc:
                if isinstance(exc, FlexServeError):
                    replica.num_failed_reads += 1  # a slow read counts only as silence
                silent_for = time.monotonic() - max(heard_at, replica.last_output_at)
                if replica.healthy and (replica.num_failed_reads >= 3 or silent_for >= silent_after):
                    reason = exc.message if isinstance(exc, FlexServeError) else "read timed out"
                    log.warning("replica %s unhealthy (no load signals for %.1f s): %s",
                                replica.name, silent_for, reason)
                    replica.healthy = False
                    self._abandon(replica)
            for pool in pools:
                self._dispatch(pool)
                self.waits.shed_hopeless(pool)
            await asyncio.sleep(self.config.scrape_interval)

    def _abandon(self, replica: Replica) -> None:
        """End the runs waiting on a replica that stopped answering, while no
        output of theirs has reached a client, so that they are tried elsewhere
        now rather than when their own timeouts expire (a whole answer, which
        arrives only at its end, has none shorter than ``upstream_timeout``)."""
        for run in replica.running:
            if run.pump is not None and not run.hung and not run.preempted:
                run.hung = True
                run.pump.cancel()

    # --- slots shared with other gateways (flexserve.shared.capacity) ------------

    def slot_demand(self) -> list[SlotAsk]:
        """What this gateway asks of each replica other gateways may send to
        too (``Engine.shared``): all it runs at once and the part flex may
        fill, what this gateway has in flight there, and the slots it wants
        there per organization (its runs, and its share of the requests
        waiting for the models it serves).

        Admission to each such replica is held to what runs now until the
        answer comes back (``lease``): a lease may shrink to what runs, and a
        run admitted meanwhile on the old one would then be past it."""
        waiting = {pool.model: pool.queue.waiting_by_org() for pool in self._pools.values()}
        asks = []
        for replica in self.replicas():
            if not replica.engine.shared:
                continue  # in this process: its own, whoever else shares Redis
            wants: dict[str, int] = {}
            for run in replica.running:
                wants[run.org_id] = wants.get(run.org_id, 0) + 1
            for pool in self._pools_of(replica):
                for org, count in waiting[pool.model].items():
                    wants[org] = wants.get(org, 0) + math.ceil(count / len(pool.replicas))
            full = replica.full_capacity
            asks.append(SlotAsk(replica.name, full, engine_flex_room(self.config, replica),
                                replica.num_in_flight, flex_runs(replica), wants))
            replica.capacity = min(replica.capacity, replica.num_in_flight)
            replica.lease_pending = True
        return asks

    def lease(self, name: str, lease: SlotLease) -> None:
        """This gateway may now run ``lease.slots`` sequences on replica
        ``name``, start flex there below ``lease.flex_room`` of them, and
        meant ``lease.shares`` of them for each organization's work; the
        organizations in ``lease.spread`` ask on other gateways too, and
        their turns in flex and batch are weighed by their share here
        (``turn_weights``)."""
        for replica in self.replicas():
            if replica.name != name:
                continue
            replica.org_shares = lease.shares
            replica.orgs_spread = lease.spread
            replica.capacity = min(lease.slots, replica.full_capacity)
            replica.flex_room = lease.flex_room
            replica.lease_pending = False
            for pool in self._pools_of(replica):
                pool.queue.set_weights(turn_weights(pool.replicas))
                self._dispatch(pool)

    # --- the request path -------------------------------------------------------

    async def stream(self, ticket: Ticket, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        """Admit the ticket, run it, and yield its deltas."""
        pool = self.pool(ticket.model)
        self._maybe_downgrade(pool, ticket)
        requeue = False
        # Replicas that turned this request away, not to be tried again by default work.
        refused_by: list[Replica] = []
        while True:
            run = Running(ticket.served_tier or ticket.tier, ticket.org_id, ticket.cost_tokens,
                          ticket.stream, ticket.prompt_tokens)
            replica = await self._admit(pool, ticket, run, front=requeue)
            run.chunked = request.stream and request.read_whole and replica.engine.stream_interval > 1
            self._balance_decoding(replica)
            request.priority = run.tier.rank
            finished = False
            preemptible = run.tier.is_preemptible
            # Flex (and batch) output is counted as it comes: what flex gets.
            history = pool.flex_history
            abortable = self.config.tiers_enabled and preemptible
            # A non-streamed abortable run is held back until it ends, so that an
            # abort can restart it without the client ever seeing a first attempt.
            held: list[Delta] | None = [] if abortable and not ticket.stream else None
            last: Delta | None = None
            try:
                if self._splits(replica, run, request):
                    split = SplitPrefill(pool, replica, self.config.split_prefill_tokens,
                                         self.config.split_prefill_concurrency)
                    engine_deltas = split.generate(request, run.control)
                else:
                    engine_deltas = replica.engine.generate(request, run.control)
                if abortable or not ticket.stream:
                    deltas = self._pumped(run, engine_deltas)
                else:
                    # A stream can be ended (its replica hung) until its first
                    # output is in the client's hands.
                    deltas = engine_deltas
                    run.pump = asyncio.current_task()
                async for delta in deltas:
                    last = delta
                    if delta.has_output:
                        run.num_output += 1
                        if preemptible:
                            # A chunked run's first delta is one token (an engine
                            # sends the first at once), the rest as its kind showed.
                            counted = replica.delta_tokens(run.chunked) if run.num_output > 1 else 1.0
                            run.tokens_counted += counted
                            history.output_done += counted
                        last_at = replica.last_output_at = run.last_output_at = time.monotonic()
                        if run.num_output == 1:
                            ticket.first_token_at = run.first_output_at = last_at
                            self._prefill_changed(replica)
                    if held is not None:
                        held.append(delta)
                        continue
                    run.delivered = True
                    run.pump = None
                    yield delta
                if last is not None and last.usage is not None:
                    replica.observe_prompt(last.usage.prompt_tokens, ticket.prompt_tokens)
                    if request.stream:
                        # A whole answer is one delta, whatever its length: it
                        # says nothing of how an engine streams.
                        replica.observe_deltas(last.usage.completion_tokens, run.num_output, run.chunked)
                    if preemptible:
                        # What was counted as it came, made exact.
                        history.output_done += last.usage.completion_tokens - run.tokens_counted
                        run.tokens_counted = last.usage.completion_tokens
                finished = True
                if held:
                    run.delivered = True
                    for delta in held:
                        yield delta
                return
            except _Preempted:
                ticket.num_preemptions += 1
                log_decision("preempted", ticket.request_id, org_id=ticket.org_id, model=ticket.model,
                             replica=replica.name, tokens_lost=run.num_output,
                             preemptions=ticket.num_preemptions)
                ticket.first_token_at = None
                requeue = True
            except _ReplicaHung:
                self._hung_up(pool, replica, run, refused_by)
                ticket.first_token_at = None
                requeue = True
            except asyncio.CancelledError:
                if not run.hung or _cancelled_otherwise():
                    raise
                self._hung_up(pool, replica, run, refused_by)
                ticket.first_token_at = None
                requeue = True
            except EngineOverloadedError as exc:
                _name_replica(exc, pool, replica, ticket.request_id)
                if last is not None:
                    raise  # output came first: the run itself failed
                self._turned_away(pool, replica, run, exc, refused_by)
                refused_by.append(replica)
                requeue = True
            except FlexServeError as exc:
                _name_replica(exc, pool, replica, ticket.request_id)
                raise
            finally:
                self._release(pool, replica, run)
                if finished and run.tier is ServiceTier.DEFAULT and run.num_output > 2:
                    # Per token, not per delta: an engine may send several
                    # tokens in one (vLLM's --stream-interval).
                    per_delta = (last.usage.completion_tokens / run.num_output
                                 if last is not None and last.usage is not None else replica.tokens_per_delta)
                    self._calibrate(replica, run, run.seconds_per_delta / max(1.0, per_delta))
                if finished and run.expected_seconds > 0:
                    calibration = history.calibration if preemptible else history.prior_calibration
                    calibration.observe(time.monotonic() - run.granted_at, run.expected_seconds)
                if finished and preemptible:
                    history.observe_output(round(run.tokens_counted), run.cost_tokens - run.prompt_tokens)

    def _splits(self, replica: Replica, run: Running, request: EngineRequest) -> bool:
        """Whether ``run``'s prompt is warmed in pieces first (split_prefill.py):
        flex or batch, a prompt longer than one piece, on a replica that takes
        token-id prompts and has not been found to cache nothing."""
        piece = self.config.split_prefill_tokens
        return (piece > 0 and self.config.tiers_enabled and run.tier.is_preemptible
                and request.op != "embedding" and run.prompt_tokens > piece
                and replica.caches_prefixes is not False
                and Feature.TOKEN_PROMPTS in replica.engine.features)

    async def _pumped(self, run: Running, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """Iterate ``deltas`` so that the scheduler can abort the run.

        While the engine works on the next delta, ``run.pump`` is the task
        iterating this generator: ``_preempt_for`` marks the run preempted and
        cancels that task, which aborts the engine's generation as closing it
        would, and the cancellation becomes ``_Preempted`` here. Between deltas
        ``run.pump`` is None: output in the hands of the caller is not aborted.
        """
        task = asyncio.current_task()
        assert task is not None
        try:
            while True:
                run.pump = task
                try:
                    delta: Delta | None = await deltas.__anext__()
                except StopAsyncIteration:
                    delta = None
                except BaseException:
                    if not (run.preempted or run.hung):
                        raise
                    delta = None  # however the engine took the cancellation
                finally:
                    run.pump = None
                if run.preempted or run.hung:
                    if task.uncancel() > 0:
                        # Cancelled for another reason as well (its client left): that wins.
                        raise asyncio.CancelledError
                    raise _Preempted if run.preempted else _ReplicaHung
                if delta is None:
                    return
                yield delta
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _admit(self, pool: ModelPool, ticket: Ticket, run: Running, *, front: bool = False) -> Replica:
        """Wait for a replica that admits ``run``, which is added to it."""
        tier = run.tier
        if not any(r.healthy for r in pool.replicas):
            raise EngineUnavailableError(f"No healthy replica serves `{ticket.model}` right now.")
        now = time.monotonic()
        held = None
        if tier.is_preemptible and not front:
            held = self.waits.arrive(pool, ticket, now)
        if tier is ServiceTier.FLEX and not front:
            pool.flex_history.observe_arrival(ticket.cost_tokens, ticket.prompt_tokens)
        head = pool.queue.peek()
        if head is None or (front and tier.rank <= head.tier.rank):
            replica = self._pick(pool, tier, now)
            if replica is not None:
                if tier is ServiceTier.FLEX and not front:
                    ticket.estimated_wait = NO_WAIT
                replica.add(run, now)
                self._prefill_changed(replica)
                return self._granted(pool, ticket, replica, run)
        waiter = Waiter(
            tier, ticket.org_id, ticket.cost_tokens, arrival=ticket.enqueued_at, run=run,
            wait_limit=self.waits.deadline(ticket), key=ticket.fingerprint,
            prompt_tokens=min(ticket.prompt_tokens, ticket.cost_tokens), request_id=ticket.request_id,
        )
        in_place = False
        if self.config.tiers_enabled and tier.is_preemptible:
            in_place = self.waits.on_arrival(pool, ticket, waiter, now, front=front, held=held)
        elif tier is ServiceTier.FLEX and not front:
            # Tier-blind: no deadline, but the client is told its wait all the same.
            ticket.estimated_wait = estimate_for(pool, self.config, now, ticket.org_id, ticket.cost_tokens)
        if len(pool.queue) >= self.config.max_queue:
            if tier.is_preemptible:
                raise self.waits.queue_full(pool, ticket, waiter, now)
            raise EngineUnavailableError(f"The queue for `{ticket.model}` is full; retry later.")
        pool.queue.push(waiter, front=front, in_place=in_place)
        if waiter.deadline is not None:
            waiter.timer = asyncio.get_running_loop().call_at(
                waiter.deadline, self.waits.expire, pool, waiter
            )
        # A preemption may be what the head of the queue needs.
        self._dispatch(pool)
        try:
            replica = await waiter.future
        except BaseException:
            pool.queue.remove(waiter)
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Granted at the moment the client left: hand the room on.
                future.result().discard(run)
                self._dispatch(pool)
            raise
        assert isinstance(replica, Replica)
        return self._granted(pool, ticket, replica, run)

    def _granted(self, pool: ModelPool, ticket: Ticket, replica: Replica, run: Running) -> Replica:
        if ticket.admitted_at is None:
            ticket.admitted_at = run.granted_at
        ticket.served_tier = run.tier
        ticket.replica_name = replica.name
        # Until flex runs have been seen, some of default's teach the cold-start prior.
        if run.tier.is_preemptible or pool.flex_history.times_default_run():
            backlog = run.tier.is_preemptible and pool.queue.num_waiting(ServiceTier.FLEX) > 0
            run.expected_seconds = expected_run_seconds(self.config, replica, run, backlog=backlog)
        return replica

    def _prefill_changed(self, replica: Replica) -> None:
        if self.on_prefill_change is not None:
            self.on_prefill_change(replica)

    def _pick(self, pool: ModelPool, tier: ServiceTier, now: float) -> Replica | None:
        """The replica a request of ``tier`` goes to now (``placement.py``)."""
        return pick_replica(self.config, pool, tier, now)

    def _release(self, pool: ModelPool, replica: Replica, run: Running) -> None:
        replica.discard(run)
        self._prefill_changed(replica)
        if run.preempted:
            pool.num_preempting = max(0, pool.num_preempting - 1)
        self._balance_decoding(replica)
        self._dispatch(pool)

    def _dispatch(self, pool: ModelPool) -> None:
        """Release waiters from the head of the queue while replicas admit them;
        preempt flex when higher-tier work is stuck at the head."""
        now = time.monotonic()
        while True:
            waiter = pool.queue.peek()
            if waiter is None:
                return
            if waiter.future.done():
                pool.queue.pop()
                continue
            replica = self._pick(pool, waiter.tier, now)
            if replica is None:
                # Not while a lease is being renewed: its answer, in
                # milliseconds, dispatches again (slot_demand holds admission
                # to what runs until then).
                if (self.config.tiers_enabled and not waiter.tier.is_preemptible
                        and not any(r.lease_pending for r in pool.replicas)):
                    self._preempt_for(pool, now)
                return
            pool.queue.pop()
            # The slot is taken now, before the waiter's task wakes up to use it.
            replica.add(waiter.run, now)
            self._prefill_changed(replica)
            waiter.future.set_result(replica)

    # --- preemption --------------------------------------------------------------

    def _preempt_for(self, pool: ModelPool, now: float) -> None:
        """Abort the newest restartable flex run, unless enough aborts are under way."""
        num_stuck = pool.queue.num_waiting(ServiceTier.PRIORITY) + pool.queue.num_waiting(ServiceTier.DEFAULT)
        if pool.num_preempting >= num_stuck:
            return
        victim: tuple[Replica, Running] | None = None
        for replica in pool.replicas:
            if not replica.healthy:
                continue
            for run in replica.running:
                if run.tier.is_preemptible and not run.preempted and run.can_restart and run.pump:
                    if victim is None or run.started_at > victim[1].started_at:
                        victim = (replica, run)
        if victim is None:
            return
        replica, run = victim
        run.preempted = True
        pool.num_preempting += 1
        pool.num_preemptions += 1
        if now - replica.last_preempted_at >= self.config.preempt_cooldown:
            pool.num_cooldowns += 1
        replica.last_preempted_at = now
        assert run.pump is not None
        run.pump.cancel()

    # --- replicas that turn work away -------------------------------------------------

    def _turned_away(
        self, pool: ModelPool, replica: Replica, run: Running, exc: EngineOverloadedError,
        refused_by: list[Replica],
    ) -> None:
        """``replica`` turned ``run`` away before any output: it gets a pause,
        and the request is tried again unless that is hopeless for its tier.

        Flex goes back to the queue whatever happens, to wait for a replica
        until its deadline, as it waits for capacity. Default and priority are
        refused at once (503 with Retry-After) when every other replica is
        down, pausing, or has refused them already (``refused_by``): waiting
        would only delay the answer the client can act on."""
        now = time.monotonic()
        replica.num_refusals += 1
        pause = min(exc.retry_after or self.config.replica_backoff, self.config.replica_backoff_max)
        self._back_off(replica, now + pause)
        log.info("replica %s turned a request away, paused %.1f s: %s", replica.name, pause, exc.message)
        if not (self.config.tiers_enabled and run.tier.is_preemptible) and (
            replica in refused_by or not any(
                r is not replica and r.healthy and not r.backed_off(now) and r not in refused_by
                for r in pool.replicas
            )
        ):
            retry_after = self.config.replica_backoff if exc.retry_after is None else exc.retry_after
            raise EngineOverloadedError(
                f"No replica of `{pool.model}` can take the request right now ({exc.message}). "
                "Retry later.",
                retry_after=retry_after,
            ) from exc
        pool.num_failovers += 1

    def _hung_up(self, pool: ModelPool, replica: Replica, run: Running, refused_by: list[Replica]) -> None:
        """``run`` was ended because ``replica`` stopped answering: tried
        elsewhere as a refusal when nothing of it reached the caller, else a
        timeout (the stream ends with its error event)."""
        label = _replica_label(pool, replica)
        if run.delivered:
            raise EngineTimeoutError(f"The engine stopped answering mid-request ({label}).")
        self._turned_away(
            pool, replica, run, EngineOverloadedError(f"{label} stopped answering"), refused_by
        )
        refused_by.append(replica)

    def _back_off(self, replica: Replica, until: float) -> None:
        """Offer ``replica`` no work before ``until``, and release the waiters
        it could take then (its load watch may have ended: no signals)."""
        if until <= replica.backoff_until:
            return
        replica.backoff_until = until
        timer = self._backoff_timers.pop(replica, None)
        if timer is not None:
            timer.cancel()
        self._backoff_timers[replica] = asyncio.get_running_loop().call_later(
            until - time.monotonic(), self._backoff_over, replica
        )

    def _backoff_over(self, replica: Replica) -> None:
        del self._backoff_timers[replica]
        left = replica.backoff_until - time.monotonic()
        if left > 0:
            # A loop whose clock counts milliseconds (uvloop) may call a moment
            # early: once more, a tick later.
            self._backoff_timers[replica] = asyncio.get_running_loop().call_later(
                left + 0.001, self._backoff_over, replica
            )
            return
        for pool in self._pools_of(replica):
            self._dispatch(pool)

    def _pools_of(self, replica: Replica) -> list[ModelPool]:
        return [p for p in self._pools.values() if replica in p.replicas]

    def _balance_decoding(self, replica: Replica) -> None:
        """On engines that pause between tokens, pause the newest flex runs while
        default and priority need the engine's decode slots; resume them after."""
        if not replica.engine.supports_pause or not self.config.tiers_enabled:
            return
        runs = [r for r in replica.running if r.tier.is_preemptible and not r.preempted]
        num_urgent = len(replica.running) - len(runs)
        num_flex_running = max(0, replica.engine.max_decoding - num_urgent)
        runs.sort(key=lambda r: r.started_at)
        pools = None
        for index, run in enumerate(runs):
            if index < num_flex_running:
                run.control.resume()
            elif not run.control.paused:
                run.control.pause()
                if pools is None:
                    pools = self._pools_of(replica)
                for pool in pools:
                    pool.num_pauses += 1

    # --- tiers, deadlines and estimates ---------------------------------------------

    def tier_to_serve(self, pool: ModelPool, tier: ServiceTier) -> ServiceTier:
        """The tier a request for ``tier`` is served on if it is queued now:
        default for priority once priority holds its share of the capacity.

        The API asks before its gates, so that a downgraded request is
        rate-limited and budgeted as default, and hands the answer in as
        ``Ticket.served_tier``, which ``stream`` keeps. Nothing between the
        question and the queueing yields to the loop (with local budgets), so
        the answer is still true when the ticket is queued."""
        if tier is not ServiceTier.PRIORITY or not self.config.tiers_enabled:
            return tier
        limit = max(1, math.floor(self.config.priority_share * pool.capacity))
        held = pool.num_in_flight_of(ServiceTier.PRIORITY) + pool.queue.num_waiting(ServiceTier.PRIORITY)
        return ServiceTier.DEFAULT if held >= limit else tier

    def _maybe_downgrade(self, pool: ModelPool, ticket: Ticket) -> None:
        """Decide the served tier unless the caller did (``tier_to_serve``)."""
        if ticket.served_tier is None:
            ticket.served_tier = self.tier_to_serve(pool, ticket.tier)
        if ticket.served_tier is not ticket.tier:
            pool.num_downgraded += 1
            log_decision("priority_downgraded", ticket.request_id, org_id=ticket.org_id, model=ticket.model,
                         requested_tier=ticket.tier.value, served_tier=ticket.served_tier.value)

    def flex_deadline(self, ticket: Ticket) -> float:
        return self.waits.deadline(ticket)

    def estimate_flex_wait(
        self, pool: ModelPool, org_id: str, cost_tokens: int, now: float | None = None
    ) -> WaitEstimate | None:
        """The wait of a flex request from ``org_id`` joining ``pool``'s queue
        now (``estimates.py``); None when nothing can be said."""
        now = time.monotonic() if now is None else now
        return estimate_for(pool, self.config, now, org_id, cost_tokens)

    # --- what clients and operators can see ------------------------------------------

    def flex_status(
        self, *, model: str | None = None, max_wait: float | None = None, org_id: str = "",
        place: str | None = None,
    ) -> list[dict[str, Any]]:
        """Per model (or the one named): spare capacity, flex queue depth, and
        the wait of a flex request sent now by ``org_id`` (behind what that
        organization already has queued or held — asked about one model, its
        other clients' reads hold places too; "": one with nothing queued), judged
        against ``max_wait`` (the client's deadline) or ``flex_max_wait``.
        ``accepting`` means such a request would be queued rather than
        refused at once, by the same rule as admission."""
        pools = sorted(self._pools.items()) if model is None else [(model, self.pool(model))]
        return self.waits.status(
            pools, one_model=model is not None, max_wait=max_wait, org_id=org_id, place=place
        )

    def _calibrate(self, replica: Replica, run: Running, observed_tpot: float) -> None:
        """Learn how this replica's TPOT compares with its step-time model: the
        decode step stretched by the share of time prompts took lately."""
        step = predicted_tpot(
            replica, replica.num_in_flight + 1, replica.tokens_in_flight + run.cost_tokens,
            calibrated=False,
        )
        if step:
            share = replica.prefill.recent_share(time.monotonic())
            replica.observe_tpot(observed_tpot, step / (1.0 - share))


def turn_weights(replicas: list[Replica]) -> dict[str, float]:
    """Weights of the organizations' turns in a pool's flex and batch queues
    where gateways share its replicas: an organization that also asks on
    other gateways gets its share here over the mean share of those that ask
    here only (at most 1); every other organization keeps 1, as on one gateway."""
    shares: dict[str, float] = {}
    spread: set[str] = set()
    for replica in replicas:
        spread |= replica.orgs_spread
        for org, share in replica.org_shares.items():
            shares[org] = shares.get(org, 0.0) + share
    local = [share for org, share in shares.items() if org not in spread] or list(shares.values())
    reference = sum(local) / len(local) if local else 0.0
    if reference <= 0:
        return {}
    return {org: min(1.0, shares[org] / reference) for org in spread if shares.get(org, 0.0) > 0}


def _cancelled_otherwise() -> bool:
    """After a cancellation the scheduler asked for: whether something else
    (the client leaving, the server shutting down) asked for one as well."""
    task = asyncio.current_task()
    return task is None or task.uncancel() > 0


def _replica_label(pool: ModelPool, replica: Replica) -> str:
    """A replica as clients may read of it: never its address."""
    return f"replica {pool.replicas.index(replica) + 1} of `{pool.model}`"


def _name_replica(exc: FlexServeError, pool: ModelPool, replica: Replica, request_id: str) -> None:
    """Say in ``exc``'s message which replica failed, in words a client may
    read; the replica's own name (its address) goes to the log."""
    label = _replica_label(pool, replica)
    log.info("request %s failed on %s (%s): %s", request_id, label, replica.name, exc.message)
    exc.message = f"{exc.message.rstrip('.')} ({label})."
