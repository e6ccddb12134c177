"""Which batch of an organization sends its next lines: earliest deadline first.

Each organization has a lane of ``size`` lines in flight, shared by all its
batches. A batch asks for room (``request``); room that frees up goes to the
waiting batch whose window closes first (ties: the one that asked first).
Across organizations the scheduler's deficit round robin on the `batch` tier
shares the engines, so one organization's many batches never crowd out
another's, and within one organization a batch due in an hour overtakes one
due tomorrow.

Room is counted in lines: a grant is at least one line and at most what was
asked for; the batch gives each line's room back when the line finishes, and
gives back at once what it was granted but could not use.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True)
class _Ask:
    deadline: float
    seq: int
    want: int = field(compare=False)
    future: asyncio.Future[int] = field(compare=False)


class BatchLanes:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a lane holds at least one line, not {size}")
        self.size = size
        self._free: dict[str, int] = {}
        self._asks: dict[str, list[_Ask]] = {}
        self._seq = itertools.count()

    def in_flight(self, org_id: str) -> int:
        return self.size - self._free.get(org_id, self.size)

    def request(self, org_id: str, deadline: float, want: int) -> asyncio.Future[int]:
        """Room for up to ``want`` lines of a batch due at ``deadline``: a future
        resolved with the number of lines granted. Cancel it to withdraw."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._asks.setdefault(org_id, []),
                       _Ask(deadline, next(self._seq), max(1, want), future))
        self._dispatch(org_id)
        return future

    def give_back(self, org_id: str, num_lines: int) -> None:
        if num_lines <= 0:
            return
        free = self._free.get(org_id, self.size) + num_lines
        if free > self.size:
            raise RuntimeError(f"lane of {org_id} given back more than it lent")
        self._free[org_id] = free
        self._dispatch(org_id)

    def withdraw(self, org_id: str, future: asyncio.Future[int]) -> None:
        """Withdraw a request; room it was granted but never used comes back."""
        if future.done() and not future.cancelled():
            self.give_back(org_id, future.result())
        else:
            future.cancel()
            self._dispatch(org_id)

    def _dispatch(self, org_id: str) -> None:
        asks = self._asks.get(org_id)
        free = self._free.get(org_id, self.size)
        while asks and free > 0:
            ask = heapq.heappop(asks)
            if ask.future.done():  # withdrawn
                continue
            granted = min(free, ask.want)
            free -= granted
            ask.future.set_result(granted)
        # Withdrawn requests still at the head are dropped too.
        while asks and asks[0].future.done():
            heapq.heappop(asks)
        if asks == []:
            del self._asks[org_id]
        if free == self.size:
            self._free.pop(org_id, None)
        else:
            self._free[org_id] = free
