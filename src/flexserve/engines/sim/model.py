"""SimModel: a continuous-batching engine simulated by its step time.

No GPU and no HTTP: one asyncio task runs engine steps the way vLLM V1 does
(running sequences first, in the order they were admitted, then waiting ones
by priority and arrival while ``max_num_seqs``, the step's token budget and
the KV cache allow; chunked prefill; when the KV cache is full, preemption of
the lowest-priority, newest sequence under the priority policy, of the last
admitted under fcfs) and sleeps each step's modelled duration,
``profiles.step_time``, divided by ``speed``.

A request is one sequence per prompt (chat: one; completions: one per prompt;
embeddings: one per input). A sequence with ``n`` choices has its prompt
prefilled once and then decodes one token per unfinished choice each step,
holding KV for the prompt and every choice's tokens, as vLLM shares a
prompt's cached prefix among ``n`` samples. An embedding is prefill only: it
finishes when its prompt is in the cache, generating no token.

Prompts are counted by the sim tokenizer (``tokenizer.py``), output is
planned per choice before it starts (``outputs.py``: filler words, or JSON,
or a tool call): ``max_tokens`` tokens of text when given, or as many as the
context has room for when fewer (vLLM cuts ``max_tokens`` to the room left,
refusing only more than the whole context), finish_reason "length";
otherwise a length in 16..512 drawn from ``seed`` (or the request id when no
seed is given), finish_reason "stop" — or "length" if the context runs out
first.

Time: latencies (TTFT, inter-token) are recorded on a simulated clock that
advances by each step's modelled time while busy and by wall time x ``speed``
while idle, so they read as a real engine's seconds whatever the speed and
however jittery the host. The ``instant`` profile skips the step loop and
answers each request at once, in one ``Delta`` per choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from operator import attrgetter
from typing import Literal

from flexserve.engines.base import Delta, EngineLoad, EngineRequest, Usage
from flexserve.engines.sim import records
from flexserve.engines.sim.embeddings import embedding_object, unit_vector
from flexserve.engines.sim.inputs import EmbeddingInput, GenerationInput, read_request
from flexserve.engines.sim.metrics import (
    ITERATION_TOKENS_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
)
from flexserve.engines.sim.outputs import (
    MAX_DRAWN,
    ChoiceOutput,
    choice_key,
    filler_words,
    plan_choices,
)
from flexserve.engines.sim.prefix_cache import BLOCK, PrefixCache, block_hashes
from flexserve.engines.sim.sequence import Seq, SeqState
from flexserve.engines.step_policy import FLEX_PRIORITY, StepSequence, prefill_allowance
from flexserve.engines.sim.profiles import (
    COST_MODELS,
    PROFILES,
    CostModel,
    SimProfile,
    step_model,
    step_time,
)
from flexserve.engines.sim.tokenizer import (
    FILLER_WORDS,
    chat_token_ids,
    count_prompt_tokens,
    text_token_ids,
)
from flexserve.errors import EngineError, EngineUnavailableError, InvalidRequestError

__all__ = ["FILLER_WORDS", "SimModel", "count_prompt_tokens", "step_time"]

logger = logging.getLogger(__name__)

SchedulingPolicy = Literal["fcfs", "priority"]

# Wall seconds the step loop may lag behind its schedule before it stops catching up.
_MAX_LAG_SECONDS = 0.05
# Most recent preempted request ids kept for benchmarks and tests.
_PREEMPTION_LOG_LEN = 1000


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
        cost_model: str = "flat",
        long_prefill_token_threshold: int = 0,
        enable_prefix_caching: bool = False,
        flex_prefill_budget: int = 0,
        stream_interval: int = 1,
        log_requests: bool = False,
        log_steps: bool = False,
    ) -> None:
        if cost_model not in COST_MODELS:
            raise ValueError(f"cost_model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
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
        if long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: no cap), got "
                             f"{long_prefill_token_threshold}")
        if flex_prefill_budget < 0:
            raise ValueError(f"flex_prefill_budget must be >= 0 (0: off), got {flex_prefill_budget}")
        if flex_prefill_budget and scheduling_policy != "priority":
            raise ValueError("flex_prefill_budget needs scheduling_policy 'priority' "
                             "(the policy tells flex by its priority)")
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be fcfs or priority, got {scheduling_policy!r}"
            )
        self.profile = profile
        self.cost_model: CostModel = cost_model
        self.step_model = step_model(profile, cost_model)
        # vLLM's --long-prefill-token-threshold: most prompt tokens one
        # sequence prefills in a step (0: as many as the budget leaves).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # The flex-aware step policy (engines/step_policy.py): prompt tokens
        # flex may prefill per step, only when no default prompt is pending; 0: off.
        self.flex_prefill_budget = flex_prefill_budget
        # vLLM's --stream-interval: a request's consumer hears of new tokens
        # every this many (and of its first and last at once); 1: each token.
        self.stream_interval = stream_interval
        # One JSON line on stderr per finished generation, and per step, in
        # simulated seconds (engines/sim/records.py): the engine's own times.
        self.log_requests = log_requests
        self.log_steps = log_steps
        # vLLM's automatic prefix caching (engines/sim/prefix_cache.py), for
        # requests of one prompt and one choice; None: off.
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self.model_id = model_id or profile.model_id
        self.speed = speed
        self.max_num_seqs = max_num_seqs
        self.kv_tokens = kv_tokens if kv_tokens is not None else profile.kv_tokens
        self.scheduling_policy: SchedulingPolicy = scheduling_policy
        self.max_model_len = profile.max_model_len
        self.instant = profile.instant

        self._waiting: list[tuple[tuple[int, int], Seq]] = []  # heap; aborted entries linger
        # By arrival number, in the order admitted (vLLM V1's `running` list).
        self._running: dict[int, Seq] = {}
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
        return self._check(request).prompt_tokens

    def _check(self, request: EngineRequest) -> GenerationInput | EmbeddingInput:
        inputs = read_request(request)
        limit = min(self.max_model_len, self.kv_tokens)
        if isinstance(inputs, EmbeddingInput):
            for i, num_tokens in enumerate(inputs.prompt_lens):
                if num_tokens > limit:
                    raise InvalidRequestError(
                        f"This model's maximum context length is {limit} tokens. However, input "
                        f"{i} has {num_tokens} tokens (sim tokenizer).", param="input")
            width = self.profile.embedding_dim
            if inputs.dimensions is not None and inputs.dimensions > width:
                raise InvalidRequestError(
                    f"'dimensions' is {inputs.dimensions}, more than this model's {width}.",
                    param="dimensions")
            return inputs
        max_tokens = inputs.max_tokens
        # As vLLM: max_tokens is cut to the room the prompt leaves in the
        # context, and refused only past the context itself.
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={limit}. "
                "Please request fewer output tokens.",
                param="max_tokens",
            )
        for prompt_tokens in inputs.prompt_lens:
            if prompt_tokens > limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"prompt contains {prompt_tokens} input tokens (sim tokenizer), which exceeds "
                    "this limit even without any output tokens. Please reduce the length of the "
                    "input prompt.",
                    param="input_tokens",
                )
            if prompt_tokens == limit:
                raise InvalidRequestError(
                    f"max_tokens must be at least 1, got 0: the {prompt_tokens}-token prompt "
                    f"fills the whole context ({limit} tokens).",
                    param="max_tokens",
                )
            if inputs.n > 1:
                # One sequence holds every choice's KV: it must fit in the cache alone.
                room = limit - prompt_tokens
                longest = MAX_DRAWN if inputs.form.kind == "text" else room
                if max_tokens is not None:
                    longest = max_tokens
                need = prompt_tokens + inputs.n * min(longest, room)
                if need > self.kv_tokens:
                    raise InvalidRequestError(
                        f"{inputs.n} choices of up to {min(longest, room)} tokens after a "
                        f"{prompt_tokens}-token prompt need {need} tokens of KV cache; this "
                        f"engine holds {self.kv_tokens}. Ask for fewer or shorter choices.",
                        param="n",
                    )
        return inputs

    async def generate(self, request: EngineRequest) -> AsyncGenerator[Delta, None]:
        """Stream the completion; closing the generator aborts it and frees its room.

        Each choice's last delta has its finish_reason; every delta carries the
        usage so far (all choices), so the last one has the totals.
        """
        inputs = self._check(request)
        if isinstance(inputs, EmbeddingInput):
            yield await self._embed(request, inputs)
            return
        limit = min(self.max_model_len, self.kv_tokens)
        prompt_tokens = inputs.prompt_tokens
        if inputs.plain:
            # Most traffic, and the benchmarks': one choice of words. Kept apart
            # from the general path below, which it matches, to stay lean.
            key = choice_key(inputs.seed, request.request_id, 0, 0)
            words, finish_reason = filler_words(key, inputs.max_tokens, limit - prompt_tokens)
            if self.instant:
                output_len = len(words)
                self._num_instant_running += 1
                self.num_prompt_tokens += prompt_tokens
                self.num_generation_tokens += output_len
                self.ttft.observe(0.0)
                self.itl.observe(0.0, output_len - 1)
                try:
                    yield Delta("".join(words), finish_reason, Usage(prompt_tokens, output_len))
                finally:
                    self._num_instant_running -= 1
                return
            ready = asyncio.Event()
            seq = self._enqueue(request, prompt_tokens, [len(words)], ready)
            if self.prefix_cache is not None:
                ids = prompt_token_ids(request)
                # Only ids that count as usage does are cached (else none are).
                seq.blocks = block_hashes(ids) if len(ids) == prompt_tokens else ()
            emitted = 0
            try:
                while True:
                    await ready.wait()
                    ready.clear()
                    if seq.error is not None:
                        raise seq.error
                    num_generated = seq.num_generated
                    text = "".join(words[emitted:num_generated])
                    emitted = num_generated
                    usage = Usage(prompt_tokens, num_generated, seq.num_hit)
                    if seq.state is SeqState.FINISHED:
                        yield Delta(text, finish_reason, usage)
                        return
                    if text:
                        # Usage so far rides along, so that a stream cut short is billed exactly.
                        yield Delta(text, usage=usage)
            finally:
                if seq.state is SeqState.WAITING or seq.state is SeqState.RUNNING:
                    self._abort(seq)
        plans = plan_choices(inputs, request.request_id, [limit - p for p in inputs.prompt_lens])
        if self.instant:
            choices = plans[0] if len(plans) == 1 else [c for row in plans for c in row]
            usage = Usage(prompt_tokens, self._count_instant(prompt_tokens, choices))
            self._num_instant_running += 1
            try:
                for choice in choices:
                    yield choice.take(choice.length, True, usage)
            finally:
                self._num_instant_running -= 1
            return

        ready = asyncio.Event()
        seqs = [self._enqueue(request, num_tokens, [c.length for c in row], ready)
                for num_tokens, row in zip(inputs.prompt_lens, plans, strict=True)]
        try:
            while True:
                await ready.wait()
                ready.clear()
                # Taken all at once, so that every delta of this wake-up carries
                # the same, exact usage so far.
                deltas, done = self._progress(seqs, plans, prompt_tokens)
                for delta in deltas:
                    yield delta
                if done:
                    return
        finally:
            for seq in seqs:
                if seq.state is SeqState.WAITING or seq.state is SeqState.RUNNING:
                    self._abort(seq)

    @staticmethod
    def _progress(seqs: list[Seq], plans: list[list[ChoiceOutput]],
                  prompt_tokens: int) -> tuple[list[Delta], bool]:
        """The deltas of what the step loop produced since the last call, and
        whether every choice has finished."""
        num_generated = 0
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
            num_generated += seq.num_generated
        usage = Usage(prompt_tokens, num_generated)
        deltas: list[Delta] = []
        done = True
        for seq, row in zip(seqs, plans, strict=True):
            seq_finished = seq.state is SeqState.FINISHED
            for j, choice in enumerate(row):
                if choice.done:
                    continue
                upto = seq.generated[j]
                finished = seq_finished or upto >= choice.length > 0
                if upto > choice.emitted or finished:
                    deltas.append(choice.take(upto, finished, usage))
                done = done and choice.done
        return deltas, done

    async def _embed(self, request: EngineRequest, inputs: EmbeddingInput) -> Delta:
        """Prefill every input (one prefill-only sequence each), then the vectors."""
        if self.instant:
            self.num_prompt_tokens += inputs.prompt_tokens
        else:
            ready = asyncio.Event()
            seqs = [self._enqueue(request, num_tokens, [], ready)
                    for num_tokens in inputs.prompt_lens]
            try:
                while any(seq.state is not SeqState.FINISHED for seq in seqs):
                    await ready.wait()
                    ready.clear()
                    for seq in seqs:
                        if seq.error is not None:
                            raise seq.error
            finally:
                for seq in seqs:
                    if seq.state is SeqState.WAITING or seq.state is SeqState.RUNNING:
                        self._abort(seq)
        width = inputs.dimensions or self.profile.embedding_dim
        data = [embedding_object(i, unit_vector(key, width), inputs.base64)
                for i, key in enumerate(inputs.keys)]
        return Delta(finish_reason="stop", usage=Usage(inputs.prompt_tokens, 0), data=data)

    def _count_instant(self, prompt_tokens: int, choices: list[ChoiceOutput]) -> int:
        """Record an instant answer (every token at once, at time zero); return
        its completion tokens."""
        self.num_prompt_tokens += prompt_tokens
        total = 0
        for choice in choices:
            length = choice.length
            if length:
                total += length
                self.ttft.observe(0.0)
                self.itl.observe(0.0, length - 1)
        self.num_generation_tokens += total
        return total

    def _enqueue(self, request: EngineRequest, prompt_tokens: int, output_lens: list[int],
                 ready: asyncio.Event) -> Seq:
        if self._idle:
            # Freeze the clock at this arrival: the first step starts now, not when
            # the loop task gets scheduled.
            self._clock = self.sim_now()
            self._idle = False
            self._step_len = 0.0
        priority = request.priority if self.scheduling_policy == "priority" else 0
        self._num_arrivals += 1
        seq = Seq(request.request_id, (priority, self._num_arrivals), prompt_tokens,
                   output_lens, self.sim_now(), ready)
        # As vLLM: a request's own `stream_interval` raises the server's, never lowers it.
        asked = request.body.get("stream_interval")
        seq.stream_interval = max(self.stream_interval, asked if isinstance(asked, int) else 1)
        heapq.heappush(self._waiting, (seq.key, seq))
        self._num_waiting += 1
        self._ensure_loop().set()
        return seq

    def _abort(self, seq: Seq) -> None:
        if seq.state is SeqState.RUNNING:
            del self._running[seq.key[1]]
            self._kv_used -= seq.kv_held
            seq.kv_held = 0
            self._let_go(seq)
        elif seq.state is SeqState.WAITING:
            self._num_waiting -= 1  # its heap entry is skipped when reached
        seq.state = SeqState.ABORTED

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
            if seq.state is SeqState.WAITING or seq.state is SeqState.RUNNING:
                seq.error = make_error()
                seq.state = SeqState.ABORTED
                seq.ready.set()
        self._running.clear()
        self._waiting.clear()
        self._num_waiting = 0
        self._kv_used = 0
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
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
            num_preempted = self.num_preemptions
            scheduled, step_tokens = self._schedule()
            if not scheduled:
                if self.num_preemptions > num_preempted:
                    # The first running sequence was the victim of its own KV need
                    # (vLLM V1 then schedules nothing else in that step): the KV is
                    # freed, schedule again.
                    continue
                # Otherwise unreachable while validate() keeps every sequence
                # within the KV cache; wait for a change rather than spin.
                wakeup.clear()
                await wakeup.wait()
                continue
            t_step = self.step_model.step_time(step_tokens,
                                               sum(s.kv_held for s, _, _ in scheduled))
            if self.log_steps:
                records.log_step(self._clock, t_step, scheduled)
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

    def _schedule(self) -> tuple[list[tuple[Seq, int, int]], int]:
        """Choose this step's batch and count its tokens.

        Each entry is (sequence, prompt tokens to prefill, tokens to sample).
        Decodes take one budget token per choice; the step that completes a
        prefill also samples a token for each choice, outside the budget (as in
        vLLM), and every sampled token is held in the KV cache at once.
        """
        budget = self.profile.max_num_batched_tokens
        scheduled: list[tuple[Seq, int, int]] = []
        costs: dict[int, int] = {}  # budget tokens each scheduled sequence took, by id
        preempted = False
        # vLLM V1 walks its running requests in the order they were admitted,
        # whatever their priority: one admitted earlier takes its share of the
        # budget first.
        running = list(self._running.values())
        caps = self._policy_caps(running) if self.flex_prefill_budget else None
        for seq in running:
            if budget == 0:
                break
            if seq.state is not SeqState.RUNNING:
                continue  # a victim of this step's preemptions
            remaining = seq.prefill_target - seq.num_cached
            if remaining > 0:
                chunk = self._chunk(remaining, budget)
                if caps is not None:
                    chunk = min(chunk, caps.get(id(seq), 0))
                    if chunk == 0:
                        continue  # the policy holds its prefill this step
                sampled = len(seq.active) if chunk == remaining else 0
                cost = chunk
            else:
                chunk = 0
                num_active = len(seq.active)
                sampled = cost = num_active if num_active <= budget else budget
            need = chunk + sampled
            while self._kv_used + need > self.kv_tokens:
                victim = self._victim()
                self._preempt(victim)  # frees its KV, this step's share included
                preempted = True
                if victim is seq:
                    break
                if id(victim) in costs:
                    # Scheduled earlier in this step: undone, its tokens back in the budget.
                    budget += costs.pop(id(victim))
                    scheduled = [entry for entry in scheduled if entry[0] is not victim]
            if seq.state is not SeqState.RUNNING:
                break  # it was the victim: like vLLM, no further running sequence this step
            self._kv_used += need
            seq.kv_held += need
            scheduled.append((seq, chunk, sampled))
            costs[id(seq)] = cost
            budget -= cost
        # Like vLLM: no new admissions in a step that had to preempt.
        while (not preempted and self._num_waiting and budget > 0
               and len(self._running) < self.max_num_seqs):
            while self._waiting[0][1].state is not SeqState.WAITING:
                heapq.heappop(self._waiting)
            seq = self._waiting[0][1]
            cache = self.prefix_cache
            hit = cache.cached_tokens(seq.blocks, seq.prompt_tokens) if cache and seq.blocks else 0
            chunk = self._chunk(seq.prefill_target - hit, budget)
            if caps is not None:
                chunk = min(chunk, caps.get(id(seq), 0))
                if chunk == 0:
                    break  # the policy holds it back this step (all after it rank no higher)
            sampled = len(seq.active) if chunk == seq.prefill_target - hit else 0
            need = hit + chunk + sampled
            if self._kv_used + need > self.kv_tokens:
                break
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            seq.state = SeqState.RUNNING
            self._running[seq.key[1]] = seq
            if cache is not None and seq.blocks:
                cache.count(seq.prompt_tokens, hit)
                seq.num_hit = seq.num_cached = hit
                seq.held_blocks = seq.blocks[:hit // BLOCK]
                cache.take(seq.held_blocks)
            self._kv_used += need
            seq.kv_held += need
            scheduled.append((seq, chunk, sampled))
            budget -= chunk
        if self.prefix_cache is not None:
            self.prefix_cache.trim(self.kv_tokens - self._kv_used)
        return scheduled, self.profile.max_num_batched_tokens - budget

    def _policy_caps(self, running: list[Seq]) -> dict[int, int]:
        """Prompt tokens each sequence this step may look at (the running ones,
        then the waiting ones there is room for) may prefill under the
        flex-aware step policy, by id."""
        room = self.max_num_seqs - len(running)
        waiting = [seq for _, seq in heapq.nsmallest(room + 8, self._waiting)
                   if seq.state is SeqState.WAITING][:room] if room > 0 else []
        seqs = running + waiting
        view = [StepSequence(seq.key[0], max(0, seq.prefill_target - seq.num_cached)) for seq in seqs]
        caps = prefill_allowance(view, self.profile.max_num_batched_tokens,
                                 flex_priority=FLEX_PRIORITY, flex_budget=self.flex_prefill_budget)
        return {id(seq): cap for seq, cap in zip(seqs, caps, strict=True)}

    def _chunk(self, remaining: int, budget: int) -> int:
        """Prompt tokens one sequence prefills this step: what is left of its
        prompt, within the budget and, as vLLM V1 caps a long prefill, the threshold."""
        chunk = min(remaining, budget)
        threshold = self.long_prefill_token_threshold
        return min(chunk, threshold) if threshold > 0 else chunk

    def _victim(self) -> Seq:
        """The running sequence to preempt, as vLLM V1 picks it: the lowest
        priority and newest arrival under the priority policy, the last
        admitted under fcfs."""
        if self.scheduling_policy == "priority":
            return max(self._running.values(), key=_seq_key)
        return next(reversed(self._running.values()))

    def _preempt(self, seq: Seq) -> None:
        """Free a running sequence's KV and requeue it; it recomputes prompt and output."""
        del self._running[seq.key[1]]
        self._kv_used -= seq.kv_held
        seq.kv_held = 0
        self._let_go(seq)
        seq.num_cached = 0
        seq.prefill_target = seq.prompt_tokens + seq.num_generated
        seq.state = SeqState.WAITING
        heapq.heappush(self._waiting, (seq.key, seq))
        self._num_waiting += 1
        self.num_preemptions += 1
        self.preemption_log.append(seq.request_id)

    def _advance(self, scheduled: list[tuple[Seq, int, int]]) -> None:
        """Apply a finished step: prefill progress, one token per choice sampled."""
        now = self._clock
        for seq, chunk, sampled in scheduled:
            if seq.state is not SeqState.RUNNING:
                continue  # aborted during the step
            if chunk:
                seq.num_cached += chunk
                if seq.num_cached < seq.prefill_target:
                    continue
                if self.prefix_cache is not None and len(seq.held_blocks) < len(seq.blocks):
                    # Its whole prompt is computed: every full block is cached now.
                    self.prefix_cache.take(seq.blocks[len(seq.held_blocks):])
                    seq.held_blocks = seq.blocks
                if not seq.active:
                    # Prefill only (an embedding): done once the prompt is in.
                    self.num_prompt_tokens += seq.prompt_tokens
                    self._finish(seq)
                    continue
            seq.num_cached += sampled
            active = seq.active
            generated = seq.generated
            lengths = seq.output_lens
            num_done = 0
            if sampled == 1 and len(active) == 1:
                # One choice (most requests): no list to walk.
                j = active[0]
                count = generated[j] = generated[j] + 1
                num_done = count >= lengths[j]
            else:
                if sampled < len(active):
                    # Fewer budget tokens than choices: those served go to the back.
                    served, seq.active = active[:sampled], active[sampled:] + active[:sampled]
                else:
                    served = active
                for j in served:
                    count = generated[j] = generated[j] + 1
                    if count >= lengths[j]:
                        num_done += 1
            if seq.num_generated == 0:
                seq.first_token_at = now
                self.ttft.observe(now - seq.arrival, sampled)
                self.num_prompt_tokens += seq.prompt_tokens
            else:
                self.itl.observe(now - seq.last_token_at, sampled)
            seq.num_generated += sampled
            self.num_generation_tokens += sampled
            seq.last_token_at = now
            if num_done:
                if num_done == len(seq.active):
                    self._finish(seq)
                    continue
                seq.active = [j for j in seq.active if generated[j] < lengths[j]]
            if seq.num_generated - seq.num_told >= seq.stream_interval or seq.num_told == 0:
                seq.num_told = seq.num_generated
                seq.ready.set()

    def _finish(self, seq: Seq) -> None:
        if self.log_requests:
            records.log_finished(seq)
        seq.state = SeqState.FINISHED
        del self._running[seq.key[1]]
        self._kv_used -= seq.kv_held
        seq.kv_held = 0
        self._let_go(seq)
        seq.ready.set()

    def _let_go(self, seq: Seq) -> None:
        """The sequence's cached blocks become free (kept for later prompts)."""
        if self.prefix_cache is not None and seq.held_blocks:
            self.prefix_cache.give_back(seq.held_blocks)
            seq.held_blocks = ()


def prompt_token_ids(request: EngineRequest) -> list[int]:
    """The token ids of a request's one prompt, as /tokenize gives them (none
    for several prompts)."""
    body = request.body
    if request.op == "chat":
        ids = chat_token_ids(body.get("messages") or (), body.get("tools") or ())
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = text_token_ids(prompt)
        elif isinstance(prompt, list) and all(isinstance(i, int) for i in prompt):
            ids = list(prompt)
        else:
            ids = []
    return ids
