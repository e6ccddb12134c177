"""Helpers for the billing end-to-end tests: the real CLI against the
gateway's database, organizations with their own keys, admin API calls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from click.testing import CliRunner

from conftest import Gateway, sim_engine, sql_rows, wait_for
from flexserve.cli import main


def cli(db_url: str, *args: str) -> str:
    """Run `flexserve ARGS --db DB_URL`; its stdout (fails the test on exit ≠ 0)."""
    result = CliRunner().invoke(main, [*args, "--db", db_url])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def cli_fails(db_url: str, *args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--db", db_url])
    assert result.exit_code == 1, (args, result.output)
    return result.output


@dataclass
class Org:
    """An organization of the test's own, with an admin key."""

    name: str
    key: str
    gateway: Gateway

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.gateway.url + "/v1", api_key=key or self.key, max_retries=0
        )

    def async_client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.gateway.url + "/v1", api_key=key or self.key, max_retries=0
        )

    def get(self, path: str, key: str | None = None, **params: Any) -> httpx.Response:
        return httpx.get(
            self.gateway.url + path,
            params=params,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        return httpx.post(
            self.gateway.url + path,
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    def member_key(self, project_id: str | None = None) -> str:
        """A new non-admin key (of the default project unless given)."""
        args = ["keys", "create", "--org", self.name]
        if project_id is not None:
            args += ["--project", project_id]
        return cli(self.gateway.db_url, *args).strip()

    def usage(self, **params: Any) -> dict[str, Any]:
        params.setdefault("start_time", int(time.time()) - 3600)
        response = self.get("/v1/organization/usage/completions", **params)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def costs(self, **params: Any) -> dict[str, Any]:
        params.setdefault("start_time", int(time.time()) - 3600)
        response = self.get("/v1/organization/costs", **params)
        assert response.status_code == 200, response.text
        return dict(response.json())


def new_org(gateway: Gateway, name: str) -> Org:
    return Org(name, gateway.new_key(name, admin=True), gateway)


def ledger(gateway: Gateway, where: str = "1 = 1", **params: Any) -> list[dict[str, Any]]:
    """The gateway's ledger rows that match ``where`` (named ``:params``)."""
    return sql_rows(gateway.db_url, f"SELECT * FROM usage_records WHERE {where}", **params)


def pico(value: float) -> int:
    """A JSON dollar amount back as the ledger's pico-dollars."""
    return round(value * 10**12)


def results(page: dict[str, Any]) -> list[dict[str, Any]]:
    return [result for bucket in page["data"] for result in bucket["results"]]


SIM_MODEL = "llama3-8b-sim-h100"


def priced_sim_gateway(start: Any, *, speed: float = 50.0, max_num_seqs: int = 16, **overrides: Any) -> Gateway:
    """A gateway (``start``: the ``start_gateway`` fixture) on an in-process sim
    engine whose model costs $10/$40 per 1M tokens, once it has read the price."""
    gateway: Gateway = start(engines=[sim_engine(speed=speed, max_num_seqs=max_num_seqs)], engine="sim",
                             policy_refresh_interval=0.1, **overrides)
    cli(gateway.db_url, "prices", "set", SIM_MODEL, "--input", "10.00", "--output", "40.00")

    def priced() -> bool:  # the gateway re-reads prices every policy_refresh_interval
        with gateway.http() as http:
            [entry] = [m for m in http.get("/v1/models").json()["data"] if m["id"] == SIM_MODEL]
        return bool(entry.get("pricing"))

    wait_for(priced)
    return gateway
