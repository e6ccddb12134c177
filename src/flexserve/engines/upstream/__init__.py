"""Upstream OpenAI-compatible servers as engine replicas.

``engine`` speaks HTTP to the upstream (requests, errors, load signals);
``relay`` turns what it answers into Deltas. ``_relay_sse`` keeps the name
under which tools that measure the relay across versions of this tree
(``bench/hot_path_probe.py``) find it.
"""

from flexserve.engines.upstream.engine import UpstreamEngine
from flexserve.engines.upstream.relay import relay_sse as _relay_sse

__all__ = ["UpstreamEngine", "_relay_sse"]
