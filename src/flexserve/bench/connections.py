"""Connections held at the cap, and what they cost: ``python -m flexserve.bench.connections``.

A gateway (``flexserve serve`` in front of an instant sim engine) is flooded
with slow-header connections, each sending a request line and never the rest
of its headers, from several loopback addresses (so that the total cap, not
the per-client one, is what they meet), up to ``--extra`` past the cap:

- **held**: connections that got no answer, i.e. the gateway holds them;
- **refused**: connections answered 503 ``too_many_connections``;
- the gateway's RSS (``/proc/PID/status``) idle and at the cap;
- what ``/healthz`` gets at the cap, and that it is served once they close.

For the hold, the header and keep-alive timeouts are lifted (else the flood
would be cut while it is still being opened). A second run on the default
timeouts opens ``--num-timed`` such connections and reports how long the
gateway took to close them all.

``--protocol-cost`` measures instead what the guarded protocol adds per
request over uvicorn's own, in process: a chat request fed to each protocol
(whole, and headers and body in two reads) and answered by a trivial ASGI
app, CPU time per request, the minimum over interleaved trials.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flexserve.bench.loadgen import run_on_uvloop
from flexserve.bench.processes import (
    proc_status,
    raise_nofile_limit,
    start_gateway,
    start_sim_engine,
)
from flexserve.bench.report import format_table, host_info, write_json

_SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
_SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: flexserve\r\n"
_CONNECT_BATCH = 200
_REFUSED = re.compile(rb'^flexserve_connections_refused_total\{reason="(\w+)"\} ([0-9.e+]+)$', re.M)


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        return None
    writer.write(_SLOW_HEAD)
    return reader, writer


async def _flood(port: int, num: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, num, _CONNECT_BATCH):
        batch = await asyncio.gather(*(
            _open(port, _SOURCES[i % len(_SOURCES)]) for i in range(start, min(num, start + _CONNECT_BATCH))
        ))
        opened += [c for c in batch if c is not None]
    return opened


async def _answer(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sent before closing, or None if it still holds the connection."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        return None
    except OSError:
        return b""


async def _http_get(port: int, path: str, source: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: flexserve\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _close_all(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in connections:
        writer.transport.abort()


async def _hold_at_cap(port: int, pid: int, num: int) -> dict[str, Any]:
    rss_idle = proc_status(pid)["VmRSS"]
    started = time.monotonic()
    connections = await _flood(port, num)
    open_seconds = time.monotonic() - started
    answers = await asyncio.gather(*(_answer(r, 2.0) for r, _ in connections))
    status = proc_status(pid)
    healthz_at_cap = (await _http_get(port, "/healthz", "127.0.0.200")).split(b"\r\n", 1)[0]
    held = sum(1 for a in answers if a is None)
    refused = sum(1 for a in answers if a is not None and a.startswith(b"HTTP/1.1 503"))
    _close_all(connections)
    recovered = time.monotonic()
    while not (await _http_get(port, "/healthz")).startswith(b"HTTP/1.1 200"):
        await asyncio.sleep(0.1)  # another process's state: nothing to wait on but a poll
    metrics = await _http_get(port, "/metrics")
    return {
        "opened": len(connections),
        "open_seconds": round(open_seconds, 2),
        "held": held,
        "refused_503": refused,
        # Refused past the bound on lingering refusals: closed right after the
        # 503 was written, which unread request bytes turn into a reset.
        "closed_unanswered": sum(1 for a in answers if a == b""),
        "other_answers": sum(1 for a in answers if a and not a.startswith(b"HTTP/1.1 503")),
        "refused_by_reason": {m[0].decode(): float(m[1]) for m in _REFUSED.findall(metrics)},
        "rss_mib": {"idle": round(rss_idle / 1024, 1), "at_cap": round(status["VmRSS"] / 1024, 1),
                    "peak": round(status["VmHWM"] / 1024, 1)},
        "rss_per_held_kib": round((status["VmRSS"] - rss_idle) / max(held, 1), 2),
        "healthz_at_cap": healthz_at_cap.decode(),
        "healthz_ok_after_close_seconds": round(time.monotonic() - recovered, 2),
    }


async def _timed_out(port: int, num: int) -> dict[str, Any]:
    started = time.monotonic()
    connections = await _flood(port, num)
    answers = await asyncio.gather(*(_answer(r, 120.0) for r, _ in connections))
    closed_after = time.monotonic() - started
    _close_all(connections)
    return {
        "opened": len(connections),
        "closed_by_gateway": sum(1 for a in answers if a is not None),
        "answered_408": sum(1 for a in answers if a and a.startswith(b"HTTP/1.1 408")),
        "all_closed_after_seconds": round(closed_after, 2),
    }


def run(max_connections: int, extra: int, num_timed: int, log_dir: Path) -> dict[str, Any]:
    nofile = raise_nofile_limit()
    report: dict[str, Any] = {"host": host_info(), "bench_nofile": nofile,
                              "max_connections": max_connections}
    with ExitStack() as stack:
        engine = start_sim_engine(stack, log_dir, profile="instant")
        lifted = {"max_connections": str(max_connections), "header_timeout": "600",
                  "keep_alive_timeout": "600"}
        gateway, _ = start_gateway(stack, log_dir, engine.url, settings=lifted, name="capped")
        port = int(gateway.url.rsplit(":", 1)[1])
        report["at_cap"] = run_on_uvloop(lambda: _hold_at_cap(port, gateway.pid, max_connections + extra))
        gateway.stop()
        if num_timed:
            defaults, _ = start_gateway(stack, log_dir, engine.url, name="defaults")
            port = int(defaults.url.rsplit(":", 1)[1])
            report["default_timeouts"] = run_on_uvloop(lambda: _timed_out(port, num_timed))
    return report


def format_report(report: dict[str, Any]) -> str:
    cap = report["at_cap"]
    rows = [
        ("opened", cap["opened"]), ("held", cap["held"]), ("refused 503", cap["refused_503"]),
        ("closed, no answer read", cap["closed_unanswered"]), ("other answers", cap["other_answers"]),
        ("RSS idle MiB", cap["rss_mib"]["idle"]), ("RSS at cap MiB", cap["rss_mib"]["at_cap"]),
        ("RSS per held KiB", cap["rss_per_held_kib"]), ("/healthz at cap", cap["healthz_at_cap"]),
        ("/healthz 200 after close, s", cap["healthz_ok_after_close_seconds"]),
    ]
    timed = report.get("default_timeouts")
    if timed:
        rows += [("default timeouts: opened", timed["opened"]),
                 ("  closed by gateway (408)", f"{timed['closed_by_gateway']} ({timed['answered_408']})"),
                 ("  all closed after, s", timed["all_closed_after_seconds"])]
    return format_table((f"max_connections={report['max_connections']}", "value"), rows)


async def _protocol_cost(trials: int, num_requests: int = 4000) -> dict[str, float]:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from flexserve.api.connections import ConnectionGuard, ConnectionLimits

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    class Transport(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: flexserve\r\nAuthorization: Bearer sk-x\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    config = Config(app, lifespan="off", access_log=False, log_level="warning")
    config.load()
    limits = ConnectionLimits(16_000, 12_000, 10.0, 60.0, 5.0)
    protocols: dict[str, Callable[..., Any]] = {
        "uvicorn": HttpToolsProtocol, "guarded": ConnectionGuard(limits).protocol_class(),
    }
    best: dict[str, float] = {}
    for _ in range(trials):
        for name, cls in protocols.items():
            for split, reads in (("whole", [head + body]), ("two_reads", [head, body])):
                protocol = cls(config=config, server_state=ServerState(), app_state={})
                protocol.connection_made(Transport())
                started = time.process_time()
                for _ in range(num_requests):
                    for data in reads:
                        protocol.data_received(data)
                    # The ASGI task runs, answers, and the cycle completes.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                per_request = (time.process_time() - started) / num_requests * 1e6
                key = f"{name}_{split}_us"
                best[key] = round(min(best.get(key, math.inf), per_request), 2)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--max-connections", type=int, default=16_000,
                        help="The gateway's cap (default: the setting's default, 16000).")
    parser.add_argument("--extra", type=int, default=1_000, help="Connections opened past the cap.")
    parser.add_argument("--num-timed", type=int, default=2_000,
                        help="Slow-header connections opened on the default timeouts (0: skip).")
    parser.add_argument("--protocol-cost", action="store_true",
                        help="Measure the guarded protocol's cost per request instead.")
    parser.add_argument("--trials", type=int, default=40, help="With --protocol-cost: trials.")
    parser.add_argument("--out", type=Path, default=Path("reports/connections.json"))
    args = parser.parse_args()
    if args.protocol_cost:
        cost = run_on_uvloop(lambda: _protocol_cost(args.trials))
        write_json(args.out, {"host": host_info(), "protocol_cost": cost})
        print(format_table(("CPU per request", "µs"), sorted(cost.items())))
        print(f"report: {args.out}")
        return
    with tempfile.TemporaryDirectory(prefix="flexserve-bench-") as tmp:
        report = run(args.max_connections, args.extra, args.num_timed, Path(tmp))
    write_json(args.out, report)
    print(format_report(report))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
