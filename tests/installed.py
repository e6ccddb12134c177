"""What the suite uses from the machine's packages (Redis, nginx, promtool,
Chromium): found where Debian installs it, and where it is missing, its
tests skipped, saying how to install it — or failed, where the run requires
it (``FLEXSERVE_TEST_<PART>=required``, as .ci/run sets for what it installs)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from flexserve.bench.processes import find_binary

__all__ = ["find_binary", "unavailable"]


def unavailable(part: str, why: str) -> NoReturn:
    """Skip the test, saying ``why``; fail it where FLEXSERVE_TEST_<part> is ``required``."""
    if os.environ.get(f"FLEXSERVE_TEST_{part}") == "required":
        pytest.fail(why)
    pytest.skip(why)
