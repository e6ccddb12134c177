"""`flexserve serve` as a user runs it: a real process, the welcome it prints,
the demo key working with the official SDK."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from conftest import serve_process


@contextmanager
def serve(home: Path, *args: str) -> Iterator[tuple[str, list[str]]]:
    with serve_process(home, "--engine", "sim", "--sim-speed", "50", *args) as (_, url, log):
        yield url, log.read_text().splitlines()


def test_first_start_prints_a_working_demo_key(tmp_path: Path) -> None:
    with serve(tmp_path) as (url, lines):
        keys = [m.group(0) for line in lines for m in [re.search(r"sk-fs-[A-Za-z0-9_-]+", line)] if m]
        assert keys, lines
        key = keys[0]
        assert any("curl " in line for line in lines)
        assert any("from openai import OpenAI" in line for line in lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, service_tier="flex", max_tokens=4,
            messages=[{"role": "user", "content": "Say hello in five words."}],
        )
        assert reply.service_tier == "flex"
        assert (tmp_path / "demo_key").read_text().strip() == key
    # A second start keeps the same organization and shows the saved key.
    with serve(tmp_path) as (url, lines):
        assert any(key in line for line in lines)
        assert not any("Created organization" in line for line in lines)


def test_serve_rejects_a_bad_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flexserve.cli", "serve", "--home", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "FLEXSERVE_FLEX_HEADROOM": "lots"},
    )
    assert result.returncode != 0
    assert "flex_headroom" in result.stderr


def test_bound_to_every_address_the_welcome_names_one_a_client_can_use(tmp_path: Path) -> None:
    """As in a container (the image binds 0.0.0.0): the commands it prints
    go to 127.0.0.1, where they work, not to 0.0.0.0."""
    with serve(tmp_path, "--host", "0.0.0.0") as (url, lines):
        curl = next(line for line in lines if "curl " in line)
        assert f"{url}/v1/chat/completions" in curl
        assert not any("0.0.0.0:" in line and "listening" not in line for line in lines), lines
