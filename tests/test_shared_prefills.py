"""Prompts awaiting prefill told across gateways through a real Redis server
(``flexserve.shared.prefills``): each "gateway" a lease and a connection of
its own, told what it has awaiting prefill as its scheduler would tell it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from flexserve.engines.upstream import UpstreamEngine
from flexserve.scheduler.replicas import Replica
from flexserve.shared import prefills
from flexserve.shared.prefills import SharedPrefills
from flexserve.shared.presence import Presence
from redis_server import Presences

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


class Gateway:
    """Two replicas as one gateway lists them, and what it has awaiting
    prefill and the default runs it has on each."""

    def __init__(self, presence: Presence) -> None:
        self.replicas = [Replica(UpstreamEngine(url), 8) for url in URLS]
        self.counts = {replica.name: (0, 0) for replica in self.replicas}
        self.prefills = SharedPrefills(presence, self.replicas, lambda replica: self.counts[replica.name])

    def has(self, index: int, tokens: int, defaults: int = 0) -> None:
        replica = self.replicas[index]
        self.counts[replica.name] = (tokens, defaults)
        self.prefills.changed(replica)

    def others(self) -> list[int]:
        return [replica.others_unprefilled for replica in self.replicas]

    def other_defaults(self) -> list[int]:
        return [replica.others_default_runs for replica in self.replicas]


async def started(presences: Presences, count: int) -> list[Gateway]:
    gateways = [Gateway(await presences.new()) for _ in range(count)]
    for gateway in gateways:
        await gateway.prefills.start()
    return gateways


async def _lost(counts: dict[str, prefills.Counts]) -> None:
    """A publish that never reaches Redis (a gateway killed)."""


async def test_a_gateway_that_stops_tells_the_others_it_has_nothing_awaiting(presences: Presences) -> None:
    a, b = await started(presences, 2)
    try:
        a.has(0, 1_200)
        await until(lambda: b.others() == [1_200, 0])
        await a.prefills.close()
        await until(lambda: b.others() == [0, 0], timeout=prefills._FRESH / 2)
    finally:
        await b.prefills.close()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_each_gateway_hears_what_the_others_have_awaiting_prefill(presences: Presences) -> None:
    a, b, c = await started(presences, 3)
    try:
        a.has(0, 2_000)
        b.has(0, 500)
        b.has(1, 300)
        await until(lambda: (a.others(), b.others(), c.others()) == ([500, 300], [2_000, 0], [2_500, 300]))
        a.has(0, 0)  # its prompt had its first output
        await until(lambda: (b.others(), c.others()) == ([0, 0], [500, 300]))
        assert a.others() == [500, 300]
    finally:
        for gateway in (a, b, c):
            await gateway.prefills.close()


async def test_a_silent_gateways_count_is_dropped_and_a_live_ones_kept(
    presences: Presences, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A count is repeated while it is not zero, and dropped by the others
    once not heard for a while: a gateway that died stops counting."""
    monkeypatch.setattr(prefills, "_REPEAT", 0.1)
    monkeypatch.setattr(prefills, "_FRESH", 0.4)
    a, b = await started(presences, 2)
    try:
        a.has(1, 2_000)
        await until(lambda: b.others() == [0, 2_000])
        await asyncio.sleep(1.0)  # longer than a count is kept unheard: repeats keep it
        assert b.others() == [0, 2_000]
        a.prefills._publish = _lost  # type: ignore[method-assign]
        await a.prefills.close()  # as if it died: no more repeats, and no last word
        await until(lambda: b.others() == [0, 0])
    finally:
        await b.prefills.close()


async def test_each_gateway_hears_the_default_runs_the_others_have_on_each_replica(presences: Presences) -> None:
    """What packed placement counts (``default_placement="pack"``)."""
    a, b, c = await started(presences, 3)
    try:
        a.has(0, 0, defaults=5)
        b.has(0, 700, defaults=2)
        b.has(1, 0, defaults=1)
        await until(lambda: (a.other_defaults(), b.other_defaults(), c.other_defaults())
                    == ([2, 1], [5, 0], [7, 1]))
        assert c.others() == [700, 0]
        a.has(0, 0, defaults=0)  # its default runs ended
        await until(lambda: c.other_defaults() == [2, 1])
    finally:
        for gateway in (a, b, c):
            await gateway.prefills.close()


def test_a_message_is_read_with_or_without_its_default_runs() -> None:
    """A gateway of an earlier version sends prompt tokens alone."""
    assert prefills.parse("gw-1 http://10.0.0.1:8000 1200 3") == ("gw-1", "http://10.0.0.1:8000", (1200, 3))
    assert prefills.parse("gw-1 http://10.0.0.1:8000 1200") == ("gw-1", "http://10.0.0.1:8000", (1200, 0))
    for malformed in ("gw-1 http://10.0.0.1:8000", "gw-1 http://10.0.0.1:8000 many", "a b 1 2 3"):
        with pytest.raises(ValueError):
            prefills.parse(malformed)
