"""The flex-aware step policy (engines/step_policy.py) on scripted steps, and
the sim engine stepping by it: default's prompts first, flex's prefill only
in steps where none is pending, at most its budget a step."""

from __future__ import annotations

import asyncio

import pytest

from flexserve.engines.base import EngineRequest
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.metrics import ITERATION_TOKENS_BUCKETS
from flexserve.engines.step_policy import FLEX_PRIORITY, StepSequence, prefill_allowance

DEFAULT, FLEX = 1, FLEX_PRIORITY


def allow(seqs: list[tuple[int, int]], budget: int = 8192, flex_budget: int = 64) -> list[int]:
    return prefill_allowance([StepSequence(p, left) for p, left in seqs], budget,
                             flex_priority=FLEX, flex_budget=flex_budget)


def test_decodes_only_nothing_to_prefill() -> None:
    assert allow([(DEFAULT, 0), (FLEX, 0)]) == [0, 0]


def test_flex_prefills_its_budget_when_no_default_prompt_is_pending() -> None:
    # Two flex prompts share the 64-token budget, in the engine's order.
    assert allow([(DEFAULT, 0), (FLEX, 40), (FLEX, 2000)]) == [0, 40, 24]


def test_a_pending_default_prompt_holds_all_flex_prefill() -> None:
    assert allow([(FLEX, 2000), (DEFAULT, 0), (DEFAULT, 500)]) == [0, 0, 500]


def test_default_prompts_take_the_budget_less_the_decodes() -> None:
    # 100-token step budget, three decodes: 97 left for prompts, in order.
    assert allow([(DEFAULT, 0), (DEFAULT, 0), (FLEX, 0), (DEFAULT, 60), (DEFAULT, 60)],
                 budget=100) == [0, 0, 0, 60, 37]


def test_a_zero_flex_budget_leaves_flex_the_whole_step() -> None:
    assert allow([(FLEX, 2000), (FLEX, 10)], budget=1000, flex_budget=0) == [1000, 0]


async def _run(model: SimModel, priority: int, words: int, max_tokens: int) -> None:
    request = EngineRequest.chat(f"r{priority}-{words}", model.model_id,
                                 [{"role": "user", "content": " ".join(["river"] * words)}],
                                 max_tokens=max_tokens, priority=priority)
    async for _ in model.generate(request):
        pass


@pytest.mark.parametrize("budget", [0, 64])
def test_the_sim_engine_prefills_flex_in_pieces_of_its_budget(budget: int) -> None:
    """A 1,994-token flex prompt beside a decoding default: with the policy,
    no step prefills more than 64 flex tokens; without, one step takes it whole."""
    model = SimModel("h100-llama3-8b", speed=1000.0, scheduling_policy="priority",
                     flex_prefill_budget=budget)

    async def scenario() -> None:
        default = asyncio.create_task(_run(model, DEFAULT, 10, 200))
        await asyncio.sleep(0.001)
        await _run(model, FLEX, 2000, 4)
        await default
        await model.close()

    asyncio.run(scenario())
    # Steps of more than 128 tokens (the default decodes one a step; flex's
    # prompt is the rest): none with the policy, its whole prompt at once without.
    past_128 = sum(model.iteration_tokens.counts[ITERATION_TOKENS_BUCKETS.index(128) + 1:])
    assert (past_128 == 0) if budget else (past_128 >= 1)
    assert model.iteration_tokens.count > (2000 // budget if budget else 0)
