"""What the embedded engine honours beyond plain chat, on the real
SmolLM2-135M-Instruct model: structured outputs, log probabilities, `n`,
seeds per choice, penalties and logit bias, and pausing or closing a request
in the middle of its choices.

One engine (two slots) is loaded per module; completions stay short and
greedy wherever the text must be stable.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import jsonschema
import pytest

from flexserve.engines.base import Delta, EngineRequest, Feature, SequenceControl
from flexserve.engines.embedded import EmbeddedEngine
from flexserve.errors import InvalidRequestError

pytestmark = pytest.mark.embedded

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
STORY = [{"role": "user", "content": "Write a long story about a brave knight and a dragon."}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def chat(messages: list[dict[str, Any]], **params: Any) -> EngineRequest:
    params.setdefault("temperature", 0.0)
    return EngineRequest.chat("test", "smollm2-135m-instruct", messages, **params)


async def deltas_of(engine: EmbeddedEngine, request: EngineRequest) -> list[Delta]:
    return [delta async for delta in engine.generate(request)]


def texts(deltas: list[Delta]) -> dict[int, str]:
    """Each choice's whole text, by index."""
    out: dict[int, str] = {}
    for delta in deltas:
        out[delta.index] = out.get(delta.index, "") + delta.text
    return out


def logprob_entries(deltas: list[Delta], index: int = 0) -> list[dict[str, Any]]:
    return [
        entry for d in deltas if d.index == index and d.logprobs for entry in d.logprobs["content"]
    ]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(num_slots=2)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
def token_id() -> Any:
    """A text's single token id, from the model's own vocabulary."""
    from llama_cpp import Llama

    from flexserve.engines.embedded import find_smollm2_gguf

    vocab = Llama(model_path=str(find_smollm2_gguf()), vocab_only=True, verbose=False)

    def token(text: str) -> int:
        (single,) = vocab.tokenize(text.encode(), add_bos=False)
        return single

    return token


def test_features_are_what_llama_cpp_does_and_nothing_more() -> None:
    features = EmbeddedEngine.features
    assert {Feature.JSON_SCHEMA, Feature.LOGPROBS, Feature.ECHO, Feature.EMBEDDINGS} <= features
    assert features.isdisjoint(
        {Feature.TOOLS, Feature.IMAGES, Feature.AUDIO, Feature.SUFFIX, Feature.BEST_OF,
         Feature.DIMENSIONS, Feature.EXTRA_FIELDS}
    )


async def test_json_object_answer_parses(engine: EmbeddedEngine) -> None:
    ask = "Reply with a JSON object with keys city and country for Paris."
    question = [{"role": "user", "content": ask}]
    free = texts(await deltas_of(engine, chat(question, max_tokens=16)))[0]

    json_object = {"type": "json_object"}
    deltas = await deltas_of(engine, chat(question, max_tokens=48, response_format=json_object))

    answer = texts(deltas)[0]
    assert isinstance(json.loads(answer), dict)
    assert deltas[-1].finish_reason == "stop"
    # The grammar made the difference: unconstrained, the model fences its JSON in Markdown.
    with pytest.raises(ValueError):
        json.loads(free)


async def test_json_schema_answer_validates(engine: EmbeddedEngine) -> None:
    request = chat(
        [{"role": "user", "content": "Describe a person as JSON with name and age."}],
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
    )

    deltas = await deltas_of(engine, request)

    jsonschema.validate(json.loads(texts(deltas)[0]), PERSON_SCHEMA)
    assert deltas[-1].finish_reason == "stop"


async def test_a_schema_llama_cpp_cannot_follow_is_refused(engine: EmbeddedEngine) -> None:
    # A reference to another document: llama.cpp's converter fetches nothing.
    bad = {"type": "object", "properties": {"x": {"$ref": "https://example.com/elsewhere.json"}}}
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
    request = chat(FRANCE, response_format=format_)

    with pytest.raises(InvalidRequestError) as raised:
        await deltas_of(engine, request)

    assert raised.value.param == "response_format"
    assert (await engine.read_load()).num_running == 0


async def test_logprobs_are_the_models_own(engine: EmbeddedEngine) -> None:
    deltas = await deltas_of(engine, chat(STORY, max_tokens=8, logprobs=True, top_logprobs=5))

    entries = logprob_entries(deltas)
    assert deltas[-1].finish_reason == "length"
    assert len(entries) == 8
    assert "".join(e["token"] for e in entries) == texts(deltas)[0]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the chosen token is the likeliest, with the same log probability.
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert entry["bytes"] == list(entry["token"].encode())
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0
        assert all(t["logprob"] <= 0.0 for t in top)


