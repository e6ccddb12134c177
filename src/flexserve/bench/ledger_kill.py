"""A gateway killed with SIGKILL under traffic: is every response its clients
received in the ledger, once, with the tokens they were told?

One round: a fresh home (SQLite, an organization, a key, a price for the
model); ``flexserve serve --engine sim`` as its own process; client threads
sending chat completions (half streamed) without pause; optionally, a
connection from this process holding SQLite's write lock for the last
``lock_seconds`` (the usage writer cannot commit meanwhile); SIGKILL; the
gateway started again on the same home (it replays what it can) and stopped;
then the checker: every response a client received in full (a JSON body, or
a stream up to ``[DONE]``) matched by its ``x-request-id`` to ledger rows.

``flexserve bench ledger-kill`` repeats rounds and writes a report; the
durability tests run single rounds. ``source`` runs another tree's ``src``
(a baseline) the same way.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from flexserve.bench.processes import (
    BenchError,
    Server,
    create_key,
    flexserve_command,
    free_port,
    start_server,
)
from flexserve.bench.report import format_table, host_info

SIM_PROFILE = "h100-llama3-8b"
# USD per 1M tokens: any non-zero price, so that the ledger's costs can be summed.
PRICE_INPUT, PRICE_OUTPUT = "1.00", "4.00"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A response a client received in full."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    stream: bool


@dataclass(frozen=True, slots=True)
class LedgerRow:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int


@dataclass
class RoundResult:
    """One kill, as the checker saw it."""

    lock_db: bool
    num_delivered: int
    num_rows: int  # ledger rows after the restart
    num_lost: int  # delivered, and no ledger row
    num_doubled: int  # request ids with more than one row
    num_token_mismatches: int  # a row whose tokens differ from what the client was told
    num_billed_not_delivered: int  # rows of requests cut by the kill before their end
    tokens_delivered: int
    tokens_billed_of_delivered: int  # the ledger's tokens for the delivered requests
    ledger_cost_pico: int
    lost_ids: list[str] = field(default_factory=list)


def _python_flexserve(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-c", "from flexserve.cli import main; main()", *args]


def prepare_home(home: Path, source: Path | None = None) -> str:
    """An organization, its key and a price for the sim model in ``home``; returns the key."""
    from flexserve.engines.sim import PROFILES

    home.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{home / 'flexserve.db'}"
    env = {"PYTHONPATH": str(source)} if source is not None else {}
    key = create_key(db_url, home, env=env)
    model = PROFILES[SIM_PROFILE].model_id
    args = ["prices", "set", model, "--input", PRICE_INPUT, "--output", PRICE_OUTPUT,
            "--db", db_url, "--home", str(home)]
    argv = _python_flexserve(*args) if source is not None else flexserve_command(*args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, **env})
    if done.returncode != 0:
        raise BenchError(f"flexserve prices set failed: {done.stderr.strip()}")
    return key


def start_gateway(stack: ExitStack, home: Path, name: str, source: Path | None = None,
                  speed: float = 50.0) -> Server:
    """``flexserve serve --engine sim`` on ``home``, as its own process."""
    port = free_port()
    args = ("serve", "--engine", "sim", "--sim-speed", str(speed), "--port", str(port),
            "--home", str(home))
    argv = _python_flexserve(*args) if source is not None else flexserve_command(*args)
    env: dict[str, str | None] = {"FLEXSERVE_BOOTSTRAP_DEMO": "false",
                                  "FLEXSERVE_LOG_LEVEL": "warning"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return start_server(stack, name, argv, port, "/healthz", home, env)


class Traffic:
    """Client threads sending chat completions back to back until stopped or
    the gateway goes away; each keeps what it received in full."""

    def __init__(self, url: str, key: str, model: str, num_clients: int = 6,
                 max_tokens: int = 8) -> None:
        self._url = url
        self._headers = {"Authorization": f"Bearer {key}"}
        self._model = model
        self._max_tokens = max_tokens
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        self.num_failed = 0
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(num_clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self._url, headers=self._headers, timeout=30) as http:
            number = 0
            while not self._stop.is_set():
                number += 1
                stream = (index + number) % 2 == 0
                try:
                    delivery = self._one(http, stream)
                except httpx.HTTPError:
                    delivery = None
                with self._lock:
                    if delivery is None:
                        self.num_failed += 1
                    else:
                        self.deliveries.append(delivery)
                if delivery is None:
                    # Refused or cut off: the gateway is gone or going; a short
                    # pause keeps a dead port from being hammered.
                    self._stop.wait(0.05)

    def _one(self, http: httpx.Client, stream: bool) -> Delivery | None:
        body: dict[str, Any] = {
            "model": self._model, "max_tokens": self._max_tokens,
            "messages": [{"role": "user", "content": "Count the ledger rows, please."}],
        }
        if not stream:
            response = http.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return None
            usage = response.json()["usage"]
            return Delivery(response.headers["x-request-id"], usage["prompt_tokens"],
                            usage["completion_tokens"], False)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return None
            usage = None
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    if usage is None:
                        return None
                    return Delivery(response.headers["x-request-id"], usage["prompt_tokens"],
                                    usage["completion_tokens"], True)
                if line.startswith("data: "):
                    chunk = orjson.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        return None  # cut before [DONE]: not received in full


@contextmanager
def write_lock(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock from another connection (readers go on, writers wait)."""
    blocker = sqlite3.connect(str(db_path), isolation_level=None, timeout=30)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield blocker
    finally:
        blocker.close()  # the open transaction is rolled back


