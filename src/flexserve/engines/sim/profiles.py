"""Performance profiles of the simulated engine.

A profile holds the constants of the step-time model and the capacity
limits of one GPU replica. Two cost models (``COST_MODELS``):

- ``flat``: ``t_step = t0 + a * max(0, step_tokens - 128) + c * sum(KV held)``:
  the first 128 tokens of a step are free;
- ``calibrated``: the same, but a step's first 128 tokens cost what Vidur
  measured: ``t1`` for one token, rising linearly to ``t128`` at 128, then
  ``a`` per token beyond: ``t1 + (t128 - t1) * (min(n, 128) - 1) / 127``.

The figures come from ``reference/engine-calibration.md`` (Vidur's profiling
data for the linear terms, the HBM bandwidth bound for the attention term).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from flexserve.engines.base import StepTimeModel

CostModel = Literal["flat", "calibrated"]
COST_MODELS: tuple[CostModel, ...] = ("flat", "calibrated")


@dataclass(frozen=True, slots=True)
class SimProfile:
    """One simulated replica: a model on a GPU, as the step-time model sees it."""

    # Short name used on the command line ("h100-llama3-8b").
    name: str
    # Model id served; always contains "sim" so nobody mistakes it for a real model.
    model_id: str
    # Seconds per step for up to 128 tokens: the weight-read floor plus overheads (flat).
    t0: float
    # Seconds per token in a step beyond the first 128 (the compute-bound slope).
    a: float
    # Seconds per KV-cache token held by the batch, per step (attention reads).
    c: float
    # Per-step token budget shared by decodes (1 each) and prefill chunks.
    max_num_batched_tokens: int
    # KV-cache capacity in tokens; past it the newest, lowest-priority sequence is preempted.
    kv_tokens: int
    # Longest prompt plus completion one sequence may have, in tokens.
    max_model_len: int
    # Width of an embedding vector: the hidden size of Llama-3-8B, which is what
    # vLLM's pooling of this model returns. `dimensions` may ask for fewer.
    embedding_dim: int = 4096
    # Seconds a step of one token, and of 128 tokens, takes (calibrated); 0: t0.
    t1: float = 0.0
    t128: float = 0.0

    @property
    def instant(self) -> bool:
        """True when steps take no time: the engine then answers at once."""
        return self.t0 == 0.0 and self.a == 0.0 and self.c == 0.0


H100_LLAMA3_8B = SimProfile(
    name="h100-llama3-8b",
    model_id="llama3-8b-sim-h100",
    # Vidur MLP time at 1-128 tokens on H100 is 5.6-6.4 ms.
    t0=0.006,
    # Prefill at about 47k tokens/s (Vidur: 2,048 tokens in 40.3 ms).
    a=1 / 47_000,
    # 131 KB per KV token read at about 3 TB/s.
    c=4.4e-8,
    # vLLM's OpenAI server default on H100-class GPUs.
    max_num_batched_tokens=8192,
    # (80 GB x 0.9 - 16 GB of weights) / 131 KB per token.
    kv_tokens=420_000,
    # Llama-3-8B's context window.
    max_model_len=8192,
    # Vidur, H100: 5.6 ms for 1 token, 6.4 ms for 128.
    t1=0.0056,
    t128=0.0064,
)

A100_LLAMA3_8B = SimProfile(
    name="a100-llama3-8b",
    model_id="llama3-8b-sim-a100",
    # Vidur MLP time for one token on A100 with Llama-3-8B.
    t0=0.0097,
    # Vidur slope: (142 - 13.2) ms / (2048 - 128) tokens = 67 us/token, and
    # (543 - 13.2) ms / (8192 - 128) = 66 us/token; both round to 1/15,000 s.
    a=1 / 15_000,
    # 131 KB per KV token read at about 2 TB/s (A100-80GB).
    c=6.5e-8,
    # vLLM's OpenAI server default on A100.
    max_num_batched_tokens=2048,
    # About 30 GB of KV at 131 KB per token. Plain arithmetic gives ~150k tokens
    # on an A100-40GB ((40 x 0.9 - 16) GB) and ~420k on an A100-80GB; 230k is a
    # deliberately conservative 80GB figure (memory shared with CUDA graphs,
    # activations and other tenants). Override with --kv-tokens.
    kv_tokens=230_000,
    # Llama-3-8B's context window.
    max_model_len=8192,
    # Vidur, A100: 9.7 ms for 1 token, 13.2 ms for 128.
    t1=0.0097,
    t128=0.0132,
)

INSTANT = SimProfile(
    name="instant",
    model_id="sim-instant",
    # No time at all: for measuring a gateway's own overhead.
    t0=0.0,
    # No per-token cost.
    a=0.0,
    # No attention cost.
    c=0.0,
    # Unused by the instant path; kept like H100 so limits read the same.
    max_num_batched_tokens=8192,
    # Unused by the instant path; kept like H100.
    kv_tokens=420_000,
    # Same context as the other profiles so prompts are judged alike.
    max_model_len=8192,
    # A common embedding model's width (BGE-large, E5-large): answers small
    # enough that measuring a gateway's overhead on embeddings measures the gateway.
    embedding_dim=1024,
)

# Read-only so that no caller can swap a profile out from under another.
PROFILES: Mapping[str, SimProfile] = MappingProxyType(
    {p.name: p for p in (H100_LLAMA3_8B, A100_LLAMA3_8B, INSTANT)}
)


def step_model(profile: SimProfile, cost_model: str = "flat") -> StepTimeModel:
    """The profile's step-time model under ``cost_model`` (the formula is
    ``StepTimeModel.step_time``'s, the same the gateway predicts with)."""
    if cost_model == "calibrated" and profile.t128:
        return StepTimeModel(profile.t0, profile.a, profile.c, profile.t1, profile.t128)
    return StepTimeModel(profile.t0, profile.a, profile.c)


def step_time(profile: SimProfile, step_tokens: int, kv_held: int,
              cost_model: CostModel = "flat") -> float:
    """Seconds one engine step takes.

    ``step_tokens`` counts decodes (1 each) plus prefill chunk tokens;
    ``kv_held`` is the KV-cache tokens of the sequences in the step.
    """
    return step_model(profile, cost_model).step_time(step_tokens, kv_held)
