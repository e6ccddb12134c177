"""The tiers benchmark's flex clients, in a process of their own.

Default requests are timed at the client (``tiers_load.py``). The flex
clients, a closed loop that keeps every spare slot full, stream what the
engines generate for them: about 2,600 tokens a second at one sim engine,
10,400 at four. On the event loop that also sent and read the default
requests, each default waited behind that parsing: at four engines, the
default requests left up to 23 ms late (p99) against 2 ms at one, and the
default TTFT p99 the client measured in scenario B was 97 ms where the
gateways' own request logs said 81 ms (one engine: 83 against 82). The
benchmark compared the two layouts' load generators, not their gateways.

So the flex clients run in a child process, one asyncio loop for all of
them, and hand their outcomes back when stopped. Their times are
``time.monotonic()``, which on Linux is one clock for every process, so
the window the parent measures counts them as before.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from multiprocessing.connection import Connection

import aiohttp

from flexserve.bench.tiers_load import FlexLoop, Outcome, Target, flex_client
from flexserve.bench.traffic import LengthMix, flex_jobs

# Seconds the child has to start its clients, and to stop and report.
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 120.0


class FlexProcess:
    """Closed-loop flex clients, one per target, running in a child process."""

    def __init__(self, targets: Sequence[Target], seed: int, lengths: LengthMix, *, stream: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_main, args=(child, list(targets), seed, lengths, stream), name="flex-clients", daemon=True
        )

    async def start(self) -> None:
        """Start the child; return once its clients have been started."""
        self._process.start()
        await asyncio.to_thread(self._receive, _START_TIMEOUT, "start its flex clients")

    async def stop(self) -> list[Outcome]:
        """Stop the clients; their outcomes, in the order they ended."""
        if not self._process.is_alive():
            raise RuntimeError(f"the flex client process died (exit code {self._process.exitcode})")
        self._conn.send("stop")
        outcomes = await asyncio.to_thread(self._receive, _STOP_TIMEOUT, "stop its flex clients")
        await asyncio.to_thread(self._process.join, 10.0)
        if not isinstance(outcomes, list):
            raise RuntimeError(f"the flex client process answered {outcomes!r}, not its outcomes")
        return [outcome for outcome in outcomes if isinstance(outcome, Outcome)]

    def kill(self) -> None:
        """End the child however it is doing (after a failure elsewhere)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5.0)

    def _receive(self, timeout: float, what: str) -> object:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the flex client process did not {what} within {timeout:.0f} s")
        return self._conn.recv()


def _main(conn: Connection, targets: list[Target], seed: int, lengths: LengthMix, stream: bool) -> None:
    asyncio.run(_run(conn, targets, seed, lengths, stream))


async def _run(conn: Connection, targets: list[Target], seed: int, lengths: LengthMix, stream: bool) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    loop = FlexLoop(stream=stream)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(flex_client(session, target, flex_jobs(seed, i, lengths), loop))
                 for i, target in enumerate(targets)]
        conn.send("started")
        await asyncio.to_thread(conn.recv)
        loop.stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(loop.outcomes)
