"""The sim engine's whole OpenAI surface, in process: n choices, tool calls,
structured output, log probabilities, completions and embeddings.

The text stays filler; what is checked is that every shape is right, every
structured document validates against its schema (with ``jsonschema``), the
usage adds up, and that the timing model counts the same tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexserve.engines.base import Delta, EngineRequest, Feature
from flexserve.engines.sim import PROFILES, SimEngine, SimModel
from flexserve.engines.sim.schema_instance import SchemaError, instance_of
from flexserve.engines.sim.tokenizer import FILLER_WORDS, split_tokens
from flexserve.errors import InvalidRequestError

H100 = PROFILES["h100-llama3-8b"]
FAST = 1000.0
USER = [{"role": "user", "content": "what is the weather like"}]  # 4 + 5 + 2 = 11 tokens

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "format": "uuid"}},
        "required": ["zone"]}}},
]
SCHEMAS: list[dict[str, Any]] = [
    WEATHER,
    {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
     "minItems": 2, "maxItems": 6, "uniqueItems": True},
    {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["name", "children"], "additionalProperties": False}},
     "$ref": "#/$defs/node"},
    {"anyOf": [{"type": "null"}, {"type": "string", "format": "date-time"}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 5}},
                "required": ["a"]},
               {"properties": {"b": {"type": ["boolean", "null"]}}, "required": ["b"]}]},
    {"type": "object", "minProperties": 3, "additionalProperties": {"type": "integer"}},
    {"prefixItems": [{"const": "head"}, {"type": "integer", "minimum": -3, "maximum": -1}],
     "items": False, "minItems": 2},
    {"definitions": {"id": {"type": "string", "minLength": 30}},
     "type": "object", "properties": {"ids": {"type": "array", "items": {"$ref": "#/definitions/id"},
                                              "minItems": 1}},
     "required": ["ids"]},
    {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
               {"type": "integer", "exclusiveMaximum": 0}]},
    # A decimal step, which floating point makes hard to hit exactly.
    {"type": "array", "items": {"type": "number", "minimum": 0.2, "maximum": 3,
                                "multipleOf": 0.1}, "minItems": 5},
    # Draft 4's boolean exclusive bounds: 1 is the only answer.
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": 0,
     "exclusiveMinimum": True, "maximum": 1},
]


def chat(request_id: str, messages: list[dict[str, Any]] | None = None,
         **fields: Any) -> EngineRequest:
    return EngineRequest.chat(request_id, "m", messages or USER, **fields)


def completion(request_id: str, **body: Any) -> EngineRequest:
    return EngineRequest(request_id, "m", {"model": "m", **body}, "completion")


def embedding(request_id: str, **body: Any) -> EngineRequest:
    return EngineRequest(request_id, "m", {"model": "m", **body}, "embedding")


async def collect(model: SimModel, request: EngineRequest) -> list[Delta]:
    return [delta async for delta in model.generate(request)]


def by_choice(deltas: list[Delta]) -> dict[int, list[Delta]]:
    out: dict[int, list[Delta]] = {}
    for delta in deltas:
        out.setdefault(delta.index, []).append(delta)
    return out


def tool_call(deltas: list[Delta]) -> dict[str, Any]:
    """One choice's tool-call deltas merged as a client merges them, by index."""
    call: dict[str, Any] = {}
    for delta in deltas:
        for piece in delta.tool_calls or ():
            assert piece["index"] == 0
            if "id" in piece:
                assert not call, "only the first piece names the call"
                call = {"id": piece["id"], "type": piece["type"],
                        "name": piece["function"]["name"], "arguments": ""}
            call["arguments"] += piece["function"]["arguments"]
    return call


def validator(schema: Any) -> Any:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(params=["instant", "timed"])
def model(request: pytest.FixtureRequest) -> SimModel:
    return SimModel("instant") if request.param == "instant" else SimModel(H100, speed=FAST)


# --- what the engine says it honours ------------------------------------------------


def test_features_are_a_text_only_vllm_server() -> None:
    assert SimEngine().features == {
        Feature.TOOLS, Feature.JSON_OBJECT, Feature.JSON_SCHEMA, Feature.LOGPROBS, Feature.N,
        Feature.PENALTIES, Feature.LOGIT_BIAS, Feature.COMPLETIONS, Feature.TOKEN_PROMPTS,
        Feature.ECHO, Feature.EMBEDDINGS, Feature.DIMENSIONS,
    }


