"""`/v1/responses`: OpenAI's Responses API on the engines' chat path.

`POST` creates a response (whole, or streamed as typed events:
`response.created`, `response.output_text.delta`, …, `response.completed`);
with `store` (the default, as OpenAI has it) the response is kept for
`GET /v1/responses/{id}`, `DELETE`, `GET …/input_items`, and for a later
request that continues it with `previous_response_id`. Stored responses are
scoped to the organization: another organization's id is a 404.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from flexserve.accounts import Principal
from flexserve.api.auth import principal_of
from flexserve.api.endpoints.chat import check_service_tier
from flexserve.api.endpoints.choices import Choice, Choices
from flexserve.api.errors import error_parts
from flexserve.api.inference import Call, Endpoint, Inference, Output
from flexserve.api.schemas import convert
from flexserve.api.schemas.chat import ChatCompletionRequest, features_needed
from flexserve.api.schemas.responses import (
    RESPONSES_FIELDS,
    ResponsesRequest,
    chat_tool_choice,
    chat_tools,
    check_unsupported,
    input_messages,
    response_format,
    text_format,
)
from flexserve.api.state import Services
from flexserve.config import Settings
from flexserve.engines.base import Delta, EngineRequest, Usage
from flexserve.errors import InvalidRequestError, NotFoundError
from flexserve.store.responses import ResponseStore

log = logging.getLogger(__name__)

RESPONSES_PATH = "/v1/responses"


class _Turn:
    """What the responses endpoint keeps of one request for its answer."""

    __slots__ = ("conversation", "input_items", "new_messages", "request")

    def __init__(
        self, request: ResponsesRequest, new_messages: list[dict[str, Any]],
        input_items: list[dict[str, Any]],
    ) -> None:
        self.request = request
        # This request's input as chat messages (no instructions).
        self.new_messages = new_messages
        self.input_items = input_items
        # Earlier turns (previous_response_id) and this one's input.
        self.conversation: list[dict[str, Any]] = list(new_messages)


class Responses(Endpoint):
    path = RESPONSES_PATH

    def parse(self, body: Any, request_id: str, settings: Settings) -> Inference:
        request = convert(body, ResponsesRequest)
        check_unsupported(request)
        check_service_tier(request.service_tier)
        if request.max_output_tokens is not None and request.max_output_tokens > settings.max_completion_tokens:
            raise InvalidRequestError(
                f"Invalid 'max_output_tokens': {request.max_output_tokens}. It must be between "
                f"1 and {settings.max_completion_tokens}.",
                param="max_output_tokens",
                code="integer_above_max_value",
            )
        messages, items = input_messages(request.input)
        if not messages and request.previous_response_id is None:
            raise InvalidRequestError(
                "Missing required parameter: 'input'.", param="input",
                code="missing_required_parameter",
            )
        for i, item in enumerate(items):
            item.setdefault("id", f"{_ITEM_PREFIX.get(item.get('type', ''), 'item')}_{request_id[4:]}_{i}")
        chat: dict[str, Any] = {"model": request.model, "messages": messages}
        if request.max_output_tokens is not None:
            chat["max_completion_tokens"] = request.max_output_tokens
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            value = getattr(request, name)
            if value is not None:
                chat[name] = value
        if request.top_logprobs is not None or "message.output_text.logprobs" in (request.include or ()):
            chat["logprobs"] = True
            if request.top_logprobs:
                chat["top_logprobs"] = request.top_logprobs
        if request.tools:
            chat["tools"] = chat_tools(request.tools)
        if request.tool_choice is not None:
            chat["tool_choice"] = chat_tool_choice(request.tool_choice)
        fmt = response_format(request.text)
        if fmt is not None:
            chat["response_format"] = fmt
        unknown = [name for name in body if name not in RESPONSES_FIELDS]
        for name in unknown:
            chat[name] = body[name]
        # The chat request is checked as any chat request is (and what it
        # needs of the engine found the same way).
        as_chat = convert(chat, ChatCompletionRequest)
        turn = _Turn(request, messages, items)
        inference = Inference(
            engine=EngineRequest(request_id, request.model, chat, "chat"),
            service_tier=request.service_tier,
            stream=bool(request.stream),
            prompt_tokens=0,
            prompt_token_bound=0,
            max_output_tokens=request.max_output_tokens,
            needs=features_needed(as_chat),
            unknown_fields=unknown,
            user=request.user,
            extra=turn,
        )
        _count_prompt(inference, turn)
        return inference

    async def prepare(self, services: Services, principal: Principal, inference: Inference) -> None:
        turn: _Turn = inference.extra
        request = turn.request
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = await ResponseStore(services.db).get(principal.org_id, request.previous_response_id)
            if previous is None:
                raise NotFoundError(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = previous.conversation
        turn.conversation = history + turn.new_messages
        # Instructions apply to this request only (OpenAI does not carry them over).
        system = [{"role": "system", "content": request.instructions}] if request.instructions else []
        inference.engine.body["messages"] = system + turn.conversation
        _count_prompt(inference, turn)

    def output(self, call: Call) -> Output:
        return ResponseOutput(call)

    has_finish_step = True

    async def finished(self, services: Services, call: Call, output: Output) -> None:
        assert isinstance(output, ResponseOutput)
        turn: _Turn = call.inference.extra
        if turn.request.store is False or output.final is None:
            return
        choice = output.choice
        answer: dict[str, Any] = {"role": "assistant", "content": choice.text or None}
        if choice.tool_calls:
            answer["tool_calls"] = choice.tool_call_list()
        try:
            await ResponseStore(services.db).save(
                org_id=call.principal.org_id,
                project_id=call.principal.project_id,
                created_at=call.created,
                response=output.final,
                input_items=turn.input_items,
                conversation=[*turn.conversation, answer],
            )
        except Exception:
            # The answer still goes out; only its stored copy is missing.
            log.exception("storing response %s failed", output.final["id"])


# Members of a Response that are always there, null when they do not apply.
_REQUIRED_NULLABLE = frozenset({"error", "incomplete_details", "instructions"})

_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _count_prompt(inference: Inference, turn: _Turn) -> None:
    messages = inference.engine.body["messages"]
    size = len(orjson.dumps(messages)) + len(orjson.dumps(inference.engine.body.get("tools") or []))
    inference.prompt_tokens = size // 4 + 4 * len(messages)
    inference.prompt_token_bound = size + 8 * len(messages) + 8


class ResponseOutput(Output):
    """A Response object, whole or as the Responses API's typed stream events.

    Output items: the assistant's message (when it wrote text) first, then one
    `function_call` item per tool call, in the order they started."""

    def __init__(self, call: Call) -> None:
        self._call = call
        turn: _Turn = call.inference.extra
        self._request = turn.request
        self._id = "resp_" + call.request_id[4:]
        self._choices = Choices()
        self._sequence = 0
        # Stream state: the output index of the message, and of each tool call.
        self._message_index: int | None = None
        self._call_indexes: dict[int, int] = {}
        self._num_items = 0
        # The Response object once complete (stored, and sent in response.completed).
        self.final: dict[str, Any] | None = None

    @property
    def choice(self) -> Choice:
        return self._choices.get(0)

    @property
    def _message_id(self) -> str:
        return "msg_" + self._call.request_id[4:]

    def _call_id(self, index: int) -> str:
        return f"fc_{self._call.request_id[4:]}_{index}"

    # --- the Response object ---------------------------------------------------

    def _response(self, status: str, output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        request = self._request
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        body: dict[str, Any] = {
            "id": self._id,
            "object": "response",
            "created_at": self._call.created,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "model": self._call.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": self._call.served_tier.value,
            "store": request.store is not False,
            "temperature": request.temperature if request.temperature is not None else 1.0,
            "text": {"format": text_format(request.text)},
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "tools": request.tools or [],
            "top_logprobs": request.top_logprobs or 0,
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "truncation": request.truncation or "disabled",
            "usage": None if usage is None else _usage(usage),
            "user": request.user,
            "metadata": request.metadata or {},
        }
        # Optional members are left out rather than null, as OpenAI's schema has them.
        return {k: v for k, v in body.items() if v is not None or k in _REQUIRED_NULLABLE}

    def _output_items(self, choice: Choice) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        if choice.texts or not choice.tool_calls:
            items.append(self._message_item(choice, "completed"))
        for index, call in sorted((choice.tool_calls or {}).items()):
            items.append(self._function_item(index, call, "completed"))
        return items

    def _message_item(self, choice: Choice | None, status: str) -> dict[str, Any]:
        content = [] if choice is None else [self._text_part(choice.text, choice)]
        return {
            "type": "message",
            "id": self._message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _text_part(text: str, choice: Choice | None) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": text,
            "annotations": [],
            "logprobs": _logprobs(choice.logprob_tokens if choice is not None else None),
        }

    def _function_item(self, index: int, call: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": self._call_id(index),
            "call_id": call["id"] or self._call_id(index),
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
            "status": status,
        }

    def _complete(self, usage: Usage) -> dict[str, Any]:
        choice = self.choice
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        self.final = self._response(status, self._output_items(choice), usage)
        return self.final

    # --- whole ------------------------------------------------------------------

    def collect(self, delta: Delta) -> None:
        if delta.index == 0:
            self._choices.add(delta)

    def document(self, usage: Usage) -> dict[str, Any]:
        return self._complete(usage)

    # --- stream -----------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    def open(self) -> bytes:
        started = self._response("in_progress", [], None)
        return self._event("response.created", response=started) + self._event(
            "response.in_progress", response=started
        )

    def event(self, delta: Delta) -> bytes:
        if delta.index != 0:
            return b""
        self._choices.add(delta)
        out = b""
        if delta.text:
            if self._message_index is None:
                self._message_index = self._num_items
                self._num_items += 1
                out += self._event(
                    "response.output_item.added", output_index=self._message_index,
                    item=self._message_item(None, "in_progress"),
                )
                out += self._event(
                    "response.content_part.added", item_id=self._message_id,
                    output_index=self._message_index, content_index=0,
                    part=self._text_part("", None),
                )
            out += self._event(
                "response.output_text.delta", item_id=self._message_id,
                output_index=self._message_index, content_index=0, delta=delta.text,
                logprobs=_logprobs((delta.logprobs or {}).get("content")),
            )
        for position, piece in enumerate(delta.tool_calls or ()):
            index = piece.get("index", position)
            arguments = (piece.get("function") or {}).get("arguments") or ""
            if index not in self._call_indexes:
                self._call_indexes[index] = self._num_items
                self._num_items += 1
                call = (self.choice.tool_calls or {})[index]
                out += self._event(
                    "response.output_item.added", output_index=self._call_indexes[index],
                    item=self._function_item(index, {**call, "function": {
                        "name": call["function"]["name"], "arguments": ""}}, "in_progress"),
                )
            if arguments:
                out += self._event(
                    "response.function_call_arguments.delta", item_id=self._call_id(index),
                    output_index=self._call_indexes[index], delta=arguments,
                )
        return out

    def close(self, usage: Usage) -> bytes:
        final = self._complete(usage)
        choice = self.choice
        out = b""
        done: list[tuple[int, bytes]] = []
        if self._message_index is not None:
            item = self._message_item(choice, "completed")
            part = item["content"][0]
            events = self._event(
                "response.output_text.done", item_id=self._message_id,
                output_index=self._message_index, content_index=0, text=choice.text,
                logprobs=part["logprobs"],
            )
            events += self._event(
                "response.content_part.done", item_id=self._message_id,
                output_index=self._message_index, content_index=0, part=part,
            )
            events += self._event(
                "response.output_item.done", output_index=self._message_index, item=item
            )
            done.append((self._message_index, events))
        for index, output_index in self._call_indexes.items():
            call = (choice.tool_calls or {})[index]
            item = self._function_item(index, call, "completed")
            events = self._event(
                "response.function_call_arguments.done", item_id=item["id"],
                output_index=output_index, name=item["name"], arguments=item["arguments"],
            )
            events += self._event("response.output_item.done", output_index=output_index, item=item)
            done.append((output_index, events))
        for _, events in sorted(done, key=lambda pair: pair[0]):
            out += events
        # The stored object lists the items in the order the stream opened them.
        final["output"] = self._streamed_items(choice) or final["output"]
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=final)

    def _streamed_items(self, choice: Choice) -> list[dict[str, Any]]:
        items: list[tuple[int, dict[str, Any]]] = []
        if self._message_index is not None:
            items.append((self._message_index, self._message_item(choice, "completed")))
        for index, output_index in self._call_indexes.items():
            call = (choice.tool_calls or {})[index]
            items.append((output_index, self._function_item(index, call, "completed")))
        return [item for _, item in sorted(items, key=lambda pair: pair[0])]

    def failed(self, error: BaseException) -> bytes:
        _, body, _ = error_parts(error)
        envelope = orjson.loads(body)["error"]
        return self._event(
            "error", code=envelope["code"], message=envelope["message"], param=envelope["param"]
        )


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _logprobs(tokens: list[Any] | None) -> list[dict[str, Any]]:
    """Chat token logprobs in the Responses API's shape."""
    return [
        {
            "token": entry.get("token", ""),
            "logprob": entry.get("logprob", 0.0),
            "bytes": entry.get("bytes") or [],
            "top_logprobs": [
                {"token": top.get("token", ""), "logprob": top.get("logprob", 0.0),
                 "bytes": top.get("bytes") or []}
                for top in entry.get("top_logprobs") or ()
            ],
        }
        for entry in tokens or ()
    ]


