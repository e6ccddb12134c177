"""The gateway's metrics by Prometheus' conventions: names and units, no
empty label values, none per made-up model; docs/metrics.md lists exactly
what is exposed; the Grafana dashboard reads only metrics that exist; and
`promtool check metrics` passes where Prometheus is installed (CI installs
it: FLEXSERVE_TEST_PROMTOOL=required makes its absence a failure)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Gateway, sim_engine
from installed import find_binary, unavailable

DOCS = Path(__file__).resolve().parents[1] / "docs"
MESSAGES = [{"role": "user", "content": "hi"}]
# Units spelled other than in base units, or abbreviated.
_BAD_UNITS = re.compile(r"_(ms|msec|millis|milliseconds|microseconds|sec|secs|minutes|hours|percent|pct)(_|$)")


@pytest.fixture(scope="module")
def exposition(start_gateway: Callable[..., Gateway]) -> str:
    """A gateway's /metrics after traffic of each kind: served on two tiers,
    refused, and asked for a model it does not serve."""
    gateway = start_gateway(engines=[sim_engine()], engine="sim")
    client = gateway.client()
    for tier in ("default", "flex"):
        client.chat.completions.create(model="llama3-8b-sim-h100", messages=MESSAGES, max_tokens=2,
                                       service_tier=tier)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="made-up-model", messages=MESSAGES, max_tokens=2)
    return httpx.get(gateway.url + "/metrics").text


def sample_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_names_units_and_labels_follow_prometheus_conventions(exposition: str) -> None:
    families = list(text_string_to_metric_families(exposition))
    assert len(families) > 20
    for family in families:
        name = family.name
        assert re.fullmatch(r"flexserve_[a-z0-9_]+", name), name
        assert family.documentation.strip(), f"{name} has no HELP"
        assert not _BAD_UNITS.search(name), f"{name}: use base units (seconds, ratio 0-1)"
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        else:
            assert not name.endswith("_total"), f"{name} is a {family.type} named like a counter"
        if "share (0-1)" in family.documentation.lower() or "0-1" in family.documentation:
            assert name.endswith("_ratio"), f"{name} holds 0-1 values: name it _ratio"
        for sample in family.samples:
            assert not sample.name.endswith("_created"), f"{sample.name}: no _created series"
            for label, value in sample.labels.items():
                assert value != "", f"{sample.name} has an empty {label}"
    assert "made-up-model" not in exposition


def test_docs_list_exactly_the_metrics_a_gateway_exposes(exposition: str) -> None:
    documented = set(re.findall(r"^\| `(flexserve_[a-z0-9_]+)` \|", (DOCS / "metrics.md").read_text(), re.M))
    exposed = set()
    for family in text_string_to_metric_families(exposition):
        exposed.add(family.name + ("_total" if family.type == "counter" else ""))
    assert documented == exposed


def test_the_grafana_dashboard_reads_only_exposed_metrics(exposition: str) -> None:
    dashboard = json.loads((DOCS / "grafana" / "flexserve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"\bflexserve_[a-z0-9_]+", expr)}
    assert used - sample_names(exposition) == set()


def test_promtool_finds_nothing_to_fix(exposition: str) -> None:
    promtool = find_binary("promtool") or unavailable(
        "PROMTOOL", "promtool is not installed (Debian: apt-get install prometheus)")
    done = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