def ledger_rows(db_path: Path) -> list[LedgerRow]:
    with sqlite3.connect(str(db_path)) as db:
        rows = db.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, "
            "input_cost_pico + cached_input_cost_pico + output_cost_pico FROM usage_records"
        ).fetchall()
    return [LedgerRow(*row) for row in rows]


def check(deliveries: list[Delivery], rows: list[LedgerRow], *, lock_db: bool) -> RoundResult:
    """Match what clients received to the ledger by request id."""
    by_id: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_id.setdefault(row.request_id, []).append(row)
    delivered_ids = {d.request_id for d in deliveries}
    lost = [d.request_id for d in deliveries if d.request_id not in by_id]
    mismatches = sum(
        1 for d in deliveries if d.request_id in by_id and any(
            (r.prompt_tokens, r.completion_tokens) != (d.prompt_tokens, d.completion_tokens)
            for r in by_id[d.request_id]
        )
    )
    return RoundResult(
        lock_db=lock_db,
        num_delivered=len(deliveries),
        num_rows=len(rows),
        num_lost=len(lost),
        num_doubled=sum(1 for found in by_id.values() if len(found) > 1),
        num_token_mismatches=mismatches,
        num_billed_not_delivered=len(set(by_id) - delivered_ids),
        tokens_delivered=sum(d.prompt_tokens + d.completion_tokens for d in deliveries),
        tokens_billed_of_delivered=sum(
            r.prompt_tokens + r.completion_tokens
            for d in deliveries for r in by_id.get(d.request_id, [])
        ),
        ledger_cost_pico=sum(r.cost_pico for r in rows),
        lost_ids=lost[:20],
    )


def kill_under_traffic(home: Path, key: str, *, traffic_seconds: float, lock_seconds: float,
                       source: Path | None = None, num_clients: int = 6) -> list[Delivery]:
    """Start a gateway on ``home``, send traffic, hold the write lock for the
    last ``lock_seconds`` (0: none), SIGKILL it; returns what clients received."""
    from flexserve.engines.sim import PROFILES

    with ExitStack() as stack:
        gateway = start_gateway(stack, home, "gateway-killed", source)
        traffic = Traffic(gateway.url, key, PROFILES[SIM_PROFILE].model_id, num_clients)
        traffic.start()
        try:
            time.sleep(max(0.0, traffic_seconds - lock_seconds))
            with ExitStack() as lock:
                if lock_seconds > 0:
                    lock.enter_context(write_lock(home / "flexserve.db"))
                    time.sleep(lock_seconds)
                os.killpg(gateway.pid, signal.SIGKILL)
                gateway.process.wait(timeout=10)
        finally:
            traffic.stop()
    if not traffic.deliveries:
        raise BenchError("no response was delivered before the kill:\n" + gateway.log_tail())
    return traffic.deliveries


def restart_once(home: Path, source: Path | None = None) -> None:
    """Start the gateway on ``home`` again (it replays its journal before it
    answers /healthz), then stop it cleanly."""
    with ExitStack() as stack:
        start_gateway(stack, home, "gateway-restarted", source)


def run_round(work_dir: Path, *, lock_db: bool, traffic_seconds: float, lock_seconds: float,
              source: Path | None = None) -> RoundResult:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work_dir))
    key = prepare_home(home, source)
    deliveries = kill_under_traffic(home, key, traffic_seconds=traffic_seconds,
                                    lock_seconds=lock_seconds if lock_db else 0.0, source=source)
    restart_once(home, source)
    return check(deliveries, ledger_rows(home / "flexserve.db"), lock_db=lock_db)


@dataclass(frozen=True)
class LedgerKillConfig:
    repeats: int = 5
    traffic_seconds: float = 3.0  # traffic before the kill, the lock included
    lock_seconds: float = 2.0  # the write lock held before the kill, in the locked rounds
    baseline_src: Path | None = None  # another tree's `src`, run the same way


def run_ledger_kill(config: LedgerKillConfig) -> dict[str, Any]:
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if config.baseline_src is not None:
        trees.append(("baseline", config.baseline_src))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flexserve-ledger-kill-") as work:
        for repeat in range(config.repeats):
            for lock_db in (False, True):
                for tree, source in trees:
                    result = run_round(Path(work), lock_db=lock_db,
                                       traffic_seconds=config.traffic_seconds,
                                       lock_seconds=config.lock_seconds, source=source)
                    results.append({"tree": tree, "repeat": repeat + 1, **asdict(result)})
    return {
        "benchmark": "ledger-kill",
        "host": host_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "rounds": results,
    }


def format_report(report: dict[str, Any]) -> str:
    header = ["tree", "db locked", "round", "delivered", "ledger rows", "lost", "doubled",
              "tokens delivered", "tokens billed", "token mismatches", "billed, cut by kill"]
    rows = [
        [r["tree"], "yes" if r["lock_db"] else "no", r["repeat"], r["num_delivered"], r["num_rows"],
         r["num_lost"], r["num_doubled"], r["tokens_delivered"], r["tokens_billed_of_delivered"],
         r["num_token_mismatches"], r["num_billed_not_delivered"]]
        for r in sorted(report["rounds"], key=lambda r: (r["tree"], r["lock_db"], r["repeat"]))
    ]
    return format_table(header, rows)
