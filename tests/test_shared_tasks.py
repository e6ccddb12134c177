"""Stopping the shared state's background tasks (``flexserve.shared.tasks``)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from flexserve.shared.tasks import stop


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        # As a loop does that catches the error a library made of the cancel.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop(task), timeout=5)
    assert task.cancelled()
    assert swallowed == 3


async def test_a_task_that_never_stops_is_left_after_the_grace_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="flexserve.shared.tasks"):
        await asyncio.wait_for(stop(task, grace=0.3), timeout=5)
    assert not task.done()
    assert "'immortal' did not stop" in caplog.text
    release.set()
    task.cancel()  # wakes it from its sleep to see the release
    await asyncio.wait_for(task, timeout=5)


async def test_stopping_an_ended_task_or_none_returns_at_once() -> None:
    async def quick() -> None:
        return None

    task = asyncio.create_task(quick())
    await task
    await asyncio.wait_for(stop(task), timeout=1)
    await asyncio.wait_for(stop(None), timeout=1)
