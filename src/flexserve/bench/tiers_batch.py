"""A batch backlog for ``flexserve bench tiers``: the flex backlog's jobs as
one batch, sent through the gateway's Batch API (scenario F).

The batch is uploaded and created before the warm-up, runs on the `batch`
tier below flex while default traffic is measured, and is cancelled after
the window: what default's latency shows is how batch lines yield.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from flexserve.bench.processes import BenchError
from flexserve.bench.tiers_load import Target
from flexserve.bench.traffic import Job, messages_for

_FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchBacklog:
    batch_id: str
    num_lines: int
    completed_at_end: int | None = None


def _auth(target: Target) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}


async def _batch(session: aiohttp.ClientSession, target: Target, batch_id: str,
                 action: str = "") -> dict[str, Any]:
    url = f"{target.url}/v1/batches/{batch_id}{action}"
    method = session.post if action else session.get
    async with method(url, headers=_auth(target)) as response:
        document: dict[str, Any] = await response.json()
        if response.status != 200:
            raise BenchError(f"{url}: {response.status} {document}")
    return document


async def start_backlog(session: aiohttp.ClientSession, target: Target,
                        jobs: Iterable[Job]) -> BatchBacklog:
    """Upload ``jobs`` as a batch's input file, create the batch, and return
    once its lines are running."""
    content = b"".join(
        orjson.dumps({
            "custom_id": f"job-{number}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": target.model, "max_tokens": job.output_tokens, "seed": job.seed,
                     "messages": messages_for(job, real_text=target.real_text)},
        }) + b"\n"
        for number, job in enumerate(jobs)
    )
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="backlog.jsonl", content_type="application/jsonl")
    async with session.post(f"{target.url}/v1/files", data=form,
                            headers=_auth(target)) as response:
        uploaded = await response.json()
        if response.status != 200:
            raise BenchError(f"uploading the batch backlog: {response.status} {uploaded}")
    async with session.post(f"{target.url}/v1/batches", headers=_auth(target), json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }) as response:
        created = await response.json()
        if response.status != 200:
            raise BenchError(f"creating the batch backlog: {response.status} {created}")
    deadline = time.monotonic() + 120
    while True:
        batch = await _batch(session, target, created["id"])
        if batch["status"] == "in_progress":
            return BatchBacklog(batch["id"], batch["request_counts"]["total"])
        if batch["status"] in _FINAL or time.monotonic() > deadline:
            raise BenchError(f"the batch backlog did not start: {batch}")
        await asyncio.sleep(0.2)


async def stop_backlog(session: aiohttp.ClientSession, target: Target,
                       backlog: BatchBacklog) -> None:
    """Note how far it got, cancel it, and wait until it has ended."""
    batch = await _batch(session, target, backlog.batch_id)
    backlog.completed_at_end = batch["request_counts"]["completed"]
    if batch["status"] not in _FINAL:
        await _batch(session, target, backlog.batch_id, "/cancel")
    deadline = time.monotonic() + 120
    while batch["status"] not in _FINAL and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        batch = await _batch(session, target, backlog.batch_id)
