"""The embedded engine's boundary with llama.cpp: its C API, called through
llama-cpp-python's bindings, and nothing above it.

``Llama`` (llama-cpp-python's high-level class) loads the model, owns each
context and tokenizes; the rest is driven here one call at a time, because
the engine needs what ``Llama.generate`` hides: a sampler chain of its own
per choice (grammar, penalties, logit bias, a seed per choice), the logits
of a step (log probabilities), logits for every prompt position in one
batch (the prompt's own log probabilities), and the KV cache cut back to
the prompt so that the next choice reuses it.

Decoding (``Context.prefill``, ``Context.step``, a sampler's draw) runs in a
worker thread. The quick calls run on the event loop, between steps:
tokenizing (it reads only the vocabulary, which no decode changes), making
and freeing a sampler, clearing or cutting back a KV cache.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama
from llama_cpp import llama_cpp as C

from flexserve.engines.embedded.logprobs import TokenLogprob
from flexserve.engines.embedded.sampling import SamplingParams
from flexserve.errors import EngineError, InvalidRequestError


class Vocabulary:
    """The model's tokens: text to tokens and back, and which tokens end a
    generation."""

    def __init__(self, llama: Llama) -> None:
        self._llama = llama
        self._vocab = C.llama_model_get_vocab(llama.model)
        self.size: int = C.llama_vocab_n_tokens(self._vocab)
        # End-of-generation tokens as llama.cpp knows them: EOS, the chat
        # template's end of turn, and any other end-of-text marker.
        self.end_tokens = frozenset(
            token for token in range(self.size) if C.llama_vocab_is_eog(self._vocab, token)
        )

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """``text`` as tokens. ``add_bos`` adds BOS only if the model wants one;
        ``special`` reads special-token text ("<|im_start|>") as those tokens."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """A generated token's bytes as the client sees them (special tokens: none)."""
        return self._llama.detokenize([token])

    def spell(self, token: int) -> bytes:
        """A token's bytes, special tokens spelled out (prompts, logprobs)."""
        return self._llama.detokenize([token], special=True)

    def check_grammar(self, grammar: str) -> None:
        """Refuse a grammar llama.cpp cannot parse, before any slot is taken."""
        sampler = C.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequestError(
                "Invalid 'response_format': llama.cpp could not build a grammar from it.",
                param="response_format",
                code="invalid_value",
            )
        C.llama_sampler_free(sampler)

    def sampler(self, params: SamplingParams, seed: int, penalty_window: int) -> Sampler:
        return Sampler(self._vocab, self.size, params, seed, penalty_window)


class Sampler:
    """llama.cpp's sampler chain for one choice; ``close`` frees it.

    The chain's order is llama.cpp's own: logit bias, penalties, then greedy,
    or top_p, temperature and a seeded draw. Samplers a request does not need
    are left out; each of them is a no-op at its neutral value, so the chain
    chooses what ``Llama.generate`` chose for the same seed.

    A grammar stands apart from the chain. Masking the whole vocabulary
    through it costs more than the rest of a step, so, as llama.cpp's own
    samplers do, the token is chosen without it first and checked against it
    alone; only a token the grammar refuses sends the vocabulary through it,
    and the choice is made again among the tokens it allows. Either way the
    token comes from the allowed tokens' distribution (greedy: the likeliest
    allowed token).
    """

    def __init__(
        self,
        vocab: C.llama_vocab_p,
        vocabulary_size: int,
        params: SamplingParams,
        seed: int,
        penalty_window: int,
    ) -> None:
        self._grammar: C.llama_sampler_p | None = None
        self._chain: C.llama_sampler_p | None = C.llama_sampler_chain_init(
            C.llama_sampler_chain_default_params()
        )
        chain = self._chain
        try:
            if params.logit_bias:
                bias = (C.llama_logit_bias * len(params.logit_bias))()
                for i, (token, amount) in enumerate(params.logit_bias):
                    # The bindings type `token` as a c_int32; ctypes takes an int.
                    bias[i].token = token  # type: ignore[assignment]
                    bias[i].bias = amount
                C.llama_sampler_chain_add(
                    chain, C.llama_sampler_init_logit_bias(vocabulary_size, len(bias), bias)
                )
            if params.penalised:
                C.llama_sampler_chain_add(
                    chain,
                    C.llama_sampler_init_penalties(
                        vocabulary_size,
                        penalty_window,
                        1.0,  # no repetition penalty: OpenAI has none
                        params.frequency_penalty,
                        params.presence_penalty,
                    ),
                )
            if params.temperature == 0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
            else:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
            if params.grammar is not None:
                self._grammar = C.llama_sampler_init_grammar(
                    vocab, params.grammar.encode("utf-8"), b"root"
                )
                if not self._grammar:
                    raise EngineError("llama.cpp could not build the response grammar.")
                self._candidates = _Candidates(vocabulary_size)
        except BaseException:
            self.close()
            raise

    def sample(self, context: Context) -> int:
        """Choose the next token from the context's last logits; the samplers
        take note of it (grammar state, penalty counts)."""
        if self._grammar is None:
            return int(C.llama_sampler_sample(self._chain, context.ctx, -1))
        candidates = self._candidates
        logits = context.last_logits()
        token = candidates.choose(self._chain, logits)
        if not candidates.allows(self._grammar, token):
            token = candidates.choose(self._chain, logits, first=self._grammar)
        C.llama_sampler_accept(self._grammar, token)
        C.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        for sampler in (self._chain, self._grammar):
            if sampler is not None:
                C.llama_sampler_free(sampler)
        self._chain = self._grammar = None


