"""The sim engine's embeddings: deterministic unit vectors.

A vector depends on its input alone (text, or token ids), so one input always
embeds alike and two inputs almost never do; nothing about meaning is
modelled. The components are float32, as a GPU returns them, so that the
``float`` and ``base64`` encodings carry the very same numbers. A smaller
``dimensions`` keeps the first components and renormalises them, as models
trained for it (Matryoshka) are meant to be truncated.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from typing import Any

__all__ = ["embedding_object", "unit_vector"]


def unit_vector(key: str, dimensions: int) -> array[float]:
    """The first ``dimensions`` components of ``key``'s vector, renormalised to length 1."""
    raw = array("h", hashlib.shake_256(key.encode()).digest(2 * dimensions))
    if sys.byteorder == "big":
        raw.byteswap()  # the same vector on every host
    norm = math.sqrt(math.fsum(float(v) * v for v in raw)) or 1.0
    return array("f", [v / norm for v in raw])


def embedding_object(index: int, vector: array[float], as_base64: bool) -> dict[str, Any]:
    """OpenAI's embedding object: floats, or base64 of little-endian float32."""
    if not as_base64:
        return {"object": "embedding", "index": index, "embedding": vector.tolist()}
    if sys.byteorder == "big":
        vector = array("f", vector)
        vector.byteswap()
    return {"object": "embedding", "index": index,
            "embedding": base64.b64encode(vector.tobytes()).decode("ascii")}
