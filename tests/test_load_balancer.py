"""Gateways behind a load balancer as compose.yaml runs them: Debian's nginx
with deploy/nginx-flexserve.conf in front of two `flexserve serve`
processes on one database and one sim engine. Streams come through as they
are generated, requests reach both gateways, and with one gateway killed
every request still succeeds on the other — none sent twice (one ledger
row per response)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ServerThread, cli_admin_key, serve_process, sql_rows
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from nginx import nginx_in_front, nginx_or_skip

MESSAGES = [{"role": "user", "content": "Count."}]


@pytest.fixture
def engine() -> Iterator[ServerThread]:
    # Slow (a token every ~0.1 s): a stream's first chunk must come through
    # the balancer while the engine is still generating the rest.
    with ServerThread(create_sim_app(SimModel("h100-llama3-8b", speed=0.05, max_num_seqs=8))) as server:
        yield server


def completed(gateway_url: str) -> int:
    """Inference requests the gateway completed (its /metrics)."""
    text = httpx.get(gateway_url + "/metrics", timeout=10).text
    return sum(int(float(v)) for v in re.findall(
        r'^flexserve_requests_total\{[^}]*status="completed"[^}]*\} (\S+)$', text, re.M))


def running_in(engine: ServerThread) -> int:
    text = httpx.get(engine.url + "/metrics", timeout=10).text
    return int(float(re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)[1]))


def test_gateways_behind_nginx_stream_share_and_survive_a_killed_one(
    engine: ServerThread, tmp_path: Path,
) -> None:
    nginx_or_skip()
    db_url = f"sqlite:///{tmp_path / 'flexserve.db'}"
    key = cli_admin_key(db_url, tmp_path)
    env = {"FLEXSERVE_BOOTSTRAP_DEMO": "false", "FLEXSERVE_UPSTREAM_CAPACITY": "8"}
    args = ("--engine", "upstream", "--upstream", engine.url, "--db", db_url)
    homes = [tmp_path / "a", tmp_path / "b"]
    for home in homes:
        home.mkdir()
    with serve_process(homes[0], *args, env=env) as (first, first_url, _), \
            serve_process(homes[1], *args, env=env) as (_, second_url, _):
        addresses = [url.removeprefix("http://") for url in (first_url, second_url)]
        with nginx_in_front(addresses, tmp_path / "nginx") as lb_url:
            client = openai.OpenAI(base_url=lb_url + "/v1", api_key=key, max_retries=0, timeout=60)
            model = client.models.list().data[0].id
            ids: list[str] = []

            # A stream through the balancer: its first chunk arrives while
            # the engine is still generating the rest.
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=20, stream=True,
                stream_options={"include_usage": True})
            chunks = iter(stream)
            first_chunk = next(c for c in chunks if c.choices and c.choices[0].delta.content)
            assert running_in(engine) == 1, "the stream's first chunk came only after it ended"
            rest = list(chunks)
            assert rest and rest[-1].usage is not None and rest[-1].usage.completion_tokens == 20
            ids.append(first_chunk.id)

            # Requests one after another reach both gateways.
            for _ in range(6):
                ids.append(client.chat.completions.create(
                    model=model, messages=MESSAGES, max_tokens=2).id)
            counts = [completed(first_url), completed(second_url)]
            assert sum(counts) == 7 and min(counts) >= 2, counts

            # One gateway killed: the balancer sends every request to the
            # other (the killed one refuses connections: nothing was sent).
            first.kill()
            first.wait(timeout=10)
            for tier in ("default", "flex") * 3:
                ids.append(client.chat.completions.create(
                    model=model, messages=MESSAGES, max_tokens=2, service_tier=tier).id)
            assert completed(second_url) == counts[1] + 6
    # The survivor and the killed gateway (its journal replayed on restart).
    with serve_process(homes[0], *args, env=env):
        pass
    rows = [r["request_id"] for r in sql_rows(db_url, "SELECT request_id FROM usage_records")]
    assert len(rows) == len(set(rows)) == len(ids) == 13, "a request billed twice, or not at all"
