"""What the sim engine reads from a request body, and what it refuses.

The sim imitates vLLM serving a text-only model: it honours tools, JSON and
JSON-schema output, log probabilities, ``n``, penalties and logit bias,
completions (text or token-id prompts, ``echo``) and embeddings
(``dimensions``, base64). It refuses, with a 400 naming the parameter, what
such a server refuses: image, audio and file input, ``suffix``, ``best_of``
above ``n``, a token id outside the vocabulary, a schema it cannot honour.
The deprecated ``functions`` and ``function_call`` are ignored, as vLLM
ignores them: such a request gets text.

Bodies reach it validated by the gateway's API layer, or raw from a client of
``flexserve sim-engine``; so every field is read with its type checked. The
context-length checks need the model's limits and live in
``SimModel.validate``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flexserve.engines.base import EngineRequest
from flexserve.engines.sim.schema_instance import SchemaError, instance_of
from flexserve.engines.sim.tokenizer import (
    VOCAB_SIZE,
    count_prompt_tokens,
    count_tool_tokens,
    render_token_ids,
    split_tokens,
)
from flexserve.errors import InvalidRequestError

__all__ = ["EmbeddingInput", "GenerationInput", "OutputForm", "read_request"]

# vLLM's default --max-logprobs: the most alternatives a token may list.
MAX_LOGPROBS = 20
# vLLM's default max_tokens for completions, as OpenAI's.
DEFAULT_COMPLETION_TOKENS = 16
# Content parts a text-only model reads.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})
# Chat fields beyond plain text generation; a body with none of them (most
# traffic) is read without looking for each.
_CHAT_OPTIONS = frozenset({
    "n", "tools", "tool_choice", "response_format", "logprobs", "top_logprobs", "audio",
    "modalities", "presence_penalty", "frequency_penalty", "logit_bias", "stop",
})

FormKind = Literal["text", "json_object", "json_schema", "tool_call"]


@dataclass(frozen=True, slots=True)
class OutputForm:
    """What every choice of a generation says."""

    kind: FormKind = "text"
    # The JSON schema of the document (json_schema) or the call's arguments (tool_call).
    schema: Any = None
    # The called function (tool_call).
    tool_name: str = ""
    # The client named the function (tool_choice {"type": "function", ...}): the
    # call then ends with finish_reason "stop", as OpenAI and vLLM end it.
    named: bool = False


PLAIN_TEXT = OutputForm()


@dataclass(slots=True)
class GenerationInput:
    """A chat or completion request as the sim runs it."""

    op: Literal["chat", "completion"]
    # Prompt tokens of each prompt (chat: one prompt, the messages and tools).
    prompt_lens: list[int]
    n: int
    # Tokens per choice at most; None: until the filler stops or the context is full.
    max_tokens: int | None
    form: OutputForm = PLAIN_TEXT
    # Alternatives listed per token when log probabilities are asked for, else None.
    logprobs: int | None = None
    # Completions `echo`: each prompt's tokens as text, else None.
    echo: list[list[str]] | None = None
    seed: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def plain(self) -> bool:
        """One prompt, one choice of plain text, nothing else asked for."""
        return (self.n == 1 and self.form is PLAIN_TEXT and self.logprobs is None
                and self.echo is None and len(self.prompt_lens) == 1)


@dataclass(slots=True)
class EmbeddingInput:
    """An embeddings request: one vector per input."""

    # What seeds each input's vector: its text, or its token ids.
    keys: list[str]
    prompt_lens: list[int]
    dimensions: int | None = None
    base64: bool = False
    prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_tokens = sum(self.prompt_lens)


def read_request(request: EngineRequest) -> GenerationInput | EmbeddingInput:
    """The request's inputs, or InvalidRequestError naming the field refused."""
    body = request.body
    if request.op == "chat":
        return _read_chat(body)
    if request.op == "completion":
        return _read_completion(body)
    if request.op == "embedding":
        return _read_embedding(body)
    raise InvalidRequestError(f"The sim engine does not serve {request.op!r} requests.")


# --- chat ------------------------------------------------------------------------