# --- n choices -------------------------------------------------------------------------


async def test_n_choices_are_distinct_and_usage_adds_them_up(model: SimModel) -> None:
    deltas = await collect(model, chat("n3", n=3, max_tokens=6, seed=11))
    choices = by_choice(deltas)
    assert sorted(choices) == [0, 1, 2]
    texts = {i: "".join(d.text for d in ds) for i, ds in choices.items()}
    assert len(set(texts.values())) == 3
    for ds in choices.values():
        assert [d.finish_reason for d in ds].count("length") == 1
        assert ds[-1].finish_reason == "length"
    last = deltas[-1]
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 18)
    assert all(len(t.split()) == 6 for t in texts.values())
    # Choice 0 says what the same request with n=1 says.
    alone = await collect(model, chat("n1", max_tokens=6, seed=11))
    assert "".join(d.text for d in alone) == texts[0]
    await model.close()


async def test_n_choices_share_one_prefill_and_decode_together() -> None:
    model = SimModel(H100, speed=FAST)
    await collect(model, chat("n4", n=4, max_tokens=10))
    # One step prefills the prompt and samples a token for each choice; nine
    # steps decode one token for each of the four choices.
    assert model.num_steps == 10
    assert model.num_generation_tokens == 40
    assert model.num_prompt_tokens == 11
    buckets = model.iteration_tokens.buckets
    # Nine decode steps of 4 tokens, the prefill step of 11.
    assert model.iteration_tokens.cumulative()[buckets.index(8)] == 9
    assert model.ttft.count == 4 and model.itl.count == 36
    assert model.kv_cache_usage == 0.0 and model.num_running == 0
    await model.close()


async def test_n_choices_after_a_chunked_prefill() -> None:
    model = SimModel(H100, speed=FAST, max_num_batched_tokens=256)
    prompt = [{"role": "user", "content": " ".join(["w"] * 594)}]  # 600 tokens
    deltas = await collect(model, chat("chunked", prompt, n=3, max_tokens=5))
    # Prefill in chunks of 256, 256 and 88, the last sampling a token for each
    # choice; then four steps decode the three choices together.
    assert model.num_steps == 3 + 4
    assert model.ttft.count == 3 and model.num_generation_tokens == 15
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 15
    await model.close()


async def test_n_choices_survive_preemption() -> None:
    # Each request holds 54 + 2 x 100 = 254 KV tokens at its end; two do not fit in 300.
    model = SimModel(H100, speed=FAST, kv_tokens=300)
    long_prompt = [{"role": "user", "content": " ".join(["w"] * 48)}]
    results = await asyncio.gather(*(collect(model, chat(f"q{i}", long_prompt, n=2, max_tokens=100))
                                     for i in range(2)))
    assert model.num_preemptions >= 1
    for deltas in results:
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 200
        for ds in by_choice(deltas).values():
            assert len("".join(d.text for d in ds).split()) == 100
    assert model.kv_cache_usage == 0.0
    await model.close()


async def test_aborting_n_choices_frees_their_kv() -> None:
    model = SimModel(H100, speed=FAST)
    agen = model.generate(chat("abort", n=5, max_tokens=400))
    await anext(agen)
    assert model.num_running == 1 and model.kv_cache_usage > 0
    await agen.aclose()
    assert model.num_running == 0 and model.kv_cache_usage == 0.0
    await model.close()


# --- tool calls ------------------------------------------------------------------------


