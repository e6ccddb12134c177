"""The background tasks of the shared state: stopped the one way."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# How often a task still running is cancelled again while ``stop`` waits.
_RECANCEL_SECONDS = 0.5


async def stop(task: asyncio.Task[None] | None, grace: float = 10.0) -> None:
    """Cancel ``task`` (if any) and wait until it has ended.

    A task can miss a cancellation: a client library that turns it into an
    error of its own (a timeout that fired at the same moment), which the
    task's loop catches and carries on. Waiting on such a task once would
    wait for ever, so it is cancelled again every half second until it ends;
    one still running after ``grace`` seconds is left running, and logged.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.error("background task %r did not stop within %.0f s of being cancelled; "
                      "left running", task.get_name(), grace)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RECANCEL_SECONDS, left))
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task %r had failed: %r", task.get_name(), error)
