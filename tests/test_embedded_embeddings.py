"""`/v1/embeddings` on the real embedded model: mean-pooled, L2-normalised
vectors from llama.cpp, as floats or base64, the same whatever else shares
the request, and pausable between chunks like any sequence."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from flexserve.engines.base import Delta, EngineRequest, SequenceControl
from flexserve.engines.embedded import EmbeddedEngine, find_smollm2_gguf
from flexserve.errors import InvalidRequestError

pytestmark = pytest.mark.embedded

MODEL = "smollm2-135m-instruct"
CAT = "The cat sat on the mat."
DOG = "A dog slept by the fire."
# Over a hundred tokens: evaluated in several chunks.
LONG = "The lighthouse keeper climbed the stairs every night to light the lamp. " * 6


def embeddings(inputs: Any, **params: Any) -> EngineRequest:
    return EngineRequest("test", MODEL, {"model": MODEL, "input": inputs, **params}, "embedding")


async def run(
    engine: EmbeddedEngine, request: EngineRequest, control: SequenceControl | None = None
) -> Delta:
    (delta,) = [delta async for delta in engine.generate(request, control)]
    return delta


def vectors(delta: Delta) -> list[np.ndarray[Any, Any]]:
    assert delta.data is not None
    out = []
    for position, item in enumerate(delta.data):
        assert item["object"] == "embedding" and item["index"] == position
        embedding = item["embedding"]
        if isinstance(embedding, str):
            out.append(np.frombuffer(base64.b64decode(embedding), dtype="<f4"))
        else:
            out.append(np.array(embedding, dtype=np.float32))
    return out


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(num_slots=2)
    await engine.start()
    yield engine
    await engine.close()


def test_chunks_hold_whole_inputs_or_a_piece_of_one() -> None:
    from flexserve.engines.embedded.embeddings import chunks

    a, b, c, d = [1] * 3, [2] * 70, [3] * 5, [4] * 60

    packed = [
        [(piece.index, piece.start, len(piece.tokens)) for piece in chunk]
        for chunk in chunks([a, b, c, d], 64)
    ]

    assert packed == [
        [(0, 0, 3)],
        [(1, 0, 64)],  # a long input alone, its KV cache carried between its pieces
        [(1, 64, 6)],
        [(2, 0, 5)],
        [(3, 0, 60)],
    ]


async def test_vectors_are_unit_length_as_floats_or_base64(engine: EmbeddedEngine) -> None:
    floats = await run(engine, embeddings([CAT, DOG]))
    packed = await run(engine, embeddings([CAT, DOG], encoding_format="base64"))

    assert floats.finish_reason == "stop"
    assert floats.usage is not None and floats.usage.completion_tokens == 0
    assert floats.usage.prompt_tokens > 10
    as_floats, as_base64 = vectors(floats), vectors(packed)
    assert [v.shape for v in as_floats] == [(576,), (576,)]
    assert all(np.array_equal(a, b) for a, b in zip(as_floats, as_base64, strict=True))
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-5 for v in as_floats)
    assert not np.allclose(as_floats[0], as_floats[1])


async def test_an_input_gets_the_same_vector_alone_or_in_company(engine: EmbeddedEngine) -> None:
    alone = vectors(await run(engine, embeddings(CAT)))[0]
    again = vectors(await run(engine, embeddings([CAT])))[0]
    in_company = vectors(await run(engine, embeddings([DOG, LONG, CAT, DOG])))[2]

    assert np.array_equal(alone, again)
    assert np.allclose(alone, in_company, atol=1e-5)


async def test_a_long_input_is_pooled_as_llama_cpp_pools_it(engine: EmbeddedEngine) -> None:
    from llama_cpp import Llama, llama_cpp

    mine = vectors(await run(engine, embeddings(LONG)))[0]

    # llama.cpp's own mean pooling, the whole input in one batch.
    reference = Llama(
        model_path=str(find_smollm2_gguf()), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_threads=1, verbose=False,
    )
    try:
        (expected,) = reference.embed([LONG], normalize=True)
        assert len(reference.tokenize(LONG.encode())) > 64  # more than one of the engine's chunks
    finally:
        reference.close()
    assert np.allclose(mine, np.array(expected, dtype=np.float32), atol=1e-4)


async def test_token_ids_embed_as_their_text(engine: EmbeddedEngine) -> None:
    from llama_cpp import Llama

    vocab = Llama(model_path=str(find_smollm2_gguf()), vocab_only=True, verbose=False)
    ids = vocab.tokenize(CAT.encode(), add_bos=True)

    by_text = vectors(await run(engine, embeddings(CAT)))[0]
    by_ids = vectors(await run(engine, embeddings([ids])))[0]

    assert np.array_equal(by_text, by_ids)


async def test_an_overlong_input_is_an_invalid_request(engine: EmbeddedEngine) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        await run(engine, embeddings([CAT, "hello " * 3000]))

    assert raised.value.param == "input"


async def test_a_paused_embedding_waits_and_holds_its_place(engine: EmbeddedEngine) -> None:
    control = SequenceControl()
    control.pause()
    paused = asyncio.ensure_future(run(engine, embeddings(LONG), control))
    try:
        hello = [{"role": "user", "content": "Say hi."}]
        chat = EngineRequest.chat("test", MODEL, hello, max_tokens=4)
        assert [d async for d in engine.generate(chat)]

        assert not paused.done(), "the paused embedding went on"
        assert (await engine.read_load()).num_running == 1
        control.resume()
        delta = await paused
    finally:
        paused.cancel()
        await asyncio.gather(paused, return_exceptions=True)

    assert np.allclose(vectors(delta)[0], vectors(await run(engine, embeddings(LONG)))[0])
    assert (await engine.read_load()).num_running == 0
