"""`POST /v1/completions`: the legacy completions API that eval harnesses
call (a prompt as text, texts or token ids; `logprobs`, `echo`, `suffix`,
`n`, `best_of`), with tiers, gates and billing as for chat."""

from __future__ import annotations

from typing import Any


from flexserve.api.endpoints.chat import (
    ChunkedOutput,
    check_max_tokens,
    check_service_tier,
    check_stream_options,
    engine_body,
)
from flexserve.api.inference import Call, Endpoint, Inference, Output
from flexserve.api.schemas import convert
from flexserve.api.schemas.completions import (
    COMPLETION_FIELDS,
    DEFAULT_COMPLETION_TOKENS,
    CompletionRequest,
    prompt_list,
    prompt_size,
)
from flexserve.config import Settings
from flexserve.engines.base import Delta, EngineRequest, Feature, Usage
from flexserve.errors import InvalidRequestError


class Completions(Endpoint):
    path = "/v1/completions"

    def parse(self, body: Any, request_id: str, settings: Settings) -> Inference:
        request = convert(body, CompletionRequest)
        prompts, token_ids = prompt_list(request.prompt, "prompt")
        check_max_tokens("max_tokens", request.max_tokens, settings.max_completion_tokens)
        check_stream_options(request.stream, request.stream_options)
        check_service_tier(request.service_tier)
        n = request.n or 1
        needs: list[tuple[Feature, str]] = [(Feature.COMPLETIONS, "model")]
        if token_ids:
            needs.append((Feature.TOKEN_PROMPTS, "prompt"))
        if request.echo:
            needs.append((Feature.ECHO, "echo"))
        if request.suffix:
            needs.append((Feature.SUFFIX, "suffix"))
        if request.best_of is not None and request.best_of > 1:
            if request.best_of < n:
                raise InvalidRequestError(
                    f"Invalid 'best_of': {request.best_of}; it must be at least n ({n}).",
                    param="best_of",
                    code="invalid_value",
                )
            if request.stream:
                raise InvalidRequestError(
                    "Invalid 'best_of': it cannot be used with 'stream'.", param="best_of",
                    code="invalid_value",
                )
            if request.best_of > n:
                needs.append((Feature.BEST_OF, "best_of"))
        if n > 1:
            needs.append((Feature.N, "n"))
        if request.logprobs is not None:
            needs.append((Feature.LOGPROBS, "logprobs"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(request, name):
                needs.append((Feature.PENALTIES, name))
        if request.logit_bias:
            needs.append((Feature.LOGIT_BIAS, "logit_bias"))

        to_engine = engine_body(body)
        if request.max_tokens is None:
            # OpenAI's documented default, made explicit so every engine applies it.
            to_engine = {**to_engine, "max_tokens": DEFAULT_COMPLETION_TOKENS}
        max_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        estimate, bound = prompt_size(prompts, token_ids)
        options = request.stream_options
        return Inference(
            engine=EngineRequest(request_id, request.model, to_engine, "completion"),
            service_tier=request.service_tier,
            stream=bool(request.stream),
            prompt_tokens=estimate,
            prompt_token_bound=bound,
            max_output_tokens=max_tokens * max(1, (request.best_of or n) // n),
            num_choices=n * len(prompts),
            include_usage=bool(options is not None and options.include_usage),
            needs=needs,
            unknown_fields=[name for name in body if name not in COMPLETION_FIELDS],
            user=request.user,
        )

    def output(self, call: Call) -> Output:
        return CompletionOutput(call)


class CompletionOutput(ChunkedOutput):
    """A `text_completion`, whole or as stream chunks."""

    __slots__ = ()

    def __init__(self, call: Call) -> None:
        super().__init__(call, "cmpl-", "text_completion", "text_completion")

    def document(self, usage: Usage) -> dict[str, Any]:
        choices = [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": _logprobs(choice.logprob_lists),
                "finish_reason": choice.finish_reason or "stop",
            }
            for choice in self._choices
        ]
        return self._document(choices, usage)

    def open(self) -> bytes:
        return b""

    def event(self, delta: Delta) -> bytes:
        if not delta.text and delta.finish_reason is None and delta.logprobs is None:
            return b""
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": delta.logprobs,
            "finish_reason": delta.finish_reason,
        }
        return self._chunk(choice)


def _logprobs(lists: dict[str, list[Any]] | None) -> dict[str, Any] | None:
    if lists is None:
        return None
    return {
        "tokens": lists.get("tokens", []),
        "token_logprobs": lists.get("token_logprobs", []),
        "top_logprobs": lists.get("top_logprobs"),
        "text_offset": lists.get("text_offset", []),
    }
