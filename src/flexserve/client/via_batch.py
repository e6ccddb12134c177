"""A bulk job run through the server's Batch API: ``flexserve run --via batch``.

The lines not yet in the output are uploaded as one batch input file and
run as one batch (``completion_window`` 24h); progress comes from the
batch's ``request_counts``; when it ends, its output and error files are
written into the job's output and error file, one line per ``custom_id`` as
a direct run writes them. The batch's id is kept beside the output
(``OUTPUT.batch``) until its results are in, so a rerun after the runner
was killed goes on with the same batch rather than starting another. Past
``--deadline`` the batch is cancelled and what it finished is kept.
Batch is billed at the batch price: flex's (half of default) unless given.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai

from flexserve.client.costs import Ledger, usage_tokens
from flexserve.client.jobs import JobError, Line
from flexserve.client.results import JobFiles, ResultFile
from flexserve.client.runner import Progress, RunOptions

# Batch statuses after which nothing more will run.
_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
# Error codes of lines a batch never ran.
_NOT_RUN = frozenset({"batch_cancelled", "batch_expired"})


def batch_id_path(output: Path) -> Path:
    return output.with_name(output.name + ".batch")


async def run_batch_job(
    client: openai.AsyncOpenAI,
    lines: Sequence[Line],
    output: Path,
    options: RunOptions,
    on_progress: Callable[[Progress], None] | None = None,
    poll_every: float = 1.0,
) -> Progress:
    """Run the lines not yet in ``output`` as one batch; return the progress at the end."""
    files = JobFiles(output)
    files.open(retry_errors=options.retry_errors)
    results, errors = files.results, files.errors
    progress = Progress(total=len(lines), prices_known=options.prices.known)
    ledger = Ledger(options.prices)
    try:
        todo = files.todo(lines)
        progress.skipped = len(lines) - len(todo)
        saved_id = batch_id_path(output)
        batch_id = saved_id.read_text().strip() if saved_id.exists() else None
        if batch_id is None and todo:
            batch_id = await _create(client, todo)
            saved_id.write_text(batch_id + "\n")
        if batch_id is not None:
            deadline = None if options.deadline is None else time.monotonic() + options.deadline
            batch = await _wait(client, batch_id, progress, deadline, on_progress, poll_every)
            if batch.status == "failed" and batch.errors and batch.errors.data:
                saved_id.unlink(missing_ok=True)
                reasons = "; ".join(f"line {e.line}: {e.message}" if e.line else str(e.message)
                                    for e in batch.errors.data[:5])
                raise JobError(f"the server refused batch {batch_id}: {reasons}")
            progress.done = progress.failed = 0
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await client.files.content(file_id)
                    _take(content.text, progress, ledger, results, errors)
            saved_id.unlink(missing_ok=True)
        progress.in_flight = 0
        progress.spent, progress.saved = ledger.spent, ledger.saved
        progress.finished = True
        if on_progress is not None:
            on_progress(progress)
    finally:
        files.close()
    return progress


async def _create(client: openai.AsyncOpenAI, todo: Sequence[Line]) -> str:
    endpoints = {line.url for line in todo}
    if len(endpoints) != 1:
        raise JobError(f"--via batch needs every line on one endpoint (a batch has one), "
                       f"not {', '.join(sorted(endpoints))}")
    content = "".join(json.dumps({"custom_id": line.custom_id, "method": "POST", "url": line.url,
                                  "body": line.body}) + "\n" for line in todo)
    uploaded = await client.files.create(file=("job.jsonl", content.encode()), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint=todo[0].url,  # type: ignore[arg-type]
                                        completion_window="24h")
    return batch.id


async def _wait(client: openai.AsyncOpenAI, batch_id: str, progress: Progress,
                deadline: float | None, on_progress: Callable[[Progress], None] | None,
                poll_every: float) -> Any:
    """Poll the batch until it ends (cancelling it past ``deadline``)."""
    cancelled = False
    while True:
        batch = await client.batches.retrieve(batch_id)
        counts = batch.request_counts
        if counts is not None:
            progress.done, progress.failed = counts.completed, counts.failed
            progress.in_flight = max(0, counts.total - counts.completed - counts.failed)
        if batch.status in _ENDED:
            return batch
        if deadline is not None and time.monotonic() >= deadline and not cancelled:
            await client.batches.cancel(batch_id)
            progress.stopped, cancelled = "deadline", True
        if on_progress is not None:
            on_progress(progress)
        await asyncio.sleep(poll_every)


def _take(text: str, progress: Progress, ledger: Ledger, results: ResultFile,
          errors: ResultFile) -> None:
    """Write a batch result file's lines into the job's output or error file
    (lines the batch never ran, cancelled or expired, are left for a rerun)."""
    for raw in text.splitlines():
        if not raw.strip():
            continue
        record = json.loads(raw)
        response = record.get("response") or {}
        body = response.get("body")
        error = record.get("error") or {}
        if response.get("status_code") == 200 and not error:
            if not results.append(record):
                continue
            usage = body.get("usage") if isinstance(body, dict) else None
            ledger.settle(record["custom_id"], usage or {}, "flex")
            tokens = usage_tokens(usage or {})
            progress.input_tokens += tokens[0]
            progress.output_tokens += tokens[1]
            progress.by_tier["batch"] = progress.by_tier.get("batch", 0) + 1
            progress.done += 1
        elif error.get("code") in _NOT_RUN:
            progress.stopped = progress.stopped or "deadline"
        elif errors.append(record):
            progress.failed += 1
