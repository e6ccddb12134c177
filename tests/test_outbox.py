"""The shared-state outbox (shared/outbox.py): closing it sends what is
queued, but never takes longer than its grace, however a send hangs."""

from __future__ import annotations

import asyncio

from flexserve.shared.outbox import Outbox


async def test_close_gives_up_on_a_send_that_never_returns() -> None:
    sent: list[list[int]] = []

    async def hangs(batch: list[int], again: bool) -> None:
        sent.append(batch)
        await asyncio.Event().wait()  # a reply that never comes

    outbox: Outbox[int] = Outbox("test items", hangs)
    for item in range(3):
        outbox.put(item)
    # It returns (a close that waited on the send would never), the items unsent.
    unsent = await asyncio.wait_for(outbox.close(grace=0.3), timeout=60)
    assert unsent == 3 and sent == [[0, 1, 2]]


async def test_close_sends_what_is_queued() -> None:
    sent: list[int] = []

    async def send(batch: list[int], again: bool) -> None:
        sent.extend(batch)

    outbox: Outbox[int] = Outbox("test items", send)
    for item in range(5):
        outbox.put(item)
    assert await outbox.close() == 0 and sent == [0, 1, 2, 3, 4]
