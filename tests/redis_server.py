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
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

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


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (str(p) for p in (Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server")) if p.exists()),
        None,
    )


class RedisServer:
    """One running ``redis-server``; ``pause``/``resume`` freeze it (SIGSTOP/SIGCONT)."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self._root = Path(tempfile.mkdtemp(prefix="flexserve-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self._root / "redis.log", "wb")  # noqa: SIM115 - the server's for its life
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._root), "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self._root / 'redis.log').read_text()}")
            time.sleep(0.05)

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            if self._process is not None:
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
