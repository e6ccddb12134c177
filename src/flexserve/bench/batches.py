"""``flexserve bench batches``: what the Batch API costs, and how it survives a kill.

Three figures, each from its own gateway process (``flexserve serve --engine
upstream``) in front of a sim engine (``flexserve sim-engine``), on loopback:

- **throughput**: one batch of ``throughput_lines`` chat completions, from
  ``POST /v1/batches`` to ``completed``, against the same request bodies sent
  straight to the engine by a concurrent client holding as many requests in
  flight as the engine batches (``max_num_seqs``), on the same engine;
- **memory**: the gateway's RSS (``/proc/PID/status``, every 0.2 s) before,
  at its peak and after one batch of ``lines`` lines, from the upload to the
  output file, on an engine run ``fast_speed`` times faster than real time so
  that the gateway, not the engine, sets the pace;
- **restart**: a batch on that fast engine, ``SIGKILL`` of the gateway once
  ``kill_after`` of its lines are completed, a restart on the same home and
  port, and the times to the first answer, to ``/healthz`` and to the first
  line completed after the kill; then whether every ``custom_id`` is in the
  output once and the ledger holds one ``batch`` row per output line, and
  how many engine requests the batch took beyond its lines (the sim engine's
  time-to-first-token count: requests that started generating).

Every batch is checked the same way at its end (``_verify``); the figures and
the Markdown report come from ``bench/batches_report.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from flexserve.bench.batches_report import (
    FINAL,
    batch_check,
    phase_seconds,
    rss_figures,
    summarize_kill,
)
from flexserve.bench.processes import (
    BenchError,
    Server,
    cpu_seconds,
    create_key,
    flexserve_command,
    free_port,
    proc_status,
    start_server,
    start_sim_engine,
)
from flexserve.bench.report import host_info

# Seconds between reads of a running batch: each read is a request the gateway
# serves beside the batch, at a cost that grows with the batch's lines.
_WATCH_INTERVAL = 0.25
_RSS_INTERVAL = 0.2
# Longest wait for a batch to end, and for the usage writer to land its rows.
_BATCH_TIMEOUT = 1800.0
_LEDGER_TIMEOUT = 15.0


@dataclass(frozen=True)
class BatchesConfig:
    throughput_lines: int = 10_000  # the throughput batch, and the direct run's requests
    lines: int = 50_000  # the batch whose gateway memory is sampled
    kill_lines: int = 10_000  # the batch whose gateway is killed
    kill_after: float = 0.25  # share of the kill batch completed before SIGKILL
    max_tokens: int = 16
    profile: str = "h100-llama3-8b"
    speed: float = 1.0  # the throughput figure's engine
    fast_speed: float = 10.0  # the memory and restart figures' engine
    max_num_seqs: int = 32  # engine batch, the gateway's upstream_capacity, direct concurrency
    settle: float = 2.0  # seconds the gateway idles before and after the memory batch
    log_dir: Path | None = None  # keep the servers' logs and databases here
    command: str = ""


QUICK = BatchesConfig(throughput_lines=40, lines=60, kill_lines=200, kill_after=0.1, settle=0.5)


@dataclass
class _Home:
    """A gateway's home (SQLite, an organization and its key) and the port it
    listens on, so that it can be started again where it was."""

    path: Path
    upstream: str
    max_num_seqs: int
    key: str = ""
    port: int = field(default_factory=free_port)

    @property
    def db_path(self) -> Path:
        return self.path / "flexserve.db"

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.key = create_key(f"sqlite:///{self.db_path}", self.path)

    def start(self, stack: ExitStack, log_dir: Path, name: str) -> Server:
        env: dict[str, str | None] = {
            "FLEXSERVE_BOOTSTRAP_DEMO": "false", "FLEXSERVE_LOG_LEVEL": "warning",
            "FLEXSERVE_UPSTREAM_CAPACITY": str(self.max_num_seqs),
        }
        argv = flexserve_command(
            "serve", "--engine", "upstream", "--upstream", self.upstream, "--port", str(self.port),
            "--db", f"sqlite:///{self.db_path}", "--home", str(self.path),
        )
        return start_server(stack, name, argv, self.port, "/healthz", log_dir, env)


class _Api:
    """The Files and Batches endpoints, as a client calls them."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(base_url=url + "/v1", timeout=300,
                                 headers={"Authorization": f"Bearer {key}"})

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _ok(self, response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            raise BenchError(f"{response.request.method} {response.request.url.path}: "
                             f"{response.status_code} {response.text[:500]}")
        return response

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        document: dict[str, Any] = self._ok(response).json()
        return document

    def upload(self, path: Path) -> str:
        with path.open("rb") as content:
            response = self.http.post("/files", data={"purpose": "batch"},
                                      files={"file": (path.name, content, "application/jsonl")})
        return str(self._json(response)["id"])

    def create(self, file_id: str) -> dict[str, Any]:
        return self._json(self.http.post("/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/batches/{batch_id}"))

    def content(self, file_id: str) -> bytes:
        return self._ok(self.http.get(f"/files/{file_id}/content")).content


def _bodies(num_lines: int, model: str, max_tokens: int) -> list[dict[str, Any]]:
    return [{"model": model, "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": f"Question {i}: summarise line {i} of the "
                           "batch in a few words."}]}
            for i in range(num_lines)]


