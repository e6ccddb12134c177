"""A throwaway Redis server for the tests, started from Debian's
``redis-server`` the way an operator would run one: a free loopback port, no
persistence, a temporary directory, stopped and removed at the end. Tests
that share it use keys of their own (a prefix per test).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from installed import find_binary, unavailable

HOW_TO_ENABLE = (
    "Redis is not installed: the tests of the state gateways share did not run. Install "
    "its server (Debian: apt-get install redis-server; .ci/run does) to run them."
)


def slot_leases(stored: Mapping[bytes, bytes]) -> dict[str, int]:
    """Each holder's lease, from a replica's hash of leases (``HGETALL
    {prefix}:slots:{replica}``, ``flexserve.shared.capacity``)."""
    return {k.decode(): int(v) for k, v in stored.items() if b":" not in k}


def flex_rooms(stored: Mapping[bytes, bytes]) -> dict[str, int]:
    """Each holder's flex room, from the same hash."""
    return {k.decode().removesuffix(":flex"): int(v) for k, v in stored.items()
            if k.endswith(b":flex")}


def redis_server_or_skip() -> str:
    """The installed ``redis-server``; where there is none, the test is
    skipped, saying how to enable it (failed, where the run requires Redis:
    FLEXSERVE_TEST_REDIS=required, as .ci/run sets, which installs it)."""
    return find_binary("redis-server") or unavailable("REDIS", HOW_TO_ENABLE)


class StallWatch:
    """A PING to the server every half second from a thread of the tests'
    process: the slowest answer, and when. A stall seen here but not by the
    server's own latency monitor was in this process (or the machine), not
    in Redis. Pings while the server is paused on purpose are not counted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.paused = False
        self.slowest = 0.0
        self.slowest_at = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=120)
        while not self._stop.wait(0.5):
            paused, started = self.paused, time.monotonic()
            try:
                client.ping()
            except redis.exceptions.RedisError:
                continue
            took = time.monotonic() - started
            if not paused and not self.paused and took > self.slowest:
                self.slowest, self.slowest_at = took, time.strftime("%H:%M:%S")
        client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class RedisServer:
    """One running ``redis-server``; ``pause``/``resume`` freeze it (SIGSTOP/SIGCONT).

    ``report`` says, once it has stopped, how slow it was at its slowest:
    as the tests' process saw it and as the server measured itself."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self._root = Path(tempfile.mkdtemp(prefix="flexserve-redis-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._watch = StallWatch(self.url)
        self.report = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self._root / "redis.log", "wb")  # noqa: SIM115 - the server's for its life
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._root), "--protected-mode", "no",
             "--latency-monitor-threshold", "100"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    self._watch.start()
                    return
            except redis.exceptions.ConnectionError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self._root / 'redis.log').read_text()}")
            time.sleep(0.05)

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing is answered."""
        assert self._process is not None
        self._watch.paused = True
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)
        self._watch.paused = False

    def _latency_events(self) -> str:
        """The server's own latency monitor: events of 100 ms or more."""
        try:
            events = redis.Redis.from_url(self.url, socket_timeout=5, decode_responses=True).latency_latest()
        except redis.exceptions.RedisError as exc:
            return f"unreadable ({exc})"
        return ", ".join(f"{e[0]} max {e[3]} ms" for e in events) or "none"

    def stop(self) -> None:
        try:
            self._watch.stop()
            if self._process is not None:
                self.report = (
                    f"Redis at its slowest: a PING from the tests took {self._watch.slowest:.2f} s"
                    f" (at {self._watch.slowest_at or '-'}); the server's own stalls of 100 ms or more:"
                    f" {self._latency_events()}"
                )
                os.kill(self._process.pid, signal.SIGCONT)
                self._process.terminate()
                self._process.wait(timeout=10)
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


class Presences:
    """Gateways' leases (``flexserve.shared.presence``) on one Redis server,
    under a key prefix of the test's own, each on a connection of its own as
    separate gateway processes would be; all given back by ``close``."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self._open: list[Any] = []

    async def new(self, *, ttl: float = 15.0, timeout: float = 5.0) -> Any:
        """A started ``Presence``. ``timeout``: how long a call waits for Redis
        (short where a test pauses it)."""
        from flexserve.shared.connect import client
        from flexserve.shared.presence import Presence

        presence = Presence(client(self.server.url, timeout=timeout), prefix=self.prefix, ttl=ttl)
        await presence.start()
        self._open.append(presence)
        return presence

    async def close(self) -> None:
        for presence in reversed(self._open):
            await presence.close()
            await presence.redis.aclose()
