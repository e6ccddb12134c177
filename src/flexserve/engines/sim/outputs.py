"""What each choice of a simulated generation says, handed out as deltas.

A choice is planned whole before its first token: a list of pieces, one per
simulated token, so that the step loop only counts tokens and the text is cut
wherever the loop has got to. Plain text is filler words (one seeded stream
per choice; for one seed a shorter output is a prefix of a longer one).
Structured output is one JSON document, cut into pieces of a few characters:
``{"answer": "<filler>"}`` for `json_object`, an instance of the schema for
`json_schema`, and for a tool call the function's name (one token) followed
by its arguments, an instance of the function's parameter schema; a call
ends with finish_reason "tool_calls", or "stop" when the client named the
function (as OpenAI and vLLM end it). When ``max_tokens`` or the context runs
out first the document is cut there, with finish_reason "length", as a real
engine's would be.

Completions with ``echo`` and max_tokens 0 (how evaluation harnesses score a
prompt) generate one token that is counted in usage but not shown, as vLLM
does.

Log probabilities are made up but consistent: each token gets a ladder of
descending values drawn from the choice's seed; the chosen token is the most
likely, so it heads its alternatives (other filler words). The chat shape
lists ``{"token", "logprob", "bytes", "top_logprobs"}`` per token; the
completions shape four parallel lists, the echoed prompt's first token with
no log probability (as OpenAI and vLLM give it).
"""

from __future__ import annotations

import json
import random
from typing import Any

from flexserve.engines.base import Delta, Usage
from flexserve.engines.sim.inputs import GenerationInput, OutputForm
from flexserve.engines.sim.schema_instance import instance_of
from flexserve.engines.sim.tokenizer import FILLER_WORDS, WORD_OF_BYTE

__all__ = ["ChoiceOutput", "choice_key", "filler_words", "plan_choices"]

# Characters of JSON per simulated token.
PIECE_CHARS = 4
# Range of an unbounded output's length, in tokens.
MIN_DRAWN, MAX_DRAWN = 16, 512
# A step through the filler words that visits all 64 before repeating.
_ALTERNATIVE_STRIDE = 17

# Per token: the chosen token's logprob, the gap to each next alternative, and
# where in the filler words the alternatives start.
Ladder = tuple[float, float, int]


class ChoiceOutput:
    """One choice: its planned pieces, and how many have been handed out."""

    __slots__ = ("call_id", "done", "echo", "echo_ladders", "emitted", "finish_reason", "index",
                 "ladders", "num_alternatives", "num_hidden", "op", "pieces", "text_offset",
                 "tool_name")

    def __init__(self, index: int, op: str, pieces: list[str], finish_reason: str) -> None:
        self.index = index
        self.op = op
        self.pieces = pieces
        self.finish_reason = finish_reason
        # A tool call: its id and function; pieces[0] is then the name's token.
        self.call_id: str | None = None
        self.tool_name = ""
        # Completions `echo`: the prompt's tokens, sent ahead of the first piece.
        self.echo: list[str] | None = None
        # Tokens generated after the pieces and never shown: vLLM answers `echo`
        # with max_tokens 0 by generating one token, which it counts in usage
        # but leaves out of the answer (only the prompt is echoed).
        self.num_hidden = 0
        # Log probabilities: alternatives per token (None: not asked for) and ladders.
        self.num_alternatives: int | None = None
        self.ladders: list[Ladder] = []
        self.echo_ladders: list[Ladder] = []
        self.emitted = 0
        self.done = False
        # Characters handed out so far (completions' `text_offset`).
        self.text_offset = 0

    @property
    def length(self) -> int:
        """Tokens the choice generates."""
        return len(self.pieces) + self.num_hidden

    def take(self, upto: int, finished: bool, usage: Usage | None) -> Delta:
        """The pieces from the last take up to ``upto``, as one Delta."""
        start, self.emitted = self.emitted, upto
        pieces = self.pieces[start:upto]
        finish_reason = None
        if finished:
            self.done = True
            finish_reason = self.finish_reason
        if self.op == "completion":
            return self._completion_delta(start, pieces, finish_reason, usage)
        logprobs = None
        if self.num_alternatives is not None and pieces:
            logprobs = {"content": [
                _chat_entry(token, self.ladders[start + i], self.num_alternatives)
                for i, token in enumerate(pieces)
            ]}
        if self.call_id is None:
            return Delta("".join(pieces), finish_reason, usage, self.index, logprobs=logprobs)
        if start == 0 and pieces:
            call: dict[str, Any] = {"index": 0, "id": self.call_id, "type": "function",
                                    "function": {"name": self.tool_name,
                                                 "arguments": "".join(pieces[1:])}}
        else:
            call = {"index": 0, "function": {"arguments": "".join(pieces)}}
        tool_calls = [call] if pieces else None
        return Delta("", finish_reason, usage, self.index, tool_calls, logprobs)

    def _completion_delta(self, start: int, pieces: list[str], finish_reason: str | None,
                          usage: Usage | None) -> Delta:
        tokens = list(pieces)
        ladders = self.ladders[start:start + len(pieces)]
        head = 0
        if self.echo is not None and start == 0 and self.text_offset == 0:
            tokens[:0] = self.echo
            head = len(self.echo)
        text = "".join(tokens)
        logprobs = None
        if self.num_alternatives is not None:
            logprobs = self._completion_logprobs(tokens, head, ladders)
        self.text_offset += len(text)
        return Delta(text, finish_reason, usage, self.index, logprobs=logprobs)

    def _completion_logprobs(self, tokens: list[str], head: int,
                             ladders: list[Ladder]) -> dict[str, Any]:
        k = self.num_alternatives or 0
        offsets: list[int] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offset = self.text_offset
        for i, token in enumerate(tokens):
            offsets.append(offset)
            offset += len(token)
            if i < head and i == 0:
                # The prompt's first token has nothing before it to be predicted from.
                values.append(None)
                tops.append(None)
                continue
            ladder = self.echo_ladders[i - 1] if i < head else ladders[i - head]
            values.append(ladder[0])
            # vLLM lists the chosen token alone when no alternatives are asked for.
            tops.append(dict(_alternatives(token, ladder, max(k, 1))))
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}


