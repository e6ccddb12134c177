"""Decode speed of the embedded engine, against llama-cpp-python called directly.

Run ``python -m flexserve.bench.embedded_tps [--out reports/embedded_tps.json]``.

Both paths generate the same greedy completion of the same chat-formatted
prompt with 1 and 2 concurrent streams, each stream in its own llama.cpp
context with the engine's threads-per-context rule, so the difference is
what FlexServe's token-by-token driving costs (worker-thread hops, permits,
incremental detokenizing). A sweep of ``n_threads`` on the direct path shows
why the engine gives each context ``cpus // max_decoding`` threads.

Every configuration runs once per repeat, interleaved with the others, so
that whatever else the machine is doing weighs on all of them alike.
Figures: ``aggregate_tps`` is all streams' completion tokens over the wall
time of a run (prompt processing included); ``stream_decode_tps`` is one
stream's tokens after its first over the time from its first token to its
last; ``stream_steady_tps`` is one over the median gap between a stream's
tokens, which leaves out the moments when another process had the CPU. Each
is the median over ``--repeats`` runs (and streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flexserve.engines.base import EngineRequest
from flexserve.engines.embedded import EmbeddedEngine, find_smollm2_gguf, usable_cpus

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_types import CreateCompletionStreamResponse

# Greedy SmolLM2 writes well past 128 tokens for this one, so every run
# decodes the full --tokens.
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a dragon egg."


@dataclass(slots=True)
class _Stream:
    num_tokens: int
    # perf_counter() when each piece of text arrived.
    arrivals: list[float]

    @property
    def decode_tps(self) -> float:
        span = self.arrivals[-1] - self.arrivals[0] if self.arrivals else 0.0
        return (len(self.arrivals) - 1) / span if span > 0 else 0.0

    @property
    def steady_tps(self) -> float:
        # One over the median gap between tokens: the decode speed with the
        # moments when another process had the CPU left out.
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return 1 / statistics.median(gaps) if gaps else 0.0


@dataclass(slots=True)
class Result:
    path: str  # "engine" or "direct"
    streams: int
    n_threads: int
    completion_tokens: int  # per stream, from the last repeat
    aggregate_tps: float
    stream_decode_tps: float
    stream_steady_tps: float


def _summarise(path: str, n_threads: int, runs: list[tuple[float, list[_Stream]]]) -> Result:
    aggregate = [sum(s.num_tokens for s in streams) / wall for wall, streams in runs]
    streams = [s for _, run in runs for s in run]
    return Result(
        path=path,
        streams=len(runs[0][1]),
        n_threads=n_threads,
        completion_tokens=runs[-1][1][0].num_tokens,
        aggregate_tps=round(statistics.median(aggregate), 1),
        stream_decode_tps=round(statistics.median(s.decode_tps for s in streams), 1),
        stream_steady_tps=round(statistics.median(s.steady_tps for s in streams), 1),
    )


async def _engine_stream(engine: EmbeddedEngine, request: EngineRequest) -> _Stream:
    arrivals: list[float] = []
    num_tokens = 0
    async for delta in engine.generate(request):
        if delta.usage is not None:
            num_tokens = delta.usage.completion_tokens
        if delta.finish_reason is None:
            # A token's text (usage so far rides along on each).
            arrivals.append(time.perf_counter())
    return _Stream(num_tokens, arrivals)


async def _engine_run(
    engine: EmbeddedEngine, request: EngineRequest, num_streams: int
) -> tuple[float, list[_Stream]]:
    started = time.perf_counter()
    done = await asyncio.gather(*(_engine_stream(engine, request) for _ in range(num_streams)))
    return time.perf_counter() - started, list(done)


class _Direct:
    """llama-cpp-python without FlexServe: one context per stream, each
    stream a thread consuming ``Llama.create_completion(stream=True)``."""

    def __init__(self, num_contexts: int, n_threads: int) -> None:
        from llama_cpp import Llama

        path = str(find_smollm2_gguf())
        self.n_threads = n_threads
        self._contexts = [
            Llama(
                model_path=path,
                n_ctx=2048,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                verbose=False,
            )
            for _ in range(num_contexts)
        ]

    def close(self) -> None:
        for llama in self._contexts:
            llama.close()

    def run(
        self, prompt: list[int], num_streams: int, max_tokens: int
    ) -> tuple[float, list[_Stream]]:
        done: list[_Stream] = []
        start = threading.Barrier(num_streams + 1)

        def one(llama: Llama) -> None:
            # No prompt reuse between runs: the engine evaluates it every time too.
            llama.reset()  # type: ignore[no-untyped-call]
            start.wait()
            arrivals: list[float] = []
            chunks = llama.create_completion(
                prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                top_k=0,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
                stream=True,
            )
            for chunk in cast("Iterator[CreateCompletionStreamResponse]", chunks):
                if chunk["choices"][0]["finish_reason"] is not None:
                    break  # the closing chunk carries no token
                arrivals.append(time.perf_counter())
            done.append(_Stream(len(arrivals), arrivals))

        threads = [
            threading.Thread(target=one, args=(llama,)) for llama in self._contexts[:num_streams]
        ]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started, done


async def measure(
    stream_counts: Sequence[int], max_tokens: int, repeats: int, cpus: int
) -> tuple[list[Result], int]:
    """Every configuration once per repeat, interleaved, so that whatever else
    the machine is doing weighs on all of them alike. Returns the results and
    the prompt's length in tokens."""
    engine = EmbeddedEngine(num_slots=max(stream_counts))
    await engine.start()
    messages = [{"role": "user", "content": PROMPT}]
    request = EngineRequest.chat("bench", "bench", messages, max_tokens=max_tokens, temperature=0.0)
    prompt = engine.prompt_tokens(messages)
    # The engine's own rule first; other thread counts show why it is the rule.
    thread_counts = [engine.n_threads] + [t for t in range(1, cpus + 1) if t != engine.n_threads]
    directs = [_Direct(max(stream_counts), t) for t in thread_counts]
    runs: dict[tuple[str, int, int], list[tuple[float, list[_Stream]]]] = {}
    try:
        # One untimed round pages the weights in and warms the caches.
        await _engine_run(engine, request, 1)
        for direct in directs:
            await asyncio.to_thread(direct.run, prompt, 1, max_tokens)
        for num_streams in stream_counts:
            for _ in range(repeats):
                key = ("engine", num_streams, engine.n_threads)
                runs.setdefault(key, []).append(await _engine_run(engine, request, num_streams))
                for direct in directs:
                    key = ("direct", num_streams, direct.n_threads)
                    runs.setdefault(key, []).append(
                        await asyncio.to_thread(direct.run, prompt, num_streams, max_tokens)
                    )
    finally:
        for direct in directs:
            direct.close()
        await engine.close()
    return [_summarise(path, threads, r) for (path, _, threads), r in runs.items()], len(prompt)