async def test_logprobs_without_top_logprobs_list_none(engine: EmbeddedEngine) -> None:
    deltas = await deltas_of(engine, chat(FRANCE, max_tokens=3, logprobs=True))

    entries = logprob_entries(deltas)
    assert len(entries) == 3
    assert all(entry["top_logprobs"] == [] for entry in entries)


async def test_n_runs_every_choice_and_counts_them_all(engine: EmbeddedEngine) -> None:
    deltas = await deltas_of(engine, chat(STORY, n=2, max_tokens=6, temperature=1.0, seed=11))

    by_choice = texts(deltas)
    assert sorted(by_choice) == [0, 1]
    finals = [d for d in deltas if d.finish_reason is not None]
    assert [(d.index, d.finish_reason) for d in finals] == [(0, "length"), (1, "length")]
    usage = deltas[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    # The prompt is billed once, not once per choice.
    single = await deltas_of(engine, chat(STORY, max_tokens=1))
    assert single[-1].usage is not None and usage.prompt_tokens == single[-1].usage.prompt_tokens


async def test_choice_j_is_seeded_with_seed_plus_j(engine: EmbeddedEngine) -> None:
    def sampled(seed: int, n: int = 1) -> EngineRequest:
        return chat(STORY, n=n, max_tokens=12, temperature=1.0, seed=seed)

    both = texts(await deltas_of(engine, sampled(1234, n=2)))
    alone = texts(await deltas_of(engine, sampled(1234)))[0]
    next_seed = texts(await deltas_of(engine, sampled(1235)))[0]

    # n = 1 gives what choice 0 gives: a seed keeps its text whatever n is.
    assert both[0] == alone
    assert both[1] == next_seed
    assert both[0] != both[1]


async def test_logit_bias_bans_and_forces_tokens(engine: EmbeddedEngine, token_id: Any) -> None:
    paris = {token_id(" Paris"), token_id("Paris")}
    free = logprob_entries(await deltas_of(engine, chat(FRANCE, max_tokens=24, logprobs=True)))
    assert any(e["token"] in (" Paris", "Paris") for e in free)

    banned = await deltas_of(
        engine,
        chat(FRANCE, max_tokens=24, logprobs=True, logit_bias={str(t): -100 for t in paris}),
    )
    exclaim = {str(token_id("!")): 100}
    forced = await deltas_of(engine, chat(FRANCE, max_tokens=4, logit_bias=exclaim))

    assert all(e["token"] not in (" Paris", "Paris") for e in logprob_entries(banned))
    assert texts(forced)[0] == "!!!!"


async def test_logit_bias_on_a_token_the_model_lacks_is_refused(engine: EmbeddedEngine) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        await deltas_of(engine, chat(FRANCE, logit_bias={"999999": 5}))
    assert raised.value.param == "logit_bias"


async def test_frequency_penalty_makes_repeats_rarer(engine: EmbeddedEngine) -> None:
    async def tokens(**params: Any) -> list[str]:
        deltas = await deltas_of(engine, chat(STORY, max_tokens=48, logprobs=True, **params))
        return [e["token"] for e in logprob_entries(deltas)]

    plain = Counter(await tokens())
    penalised = Counter(await tokens(frequency_penalty=2.0))

    assert len(penalised) > len(plain)
    assert max(penalised.values()) < max(plain.values())


async def test_a_paused_request_waits_between_choices_too(engine: EmbeddedEngine) -> None:
    request = chat(STORY, n=2, max_tokens=6, temperature=1.0, seed=5)
    uninterrupted = texts(await deltas_of(engine, request))
    control = SequenceControl()
    received: list[Delta] = []
    async with aclosing(engine.generate(request, control)) as paused:
        async for delta in paused:
            received.append(delta)
            if delta.index == 1:
                break
        control.pause()
        next_delta = asyncio.ensure_future(anext(paused))
        try:
            other = await deltas_of(engine, chat(FRANCE, max_tokens=8))
            assert texts(other)[0]
            assert not next_delta.done(), "the paused request produced a token"
            control.resume()
            received += [await next_delta] + [delta async for delta in paused]
        finally:
            next_delta.cancel()
            await asyncio.gather(next_delta, return_exceptions=True)

    assert texts(received) == uninterrupted
    assert control.num_pauses == 1


async def test_closing_in_the_second_choice_frees_the_slot(engine: EmbeddedEngine) -> None:
    async with aclosing(engine.generate(chat(STORY, n=3, max_tokens=10))) as stream:
        async for delta in stream:
            if delta.index == 1:
                break
        assert (await engine.read_load()).num_running == 1
        await stream.aclose()

    load = await engine.read_load()
    assert (load.num_running, load.kv_cache_usage) == (0, 0.0)
