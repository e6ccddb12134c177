"""A flex-aware step policy for a continuous-batching engine, as a pure function.

The gateway can only choose *when* a flex request reaches the engine; inside
the engine every step's token budget goes to whatever prompts are pending,
so a flex prompt of 2,000 tokens is prefilled in one long step beside
default's decodes. An engine-side policy can do better: each step, default's
prompts first, and flex's prefill only up to a small per-step budget, and
only in steps where no default prompt is waiting to be prefilled (the idea of
Sarathi-Serve's token budget and of co-location schedulers such as Valve's,
applied by tier).

``prefill_allowance`` decides, for one step, how many prompt tokens each
sequence may prefill, from nothing but the sequences' tier ranks and the
prompt tokens they have left. It imports nothing of any engine, so that the
sim engine (``sim-engine --flex-prefill-budget``) and a vLLM scheduler
plug-in could both call it; docs/scheduler.md says what such a plug-in
would need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["FLEX_PRIORITY", "StepSequence", "prefill_allowance"]

# The `priority` FlexServe's gateway sends with flex (batch: 3; default 1).
FLEX_PRIORITY = 2


class StepSequence(NamedTuple):
    """One sequence as a step sees it."""

    # vLLM's `priority` (lower runs first): FlexServe sends 0 for priority,
    # 1 for default, 2 for flex and 3 for batch.
    priority: int
    # Prompt tokens it has still to prefill (0: it decodes).
    prefill_left: int


def prefill_allowance(sequences: Sequence[StepSequence], token_budget: int, *,
                      flex_priority: int, flex_budget: int) -> list[int]:
    """Prompt tokens each of ``sequences`` (in the engine's order) may prefill
    in one step of ``token_budget`` tokens.

    - Decoding sequences take one token each, first: decodes are never held.
    - Sequences ranked below ``flex_priority`` (priority, default) prefill
      what they have left, in order, while the budget lasts.
    - Sequences at or past ``flex_priority`` (flex, batch) prefill only in a
      step where no higher-ranked sequence has prompt tokens left, and
      together at most ``flex_budget`` tokens (0: as much as the budget allows,
      the engine's usual behaviour).
    """
    left = token_budget - sum(1 for s in sequences if s.prefill_left == 0)
    out = [0] * len(sequences)
    default_pending = False
    for i, seq in enumerate(sequences):
        if seq.prefill_left and seq.priority < flex_priority:
            default_pending = True
            out[i] = max(0, min(seq.prefill_left, left))
            left -= out[i]
    if default_pending:
        return out
    flex_left = min(left, flex_budget) if flex_budget > 0 else left
    for i, seq in enumerate(sequences):
        if seq.prefill_left and seq.priority >= flex_priority and flex_left > 0:
            out[i] = min(seq.prefill_left, flex_left)
            flex_left -= out[i]
    return out