async def test_tool_call_arguments_validate_and_stream_as_they_answer_whole() -> None:
    instant, timed = SimModel("instant"), SimModel(H100, speed=FAST)
    request = chat("t", tools=TOOLS, seed=3)
    [whole] = await collect(instant, request)
    streamed = await collect(timed, chat("t", tools=TOOLS, seed=3))
    assert whole.tool_calls is not None and len(whole.tool_calls) == 1
    assert whole.finish_reason == streamed[-1].finish_reason == "tool_calls"
    assert whole.text == "" and all(d.text == "" for d in streamed)
    call = tool_call([whole])
    assert call == tool_call(streamed)
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["name"] == "get_weather"
    validator(WEATHER).validate(json.loads(call["arguments"]))
    # The first streamed piece names the call with no arguments yet; then one
    # piece of a few characters per token.
    first = streamed[0].tool_calls
    assert first is not None and first[0]["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [d.tool_calls[0]["function"]["arguments"] for d in streamed[1:] if d.tool_calls]
    assert all(0 < len(p) <= 4 for p in pieces)
    usage = streamed[-1].usage
    assert usage is not None and usage.completion_tokens == 1 + len(pieces)
    assert whole.usage == usage
    await timed.close()


async def test_tool_choice_picks_the_function() -> None:
    model = SimModel("instant")
    named = {"type": "function", "function": {"name": "get_time"}}
    [delta] = await collect(model, chat("named", tools=TOOLS, tool_choice=named))
    call = tool_call([delta])
    assert call["name"] == "get_time"
    validator(TOOLS[1]["function"]["parameters"]).validate(json.loads(call["arguments"]))
    # A named function's call ends with "stop" (OpenAI's and vLLM's), any other with "tool_calls".
    assert delta.finish_reason == "stop"
    [required] = await collect(model, chat("req", tools=TOOLS, tool_choice="required"))
    assert tool_call([required])["name"] == "get_weather"
    assert required.finish_reason == "tool_calls"
    [none] = await collect(model, chat("none", tools=TOOLS, tool_choice="none", max_tokens=5))
    assert none.tool_calls is None and len(none.text.split()) == 5
    assert none.finish_reason == "length"


async def test_tools_and_tool_calls_count_as_prompt_words() -> None:
    model = SimModel("instant")
    [plain] = await collect(model, chat("p", max_tokens=1))
    [with_tools] = await collect(model, chat("t", tools=TOOLS[:1], tool_choice="none",
                                             max_tokens=1))
    assert plain.usage is not None and with_tools.usage is not None
    assert with_tools.usage.prompt_tokens == plain.usage.prompt_tokens + 4 + len(
        json.dumps(TOOLS[0]).split())
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny and warm"}]
    [answer] = await collect(model, chat("h", history, max_tokens=1))
    assert answer.usage is not None
    # 11, then the call (4 + 1 name + 4 argument words), then the tool (4 + 3).
    assert answer.usage.prompt_tokens == 11 + 9 + 7


async def test_a_tool_call_cut_by_max_tokens_ends_with_length() -> None:
    model = SimModel("instant")
    [whole] = await collect(model, chat("c", tools=TOOLS, seed=5))
    [cut] = await collect(model, chat("c", tools=TOOLS, seed=5, max_tokens=3))
    assert cut.finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    full = tool_call([whole])["arguments"]
    assert full.startswith(tool_call([cut])["arguments"])
    assert len(tool_call([cut])["arguments"]) == 8  # two pieces of four characters


# --- structured output -----------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_json_schema_output_validates(schema: dict[str, Any]) -> None:
    model = SimModel("instant")
    check = validator(schema)
    for seed in range(10):
        request = chat("s", seed=seed, response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        [delta] = await collect(model, request)
        assert delta.finish_reason == "stop"
        check.validate(json.loads(delta.text))
        assert delta.usage is not None
        assert delta.usage.completion_tokens == math.ceil(len(delta.text) / 4)


async def test_json_schema_streams_a_token_per_piece_and_can_be_cut() -> None:
    timed = SimModel(H100, speed=FAST)
    form = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    deltas = await collect(timed, chat("j", seed=1, response_format=form))
    text = "".join(d.text for d in deltas)
    validator(WEATHER).validate(json.loads(text))
    assert all(0 < len(d.text) <= 4 for d in deltas)
    cut = await collect(timed, chat("j", seed=1, response_format=form, max_tokens=2))
    assert "".join(d.text for d in cut) == text[:8]
    assert cut[-1].finish_reason == "length"
    await timed.close()


async def test_json_object_is_an_object_of_filler() -> None:
    model = SimModel("instant")
    [delta] = await collect(model, chat("o", seed=2, response_format={"type": "json_object"}))
    document = json.loads(delta.text)
    assert list(document) == ["answer"]
    assert set(document["answer"].split()) <= {w.strip() for w in FILLER_WORDS}


json_leaf = st.one_of(
    st.fixed_dictionaries({"type": st.just("boolean")}),
    st.fixed_dictionaries({"type": st.just("null")}),
    st.builds(lambda lo, span, strict: {"type": "integer", "minimum": lo, "maximum": lo + span,
                                        **({"exclusiveMinimum": lo} if strict and span else {})},
              st.integers(-1000, 1000), st.integers(0, 50), st.booleans()),
    # The range spans two steps at least, so that a multiple lies within it.
    st.builds(lambda lo, span, step: {"type": "number", "minimum": lo,
                                      "maximum": lo + span + 2 * (step or 0),
                                      **({"multipleOf": step} if step else {})},
              st.floats(-100, 100, allow_nan=False), st.floats(1, 100, allow_nan=False),
              st.sampled_from([None, 0.5, 2, 0.25, 10, 0.1, 0.01])),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 40), st.integers(0, 40)),
    st.builds(lambda values: {"enum": values},
              st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), min_size=1,
                       max_size=4)),
    st.sampled_from([{"type": "string", "format": f} for f in
                     ("date-time", "date", "time", "email", "uuid", "ipv4", "ipv6", "uri")]),
)


