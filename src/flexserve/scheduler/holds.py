"""Places in the flex queue kept for refused requests until they come back.

A flex request refused with 429 is told when to come back (``Retry-After``).
Meanwhile the queue moves on and other requests join it; were the retry to
join at the back, it would find the queue as long as before and be refused
again. So a refusal keeps the request's place, as a counter's ticket does:
the place it had (its arrival, or the moment it was refused) is held under
the request's fingerprint — its organization and a hash of its body, which
a client's retry of the same request repeats, whatever its SDK — and under
a name the 429 gives (``x-flex-place``), until a little after the time it
was told. A retry that finds its place joins the queue there, behind only
what was queued before it; the rest of the drain goes on meanwhile, so
``Retry-After`` can be the time until the place is near enough to the
front for the request's own deadline.

Held places count as queued ahead of the later requests of their
organization (its estimates include them): a retry coming back goes ahead
of all those still waiting then — but only if it comes back before they
start. So a place counts for a request only if its client is due back
before that request starts; one due later will most likely find it gone
(``drain.wait_in_queue`` steps forward in time to find that start). A read's place
counts at once: its client is about to send.

A read of ``/v1/flex/status`` for one model holds a place too, for
``READ_SECONDS``: the place a request sent now would take, whose wait is
the one the read reports. The reply names it (``place``), and a request
sent with ``X-Flex-Place: <place>`` takes it — so clients that read the
status together are each told their own wait, and get it, whatever order
their requests then arrive in. A request of the organization that names
no place lets go of its oldest read's place (its client may have been
that reader), so that a read is not counted beside its own request.

A refusal without a fingerprint (work the gateway queues itself) holds a
place with nothing to claim it by, until the time it was told: it still
spreads the clients refused together over the drain instead of sending
them all back at once.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

# Seconds a place is held past the time its request was told to come back.
HOLD_GRACE = 10.0
# Seconds the place a status read reported is held for the request that follows it.
READ_SECONDS = 5.0
# Seconds past the time it was told that a refused request's client is
# still counted on to come back (``due_by``): one later has likely given up.
LATE_SECONDS = 2.0


@dataclass(eq=False, slots=True)
class Hold:
    """One held place: its arrival in queue order, and until when it is kept."""

    org_id: str
    # What claims it: the refused body's fingerprint, and its name (``place_key``).
    keys: tuple[bytes, ...]
    arrival: float
    cost_tokens: int
    # When its client is due back (told in Retry-After; a read's, at once).
    returns_at: float
    until: float
    # The name a client may present (``X-Flex-Place``, ``?place=``).
    name: str | None = None
    # Held by a status read (rather than a refusal).
    read: bool = False
    live: bool = True


class HeldPlaces:
    """The held places of one model's flex queue, per organization."""

    def __init__(self, limit: int = 10_000) -> None:
        # Most places held at once: beyond it a refusal holds none.
        self.limit = limit
        self._by_key: dict[tuple[str, bytes], Hold] = {}
        self._by_org: dict[str, dict[int, Hold]] = {}
        # The latest arrival held per organization (so far): a request after it
        # is behind all of that organization's places without looking.
        self._latest: dict[str, float] = {}
        # The places status reads hold, per organization, oldest first.
        self._reads: dict[str, dict[int, Hold]] = {}
        self._tokens: dict[str, int] = {}
        self._expiry: list[tuple[float, int, Hold]] = []
        self._seq = itertools.count()
        self._num_live = 0

    def __len__(self) -> int:
        return self._num_live

    def hold(
        self, org_id: str, keys: tuple[bytes, ...], arrival: float, cost_tokens: int, until: float,
        *, returns_at: float = 0.0, name: str | None = None, read: bool = False,
    ) -> Hold | None:
        """Keep a place at ``arrival`` for ``org_id``, claimed by any of
        ``keys`` (none: it cannot be claimed), until ``until``. A place
        already held under one of them is kept instead (its earlier arrival,
        its name), for the later of the two times. None past the limit."""
        for key in keys:
            held = self._by_key.get((org_id, key))
            if held is not None:
                held.returns_at = max(held.returns_at, returns_at)
                if until > held.until:
                    held.until = until
                    heapq.heappush(self._expiry, (until, next(self._seq), held))
                return held
        if self._num_live >= self.limit:
            return None
        held = Hold(org_id, keys, arrival, cost_tokens, returns_at, until, name, read)
        for key in keys:
            self._by_key[(org_id, key)] = held
        self._by_org.setdefault(org_id, {})[id(held)] = held
        self._latest[org_id] = max(arrival, self._latest.get(org_id, arrival))
        if read:
            self._reads.setdefault(org_id, {})[id(held)] = held
        self._tokens[org_id] = self._tokens.get(org_id, 0) + cost_tokens
        self._num_live += 1
        heapq.heappush(self._expiry, (until, next(self._seq), held))
        return held

    def find(self, org_id: str, key: bytes, now: float) -> Hold | None:
        """The place held under ``key``, left in place."""
        self.expire(now)
        return self._by_key.get((org_id, key))

    def claim(self, org_id: str, key: bytes | None, now: float) -> Hold | None:
        """The place held under ``key``, taken out; None if there is none."""
        if key is None:
            return None
        held = self.find(org_id, key, now)
        if held is not None:
            self._drop(held)
        return held

    def drop_oldest_read(self, org_id: str, now: float) -> None:
        """Let go of the oldest place a status read of ``org_id`` holds: a
        request of its arrived naming no place, and may be that reader's."""
        self.expire(now)
        reads = self._reads.get(org_id)
        if reads:
            self._drop(next(iter(reads.values())))

    def tokens_ahead(
        self, org_id: str, now: float, before: float | None = None, *, due_by: float | None = None
    ) -> int:
        """Expected tokens of ``org_id``'s held places ahead of a request of
        its joining now (at a place held from ``before``): all those held from
        earlier, or only those whose clients are due back by ``due_by`` and
        are not more than ``LATE_SECONDS`` overdue (a read's, while it lasts)."""
        self.expire(now)
        if due_by is None and (before is None or before > self._latest.get(org_id, before)):
            return self._tokens.get(org_id, 0)
        late = now - LATE_SECONDS
        return sum(
            h.cost_tokens for h in self._by_org.get(org_id, {}).values()
            if (before is None or h.arrival < before)
            and (due_by is None or (h.returns_at <= due_by and (h.read or h.returns_at >= late)))
        )

    def expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            until, _, held = heapq.heappop(expiry)
            if held.live and held.until <= until:
                self._drop(held)

    def _drop(self, held: Hold) -> None:
        if not held.live:
            return
        held.live = False
        self._num_live -= 1
        for key in held.keys:
            del self._by_key[(held.org_id, key)]
        places = self._by_org[held.org_id]
        del places[id(held)]
        if held.read:
            reads = self._reads[held.org_id]
            del reads[id(held)]
            if not reads:
                del self._reads[held.org_id]
        if not places:
            del self._by_org[held.org_id]
            del self._latest[held.org_id]
        left = self._tokens[held.org_id] - held.cost_tokens
        if left > 0 or held.org_id in self._by_org:
            self._tokens[held.org_id] = left
        else:
            del self._tokens[held.org_id]
