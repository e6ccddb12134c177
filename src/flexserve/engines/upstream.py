"""An upstream OpenAI-compatible server as an engine replica.

vLLM, SGLang, llama.cpp's server, Ollama or a provider: models are
discovered from its ``/v1/models``; a generation is requested as a stream
(so that time to first token is real and an abort closes the connection,
which vLLM, SGLang and llama.cpp honour by freeing the sequence), and relayed
delta by delta, unless the caller wants only the whole completion
(``EngineRequest.stream`` False: not streamed to the client, never aborted),
which is then requested with ``stream: false`` and yielded as one delta
(no SSE framing and parsing on either side). aiohttp's client is used for its
speed under load; its exceptions are translated into FlexServe's Engine* errors here, and nowhere
else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from flexserve.engines.base import (
    ALL_FEATURES,
    Delta,
    Engine,
    EngineLoad,
    EngineRequest,
    ModelCard,
    NoLoadSignalsError,
    SequenceControl,
    StepTimeModel,
    Usage,
)
from flexserve.engines.metrics import parse_vllm_load
from flexserve.errors import (
    EngineError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
)

log = logging.getLogger(__name__)


class UpstreamEngine(Engine):
    """One replica behind an OpenAI-compatible HTTP API."""

    # Whatever the client sends is passed on; the upstream refuses what it
    # cannot do, and its 400 is relayed.
    features = ALL_FEATURES

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        capacity: int = 64,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        send_priority: bool = False,
        step_model: StepTimeModel | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.base_url = self.base_url.removesuffix("/v1")
        self.name = f"upstream:{self.base_url}"
        self.accepts_priority = send_priority
        self._api_key = api_key
        self._capacity = capacity
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._models: list[ModelCard] = []
        # What the operator says this upstream's step time looks like (for TPOT SLOs).
        self._step_model = step_model

    @property
    def capacity(self) -> int:
        return self._capacity

    def models(self) -> list[ModelCard]:
        return list(self._models)

    def step_time_model(self) -> StepTimeModel | None:
        return self._step_model

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineUnavailableError(f"{self.name} is not started.")
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode()
        )
        await self.discover_models()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def discover_models(self) -> list[ModelCard]:
        """Read the upstream's model list (GET /v1/models)."""
        try:
            async with self.session.get(
                f"{self.base_url}/v1/models", headers=self._headers(), timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                if response.status != 200:
                    raise EngineError(
                        f"{self.name}: GET /v1/models answered HTTP {response.status}."
                    )
                data = orjson.loads(await response.read())
        except aiohttp.ClientError as exc:
            raise EngineUnavailableError(f"{self.name} is unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise EngineTimeoutError(f"{self.name} did not list its models in time.") from exc
        self._models = [
            ModelCard(
                id=str(item["id"]),
                owned_by=str(item.get("owned_by") or "upstream"),
                created=int(item.get("created") or 0),
                max_model_len=item.get("max_model_len"),
            )
            for item in data.get("data", [])
            if isinstance(item, dict) and "id" in item
        ]
        return self.models()

    def _payload(self, request: EngineRequest) -> dict[str, Any]:
        """The client's body as it is, with the stream settings and priority hint
        the gateway chose."""
        payload = dict(request.body)
        if request.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        else:
            payload["stream"] = False
        if self.accepts_priority:
            payload["priority"] = request.priority
        return payload

    async def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        url = f"{self.base_url}/v1/chat/completions"
        try:
            async with self.session.post(
                url, data=orjson.dumps(self._payload(request)), headers=self._headers()
            ) as response:
                if response.status != 200:
                    raise await _error_from_response(self.name, response)
                if request.stream or response.content_type == "text/event-stream":
                    async for delta in _relay_sse(self.name, response):
                        yield delta
                    return
                # A whole completion: read, and the connection back to the pool
                # before the delta is handed on.
                body = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnavailableError(f"{self.name} is unreachable: {exc.os_error}") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"{self.name} failed mid-request: {exc!r}") from exc
        except TimeoutError as exc:
            raise EngineTimeoutError(f"{self.name} did not answer in time.") from exc
        yield _completion_delta(self.name, body)

    async def read_load(self) -> EngineLoad:
        """vLLM-style load signals from the upstream's /metrics."""
        try:
            async with self.session.get(
                f"{self.base_url}/metrics", timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                if response.status == 404:
                    raise NoLoadSignalsError(f"{self.name} has no /metrics (HTTP 404).")
                if response.status != 200:
                    raise EngineError(f"{self.name}: GET /metrics answered HTTP {response.status}.")
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EngineUnavailableError(f"{self.name}: metrics unreadable: {exc!r}") from exc
        return parse_vllm_load(text)


async def _error_from_response(name: str, response: aiohttp.ClientResponse) -> Exception:
    body = await response.read()
    message = body[:500].decode("utf-8", "replace")
    param = None
    try:
        error = orjson.loads(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            param = error.get("param")
        elif isinstance(error, str):
            message = error
    except (orjson.JSONDecodeError, AttributeError):
        pass
    if response.status in (400, 422):
        # The client's input was refused by the engine (context too long, say).
        return InvalidRequestError(f"The engine refused the request: {message}", param=param)
    if response.status in (502, 503, 429):
        return EngineUnavailableError(f"{name} is overloaded or unavailable (HTTP {response.status}): {message}")
    if response.status == 504:
        return EngineTimeoutError(f"{name} timed out: {message}")
    return EngineError(f"{name} answered HTTP {response.status}: {message}")


def _completion_delta(name: str, body: bytes) -> Delta:
    """A whole (non-streamed) chat completion as one final Delta."""
    try:
        data = orjson.loads(body)
        error = data.get("error")
        if error is None:
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            finish_reason = choice.get("finish_reason") or "stop"
            u = data.get("usage")
            usage = (
                Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
                if u
                # An upstream that reports no usage: about four characters a
                # token (prompt tokens unknown), as the API layer estimates prompts.
                else Usage(0, (len(text) + 3) // 4)
            )
    except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError, ValueError) as exc:
        raise EngineError(f"{name} sent a malformed completion.") from exc
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise EngineError(f"{name} failed: {message}")
    return Delta(text, finish_reason=finish_reason, usage=usage)


async def _sse_lines(response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The body's lines, in batches: those each read completed.

    Split out of whatever the socket delivered rather than awaited one by one,
    so that an answer arriving in one read costs one await, not one per line.
    """
    pending = b""
    async for block in response.content.iter_any():
        *lines, pending = (pending + block).split(b"\n")
        if lines:
            yield lines
    if pending:
        yield [pending]


async def _relay_sse(name: str, response: aiohttp.ClientResponse) -> AsyncIterator[Delta]:
    finish_reason: str | None = None
    usage: Usage | None = None
    num_chunks = 0
    done = False
    async for lines in _sse_lines(response):
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise EngineError(f"{name} sent a malformed stream chunk.") from exc
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else str(error)
                raise EngineError(f"{name} failed mid-stream: {message}")
            if chunk.get("usage"):
                u = chunk["usage"]
                usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or ""
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if text:
                    num_chunks += 1
                    yield Delta(text)
        if done:
            break
    if finish_reason is None:
        raise EngineError(f"{name} closed the stream before it finished.")
    if usage is None:
        # An upstream that reports no usage: one token per content chunk is the
        # best count available (prompt tokens unknown).
        usage = Usage(0, num_chunks)
    yield Delta("", finish_reason=finish_reason, usage=usage)
