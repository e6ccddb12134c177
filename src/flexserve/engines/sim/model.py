"""SimModel: a continuous-batching engine simulated by its step time.

No GPU and no HTTP: one asyncio task runs engine steps the way vLLM does
(running sequences first, then waiting ones while ``max_num_seqs``, the step's
token budget and the KV cache allow; chunked prefill; preemption of the
lowest-priority, newest sequence when the KV cache is full) and sleeps each
step's modelled duration, ``profiles.step_time``, divided by ``speed``.

Sim tokenizer (so that benchmarks can build prompts of an exact length)::

    prompt_tokens = sum(4 + len(m["content"].split()) for m in messages) + 2

Output: exactly ``max_tokens`` tokens when given (finish_reason "length");
otherwise a length in 16..512 drawn from ``seed`` (or the request id when no
seed is given), finish_reason "stop" — or "length" if the context runs out
first. Each token is one filler word with a leading space, deterministic per
seed; for one seed a shorter output is a prefix of a longer one.

Time: latencies (TTFT, inter-token) are recorded on a simulated clock that
advances by each step's modelled time while busy and by wall time x ``speed``
while idle, so they read as a real engine's seconds whatever the speed and
however jittery the host. The ``instant`` profile skips the step loop and
answers each request at once, in one ``Delta``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from operator import attrgetter
from typing import Any, Literal

from flexserve.engines.base import Delta, EngineLoad, EngineRequest, Usage, content_text
from flexserve.engines.sim.metrics import (
    ITERATION_TOKENS_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
)
from flexserve.engines.sim.profiles import PROFILES, SimProfile, step_time
from flexserve.errors import EngineError, EngineUnavailableError, InvalidRequestError

__all__ = ["SimModel", "count_prompt_tokens", "step_time"]

logger = logging.getLogger(__name__)

SchedulingPolicy = Literal["fcfs", "priority"]

# One token each; the leading space makes the joined text read as words. 64 of
# them, so that each random byte picks one with equal odds (see _WORD_OF_BYTE).
FILLER_WORDS: tuple[str, ...] = tuple(" " + w for w in (
    "the of and to in is that for it as with was on be by at this from or an "
    "model token batch queue flex tier engine latency prefill decode cache step "
    "spare capacity request stream answer sample value result simple steady "
    "quiet river stone light paper garden window morning yellow green orange "
    "little bright gentle calm clear early fresh open plain round warm"
).split(" "))
_WORD_OF_BYTE: tuple[str, ...] = FILLER_WORDS * 4

# Wall seconds the step loop may lag behind its schedule before it stops catching up.
_MAX_LAG_SECONDS = 0.05
# Most recent preempted request ids kept for benchmarks and tests.
_PREEMPTION_LOG_LEN = 1000


def count_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """The sim tokenizer: 4 tokens per message, one per word, 2 to prime the reply."""
    return sum(4 + len(content_text(m.get("content")).split()) for m in messages) + 2


class _State(enum.Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3
    ABORTED = 4


class _Seq:
    """One sequence in the engine; touched only by the step loop and its consumer."""

    __slots__ = ("arrival", "error", "finish_reason", "key", "kv_held", "last_token_at",
                 "num_cached", "num_generated", "output_len", "prefill_target",
                 "prompt_tokens", "ready", "request_id", "state")

    def __init__(self, request_id: str, key: tuple[int, int], prompt_tokens: int,
                 output_len: int, finish_reason: str, arrival: float) -> None:
        self.request_id = request_id
        # Scheduling order, lower first: (priority or 0 under fcfs, arrival number).
        self.key = key
        self.prompt_tokens = prompt_tokens
        self.output_len = output_len
        self.finish_reason = finish_reason
        self.arrival = arrival  # simulated seconds
        self.state = _State.WAITING
        # Tokens whose KV is computed; reset to 0 on preemption (recomputed later).
        self.num_cached = 0
        # Tokens to prefill before decoding resumes: the prompt, plus output on recompute.
        self.prefill_target = prompt_tokens
        # KV tokens allocated to this sequence (num_cached plus this step's share).
        self.kv_held = 0
        self.num_generated = 0
        self.last_token_at = 0.0
        self.ready = asyncio.Event()
        self.error: Exception | None = None


_seq_key = attrgetter("key")


class SimModel:
    """A simulated continuous-batching engine replica, driven by asyncio."""

    def __init__(
        self,
        profile: SimProfile | str = "h100-llama3-8b",
        *,
        speed: float = 1.0,
        max_num_seqs: int = 256,
        kv_tokens: int | None = None,
        scheduling_policy: SchedulingPolicy = "fcfs",
        model_id: str | None = None,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"unknown sim profile {profile!r}; known: {', '.join(PROFILES)}")
            profile = PROFILES[profile]
        if max_num_batched_tokens is not None:
            if max_num_batched_tokens < max_num_seqs:
                # vLLM's own rule: every running sequence must fit in a step.
                raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be "
                                 f">= max_num_seqs ({max_num_seqs})")
            profile = dataclasses.replace(profile, max_num_batched_tokens=max_num_batched_tokens)
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if kv_tokens is not None and kv_tokens < 2:
            raise ValueError(f"kv_tokens must be >= 2, got {kv_tokens}")
        if not profile.instant and profile.max_num_batched_tokens < 1:
            raise ValueError("a timed profile needs max_num_batched_tokens >= 1")
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be fcfs or priority, got {scheduling_policy!r}"
            )
        self.profile = profile
        self.model_id = model_id or profile.model_id
        self.speed = speed
        self.max_num_seqs = max_num_seqs
        self.kv_tokens = kv_tokens if kv_tokens is not None else profile.kv_tokens
        self.scheduling_policy: SchedulingPolicy = scheduling_policy
        self.max_model_len = profile.max_model_len
        self.instant = profile.instant

        self._waiting: list[tuple[tuple[int, int], _Seq]] = []  # heap; aborted entries linger
        self._running: dict[int, _Seq] = {}  # by arrival number
        self._num_waiting = 0
        self._num_instant_running = 0
        self._kv_used = 0
        self._num_arrivals = 0
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # Simulated clock: _clock at wall time _clock_wall, see sim_now().
        self._clock = 0.0
        self._clock_wall = time.monotonic()
        self._idle = True
        self._step_len = 0.0

        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.busy_seconds = 0.0  # simulated seconds spent in steps
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)
        self.preemption_log: deque[str] = deque(maxlen=_PREEMPTION_LOG_LEN)

    # --- load signals --------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running) + self._num_instant_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._kv_used / self.kv_tokens

    def load(self) -> EngineLoad:
        return EngineLoad(self.num_running, self._num_waiting, self.kv_cache_usage)

    def sim_now(self) -> float:
        """Simulated seconds: step time while busy, wall time x speed while idle."""
        elapsed = (time.monotonic() - self._clock_wall) * self.speed
        return self._clock + (elapsed if self._idle else min(elapsed, self._step_len))

    # --- requests ------------------------------------------------------------

    def validate(self, request: EngineRequest) -> int:
        """Raise InvalidRequestError for input this engine refuses; return prompt tokens.

        The server calls it before committing to a streamed 200 response.
        """
        prompt_tokens = count_prompt_tokens(request.messages)
        limit = min(self.max_model_len, self.kv_tokens)
        if prompt_tokens >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages resulted in {prompt_tokens} tokens (sim tokenizer).",
                param="messages",
            )
        if request.max_tokens is not None:
            if request.max_tokens < 1:
                raise InvalidRequestError("max_tokens must be at least 1.", param="max_tokens")
            if prompt_tokens + request.max_tokens > limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {prompt_tokens + request.max_tokens} tokens ({prompt_tokens} "
                    f"in the messages, {request.max_tokens} in the completion).",
                    param="max_tokens",
                )
        return prompt_tokens

    def _plan(self, request: EngineRequest) -> tuple[int, int, str, list[str]]:
        """Prompt tokens, output length, finish reason and the output words."""
        prompt_tokens = self.validate(request)
        rng = random.Random(request.seed if request.seed is not None else request.request_id)
        # Drawn even when max_tokens is set, so one seed gives one word stream.
        drawn = rng.randint(16, 512)
        room = min(self.max_model_len, self.kv_tokens) - prompt_tokens
        if request.max_tokens is not None:
            output_len, finish_reason = request.max_tokens, "length"
        elif drawn > room:
            output_len, finish_reason = room, "length"
        else:
            output_len, finish_reason = drawn, "stop"
        # Whole 32-bit draws (a multiple of 4 bytes) keep shorter outputs prefixes of
        # longer ones; one byte per word is ~20x cheaper than rng.choices.
        data = rng.randbytes((output_len + 3) & ~3)[:output_len]
        return prompt_tokens, output_len, finish_reason, list(map(_WORD_OF_BYTE.__getitem__, data))

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        """Stream the completion; closing the generator aborts it and frees its room."""
        prompt_tokens, output_len, finish_reason, words = self._plan(request)
        usage = Usage(prompt_tokens, output_len)
        if self.instant:
            self._num_instant_running += 1
            self.num_prompt_tokens += prompt_tokens
            self.num_generation_tokens += output_len
            self.ttft.observe(0.0)
            self.itl.observe(0.0, output_len - 1)
            try:
                yield Delta("".join(words), finish_reason, usage)
            finally:
                self._num_instant_running -= 1
            return

        seq = self._enqueue(request, prompt_tokens, output_len, finish_reason)
        emitted = 0
        try:
            while True:
                await seq.ready.wait()
                seq.ready.clear()
                if seq.error is not None:
                    raise seq.error
                num_generated = seq.num_generated
                text = "".join(words[emitted:num_generated])
                emitted = num_generated
                if seq.state is _State.FINISHED:
                    yield Delta(text, finish_reason, usage)
                    return
                if text:
                    # Usage so far rides along, so that a stream cut short is billed exactly.
                    yield Delta(text, usage=Usage(prompt_tokens, num_generated))
        finally:
            if seq.state is _State.WAITING or seq.state is _State.RUNNING:
                self._abort(seq)

    def _enqueue(self, request: EngineRequest, prompt_tokens: int, output_len: int,
                 finish_reason: str) -> _Seq:
        if self._idle:
            # Freeze the clock at this arrival: the first step starts now, not when
            # the loop task gets scheduled.
            self._clock = self.sim_now()
            self._idle = False
            self._step_len = 0.0
        priority = request.priority if self.scheduling_policy == "priority" else 0
        self._num_arrivals += 1
        seq = _Seq(request.request_id, (priority, self._num_arrivals), prompt_tokens,
                   output_len, finish_reason, self.sim_now())
        heapq.heappush(self._waiting, (seq.key, seq))
        self._num_waiting += 1
        self._ensure_loop().set()
        return seq

    def _abort(self, seq: _Seq) -> None:
        if seq.state is _State.RUNNING:
            del self._running[seq.key[1]]
            self._kv_used -= seq.kv_held
            seq.kv_held = 0
        elif seq.state is _State.WAITING:
            self._num_waiting -= 1  # its heap entry is skipped when reached
        seq.state = _State.ABORTED

    def _ensure_loop(self) -> asyncio.Event:
        task = self._loop_task
        if self._wakeup is None or task is None or task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(self._wakeup), name=f"sim-engine-{self.model_id}"
            )
        return self._wakeup

    async def close(self) -> None:
        """Stop the step loop; sequences still in flight fail with 503."""
        task, self._loop_task = self._loop_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- the step loop ---------------------------------------------------------

    async def _run(self, wakeup: asyncio.Event) -> None:
        try:
            await self._step_loop(wakeup)
        except asyncio.CancelledError:
            self._fail_all(lambda: EngineUnavailableError("The sim engine was closed."))
            raise
        except Exception:
            logger.exception("sim engine step loop failed")
            self._fail_all(lambda: EngineError("The sim engine's step loop failed."))

    def _fail_all(self, make_error: Callable[[], Exception]) -> None:
        seqs = list(self._running.values()) + [s for _, s in self._waiting]
        for seq in seqs:
            if seq.state is _State.WAITING or seq.state is _State.RUNNING:
                seq.error = make_error()
                seq.state = _State.ABORTED
                seq.ready.set()
        self._running.clear()
        self._waiting.clear()
        self._num_waiting = 0
        self._kv_used = 0
        self._clock = self.sim_now()
        self._clock_wall = time.monotonic()
        self._idle = True

    async def _step_loop(self, wakeup: asyncio.Event) -> None:
        deadline = time.monotonic()
        while True:
            if not self._running and not self._num_waiting:
                self._waiting.clear()
                self._clock_wall = time.monotonic()
                self._idle = True
                wakeup.clear()
                await wakeup.wait()
                deadline = time.monotonic()
                continue
            scheduled, step_tokens = self._schedule()
            if not scheduled:
                # Unreachable while validate() keeps every sequence within the KV
                # cache; wait for a change rather than spin.
                wakeup.clear()
                await wakeup.wait()
                continue
            t_step = step_time(self.profile, step_tokens, sum(s.kv_held for s, _ in scheduled))
            self._clock_wall = time.monotonic()
            self._step_len = t_step
            now = self._clock_wall
            deadline = max(deadline + t_step / self.speed, now - _MAX_LAG_SECONDS)
            await asyncio.sleep(max(0.0, deadline - now))
            self._clock += t_step
            self._step_len = 0.0
            self.busy_seconds += t_step
            self.num_steps += 1
            self.iteration_tokens.observe(step_tokens)
            self._advance(scheduled)

    def _schedule(self) -> tuple[list[tuple[_Seq, int]], int]:
        """Choose this step's batch: (sequence, tokens) pairs and the step's token count."""
        budget = self.profile.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        preempted = False
        for seq in sorted(self._running.values(), key=_seq_key):
            # Victims are taken from the end of this order, so the first one met
            # marks the end of what still runs.
            if budget == 0 or seq.state is not _State.RUNNING:
                break
            remaining = seq.prefill_target - seq.num_cached
            num_tokens = min(remaining, budget) if remaining > 0 else 1
            # The step that finishes a prefill also samples a token, which is held too.
            need = num_tokens + 1 if num_tokens == remaining else num_tokens
            while self._kv_used + need > self.kv_tokens:
                victim = max(self._running.values(), key=_seq_key)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state is not _State.RUNNING:
                break  # it preempted itself: it was the last in order
            self._kv_used += need
            seq.kv_held += need
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        # Like vLLM: no new admissions in a step that had to preempt.
        while (not preempted and self._num_waiting and budget > 0
               and len(self._running) < self.max_num_seqs):
            while self._waiting[0][1].state is not _State.WAITING:
                heapq.heappop(self._waiting)
            seq = self._waiting[0][1]
            num_tokens = min(seq.prefill_target, budget)
            need = num_tokens + 1 if num_tokens == seq.prefill_target else num_tokens
            if self._kv_used + need > self.kv_tokens:
                break
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            seq.state = _State.RUNNING
            self._running[seq.key[1]] = seq
            self._kv_used += need
            seq.kv_held += need
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        return scheduled, self.profile.max_num_batched_tokens - budget

    def _preempt(self, seq: _Seq) -> None:
        """Free a running sequence's KV and requeue it; it recomputes prompt and output."""
        del self._running[seq.key[1]]
        self._kv_used -= seq.kv_held
        seq.kv_held = 0
        seq.num_cached = 0
        seq.prefill_target = seq.prompt_tokens + seq.num_generated
        seq.state = _State.WAITING
        heapq.heappush(self._waiting, (seq.key, seq))
        self._num_waiting += 1
        self.num_preemptions += 1
        self.preemption_log.append(seq.request_id)

    def _advance(self, scheduled: list[tuple[_Seq, int]]) -> None:
        """Apply a finished step: prefill progress, one token per decoding sequence."""
        now = self._clock
        for seq, num_tokens in scheduled:
            if seq.state is not _State.RUNNING:
                continue  # aborted during the step
            if seq.num_cached < seq.prefill_target:
                seq.num_cached += num_tokens
                if seq.num_cached < seq.prefill_target:
                    continue
            seq.num_cached += 1
            seq.num_generated += 1
            self.num_generation_tokens += 1
            if seq.num_generated == 1:
                self.ttft.observe(now - seq.arrival)
                self.num_prompt_tokens += seq.prompt_tokens
            else:
                self.itl.observe(now - seq.last_token_at)
            seq.last_token_at = now
            if seq.num_generated >= seq.output_len:
                seq.state = _State.FINISHED
                del self._running[seq.key[1]]
                self._kv_used -= seq.kv_held
                seq.kv_held = 0
            seq.ready.set()
