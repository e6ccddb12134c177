"""`/v1/embeddings` on the embedded model: mean-pooled, L2-normalised vectors
of its last hidden states, from a llama.cpp context of its own created with
``embedding=True`` (a generation context cannot hand its hidden states out).

Inputs are evaluated in chunks of at most ``chunk_size`` tokens, as prompts
are, so that no step holds a decode permit for long and a pause or a
cancellation waits for one chunk at most. Short inputs share a chunk, each
as a sequence of its own (they do not see each other); a long one is split
over several, its KV cache carrying the earlier chunks. llama.cpp's own
mean pooling needs a whole sequence in one batch, so the engine asks for
each token's embedding and pools them itself: the model is causal, so the
result is the same to float precision.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp import Llama
from llama_cpp import llama_cpp as C

from flexserve.errors import EngineError


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of one input evaluated in a chunk."""

    # The input's position in the request.
    index: int
    # Position of the piece's first token in its input.
    start: int
    tokens: Sequence[int]


def chunks(inputs: Sequence[Sequence[int]], chunk_size: int) -> Iterator[list[Piece]]:
    """The inputs packed into chunks of at most ``chunk_size`` tokens.

    A chunk holds either whole inputs or one piece of a single long input,
    never both: the KV cache then never holds more than the longest input,
    and a chunk that starts an input may clear it.
    """
    chunk: list[Piece] = []
    room = chunk_size
    for index, tokens in enumerate(inputs):
        if len(tokens) > room and chunk:
            yield chunk
            chunk, room = [], chunk_size
        if len(tokens) <= room:
            chunk.append(Piece(index, 0, tokens))
            room -= len(tokens)
            continue
        for start in range(0, len(tokens), chunk_size):
            yield [Piece(index, start, tokens[start : start + chunk_size])]
    if chunk:
        yield chunk


class Embedder:
    """The embedding context. Its runs must not overlap: one request at a time."""

    def __init__(self, llama: Llama, chunk_size: int) -> None:
        self.llama = llama
        self._ctx = llama.ctx
        self._memory = C.llama_get_memory(self._ctx)
        self.dimensions: int = llama.n_embd()
        self.chunk_size = chunk_size
        self._batch: C.llama_batch | None = C.llama_batch_init(chunk_size, 0, 1)

    def start(self, inputs: Sequence[Sequence[int]]) -> EmbeddingRun:
        return EmbeddingRun(self, inputs)

    def run(self, chunk: Sequence[Piece], sums: npt.NDArray[np.float64]) -> None:
        """Evaluate one chunk and add each token's embedding to its input's row of ``sums``."""
        batch = self._batch
        if batch is None:
            raise EngineError("The embedding context is closed.")
        if chunk[0].start == 0 and self._memory is not None:
            C.llama_memory_clear(self._memory, True)
        num_tokens = 0
        for sequence, piece in enumerate(chunk):
            for offset, token in enumerate(piece.tokens):
                batch.token[num_tokens] = token
                # The bindings type `pos` as an array of arrays; it is int32s.
                batch.pos[num_tokens] = piece.start + offset  # type: ignore[call-overload]
                batch.n_seq_id[num_tokens] = 1
                batch.seq_id[num_tokens][0] = sequence
                batch.logits[num_tokens] = True
                num_tokens += 1
        batch.n_tokens = num_tokens
        status = C.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama.cpp could not embed the input (llama_decode: {status}).")
        rows = np.ctypeslib.as_array(
            C.llama_get_embeddings(self._ctx), shape=(num_tokens, self.dimensions)
        )
        first = 0
        for piece in chunk:
            last = first + len(piece.tokens)
            sums[piece.index] += rows[first:last].sum(axis=0, dtype=np.float64)
            first = last

    def close(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        self.llama.close()


class EmbeddingRun:
    """One request's inputs on their way through the embedder, chunk by chunk."""

    def __init__(self, embedder: Embedder, inputs: Sequence[Sequence[int]]) -> None:
        self._embedder = embedder
        self.chunks = list(chunks(inputs, embedder.chunk_size))
        # Sums of token embeddings, one row per input.
        self._sums = np.zeros((len(inputs), embedder.dimensions), dtype=np.float64)

    def run(self, chunk: Sequence[Piece]) -> None:
        """Evaluate one of ``chunks`` (in a worker thread)."""
        self._embedder.run(chunk, self._sums)

    def objects(self, encoding_format: str | None) -> list[dict[str, Any]]:
        """The embedding objects, once every chunk has run."""
        return embedding_objects(self._sums, encoding_format)


def embedding_objects(
    sums: npt.NDArray[np.float64], encoding_format: str | None
) -> list[dict[str, Any]]:
    """OpenAI's embedding objects for the pooled sums: each vector scaled to
    length 1 (the mean's direction is the sum's), as floats or as base64 of
    little-endian float32, as OpenAI encodes them."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    vectors = sums / np.where(norms > 0, norms, 1.0)
    objects: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        embedding: list[float] | str
        if encoding_format == "base64":
            embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vector.astype(np.float32).tolist()
        objects.append({"object": "embedding", "index": index, "embedding": embedding})
    return objects