def _table(results: list[Result]) -> str:
    header = (
        f"{'path':<8} {'streams':>7} {'threads':>7} {'tokens':>6} "
        f"{'aggregate tok/s':>15} {'per-stream tok/s':>16} {'steady tok/s':>12}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.path:<8} {r.streams:>7} {r.n_threads:>7} {r.completion_tokens:>6} "
            f"{r.aggregate_tps:>15.1f} {r.stream_decode_tps:>16.1f} {r.stream_steady_tps:>12.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="reports/embedded_tps.json", help="JSON report path.")
    parser.add_argument("--tokens", type=int, default=128, help="Completion tokens per stream.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per figure (median).")
    args = parser.parse_args(argv)

    cpus = usable_cpus()
    # Other processes on the machine compete for the same CPUs: say how busy it was.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results, num_prompt_tokens = asyncio.run(measure((1, 2), args.tokens, args.repeats, cpus))

    print(f"SmolLM2-135M-Instruct Q4_1, {cpus} CPUs, prompt {num_prompt_tokens} tokens, greedy")
    print(_table(results))
    if load is not None:
        print(f"load average (1 min) before the run: {load:.2f}")
    report: dict[str, Any] = {
        "benchmark": "embedded_tps",
        "model": find_smollm2_gguf().name,
        "cpus": cpus,
        "load_average_1m_before": None if load is None else round(load, 2),
        "prompt_tokens": num_prompt_tokens,
        "max_tokens": args.tokens,
        "repeats": args.repeats,
        "results": [asdict(r) for r in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
