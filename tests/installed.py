"""What the suite uses from the machine's packages (Redis, nginx, promtool,
Chromium): found where Debian installs it, and where it is missing, its
tests skipped, saying how to install it — or failed, where the run requires
it (``FLEXSERVE_TEST_<PART>=required``, as .ci/run sets for what it installs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def find_binary(name: str) -> str | None:
    """``name`` on the PATH, or in the system directories a user's PATH may lack."""
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if path.exists()),
        None,
    )


def unavailable(part: str, why: str) -> NoReturn:
    """Skip the test, saying ``why``; fail it where FLEXSERVE_TEST_<part> is ``required``."""
    if os.environ.get(f"FLEXSERVE_TEST_{part}") == "required":
        pytest.fail(why)
    pytest.skip(why)
