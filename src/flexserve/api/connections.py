"""Connection hygiene: how many connections the gateway holds, and for how long
a client may take to send a request.

uvicorn times out only a kept-alive connection between two requests, and the
first byte of anything cancels that timer. A connection that sends nothing, or
sends its headers or body a byte at a time, is held for ever; enough of them
reach the open-files limit, after which every accept fails and every client
(and ``/healthz``) gets a reset. The protocol below, uvicorn's httptools
protocol with a few callbacks extended, closes the gap:

- **idle**: a connection with no request under way, new or kept alive, is
  closed after ``keep_alive_timeout`` (uvicorn's own keep-alive timer, also
  armed when the connection opens);
- **header**: from the first byte of a request, its line and headers must
  arrive within ``header_timeout``, else ``408`` and close;
- **body**: from the end of the headers, the body must arrive within
  ``body_timeout``, else ``408`` and close;
- **caps**: past ``max_connections`` open connections in all, or
  ``max_connections_per_client`` from one address, a new connection is
  answered ``503`` with ``Retry-After`` at once and closed.

A request whose body has arrived is the application's: no timer here runs
while it waits for capacity or streams its answer, however long, so flex
requests waiting server-side are never cut. Bytes a client sends while its
response is still under way (a pipelined request, a stray CRLF) only stop the
connection from being kept alive once that response is done.

The timers cost the request path next to nothing: a deadline is a float set
in the parser's callbacks, and a timer is armed only when a read ends with a
request incomplete and no earlier timer is pending.

A refused connection is answered before its request is read, since parsing
is what a flood must not be able to buy. The answer (like a 408) is written,
the write side shut, and what the client sends read and dropped for up to a
second, so that the client reads the response rather than a reset caused by
unread data. Those lingering connections are themselves bounded; past the
bound the connection is closed right after the write, and the client may see
a reset instead.

Refusals and timeouts are counted for ``/metrics`` and logged as one
summary line at most every ``_LOG_INTERVAL`` seconds, not one per event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flexserve.api.request_id import new_request_id
from flexserve.errors import FlexServeError, RequestTimeoutError, TooManyConnectionsError

if TYPE_CHECKING:
    from flexserve.config import Settings

log = logging.getLogger(__name__)

# Seconds between two summary lines of refusals and timeouts.
_LOG_INTERVAL = 10.0
# Seconds a connection answered 503 or 408 is kept to read and drop what
# the client still sends.
_LINGER = 1.0
# Connections lingering so at once; past it they are closed at once.
_MAX_LINGERING = 512
# Open files kept free of client connections: the database, upstream
# connections, log files and lingering refusals.
_RESERVED_FILES = 1024
# Seconds a refused client is asked to wait.
_RETRY_AFTER = 1

# Where the parser is in the current request.
_WAITING = 0  # between requests: none under way, or the last one fully read
_HEAD = 1  # request line and headers arriving
_BODY = 2  # body arriving
# A phase's deadline before data_received has read the clock for it.
_UNSTAMPED = -1.0

REFUSED_TOTAL = "max_connections"
REFUSED_PER_CLIENT = "max_connections_per_client"


@dataclass(frozen=True)
class ConnectionLimits:
    """The caps and timeouts, from Settings; 0 turns a cap or a timeout off
    (except ``keep_alive_timeout``, which uvicorn needs)."""

    max_connections: int
    max_connections_per_client: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_connections=settings.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
        )


def _http_error(exc: FlexServeError, status_line: bytes) -> bytes:
    """A whole HTTP/1.1 response carrying ``exc`` in OpenAI's envelope, closing the connection."""
    body = orjson.dumps(exc.to_dict())
    headers = [
        status_line,
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"x-request-id: " + new_request_id().encode(),
        b"connection: close",
        *(f"{name}: {value}".encode() for name, value in exc.headers.items()),
    ]
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