def _write_input(path: Path, bodies: list[dict[str, Any]]) -> list[str]:
    """The batch input file; returns its custom ids."""
    custom_ids = [f"line-{i}" for i in range(len(bodies))]
    with path.open("wb") as out:
        for custom_id, body in zip(custom_ids, bodies, strict=True):
            out.write(orjson.dumps({"custom_id": custom_id, "method": "POST",
                                    "url": "/v1/chat/completions", "body": body}) + b"\n")
    return custom_ids


class _Sampler:
    """Reads a value every ``interval`` seconds in a thread, tagged with the
    phase the benchmark says it is in."""

    def __init__(self, read: Callable[[], float | None], interval: float, phase: str = "") -> None:
        self._read = read
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.phase = phase
        self.samples: list[tuple[float, str, float]] = []  # (monotonic time, phase, value)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._read()
            except (OSError, KeyError, ValueError, httpx.HTTPError):
                value = None  # the process is gone or answered nothing readable
            if value is not None:
                self.samples.append((time.monotonic(), self.phase, value))
            self._stop.wait(self._interval)

    def values(self, phase: str | None = None) -> list[float]:
        return [v for _, p, v in self.samples if phase is None or p == phase]


def _engine_metrics(url: str) -> dict[str, float]:
    """The sim engine's running batch, and the requests that started generating."""
    wanted = {"vllm:num_requests_running": "running",
              "vllm:time_to_first_token_seconds_count": "requests_started"}
    found: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.partition("{")[0]
        if name in wanted:
            found[wanted[name]] = float(line.rpartition(" ")[2])
    return found


