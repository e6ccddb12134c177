"""Held places: a refused flex request keeps its place in the queue until it
comes back (``scheduler/holds.py``), so its retry finds the drain ahead of
that place rather than a new backlog; on the scheduler with a scripted
engine, and on a real gateway in front of the sim engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from conftest import Gateway, sim_engine, sim_model_id, wait_for
from flexserve.engines.base import StepTimeModel
from flexserve.errors import ResourceUnavailableError
from flexserve.scheduler.drain import build_timeline, wait_in_queue
from flexserve.scheduler.flex_waits import place_key
from flexserve.scheduler.holds import HeldPlaces
from flexserve.scheduler.scheduler import Scheduler, Ticket
from flexserve.tiers import ServiceTier
from test_estimates import _metric, every_slot_held, flex_gauge
from test_scheduler import MODEL, ScriptedEngine, make_scheduler, run, until

# --- the places themselves ------------------------------------------------------------


def test_a_place_is_claimed_once_and_kept_from_its_first_refusal() -> None:
    places = HeldPlaces()
    first = places.hold("org-a", (b"r1", b"name"), arrival=10.0, cost_tokens=100, until=40.0, name="n1")
    again = places.hold("org-a", (b"r1", b"other"), arrival=25.0, cost_tokens=100, until=60.0)  # refused again
    places.hold("org-b", (b"r1",), arrival=12.0, cost_tokens=300, until=80.0)  # another organization's
    assert first is again and again is not None and again.name == "n1"
    assert len(places) == 2
    assert places.tokens_ahead("org-a", now=30.0) == 100
    assert places.tokens_ahead("org-a", now=30.0, before=9.0) == 0
    assert places.find("org-a", b"name", now=30.0) is first  # found by its name, left in place
    held = places.claim("org-a", b"r1", now=50.0)  # past its first time, within the renewed one
    assert held is not None and held.arrival == 10.0
    assert places.claim("org-a", b"r1", now=50.0) is None  # taken
    assert places.claim("org-a", b"name", now=50.0) is None  # by any of its keys
    assert places.tokens_ahead("org-a", now=50.0) == 0 and len(places) == 1


def test_only_the_places_due_back_by_a_given_time_count_when_asked() -> None:
    places = HeldPlaces()
    places.hold("org-a", (b"due",), arrival=1.0, cost_tokens=10, until=90.0, returns_at=20.0)
    places.hold("org-a", (b"later",), arrival=2.0, cost_tokens=20, until=90.0, returns_at=60.0)
    places.hold("org-a", (b"after",), arrival=5.0, cost_tokens=40, until=90.0, returns_at=25.0)
    places.hold("org-a", (b"read",), arrival=6.0, cost_tokens=80, until=35.0, returns_at=30.0, read=True)
    # Every place counts, unless only those whose clients are due back by a time do
    # (and are not long overdue: those have likely given up).
    assert places.tokens_ahead("org-a", now=21.0) == 150
    assert places.tokens_ahead("org-a", now=21.0, before=3.0) == 30
    assert places.tokens_ahead("org-a", now=21.0, before=3.0, due_by=40.0) == 10  # 1 s late: still due
    assert places.tokens_ahead("org-a", now=21.0, due_by=30.0) == 130  # a read's client is due at once
    assert places.tokens_ahead("org-a", now=30.0, before=3.0) == 30  # held all the same
    assert places.tokens_ahead("org-a", now=30.0, before=3.0, due_by=40.0) == 0  # 10 s late
    assert places.tokens_ahead("org-a", now=30.0, due_by=30.0) == 80  # 5 and 10 s late; the read counts


def test_places_expire_and_those_without_keys_count_but_cannot_be_claimed() -> None:
    places = HeldPlaces(limit=2)
    places.hold("org-a", (), arrival=1.0, cost_tokens=50, until=5.0)
    places.hold("org-a", (b"k",), arrival=2.0, cost_tokens=70, until=8.0)
    assert places.hold("org-a", (b"over",), arrival=3.0, cost_tokens=90, until=8.0) is None  # past the limit
    assert places.tokens_ahead("org-a", now=4.0) == 120
    assert places.tokens_ahead("org-a", now=6.0) == 70  # the one without keys ended at 5 s
    assert places.claim("org-a", b"over", now=6.0) is None
    assert places.claim("org-a", b"k", now=8.5) is None  # too late
    assert len(places) == 0


def test_a_request_naming_no_place_lets_go_of_its_organizations_oldest_read() -> None:
    places = HeldPlaces()
    places.hold("org-a", (b"read1",), arrival=1.0, cost_tokens=50, until=9.0, read=True)
    places.hold("org-a", (b"refused",), arrival=1.5, cost_tokens=50, until=9.0)
    places.hold("org-a", (b"read2",), arrival=2.0, cost_tokens=50, until=9.0, read=True)
    places.drop_oldest_read("org-a", now=3.0)
    assert places.find("org-a", b"read1", now=3.0) is None
    assert places.find("org-a", b"refused", now=3.0) is not None  # a refusal's place is kept
    assert places.find("org-a", b"read2", now=3.0) is not None


# --- on the scheduler -----------------------------------------------------------------


async def _refused(coro: object) -> ResourceUnavailableError:
    with pytest.raises(ResourceUnavailableError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


async def _one_slot_taken() -> tuple[ScriptedEngine, Scheduler, asyncio.Task[tuple[Ticket, str]]]:
    """One slot, taken by a flex run the model says holds it 10 s (100
    tokens; it really takes 0.3 s)."""
    engine = ScriptedEngine(capacity=1, token_time=0.003, step_model=StepTimeModel(0.1, 0.0, 0.0))
    scheduler = await make_scheduler(engine, flex_headroom=0.0)
    blocker = asyncio.create_task(run(scheduler, "blocker", ServiceTier.FLEX, tokens=100, max_wait=600))
    await until(lambda: engine.started == ["blocker"])
    return engine, scheduler, blocker


@pytest.mark.parametrize("fingerprint", [b"same body", None])
async def test_a_refused_request_comes_back_to_its_place(fingerprint: bytes | None) -> None:
    engine, scheduler, blocker = await _one_slot_taken()
    pool = scheduler.pools[MODEL]
    first = asyncio.create_task(run(scheduler, "q1", ServiceTier.FLEX, max_wait=600))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 1)
    # Refused (its wait of 20 s is too likely past 10 s: p10 11.5 s).
    await _refused(run(scheduler, "r", ServiceTier.FLEX, max_wait=10, fingerprint=fingerprint))
    later = asyncio.create_task(run(scheduler, "x", ServiceTier.FLEX, max_wait=600))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 2)
    # The retry, patient this time (the same body, another deadline).
    retry = asyncio.create_task(run(scheduler, "r", ServiceTier.FLEX, max_wait=600, fingerprint=fingerprint))
    await asyncio.gather(later, first, blocker, retry)
    if fingerprint is None:
        assert engine.started == ["blocker", "q1", "x", "r"]  # nothing kept: the back of the queue
    else:
        assert engine.started == ["blocker", "q1", "r", "x"]  # ahead of the request sent after it
    assert len(pool.holds) == (1 if fingerprint is None else 0)  # the anonymous one waits out its time
    await scheduler.close()


async def test_a_place_whose_client_returns_after_a_request_starts_does_not_count_for_it() -> None:
    # As above, but refused with a 1 s deadline: told to come back in about
    # 34 s, after the request sent next would start (30 s with the place
    # counted, 20 s without): it will likely find that one gone, so that one
    # is told 20 s.
    engine, scheduler, blocker = await _one_slot_taken()
    pool = scheduler.pools[MODEL]
    first = asyncio.create_task(run(scheduler, "q1", ServiceTier.FLEX, max_wait=600))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 1)
    refusal = await _refused(run(scheduler, "r", ServiceTier.FLEX, max_wait=1, fingerprint=b"r"))
    timeline = build_timeline(pool, scheduler.config, time.monotonic())
    counted, not_counted = timeline.wait(2), timeline.wait(1)
    assert counted is not None and not_counted is not None
    assert refusal.retry_after is not None and refusal.retry_after > counted.p50
    later, _, _ = await asyncio.gather(run(scheduler, "x", ServiceTier.FLEX, max_wait=600), first, blocker)
    assert later[0].estimated_wait is not None
    assert later[0].estimated_wait.p50 == pytest.approx(not_counted.p50, rel=0.05)
    await scheduler.close()


async def test_a_refused_clients_place_is_due_back_when_its_retry_after_says() -> None:
    engine, scheduler, blocker = await _one_slot_taken()
    pool = scheduler.pools[MODEL]
    first = asyncio.create_task(run(scheduler, "q1", ServiceTier.FLEX, max_wait=600))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 1)
    before = time.monotonic()
    refusal = await _refused(run(scheduler, "r", ServiceTier.FLEX, max_wait=10, fingerprint=b"r"))
    after = time.monotonic()
    told = int(refusal.headers["Retry-After"])
    assert refusal.retry_after == told  # whole seconds, as the header has it
    held = pool.holds.find("org-a", place_key(refusal.headers["x-flex-place"]), after)
    assert held is not None and before + told <= held.returns_at <= after + told
    await asyncio.gather(first, blocker)
    await scheduler.close()


async def test_held_places_count_only_for_a_request_their_clients_return_before() -> None:
    # One slot: the blocker frees it in 10 s (as the model says), then each
    # run holds it 10 s. A request with nothing queued ahead starts in 10 s,
    # with one place ahead in 20 s, with two in 30 s.
    engine, scheduler, blocker = await _one_slot_taken()
    pool = scheduler.pools[MODEL]
    now = time.monotonic()
    timeline = build_timeline(pool, scheduler.config, now)
    waits = [timeline.wait(n) for n in range(3)]
    assert all(w is not None for w in waits)
    p50 = [w.p50 for w in waits if w is not None]
    assert p50[1] == pytest.approx(p50[0] + 10, rel=0.05) and p50[2] == pytest.approx(p50[0] + 20, rel=0.05)

    def held(name: bytes, arrival: float, back_in: float) -> None:
        pool.holds.hold("org-a", (name,), arrival=arrival, cost_tokens=100, until=now + 120,
                        returns_at=now + back_in)

    # Due back before the request would start: it goes ahead.
    held(b"soon", now - 2, back_in=p50[0] / 2)
    # Due back after the request starts behind the first one (20 s) though
    # before it would start were it counted too (30 s): it finds the request
    # gone, and does not count for it.
    held(b"late", now - 1, back_in=(p50[1] + p50[2]) / 2)
    told = wait_in_queue(timeline, pool, "org-a", 100, now)
    assert told is not None and told.p50 == pytest.approx(p50[1], rel=0.01)
    # Another place due back before 20 s: both are ahead, and then so is the late one.
    held(b"also soon", now - 0.5, back_in=p50[0])
    told = wait_in_queue(timeline, pool, "org-a", 100, now)
    third = timeline.wait(3)
    assert told is not None and third is not None and told.p50 == pytest.approx(third.p50, rel=0.01)
    # A request at a place held from before them all has none of them ahead.
    told = wait_in_queue(timeline, pool, "org-a", 100, now, before=now - 3)
    assert told is not None and told.p50 == pytest.approx(p50[0], rel=0.01)
    pool.holds.claim("org-a", b"soon", now)
    pool.holds.claim("org-a", b"late", now)
    pool.holds.claim("org-a", b"also soon", now)
    await blocker
    await scheduler.close()


async def test_a_request_with_a_read_place_and_a_refused_place_takes_the_earlier() -> None:
    engine = ScriptedEngine(capacity=1)
    scheduler = await make_scheduler(engine)
    pool = scheduler.pools[MODEL]
    now = time.monotonic()
    pool.holds.hold("org-a", (b"body",), arrival=now - 5, cost_tokens=100, until=now + 60)
    pool.holds.hold("org-a", (place_key("read"),), arrival=now - 1, cost_tokens=100, until=now + 5, read=True)
    ticket = Ticket("r", MODEL, ServiceTier.FLEX, "org-a", cost_tokens=100, fingerprint=b"body",
                    place=place_key("read"))
    held = scheduler.waits.arrive(pool, ticket, now)
    assert held is not None and held.arrival == now - 5
    assert len(pool.holds) == 0  # the read's place is let go as well
    await scheduler.close()


async def test_a_waiter_refused_at_its_deadline_keeps_the_place_it_waited_for() -> None:
    engine, scheduler, blocker = await _one_slot_taken()
    pool = scheduler.pools[MODEL]
    # Admitted (the optimistic end of 10 s fits 12 s); its deadline then passes.
    waited = asyncio.create_task(run(scheduler, "w", ServiceTier.FLEX, max_wait=12, fingerprint=b"w"))
    await until(lambda: pool.queue.num_waiting(ServiceTier.FLEX) == 1)
    (waiter,) = pool.queue.flex_newest_first()
    arrival = waiter.arrival
    scheduler.waits.expire(pool, waiter)  # what its timer does at the deadline
    await _refused(waited)
    held = pool.holds.claim("org-a", b"w", time.monotonic())
    assert held is not None and held.arrival == arrival
    await blocker
    await scheduler.close()


# --- on a real gateway ----------------------------------------------------------------


def test_the_gateway_holds_a_refused_requests_place_for_the_same_body(
    start_gateway: Callable[..., Gateway],
) -> None:
    """Two long flex streams hold both slots. Two requests with a 1 s deadline
    are refused and their places held; the first sent again byte for byte
    (with a longer deadline) takes its place, the other's is still held. A
    status read holds a place, which a request naming it takes."""
    gateway = start_gateway(engines=[sim_engine(speed=1.0, max_num_seqs=2)], engine="sim", flex_headroom=0.0)
    model = sim_model_id(gateway)

    def body(text: str) -> bytes:
        return httpx.Request("POST", "/", json={
            "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5,
            "service_tier": "flex"}).content

    def send(content: bytes, max_wait: str, place: str | None = None) -> httpx.Response:
        headers = {"X-Flex-Max-Wait": max_wait, "Content-Type": "application/json"}
        if place is not None:
            headers["X-Flex-Place"] = place
        with gateway.http() as http:
            return http.post("/v1/chat/completions", content=content, timeout=60, headers=headers)

    retried: list[httpx.Response] = []
    with every_slot_held(gateway, model, 2):
        first, other = send(body("first"), "1"), send(body("other"), "1")
        assert first.status_code == other.status_code == 429
        assert _metric(gateway, "flexserve_flex_places_held", model) == 2
        # The 429 names the place held; a status read naming it reports that place's
        # wait (behind nothing: both slots' runs are all there is ahead of it).
        with gateway.http() as http:
            (named_read,) = http.get("/v1/flex/status", params={
                "model": model, "place": other.headers["x-flex-place"]}).json()["data"]
            bad_place = http.get("/v1/flex/status", params={"model": model, "place": "p" * 65})
        assert named_read["place"] == other.headers["x-flex-place"]
        # (Within 5 %: the header has 3 significant digits, and the slots' remaining
        # time is read again, from the streams' pace among other things.)
        assert named_read["estimated_wait_seconds"] <= 1.05 * float(other.headers["x-flex-estimated-wait"])
        assert bad_place.status_code == 400 and bad_place.json()["error"]["param"] == "place"
        assert _metric(gateway, "flexserve_flex_places_held", model) == 2  # no new place for that read
        retry = threading.Thread(target=lambda: retried.append(send(body("first"), "600")))
        retry.start()
        wait_for(lambda: flex_gauge(gateway, "flexserve_queue_depth", model) == 1)
        assert _metric(gateway, "flexserve_flex_places_held", model) == 1
        # A status read holds the place it reports; a request naming it takes it.
        with gateway.http() as http:
            (read,) = http.get("/v1/flex/status", params={"model": model}).json()["data"]
            bad = http.post("/v1/chat/completions", content=body("bad"),
                            headers={"X-Flex-Place": "x" * 65, "Content-Type": "application/json"})
        assert isinstance(read["place"], str) and read["estimated_wait_seconds"] > 0
        assert _metric(gateway, "flexserve_flex_places_held", model) == 2
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_header"
        named = threading.Thread(target=lambda: retried.append(send(body("read"), "600", read["place"])))
        named.start()
        wait_for(lambda: flex_gauge(gateway, "flexserve_queue_depth", model) == 2)
        assert _metric(gateway, "flexserve_flex_places_held", model) == 1
    retry.join(timeout=60)
    named.join(timeout=60)
    assert [r.status_code for r in retried] == [200, 200]
