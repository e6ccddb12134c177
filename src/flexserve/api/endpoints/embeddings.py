"""`POST /v1/embeddings`: text, texts or token ids in, vectors out (float or
base64), billed as input tokens at the served tier's price; tiers and the
flex rules apply as to any request."""

from __future__ import annotations

from typing import Any

from flexserve.api.endpoints.chat import check_service_tier, engine_body
from flexserve.api.inference import Call, Endpoint, Inference, Output
from flexserve.api.schemas import convert
from flexserve.api.schemas.completions import (
    EMBEDDING_FIELDS,
    MAX_EMBEDDING_INPUTS,
    EmbeddingRequest,
    prompt_list,
    prompt_size,
)
from flexserve.config import Settings
from flexserve.engines.base import Delta, EngineRequest, Feature, Usage
from flexserve.errors import InvalidRequestError


class Embeddings(Endpoint):
    path = "/v1/embeddings"

    def parse(self, body: Any, request_id: str, settings: Settings) -> Inference:
        request = convert(body, EmbeddingRequest)
        inputs, token_ids = prompt_list(request.input, "input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"Invalid 'input': {len(inputs)} inputs, more than the {MAX_EMBEDDING_INPUTS} "
                "allowed in one request.",
                param="input",
                code="array_above_max_length",
            )
        for i, item in enumerate(inputs):
            if isinstance(item, str) and not item:
                param = "input" if isinstance(request.input, str) else f"input[{i}]"
                raise InvalidRequestError(
                    f"Invalid '{param}': empty string. Expected a non-empty string.",
                    param=param,
                    code="invalid_value",
                )
        check_service_tier(request.service_tier)
        needs: list[tuple[Feature, str]] = [(Feature.EMBEDDINGS, "model")]
        if token_ids:
            needs.append((Feature.TOKEN_PROMPTS, "input"))
        if request.dimensions is not None:
            needs.append((Feature.DIMENSIONS, "dimensions"))
        estimate, bound = prompt_size(inputs, token_ids)
        return Inference(
            engine=EngineRequest(request_id, request.model, engine_body(body), "embedding"),
            service_tier=request.service_tier,
            stream=False,
            prompt_tokens=estimate,
            prompt_token_bound=bound,
            max_output_tokens=0,
            num_choices=len(inputs),
            needs=needs,
            unknown_fields=[name for name in body if name not in EMBEDDING_FIELDS],
            user=request.user,
        )

    def output(self, call: Call) -> Output:
        return EmbeddingOutput(call)


class EmbeddingOutput(Output):
    """The `list` of embeddings; there is no stream."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._data: list[dict[str, Any]] = []

    def collect(self, delta: Delta) -> None:
        if delta.data:
            self._data.extend(delta.data)

    def document(self, usage: Usage) -> dict[str, Any]:
        return {
            "object": "list",
            "data": sorted(self._data, key=lambda item: int(item.get("index", 0))),
            "model": self._call.model,
            "service_tier": self._call.served_tier.value,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }

    # Embeddings are never streamed (`parse` says stream=False).

    def open(self) -> bytes:
        raise NotImplementedError

    def event(self, delta: Delta) -> bytes:
        raise NotImplementedError

    def close(self, usage: Usage) -> bytes:
        raise NotImplementedError

    def failed(self, error: BaseException) -> bytes:
        raise NotImplementedError
