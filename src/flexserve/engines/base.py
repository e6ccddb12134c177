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
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal


class Feature(str, enum.Enum):
    """What a request may need beyond plain text generation. An engine lists
    the features it honours (``Engine.features``); the API refuses a request
    that needs one its model's engines lack, with a 400 naming the field,
    rather than let the field be dropped."""

    #: `tools`, `tool_choice`, `tool` messages and assistant `tool_calls`.
    TOOLS = "tools"
    #: `response_format` {"type": "json_object"}.
    JSON_OBJECT = "json_object"
    #: `response_format` {"type": "json_schema"} (structured outputs).
    JSON_SCHEMA = "json_schema"
    #: `logprobs` / `top_logprobs` (chat), `logprobs` (completions).
    LOGPROBS = "logprobs"
    #: `n` > 1: several choices from one prompt.
    N = "n"
    #: `presence_penalty`, `frequency_penalty`.
    PENALTIES = "penalties"
    #: `logit_bias`.
    LOGIT_BIAS = "logit_bias"
    #: Image content parts in messages.
    IMAGES = "images"
    #: Audio content parts or audio output.
    AUDIO = "audio"
    #: `POST /v1/completions` at all.
    COMPLETIONS = "completions"
    #: A completions prompt given as token ids.
    TOKEN_PROMPTS = "token_prompts"
    #: Completions `echo` (with `logprobs`: the prompt's own log probabilities).
    ECHO = "echo"
    #: Completions `suffix` (fill in the middle).
    SUFFIX = "suffix"
    #: Completions `best_of` > `n`.
    BEST_OF = "best_of"
    #: `POST /v1/embeddings`.
    EMBEDDINGS = "embeddings"
    #: Embeddings `dimensions`.
    DIMENSIONS = "dimensions"
    #: Request fields FlexServe does not know, passed on as sent.
    EXTRA_FIELDS = "extra_fields"


ALL_FEATURES: frozenset[Feature] = frozenset(Feature)

#: What `EngineRequest.body` holds: a chat completion, a (legacy) completion or embeddings.
EngineOp = Literal["chat", "completion", "embedding"]


def monotonic_now() -> float:
    """``time.monotonic()``, looked up when called: a dataclass field's
    ``default_factory=time.monotonic`` would keep the function it saw at
    import, and miss the planner's virtual clock (``plan/clock.py``)."""
    return time.monotonic()


@dataclass(slots=True)
class EngineRequest:
    """One request for an engine: an OpenAI request body, validated by the API layer.

    ``body`` is the client's JSON body as sent (chat: `messages` with their
    content as a string or parts, `tools`, `response_format`, `logprobs`, `n`…;
    completion: `prompt` as text, texts or token ids; embedding: `input`),
    less the fields the gateway answers itself: `service_tier`, `stream` and
    `stream_options`. An upstream is sent it as it is; the embedded and sim
    engines read what they honour from it (``Engine.features``).
    """

    request_id: str
    model: str
    body: dict[str, Any]
    op: EngineOp = "chat"
    # Scheduling hint for engines that take one (vLLM/sim: lower runs first).
    priority: int = 0
    # False: the caller wants only the whole result (a non-streamed run that is
    # never aborted), so an upstream may be asked for it in one JSON body
    # instead of SSE. Other engines ignore it.
    stream: bool = True
    # True: streamed from the engine (the scheduler may abort it), but its
    # client reads it whole (flex not streamed), so an upstream may send
    # several tokens a chunk (``UpstreamEngine.stream_interval``).
    read_whole: bool = False

    @classmethod
    def chat(cls, request_id: str, model: str, messages: list[dict[str, Any]], **fields: Any) -> EngineRequest:
        """A chat request from its messages and body fields (``priority`` and
        ``stream`` are the request's own; the rest go in the body, None left out)."""
        priority = fields.pop("priority", 0)
        stream = fields.pop("stream", True)
        body = {"model": model, "messages": messages}
        body.update((k, v) for k, v in fields.items() if v is not None)
        return cls(request_id, model, body, "chat", priority, stream)

    # Readers for the fields every engine needs, as the body gives them.

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body.get("messages") or []
        return messages

    @property
    def max_tokens(self) -> int | None:
        """Most tokens to generate per choice; None: until the model stops or
        its context is full (`max_completion_tokens` wins over `max_tokens`)."""
        value = self.body.get("max_completion_tokens")
        if value is None:
            value = self.body.get("max_tokens")
        return None if value is None else int(value)

    @property
    def temperature(self) -> float | None:
        value = self.body.get("temperature")
        return None if value is None else float(value)

    @property
    def top_p(self) -> float | None:
        value = self.body.get("top_p")
        return None if value is None else float(value)

    @property
    def stop(self) -> list[str]:
        value = self.body.get("stop")
        if not value:
            return []
        return [value] if isinstance(value, str) else [s for s in value if s]

    @property
    def seed(self) -> int | None:
        value = self.body.get("seed")
        return None if value is None else int(value)

    @property
    def n(self) -> int:
        return int(self.body.get("n") or 1)


