"""/dashboard's page load with a month of usage in the ledger.

A gateway (``flexserve serve``, SQLite) whose ledger holds ``days`` days of
``per_day`` requests a day for each of ``orgs`` organizations; one
organization's admin signs in and loads its page ``loads`` times, then an
operator loads the operator's page (every organization) as often. Reported:
each page's load time (median, p90, max) and the ledger's size::

    .venv/bin/python -m flexserve.bench.dashboard_load    # reports/dashboard-load.json
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from flexserve.bench.processes import flexserve_command, start_gateway, start_sim_engine
from flexserve.bench.report import host_info, summary_ms, write_json
from flexserve.billing.usage import UsageRecord

DAY = 86400


def _fill(db_path: Path, org_id: str, orgs: int, days: int, per_day: int) -> int:
    """``days`` × ``per_day`` usage rows for ``org_id`` and ``orgs - 1`` others."""
    today = int(time.time()) // DAY * DAY
    rows = []
    for n in range(orgs):
        org = org_id if n == 0 else f"org-bench-{n:03d}"
        for day in range(days):
            for i in range(per_day):
                tier = ("default", "flex", "batch")[i % 3]
                record = UsageRecord(
                    request_id=f"req_bench_{n}_{day}_{i}", org_id=org, project_id=f"proj_{n}",
                    api_key_id=f"key_{n}", model="llama3-8b-sim-h100", requested_tier=tier,
                    served_tier=tier, prompt_tokens=500 + i, completion_tokens=200, queue_time=0.01,
                    ttft=0.05, total_time=1.0, status="completed",
                    created_at=today - day * DAY + (i * 997) % DAY,
                )
                rows.append(record.to_row())
    with sqlite3.connect(db_path) as db:
        columns = list(rows[0])
        db.executemany(f"INSERT INTO usage_records ({', '.join(columns)}) VALUES "
                       f"({', '.join('?' for _ in columns)})", [tuple(r[c] for c in columns) for r in rows])
    return len(rows)


def run(orgs: int, days: int, per_day: int, loads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flexserve-dashboard-") as tmp, ExitStack() as stack:
        log_dir = Path(tmp)
        sim = start_sim_engine(stack, log_dir, profile="instant")
        gateway, _ = start_gateway(stack, log_dir, sim.url)
        home = log_dir / "flexserve-home"
        db_url = f"sqlite:///{home / 'flexserve.db'}"
        admin_key = subprocess.run(
            flexserve_command("keys", "create", "--org", "bench", "--admin", "--db", db_url, "--home", str(home)),
            capture_output=True, text=True, check=True).stdout.strip()
        with sqlite3.connect(home / "flexserve.db") as db:
            (org_id,) = db.execute("SELECT id FROM organizations WHERE name = 'bench'").fetchone()
        operator_key = subprocess.run(
            flexserve_command("operators", "create", "bench-operator", "--db", db_url, "--home", str(home)),
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        num_rows = _fill(home / "flexserve.db", org_id, orgs, days, per_day)
        org_times = _loads(gateway.url, admin_key, loads, 'id="total"')
        operator_times = _loads(gateway.url, operator_key, loads, 'id="revenue"')
    return {
        "benchmark": "dashboard-load",
        "host": host_info(),
        "setup": {"orgs": orgs, "days": days, "requests_per_org_per_day": per_day, "usage_rows": num_rows,
                  "loads": loads, "database": "SQLite"},
        "org_page_load_ms": summary_ms(org_times),
        "operator_page_load_ms": summary_ms(operator_times),
    }


def _loads(url: str, key: str, loads: int, marker: str) -> list[float]:
    """Sign in with ``key`` and time ``loads`` loads of the page it opens."""
    with httpx.Client(base_url=url, timeout=60) as web:
        form = web.get("/dashboard").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        signed_in = web.post("/dashboard/login", data={"key": key, "csrf": csrf.group(1)})
        assert signed_in.status_code == 303, signed_in.text
        times = []
        for _ in range(loads):
            started = time.perf_counter()
            page = web.get("/dashboard")
            times.append(time.perf_counter() - started)
            assert page.status_code == 200 and marker in page.text, page.text[:500]
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=100, help="Requests per organization per day.")
    parser.add_argument("--loads", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("reports/dashboard-load.json"))
    args = parser.parse_args()
    report = run(args.orgs, args.days, args.per_day, args.loads)
    write_json(args.out, report)
    print(report["setup"], "organization:", report["org_page_load_ms"],
          "operator:", report["operator_page_load_ms"])


if __name__ == "__main__":
    main()