def _read_chat(body: dict[str, Any]) -> GenerationInput:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError("Each message must be an object.", param=f"messages[{i}]")
        content = message.get("content")
        if type(content) is not str and content is not None:
            _check_parts(content, i)
    prompt_tokens = count_prompt_tokens(messages)
    max_tokens = _max_tokens(body)
    seed = _int(body, "seed", None)
    if _CHAT_OPTIONS.isdisjoint(body):
        return GenerationInput("chat", [prompt_tokens], 1, max_tokens, seed=seed)
    if body.get("audio") is not None:
        raise _text_only("audio")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise _text_only("modalities")
    n = _int(body, "n", 1, low=1)
    form = PLAIN_TEXT
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequestError("'tools' must be an array.", param="tools")
        prompt_tokens += count_tool_tokens(tools)
    choice = body.get("tool_choice")
    if choice != "none" and (tools or choice not in (None, "auto")):
        form = _tool_form(tools or [], choice)
    if form is PLAIN_TEXT and body.get("response_format") is not None:
        form = _format_form(body["response_format"])
    if form.schema is not None:
        _check_schema(form)
    logprobs = None
    top = _int(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS)
    wants = body.get("logprobs")
    if wants is not None and not isinstance(wants, bool):
        raise InvalidRequestError("'logprobs' must be a boolean.", param="logprobs")
    if wants:
        logprobs = top or 0
    elif top:
        raise InvalidRequestError("'top_logprobs' can only be set when 'logprobs' is true.",
                                  param="top_logprobs")
    _check_sampling(body)
    return GenerationInput("chat", [prompt_tokens], n, max_tokens, form, logprobs, seed=seed)


def _check_parts(content: Any, i: int) -> None:
    if not isinstance(content, list):
        raise InvalidRequestError("A message's content must be a string or an array of parts.",
                                  param=f"messages[{i}].content")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise _text_only(f"messages[{i}].content[{j}]", kind)


def _text_only(param: str, kind: Any = None) -> InvalidRequestError:
    what = f"'{kind}' content" if isinstance(kind, str) else "this input"
    return InvalidRequestError(
        f"The sim engine serves a text-only model: it does not take {what} ('{param}').",
        param=param,
    )


def _tool_form(tools: list[Any], choice: Any) -> OutputForm:
    """The call every choice makes: auto and required call the first tool, a
    named choice calls that one (as a model that always calls would)."""
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError("Only 'function' tools are supported.",
                                      param=f"tools[{i}].type")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError("A tool needs a function with a name.",
                                      param=f"tools[{i}].function")
        functions.append(function)
    if choice is None or choice in ("auto", "required"):
        if not functions:
            raise InvalidRequestError("'tool_choice' needs 'tools'.", param="tool_choice")
        chosen = functions[0]
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        matches = [f for f in functions if f["name"] == name]
        if not matches:
            raise InvalidRequestError(f"Tool {name!r} has not been passed in 'tools'.",
                                      param="tool_choice")
        chosen = matches[0]
    else:
        raise InvalidRequestError("'tool_choice' must be 'none', 'auto', 'required' or a "
                                  "named function.", param="tool_choice")
    parameters = chosen.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    return OutputForm("tool_call", parameters, chosen["name"], named=isinstance(choice, dict))


def _format_form(response_format: Any) -> OutputForm:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return PLAIN_TEXT
    if kind == "json_object":
        return OutputForm("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("'response_format.json_schema' must be an object.",
                                      param="response_format")
        schema = spec.get("schema")
        # No schema, or an empty one, admits any JSON: answer as for json_object.
        return OutputForm("json_schema", schema) if schema else OutputForm("json_object")
    raise InvalidRequestError(f"Unsupported 'response_format' type {kind!r}.",
                              param="response_format")


def _check_schema(form: OutputForm) -> None:
    """Refuse a schema the sim cannot write a document for, before generating."""
    try:
        instance_of(form.schema, random.Random(0))
    except SchemaError as exc:
        param = "tools" if form.kind == "tool_call" else "response_format"
        raise InvalidRequestError(f"Unsupported JSON schema in '{param}': {exc}.",
                                  param=param) from exc