class ConnectionGuard:
    """The connections of one server: counts, caps, the summary log, metrics.

    One guard serves one uvicorn server; ``protocol_class()`` is the protocol
    to hand to ``uvicorn.Config(http=...)``, bound to this guard.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        if limits.keep_alive_timeout <= 0:
            raise ValueError("keep_alive_timeout must be positive")
        self.limits = limits
        self.num_open = 0
        self.num_lingering = 0
        # Open connections per client address, for those that have any.
        self._per_client: dict[str, int] = {}
        self.num_refused: Counter[str] = Counter()
        self.num_timeouts: Counter[str] = Counter()
        # Events since the last summary line.
        self._unlogged: Counter[str] = Counter()
        self._last_refused_client = ""
        self._next_log = 0.0
        self._flush: asyncio.TimerHandle | None = None
        self.collector: Collector = _ConnectionsCollector(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        return cls(ConnectionLimits.from_settings(settings))

    def uvicorn_options(self) -> dict[str, Any]:
        """What ``uvicorn.Config`` needs for the guard to see every connection.
        No websockets: an upgraded connection would leave the guard's count."""
        return {
            "http": self.protocol_class(),
            "ws": "none",
            "timeout_keep_alive": self.limits.keep_alive_timeout,
        }

    def protocol_class(self) -> type[asyncio.Protocol]:
        return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": self})

    def fit_open_files_limit(self) -> None:
        """Lower ``max_connections`` to what the open-files limit leaves room for.

        Past that limit accepting fails and uvicorn answers nobody, not even
        ``/healthz``; under it the cap refuses cleanly. Call after the limit
        has been raised as far as it goes."""
        try:
            import resource
        except ImportError:  # Windows
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        room = max(soft - _RESERVED_FILES, soft // 2)
        if 0 < self.limits.max_connections <= room:
            return
        log.warning(
            "max_connections %s lowered to %d: the open-files limit is %d "
            "(raise it, e.g. `ulimit -n`, to hold more)",
            self.limits.max_connections or "(no cap)", room, soft,
        )
        self.limits = dataclasses.replace(self.limits, max_connections=room)

    # --- accounting, called by the protocol ---------------------------------

    def admit(self, client: str) -> str | None:
        """Count a new connection in, or return why it is refused."""
        limits = self.limits
        if limits.max_connections and self.num_open >= limits.max_connections:
            return REFUSED_TOTAL
        held = self._per_client.get(client, 0)
        if limits.max_connections_per_client and held >= limits.max_connections_per_client:
            return REFUSED_PER_CLIENT
        self._per_client[client] = held + 1
        self.num_open += 1
        return None

    def release(self, client: str) -> None:
        self.num_open -= 1
        held = self._per_client[client] - 1
        if held:
            self._per_client[client] = held
        else:
            del self._per_client[client]

    def num_open_from(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def refusal(self, reason: str) -> bytes:
        if reason == REFUSED_PER_CLIENT:
            message = (
                f"Too many connections from your address (at most "
                f"{self.limits.max_connections_per_client}); reuse connections or retry later."
            )
        else:
            message = "The server holds as many connections as it can; retry later."
        exc = TooManyConnectionsError(message, retry_after=_RETRY_AFTER)
        return _http_error(exc, b"HTTP/1.1 503 Service Unavailable")

    def timeout_response(self, phase: str) -> bytes:
        limit = self.limits.header_timeout if phase == "header" else self.limits.body_timeout
        exc = RequestTimeoutError(f"The request's {phase} did not arrive within {limit:g} s.")
        return _http_error(exc, b"HTTP/1.1 408 Request Timeout")

    def note_refused(self, reason: str, client: str) -> None:
        self.num_refused[reason] += 1
        self._last_refused_client = client
        self._note(reason)

    def note_timeout(self, phase: str) -> None:
        self.num_timeouts[phase] += 1
        if phase != "idle":  # closing idle connections is routine, not news
            self._note(phase)

    def _note(self, event: str) -> None:
        self._unlogged[event] += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next_log:
            self._log_summary()
            self._next_log = now + _LOG_INTERVAL
        elif self._flush is None:
            self._flush = loop.call_at(self._next_log, self._log_summary)

    def _log_summary(self) -> None:
        self._flush = None
        events = self._unlogged
        if not events:
            return
        parts = []
        refused = events[REFUSED_TOTAL] + events[REFUSED_PER_CLIENT]
        if refused:
            parts.append(
                f"refused {refused} connections ({events[REFUSED_TOTAL]} at max_connections="
                f"{self.limits.max_connections}, {events[REFUSED_PER_CLIENT]} at "
                f"max_connections_per_client={self.limits.max_connections_per_client}; "
                f"last from {self._last_refused_client})"
            )
        if events["header"] or events["body"]:
            parts.append(
                f"closed {events['header']} connections for slow headers and "
                f"{events['body']} for a slow body"
            )
        log.warning("%s since the last report; %d connections open", "; ".join(parts), self.num_open)
        self._next_log = asyncio.get_running_loop().time() + _LOG_INTERVAL
        events.clear()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the guard's caps and timeouts."""

    guard: ConnectionGuard  # set on the subclass ConnectionGuard.protocol_class() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.guard.limits
        self._header_timeout = limits.header_timeout or math.inf
        self._body_timeout = limits.body_timeout or math.inf
        self._phase = _WAITING
        # When the current phase must be over (loop time).
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf
        self._address = ""
        self._admitted = False
        # A last response (503, 408) is written: what the client sends is dropped.
        self._answered = False
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else ""
        reason = self.guard.admit(self._address)
        if reason is not None:
            self._refuse(reason)
            return
        self._admitted = True
        # The keep-alive timer, armed already for a connection that has not
        # sent its first request: it may not sit idle longer than between two.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _refuse(self, reason: str) -> None:
        self.guard.note_refused(reason, self._address)
        self._answer_and_close(self.guard.refusal(reason))

    def _answer_and_close(self, response: bytes) -> None:
        """Write a last response and close, reading and dropping what the
        client still sends for a moment, so that unread bytes do not turn the
        close into a reset that loses the response."""
        guard = self.guard
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.write(response)
        if guard.num_lingering < _MAX_LINGERING and self.transport.can_write_eof():
            guard.num_lingering += 1
            self._lingering = True
            self.transport.write_eof()
            self._timer = self.loop.call_later(_LINGER, self.transport.close)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._admitted:
            self._admitted = False
            self.guard.release(self._address)
        if self._lingering:
            self._lingering = False
            self.guard.num_lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self._phase == _WAITING:
            self._phase = _HEAD
            self._deadline = _UNSTAMPED
        super().data_received(data)
        if self._phase == _WAITING:
            # The whole request is in: nothing to time. A timer armed for an
            # earlier one is left to run out rather than cancelled; when it
            # fires it re-arms for whatever phase is then under way, so a
            # connection sets at most one timer per header timeout.
            return
        if self._deadline == _UNSTAMPED:
            # The phase began in this read: its clock starts now (reading the
            # clock only here keeps it off the path of whole requests).
            timeout = self._header_timeout if self._phase == _HEAD else self._body_timeout
            self._deadline = self.loop.time() + timeout
        if self._deadline < self._timer_when:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(self._deadline, self._on_deadline)
        self._timer_when = self._deadline

    # Parser callbacks: they only move the phase on; data_received times it.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != _HEAD:  # a pipelined request, read with the previous one
            self._phase = _HEAD
            self._deadline = _UNSTAMPED

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = _BODY
        self._deadline = _UNSTAMPED

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _WAITING

    def _on_deadline(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        if self._phase == _WAITING or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase == _BODY and self.flow.read_paused:
            # Reading is paused because the application has not taken the
            # body read so far: the client is not the slow one.
            self._deadline = max(self._deadline, now + self._body_timeout)
        if now < self._deadline:
            self._arm()
            return
        cycle = self.cycle
        if self._phase == _HEAD:
            self.guard.note_timeout("header")
            if cycle is not None and not cycle.response_complete:
                # Bytes arrived while a response is under way: finish it, then close.
                cycle.keep_alive = False
                return
            self._answer_and_close(self.guard.timeout_response("header"))
        else:
            self.guard.note_timeout("body")
            if cycle is not None and not cycle.response_started:
                self._answer_and_close(self.guard.timeout_response("body"))
            else:
                self.transport.close()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.guard.note_timeout("idle")
        super().timeout_keep_alive_handler()


class _ConnectionsCollector(Collector):
    """The guard's counts, read at scrape time."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        guard = self._guard
        yield GaugeMetricFamily(
            "flexserve_connections_open", "Client connections open (refused ones not counted).",
            value=guard.num_open,
        )
        yield GaugeMetricFamily(
            "flexserve_connections_max", "Cap on open client connections (max_connections; 0: none).",
            value=guard.limits.max_connections,
        )
        refused = CounterMetricFamily(
            "flexserve_connections_refused",
            "Connections answered 503 and closed at once, by the cap they met.",
            labels=["reason"],
        )
        for reason in (REFUSED_TOTAL, REFUSED_PER_CLIENT):
            refused.add_metric([reason], guard.num_refused[reason])
        yield refused
        timeouts = CounterMetricFamily(
            "flexserve_connection_timeouts",
            "Connections closed for a slow client: idle (no request), header or body.",
            labels=["phase"],
        )
        for phase in ("idle", "header", "body"):
            timeouts.add_metric([phase], guard.num_timeouts[phase])
        yield timeouts
