"""A verification flood: what many identity-document submissions do to the gateway.

Each ``POST /v1/organization/verification`` hashes the document with scrypt
(16 MiB, tens of milliseconds of CPU). Here ``num_orgs`` organizations' admins
send ``num_calls`` submissions between them at ``rate`` a second (at most
``concurrency`` at a time; rate 0: as fast as that allows), to a gateway (in front of an instant sim engine) while another tenant calls
``GET /v1/models`` back to back on one connection. Reported:

- the gateway's RSS before, at its peak and ``settle`` seconds after the
  flood (``/proc/PID/status``);
- the other tenant's ``GET /v1/models`` latency, alone and during the flood;
- the flood's status codes (a 500 is a failure; 429 and 503 are the gateway
  defending itself).

``--baseline-src DIR`` runs another tree's ``src`` instead (for a before and
after)::

    .venv/bin/python -m flexserve.bench.verification_flood          # reports/verification-flood.json
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from flexserve.accounts import Accounts
from flexserve.bench.processes import Server, proc_status, start_gateway, start_sim_engine
from flexserve.bench.report import format_table, host_info, summary_ms, write_json
from flexserve.store.database import Database


@dataclass(frozen=True)
class FloodConfig:
    num_calls: int = 300
    # Submissions started per second; 0: as fast as ``concurrency`` allows.
    # A fixed rate puts the same load on a gateway that refuses fast and on
    # one that hashes every call, so their tenants' latencies compare.
    rate: float = 30.0
    concurrency: int = 32
    # Organizations the submissions are spread over (round robin).
    num_orgs: int = 1
    # Seconds of GET /v1/models alone, before the flood.
    baseline: float = 3.0
    # Seconds after the flood before the RSS is read again.
    settle: float = 3.0


async def _admin_keys(db_url: str, num_orgs: int) -> list[str]:
    db = Database.from_url(db_url)
    try:
        await db.migrate()
        accounts = Accounts(db)
        keys = []
        for index in range(num_orgs):
            name = f"flood-{index}"
            await accounts.create_org(name)
            keys.append((await accounts.create_key(name, admin=True))[1])
        return keys
    finally:
        await db.close()


def _document() -> dict[str, str]:
    return {"document_type": "passport", "country": "FR", "number": secrets.token_hex(6).upper()}


class _RssSampler:
    """The gateway's highest RSS while running, read every 20 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, proc_status(self._pid)["VmRSS"])


async def _probe_models(client: httpx.AsyncClient, key: str, until: asyncio.Event) -> list[float]:
    latencies = []
    headers = {"Authorization": f"Bearer {key}"}
    while not until.is_set():
        started = time.perf_counter()
        response = await client.get("/v1/models", headers=headers)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"GET /v1/models: {response.status_code} {response.text}")
    return latencies


