"""Wait estimates for flex: how fast the queue can drain now, not how fast it
moved lately.

A rate of past flex admissions says nothing about a burst that has just
arrived, nor about a cold start with no flex before it. A flex request waits
until enough runs end to make room for it and for everything the fair queue
releases before it, so the estimate is built from what the scheduler knows
at the moment it is asked (``scheduler/drain.py`` reads it off the replicas):

* **Slots.** On each healthy replica flex may hold ``L = capacity − headroom``
  sequences (fewer when a TPOT SLO caps the batch the step-time model allows;
  on engines that pause flex between tokens, no more than decode at once).
  Default and priority take theirs first, so ``S = L − U`` slots serve flex,
  ``U`` being default and priority in flight. While a flex backlog exists,
  flex holds every slot it may, so ``S`` is observed instead: the flex runs
  in flight, which also counts flex admitted in a lull that keeps running
  while default spills into the headroom (not while a preemption's
  cooldown keeps flex off: those pauses are counted apart, below). Either
  way ``S`` is smoothed at every load reading, over 2 s while flex waits
  and 6 s otherwise: the count jumps with every arrival and departure, a
  momentary default peak must not read as "flex never runs again", and
  what matters to a drain is default's share averaged over it. A replica
  backing off offers its slots only once its pause is over.
* **Service time** ``T``: how long a flex run holds its slot. Where the
  engine has a step-time model (``Engine.step_time_model``): prefill
  ``a·p`` plus ``o`` decode steps at the batch the replica runs with a flex
  backlog, scaled by the replica's observed/predicted TPOT, for the mean
  prompt ``p`` and output limit ``o`` of the queued flex work. Without one, a
  prior of ``PRIOR_TPOT`` seconds per output token. Either way it is
  multiplied by a correction learned from flex runs as they finish
  (``ServiceCalibration``: the mean of log(observed / predicted), which the
  first completions set at once and later ones move with a weight of at
  least 5 %), and which also absorbs outputs that stop before their limit.
  Until a flex run has finished, the same correction learned from default
  runs (the first 20, then one in 16) stands in for it: the model's bias on
  these engines, known before a cold burst (its spread stays the prior's).
  Once flex runs stream (a few deltas each), their own pace replaces both
  until the first ends: their mean time to a first delta plus the output at
  their mean seconds per delta (``drain.py``). Default runs' correction was
  0.31 of the flat prior on the sim engine, flex's in a full batch 0.5–0.6.
* **Timeline.** Each flex slot frees when its current run ends or now if it
  is empty, and after that every ``T`` seconds. A run ends when its
  predicted service time less the time it has run says, and, once it has
  streamed a few deltas, when its own pace says (the deltas left of its
  output limit at its seconds per delta so far): the two weighted by the
  share of its output streamed (``drain.remaining_seconds``). The request with ``j`` requests ahead of it starts
  at ``f[j mod S] + ⌊j / S⌋·T``, ``f`` being the slots' free times in order.
  With a TPOT SLO, starts are also no closer than the prefill budget allows.
* **Preemption.** A preemption keeps flex off its replica for
  ``preempt_cooldown`` seconds. The rate of such pauses while flex waits
  (averaged over a minute of backlog) gives the share of time lost, which
  lengthens ``T`` by ``1 / (1 − share)``; their number over a wait is
  Poisson, which widens the spread. Before any backlog has been seen (a
  cold burst) nothing is known of them, and none are counted on.
* **What flex was seen to get.** While flex waits, the output tokens its
  runs generate per second (counted as they come, averaged over
  ``THROUGHPUT_WINDOW`` seconds of backlog) are what the engines give it
  beside default. Once measured, the drain is that: ``S`` slots each
  restart every ``S·o'/R`` seconds, ``R`` that rate and ``o'`` the queued
  work's output limit times the share of it runs were seen to generate.
  The step-time model alone misses what a full flex backlog costs (every
  start's prompt shares the steps of every run), and a calibration learned
  under light flex carries over to a heavy burst (or, the other way, runs
  long: a floor alone left estimates after a trickle too long).
* **Position** ``j``. Under deficit round robin (``scheduler/fairness.py``) a
  request from an organization with ``q`` tokens queued needs
  ``r = ⌈(q + c) / quantum⌉`` turns, in which every other organization
  releases at most ``r·quantum`` tokens: an organization with little queued
  goes almost first, one with a large backlog waits behind its own. The
  tokens ahead divided by the mean cost of a queued request give ``j``;
  default and priority waiting are added (they go first). Places held for
  refused requests (``holds.py``) count among the tokens ahead when their
  clients are due back before the request would start.
* **Spread.** p50 is the timeline at the median service time. p10 and p90
  are ``p50·exp(∓1.28·σ)`` with ``σ² = σ_scale² + σ_run² / n + σ_slots²``:
  the uncertainty of the learned correction (a prior that shrinks as runs
  are observed), the spread of single runs averaged over the ``n`` runs per
  slot that must end first, the Poisson spread of default's share of the
  slots (``√U / S``), and that of the preemption pauses over the wait.

The estimate is ``None`` only when nothing can be said: no healthy replica,
or default and priority hold every slot flex could use even when smoothed.

Decisions made from it:

* **Refusal on arrival** only when even the optimistic p10 is past the
  request's deadline: a burst is judged on how fast it will drain, and no
  request that would likely have started in time is turned away.
* **Retry-After** for a request refused with deadline ``D``: its place in
  the queue is held until it comes back (``holds.py``), so the queue it
  finds is the part of the drain ahead of that place, not a new backlog.
  It starts within ``D`` with 90 % probability once ``τ = p90 − D`` seconds
  have passed, p90 being the estimated wait of its place. The margin:
  Retry-After is later than needed by at most ``p90`` less the real wait,
  about ``p90 − p50`` (plus the rounding up to whole seconds), and never
  earlier than 1 s. Clients refused together hold successive places, each
  at least one start of the drain (``T/S`` seconds) behind the one before,
  so they come back at the pace room appears rather than all at once —
  even when the timeline has many slots freeing at one moment, as after a
  burst started together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# z of the 90th percentile of a normal distribution.
Z90 = 1.2816
# Seconds per output token assumed for engines without a step-time model,
# until flex runs have been observed (50 tokens/s per sequence: a busy GPU
# replica of a small model; its wide spread keeps refusals on it rare).
PRIOR_TPOT = 0.02
# Prior spread (log sd) of the service-time correction: the step-time model
# is calibrated; a per-token guess for an unknown engine is not.
PRIOR_SIGMA_MODEL = 0.35
PRIOR_SIGMA_GUESS = 1.0
# Spread the correction keeps however many runs were seen: load drifts.
_SIGMA_DRIFT = 0.05
# Most weight one observation keeps once many were seen.
_MIN_WEIGHT = 0.05
# Seconds of smoothing of the number of slots that serve flex: as observed
# while flex waits, and as the rule says when nothing waits (default's count
# swings more than the flex it leaves room for, averaged over a drain).
SLOT_SMOOTHING = 2.0
RULE_SMOOTHING = 6.0
# Seconds of flex backlog over which the rate of preemptions is averaged.
PREEMPTION_WINDOW = 60.0
# Seconds of flex backlog over which the output flex gets is averaged; a
# backlog this long is needed before that rate bounds the drain.
THROUGHPUT_WINDOW = 15.0
# Most of a replica's time preemption cooldowns are taken to keep flex out.
_MAX_STALL = 0.5
# Until flex has run, default runs timed for the cold-start prior: the first
# ones, then one in PRIOR_SAMPLE (enough to follow drift, where timing every
# one would cost each default request on a deployment that never sees flex).
PRIOR_RUNS = 20
PRIOR_SAMPLE = 16


@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """Seconds until a flex request starts: median and 10th/90th percentiles."""

    p10: float
    p50: float
    p90: float
    # Log sd of the wait (p90 = p50·e^{1.28σ}).
    sigma: float = 0.0


NO_WAIT = WaitEstimate(0.0, 0.0, 0.0)


class ServiceCalibration:
    """What flex runs are seen to take, as a factor on what was predicted:
    the mean of log(observed / predicted) — a plain mean over the first
    runs, so the first completions replace the prior at once, then
    exponentially weighted to follow drift — and the spread around it."""

    __slots__ = ("log_scale", "num_observed", "variance")

    def __init__(self) -> None:
        self.log_scale = 0.0
        self.variance = 0.0
        self.num_observed = 0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def observe(self, observed: float, predicted: float) -> None:
        if observed <= 0 or predicted <= 0:
            return
        deviation = math.log(observed / predicted) - self.log_scale
        weight = max(1.0 / (self.num_observed + 1), _MIN_WEIGHT)
        self.log_scale += weight * deviation
        self.variance = (1 - weight) * (self.variance + weight * deviation * deviation)
        self.num_observed += 1

    def sigma_run(self, guessed: bool) -> float:
        """Spread of single runs (log sd): the prior's, giving way to what is observed."""
        prior = PRIOR_SIGMA_GUESS if guessed else PRIOR_SIGMA_MODEL
        seen = min(self.num_observed, round(1 / _MIN_WEIGHT))
        return math.sqrt((prior * prior + seen * self.variance) / (1 + seen))

    def sigma_scale(self, guessed: bool) -> float:
        """Uncertainty of the correction itself (log sd)."""
        prior = PRIOR_SIGMA_GUESS if guessed else PRIOR_SIGMA_MODEL
        return math.sqrt(prior * prior / (1 + self.num_observed) + _SIGMA_DRIFT**2)


class DrainTimeline:
    """When each place in the flex queue starts, as of one moment."""

    __slots__ = (
        "_free_at", "_min_interval", "_num_free", "_sigma_fixed", "_sigma_run", "_stall_rate",
        "_stall_seconds", "period",
    )

    def __init__(
        self, free_at: list[float], period: float, *, min_interval: float = 0.0,
        sigma_scale: float = 0.0, sigma_run: float = 0.0, sigma_slots: float = 0.0,
        stall_rate: float = 0.0, stall_seconds: float = 0.0,
    ) -> None:
        self._free_at = sorted(free_at)
        # Seconds between successive starts on one slot (the service time).
        self.period = period
        self._min_interval = min_interval
        self._num_free = sum(1 for t in self._free_at if t <= 0)
        self._sigma_fixed = sigma_scale**2 + sigma_slots**2
        self._sigma_run = sigma_run
        # Pauses of flex (preemption cooldowns) per second, and seconds each, per replica.
        self._stall_rate = stall_rate
        self._stall_seconds = stall_seconds

    @property
    def num_slots(self) -> int:
        return len(self._free_at)

    def wait(self, num_ahead: int) -> WaitEstimate | None:
        """The wait of a request with ``num_ahead`` requests released before it."""
        num_slots = len(self._free_at)
        if num_slots == 0:
            return None
        num_ahead = max(0, num_ahead)
        paced = num_ahead * self._min_interval
        if num_ahead < self._num_free and paced <= 0:
            return NO_WAIT
        cycles, index = divmod(num_ahead, num_slots)
        first = self._free_at[index]
        p50 = max(first + cycles * self.period, paced)
        if p50 <= 0:
            return NO_WAIT
        num_runs = cycles + (1 if first > 0 else 0)
        variance = self._sigma_fixed + self._sigma_run**2 / max(1, num_runs)
        # A Poisson number of pauses over the wait: its share of the wait varies.
        variance += self._stall_rate * p50 * self._stall_seconds**2 / (p50 * p50)
        sigma = math.sqrt(variance)
        spread = math.exp(Z90 * sigma)
        return WaitEstimate(p50 / spread, p50, p50 * spread, sigma)

    def place(self, num_ahead: int) -> WaitEstimate | None:
        """``wait``, drained evenly: no sooner than one start's worth of the
        drain (``period / S``) per request ahead after the first slot frees,
        even where the timeline has several slots freeing at one moment —
        for telling clients refused together when to come back, one by one
        as room appears rather than a slot's worth at a time."""
        own = self.wait(num_ahead)
        if own is None or num_ahead <= 0:
            return own
        even = self._free_at[0] + num_ahead * self.period / len(self._free_at)
        if even <= own.p50:
            return own
        spread = math.exp(Z90 * own.sigma)
        return WaitEstimate(even / spread, even, even * spread, own.sigma)