def _watch(api: _Api, batch_id: str, interval: float, sampler: _Sampler | None = None,
           until: Callable[[dict[str, Any]], bool] | None = None) -> tuple[dict[str, Any],
                                                                          dict[str, float]]:
    """Read the batch until it ends (or ``until`` holds); returns it and the
    time each status was first seen."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + _BATCH_TIMEOUT
    while True:
        batch = api.batch(batch_id)
        seen.setdefault(batch["status"], time.monotonic())
        if sampler is not None:
            sampler.phase = batch["status"]
        if batch["status"] in FINAL or (until is not None and until(batch)):
            return batch, seen
        if time.monotonic() > deadline:
            raise BenchError(f"batch {batch_id} still {batch['status']} after {_BATCH_TIMEOUT:.0f} s")
        # The gateway is another process: there is no event to wait on.
        time.sleep(interval)


def _ledger(db_path: Path, batch_id: str, expected: int) -> list[tuple[str, int]]:
    """The batch's usage rows (served tier, queue time in ms), once the usage
    writer has landed at least ``expected`` and stopped adding, or the wait is over."""
    pattern = "req_" + batch_id.removeprefix("batch_") + "_%"
    deadline = time.monotonic() + _LEDGER_TIMEOUT
    previous = -1
    while True:
        with _read_only(db_path) as db:
            rows = db.execute("SELECT served_tier, queue_time_ms FROM usage_records "
                              "WHERE request_id LIKE ?", (pattern,)).fetchall()
        if (len(rows) >= expected and len(rows) == previous) or time.monotonic() > deadline:
            return rows
        previous = len(rows)
        time.sleep(0.5)  # longer than the usage writer's flush interval


def _verify(api: _Api, db_path: Path, batch: dict[str, Any], custom_ids: list[str]) -> dict[str, Any]:
    output = api.content(batch["output_file_id"]) if batch.get("output_file_id") else b""
    ledger = _ledger(db_path, batch["id"], output.count(b"\n"))
    return batch_check(batch, output, custom_ids, ledger)


def _run_batch(api: _Api, work: Path, name: str, bodies: list[dict[str, Any]],
               sampler: _Sampler | None, interval: float) -> tuple[dict[str, Any], list[str],
                                                                   dict[str, float]]:
    """Upload, create, run to the end; the final batch, its custom ids, and times."""
    path = work / f"{name}.jsonl"
    custom_ids = _write_input(path, bodies)
    if sampler is not None:
        sampler.phase = "upload"
    began = time.monotonic()
    file_id = api.upload(path)
    created = time.monotonic()
    if sampler is not None:
        sampler.phase = "validating"  # from the create on
    batch_id = api.create(file_id)["id"]
    batch, seen = _watch(api, batch_id, interval, sampler)
    return batch, custom_ids, {"began": began, "created": created, **seen}


async def _direct(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The bodies straight to the engine, ``concurrency`` at a time."""
    pending = iter(bodies)
    outcome = Counter[str]()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def client() -> None:
            for body in pending:
                try:
                    response = await http.post("/v1/chat/completions", content=orjson.dumps(body),
                                               headers={"Content-Type": "application/json"})
                    outcome["ok" if response.status_code == 200 else str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    outcome[type(exc).__name__] += 1

        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.monotonic() - began
    return {"requests": len(bodies), "ok": outcome.pop("ok", 0), "errors": dict(outcome),
            "seconds": round(seconds, 2), "lines_per_s": round(len(bodies) / seconds, 1)}


def _throughput(config: BatchesConfig, log_dir: Path, model: str) -> dict[str, Any]:
    bodies = _bodies(config.throughput_lines, model, config.max_tokens)
    with ExitStack() as stack:
        engine = start_sim_engine(stack, log_dir, profile=config.profile, speed=config.speed,
                                  max_num_seqs=config.max_num_seqs)
        engine_cpu, client_cpu = cpu_seconds(engine.pid), time.process_time()
        with _Sampler(lambda: _engine_metrics(engine.url)["running"], 0.25) as running:
            direct = asyncio.run(_direct(engine.url, bodies, config.max_num_seqs))
        direct |= {"engine_running_mean": _mean(running.values()),
                   "engine_cpu_s": round(cpu_seconds(engine.pid) - engine_cpu, 2),
                   "client_cpu_s": round(time.process_time() - client_cpu, 2)}
        _progress(f"direct: {direct['lines_per_s']} requests/s")
        home = _Home(log_dir / "throughput-home", engine.url, config.max_num_seqs)
        home.create()
        gateway = home.start(stack, log_dir, "gateway-throughput")
        api = stack.enter_context(_Api(gateway.url, home.key))
        calls_before = _engine_metrics(engine.url)
        cpu_before, engine_cpu = cpu_seconds(gateway.pid), cpu_seconds(engine.pid)
        with _Sampler(lambda: _engine_metrics(engine.url)["running"], 0.25) as running:
            batch, custom_ids, times = _run_batch(api, log_dir, "throughput", bodies, running,
                                                  _WATCH_INTERVAL)
        cpu, engine_cpu = cpu_seconds(gateway.pid) - cpu_before, cpu_seconds(engine.pid) - engine_cpu
        calls = _engine_metrics(engine.url)
        result = {
            **phase_seconds(times, len(bodies)),
            "engine_running_mean": _mean(running.values("in_progress")),
            "gateway_cpu_s": round(cpu, 2), "engine_cpu_s": round(engine_cpu, 2),
            "engine_requests_started": int(calls["requests_started"]
                                           - calls_before["requests_started"]),
            "check": _verify(api, home.db_path, batch, custom_ids),
        }
    _progress(f"batch: {result['lines_per_s']} lines/s")
    return {"direct": direct, "batch": result}


def _memory(config: BatchesConfig, log_dir: Path, home: _Home, model: str) -> dict[str, Any]:
    bodies = _bodies(config.lines, model, config.max_tokens)
    with ExitStack() as stack:
        gateway = home.start(stack, log_dir, "gateway-memory")
        api = stack.enter_context(_Api(gateway.url, home.key))
        with _Sampler(lambda: proc_status(gateway.pid)["VmRSS"] / 1024, _RSS_INTERVAL, "before") as rss:
            time.sleep(config.settle)
            batch, custom_ids, times = _run_batch(api, log_dir, "memory", bodies, rss,
                                                  _WATCH_INTERVAL)
            rss.phase = "after"
            time.sleep(config.settle)
        high_water = proc_status(gateway.pid).get("VmHWM", 0) / 1024
        _progress(f"memory: peak RSS {max(rss.values()):.1f} MiB")
        return {**phase_seconds(times, len(bodies)),
                "input_file_mib": round((log_dir / "memory.jsonl").stat().st_size / 2**20, 1),
                "rss_mib": rss_figures(rss.samples, high_water),
                "check": _verify(api, home.db_path, batch, custom_ids)}


def _read_only(db_path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30))


def _lines(db_path: Path, batch_id: str) -> dict[str, Any]:
    """The batch's ``completed`` count, its lines by state, the lines done and
    each line's claims, from the database."""
    with _read_only(db_path) as db:
        (completed,) = db.execute("SELECT completed FROM batches WHERE id = ?",
                                  (batch_id,)).fetchone()
        rows = db.execute("SELECT line, state, attempts FROM batch_lines WHERE batch_id = ?",
                          (batch_id,)).fetchall()
    return {"completed": int(completed), "states": dict(Counter(state for _, state, _ in rows)),
            "done": {line for line, state, _ in rows if state == "done"},
            "attempts": {line: attempts for line, _, attempts in rows}}


