"""The sim engine's latency records and their Prometheus text under vLLM's names.

The model keeps plain-count histograms (cheaper to observe on every token than
prometheus_client's locked ones, and owned by the model instance rather than a
global registry); the server renders them, with the live gauges and counters,
as Prometheus text that ``prometheus_client.parser`` reads back.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexserve.engines.sim.model import SimModel

__all__ = ["Histogram", "render_metrics"]

# Bucket bounds in seconds (TTFT, inter-token) and tokens (per step), close to vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Finer than vLLM's below 10 ms, where simulated H100 decode steps fall.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Histogram:
    """A Prometheus-style histogram kept as plain counts, cheap to observe."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        # One count per bound plus the +Inf bucket; not cumulative.
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, the last one for +Inf (Prometheus' ``le``)."""
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


def render_metrics(model: SimModel) -> str:
    """Prometheus text exposition under vLLM's metric names and labels (an
    ``engine`` index and the ``model_name``)."""
    escaped = model.model_id.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    label = f'engine="0",model_name="{escaped}"'
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    def gauge(name: str, help_text: str, value: float) -> None:
        family(name, "gauge", help_text)
        out.append(f"{name}{{{label}}} {value}")

    def counter(name: str, help_text: str, value: float) -> None:
        # Declared with the _total suffix, as prometheus_client writes counters.
        family(f"{name}_total", "counter", help_text)
        out.append(f"{name}_total{{{label}}} {value}")

    def histogram(name: str, help_text: str, hist: Histogram) -> None:
        family(name, "histogram", help_text)
        bounds = [repr(float(b)) for b in hist.buckets] + ["+Inf"]
        for le, count in zip(bounds, hist.cumulative(), strict=True):
            out.append(f'{name}_bucket{{{label},le="{le}"}} {count}')
        out.append(f"{name}_sum{{{label}}} {hist.sum}")
        out.append(f"{name}_count{{{label}}} {hist.count}")

    gauge("vllm:num_requests_running", "Requests in the running batch.", model.num_running)
    gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", model.num_waiting)
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means full.", model.kv_cache_usage)
    counter("vllm:num_preemptions", "Preemptions (KV cache full).", model.num_preemptions)
    counter("vllm:prompt_tokens", "Prefill tokens processed.", model.num_prompt_tokens)
    counter("vllm:generation_tokens", "Generation tokens produced.", model.num_generation_tokens)
    # Without prefix caching every prompt token is looked up and none found
    # (vLLM's counters then).
    cache = model.prefix_cache
    counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            model.num_prompt_tokens if cache is None else cache.queries)
    counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
            0 if cache is None else cache.hits)
    histogram("vllm:time_to_first_token_seconds", "Time to first token (simulated seconds).",
              model.ttft)
    histogram("vllm:inter_token_latency_seconds", "Inter-token latency (simulated seconds).",
              model.itl)
    histogram("vllm:iteration_tokens_total", "Tokens per engine step.", model.iteration_tokens)
    out.append("")
    return "\n".join(out)