def plan_choices(inputs: GenerationInput, request_id: str,
                 rooms: list[int]) -> list[list[ChoiceOutput]]:
    """Every choice of a generation, by prompt: choice index = prompt × n + j.

    ``rooms`` is each prompt's room left in the context, in tokens.
    """
    plans: list[list[ChoiceOutput]] = []
    for p, room in enumerate(rooms):
        row = []
        for j in range(inputs.n):
            key = choice_key(inputs.seed, request_id, p, j)
            choice = _plan_one(p * inputs.n + j, inputs, key, room)
            if inputs.echo is not None:
                choice.echo = inputs.echo[p]
                if inputs.max_tokens == 0:
                    choice.num_hidden = 1
            if inputs.logprobs is not None:
                choice.num_alternatives = inputs.logprobs
                lp_rng = random.Random(f"logprobs/{key}")
                choice.ladders = [_ladder(lp_rng) for _ in choice.pieces]
                if choice.echo is not None:
                    choice.echo_ladders = [_ladder(lp_rng) for _ in choice.echo[1:]]
            row.append(choice)
        plans.append(row)
    return plans


def choice_key(seed: int | None, request_id: str, prompt: int, choice: int) -> int | str:
    """What seeds a choice: the seed plus the choice, so that choice 0 of a
    seeded request says what a request with n=1 says; without a seed, the
    request id (and the choice's place, past the first)."""
    if seed is not None:
        return seed + choice
    return request_id if prompt == choice == 0 else f"{request_id}/{prompt}/{choice}"


def filler_words(key: int | str, max_tokens: int | None, room: int) -> tuple[list[str], str]:
    """A plain-text choice: its words (one token each) and finish reason."""
    rng = random.Random(key)
    drawn = rng.randint(MIN_DRAWN, MAX_DRAWN)
    if max_tokens is not None:
        length, finish_reason = min(max_tokens, room), "length"
    elif drawn > room:
        length, finish_reason = room, "length"
    else:
        length, finish_reason = drawn, "stop"
    # Whole 32-bit draws (a multiple of 4 bytes) keep shorter outputs prefixes
    # of longer ones; one byte per word is much cheaper than rng.choices.
    data = rng.randbytes((length + 3) & ~3)[:length]
    return list(map(WORD_OF_BYTE.__getitem__, data)), finish_reason


def _plan_one(index: int, inputs: GenerationInput, key: int | str, room: int) -> ChoiceOutput:
    form = inputs.form
    if form.kind == "text":
        words, finish_reason = filler_words(key, inputs.max_tokens, room)
        return ChoiceOutput(index, inputs.op, words, finish_reason)
    rng = random.Random(key)
    # Drawn as for text, so that one seed gives one stream of draws.
    drawn = rng.randint(MIN_DRAWN, MAX_DRAWN)
    max_tokens = inputs.max_tokens
    call_id = None
    if form.kind == "tool_call":
        call_id = f"call_{rng.getrandbits(96):024x}"
    pieces = _structured_pieces(form, rng, drawn)
    limit = room if max_tokens is None else min(max_tokens, room)
    finish_reason = "tool_calls" if call_id is not None and not form.named else "stop"
    if len(pieces) > limit:
        pieces, finish_reason = pieces[:limit], "length"
    choice = ChoiceOutput(index, inputs.op, pieces, finish_reason)
    if call_id is not None:
        choice.call_id = call_id
        choice.tool_name = form.tool_name
    return choice


def _structured_pieces(form: OutputForm, rng: random.Random, drawn: int) -> list[str]:
    if form.kind == "json_object":
        words = rng.randbytes(max(1, drawn // 4))
        document = json.dumps({"answer": "".join(map(WORD_OF_BYTE.__getitem__, words)).strip()})
    else:
        document = json.dumps(instance_of(form.schema, rng), ensure_ascii=False)
    pieces = [document[i:i + PIECE_CHARS] for i in range(0, len(document), PIECE_CHARS)]
    if form.kind == "tool_call":
        pieces.insert(0, form.tool_name)
    return pieces


def _ladder(rng: random.Random) -> Ladder:
    # Squared, so that most tokens are likely ones, as in a confident model's output.
    top = -round(2.5 * rng.random() ** 2, 4)
    return top, 0.3 + 2.7 * rng.random(), rng.randrange(len(FILLER_WORDS))


def _alternatives(token: str, ladder: Ladder, k: int) -> list[tuple[str, float]]:
    """The ``k`` likeliest tokens at this position, the chosen one first."""
    top, gap, start = ladder
    out = [(token, top)]
    position = start
    while len(out) < k:
        word = FILLER_WORDS[position % len(FILLER_WORDS)]
        position += _ALTERNATIVE_STRIDE
        if word != token:
            out.append((word, round(top - gap * len(out), 4)))
    return out


def _chat_entry(token: str, ladder: Ladder, k: int) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": ladder[0],
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                         for t, lp in _alternatives(token, ladder, k)] if k else [],
    }