def retry_after(place: WaitEstimate, wait_limit: float) -> float:
    """Seconds after which a refused request whose held place has this
    estimate starts within its deadline ``wait_limit`` with 90 % probability:
    the place's p90 less the deadline. Never earlier than 1 s."""
    return max(1.0, place.p90 - max(0.0, wait_limit))


class FlexHistory:
    """What a model's wait estimates learn over time."""

    __slots__ = (
        "_backlog_seen_at", "_num_default_runs", "_num_preemptions_seen", "_output_seen",
        "_saturated_output", "_saturated_time", "backlog_seconds",
        "calibration", "num_arrivals", "prior_calibration", "num_outputs", "output_done", "output_share",
        "preemption_rate",
        "saturated_seconds", "typical_cost", "typical_prompt",
    )

    def __init__(self) -> None:
        self.calibration = ServiceCalibration()
        # The same correction learned from runs of other tiers, until flex
        # runs have been seen: the service-time model's bias on these
        # engines, for a cold start (its spread stays the prior's).
        self.prior_calibration = ServiceCalibration()
        self._num_default_runs = 0
        # A typical flex request's expected tokens (for an empty queue) and
        # its prompt tokens: means over the first arrivals, then EWMAs;
        # priors until the first one.
        self.typical_cost = 320.0
        self.typical_prompt = 64.0
        self.num_arrivals = 0
        # Preemption pauses per second while flex waits, the seconds of
        # backlog they were counted over, and what was seen last look.
        self.preemption_rate = 0.0
        self.backlog_seconds = 0.0
        self._backlog_seen_at: float | None = None
        self._num_preemptions_seen = 0
        # Output tokens of flex (and batch) runs, in all, counted as they are
        # generated; their rate while flex waits (what the engines give flex
        # when it wants more than they have) as the tokens and seconds of
        # backlog, each decayed over ``THROUGHPUT_WINDOW`` seconds of backlog;
        # and the seconds of backlog it was measured over.
        self.output_done = 0.0
        self._output_seen = 0.0
        self._saturated_output = 0.0
        self._saturated_time = 0.0
        # What finished runs generated of their output limit (EWMA).
        self.output_share = 1.0
        self.num_outputs = 0
        self.saturated_seconds = 0.0

    def observe_backlog(self, now: float, backlog: bool, num_preemptions: int) -> None:
        """Count preemptions that paused flex on a replica (``num_preemptions``
        so far) over the time flex waits; looked at every load reading."""
        last = self._backlog_seen_at
        if backlog and last is not None and now > last:
            elapsed = now - last
            weight = 1.0 - math.exp(-elapsed / PREEMPTION_WINDOW)
            rate = (num_preemptions - self._num_preemptions_seen) / elapsed
            self.preemption_rate += weight * (rate - self.preemption_rate)
            self.backlog_seconds = min(10 * PREEMPTION_WINDOW, self.backlog_seconds + elapsed)
            # Tokens over seconds, both decayed alike: a mean over the last
            # window of backlog, not swayed by how short a first look was.
            # (An EWMA of each look's rate started from the first: a look of
            # a few ms as a burst began read 0.6x the rate 15 s later.)
            decay = math.exp(-elapsed / THROUGHPUT_WINDOW)
            self._saturated_output = self._saturated_output * decay + (self.output_done - self._output_seen)
            self._saturated_time = self._saturated_time * decay + elapsed
            self.saturated_seconds += elapsed
        self._backlog_seen_at = now
        self._num_preemptions_seen = num_preemptions
        self._output_seen = self.output_done

    def times_default_run(self) -> bool:
        """Whether a default (or priority) run granted now is timed for the
        prior (``prior_calibration``): none once flex runs have been seen."""
        if self.calibration.num_observed:
            return False
        self._num_default_runs += 1
        return self._num_default_runs <= PRIOR_RUNS or self._num_default_runs % PRIOR_SAMPLE == 0

    def observe_output(self, num_tokens: int, expected: int) -> None:
        """A flex (or batch) run finished with ``num_tokens`` output tokens,
        of the ``expected`` (its limit) its cost was counted with. (Its
        tokens were counted in ``output_done`` as they came.)"""
        if expected > 0:
            self.num_outputs += 1
            weight = max(1.0 / self.num_outputs, _MIN_WEIGHT)
            self.output_share += weight * (min(1.0, num_tokens / expected) - self.output_share)

    @property
    def saturated_tps(self) -> float:
        """Output tokens per second flex got while it waited, over about the
        last ``THROUGHPUT_WINDOW`` seconds of backlog (0 before any)."""
        return self._saturated_output / self._saturated_time if self._saturated_time > 0 else 0.0

    def output_rate_cap(self) -> float | None:
        """Output tokens per second flex has been seen to get while it waited
        (None until a backlog has lasted ``THROUGHPUT_WINDOW`` seconds)."""
        tps = self.saturated_tps
        if self.saturated_seconds < THROUGHPUT_WINDOW or tps <= 0:
            return None
        return tps

    def pause_rate(self) -> float:
        """Preemption pauses per second while flex waits. The EWMA starts at
        zero: over the weight it has gathered, it is the mean rate so far —
        counted over no less than a whole window, so that the first pause of
        a backlog a few milliseconds old is not read as hundreds a second."""
        if self.backlog_seconds <= 0:
            return 0.0
        seen = max(self.backlog_seconds, PREEMPTION_WINDOW)
        return self.preemption_rate / (1.0 - math.exp(-seen / PREEMPTION_WINDOW))

    def stall_share(self, cooldown: float, num_replicas: int) -> float:
        """Share of each replica's time preemption cooldowns keep flex off it."""
        if num_replicas <= 0:
            return 0.0
        return min(_MAX_STALL, self.pause_rate() * cooldown / num_replicas)

    def observe_arrival(self, cost_tokens: int, prompt_tokens: int) -> None:
        if cost_tokens > 0:
            self.num_arrivals += 1
            weight = max(1.0 / self.num_arrivals, _MIN_WEIGHT)
            self.typical_cost += weight * (cost_tokens - self.typical_cost)
            prompt = min(prompt_tokens, cost_tokens)
            self.typical_prompt += weight * (prompt - self.typical_prompt)
