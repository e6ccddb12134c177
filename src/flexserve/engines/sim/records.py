"""The sim engine's own records, for benchmarks: one JSON line on stderr per
finished generation (``sim-engine --log-requests``) and per step
(``--log-steps``), in simulated seconds.

They give what the engine itself did, free of the host's and the gateway's
delays: ``bench prefill-waits`` reads a request's time per output token
from them, and a step's line says what the step held (sequences and prompt
tokens by priority) and how long it took, so a slow decode can be read
against the steps it ran through (``first_token_s`` to ``last_token_s``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence

from flexserve.engines.sim.sequence import Seq


def log_finished(seq: Seq) -> None:
    """A finished generation: its priority, sizes, and its times from
    arrival to first token and from first to last token (none for a
    sequence that never had a token: an embedding)."""
    first = seq.first_token_at
    if first is None:
        return
    _write({"event": "sim_request", "priority": seq.key[0], "prompt_tokens": seq.prompt_tokens,
            "output_tokens": seq.num_generated, "ttft_s": round(first - seq.arrival, 6),
            "decode_s": round(seq.last_token_at - first, 6), "arrival_s": round(seq.arrival, 6),
            "first_token_s": round(first, 6), "last_token_s": round(seq.last_token_at, 6)})


def log_step(start: float, seconds: float, scheduled: Sequence[tuple[Seq, int, int]]) -> None:
    """A step from ``start`` taking ``seconds``: the sequences in it and the
    prompt tokens they prefilled, by priority (keys are priorities as text)."""
    sequences: Counter[str] = Counter()
    prefill: Counter[str] = Counter()
    for seq, chunk, _ in scheduled:
        sequences[str(seq.key[0])] += 1
        if chunk:
            prefill[str(seq.key[0])] += chunk
    _write({"event": "sim_step", "start_s": round(start, 6), "step_s": round(seconds, 6),
            "sequences": dict(sequences), "prefill_tokens": dict(prefill)})


def _write(record: dict[str, object]) -> None:
    sys.stderr.write(json.dumps(record) + "\n")
    sys.stderr.flush()