@st.composite
def object_schemas(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(st.text("abcdef", min_size=1, max_size=4), inner, max_size=4))
    names = sorted(props)
    required = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


json_schemas = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.builds(lambda items, lo, extra, unique: {"type": "array", "items": items,
                                                    "minItems": lo, "maxItems": lo + extra,
                                                    **({"uniqueItems": True} if unique else {})},
                  inner, st.integers(0, 3), st.integers(0, 3), st.just(False)),
        object_schemas(inner),
        st.builds(lambda branches: {"anyOf": branches}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda kinds: {"type": kinds},
                  st.lists(st.sampled_from(["string", "integer", "boolean", "null", "number"]),
                           min_size=1, max_size=3, unique=True)),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=json_schemas, seed=st.integers(0, 2**32))
def test_any_generated_schema_gets_a_valid_instance(schema: dict[str, Any], seed: int) -> None:
    value = instance_of(schema, random.Random(seed))
    validator(schema).validate(value)
    # And survives the trip through JSON text, as the sim sends it.
    validator(schema).validate(json.loads(json.dumps(value, ensure_ascii=False)))


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^[a-z]+$"},
    {"not": {"type": "string"}},
    {"type": "integer", "minimum": 5, "maximum": 4},
    {"$ref": "#/$defs/missing"},
    {"$ref": "https://example.com/schema.json"},
    {"$ref": "#"},
    {"type": "object", "required": ["a"], "additionalProperties": False},
    {"type": "array", "items": {"enum": [1]}, "minItems": 2, "uniqueItems": True},
    {"properties": {"a": {"type": "integer"}}, "required": ["a"], "minItems": "two",
     "type": "object", "maxProperties": "x"},
])
def test_schemas_it_cannot_honour_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        instance_of(schema, random.Random(0))


# --- log probabilities -------------------------------------------------------------------


async def test_chat_logprobs_have_one_entry_per_token(model: SimModel) -> None:
    deltas = await collect(model, chat("l", max_tokens=12, seed=4, logprobs=True, top_logprobs=3))
    entries = [e for d in deltas for e in (d.logprobs or {}).get("content", [])]
    text = "".join(d.text for d in deltas)
    assert len(entries) == 12 and "".join(e["token"] for e in entries) == text
    for entry in entries:
        assert entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]
        assert top[0]["logprob"] == entry["logprob"]
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert len({t["token"] for t in top}) == 3
        assert all(t["bytes"] == list(t["token"].encode()) for t in top)
    # The same seed gives the same values, and no top_logprobs gives empty lists.
    again = await collect(model, chat("l", max_tokens=12, seed=4, logprobs=True))
    entries_again = [e for d in again for e in (d.logprobs or {}).get("content", [])]
    assert [e["logprob"] for e in entries_again] == [e["logprob"] for e in entries]
    assert all(e["top_logprobs"] == [] for e in entries_again)
    await model.close()


async def test_tool_call_tokens_carry_logprobs() -> None:
    model = SimModel("instant")
    [delta] = await collect(model, chat("tl", tools=TOOLS, seed=3, logprobs=True))
    assert delta.logprobs is not None and delta.usage is not None
    tokens = [e["token"] for e in delta.logprobs["content"]]
    assert len(tokens) == delta.usage.completion_tokens
    assert tokens[0] == "get_weather" and "".join(tokens[1:]) == tool_call([delta])["arguments"]


