"""SimEngine: the simulated engine run in process, behind the Engine interface.

The gateway's tests and capacity-planning runs use it to get a vLLM-like
replica without HTTP in between; ``flexserve sim-engine`` serves the same
``SimModel`` over HTTP instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from flexserve.engines.base import (
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    Feature,
    ModelCard,
    SequenceControl,
    StepTimeModel,
)
from flexserve.engines.sim.model import SchedulingPolicy, SimModel, prompt_token_ids
from flexserve.engines.sim.profiles import SimProfile


class SimEngine(Engine):
    """One simulated replica; it cannot pause sequences, so flex is aborted instead."""

    name = "sim"
    supports_pause = False
    accepts_priority = True
    # What vLLM does serving a text-only model: no image or audio input, no
    # suffix or best_of (vLLM V1 has neither), no fields it does not know.
    features = frozenset({
        Feature.TOOLS, Feature.JSON_OBJECT, Feature.JSON_SCHEMA, Feature.LOGPROBS, Feature.N,
        Feature.PENALTIES, Feature.LOGIT_BIAS, Feature.COMPLETIONS, Feature.TOKEN_PROMPTS,
        Feature.ECHO, Feature.EMBEDDINGS, Feature.DIMENSIONS,
    })

    def __init__(
        self,
        profile: SimProfile | str = "h100-llama3-8b",
        *,
        speed: float = 1.0,
        max_num_seqs: int = 256,
        kv_tokens: int | None = None,
        scheduling_policy: SchedulingPolicy = "priority",
        model_id: str | None = None,
        model: SimModel | None = None,
        cost_model: str = "flat",
        enable_prefix_caching: bool = False,
        stream_interval: int = 1,
    ) -> None:
        # `model` lets a test share one SimModel between the engine and its own probes.
        self.model = model or SimModel(
            profile,
            speed=speed,
            max_num_seqs=max_num_seqs,
            kv_tokens=kv_tokens,
            scheduling_policy=scheduling_policy,
            model_id=model_id,
            cost_model=cost_model,
            enable_prefix_caching=enable_prefix_caching,
            stream_interval=stream_interval,
        )
        # Under fcfs the model ignores priority; say so rather than take hints in vain.
        self.accepts_priority = self.model.scheduling_policy == "priority"

    @property
    def capacity(self) -> int:
        return self.model.max_num_seqs

    async def close(self) -> None:
        await self.model.close()

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model.model_id, max_model_len=self.model.max_model_len)]

    def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        # `control` is ignored: supports_pause is False, so the scheduler aborts instead.
        return self.model.generate(request)

    def step_time_model(self) -> StepTimeModel:
        # Wall-clock seconds: the model runs `speed` times faster than real time.
        return self.model.step_model.scaled(1 / self.model.speed)

    async def read_load(self) -> EngineLoad:
        return self.model.load()

    async def tokenize(self, request: EngineRequest) -> list[int] | None:
        return prompt_token_ids(request) or None