def _probe(url: str, key: str, batch_id: str, completed_at_kill: int, times: dict[str, float],
           refusals: Counter[int], stop: threading.Event) -> None:
    """From the restart on: when the gateway first answers (and with what
    until it can read the batch), and when the batch first shows a line
    completed after the kill."""
    with httpx.Client(base_url=url + "/v1", timeout=5,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        while not stop.is_set():
            try:
                response = http.get(f"/batches/{batch_id}")
            except httpx.HTTPError:
                stop.wait(0.01)  # not listening yet
                continue
            now = time.monotonic()
            times.setdefault("answered", now)
            if response.status_code != 200:
                refusals[response.status_code] += 1
            else:
                times.setdefault("answered_ok", now)
                batch = response.json()
                if batch["request_counts"]["completed"] > completed_at_kill or batch["status"] in FINAL:
                    times["resumed"] = now
                    return
            stop.wait(0.05)


def _restart(config: BatchesConfig, log_dir: Path, home: _Home, engine_url: str,
             model: str) -> dict[str, Any]:
    bodies = _bodies(config.kill_lines, model, config.max_tokens)
    path = log_dir / "kill.jsonl"
    custom_ids = _write_input(path, bodies)
    calls_before = _engine_metrics(engine_url)
    threshold = max(1, int(config.kill_after * len(bodies)))
    with ExitStack() as stack:
        gateway = home.start(stack, log_dir, "gateway-killed")
        with _Api(gateway.url, home.key) as api:
            batch_id = api.create(api.upload(path))["id"]
            batch, _ = _watch(api, batch_id, 0.02,
                              until=lambda b: b["request_counts"]["completed"] >= threshold)
        if batch["status"] in FINAL:
            raise BenchError(f"the batch ended before {threshold} lines were completed: "
                             "give more --kill-lines")
        killed_at = time.monotonic()
        os.killpg(gateway.pid, signal.SIGKILL)
        gateway.process.wait(timeout=10)
    at_kill = _lines(home.db_path, batch_id)
    times: dict[str, float] = {"killed": killed_at}
    refusals = Counter[int]()
    stop = threading.Event()
    probe = threading.Thread(target=_probe, daemon=True, args=(
        f"http://127.0.0.1:{home.port}", home.key, batch_id, at_kill["completed"], times,
        refusals, stop))
    with ExitStack() as stack:
        times["restarted"] = time.monotonic()
        probe.start()
        try:
            gateway = home.start(stack, log_dir, "gateway-restarted")
            times["healthy"] = time.monotonic()
            probe.join(timeout=120)
        finally:
            stop.set()
        with _Api(gateway.url, home.key) as api:
            batch, _ = _watch(api, batch_id, _WATCH_INTERVAL)
            check = _verify(api, home.db_path, batch, custom_ids)
    calls = _engine_metrics(engine_url)
    _progress(f"restart: a line completed {times.get('resumed', 0) - killed_at:.2f} s after the kill")
    return summarize_kill(
        lines=len(bodies), threshold=threshold, at_kill=at_kill, times=times, refusals=refusals,
        attempts=_lines(home.db_path, batch_id)["attempts"], check=check,
        engine_requests=int(calls["requests_started"] - calls_before["requests_started"]),
    )


def run_batches(config: BatchesConfig) -> dict[str, Any]:
    """The three figures, each on its own gateway; returns the report."""
    from flexserve.engines.sim import PROFILES

    if config.profile not in PROFILES:
        raise BenchError(f"unknown sim profile {config.profile!r}; choose from {', '.join(PROFILES)}")
    model = PROFILES[config.profile].model_id
    with ExitStack() as outer:
        if config.log_dir is not None:
            log_dir = config.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(outer.enter_context(tempfile.TemporaryDirectory(prefix="bench-batches-")))
        throughput = _throughput(config, log_dir, model)
        with ExitStack() as stack:
            engine = start_sim_engine(stack, log_dir, profile=config.profile,
                                      speed=config.fast_speed, max_num_seqs=config.max_num_seqs)
            home = _Home(log_dir / "memory-home", engine.url, config.max_num_seqs)
            home.create()
            memory = _memory(config, log_dir, home, model)
            restart = _restart(config, log_dir, home, engine.url, model)
    return {
        "benchmark": "batches",
        "command": config.command,
        "host": host_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "throughput": throughput,
        "memory": memory,
        "restart": restart,
    }


def _progress(message: str) -> None:
    print(f"bench batches: {message}", file=sys.stderr, flush=True)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None
