"""Log probabilities of tokens, in the shapes OpenAI's two endpoints give them.

They are the model's own distribution (``llama.token_logprob``): the
log-softmax of the logits of the position that predicted the token, before
`logit_bias`, penalties, temperature, `top_p` or a grammar shaped the choice
(what vLLM reports by default, and what an evaluation harness scoring a text
needs). So a token forced by a grammar or a bias may be one the model found
unlikely, and it is reported so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token and how likely the model found it, with the likeliest alternatives."""

    token: int
    logprob: float
    # (token, logprob) of the likeliest tokens at that position, likeliest first.
    top: tuple[tuple[int, float], ...]


class LogprobFormatter:
    """Turns ``TokenLogprob``s into chat's or completions' logprobs, given how
    to spell a token."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        # Spelling a token is a call into llama.cpp, and the same few tokens
        # come up again and again; the vocabulary bounds the cache.
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _spell(self, token: int) -> tuple[str, list[int]]:
        spelled = self._cache.get(token)
        if spelled is None:
            raw = self._token_bytes(token)
            # A token holding part of a UTF-8 character has no text of its own;
            # its bytes say exactly what it holds.
            spelled = self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return spelled

    def text(self, token: int) -> str:
        return self._spell(token)[0]

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Chat's ``{"content": [ChatCompletionTokenLogprob…]}``."""
        content = []
        for entry in entries:
            text, raw = self._spell(entry.token)
            top = []
            for token, logprob in entry.top:
                top_text, top_raw = self._spell(token)
                top.append({"token": top_text, "logprob": logprob, "bytes": top_raw})
            content.append(
                {"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}
            )
        return {"content": content}

    def completion(
        self, entries: Sequence[tuple[int, int, TokenLogprob | None]]
    ) -> dict[str, Any]:
        """Completions' four parallel lists, from (text offset, token, logprob)
        triples; a token without logprob (a prompt's first) gets nulls."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for offset, token, entry in entries:
            tokens.append(self.text(token))
            text_offset.append(offset)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(entry.logprob)
            # The likeliest tokens, and always the chosen one (OpenAI: up to
            # `logprobs` + 1 entries).
            top = {self.text(t): logprob for t, logprob in entry.top}
            top.setdefault(self.text(entry.token), entry.logprob)
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }
