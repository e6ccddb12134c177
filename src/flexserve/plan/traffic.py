"""A day of default traffic for the planner: requests per second in each
UTC hour, and the lengths they come with.

Three sources:

- ``synthetic``: a diurnal curve, a cosine between ``peak`` requests/s at
  ``peak_hour`` and ``trough`` × peak twelve hours away (``trough=1``: flat);
  ShareGPT-like lengths (``bench/traffic.py``).
- ``trace``: a JSONL file, one request a line: ``{"at": unix seconds,
  "prompt_tokens": N, "completion_tokens": M}`` (optional ``"tier"``: only
  ``default`` and ``priority`` lines count; flex is what is planned).
- ``ledger``: FlexServe's own usage ledger over a date range (its default
  and priority rows), read as a trace.

A trace's hours are averaged over the days it spans; its lengths are drawn
from its own requests.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from flexserve.bench.traffic import SHAREGPT_LENGTHS, LengthMix
from flexserve.plan.simulate import LengthDraw

HOUR = 3600
DAY = 86400
# Tiers a day's traffic is made of: the interactive ones flex must not hurt.
INTERACTIVE = ("default", "priority", "auto")


@dataclass
class Traffic:
    """Default (and priority) requests per second in each UTC hour, 0–23."""

    source: str
    hourly_rate: list[float]
    lengths: LengthMix | LengthDraw = SHAREGPT_LENGTHS
    # (prompt, output) pairs of a trace, when the lengths come from one.
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def requests_per_day(self) -> float:
        return sum(rate * HOUR for rate in self.hourly_rate)

    def describe(self) -> str:
        if self.samples:
            prompt = sum(p for p, _ in self.samples) / len(self.samples)
            output = sum(o for _, o in self.samples) / len(self.samples)
            return (f"{self.source}: {self.requests_per_day:,.0f} requests a day; lengths from its "
                    f"{len(self.samples)} requests (mean input {prompt:.0f}, output {output:.0f} tokens)")
        described = self.lengths.describe() if isinstance(self.lengths, LengthMix) else "custom"
        return f"{self.source}: {self.requests_per_day:,.0f} requests a day; lengths {described}"


def synthetic(peak: float, trough: float = 0.4, peak_hour: int = 15) -> Traffic:
    """A diurnal day: ``peak`` requests/s at ``peak_hour`` (UTC), ``trough`` × peak at its opposite."""
    if peak < 0 or not 0 <= trough <= 1:
        raise ValueError("the peak rate must be >= 0 and the trough a fraction in [0, 1]")
    rates = [peak * (trough + (1 - trough) * (1 + math.cos(2 * math.pi * (h - peak_hour) / 24)) / 2)
             for h in range(24)]
    shape = "flat" if trough == 1 else f"diurnal (peak {peak:g}/s at {peak_hour:02d}:00 UTC, trough {trough:g}×)"
    return Traffic(f"synthetic, {shape}", rates)


def from_requests(source: str, requests: list[tuple[float, int, int]]) -> Traffic:
    """A day from timed requests (unix seconds, prompt tokens, output tokens)."""
    if not requests:
        raise ValueError(f"{source}: no default or priority request to plan from")
    first, last = min(r[0] for r in requests), max(r[0] for r in requests)
    days = max(1, math.ceil((last - first + 1) / DAY)) if last - first >= HOUR else None
    counts = [0] * 24
    for at, _, _ in requests:
        counts[int(at) % DAY // HOUR] += 1
    if days is None:
        # Under an hour of trace: its rate, all day long.
        rate = len(requests) / max(last - first, 1.0)
        rates = [rate] * 24
    else:
        rates = [count / (days * HOUR) for count in counts]
    samples = [(max(1, p), max(1, o)) for _, p, o in requests]

    def draw(rng: random.Random) -> tuple[int, int]:
        return samples[rng.randrange(len(samples))]

    return Traffic(source, rates, draw, samples)


def from_trace(path: Path) -> Traffic:
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("tier", "default") not in INTERACTIVE:
                continue
            requests.append((float(row["at"]), int(row["prompt_tokens"]), int(row["completion_tokens"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a request line ({exc})") from exc
    return from_requests(f"trace {path.name}", requests)


async def from_ledger(db_url: str, start: int, end: int) -> Traffic:
    """The default and priority requests the ledger holds in ``[start, end)``."""
    from sqlalchemy import select

    from flexserve.store.database import Database
    from flexserve.store.schema import usage_records as ur

    database = Database.from_url(db_url)
    try:
        statement = (select(ur.c.created_at, ur.c.prompt_tokens, ur.c.completion_tokens)
                     .where(ur.c.created_at >= start, ur.c.created_at < end,
                            ur.c.served_tier.in_(("default", "priority"))))
        async with database.engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
    finally:
        await database.close()
    return from_requests("usage ledger", [(float(r[0]), int(r[1]), int(r[2])) for r in rows])
