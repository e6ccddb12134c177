"""An organization's lane of batch lines: room goes to the batch due first."""

from __future__ import annotations

import asyncio

import pytest

from flexserve.batches.lanes import BatchLanes


async def test_room_is_granted_at_once_up_to_the_lane_size() -> None:
    lanes = BatchLanes(4)
    first = lanes.request("org-a", deadline=100.0, want=3)
    assert first.done() and first.result() == 3
    second = lanes.request("org-a", deadline=50.0, want=3)
    assert second.done() and second.result() == 1
    assert lanes.in_flight("org-a") == 4


async def test_freed_room_goes_to_the_earliest_deadline_not_the_first_asker() -> None:
    lanes = BatchLanes(2)
    assert lanes.request("org-a", 10.0, 2).result() == 2
    late = lanes.request("org-a", deadline=500.0, want=2)
    early = lanes.request("org-a", deadline=60.0, want=2)
    same_as_early = lanes.request("org-a", deadline=60.0, want=2)
    assert not (late.done() or early.done() or same_as_early.done())
    lanes.give_back("org-a", 1)
    assert early.done() and early.result() == 1
    assert not late.done() and not same_as_early.done()
    lanes.give_back("org-a", 1)
    # A tie on the deadline goes to the one that asked first.
    assert same_as_early.done() and not late.done()


async def test_organizations_have_lanes_of_their_own() -> None:
    lanes = BatchLanes(1)
    assert lanes.request("org-a", 10.0, 1).result() == 1
    other = lanes.request("org-b", 999.0, 1)
    assert other.done() and other.result() == 1


async def test_a_withdrawn_request_gives_back_what_it_was_granted() -> None:
    lanes = BatchLanes(2)
    granted = lanes.request("org-a", 10.0, 2)
    waiting = lanes.request("org-a", 20.0, 2)
    lanes.withdraw("org-a", granted)
    assert waiting.done() and waiting.result() == 2
    pending = lanes.request("org-a", 5.0, 1)
    lanes.withdraw("org-a", pending)
    assert pending.cancelled()
    lanes.give_back("org-a", 2)
    assert lanes.in_flight("org-a") == 0


async def test_giving_back_more_than_was_lent_is_a_bug() -> None:
    lanes = BatchLanes(2)
    with pytest.raises(RuntimeError):
        lanes.give_back("org-a", 1)


async def test_a_waiting_batch_is_woken_by_a_line_finishing() -> None:
    lanes = BatchLanes(1)
    assert lanes.request("org-a", 10.0, 1).result() == 1
    waiting = lanes.request("org-a", 20.0, 1)
    asyncio.get_running_loop().call_later(0.01, lanes.give_back, "org-a", 1)
    assert await asyncio.wait_for(waiting, 5) == 1
