"""The embedded engine: slots, their lifecycle, and the token loop.

The engine keeps ``num_slots`` llama.cpp contexts, one sequence each, and
drives generation one token at a time from asyncio:

* a request waits for a free slot in an ``asyncio.Queue`` (never blocking the
  event loop), and keeps that slot, with its KV cache, until it finishes;
* before each step it awaits ``SequenceControl.wait_runnable()``, so the
  scheduler can pause a flex sequence between tokens, and takes one of
  ``max_decoding`` decode permits, so that sequences decoding at once never
  ask for more CPU threads than the machine has;
* each step runs in a worker thread: a token (llama.cpp eval and sample), or
  a chunk of ``PREFILL_CHUNK`` prompt tokens (a long prompt neither holds a
  permit for seconds nor delays a pause or a cancellation by as long), or a
  chunk of embedding input.

A request runs its prompts one after another in its slot, and each prompt's
``n`` choices one after another on it: the prompt is evaluated once, and
each further choice cuts the KV cache back to it. Choice ``j`` is seeded
with the request's seed plus ``j``, so ``n`` = 1 gives what it always gave
for a seed. Embeddings run on a context of their own, made on first use.

Closing the generator (``aclose()`` or cancelling its consumer) stops the
request at once: an in-progress step is allowed to finish, then the slot is
handed to the next request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flexserve.engines.base import (
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    Feature,
    ModelCard,
    SequenceControl,
    Usage,
)
from flexserve.engines.embedded.loading import (
    LoadedModel,
    find_smollm2_gguf,
    load_embedder,
    load_model,
    threads_per_context,
    usable_cpus,
)
from flexserve.engines.embedded.logprobs import LogprobFormatter, TokenLogprob
from flexserve.engines.embedded.prompts import (
    Plan,
    Prompt,
    chat_plan,
    chat_prompt_tokens,
    completion_plan,
    embedding_inputs,
)
from flexserve.engines.embedded.text import TextAssembler
from flexserve.errors import EngineError, EngineUnavailableError

if TYPE_CHECKING:
    from flexserve.engines.embedded.embeddings import Embedder
    from flexserve.engines.embedded.llama import Context, Vocabulary

# Prompt tokens evaluated per step (embedding input too). Prompt processing
# runs at about three times the decode rate per token on two small cores, so
# 64 tokens keep a step under a second there, and batching past 64 gained
# nothing measurable.
PREFILL_CHUNK = 64

_T = TypeVar("_T")


@dataclass(eq=False, slots=True)
class _Slot:
    """One llama.cpp context; it runs one request at a time."""

    index: int
    context: Context
    # Tokens held in this context's KV cache by the request running in it.
    num_tokens: int = 0


async def _settle(job: concurrent.futures.Future[Any]) -> None:
    """Wait until a worker-thread job has stopped running, even if cancelled
    again meanwhile: its llama.cpp context must be idle before anyone resets
    or reuses it."""
    waiter = asyncio.wrap_future(job)
    while not waiter.done():
        try:
            # asyncio.wait neither cancels the waiter nor raises its error.
            await asyncio.wait({waiter})
        except asyncio.CancelledError:
            continue
    if not waiter.cancelled():
        # The sequence is being abandoned: the step's own error no longer matters.
        waiter.exception()


class _ChoiceOutput:
    """One choice's deltas: text released as it becomes safe to send (see
    ``TextAssembler``), with its tokens' log probabilities when asked for."""

    __slots__ = ("_chat", "_formatter", "_offset", "_text", "_token_bytes", "index")

    def __init__(
        self, index: int, plan: Plan, vocabulary: Vocabulary, formatter: LogprobFormatter, echo: str
    ) -> None:
        self.index = index
        self._text: TextAssembler[TokenLogprob] = TextAssembler(plan.stop)
        self._token_bytes = vocabulary.token_bytes
        self._formatter = formatter if plan.num_top_logprobs is not None else None
        self._chat = plan.chat
        # Completions' text offsets count the echoed prompt.
        self._offset = len(echo)

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    def add(self, token: int, logprob: TokenLogprob | None) -> Delta | None:
        return self._delta(self._text.feed(self._token_bytes(token), logprob))

    def finish(self) -> Delta | None:
        return self._delta(self._text.finish())

    def _delta(self, text: str) -> Delta | None:
        logprobs = None
        if self._formatter is not None:
            released = self._text.take_tokens()
            if released:
                if self._chat:
                    logprobs = self._formatter.chat([entry for _, entry in released])
                else:
                    logprobs = self._formatter.completion(
                        [(self._offset + start, entry.token, entry) for start, entry in released]
                    )
        if not text and logprobs is None:
            return None
        return Delta(text, index=self.index, logprobs=logprobs)


