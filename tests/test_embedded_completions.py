"""The legacy completions API on the real embedded model: prompts read as
they are (no chat template), as text, texts or token ids, `n` choices per
prompt, `echo` with the prompt's own log probabilities (what evaluation
harnesses score texts with), and `max_tokens` 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from flexserve.engines.base import Delta, EngineRequest
from flexserve.engines.embedded import EmbeddedEngine
from flexserve.errors import InvalidRequestError

pytestmark = pytest.mark.embedded

MODEL = "smollm2-135m-instruct"
FRANCE = "The capital of France is"


def completion(prompt: Any, **params: Any) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 4)
    return EngineRequest("test", MODEL, {"model": MODEL, "prompt": prompt, **params}, "completion")


async def deltas_of(engine: EmbeddedEngine, request: EngineRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def choices(deltas: list[Delta]) -> dict[int, str]:
    out: dict[int, str] = {}
    for delta in deltas:
        out[delta.index] = out.get(delta.index, "") + delta.text
    return out


def logprob_lists(deltas: list[Delta], index: int = 0) -> dict[str, list[Any]]:
    """A choice's logprobs, its deltas' parallel lists concatenated."""
    names = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    lists: dict[str, list[Any]] = {name: [] for name in names}
    for delta in deltas:
        if delta.index == index and delta.logprobs is not None:
            for name, values in lists.items():
                values.extend(delta.logprobs[name])
    return lists


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(num_slots=2)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def tokenize() -> Any:
    from llama_cpp import Llama

    from flexserve.engines.embedded import find_smollm2_gguf

    vocab = Llama(model_path=str(find_smollm2_gguf()), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode(), add_bos=True, special=True)


async def test_a_text_prompt_is_continued_as_it_is(engine: EmbeddedEngine, tokenize: Any) -> None:
    deltas = await deltas_of(engine, completion(FRANCE))

    assert "Paris" in choices(deltas)[0]
    final = deltas[-1]
    assert final.finish_reason == "length"
    assert final.usage is not None
    # No chat template around it: the prompt's own tokens only.
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(tokenize(FRANCE)), 4)


async def test_token_ids_are_the_text_they_spell(engine: EmbeddedEngine, tokenize: Any) -> None:
    as_text = await deltas_of(engine, completion(FRANCE))
    as_ids = await deltas_of(engine, completion(tokenize(FRANCE)))

    assert choices(as_ids) == choices(as_text)
    assert as_ids[-1].usage == as_text[-1].usage


async def test_each_prompt_gets_n_choices(engine: EmbeddedEngine, tokenize: Any) -> None:
    prompts = [FRANCE, "The capital of Germany is"]

    deltas = await deltas_of(engine, completion(prompts, n=2))

    texts = choices(deltas)
    assert sorted(texts) == [0, 1, 2, 3]  # prompt index × n + choice
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy
    assert "Paris" in texts[0] and "Berlin" in texts[2]
    finals = [(d.index, d.finish_reason) for d in deltas if d.finish_reason]
    assert finals == [(0, "length"), (1, "length"), (2, "length"), (3, "length")]
    usage = deltas[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == sum(len(tokenize(p)) for p in prompts)  # once per prompt
    assert usage.completion_tokens == 4 * 4


async def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(engine: EmbeddedEngine) -> None:
    text = FRANCE + " Paris"

    scored = await deltas_of(engine, completion(text, max_tokens=0, echo=True, logprobs=2))
    generated = await deltas_of(engine, completion(FRANCE, max_tokens=1, logprobs=2))

    assert choices(scored)[0] == text
    lists = logprob_lists(scored)
    assert "".join(lists["tokens"]) == text
    assert all(
        text[offset : offset + len(token)] == token
        for token, offset in zip(lists["tokens"], lists["text_offset"], strict=True)
    )
    # The first token has nothing before it to be predicted from.
    assert lists["token_logprobs"][0] is None and lists["top_logprobs"][0] is None
    assert all(lp <= 0.0 for lp in lists["token_logprobs"][1:])
    assert all(1 <= len(top) <= 3 for top in lists["top_logprobs"][1:])
    # " Paris" scored in the prompt is " Paris" generated after the same words.
    after = logprob_lists(generated)
    assert after["tokens"] == [" Paris"]
    assert lists["tokens"][-1] == " Paris"
    assert lists["token_logprobs"][-1] == pytest.approx(after["token_logprobs"][0], abs=1e-3)
    final = scored[-1]
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 0


async def test_echo_comes_before_the_completion(engine: EmbeddedEngine) -> None:
    deltas = await deltas_of(engine, completion(FRANCE, max_tokens=3, echo=True, logprobs=1))

    text = choices(deltas)[0]
    assert text.startswith(FRANCE) and len(text) > len(FRANCE)
    lists = logprob_lists(deltas)
    assert "".join(lists["tokens"]) == text
    assert lists["text_offset"][-3] == len(FRANCE)  # the completion's first token
    assert all(len(top) <= 2 for top in lists["top_logprobs"][1:])


async def test_max_tokens_zero_answers_nothing(engine: EmbeddedEngine) -> None:
    deltas = await deltas_of(engine, completion(FRANCE, max_tokens=0))

    assert [(d.text, d.finish_reason) for d in deltas] == [("", "length")]
    assert deltas[0].usage is not None and deltas[0].usage.completion_tokens == 0


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("hello " * 3000, id="longer-than-the-context"),
        pytest.param([1, 2, 10**7], id="unknown-token-id"),
        pytest.param("", id="empty"),
    ],
)
async def test_a_prompt_the_model_cannot_take_is_an_invalid_request(
    engine: EmbeddedEngine, prompt: Any
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        await deltas_of(engine, completion(prompt))

    assert raised.value.param == "prompt"
    assert (await engine.read_load()).num_running == 0
