"""`flexserve serve` as a user runs it: a real process, the welcome it prints,
the demo key working with the official SDK."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

from conftest import free_port, serve_process
from redis_server import RedisServer, redis_server_or_skip


@contextmanager
def serve(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, list[str]]]:
    with serve_process(home, "--engine", "sim", "--sim-speed", "50", *args, env=env) as (_, url, log):
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
        assert any("listening on http://0.0.0.0:" in line for line in lines), lines


def test_told_to_wait_a_gateway_starts_once_its_redis_does(tmp_path: Path) -> None:
    """As in compose.yaml, where a gateway may start before Redis answers."""
    redis = RedisServer(redis_server_or_skip(), free_port())
    late = threading.Timer(3.0, redis.start)
    late.start()
    try:
        with serve(tmp_path, "--redis", redis.url, env={"FLEXSERVE_STARTUP_WAIT": "60"}) as (url, lines):
            assert any("Waiting for Redis" in line for line in lines), lines
            assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        late.join()
        redis.stop()


def test_not_told_to_wait_a_gateway_without_its_redis_stops_at_once_saying_why(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flexserve.cli", "serve", "--home", str(tmp_path), "--engine", "sim",
         "--redis", f"redis://127.0.0.1:{free_port()}/0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "cannot be reached" in result.stderr and "Waiting" not in result.stderr
