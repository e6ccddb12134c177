"""What each piece of the request path costs in CPU, measured in process.

The end-to-end overhead benchmark answers "how much does the gateway add",
but on a shared two-core machine its latencies move by more than a change
to the hot path is worth. These figures do not: each is the minimum over
repeats of a mean over many calls, in one process, with no sockets.

- ``request_us``: one chat completion through the ASGI app (auth, validation,
  gates, scheduler, in-process instant sim engine, response, metrics, usage
  record), per mode and tier, from ``hot_path_probe.py`` run in a fresh
  interpreter. With ``--baseline-src`` the same probe also runs against
  another tree, interleaved, for an A/B of a change.
- ``sse_relay_us``: relaying one instant upstream reply into deltas.
- ``parts_us``: single operations the request path does (or the scheduler
  does per scrape), behind the recommendations in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from flexserve.bench.processes import BenchError
from flexserve.bench.report import format_table, host_info

_PROBE = Path(__file__).with_name("hot_path_probe.py")


def run_hot_path(
    baseline_src: Path | None, *, num_requests: int = 1000, repeats: int = 7, trials: int = 3
) -> dict[str, Any]:
    """Probe this tree (and the baseline, interleaved) ``trials`` times; keep each minimum."""
    trees = {"current": Path(__file__).resolve().parents[2]}
    if baseline_src is not None:
        trees["baseline"] = baseline_src.resolve()
    best: dict[str, dict[str, Any]] = {}
    for _ in range(trials):
        for name, src in trees.items():
            best[name] = _merge_min(best.get(name), _probe(src, num_requests, repeats))
    report: dict[str, Any] = {
        "benchmark": "hot-path",
        "host": host_info(),
        "config": {"requests": num_requests, "repeats": repeats, "trials": trials,
                   "trees": {name: str(src) for name, src in trees.items()}},
        "trees": best,
        "parts_us": asyncio.run(_parts()),
    }
    return report


def _probe(src: Path, num_requests: int, repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, str(_PROBE), "--requests", str(num_requests), "--repeats", str(repeats)],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )
    if done.returncode != 0:
        raise BenchError(f"the hot-path probe failed on {src}:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _merge_min(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if old is None:
        return new
    merged: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict):
            merged[key] = {k: min(v, old[key].get(k, v)) for k, v in value.items()}
        else:
            merged[key] = min(value, old[key])
    return merged


def _min_us(statement: Any, number: int = 20_000, repeat: int = 7) -> float:
    return round(min(timeit.repeat(statement, number=number, repeat=repeat)) / number * 1e6, 2)


async def _parts() -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Counter

    from flexserve.api.metrics import Labelled
    from flexserve.billing.budget import LocalBudgets, month_of
    from flexserve.scheduler.queue import TierQueue, Waiter
    from flexserve.tiers import ServiceTier

    counter = Counter("probe", "probe", ["model", "tier", "status"], registry=CollectorRegistry())
    labelled = Labelled(counter)
    parts = {
        "prometheus_labels_inc": _min_us(lambda: counter.labels("m", "default", "ok").inc()),
        "labelled_labels_inc": _min_us(lambda: labelled.labels("m", "default", "ok").inc()),
        "budget_month_of": _min_us(lambda: month_of(time.time())),
    }
    # What a request's budget hold costs (the month is looked up on both calls).
    budgets, scopes = LocalBudgets(), ("org:o", "project:p")
    parts["budget_reserve_settle"] = _min_us(lambda: budgets.settle(budgets.reserve_now(scopes, 9), 5))
    # What the pass shedding hopeless flex pays to reach the newest of 10,000.
    queue = TierQueue()
    for i in range(10_000):
        queue.push(Waiter(ServiceTier.FLEX, f"org-{i % 7}", 300))
    parts["flex_newest_of_10k"] = _min_us(lambda: next(queue.flex_newest_first()))
    parts["watch_task_per_request"] = await _watch_task_cost()
    parts.update(_journal_costs())
    return parts


def _journal_costs() -> dict[str, float]:
    """A usage row appended to the journal, as ``UsageWriter.submit`` does
    before a response's last bytes; and what an fsync after it would add."""
    import tempfile

    from flexserve.billing.journal import UsageJournal

    row = {
        "request_id": "req_" + "0" * 32, "org_id": "org_" + "0" * 16, "project_id": "proj_" + "0" * 16,
        "api_key_id": "key_" + "0" * 12, "model": "llama3-8b-sim-h100", "requested_tier": "auto",
        "served_tier": "default", "prompt_tokens": 12, "completion_tokens": 16, "queue_time_ms": 0,
        "ttft_ms": 2, "total_time_ms": 3, "status": "completed", "created_at": 1_750_000_000,
        "cached_tokens": 0, "input_price_micro": 1_000_000, "cached_input_price_micro": 1_000_000,
        "output_price_micro": 4_000_000, "input_cost_pico": 12_000_000,
        "cached_input_cost_pico": 0, "output_cost_pico": 64_000_000, "list_cost_pico": 76_000_000,
    }
    with tempfile.TemporaryDirectory(prefix="flexserve-journal-probe-") as directory:
        journal = UsageJournal(directory)
        journal.open()
        try:
            append = _min_us(lambda: journal.append(row), number=5_000)
            journal.discard(journal.seal())

            def append_fsync() -> None:
                journal.append(row)
                journal.sync()

            fsync = _min_us(append_fsync, number=200, repeat=3)
            journal.discard(journal.seal())
        finally:
            journal.close()
    return {"usage_journal_append": append, "usage_journal_append_fsync": fsync}


async def _watch_task_cost(num: int = 20_000) -> float:
    """A task started to wait for the client's disconnect, then cancelled: what
    ``api/pipeline.py``'s ``DisconnectWatch`` costs a request that streams or waits."""
    loop = asyncio.get_running_loop()

    async def watch(stays: asyncio.Future[None]) -> None:
        await stays

    async def with_task() -> None:
        task = loop.create_task(watch(loop.create_future()))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)

    async def without_task() -> None:
        loop.create_future()
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    timings = {}
    for name, step in (("with", with_task), ("without", without_task)):
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(num):
                await step()
            runs.append((time.perf_counter() - started) / num * 1e6)
        timings[name] = min(runs)
    return round(timings["with"] - timings["without"], 2)


def format_report(report: dict[str, Any]) -> str:
    """The short table printed after a run."""
    trees = report["trees"]
    names = list(trees)
    rows: list[tuple[object, ...]] = [
        (f"request {kind}", *(trees[name]["request_us"][kind] for name in names))
        for kind in trees["current"]["request_us"]
    ]
    rows.append(("sse relay, one reply", *(trees[name]["sse_relay_us"] for name in names)))
    lines = [format_table(("µs (min)", *names), rows), ""]
    lines.append(format_table(("part", "µs (min)"), list(report["parts_us"].items())))
    return "\n".join(lines)