# --- completions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "num_prompts", "prompt_tokens"), [
    ("one two three", 1, 3),
    (["one two", "three four five", "  "], 3, 6),
    ([17, 4, 99, 0], 1, 4),
    ([[1, 2], [3, 4, 5, 6]], 2, 6),
])
async def test_completions_take_every_prompt_form(model: SimModel, prompt: Any, num_prompts: int,
                                                  prompt_tokens: int) -> None:
    deltas = await collect(model, completion("c", prompt=prompt, max_tokens=5, n=2))
    choices = by_choice(deltas)
    assert sorted(choices) == list(range(2 * num_prompts))
    for ds in choices.values():
        assert len("".join(d.text for d in ds).split()) == 5
        assert ds[-1].finish_reason == "length"
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 10 * num_prompts)
    await model.close()


@pytest.mark.parametrize(("prompt", "prompt_text", "num_prompt"), [
    ("Hello big  world ", "Hello big  world ", 3),
    # Token ids read as the filler word each picks.
    ([5, 70], FILLER_WORDS[5] + FILLER_WORDS[70 % 64], 2),
])
async def test_completion_echo_and_logprobs(model: SimModel, prompt: Any, prompt_text: str,
                                            num_prompt: int) -> None:
    deltas = await collect(model, completion("e", prompt=prompt, max_tokens=3, echo=True,
                                             logprobs=2, seed=9))
    assert {d.index for d in deltas} == {0}
    text = "".join(d.text for d in deltas)
    assert text.startswith(prompt_text) and len(text[len(prompt_text):].split()) == 3
    lists: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                   "text_offset": []}
    for d in deltas:
        assert d.logprobs is not None and set(d.logprobs) == set(lists)
        for name in lists:
            lists[name].extend(d.logprobs[name])
    assert len(lists["tokens"]) == num_prompt + 3
    assert lists["tokens"][:num_prompt] == split_tokens(prompt_text)
    assert "".join(lists["tokens"]) == text
    # The prompt's first token has no log probability, like OpenAI's.
    assert lists["token_logprobs"][0] is None and lists["top_logprobs"][0] is None
    assert all(v <= 0 for v in lists["token_logprobs"][1:])
    for token, value, top in zip(lists["tokens"][1:], lists["token_logprobs"][1:],
                                 lists["top_logprobs"][1:], strict=True):
        assert len(top) == 2 and top[token] == value == max(top.values())
    offsets = lists["text_offset"]
    assert offsets[0] == 0
    assert all(offsets[i + 1] == offsets[i] + len(token)
               for i, token in enumerate(lists["tokens"][:-1]))
    await model.close()


async def test_completion_logprobs_zero_lists_the_chosen_token_alone() -> None:
    model = SimModel("instant")
    [delta] = await collect(model, completion("z", prompt="hi", max_tokens=4, logprobs=0))
    assert delta.logprobs is not None
    assert [list(top) for top in delta.logprobs["top_logprobs"]] == [
        [t] for t in delta.logprobs["tokens"]]


async def test_max_tokens_zero_with_echo_returns_the_prompt(model: SimModel) -> None:
    deltas = await collect(model, completion("z", prompt=["a b c", "d"], max_tokens=0, echo=True,
                                             n=2))
    assert [(d.index, d.text, d.finish_reason) for d in deltas] == [
        (0, "a b c", "length"), (1, "a b c", "length"), (2, "d", "length"), (3, "d", "length")]
    # As vLLM: each choice generates one token, counted but not shown.
    usage = deltas[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 4)
    assert model.num_generation_tokens == 4 and model.num_prompt_tokens == 4
    await model.close()


# --- embeddings ----------------------------------------------------------------------------


def floats(item: dict[str, Any]) -> list[float]:
    value = item["embedding"]
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert isinstance(value, list)
    return value


async def test_embeddings_are_deterministic_unit_vectors(model: SimModel) -> None:
    [delta] = await collect(model, embedding("e", input=["hello world", "hello world", "other"]))
    [ids] = await collect(model, embedding("i", input=[[1, 2, 3]]))
    assert delta.finish_reason == "stop" and delta.usage is not None
    assert (delta.usage.prompt_tokens, delta.usage.completion_tokens) == (2 + 2 + 1, 0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3
    assert delta.data is not None and ids.data is not None
    assert [item["index"] for item in delta.data] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in delta.data)
    vectors = [floats(item) for item in delta.data + ids.data]
    assert all(len(v) == model.profile.embedding_dim for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]
    assert vectors[2] != vectors[3]
    await model.close()


