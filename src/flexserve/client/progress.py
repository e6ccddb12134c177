"""How a job's progress reads: a live line on a terminal, lines in a log, a summary."""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from typing import TextIO

from flexserve.client.runner import Progress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _money(value: Decimal) -> str:
    return f"${value:,.4f}"


def status_line(progress: Progress) -> str:
    """One line: done/total, in flight, tokens/s, refusals, cost, ETA."""
    ended = progress.done + progress.failed
    to_do = progress.total - progress.skipped
    elapsed = progress.elapsed
    rate = progress.output_tokens / elapsed if elapsed > 0 else 0.0
    parts = [f"{ended + progress.skipped:,}/{progress.total:,} done"
             + (f" ({progress.skipped:,} before)" if progress.skipped else ""),
             f"{progress.failed:,} failed" if progress.failed else "",
             f"in flight {progress.in_flight}" + (f"/{progress.limit}" if progress.limit else ""),
             f"{rate:,.0f} tok/s",
             f"429s {progress.refusals:,}, retries {progress.retries:,}",
             f"fell back {progress.fell_back:,}" if progress.fell_back else ""]
    if progress.prices_known:
        parts.append(f"cost {_money(progress.spent)} (saved {_money(progress.saved)})")
    if 0 < ended < to_do:
        parts.append(f"ETA {_duration(elapsed / ended * (to_do - ended))}")
    return " | ".join(p for p in parts if p)


class Reporter:
    """Prints progress: a line rewritten in place on a terminal, a line every
    ``log_every`` seconds otherwise, nothing but the summary when quiet."""

    def __init__(self, stream: TextIO = sys.stderr, *, quiet: bool = False,
                 log_every: float = 10.0) -> None:
        self.stream = stream
        self.quiet = quiet
        self.live = stream.isatty() and not quiet
        self.log_every = log_every
        self._last_log = float("-inf")

    def __call__(self, progress: Progress) -> None:
        if progress.finished:
            if self.live:
                self.stream.write("\r\x1b[K")
            self.stream.write(summary(progress) + "\n")
            self.stream.flush()
            return
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\x1b[K" + status_line(progress))
            self.stream.flush()
        elif time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            self.stream.write(status_line(progress) + "\n")
            self.stream.flush()


def summary(progress: Progress) -> str:
    """The lines printed when a job ends."""
    to_do = progress.total - progress.skipped
    lines = [f"{progress.done:,} of {to_do:,} lines answered in {_duration(progress.elapsed)}"
             + (f" ({progress.skipped:,} done before)" if progress.skipped else "")
             + (f", {progress.failed:,} failed (see the error file)" if progress.failed else ""),
             f"tokens: {progress.input_tokens:,} in, {progress.output_tokens:,} out; "
             f"429s: {progress.refusals:,}; retries: {progress.retries:,}; "
             f"fell back: {progress.fell_back:,}",
             "served at: " + (", ".join(f"{tier} {count:,}" for tier, count in
                                        sorted(progress.by_tier.items())) or "-")]
    if progress.prices_known:
        lines.append(f"cost: {_money(progress.spent)}, saved against default: "
                     f"{_money(progress.saved)}")
    if progress.stopped == "deadline":
        lines.append(f"stopped: the job's deadline passed; {progress.remaining:,} lines left "
                     "for a rerun with the same output")
    elif progress.stopped == "max_cost":
        lines.append(f"stopped: the next request could pass --max-cost; {progress.remaining:,} "
                     "lines left")
    return "\n".join(lines)
