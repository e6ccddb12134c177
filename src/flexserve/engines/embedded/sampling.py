"""How a request wants its tokens chosen, read once from its body.

OpenAI's sampling knobs map onto llama.cpp's samplers (``llama.Sampler``
builds the chain): `temperature` and `top_p`; `seed`; `presence_penalty` and
`frequency_penalty`, which llama.cpp's penalties sampler applies with
OpenAI's formula (``logit - count * frequency - (count > 0) * presence``,
counted over the completion's own tokens); `logit_bias`, added to the
logits by token id; and `response_format`, turned into a GBNF grammar that
masks every token that would break the JSON (or the JSON schema) the client
asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flexserve.engines.base import EngineRequest
from flexserve.errors import InvalidRequestError

# llama.cpp draws a fresh random seed when given this one.
RANDOM_SEED = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """A request's sampling settings, validated."""

    # 0: greedy (always the likeliest token).
    temperature: float = 1.0
    top_p: float = 1.0
    # None: a fresh random seed for every choice.
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias added to its logit), as the client listed them.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # A GBNF grammar (rule "root") every completion must follow; None: free text.
    grammar: str | None = None

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def choice_seed(self, choice: int) -> int:
        """llama.cpp's seed for choice ``choice`` of a prompt: the request's seed
        plus the choice, so that choice 0 is what ``n`` = 1 gives for that seed."""
        if self.seed is None:
            return RANDOM_SEED
        return (self.seed + choice) % 2**32


def sampling_params(request: EngineRequest, vocabulary_size: int) -> SamplingParams:
    """The request's sampling settings (`logit_bias` ids checked against the
    vocabulary, `response_format` compiled to a grammar)."""
    body = request.body
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        logit_bias=_logit_bias(body.get("logit_bias"), vocabulary_size),
        grammar=response_grammar(body.get("response_format")),
    )


def _logit_bias(value: Any, vocabulary_size: int) -> tuple[tuple[int, float], ...]:
    if not value:
        return ()
    bias: list[tuple[int, float]] = []
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocabulary_size:
            raise InvalidRequestError(
                f"Invalid 'logit_bias': {key!r} is not a token id of this model "
                f"(0 to {vocabulary_size - 1}).",
                param="logit_bias",
                code="invalid_value",
            )
        bias.append((token, float(amount)))
    return tuple(bias)


def response_grammar(response_format: Any) -> str | None:
    """The GBNF grammar for a `response_format`: any JSON object for
    `json_object`, the schema's own grammar for `json_schema`; None for text."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = (response_format.get("json_schema") or {}).get("schema")
    if kind == "json_object" or schema is None:
        return JSON_GBNF
    try:
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    # llama-cpp-python's converter says what it cannot express by these.
    except (ValueError, TypeError, KeyError, AssertionError, RecursionError) as exc:
        raise InvalidRequestError(
            f"Invalid 'response_format': this model cannot follow the JSON schema: {exc}",
            param="response_format",
            code="invalid_value",
        ) from exc
    return grammar
