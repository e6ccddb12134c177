"""`CreateCompletionRequest` (the legacy completions API) and
`CreateEmbeddingRequest`: both take text, texts, token ids or lists of token
ids, which msgspec cannot tell apart in one union, so ``prompt_list``
checks them by hand."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from flexserve.api.schemas.chat import MAX_N, MAX_STOP_SEQUENCES, NonEmpty, Penalty, StreamOptions
from flexserve.errors import InvalidRequestError

# OpenAI's default when a completions request sets no max_tokens (vLLM's too).
DEFAULT_COMPLETION_TOKENS = 16
MAX_EMBEDDING_INPUTS = 2048


class CompletionRequest(Struct):
    model: NonEmpty
    prompt: str | list[Any]
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None
    best_of: Annotated[int, Meta(ge=0, le=20)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: str | None = None
    user: str | None = None


class EmbeddingRequest(Struct):
    model: NonEmpty
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    service_tier: str | None = None
    user: str | None = None


COMPLETION_FIELDS = frozenset(CompletionRequest.__struct_fields__)
EMBEDDING_FIELDS = frozenset(EmbeddingRequest.__struct_fields__)


def prompt_list(value: str | list[Any], param: str) -> tuple[list[str] | list[list[int]], bool]:
    """The prompts as a list, and whether they are token ids.

    Accepts OpenAI's four forms: a string, an array of strings, an array of
    token ids (one prompt), an array of arrays of token ids.
    """
    if isinstance(value, str):
        return [value], False
    if not value:
        raise InvalidRequestError(
            f"Invalid '{param}': empty array. Expected at least 1 item.", param=param, code="empty_array"
        )
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _mixed(param, i, "a string", item)
        return list(value), False
    if isinstance(first, int) and not isinstance(first, bool):
        _check_ids(value, param)
        return [list(value)], True
    if isinstance(first, list):
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise _mixed(param, i, "an array of token ids", item)
            if not item:
                raise InvalidRequestError(
                    f"Invalid '{param}[{i}]': empty array of token ids.", param=f"{param}[{i}]",
                    code="empty_array",
                )
            _check_ids(item, f"{param}[{i}]")
        return [list(item) for item in value], True
    raise InvalidRequestError(
        f"Invalid type for '{param}[0]': expected a string, a token id or an array of token ids.",
        param=f"{param}[0]",
        code="invalid_type",
    )


def prompt_size(prompts: list[str] | list[list[int]], token_ids: bool) -> tuple[int, int]:
    """Expected prompt tokens (about four characters a token) and an upper
    bound (a token per byte), for ``prompt_list``'s prompts."""
    if token_ids:
        exact = sum(len(ids) for ids in prompts)
        return exact, exact
    texts = [text for text in prompts if isinstance(text, str)]
    estimate = sum(len(text) for text in texts) // 4 + len(texts)
    bound = sum(len(text.encode()) for text in texts) + 2 * len(texts)
    return estimate, bound


def _check_ids(ids: list[Any], param: str) -> None:
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequestError(
                f"Invalid '{param}[{i}]': expected a token id (an integer >= 0), got {token!r}.",
                param=f"{param}[{i}]",
                code="invalid_type",
            )


def _mixed(param: str, index: int, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid type for '{param}[{index}]': expected {expected} like the items before it, "
        f"but got {type(value).__name__}.",
        param=f"{param}[{index}]",
        code="invalid_type",
    )
