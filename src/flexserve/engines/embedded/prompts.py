"""What a request asks the embedded model to do, checked before it takes a slot.

A chat becomes one prompt through the model's own chat template; a
completion is one prompt per text or token list, read as they are (no
template); embeddings take one input per text or token list. Whatever the
model cannot take is refused here as the client's error, naming the field:
a prompt longer than the context, a token id the vocabulary does not have,
a grammar llama.cpp cannot build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flexserve.engines.base import EngineRequest, content_text
from flexserve.engines.embedded.sampling import SamplingParams, sampling_params
from flexserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from flexserve.engines.embedded.llama import Vocabulary


@dataclass(slots=True)
class Prompt:
    tokens: list[int]
    # The text echoed ahead of each of its completions (completions `echo`).
    echo: str = ""


@dataclass(slots=True)
class Plan:
    """A chat or completion request, ready to run."""

    prompts: list[Prompt]
    # Choices per prompt.
    n: int
    # Most tokens per choice; None: until the model stops or the context is full.
    max_tokens: int | None
    stop: list[str]
    sampling: SamplingParams
    # Likeliest alternatives to report per token; None: no log probabilities.
    num_top_logprobs: int | None = None
    # Log probabilities in chat's shape (else completions').
    chat: bool = True
    # Completions `echo`: each choice starts with its prompt (and, with
    # logprobs, the prompt tokens' own log probabilities).
    echo: bool = False

    @property
    def scores_prompt(self) -> bool:
        """The prompt's own log probabilities are needed."""
        return self.echo and self.num_top_logprobs is not None

    def max_new_tokens(self, prompt: Prompt, n_ctx: int) -> int:
        room = n_ctx - len(prompt.tokens)
        return room if self.max_tokens is None else min(self.max_tokens, room)


def chat_plan(
    request: EngineRequest, template: Jinja2ChatFormatter, vocabulary: Vocabulary, n_ctx: int
) -> Plan:
    max_tokens = request.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1.", param="max_tokens")
    messages = [
        {"role": m.get("role"), "content": content_text(m.get("content"))} for m in request.messages
    ]
    tokens = chat_prompt_tokens(template, vocabulary, messages)
    _check_fits(tokens, n_ctx, max_tokens, "messages", "The prompt")
    params = sampling_params(request, vocabulary.size)
    if params.grammar is not None:
        vocabulary.check_grammar(params.grammar)
    body = request.body
    return Plan(
        prompts=[Prompt(tokens)],
        n=request.n,
        max_tokens=max_tokens,
        stop=request.stop,
        sampling=params,
        num_top_logprobs=int(body.get("top_logprobs") or 0) if body.get("logprobs") else None,
    )


def chat_prompt_tokens(
    template: Jinja2ChatFormatter, vocabulary: Vocabulary, messages: list[dict[str, Any]]
) -> list[int]:
    """The chat formatted with the model's own template, as tokens."""
    from jinja2 import TemplateError

    try:
        formatted = template(messages=messages)  # type: ignore[arg-type]
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequestError(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from exc
    # The template writes its special tokens (BOS included) itself.
    return vocabulary.tokenize(formatted.prompt, add_bos=not formatted.added_special, special=True)


def completion_plan(request: EngineRequest, vocabulary: Vocabulary, n_ctx: int) -> Plan:
    body = request.body
    max_tokens = request.max_tokens
    echo = bool(body.get("echo"))
    prompts = []
    given = _inputs(body.get("prompt"), "prompt", vocabulary, special=True)
    for index, (tokens, text) in enumerate(given):
        name = "The prompt" if index == 0 else f"Prompt {index}"
        _check_fits(tokens, n_ctx, max_tokens, "prompt", name)
        echoed = ""
        if echo:
            # Token ids are echoed as the text they spell.
            echoed = text if text is not None else _spelled(tokens, vocabulary)
        prompts.append(Prompt(tokens, echoed))
    logprobs = body.get("logprobs")
    return Plan(
        prompts=prompts,
        n=request.n,
        max_tokens=max_tokens,
        stop=request.stop,
        sampling=sampling_params(request, vocabulary.size),
        num_top_logprobs=None if logprobs is None else int(logprobs),
        chat=False,
        echo=echo,
    )


def embedding_inputs(request: EngineRequest, vocabulary: Vocabulary, n_ctx: int) -> list[list[int]]:
    """The embeddings request's inputs as tokens, each no longer than the context."""
    inputs = []
    given = _inputs(request.body.get("input"), "input", vocabulary, special=False)
    for index, (tokens, _) in enumerate(given):
        if not tokens:
            raise InvalidRequestError(
                f"Input {index} has no tokens.", param="input", code="invalid_value"
            )
        if len(tokens) > n_ctx:
            raise InvalidRequestError(
                f"Input {index} is {len(tokens)} tokens long; this model takes at most {n_ctx}.",
                param="input",
                code="context_length_exceeded",
            )
        inputs.append(tokens)
    return inputs


def _inputs(
    value: Any, param: str, vocabulary: Vocabulary, *, special: bool
) -> list[tuple[list[int], str | None]]:
    """OpenAI's four forms of prompt or input (a text, texts, token ids, lists
    of token ids; the API has checked which) as token lists, each with its
    text when it came as text."""
    if isinstance(value, str):
        return [(vocabulary.tokenize(value, special=special), value)]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"Invalid '{param}': expected text or tokens.", param=param)
    if isinstance(value[0], int):
        return [(_checked_ids(value, param, vocabulary), None)]
    out: list[tuple[list[int], str | None]] = []
    for item in value:
        if isinstance(item, str):
            out.append((vocabulary.tokenize(item, special=special), item))
        else:
            out.append((_checked_ids(item, param, vocabulary), None))
    return out


def _spelled(tokens: list[int], vocabulary: Vocabulary) -> str:
    return b"".join(vocabulary.spell(t) for t in tokens).decode("utf-8", errors="replace")


def _checked_ids(ids: list[int], param: str, vocabulary: Vocabulary) -> list[int]:
    for token in ids:
        if not 0 <= token < vocabulary.size:
            raise InvalidRequestError(
                f"Invalid '{param}': {token} is not a token id of this model "
                f"(0 to {vocabulary.size - 1}).",
                param=param,
                code="invalid_value",
            )
    return list(ids)


def _check_fits(
    tokens: list[int], n_ctx: int, max_tokens: int | None, param: str, name: str
) -> None:
    if not tokens:
        raise InvalidRequestError(
            f"{name} is empty: it has no tokens.", param=param, code="invalid_value"
        )
    # A completion needs one free position for its first token; an echo of
    # the prompt alone (max_tokens 0) needs none.
    limit = n_ctx if max_tokens == 0 else n_ctx - 1
    if len(tokens) > limit:
        raise InvalidRequestError(
            f"{name} is {len(tokens)} tokens long; this model's context holds "
            f"{n_ctx} tokens including the completion.",
            param=param,
            code="context_length_exceeded",
        )
