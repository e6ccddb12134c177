"""Where a server's CPU goes under load: py-spy samples, summarised as text.

``py-spy record --native --format raw`` attaches to the server while a phase
runs and writes one line per distinct stack with its sample count. Samples
whose innermost frame is a wait (epoll, a futex, a queue's ``get``) are idle
and left out: this py-spy cannot tell idle threads on this kind of VM by
itself. What is left is split by "self" (the innermost frame) and
"inclusive" (anywhere on the stack) time, each frame named by function and
file so that FlexServe's own code is easy to pick out.

py-spy is not a dependency: install it with ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A stack through any of these is a thread waiting (for work, a lock or the
# GIL), not running: py-spy on this kind of VM does not leave such samples out.
_WAITS = (
    "epoll_wait", "epoll_pwait", "pthread_cond_wait", "pthread_cond_timedwait",
    "PyThread_acquire_lock_timed", "_queue_SimpleQueue_get_impl", "take_gil", "sem_wait",
    "sem_timedwait", "select (", "poll (",
)


def find_py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


async def record(py_spy: str, pid: int, duration: float, out: Path) -> asyncio.subprocess.Process:
    """Start sampling ``pid`` for ``duration`` seconds into ``out`` (raw format)."""
    return await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
        "--rate", "200", "--native", "--format", "raw", "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (package/file.py)``."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{name} ({path})"


def _is_python(frame: str) -> bool:
    return ".py)" in frame


def summarise(paths: Iterable[Path], top: int = 25) -> dict[str, Any]:
    """Busy samples by innermost Python frame ("self": the Python function
    running, with the C it calls) and by any Python frame ("inclusive"), as
    percentages of busy samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    num_samples = num_idle = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            num_samples += count
            if any(wait in stack for wait in _WAITS):
                num_idle += count
                continue
            frames = [_frame_name(f) for f in stack.split(";") if f]
            python = [f for f in frames if _is_python(f)]
            own[python[-1] if python else frames[-1]] += count
            for frame in set(python):
                inclusive[frame] += count
    busy = num_samples - num_idle

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": frame, "percent_of_busy": round(100 * n / busy, 1)}
                for frame, n in counter.most_common(top)] if busy else []

    return {"num_samples": num_samples, "num_busy": busy, "self": share(own),
            "inclusive": share(inclusive)}