# --- the stored responses' own routes ---------------------------------------------


async def _stored(request: Request) -> tuple[ResponseStore, Principal, str]:
    services: Services = request.app.state.services
    principal = await principal_of(request.headers.get("authorization"), services.keys)
    return ResponseStore(services.db), principal, request.path_params["response_id"]


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param=None)


def _json(document: dict[str, Any]) -> Response:
    return Response(orjson.dumps(document), media_type="application/json")


async def retrieve_response(request: Request) -> Response:
    """`GET /v1/responses/{response_id}`."""
    store, principal, response_id = await _stored(request)
    stored = await store.get(principal.org_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    return _json(stored.response)


async def delete_response(request: Request) -> Response:
    """`DELETE /v1/responses/{response_id}`."""
    store, principal, response_id = await _stored(request)
    if not await store.delete(principal.org_id, response_id):
        raise _not_found(response_id)
    # OpenAI answers a deletion with an empty 200.
    return Response(status_code=200)


async def list_input_items(request: Request) -> Response:
    """`GET /v1/responses/{response_id}/input_items` (newest first unless `order=asc`)."""
    store, principal, response_id = await _stored(request)
    stored = await store.get(principal.org_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    items = list(stored.input_items)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"Invalid value for 'order': {order!r}.", param="order", code="invalid_value")
    if order == "desc":
        items.reverse()
    return _json({
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    })