def _check_sampling(body: dict[str, Any]) -> None:
    """Stop sequences, penalties and logit bias change nothing in filler, but
    are checked as vLLM checks them."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidRequestError("'stop' must be a string or an array of strings.",
                                  param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or not -2.0 <= value <= 2.0):
            raise InvalidRequestError(f"'{name}' must be a number from -2 to 2.", param=name)
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise InvalidRequestError("'logit_bias' must be an object.", param="logit_bias")
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= VOCAB_SIZE:
            raise InvalidRequestError(f"'logit_bias' names {key!r}, not a token id of the "
                                      f"vocabulary (0 to {VOCAB_SIZE - 1}).", param="logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise InvalidRequestError("'logit_bias' values must be numbers from -100 to 100.",
                                      param="logit_bias")


# --- completions -----------------------------------------------------------------


def _read_completion(body: dict[str, Any]) -> GenerationInput:
    prompts, from_ids = _prompt_list(body.get("prompt"), "prompt")
    if body.get("suffix"):
        raise InvalidRequestError("'suffix' is not supported (vLLM does not fill in the middle).",
                                  param="suffix")
    n = _int(body, "n", 1, low=1)
    best_of = _int(body, "best_of", None, low=0)
    if best_of is not None and best_of > n:
        raise InvalidRequestError("'best_of' above 'n' is not supported (vLLM V1 does not do it).",
                                  param="best_of")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise InvalidRequestError("'echo' must be a boolean.", param="echo")
    max_tokens = _max_tokens(body, default=DEFAULT_COMPLETION_TOKENS, low=0)
    if max_tokens == 0 and not echo:
        raise InvalidRequestError("'max_tokens' must be at least 1 unless 'echo' is set.",
                                  param="max_tokens")
    tokens = [render_token_ids(p) if from_ids else split_tokens(p) for p in prompts]
    for i, prompt_tokens in enumerate(tokens):
        if not prompt_tokens:
            raise InvalidRequestError("The prompt cannot be empty.",
                                      param="prompt" if len(tokens) == 1 else f"prompt[{i}]")
    _check_sampling(body)
    return GenerationInput(
        "completion", [len(t) for t in tokens], n, max_tokens, PLAIN_TEXT,
        _int(body, "logprobs", None, low=0, high=MAX_LOGPROBS), tokens if echo else None,
        seed=_int(body, "seed", None),
    )


def _prompt_list(value: Any, param: str) -> tuple[Any, bool]:
    """OpenAI's four prompt forms as a list of texts or of id lists, and which."""
    if isinstance(value, str):
        return [value], False
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"'{param}' must be a string, an array of strings, or token "
                                  "ids.", param=param)
    if all(isinstance(v, str) for v in value):
        return value, False
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        _check_ids(value, param)
        return [value], True
    if all(isinstance(v, list) for v in value):
        for i, ids in enumerate(value):
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError(f"'{param}[{i}]' must be a non-empty array of token "
                                          "ids.", param=f"{param}[{i}]")
            _check_ids(ids, f"{param}[{i}]")
        return value, True
    raise InvalidRequestError(f"'{param}' mixes texts and token ids.", param=param)


def _check_ids(ids: Sequence[int], param: str) -> None:
    for token_id in ids:
        if not 0 <= token_id < VOCAB_SIZE:
            raise InvalidRequestError(f"Token id {token_id} is out of vocabulary (0 to "
                                      f"{VOCAB_SIZE - 1}).", param=param)


# --- embeddings ------------------------------------------------------------------


def _read_embedding(body: dict[str, Any]) -> EmbeddingInput:
    inputs, from_ids = _prompt_list(body.get("input"), "input")
    keys: list[str] = []
    lens: list[int] = []
    for i, item in enumerate(inputs):
        if from_ids:
            keys.append("ids:" + ",".join(map(str, item)))
            lens.append(len(item))
            continue
        num_tokens = len(split_tokens(item))
        if not num_tokens:
            raise InvalidRequestError("An input cannot be empty.",
                                      param="input" if len(inputs) == 1 else f"input[{i}]")
        keys.append("text:" + item)
        lens.append(num_tokens)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'.",
                                  param="encoding_format")
    return EmbeddingInput(keys, lens, _int(body, "dimensions", None, low=1), encoding == "base64")


# --- fields ----------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict[str, Any], name: str, default: int | None, *, low: int | None = None,
         high: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise InvalidRequestError(f"'{name}' must be {bounds}.", param=name)
    return value


def _max_tokens(body: dict[str, Any], default: int | None = None, low: int = 1) -> int | None:
    """`max_completion_tokens` wins over `max_tokens`, as in OpenAI's API."""
    name = "max_completion_tokens"
    value = body.get(name)
    if value is None:
        name = "max_tokens"
        value = body.get(name)
        if value is None:
            return default
    if type(value) is not int or value < low:
        raise InvalidRequestError(f"'{name}' must be an integer of at least {low}.", param=name)
    return value
