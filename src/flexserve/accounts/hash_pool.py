"""Slow hashes off the event loop, a few at a time, with a bounded wait.

A document hash (scrypt, ``accounts.verification``) takes tens of
milliseconds of CPU and 16 MiB of memory. On the event loop it would stall
every other request; on the default thread pool (forty threads) a burst of
submissions hashes forty at once, starves the loop of CPU, and leaves the
memory behind: glibc keeps each thread's freed 16 MiB block in that
thread's arena for its next use, so RSS grows with the threads that ever
hashed and never comes back down.

So hashes get threads of their own (``num_threads``, one by default) and at
most ``max_waiting`` more wait for them; past that a hash is refused at once
with 503 and ``Retry-After`` instead of being queued without bound. What a
flood leaves in memory is then one block per hashing thread. (Returning even
that block would take a fixed ``M_MMAP_THRESHOLD``, which makes every hash
fault its 16 MiB in afresh and affects the whole process; ``malloc_trim``
does not release it.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from flexserve.errors import ServiceUnavailableError

T = TypeVar("T")


class HashPool:
    """Dedicated threads for slow hashes, and a bound on the hashes waiting for them."""

    def __init__(self, num_threads: int = 1, max_waiting: int = 4) -> None:
        if num_threads < 1 or max_waiting < 0:
            raise ValueError(f"a pool needs a thread and a wait >= 0: {num_threads}, {max_waiting}")
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="flexserve-hash")
        self._num_threads = num_threads
        self._capacity = num_threads + max_waiting
        # Hashes running or waiting, counted until their thread is done with
        # them (not until their caller stops waiting: a cancelled caller's hash
        # may still be running).
        self._num_taken = 0
        # Seconds one hash takes, a moving average: for an honest Retry-After.
        self._seconds_per_hash = 0.1

    @property
    def num_taken(self) -> int:
        return self._num_taken

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` on one of the pool's threads, or 503 at once when the pool is full."""
        if self._num_taken >= self._capacity:
            raise ServiceUnavailableError(
                "The server is busy checking other submissions; retry after the time in "
                "Retry-After.",
                retry_after=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        self._num_taken += 1
        future = self._executor.submit(self._timed, work)

        def done(_: Future[T]) -> None:
            try:
                loop.call_soon_threadsafe(self._release)
            except RuntimeError:
                pass  # the loop is closed: the process is stopping

        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Drop the hashes still waiting; one running finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _timed(self, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            elapsed = time.perf_counter() - started
            # A float store is atomic under the GIL; an estimate needs no lock.
            self._seconds_per_hash = 0.8 * self._seconds_per_hash + 0.2 * elapsed

    def _release(self) -> None:
        self._num_taken -= 1

    def _retry_after(self) -> float:
        # When the hashes now waiting will be done, at least a second.
        return max(1.0, math.ceil(self._num_taken * self._seconds_per_hash / self._num_threads))