async def test_embeddings_base64_and_dimensions() -> None:
    model = SimModel("instant")
    [whole] = await collect(model, embedding("f", input="a sentence"))
    [packed] = await collect(model, embedding("b", input="a sentence", encoding_format="base64"))
    [short] = await collect(model, embedding("d", input="a sentence", dimensions=64))
    assert whole.data and packed.data and short.data
    assert isinstance(packed.data[0]["embedding"], str)
    full = floats(whole.data[0])
    assert floats(packed.data[0]) == full
    prefix = full[:64]
    norm = math.sqrt(math.fsum(x * x for x in prefix))
    truncated = floats(short.data[0])
    assert len(truncated) == 64
    assert all(math.isclose(a, b / norm, rel_tol=1e-5, abs_tol=1e-7)
               for a, b in zip(truncated, prefix, strict=True))


async def test_an_embedding_is_a_prefill_only_sequence() -> None:
    model = SimModel(H100, speed=FAST, max_num_batched_tokens=256)
    text = " ".join(["w"] * 600)
    [delta] = await collect(model, embedding("p", input=[text, "short one"]))
    assert delta.usage is not None and delta.usage.prompt_tokens == 602
    # 602 prompt tokens in chunks of at most 256: three steps, no token generated.
    assert model.num_steps == 3
    assert model.num_prompt_tokens == 602 and model.num_generation_tokens == 0
    assert model.ttft.count == 0
    assert model.kv_cache_usage == 0.0 and model.num_running == 0
    await model.close()


# --- refusals -------------------------------------------------------------------------------


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(("request_", "param"), [
    (chat("i", [{"role": "user", "content": [{"type": "text", "text": "what"}, IMAGE]}]),
     "messages[0].content[1]"),
    (chat("a", audio={"voice": "alloy", "format": "wav"}), "audio"),
    (chat("tc", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (chat("rq", tool_choice="required"), "tool_choice"),
    (chat("ct", tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
    (chat("rf", response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "string", "pattern": "^a+$"}}}), "response_format"),
    (chat("tp", top_logprobs=2), "top_logprobs"),
    (chat("tl", logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat("lb", logit_bias={"999999": 5}), "logit_bias"),
    (chat("pp", presence_penalty=3), "presence_penalty"),
    (chat("n", n="two"), "n"),
    (chat("kv", n=128, max_tokens=4000), "n"),
    (chat("long", [{"role": "user", "content": "w " * 9000}]), "input_tokens"),
    (completion("s", prompt="x", suffix="y"), "suffix"),
    (completion("b", prompt="x", n=1, best_of=3), "best_of"),
    (completion("m", prompt="x", max_tokens=0), "max_tokens"),
    (completion("v", prompt=[1, 2, 128_256]), "prompt"),
    (completion("e", prompt=""), "prompt"),
    (completion("e2", prompt=["a", ""]), "prompt[1]"),
    (completion("mx", prompt=["a", 1]), "prompt"),
    (completion("cl", prompt="w " * 9000), "input_tokens"),
    (completion("full", prompt="w " * 8192), "max_tokens"),
    (completion("mt", prompt="w", max_tokens=8193), "max_tokens"),
    (embedding("d", input="x", dimensions=5000), "dimensions"),
    (embedding("f", input="x", encoding_format="int8"), "encoding_format"),
    (embedding("el", input="w " * 9000), "input"),
    (embedding("ee", input=["fine", ""]), "input[1]"),
])
async def test_refusals_name_the_parameter(request_: EngineRequest, param: str) -> None:
    model = SimModel(H100, speed=FAST)
    with pytest.raises(InvalidRequestError) as info:
        model.validate(request_)
    assert info.value.param == param
    with pytest.raises(InvalidRequestError):
        await collect(model, request_)
    assert model.num_waiting == model.num_running == 0


async def test_penalties_and_logit_bias_are_accepted() -> None:
    model = SimModel("instant")
    fields = {"presence_penalty": 1.5, "frequency_penalty": -0.5, "logit_bias": {"42": -100},
              "stop": ["\n"], "temperature": 0.2, "top_p": 0.9}
    [a] = await collect(model, chat("x", max_tokens=5, seed=1, **fields))
    [b] = await collect(model, chat("y", max_tokens=5, seed=1))
    assert a.text == b.text
