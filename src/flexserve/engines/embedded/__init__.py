"""The embedded engine: SmolLM2-135M-Instruct run in process through llama.cpp.

Chat and completions (with structured outputs, log probabilities, ``n``,
penalties, logit bias, token prompts and echo) and embeddings, on CPU, with
flex sequences paused between tokens. The modules, by concept:

* ``engine``: slots, their lifecycle and the token loop (``EmbeddedEngine``);
* ``prompts``: what a request asks for, checked before it takes a slot;
* ``sampling``: a request's sampling settings, its grammar included;
* ``llama``: the one boundary with llama.cpp's C API (contexts, samplers, logits);
* ``logprobs``: log probabilities in the endpoints' shapes;
* ``text``: token bytes into text that is safe to send (UTF-8, stop strings);
* ``embeddings``: the embedding context and its pooled vectors;
* ``loading``: the model file, threads per context, and loading.
"""

from flexserve.engines.embedded.engine import PREFILL_CHUNK, EmbeddedEngine
from flexserve.engines.embedded.loading import (
    SMOLLM2_GGUF_NAME,
    SMOLLM2_PACKAGE,
    find_smollm2_gguf,
    threads_per_context,
    usable_cpus,
)

__all__ = [
    "PREFILL_CHUNK",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_PACKAGE",
    "EmbeddedEngine",
    "find_smollm2_gguf",
    "threads_per_context",
    "usable_cpus",
]
