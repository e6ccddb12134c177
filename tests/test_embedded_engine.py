"""The embedded engine end to end, on the real SmolLM2-135M-Instruct model.

One engine (two slots) is loaded per module; completions stay short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing
from typing import Any

import pytest

from flexserve.engines.base import Delta, EngineRequest, SequenceControl
from flexserve.engines.embedded import EmbeddedEngine, find_smollm2_gguf
from flexserve.engines.embedded.text import TextAssembler
from flexserve.errors import InvalidRequestError

pytestmark = pytest.mark.embedded

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Write a long story about a brave knight and a dragon."}]


def chat(messages: list[dict[str, Any]], **params: Any) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    return EngineRequest.chat("test", "smollm2-135m-instruct", messages, **params)


async def run(
    engine: EmbeddedEngine, request: EngineRequest, control: SequenceControl | None = None
) -> tuple[str, Delta]:
    """The completion's text and its final delta."""
    deltas = [delta async for delta in engine.generate(request, control)]
    final = deltas[-1]
    assert final.finish_reason is not None and final.usage is not None
    assert all(d.finish_reason is None and d.text for d in deltas[:-1])
    # Earlier deltas carry the usage so far (what a stream cut short is billed for).
    assert all(d.usage is not None and d.usage.completion_tokens >= 1 for d in deltas[:-1])
    assert final.text == ""
    return "".join(d.text for d in deltas[:-1]), final


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(num_slots=2)
    await engine.start()
    yield engine
    await engine.close()


PromptCounter = Callable[[list[dict[str, Any]]], tuple[str, int]]