@dataclass(slots=True)
class _Counts:
    """A request's tokens so far, over all its prompts and choices."""

    num_prompt: int = 0
    num_generated: int = 0

    def usage(self) -> Usage:
        return Usage(self.num_prompt, self.num_generated)


class EmbeddedEngine(Engine):
    """SmolLM2-135M-Instruct in process, ``num_slots`` sequences at a time."""

    name = "embedded"
    supports_pause = True
    # Not tools (SmolLM2 has no tool-call format), images or audio (it reads
    # text only), suffix (no fill-in-the-middle tokens in its vocabulary),
    # best_of, embeddings `dimensions`, nor fields it does not know.
    features = frozenset({
        Feature.JSON_OBJECT, Feature.JSON_SCHEMA, Feature.LOGPROBS, Feature.N, Feature.PENALTIES,
        Feature.LOGIT_BIAS, Feature.COMPLETIONS, Feature.TOKEN_PROMPTS, Feature.ECHO,
        Feature.EMBEDDINGS,
    })

    def __init__(
        self,
        model_path: str | None = None,
        *,
        num_slots: int = 4,
        max_decoding: int = 0,
        n_ctx: int = 2048,
        model_id: str = "smollm2-135m-instruct",
    ) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be at least 1")
        if max_decoding < 0:
            raise ValueError("max_decoding must be 0 (one per CPU) or more")
        if n_ctx < 16:
            raise ValueError("n_ctx must be at least 16 tokens")
        self._model_path = model_path
        self._num_slots = num_slots
        # More permits than slots would never be used, and would shrink the
        # threads each context gets for nothing.
        self._max_decoding = min(num_slots, max_decoding or usable_cpus())
        self._n_threads = threads_per_context(self._max_decoding)
        self._requested_n_ctx = n_ctx
        self._model_id = model_id
        self._path: Path | None = None
        self._model: LoadedModel | None = None
        self._logprobs: LogprobFormatter | None = None
        self._slots: list[_Slot] = []
        self._free_slots: asyncio.Queue[_Slot] = asyncio.Queue()
        self._decode_permits = asyncio.Semaphore(self._max_decoding)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # The embedding context, made on first use; one request at a time.
        self._embedder: Embedder | None = None
        self._embedding_lock = asyncio.Lock()
        self._num_embedding = 0
        self._n_ctx = n_ctx
        self._num_waiting = 0
        self._closed = False

    # --- what the scheduler reads -------------------------------------------

    @property
    def capacity(self) -> int:
        return self._num_slots

    @property
    def n_threads(self) -> int:
        """llama.cpp threads per context (decode and prompt processing)."""
        return self._n_threads

    @property
    def max_decoding(self) -> int:
        """Sequences allowed to run a step at the same time."""
        return self._max_decoding

    @property
    def n_ctx(self) -> int:
        """Context length of each slot, in tokens (known exactly after ``start``)."""
        return self._n_ctx

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self._model_id, max_model_len=self._n_ctx)]

    async def read_load(self) -> EngineLoad:
        held = sum(slot.num_tokens for slot in self._slots)
        return EngineLoad(
            num_running=len(self._slots) - self._free_slots.qsize() + self._num_embedding,
            num_waiting=self._num_waiting,
            kv_cache_usage=held / (self._num_slots * self._n_ctx),
        )

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._slots:
            return
        path = Path(self._model_path) if self._model_path else find_smollm2_gguf()
        # Loading reads and maps the weights: seconds of work that must not
        # stall the event loop.
        model = await asyncio.to_thread(
            load_model,
            path,
            num_contexts=self._num_slots,
            n_ctx=self._requested_n_ctx,
            n_threads=self._n_threads,
            batch_size=PREFILL_CHUNK,
        )
        self._path, self._model, self._n_ctx = path, model, model.n_ctx
        self._logprobs = LogprobFormatter(model.vocabulary.spell)
        self._slots = [_Slot(i, context) for i, context in enumerate(model.contexts)]
        for slot in self._slots:
            self._free_slots.put_nowait(slot)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_decoding, thread_name_prefix="flexserve-embedded"
        )

    async def close(self) -> None:
        self._closed = True
        # Busy slots are freed when their request ends (see _release); so is
        # an embedder in use.
        while not self._free_slots.empty():
            self._free_slots.get_nowait().context.close()
        if self._embedder is not None and not self._embedding_lock.locked():
            self._embedder.close()
            self._embedder = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _loaded(self) -> LoadedModel:
        if self._closed:
            raise EngineUnavailableError("The embedded engine is closed.")
        if self._model is None:
            raise EngineUnavailableError("The embedded engine has not been started.")
        return self._model

    # --- chat and completions ---------------------------------------------------

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat formatted with the model's own template, as tokens."""
        model = self._loaded()
        return chat_prompt_tokens(model.template, model.vocabulary, messages)

    def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncGenerator[Delta, None]:
        if request.op == "embedding":
            return self._embed(request, control)
        return self._complete(request, control)

    async def _complete(
        self, request: EngineRequest, control: SequenceControl | None
    ) -> AsyncGenerator[Delta, None]:
        model = self._loaded()
        if request.op == "chat":
            plan = chat_plan(request, model.template, model.vocabulary, self._n_ctx)
        else:
            plan = completion_plan(request, model.vocabulary, self._n_ctx)
        self._num_waiting += 1
        try:
            slot = await self._free_slots.get()
        finally:
            self._num_waiting -= 1
        counts = _Counts()
        try:
            for prompt_index, prompt in enumerate(plan.prompts):
                counts.num_prompt += len(prompt.tokens)
                max_new = plan.max_new_tokens(prompt, self._n_ctx)
                scored = await self._prefill(slot, prompt, plan, max_new > 0, control)
                for j in range(plan.n):
                    index = prompt_index * plan.n + j
                    if plan.echo:
                        yield self._echo(index, prompt, plan, scored, counts.usage())
                    choice = self._choice(slot, plan, prompt, max_new, index, j, counts, control)
                    # Closed here, not when collected: its sampler is freed before the slot.
                    async with aclosing(choice):
                        async for delta in choice:
                            yield delta
        finally:
            self._release(slot)

    async def _choice(
        self,
        slot: _Slot,
        plan: Plan,
        prompt: Prompt,
        max_new: int,
        index: int,
        choice_number: int,
        counts: _Counts,
        control: SequenceControl | None,
    ) -> AsyncGenerator[Delta, None]:
        """One choice (``choice_number`` of the prompt's ``n``), the prompt
        already evaluated but for its last token; ``index`` is its index in
        the response."""
        assert self._model is not None and self._logprobs is not None
        vocabulary = self._model.vocabulary
        output = _ChoiceOutput(index, plan, vocabulary, self._logprobs, prompt.echo)
        finish = "length"
        if max_new > 0:
            context = slot.context
            end_tokens = vocabulary.end_tokens
            num_top = plan.num_top_logprobs
            # The prompt stays; the last choice's tokens go.
            context.truncate(len(prompt.tokens) - 1)
            seed = plan.sampling.choice_seed(choice_number)
            with closing(vocabulary.sampler(plan.sampling, seed, self._n_ctx)) as sampler:
                # The first step evaluates the prompt's last token and samples from its logits.
                token = prompt.tokens[-1]
                position = len(prompt.tokens) - 1
                for _ in range(max_new):
                    if control is not None:
                        await control.wait_runnable()
                    token, logprob = await self._in_worker(
                        partial(context.step, token, position, sampler, num_top)
                    )
                    position += 1
                    counts.num_generated += 1
                    slot.num_tokens = position
                    if token in end_tokens:
                        finish = "stop"
                        break
                    delta = output.add(token, logprob)
                    if delta is not None:
                        # Usage so far rides along: a stream cut short is billed exactly.
                        delta.usage = counts.usage()
                        yield delta
                    if output.stopped:
                        finish = "stop"
                        break
        tail = output.finish()
        if tail is not None:
            tail.usage = counts.usage()
            yield tail
        yield Delta("", finish, counts.usage(), index=index)

    async def _prefill(
        self,
        slot: _Slot,
        prompt: Prompt,
        plan: Plan,
        generates: bool,
        control: SequenceControl | None,
    ) -> list[TokenLogprob]:
        """Evaluate all of the prompt but its last token, which each choice's
        first step evaluates; return the prompt's own log probabilities if the
        plan echoes them (from the second token on: the first has none)."""
        context = slot.context
        # Evaluation appends to what the context holds: start from nothing.
        # Nothing is reused from the previous request either, so a seed gives
        # the same text in any slot, whatever ran there before.
        context.clear()
        slot.num_tokens = 0
        scored: list[TokenLogprob] = []
        if not (generates or plan.scores_prompt):
            return scored
        tokens = prompt.tokens
        num_top = plan.num_top_logprobs or 0
        end = len(tokens) - 1
        for start in range(0, end, PREFILL_CHUNK):
            if control is not None:
                await control.wait_runnable()
            stop = min(start + PREFILL_CHUNK, end)
            following = tokens[start + 1 : stop + 1] if plan.scores_prompt else None
            scored += await self._in_worker(
                partial(context.prefill, tokens[start:stop], start, following, num_top)
            )
            slot.num_tokens = stop
        return scored

    def _echo(
        self, index: int, prompt: Prompt, plan: Plan, scored: list[TokenLogprob], usage: Usage
    ) -> Delta:
        """A completion's echoed prompt, with its tokens' log probabilities when asked for."""
        formatter = self._logprobs
        logprobs = None
        if formatter is not None and plan.num_top_logprobs is not None:
            entries: list[tuple[int, int, TokenLogprob | None]] = []
            offset = 0
            for i, token in enumerate(prompt.tokens):
                entries.append((offset, token, scored[i - 1] if i else None))
                offset += len(formatter.text(token))
            logprobs = formatter.completion(entries)
        return Delta(prompt.echo, index=index, logprobs=logprobs, usage=usage)

    # --- embeddings -------------------------------------------------------------

    async def _embed(
        self, request: EngineRequest, control: SequenceControl | None
    ) -> AsyncGenerator[Delta, None]:
        model = self._loaded()
        inputs = embedding_inputs(request, model.vocabulary, self._n_ctx)
        self._num_waiting += 1
        try:
            await self._embedding_lock.acquire()
        finally:
            self._num_waiting -= 1
        self._num_embedding += 1
        try:
            embedder = await self._ready_embedder()
            run = embedder.start(inputs)
            for chunk in run.chunks:
                if control is not None:
                    await control.wait_runnable()
                await self._in_worker(partial(run.run, chunk))
            data = run.objects(request.body.get("encoding_format"))
        finally:
            self._num_embedding -= 1
            self._embedding_lock.release()
            if self._closed and self._embedder is not None and not self._embedding_lock.locked():
                self._embedder.close()
                self._embedder = None
        num_tokens = sum(len(tokens) for tokens in inputs)
        yield Delta(data=data, finish_reason="stop", usage=Usage(num_tokens, 0))

    async def _ready_embedder(self) -> Embedder:
        if self._closed or self._path is None:
            raise EngineUnavailableError("The embedded engine is closed.")
        if self._embedder is None:
            self._embedder = await asyncio.to_thread(
                load_embedder,
                self._path,
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                chunk_size=PREFILL_CHUNK,
            )
        return self._embedder

    # --- steps and slots ----------------------------------------------------------

    async def _in_worker(self, step: Callable[[], _T]) -> _T:
        """Run one step in a worker thread, holding a decode permit."""
        async with self._decode_permits:
            if self._closed or self._executor is None:
                raise EngineUnavailableError("The embedded engine was closed.")
            job = self._executor.submit(step)
            try:
                return await asyncio.wrap_future(job)
            except asyncio.CancelledError:
                # The thread cannot be interrupted; the permit and the context
                # stay taken until it is done with them.
                await _settle(job)
                raise
            except (RuntimeError, ValueError, OSError) as exc:
                raise EngineError(f"llama.cpp failed to decode: {exc}") from exc

    def _release(self, slot: _Slot) -> None:
        # Called with no step in flight: the context is idle.
        slot.num_tokens = 0
        if self._closed:
            slot.context.close()
        else:
            self._free_slots.put_nowait(slot)
