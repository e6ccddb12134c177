"""An upstream OpenAI-compatible server as an engine replica.

vLLM, SGLang, llama.cpp's server, Ollama or a provider: models are discovered
from its ``/v1/models``; a request is posted to the endpoint of its kind
(chat, completions, embeddings) with the client's body as it is, and the
gateway's request id in ``x-request-id`` so that gateway and engine logs can
be matched. A generation is requested as a stream (so that time to first
token is real and an abort closes the connection, which vLLM, SGLang and
llama.cpp honour by freeing the sequence), unless the caller wants only the
whole result (``EngineRequest.stream`` False: not streamed to the client,
never aborted), which is then read as one JSON body, with no SSE framing on
either side. A run the scheduler may abort whose client reads it whole
(``EngineRequest.read_whole``: flex not streamed) stays a stream, and with
``stream_interval`` above 1 it is asked in chunks of that many tokens
(vLLM's per-request `stream_interval`: the first token at once, the rest
every N tokens and with the finish), so that neither the engine's server nor
the gateway handles an event per token. ``relay`` turns either into Deltas.

A replica that turns a request away before any output — HTTP 429 or 503, a
connection that cannot be made or breaks, or a stream that stays silent past
``first_token_timeout`` — raises ``EngineOverloadedError`` with the
upstream's ``Retry-After``, which the scheduler answers by trying another
replica; once output has been relayed, a failure is an ``EngineError``, and
a stream silent for ``idle_timeout`` (or any answer past ``timeout``) an
``EngineTimeoutError``. A whole (non-streamed) answer arrives only at its
end, so no silence limit applies to it: the scheduler's health watch ends
such runs on a replica that stops answering (``scheduler._watch_load``).

What a client reads never names the upstream's address: error messages say
"the upstream" (the scheduler adds which replica of which model), and the
detail, address included, is logged here with the request id.

aiohttp's client is used for its speed under load; its exceptions are
translated into FlexServe's Engine* errors here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import time
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
)
from flexserve.engines.metrics import parse_vllm_load
from flexserve.engines.upstream.relay import completion_deltas, embedding_delta, relay_sse
from flexserve.observability.tracing import inject_trace_context
from flexserve.errors import (
    EngineError,
    EngineOverloadedError,
    EngineTimeoutError,
    EngineUnavailableError,
    FlexServeError,
    InvalidRequestError,
)
from flexserve.engines.upstream.silence import SilenceWatch

log = logging.getLogger(__name__)

# How error messages, which clients read, call an upstream: never by its address.
_LABEL = "The upstream"

# Chat request fields that change the prompt vLLM's chat template renders.
_CHAT_TEMPLATE_FIELDS = ("tools", "chat_template", "chat_template_kwargs", "add_generation_prompt",
                         "continue_final_message", "documents")
_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}


class UpstreamEngine(Engine):
    """One replica behind an OpenAI-compatible HTTP API."""

    # Whatever the client sends is passed on; the upstream refuses what it
    # cannot do, and its 400 is relayed.
    features = ALL_FEATURES
    shared = True

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        capacity: int = 64,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        first_token_timeout: float = 60.0,
        idle_timeout: float = 30.0,
        send_priority: bool = False,
        stream_interval: int = 1,
        step_model: StepTimeModel | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.base_url = self.base_url.removesuffix("/v1")
        self.name = f"upstream:{self.base_url}"
        self.accepts_priority = send_priority
        self.stream_interval = stream_interval
        self._capacity = capacity
        self._urls = {op: self.base_url + path for op, path in _PATHS.items()}
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=connect_timeout, sock_read=timeout
        )
        # Silence allowed on a stream before its first output, and between outputs.
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None
        self._models: list[ModelCard] = []
        # What the operator says this upstream's step time looks like (for TPOT SLOs).
        self._step_model = step_model
        # False once the upstream answered /tokenize with 404.
        self._can_tokenize = True

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
            raise EngineUnavailableError(f"{_LABEL} replica is not started.")
        return self._session

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
                f"{self.base_url}/v1/models", headers=self._headers, timeout=aiohttp.ClientTimeout(total=10)
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
        if request.op != "embedding":
            if request.stream:
                payload["stream"] = True
                payload["stream_options"] = {"include_usage": True}
                if request.read_whole and self.stream_interval > 1:
                    # vLLM sends the first token at once, then one chunk every
                    # stream_interval tokens: fewer events for both to handle.
                    payload["stream_interval"] = self.stream_interval
            else:
                payload["stream"] = False
        if self.accepts_priority:
            payload["priority"] = request.priority
        return payload

    async def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        op = request.op
        headers = {**self._headers, "X-Request-Id": request.request_id}
        inject_trace_context(headers)  # the request's traceparent, while tracing
        relayed = False
        silence = SilenceWatch(self._first_token_timeout, self._idle_timeout) if request.stream else None
        if silence is not None:
            silence.start()
        try:
            async with self.session.post(
                self._urls[op], data=orjson.dumps(self._payload(request)), headers=headers
            ) as response:
                if response.status != 200:
                    raise await _error_from_response(self.name, request.request_id, response)
                if op != "embedding" and (request.stream or response.content_type == "text/event-stream"):
                    async for delta in relay_sse(_LABEL, response, op, silence):
                        relayed = True
                        yield delta
                    return
                # A whole answer: read, and the connection back to the pool
                # before the deltas are handed on.
                body = await response.read()
        except asyncio.CancelledError:
            if silence is None or not silence.expired_alone():
                raise
            if relayed:
                self._log(request, f"sent nothing for {silence.limit:g} s mid-stream")
                raise EngineTimeoutError(
                    f"{_LABEL} stopped sending output for {silence.limit:g} s."
                ) from None
            # It never answered: nothing was relayed, another replica may take it.
            self._log(request, f"sent nothing for {silence.limit:g} s before its first output")
            raise EngineOverloadedError(
                f"{_LABEL} did not start answering within {silence.limit:g} s."
            ) from None
        except aiohttp.ConnectionTimeoutError as exc:
            # Not connected in time: nothing was sent, another replica may take it.
            self._log(request, f"could not be reached in time: {exc!r}")
            raise EngineOverloadedError(f"{_LABEL} could not be reached in time.") from exc
        except TimeoutError as exc:
            self._log(request, f"did not answer in time: {exc!r}")
            raise EngineTimeoutError(f"{_LABEL} did not answer in time.") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            self._log(request, f"connection failed: {exc!r}")
            if relayed:
                raise EngineError(f"{_LABEL} failed mid-request: {_reason(exc)}") from exc
            # Nothing came of it: the request can go to another replica as it is.
            raise EngineOverloadedError(f"{_LABEL} is unreachable: {_reason(exc)}") from exc
        except aiohttp.ClientError as exc:
            self._log(request, f"failed: {exc!r}")
            raise EngineError(f"{_LABEL} failed mid-request: {_reason(exc)}") from exc
        finally:
            if silence is not None:
                silence.stop()
        if op == "embedding":
            yield embedding_delta(_LABEL, body, request)
            return
        for delta in completion_deltas(_LABEL, body, op):
            yield delta

    async def tokenize(self, request: EngineRequest) -> list[int] | None:
        """vLLM's (and the sim engine's) ``POST /tokenize``: chat messages with
        the chat template applied as its chat endpoint applies it, or one
        completions prompt; token-id prompts are their own tokens."""
        if not self._can_tokenize:
            return None
        body = request.body
        payload: dict[str, Any] = {"model": body.get("model", request.model)}
        if request.op == "chat":
            payload["messages"] = body.get("messages") or []
            payload.update((k, body[k]) for k in _CHAT_TEMPLATE_FIELDS if k in body)
        elif request.op == "completion":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
                return list(prompt)
            if not isinstance(prompt, str):
                return None
            payload["prompt"] = prompt
        else:
            return None
        try:
            async with self.session.post(f"{self.base_url}/tokenize", data=orjson.dumps(payload),
                                         headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status == 404:
                    self._can_tokenize = False
                    log.warning("upstream %s has no /tokenize: its prompts are not split", self.base_url)
                    return None
                if response.status != 200:
                    return None
                data = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens

    def _log(self, request: EngineRequest, what: str) -> None:
        """The detail a client is not shown (the upstream's address), for the operator."""
        log.warning("request %s: upstream %s %s", request.request_id, self.base_url, what)

    async def read_load(self) -> EngineLoad:
        """vLLM-style load signals from the upstream's /metrics.

        Only a failed read raises ``EngineUnavailableError``; a slow one is
        waited for, as long as the caller allows (the scheduler's health
        watch takes a read that outlasts half of ``replica_silent_after`` as
        silence). A busy vLLM on a few CPU cores answers its metrics in
        seconds now and then while it goes on generating: cut off at a fixed
        limit, those reads would count as failures, and the replica would be
        taken as down and flex held off it."""
        try:
            timeout = aiohttp.ClientTimeout(sock_connect=self._timeout.sock_connect)
            async with self.session.get(f"{self.base_url}/metrics", timeout=timeout) as response:
                if response.status == 404:
                    raise NoLoadSignalsError(f"{self.name} has no /metrics (HTTP 404).")
                if response.status != 200:
                    raise EngineError(f"{self.name}: GET /metrics answered HTTP {response.status}.")
                text = await response.text()
        except aiohttp.ClientError as exc:
            raise EngineUnavailableError(f"{self.name}: metrics unreadable: {exc!r}") from exc
        return parse_vllm_load(text)


def _reason(exc: aiohttp.ClientError) -> str:
    """What went wrong, without the addresses aiohttp's messages carry."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Not the OSError's own text: asyncio writes the address into it.
        errno = exc.os_error.errno
        return os.strerror(errno) if errno else exc.os_error.__class__.__name__
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return exc.__class__.__name__


async def _error_from_response(
    name: str, request_id: str, response: aiohttp.ClientResponse
) -> FlexServeError:
    """The upstream's error as FlexServe's; its message is relayed (it is the
    engine's word on the request), the upstream's address only logged."""
    body = await response.read()
    log.warning(
        "request %s: upstream %s answered HTTP %d: %s",
        request_id, name, response.status, body[:500].decode("utf-8", "replace"),
    )
    message = body[:500].decode("utf-8", "replace")
    param = None
    try:
        document = orjson.loads(body)
        # OpenAI's envelope, or the bare error object older vLLM answers with.
        error = document.get("error", document if "message" in document else None)
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            param = error.get("param")
        elif isinstance(error, str):
            message = error
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    status = response.status
    if status in (400, 422):
        # The client's input was refused by the engine (context too long, say).
        return InvalidRequestError(f"The engine refused the request: {message}", param=param)
    if status in (429, 503):
        return EngineOverloadedError(
            f"{_LABEL} is overloaded (HTTP {status}): {message}",
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    if status == 502:
        return EngineUnavailableError(f"{_LABEL} is unavailable (HTTP {status}): {message}")
    if status == 504:
        return EngineTimeoutError(f"{_LABEL} timed out: {message}")
    return EngineError(f"{_LABEL} answered HTTP {status}: {message}")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header's delay in seconds: a number of seconds or an
    HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