def content_text(content: Any) -> str:
    """A message's content as plain text: a string as it is, the text parts of
    an array joined by newlines (as vLLM joins them), nothing for null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        part.get("text") or ""
        for part in content
        if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text")
    )


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # The part of prompt_tokens an engine served from its prefix cache.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Delta:
    """A piece of a generation, in the shapes of OpenAI's stream chunks.

    - ``index``: the choice it belongs to (``n`` > 1; for completions with
      several prompts, prompt index × n + choice).
    - ``text``: generated text (chat `delta.content`, completions `text`).
    - ``tool_calls``: chat tool-call deltas as OpenAI streams them
      (``{"index", "id"?, "type"?, "function": {"name"?, "arguments"}}``); a
      whole call is one delta that has them all.
    - ``logprobs``: the log probabilities of this piece's tokens, in the
      endpoint's shape (chat ``{"content": [...]}``, completions
      ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``).
    - ``fields``: other members of the chat delta an engine sent
      (``reasoning_content``, ``refusal``…), relayed as they are.
    - ``data``: an embeddings result: OpenAI's embedding objects.
    - ``finish_reason``: on the last delta of its choice ("stop", "length",
      "tool_calls", …).
    - ``usage``: on the last delta of the generation, the totals of all its
      choices; an earlier delta may carry the usage so far, which is what a
      client that leaves mid-stream is billed for.

    A generation is over when the engine's iterator ends.
    """

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None
    fields: dict[str, Any] | None = None
    data: list[dict[str, Any]] | None = None

    @property
    def has_output(self) -> bool:
        """It carries something generated (a token's worth or more)."""
        return bool(self.text or self.tool_calls or self.fields or self.data)


@dataclass(slots=True)
class EngineLoad:
    """Live load signals of one replica, as the scheduler reads them."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of the KV cache in use, 0–1; None when the engine does not say.
    kv_cache_usage: float | None = None
    # time.monotonic() when these numbers were read; stale numbers mean saturated.
    updated_at: float = field(default_factory=monotonic_now)

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """A continuous-batching engine's step time:
    ``t0 + a * max(0, step_tokens - 128) + c * kv_held`` seconds, where a
    step's first 128 tokens cost ``t0`` flat, or, given ``t1`` and ``t128``,
    from ``t1`` for one token rising linearly to ``t128`` at 128 (the sim's
    ``calibrated`` cost model)."""

    # Seconds per step for up to 128 tokens.
    t0: float
    # Seconds per step token beyond 128 (compute-bound slope).
    a: float
    # Seconds per KV-cache token held by the batch, per step (attention reads).
    c: float
    # Seconds a step of one token, and of 128, takes; None: t0 for both.
    t1: float | None = None
    t128: float | None = None

    def step_time(self, step_tokens: int, kv_held: int) -> float:
        if self.t1 is None or self.t128 is None:
            small = self.t0
        else:
            small = self.t1 + (self.t128 - self.t1) * (max(1, min(step_tokens, 128)) - 1) / 127
        return small + self.a * max(0, step_tokens - 128) + self.c * kv_held

    def scaled(self, factor: float) -> StepTimeModel:
        """Every time times ``factor`` (a sim engine ``speed`` times faster: 1 / speed)."""
        return StepTimeModel(
            self.t0 * factor, self.a * factor, self.c * factor,
            None if self.t1 is None else self.t1 * factor,
            None if self.t128 is None else self.t128 * factor)


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
    #: Tokens the engine may send in one delta of a run its client reads
    #: whole (``EngineRequest.read_whole``); 1: every token as it comes.
    stream_interval: int = 1
    #: What the engine honours beyond plain text generation.
    features: frozenset[Feature] = frozenset()
    #: True for a replica other gateways may send to as well (a server at a
    #: URL), whose slots gateways sharing a Redis lease; False for one that
    #: runs in this process.
    shared: bool = False

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

    async def tokenize(self, request: EngineRequest) -> list[int] | None:
        """The token ids the engine prefills for ``request``'s one prompt (a
        chat's with its template applied), as its ``/tokenize`` gives them;
        None where it cannot say (no such endpoint, several prompts)."""
        return None
