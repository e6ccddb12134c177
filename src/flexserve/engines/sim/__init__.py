"""The simulated engine: a performance model of a vLLM-style replica.

``SimModel`` is the continuous-batching model itself, ``SimEngine`` runs it in
process behind the Engine interface, and ``server.create_sim_app`` serves it
as an OpenAI-compatible server with vLLM's metric names.
"""

from __future__ import annotations

from flexserve.engines.sim.engine import SimEngine
from flexserve.engines.sim.model import SimModel
from flexserve.engines.sim.profiles import PROFILES, SimProfile, step_time
from flexserve.engines.sim.tokenizer import count_prompt_tokens

__all__ = ["PROFILES", "SimEngine", "SimModel", "SimProfile", "count_prompt_tokens", "step_time"]
