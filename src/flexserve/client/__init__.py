"""The flex client: send flex requests the way they should be sent.

On top of the official ``openai`` SDK (its own retries off), against any
OpenAI-compatible endpoint — FlexServe, vLLM, OpenAI:

- ``flex_call`` (async) / ``flex_call_sync``: one request at ``tier``
  (flex by default) that waits honestly — ``X-Flex-Max-Wait`` so FlexServe
  queues it rather than refusing, ``Retry-After`` on every 429 — until it
  is answered, fails for good (a 4xx other than 408/409/429, or the
  server's ``x-should-retry: false``), or its ``deadline`` passes;
  ``fallback_tier`` after ``fallback_after`` seconds.
- ``map_requests`` (async) / ``map_requests_sync``: many requests with
  adaptive concurrency (AIMD on refusals and latency, guided by
  ``/v1/flex/status`` where the server has it), a progress callback, and
  the answers in order.
- ``run_job``: a whole job with resume, as ``flexserve run`` runs it.

Example (``examples/flex_client.py`` runs it against ``make run``)::

    import openai
    from flexserve.client import flex_call_sync

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    outcome = flex_call_sync(client, {"model": MODEL, "messages": [...]},
                             fallback_tier="default", fallback_after=60)
    print(outcome.served_tier, outcome.body["choices"][0]["message"]["content"])
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import openai

from flexserve.client.calls import CallPolicy, Outcome, send
from flexserve.client.jobs import Line, PromptFormat, read_lines
from flexserve.client.pacing import Pacer
from flexserve.client.runner import Progress, RunOptions, run_job

__all__ = [
    "CallPolicy", "Line", "Outcome", "Progress", "PromptFormat", "RunOptions", "flex_call",
    "flex_call_sync", "map_requests", "map_requests_sync", "read_lines", "run_job",
]


async def flex_call(
    client: openai.AsyncOpenAI,
    body: Mapping[str, Any],
    *,
    path: str = "/chat/completions",
    tier: str | None = "flex",
    deadline: float | None = None,
    fallback_tier: str | None = None,
    fallback_after: float | None = None,
) -> Outcome:
    """Send one request until it is answered, fails for good, or ``deadline``
    seconds pass; ``Outcome.ok``, ``.body`` (the answer's JSON), ``.served_tier``."""
    policy = CallPolicy(tier=tier, fallback_tier=fallback_tier, fallback_after=fallback_after)
    ends = None if deadline is None else time.monotonic() + deadline
    return await send(client.with_options(max_retries=0), path, body, policy, deadline=ends)


def flex_call_sync(client: openai.OpenAI, body: Mapping[str, Any], **options: Any) -> Outcome:
    """``flex_call`` for a synchronous client (the same key and base URL, async inside)."""
    async def call() -> Outcome:
        async with _async_twin(client) as twin:
            return await flex_call(twin, body, **options)
    return asyncio.run(call())


async def map_requests(
    client: openai.AsyncOpenAI,
    bodies: Sequence[Mapping[str, Any]],
    *,
    path: str = "/chat/completions",
    policy: CallPolicy = CallPolicy(),
    concurrency: int | None = None,
    deadline: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Send every body; their outcomes in the same order. ``concurrency``:
    fixed, or None for adaptive; ``on_progress(done, total)`` after each."""
    client = client.with_options(max_retries=0)
    pacer = Pacer(fixed=concurrency)
    ends = None if deadline is None else time.monotonic() + deadline
    done = 0

    async def one(body: Mapping[str, Any]) -> Outcome:
        nonlocal done
        await pacer.acquire()
        try:
            outcome = await send(client, path, body, policy, deadline=ends, events=pacer)
        finally:
            await pacer.release()
        done += 1
        if on_progress is not None:
            on_progress(done, len(bodies))
        return outcome

    return list(await asyncio.gather(*(one(body) for body in bodies)))


def map_requests_sync(client: openai.OpenAI, bodies: Sequence[Mapping[str, Any]],
                      **options: Any) -> list[Outcome]:
    """``map_requests`` for a synchronous client."""
    async def call() -> list[Outcome]:
        async with _async_twin(client) as twin:
            return await map_requests(twin, bodies, **options)
    return asyncio.run(call())


def _async_twin(client: openai.OpenAI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.base_url), api_key=client.api_key,
                              organization=client.organization, project=client.project,
                              timeout=client.timeout, default_headers=client._custom_headers)
