"""The gateway's Prometheus metrics, in a registry owned by the app.

Counters and histograms are updated as requests finish; queue depths and
in-flight counts are read from the scheduler at scrape time, so the request
path pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flexserve.scheduler.placement import unprefilled_tokens
from flexserve.scheduler.policy import default_runs
from flexserve.scheduler.scheduler import Scheduler
from flexserve.tiers import ServiceTier

# No `_created` gauge beside every counter and histogram: a series per
# series, of the process's start time, that no dashboard reads.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_WAIT_LIMIT_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 480, 540, 600, 900, 1800, 3600)

# Actual flex wait / the wait estimated on arrival: 0.75-1.25 is "within 25 %".
_WAIT_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 10)

# A wait this close to its estimate (seconds) counts as within 25 % however
# short the estimate: releasing a waiter takes a moment of its own.
FLEX_WAIT_TOLERANCE = 0.1

_M = TypeVar("_M", Counter, Histogram)


class Labelled(Generic[_M]):
    """A labelled metric whose children are found by one plain dict lookup.

    prometheus_client's ``labels()`` turns every value into a string and takes
    a lock on each call: six calls per request cost about 15 µs, a cached
    child about 0.7 µs each (docs/benchmarks.md, "Gateway overhead").
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: _M) -> None:
        self.metric: _M = metric
        # One child per label set, as prometheus_client keeps them: bounded by
        # the models, tiers and outcomes there are.
        self._children: dict[tuple[str, ...], _M] = {}

    def labels(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "flexserve_queue_depth", "Requests waiting in the gateway queue.", labels=["model", "tier"]
        )
        in_flight = GaugeMetricFamily(
            "flexserve_in_flight", "Requests running on engines.", labels=["model", "tier"]
        )
        capacity = GaugeMetricFamily(
            "flexserve_capacity", "Sequences the model's healthy replicas run at once.", labels=["model"]
        )
        events = {
            name: CounterMetricFamily(f"flexserve_{name}", help_text, labels=["model"])
            for name, help_text in (
                ("preemptions", "Flex runs aborted to make room for higher tiers (requeued, never billed)."),
                ("flex_pauses", "Flex runs paused between tokens while higher tiers decoded."),
                ("flex_refused", "Flex requests refused with 429 resource_unavailable."),
                ("priority_downgrades", "Priority requests served (and billed) as default."),
                ("failovers", "Requests a replica turned away (429, 503, no connection), sent elsewhere unbilled."),
                ("split_prefill_runs", "Flex runs whose prompt was warmed into the engine's prefix cache in pieces."),
                ("split_prefill_warmups", "Warm-up requests the gateway sent for split prefill (its own, never billed)."),
                ("split_prefill_warmup_tokens", "Prompt tokens the engine computed for split-prefill warm-ups."),
                ("split_prefill_misses", "Split flex requests that found a warmed piece evicted before using it."),
            )
        }
        spare = GaugeMetricFamily(
            "flexserve_flex_spare_capacity_ratio", "Share (0-1) of the model's slots flex could take now.",
            labels=["model"]
        )
        held = GaugeMetricFamily(
            "flexserve_flex_places_held",
            "Places in the flex queue kept for refused requests until they come back.", labels=["model"]
        )
        now = time.monotonic()
        for model, pool in self._scheduler.pools.items():
            capacity.add_metric([model], pool.capacity)
            pool.holds.expire(now)
            held.add_metric([model], len(pool.holds))
            for tier in ServiceTier:
                depth.add_metric([model, tier.value], pool.queue.num_waiting(tier))
                in_flight.add_metric([model, tier.value], pool.num_in_flight_of(tier))
            events["preemptions"].add_metric([model], pool.num_preemptions)
            events["flex_pauses"].add_metric([model], pool.num_pauses)
            events["flex_refused"].add_metric([model], pool.num_flex_refused)
            events["priority_downgrades"].add_metric([model], pool.num_downgraded)
            events["failovers"].add_metric([model], pool.num_failovers)
            events["split_prefill_runs"].add_metric([model], pool.num_split_runs)
            events["split_prefill_warmups"].add_metric([model], pool.num_warmups)
            events["split_prefill_warmup_tokens"].add_metric([model], pool.num_warmup_tokens)
            events["split_prefill_misses"].add_metric([model], pool.num_split_misses)
        for entry in self._scheduler.flex_status():
            spare.add_metric([entry["model"]], entry["spare_capacity"])
        load = {
            name: GaugeMetricFamily(f"flexserve_engine_{name}", help_text, labels=["replica"])
            for name, help_text in (
                ("running", "Requests the engine reports running."),
                ("waiting", "Requests the engine reports waiting in its own queue."),
                ("kv_cache_usage_ratio", "Engine KV-cache use, 0-1 (absent when not reported)."),
                ("healthy", "1 while the replica answers its load probe."),
            )
        }
        awaiting = GaugeMetricFamily(
            "flexserve_engine_prompt_tokens_awaiting_prefill",
            "Prompt tokens sent to the replica that have had no output yet: this gateway's "
            "(sent_by=this_gateway) and, with redis, the others' as they last said (other_gateways).",
            labels=["replica", "sent_by"],
        )
        defaults = GaugeMetricFamily(
            "flexserve_engine_default_runs",
            "Default and priority sequences on the replica: this gateway's (sent_by=this_gateway) "
            "and, with redis, the others' as they last said (other_gateways).",
            labels=["replica", "sent_by"],
        )
        for replica in self._scheduler.replicas():
            awaiting.add_metric([replica.name, "this_gateway"], unprefilled_tokens(replica))
            awaiting.add_metric([replica.name, "other_gateways"], replica.others_unprefilled)
            defaults.add_metric([replica.name, "this_gateway"], default_runs(replica))
            defaults.add_metric([replica.name, "other_gateways"], replica.others_default_runs)
            load["running"].add_metric([replica.name], replica.load.num_running)
            load["waiting"].add_metric([replica.name], replica.load.num_waiting)
            if replica.load.kv_cache_usage is not None:
                load["kv_cache_usage_ratio"].add_metric([replica.name], replica.load.kv_cache_usage)
            load["healthy"].add_metric([replica.name], 1 if replica.healthy else 0)
        yield depth
        yield in_flight
        yield capacity
        yield spare
        yield held
        yield from events.values()
        yield from load.values()
        yield awaiting
        yield defaults