@pytest.fixture(scope="module")
def reference_prompt_tokens() -> PromptCounter:
    """Counts a chat's prompt tokens the way any llama.cpp client would: the
    GGUF's own chat template, then the model's tokenizer (vocabulary only)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = Llama(model_path=str(find_smollm2_gguf()), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"],
        eos_token=vocab.detokenize([vocab.token_eos()], special=True).decode(),
        bos_token=vocab.detokenize([vocab.token_bos()], special=True).decode(),
    )

    def count(messages: list[dict[str, Any]]) -> tuple[str, int]:
        prompt = formatter(messages=messages).prompt  # type: ignore[arg-type]
        return prompt, len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))

    return count


async def test_short_chat_answers_with_exact_usage(
    engine: EmbeddedEngine, reference_prompt_tokens: PromptCounter
) -> None:
    text, final = await run(engine, chat(FRANCE, max_tokens=24))

    assert "Paris" in text
    prompt, num_prompt_tokens = reference_prompt_tokens(FRANCE)
    question = FRANCE[0]["content"]
    assert prompt.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert final.usage is not None
    assert final.usage.prompt_tokens == num_prompt_tokens
    # The model ends its turn: the end-of-turn token is counted but never shown.
    assert final.finish_reason == "stop"
    assert 2 <= final.usage.completion_tokens < 24
    assert "<|im_end|>" not in text


async def test_max_tokens_gives_exactly_that_many_and_length(engine: EmbeddedEngine) -> None:
    text, final = await run(engine, chat(STORY, max_tokens=5))

    assert text
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 5


async def test_a_full_context_ends_the_completion_with_length() -> None:
    # Two slots, so one llama.cpp thread per context as in the module's engine.
    small = EmbeddedEngine(num_slots=2, n_ctx=256)
    await small.start()
    try:
        padding = "the cat sat on the mat. " * 28
        long_chat = [
            {"role": "user", "content": padding + "Now write a long story about a knight."}
        ]
        # No max_tokens: only the context (about 20 tokens left) stops it.
        _, final = await run(small, chat(long_chat))
    finally:
        await small.close()

    assert final.finish_reason == "length"
    assert final.usage is not None
    assert final.usage.prompt_tokens > 200
    assert final.usage.prompt_tokens + final.usage.completion_tokens == small.n_ctx == 256


async def test_same_seed_and_temperature_give_the_same_text(engine: EmbeddedEngine) -> None:
    def sampled(seed: int) -> EngineRequest:
        return chat(STORY, max_tokens=16, temperature=0.7, seed=seed)

    first, _ = await run(engine, sampled(1234))
    second, _ = await run(engine, sampled(1234))
    others = [(await run(engine, sampled(seed)))[0] for seed in (1, 2, 3)]

    assert first == second
    assert any(other != first for other in others), "the seed has no effect on sampling"


async def test_stop_string_is_never_emitted(engine: EmbeddedEngine) -> None:
    full, _ = await run(engine, chat(FRANCE, max_tokens=24))
    assert "Paris" in full

    text, final = await run(engine, chat(FRANCE, max_tokens=24, stop=["Paris", "zzz"]))

    assert "Paris" not in text
    assert text == full[: full.index("Paris")]
    assert final.finish_reason == "stop"


async def test_paused_sequence_waits_while_another_completes(engine: EmbeddedEngine) -> None:
    uninterrupted, _ = await run(engine, chat(STORY, max_tokens=20))
    control = SequenceControl()
    async with aclosing(engine.generate(chat(STORY, max_tokens=20), control)) as paused:
        head = [await anext(paused) for _ in range(3)]

        control.pause()
        next_delta = asyncio.ensure_future(anext(paused))
        try:
            other_text, other_final = await run(engine, chat(FRANCE, max_tokens=12))

            assert other_text and other_final.usage is not None
            assert not next_delta.done(), "the paused sequence produced a token"
            load = await engine.read_load()
            assert load.num_running == 1  # the paused sequence keeps its slot
            assert load.kv_cache_usage is not None and load.kv_cache_usage > 0

            control.resume()
            rest = [await next_delta] + [delta async for delta in paused]
        finally:
            # On failure: end the pending step so that aclosing can close the stream.
            next_delta.cancel()
            await asyncio.gather(next_delta, return_exceptions=True)

    final = rest[-1]
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 20
    # Its context survived the pause: the text is what it would have been.
    assert "".join(d.text for d in head + rest) == uninterrupted
    assert control.num_pauses == 1


async def test_aclose_mid_generation_frees_the_slot(engine: EmbeddedEngine) -> None:
    async with aclosing(engine.generate(chat(STORY, max_tokens=60))) as stream:
        await anext(stream)
        await anext(stream)
        busy = await engine.read_load()
        assert busy.num_running == 1
        assert busy.kv_cache_usage is not None and busy.kv_cache_usage > 0

        await stream.aclose()

        idle = await engine.read_load()
        assert (idle.num_running, idle.num_waiting, idle.kv_cache_usage) == (0, 0, 0.0)
    # The slot starts the next request clean.
    again, _ = await run(engine, chat(FRANCE, max_tokens=24))
    assert "Paris" in again


async def test_cancelled_consumer_waits_for_the_step_and_frees_the_slot(
    engine: EmbeddedEngine,
) -> None:
    # The first step evaluates a 64-token chunk of this prompt in a worker
    # thread (hundreds of ms), so the cancellation lands while it runs.
    long_chat = [{"role": "user", "content": "Summarise: " + "the cat sat on the mat. " * 20}]
    started = asyncio.Event()

    async def consume() -> None:
        started.set()
        async for _ in engine.generate(chat(long_chat, max_tokens=50)):
            pass

    task = asyncio.create_task(consume())
    try:
        await started.wait()
        await asyncio.sleep(0.05)
        assert (await engine.read_load()).num_running == 1
        task.cancel()
        # Not "generator already executing" nor a crash: the step was let finish.
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        task.cancel()

    load = await engine.read_load()
    assert (load.num_running, load.kv_cache_usage) == (0, 0.0)
    # Both slots at once, so the cancelled one is surely reused: had its step
    # still been running, the new request would share its context.
    answers = await asyncio.gather(*(run(engine, chat(FRANCE, max_tokens=24)) for _ in range(2)))
    assert all("Paris" in text for text, _ in answers)
    assert answers[0][0] == answers[1][0]


async def test_requests_beyond_the_slots_wait_for_one(engine: EmbeddedEngine) -> None:
    async with AsyncExitStack() as streams:
        holders = [
            await streams.enter_async_context(aclosing(engine.generate(chat(STORY, max_tokens=40))))
            for _ in range(2)
        ]
        for holder in holders:
            await anext(holder)
        third = asyncio.create_task(run(engine, chat(FRANCE, max_tokens=8)))
        streams.callback(third.cancel)
        await asyncio.sleep(0)  # one loop turn: the third request now waits in the slot queue

        load = await engine.read_load()
        assert (load.num_running, load.num_waiting) == (2, 1)
        assert not third.done()

        await holders[0].aclose()
        text, _ = await third
        assert text
        await holders[1].aclose()
        assert (await engine.read_load()).num_running == 0


async def test_overlong_prompt_is_an_invalid_request(engine: EmbeddedEngine) -> None:
    long_chat = [{"role": "user", "content": "hello " * 3000}]

    with pytest.raises(InvalidRequestError) as raised:
        await run(engine, chat(long_chat, max_tokens=4))

    assert raised.value.param == "messages"
    assert (await engine.read_load()).num_running == 0


def test_text_assembler_holds_back_a_split_stop_string() -> None:
    text: TextAssembler[object] = TextAssembler(["END"])

    released = [
        text.feed(b"the E"),
        text.feed(b"N"),
        text.feed(b"EMY "),
        text.feed(b"EN"),
        text.feed(b"D!"),
    ]

    assert released == ["the ", "", "ENEMY ", "", ""]
    assert text.stopped and text.finish() == ""


def test_text_assembler_joins_utf8_split_across_tokens() -> None:
    text: TextAssembler[object] = TextAssembler([])
    euro = "€".encode()

    assert [text.feed(euro[:1]), text.feed(euro[1:2]), text.feed(euro[2:] + b"5")] == ["", "", "€5"]
    assert text.finish() == ""


def test_text_assembler_never_releases_the_tokens_of_a_stop_string() -> None:
    text: TextAssembler[str] = TextAssembler(["END"])

    assert text.feed(b"the E", "t1") == "the "
    assert text.take_tokens() == [(0, "t1")]  # released with the first of its characters
    assert text.feed(b"N", "t2") == ""
    assert text.take_tokens() == []  # "EN" may start the stop string: held with its text
    assert text.feed(b"D!", "t3") == ""

    assert text.stopped and text.take_tokens() == []  # they only spelled the stop string


def test_text_assembler_releases_a_split_character_with_its_last_token() -> None:
    text: TextAssembler[str] = TextAssembler([])
    euro = "€".encode()

    assert text.feed(euro[:2], "a") == ""
    assert text.take_tokens() == []
    assert text.feed(euro[2:] + b"5", "b") == "€5"
    assert text.take_tokens() == [(0, "a"), (0, "b")]
