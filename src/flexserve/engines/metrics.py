"""Reading an engine's load from its Prometheus ``/metrics`` text.

vLLM names (the sim engine uses the same): ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0–1; older
vLLM called it ``vllm:gpu_cache_usage_perc``). llama.cpp's server says
``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``. Values of
several label sets (one per model) are summed, the KV fraction is the largest.
"""

from __future__ import annotations

import math
import time

from flexserve.engines.base import EngineLoad

_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")


def parse_vllm_load(text: str, now: float | None = None) -> EngineLoad:
    """The load signals in a Prometheus exposition; absent signals stay 0/None."""
    running = waiting = 0.0
    kv: float | None = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name not in _RUNNING and name not in _WAITING and name not in _KV:
            continue
        try:
            value = float(line.rsplit(" ", 1)[-1] if "}" not in line else line.rsplit("}", 1)[1].split()[0])
        except (ValueError, IndexError):
            continue
        if not math.isfinite(value):
            continue
        if name in _RUNNING:
            running += value
        elif name in _WAITING:
            waiting += value
        else:
            kv = value if kv is None else max(kv, value)
    return EngineLoad(
        num_running=int(running),
        num_waiting=int(waiting),
        kv_cache_usage=kv,
        updated_at=time.monotonic() if now is None else now,
    )
