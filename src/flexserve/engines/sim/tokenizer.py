"""The sim tokenizer: one token per whitespace-separated word.

Benchmarks build prompts of an exact length from it, so it is deliberately
simple and documented as a formula rather than a vocabulary::

    chat prompt tokens = sum(4 + words(content) + words(tool calls) per message)
                         + 2 + sum(4 + words(JSON definition) per tool)
    completion or embedding input tokens = words(text) (whitespace alone: 1),
                                           or len(ids) for token ids

A message's tool calls count the words of each call's name and arguments; a
tool counts the words of its definition as ``json.dumps`` writes it (spaces
after ``,`` and ``:``). Generated text is made of ``FILLER_WORDS``, one token
each; a token id is rendered as the filler word it picks, so echoed token
prompts read as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from flexserve.engines.base import content_text

__all__ = [
    "FILLER_WORDS",
    "VOCAB_SIZE",
    "WORD_OF_BYTE",
    "count_prompt_tokens",
    "count_tool_tokens",
    "render_token_ids",
    "split_tokens",
]

# One token each; the leading space makes the joined text read as words. 64 of
# them, so that each random byte picks one with equal odds (see WORD_OF_BYTE).
FILLER_WORDS: tuple[str, ...] = tuple(" " + w for w in (
    "the of and to in is that for it as with was on be by at this from or an "
    "model token batch queue flex tier engine latency prefill decode cache step "
    "spare capacity request stream answer sample value result simple steady "
    "quiet river stone light paper garden window morning yellow green orange "
    "little bright gentle calm clear early fresh open plain round warm"
).split(" "))
WORD_OF_BYTE: tuple[str, ...] = FILLER_WORDS * 4

# Llama 3's vocabulary, the model every profile imitates: token ids and
# logit_bias keys at or past it are refused, as vLLM refuses them.
VOCAB_SIZE = 128_256

# A token of a text prompt: the whitespace before a word, and the word.
_TOKEN = re.compile(r"\s*\S+")


def count_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Chat messages' tokens: 4 a message, one a word, 2 to prime the reply."""
    total = 2
    for m in messages:
        total += 4 + len(content_text(m.get("content")).split())
        calls = m.get("tool_calls")
        if calls:
            total += _tool_call_words(calls)
    return total


def _tool_call_words(calls: Any) -> int:
    words = 0
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            words += len(str(function.get("name") or "").split())
            words += len(str(function.get("arguments") or "").split())
    return words


def count_tool_tokens(tools: Sequence[Any]) -> int:
    """Tool definitions' tokens: 4 a tool, one per word of its JSON definition."""
    return sum(4 + len(json.dumps(tool).split()) for tool in tools)


def split_tokens(text: str) -> list[str]:
    """A text prompt's tokens, each a word with the whitespace before it; the
    text's trailing whitespace joins the last one, so that they add up to the
    text. Whitespace alone is one token; the empty text has none."""
    tokens: list[str] = _TOKEN.findall(text)
    if not tokens:
        return [text] if text else []
    tail = len(text) - len(text.rstrip())
    if tail:
        tokens[-1] += text[-tail:]
    return tokens


def render_token_ids(ids: Sequence[int]) -> list[str]:
    """Token ids as text, one filler word each (the id picks it)."""
    return [FILLER_WORDS[token_id % len(FILLER_WORDS)] for token_id in ids]