async def _flood(
    gateway: Server, tenant_key: str, admin_keys: list[str], config: FloodConfig
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=config.concurrency + 1)
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=120, limits=limits) as flood_client,
        httpx.AsyncClient(base_url=gateway.url, timeout=120) as tenant_client,
    ):
        alone = asyncio.Event()
        probe = asyncio.create_task(_probe_models(tenant_client, tenant_key, alone))
        await asyncio.sleep(config.baseline)
        alone.set()
        latencies_alone = await probe
        rss_before = proc_status(gateway.pid)["VmRSS"]

        statuses: Counter[int | str] = Counter()
        retry_after_missing = 0
        gate = asyncio.Semaphore(config.concurrency)

        async def submit(index: int) -> None:
            nonlocal retry_after_missing
            key = admin_keys[index % len(admin_keys)]
            if config.rate > 0:
                await asyncio.sleep(max(0.0, started + index / config.rate - time.perf_counter()))
            async with gate:
                try:
                    response = await flood_client.post(
                        "/v1/organization/verification",
                        json=_document(),
                        headers={"Authorization": f"Bearer {key}"},
                    )
                except httpx.TransportError as exc:
                    # The server closed the connection (as uvicorn does after an
                    # unhandled exception): counted, not fatal to the run.
                    statuses[type(exc).__name__] += 1
                    return
            statuses[response.status_code] += 1
            if response.status_code in (429, 503) and "retry-after" not in response.headers:
                retry_after_missing += 1

        flooding = asyncio.Event()
        started = time.perf_counter()
        with _RssSampler(gateway.pid) as sampler:
            probe = asyncio.create_task(_probe_models(tenant_client, tenant_key, flooding))
            await asyncio.gather(*(submit(i) for i in range(config.num_calls)))
            flood_seconds = time.perf_counter() - started
            flooding.set()
            latencies_flood = await probe
        await asyncio.sleep(config.settle)
        rss_after = proc_status(gateway.pid)["VmRSS"]
    return {
        "flood_seconds": round(flood_seconds, 3),
        "statuses": {str(code): count for code, count in sorted(statuses.items(), key=str)},
        "refusals_without_retry_after": retry_after_missing,
        "rss_mib": {
            "before": round(rss_before / 1024, 1),
            "peak": round(max(sampler.peak_kib, rss_before) / 1024, 1),
            "after": round(rss_after / 1024, 1),
        },
        "models_latency_ms": {
            "alone": {"n": len(latencies_alone), **(summary_ms(latencies_alone) or {})},
            "during_flood": {"n": len(latencies_flood), **(summary_ms(latencies_flood) or {})},
        },
    }


def run(
    config: FloodConfig, *, baseline_src: Path | None = None, log_dir: Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flexserve-flood-") as tmp, ExitStack() as stack:
        log_dir = log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        engine = start_sim_engine(stack, log_dir, profile="instant")
        gateway, tenant_key = start_gateway(
            stack, log_dir, engine.url + "/v1", source=baseline_src
        )
        db_url = f"sqlite:///{log_dir / 'flexserve-home' / 'flexserve.db'}"
        admin_keys = asyncio.run(_admin_keys(db_url, config.num_orgs))
        result = asyncio.run(_flood(gateway, tenant_key, admin_keys, config))
    return {
        "benchmark": "verification-flood",
        "config": asdict(config),
        "source": str(baseline_src) if baseline_src else "this tree",
        "host": host_info(),
        **result,
    }


def table(report: dict[str, Any]) -> str:
    rss = report["rss_mib"]
    alone = report["models_latency_ms"]["alone"]
    flood = report["models_latency_ms"]["during_flood"]
    return format_table(
        ["", "value"],
        [
            ["RSS before (MiB)", rss["before"]],
            ["RSS peak (MiB)", rss["peak"]],
            ["RSS after (MiB)", rss["after"]],
            ["GET /v1/models alone p50 (ms)", alone.get("p50")],
            ["GET /v1/models alone p99 (ms)", alone.get("p99")],
            ["GET /v1/models in flood p50 (ms)", flood.get("p50")],
            ["GET /v1/models in flood p99 (ms)", flood.get("p99")],
            ["flood seconds", report["flood_seconds"]],
            ["statuses", " ".join(f"{c}×{n}" for c, n in report["statuses"].items())],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = FloodConfig()
    parser.add_argument("--calls", type=int, default=defaults.num_calls)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="Calls per second; 0: unpaced.")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--orgs", type=int, default=defaults.num_orgs)
    parser.add_argument("--baseline-src", type=Path, help="Another tree's src folder to run instead.")
    parser.add_argument("--log-dir", type=Path, help="Keep the servers' logs and database here.")
    parser.add_argument("--out", type=Path, default=Path("reports/verification-flood.json"))
    args = parser.parse_args()
    config = FloodConfig(
        num_calls=args.calls, rate=args.rate, concurrency=args.concurrency, num_orgs=args.orgs
    )
    report = run(config, baseline_src=args.baseline_src, log_dir=args.log_dir)
    write_json(args.out, report)
    print(table(report))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