class _Candidates:
    """A token-data array over the whole vocabulary, for samplers applied by hand."""

    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

    def __init__(self, vocabulary_size: int) -> None:
        self._ids = np.arange(vocabulary_size, dtype=np.int32)
        self._data = np.zeros(vocabulary_size, dtype=self._DTYPE)
        self._array = C.llama_token_data_array()
        self._one = (C.llama_token_data * 1)()
        self._one_array = C.llama_token_data_array(self._one, 1, -1, False)

    def choose(
        self,
        chain: C.llama_sampler_p | None,
        logits: npt.NDArray[np.float32],
        first: C.llama_sampler_p | None = None,
    ) -> int:
        """The chain's choice among all tokens (masked by ``first`` when given)."""
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        array = self._array
        # Samplers may move the array's data pointer and shrink its size: set
        # both anew. (The bindings type `data` as an array; it is a pointer.)
        array.data = data.ctypes.data_as(C.llama_token_data_p)  # type: ignore[assignment]
        array.size = len(data)
        array.selected = -1
        array.sorted = False
        if first is not None:
            C.llama_sampler_apply(first, ctypes.byref(array))
        C.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise EngineError("llama.cpp's samplers chose no token.")
        return int(array.data[array.selected].id)

    def allows(self, grammar: C.llama_sampler_p, token: int) -> bool:
        """Whether the grammar, in its current state, allows ``token`` next."""
        one = self._one[0]
        one.id = token  # type: ignore[assignment]  # a c_int32 field takes an int
        one.logit = 1.0
        one.p = 0.0
        self._one_array.data = self._one
        self._one_array.size = 1
        C.llama_sampler_apply(grammar, ctypes.byref(self._one_array))
        return bool(np.isfinite(self._one[0].logit))


class Context:
    """One generation slot's llama.cpp context: one sequence, its KV cache,
    and the batch that feeds it."""

    def __init__(self, llama: Llama, batch_size: int) -> None:
        self.llama = llama
        self.ctx = llama.ctx
        self._memory = C.llama_get_memory(self.ctx)
        self._vocabulary_size = C.llama_vocab_n_tokens(C.llama_model_get_vocab(llama.model))
        self._batch_size = batch_size
        self._batch: C.llama_batch | None = C.llama_batch_init(batch_size, 0, 1)
        # Every token belongs to sequence 0: set once, never changed.
        for i in range(batch_size):
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0

    def clear(self) -> None:
        """Forget every token: the next sequence starts from nothing."""
        if self._memory is not None:
            C.llama_memory_clear(self._memory, True)

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` positions (the next choice re-uses the prompt)."""
        if self._memory is not None and not C.llama_memory_seq_rm(self._memory, 0, num_tokens, -1):
            raise EngineError("llama.cpp could not cut its KV cache back to the prompt.")

    def prefill(
        self,
        tokens: Sequence[int],
        start: int,
        scored: Sequence[int] | None = None,
        num_top: int = 0,
    ) -> list[TokenLogprob]:
        """Evaluate ``tokens`` at positions ``start``…; given ``scored`` (the
        token that follows each of them), return their log probabilities."""
        self._decode(tokens, start, every_position=scored is not None)
        if scored is None:
            return []
        shape = (len(tokens), self._vocabulary_size)
        rows = np.ctypeslib.as_array(C.llama_get_logits(self.ctx), shape=shape)
        return [token_logprob(rows[i], token, num_top) for i, token in enumerate(scored)]

    def step(
        self, token: int, position: int, sampler: Sampler, num_top: int | None
    ) -> tuple[int, TokenLogprob | None]:
        """One token of a completion: evaluate ``token`` at ``position`` and
        choose the next one (with its log probability when ``num_top`` is set)."""
        self._decode((token,), position, every_position=False)
        chosen = sampler.sample(self)
        if num_top is None:
            return chosen, None
        return chosen, token_logprob(self.last_logits(), chosen, num_top)

    def last_logits(self) -> npt.NDArray[np.float32]:
        """The logits of the last position evaluated (a view: valid until the next decode)."""
        pointer = C.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._vocabulary_size,))

    def _decode(self, tokens: Sequence[int], start: int, *, every_position: bool) -> None:
        batch = self._batch
        if batch is None:
            raise EngineError("The llama.cpp context is closed.")
        num_tokens = len(tokens)
        if not 0 < num_tokens <= self._batch_size:
            raise EngineError(f"A batch of {num_tokens} tokens does not fit llama.cpp's batch.")
        for i, token in enumerate(tokens):
            batch.token[i] = token
            # The bindings type `pos` as an array of arrays; it is int32s.
            batch.pos[i] = start + i  # type: ignore[call-overload]
            batch.logits[i] = every_position
        batch.logits[num_tokens - 1] = True
        batch.n_tokens = num_tokens
        status = C.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama.cpp could not evaluate the tokens (llama_decode: {status}).")

    def close(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        self.llama.close()


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Log probabilities from one position's logits (in double precision, so
    that probabilities never add up to more than one by rounding)."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max()
    shifted -= np.log(np.exp(shifted).sum())
    return shifted


def token_logprob(logits: npt.NDArray[np.float32], token: int, num_top: int) -> TokenLogprob:
    """``token``'s log probability under one position's logits, with the
    ``num_top`` likeliest tokens there."""
    logprobs = log_softmax(logits)
    top: tuple[tuple[int, float], ...] = ()
    if num_top > 0:
        # argpartition finds the top k without sorting the whole vocabulary.
        candidates = np.argpartition(logprobs, -num_top)[-num_top:]
        ranked = candidates[np.argsort(-logprobs[candidates], kind="stable")]
        top = tuple((int(t), float(logprobs[t])) for t in ranked)
    return TokenLogprob(token, float(logprobs[token]), top)
