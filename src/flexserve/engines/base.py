"""The Engine interface: what the scheduler needs from an inference backend.

An ``Engine`` is one replica: an embedded llama.cpp model, one upstream
OpenAI-compatible server, or the simulated engine run in process. It serves
one or more model ids, generates a stream of ``Delta``s for an
``EngineRequest``, and reports its live ``EngineLoad`` so that the scheduler
can admit work by capacity.

Engines never import the api, billing, accounts or store packages. They raise
only ``flexserve.errors.Engine*`` errors (502/503/504) and
``InvalidRequestError`` for input the engine itself refuses (a prompt longer
than its context, say).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class EngineRequest:
    """One chat completion, validated and normalised by the API layer."""

    request_id: str
    model: str
    # OpenAI chat messages; every `content` is already a plain string.
    messages: list[dict[str, Any]]
    # None: generate until the model stops or its context is full.
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Scheduling hint for engines that take one (vLLM/sim: lower runs first).
    priority: int = 0
    # False: the caller wants only the whole completion (a non-streamed run that
    # is never aborted), so an upstream may be asked for it in one JSON body
    # instead of SSE; such a run yields one Delta. Other engines ignore it.
    stream: bool = True


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Delta:
    """A piece of generated text. The last delta of a generation carries
    ``finish_reason`` ("stop" or "length") and ``usage``; an earlier delta may
    carry the usage so far (prompt tokens, tokens generated up to it), which is
    what a client that leaves mid-stream is billed for."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class EngineLoad:
    """Live load signals of one replica, as the scheduler reads them."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of the KV cache in use, 0–1; None when the engine does not say.
    kv_cache_usage: float | None = None
    # time.monotonic() when these numbers were read; stale numbers mean saturated.
    updated_at: float = field(default_factory=time.monotonic)

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """A continuous-batching engine's step time:
    ``t0 + a * max(0, step_tokens - 128) + c * kv_held`` seconds."""

    # Seconds per step for up to 128 tokens.
    t0: float
    # Seconds per step token beyond 128 (compute-bound slope).
    a: float
    # Seconds per KV-cache token held by the batch, per step (attention reads).
    c: float

    def step_time(self, step_tokens: int, kv_held: int) -> float:
        return self.t0 + self.a * max(0, step_tokens - 128) + self.c * kv_held


@dataclass(slots=True)
class ModelCard:
    id: str
    owned_by: str = "flexserve"
    created: int = 0
    # Context length in tokens, when the engine knows it.
    max_model_len: int | None = None


class NoLoadSignalsError(Exception):
    """Raised by ``Engine.read_load`` when the engine offers no load signals
    (a provider, Ollama): the scheduler then counts its in-flight requests alone."""


class SequenceControl:
    """The scheduler's hold on one sequence in flight.

    Engines that can pause between tokens (``Engine.supports_pause``) await
    ``wait_runnable()`` before each decode step; the scheduler clears it to
    pause the sequence and sets it to resume. Engines that cannot pause ignore
    it (the scheduler aborts those instead).
    """

    __slots__ = ("_runnable", "num_pauses")

    def __init__(self) -> None:
        self._runnable = asyncio.Event()
        self._runnable.set()
        self.num_pauses = 0

    @property
    def paused(self) -> bool:
        return not self._runnable.is_set()

    def pause(self) -> None:
        if self._runnable.is_set():
            self.num_pauses += 1
            self._runnable.clear()

    def resume(self) -> None:
        self._runnable.set()

    async def wait_runnable(self) -> None:
        if not self._runnable.is_set():
            await self._runnable.wait()


class Engine(abc.ABC):
    """One inference replica."""

    #: A short name for logs and metrics ("embedded", "sim", "upstream:http://…").
    name: str = "engine"
    #: True when the engine honours SequenceControl.pause between tokens.
    supports_pause: bool = False
    #: True when the engine takes the `priority` hint.
    accepts_priority: bool = False

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Sequences this replica runs at once without queueing them itself."""

    async def start(self) -> None:
        """Load weights, open connections, discover models. Called once."""

    async def close(self) -> None:
        """Release everything ``start`` acquired."""

    @abc.abstractmethod
    def models(self) -> list[ModelCard]:
        """The model ids this replica serves (known after ``start``)."""

    @abc.abstractmethod
    def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        """Generate a completion, one ``Delta`` at a time.

        Closing the iterator early (``aclose()`` or cancelling its consumer)
        aborts the sequence and frees its room in the engine.
        """

    @property
    def max_decoding(self) -> int:
        """Sequences that make progress at once; the rest wait for a turn.
        Batching engines advance every sequence they hold each step."""
        return self.capacity

    def step_time_model(self) -> StepTimeModel | None:
        """The engine's step-time model, when known (for TPOT predictions)."""
        return None

    async def read_load(self) -> EngineLoad:
        """The replica's live load. Engines without signals report none."""
        return EngineLoad()
