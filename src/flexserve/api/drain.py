"""Graceful shutdown: the requests in progress, and ending them cleanly.

On SIGTERM uvicorn stops accepting connections and waits for the open ones;
past its graceful-shutdown timeout it cancels their tasks, which would cut a
stream without an error event (billed as if its client had left) and answer
a non-streamed request with a plain-text 500. The server (``cli/serve.py``)
runs ``Drain.run`` instead as soon as shutdown begins: new requests on
connections still open get 503, the requests in progress get
``shutdown_grace`` seconds to finish, and those still running then are ended
through their own watch (``pipeline.DisconnectWatch.end``), a cancellation
the pipeline tells apart from a client leaving:

* a stream ends with an error event in OpenAI's shape (code
  ``server_shutting_down``) and is billed for what it delivered, with status
  ``server_shutdown``;
* a request whose answer has not begun gets 503 ``server_shutting_down``
  with Retry-After; a non-streamed one whose engine had begun is recorded at
  zero cost with status ``aborted`` (its client received nothing and will
  send it again), one that never reached an engine leaves no row.

uvicorn's own timeout is set a few seconds past the grace, for those last
answers to go out before it cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from flexserve.errors import ServiceUnavailableError

# Seconds uvicorn waits past the grace before it cancels what is left.
END_MARGIN = 3.0


class Endable(Protocol):
    def end(self) -> None:
        """End the request now, cleanly."""


class Drain:
    """The requests in progress, and whether the server is shutting down."""

    def __init__(self) -> None:
        self.draining = False
        self._requests: set[Endable] = set()
        self._idle: asyncio.Event | None = None

    def add(self, request: Endable) -> None:
        self._requests.add(request)

    def discard(self, request: Endable) -> None:
        self._requests.discard(request)
        if self._idle is not None and not self._requests:
            self._idle.set()

    @property
    def num_in_progress(self) -> int:
        return len(self._requests)

    async def run(self, grace: float) -> None:
        """Refuse new requests, wait up to ``grace`` seconds for those in
        progress to finish, then end those left."""
        self.draining = True
        self._idle = asyncio.Event()
        if self._requests:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        for request in list(self._requests):
            request.end()


def shutting_down() -> ServiceUnavailableError:
    """What a request the server will not finish is answered."""
    return ServiceUnavailableError(
        "The server is shutting down and ended this request before it finished; retry it.",
        retry_after=1,
        code="server_shutting_down",
    )
