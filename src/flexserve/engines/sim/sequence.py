"""A sequence in the sim engine (``model.py``): what the step loop knows of
one prompt and its choices, from arrival to finish."""

from __future__ import annotations

import asyncio
import enum


class SeqState(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3
    ABORTED = 4


class Seq:
    """One sequence in the engine; touched only by the step loop and its consumer."""

    __slots__ = ("active", "arrival", "blocks", "error", "first_token_at", "generated",
                 "held_blocks", "key", "kv_held", "last_token_at", "num_cached", "num_generated",
                 "num_hit", "num_told", "output_lens", "prefill_target", "prompt_tokens", "ready",
                 "request_id", "state", "stream_interval")

    def __init__(self, request_id: str, key: tuple[int, int], prompt_tokens: int,
                 output_lens: list[int], arrival: float, ready: asyncio.Event) -> None:
        self.request_id = request_id
        # Scheduling order, lower first: (priority or 0 under fcfs, arrival number).
        self.key = key
        self.prompt_tokens = prompt_tokens
        # Tokens each choice generates; none at all for a prefill-only sequence.
        self.output_lens = output_lens
        self.generated = [0] * len(output_lens)
        # Choices still generating, in the order they take a step's tokens.
        self.active = [j for j, length in enumerate(output_lens) if length > 0]
        self.arrival = arrival  # simulated seconds
        self.state = SeqState.WAITING
        # Tokens whose KV is computed; reset to 0 on preemption (recomputed later).
        self.num_cached = 0
        # Tokens to prefill before decoding resumes: the prompt, plus output on recompute.
        self.prefill_target = prompt_tokens
        # KV tokens allocated to this sequence (num_cached plus this step's share).
        self.kv_held = 0
        # Tokens generated over all choices.
        self.num_generated = 0
        # Of those, how many its consumer was woken for: it is woken for the
        # first token, then every ``stream_interval`` tokens, and at the end.
        self.num_told = 0
        self.stream_interval = 1
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        # Shared by the sequences of one request: their consumer waits on it.
        self.ready = ready
        self.error: Exception | None = None
        # Prefix caching: the prompt's block hashes, those this sequence holds,
        # and the prompt tokens it found cached when it (last) started.
        self.blocks: tuple[int, ...] = ()
        self.held_blocks: tuple[int, ...] = ()
        self.num_hit = 0