class GatewayMetrics:
    def __init__(self, scheduler: Scheduler, connections: Collector | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Labelled(Counter(
            "flexserve_requests",
            "Inference requests by model, served tier and outcome.",
            ["model", "tier", "status"],
            registry=self.registry,
        ))
        self.tokens = Labelled(Counter(
            "flexserve_tokens",
            "Tokens processed, by model, served tier and kind (prompt or completion).",
            ["model", "tier", "kind"],
            registry=self.registry,
        ))
        self.latency = Labelled(Histogram(
            "flexserve_request_duration_seconds",
            "Time from arrival to the last byte, by served tier.",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ))
        self.ttft = Labelled(Histogram(
            "flexserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token, by served tier.",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ))
        self.queue_time = Labelled(Histogram(
            "flexserve_queue_time_seconds",
            "Time spent waiting in the gateway queue, by tier.",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        ))
        self.flex_wait_limit = Histogram(
            "flexserve_flex_wait_limit_seconds",
            "Longest each flex request was allowed to wait in the queue: flex_max_wait, "
            "shortened by X-Flex-Max-Wait or by the client's own timeout.",
            buckets=_WAIT_LIMIT_BUCKETS,
            registry=self.registry,
        )
        self.flex_estimate_measured = Labelled(Counter(
            "flexserve_flex_estimate_measured",
            "Flex requests served whose wait was estimated on arrival.",
            ["model"],
            registry=self.registry,
        ))
        self.flex_estimate_within = Labelled(Counter(
            "flexserve_flex_estimate_within_25pct",
            "Of those, the ones whose actual wait was within 25 % of the estimate "
            f"(or within {FLEX_WAIT_TOLERANCE} s of it).",
            ["model"],
            registry=self.registry,
        ))
        self.flex_wait_ratio = Labelled(Histogram(
            "flexserve_flex_wait_ratio",
            "Actual flex wait / the wait estimated on arrival (estimates above zero).",
            ["model"],
            buckets=_WAIT_RATIO_BUCKETS,
            registry=self.registry,
        ))
        self.flex_wait_over = Labelled(Counter(
            "flexserve_flex_wait_over_estimate_seconds",
            "Sum of the seconds flex waited beyond its estimate (bias: over - under, "
            "per request measured).",
            ["model"],
            registry=self.registry,
        ))
        self.flex_wait_under = Labelled(Counter(
            "flexserve_flex_wait_under_estimate_seconds",
            "Sum of the seconds flex waited less than its estimate.",
            ["model"],
            registry=self.registry,
        ))
        self.registry.register(_SchedulerCollector(scheduler))
        if connections is not None:
            self.registry.register(connections)

    def observe_flex_wait(self, model: str, estimate: float, actual: float) -> None:
        """How the wait a flex request was told on arrival compared with its wait."""
        self.flex_estimate_measured.labels(model).inc()
        error = actual - estimate
        if abs(error) <= max(0.25 * estimate, FLEX_WAIT_TOLERANCE):
            self.flex_estimate_within.labels(model).inc()
        if estimate > 0:
            self.flex_wait_ratio.labels(model).observe(actual / estimate)
        (self.flex_wait_over if error > 0 else self.flex_wait_under).labels(model).inc(abs(error))

    def render(self) -> bytes:
        return generate_latest(self.registry)
