"""Deltas put back together into whole choices.

A non-streamed answer, a stored response and a stream's closing events all
need each choice whole: its text, its tool calls (streamed as pieces of
arguments under a call's index), its log probabilities and whatever other
members the engine sent. ``Choices`` keeps them per choice index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexserve.engines.base import Delta


@dataclass(slots=True)
class Choice:
    index: int
    texts: list[str] = field(default_factory=list)
    # Tool calls by their index: {"id", "type", "function": {"name", "arguments"}}.
    tool_calls: dict[int, dict[str, Any]] | None = None
    # The token entries of every delta's logprobs, in order.
    logprob_tokens: list[Any] | None = None
    # Completions' logprobs: the four parallel lists, concatenated.
    logprob_lists: dict[str, list[Any]] | None = None
    # Other members of the message (strings concatenated, anything else replaced).
    fields: dict[str, Any] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.texts.append(delta.text)
        if delta.tool_calls:
            self._add_tool_calls(delta.tool_calls)
        if delta.logprobs is not None:
            self._add_logprobs(delta.logprobs)
        if delta.fields:
            fields = self.fields if self.fields is not None else {}
            for name, value in delta.fields.items():
                old = fields.get(name)
                fields[name] = old + value if isinstance(old, str) and isinstance(value, str) else value
            self.fields = fields
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def _add_tool_calls(self, pieces: list[dict[str, Any]]) -> None:
        calls = self.tool_calls if self.tool_calls is not None else {}
        self.tool_calls = calls
        for position, piece in enumerate(pieces):
            index = piece.get("index", position)
            function = piece.get("function") or {}
            call = calls.get(index)
            if call is None:
                calls[index] = {
                    "id": piece.get("id") or "",
                    "type": piece.get("type") or "function",
                    "function": {
                        "name": function.get("name") or "",
                        "arguments": function.get("arguments") or "",
                    },
                }
                continue
            if piece.get("id"):
                call["id"] = piece["id"]
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        if "tokens" in logprobs:  # completions: parallel lists
            lists = self.logprob_lists if self.logprob_lists is not None else {}
            self.logprob_lists = lists
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                value = logprobs.get(name)
                if value is not None:
                    lists.setdefault(name, []).extend(value)
            return
        tokens = self.logprob_tokens if self.logprob_tokens is not None else []
        self.logprob_tokens = tokens
        tokens.extend(logprobs.get("content") or ())

    def tool_call_list(self) -> list[dict[str, Any]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)] if self.tool_calls else []


class Choices:
    """Every choice of one generation, by index."""

    __slots__ = ("_by_index",)

    def __init__(self) -> None:
        self._by_index: dict[int, Choice] = {}

    def add(self, delta: Delta) -> None:
        choice = self._by_index.get(delta.index)
        if choice is None:
            choice = self._by_index[delta.index] = Choice(delta.index)
        choice.add(delta)

    def __iter__(self) -> Any:
        return iter(self._by_index[i] for i in sorted(self._by_index))

    def get(self, index: int) -> Choice:
        return self._by_index.get(index) or Choice(index)
