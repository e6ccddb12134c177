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

Token ids (the sim server's ``/tokenize``, as vLLM's): a filler word's id is
its place in ``FILLER_WORDS``, any other word a stable hash past them; a chat
prompt's message markers and reply primer are Llama 3's special tokens. So
``/tokenize`` counts exactly what usage counts, and ids of filler text
detokenize back to it (other ids to the filler words they pick).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from typing import Any

from flexserve.engines.base import content_text

__all__ = [
    "FILLER_WORDS",
    "VOCAB_SIZE",
    "WORD_OF_BYTE",
    "chat_token_ids",
    "count_prompt_tokens",
    "count_tool_tokens",
    "render_token_ids",
    "split_tokens",
    "text_token_ids",
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

_FILLER_IDS = {word: i for i, word in enumerate(FILLER_WORDS)}
# Llama 3's special tokens: a message is <|start_header_id|> role
# <|end_header_id|> … <|eot_id|>, a reply is primed with its header.
_START_HEADER, _END_HEADER, _END_OF_TURN = 128_006, 128_007, 128_009
_FIRST_SPECIAL = 128_000


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


def _word_id(word: str) -> int:
    filler = _FILLER_IDS.get(" " + word.strip())
    if filler is not None:
        return filler
    span = _FIRST_SPECIAL - len(FILLER_WORDS)
    return len(FILLER_WORDS) + zlib.crc32(word.strip().encode()) % span


def text_token_ids(text: str) -> list[int]:
    """A text prompt's token ids (``split_tokens``' tokens)."""
    return [_word_id(token) for token in split_tokens(text)]


def chat_token_ids(messages: Sequence[dict[str, Any]], tools: Sequence[Any] = (),
                   add_generation_prompt: bool = True) -> list[int]:
    """A chat prompt's token ids: as many as ``count_prompt_tokens`` and
    ``count_tool_tokens`` count (less the reply's primer if not asked for)."""
    ids: list[int] = []
    for m in messages:
        ids += [_START_HEADER, _word_id(str(m.get("role") or "user")), _END_HEADER]
        ids += [_word_id(w) for w in content_text(m.get("content")).split()]
        for call in m.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for part in (function.get("name"), function.get("arguments")):
                    ids += [_word_id(w) for w in str(part or "").split()]
        ids.append(_END_OF_TURN)
    for tool in tools:
        ids += [_START_HEADER, _word_id("tool"), _END_HEADER]
        ids += [_word_id(w) for w in json.dumps(tool).split()]
        ids.append(_END_OF_TURN)
    if add_generation_prompt:
        ids += [_START_HEADER, _word_id("assistant")]
    return ids
