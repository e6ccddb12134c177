"""The container files (Dockerfile, compose.yaml) against the code they
run: the settings they pass are settings, the commands they run are
commands, the extras they install exist, and the image builds llama.cpp as
the Makefile does. Building the image and starting the fleet is
deploy/check-compose.sh's work (docs/deployment.md, "Docker"): it needs a
container engine and about ten minutes, which the suite has neither of."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from flexserve.cli import main
from flexserve.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def flexserve_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items()
            if service.get("image") == "flexserve:latest"}


def parse_command(args: list[str]) -> click.Context:
    """``flexserve ARGS`` parsed as the CLI would, without running it."""
    with main.make_context("flexserve", list(args), resilient_parsing=False) as group:
        name, command, rest = main.resolve_command(group, list(args))
        assert command is not None, args
        while isinstance(command, click.Group):
            sub_name, command, rest = command.resolve_command(group, rest)
            assert command is not None, (name, sub_name)
        return command.make_context(name or "", rest, parent=group)


def test_the_fleet_has_its_parts_and_every_gateway_starts_after_the_schema() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "sim", "gateway-1", "gateway-2"} <= set(services)
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"][:2] == ["db", "upgrade"]
    # One build (the image is large): the other services run what it made.
    assert [name for name, service in services.items() if "build" in service] == ["migrate"]
    # Two gateways, one host port each.
    ports = [p for name in ("gateway-1", "gateway-2") for p in services[name]["ports"]]
    assert len(set(ports)) == 2


@pytest.mark.parametrize("name", sorted(flexserve_services()))
def test_each_flexserve_service_runs_a_real_command_with_real_settings(name: str) -> None:
    service = flexserve_services()[name]
    environ = {k: str(v) for k, v in service.get("environment", {}).items()}
    # Settings the image sets itself (Dockerfile ENV).
    environ.update(FLEXSERVE_HOST="0.0.0.0", FLEXSERVE_HOME="/data")
    unknown = [k for k in environ if k.startswith("FLEXSERVE_")
               and k.removeprefix("FLEXSERVE_").lower() not in load_settings(environ={}).__dataclass_fields__]
    assert not unknown, f"{name}: not settings: {unknown}"
    try:
        settings = load_settings(environ=environ)
    except ConfigError as exc:
        pytest.fail(f"{name}: {exc}")
    parse_command(service.get("command", ["serve"]))
    if name.startswith("gateway"):
        assert settings.engine == "upstream" and settings.redis.startswith("redis://")
        assert settings.database_url.startswith("postgresql://")
        assert settings.files_in_database  # no volume shared between the gateways


def test_a_gateway_reaches_each_upstream_under_a_service_compose_starts() -> None:
    services = compose()["services"]
    sim_port = services["sim"]["command"][services["sim"]["command"].index("--port") + 1]
    for name in ("gateway-1", "gateway-2"):
        upstreams = services[name]["environment"]["FLEXSERVE_UPSTREAMS"].split(",")
        assert upstreams == [f"http://sim:{sim_port}"]
        capacity = int(services[name]["environment"]["FLEXSERVE_UPSTREAM_CAPACITY"])
        command = services["sim"]["command"]
        assert capacity == int(command[command.index("--max-num-seqs") + 1])


def test_a_wrong_setting_or_command_would_be_caught() -> None:
    """What the two tests above lean on does fail on a mistake."""
    with pytest.raises(ConfigError):
        load_settings(environ={"FLEXSERVE_ENGINE": "upstream"})  # no upstreams
    with pytest.raises(click.UsageError):
        parse_command(["sim-engine", "--max-num-seq", "16"])


def test_the_image_installs_extras_that_exist_and_builds_llama_cpp_as_the_makefile_does() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for wanted in re.findall(r'\[([a-z,]+)\]"', dockerfile):
        assert set(wanted.split(",")) <= extras, wanted
    image_flags = set(shlex.split(re.search(r'ARG LLAMA_CMAKE_ARGS="([^"]+)"', dockerfile)[1]))
    makefile = (ROOT / "Makefile").read_text()
    build = re.search(r"^LLAMA_BUILD\s+:=\s+(.+)$", makefile, re.M)[1].split()
    x86 = re.search(r"^ifeq \(\$\(shell uname -m\),x86_64\)\nLLAMA_CMAKE_ARGS \?= (.+)$", makefile, re.M)[1]
    make_flags = {flag for flag in x86.split() if flag != "$(LLAMA_BUILD)"} | set(build)
    assert image_flags == make_flags
    version = re.search(r"^LLAMA_VERSION \?= (\S+)$", makefile, re.M)[1]
    assert f'"llama-cpp-python=={version}"' in (ROOT / "pyproject.toml").read_text()
    assert f"ARG LLAMA_VERSION={version}\n" in dockerfile


def test_the_load_balancer_runs_the_shipped_nginx_file_in_front_of_every_gateway() -> None:
    services = compose()["services"]
    lb = services["lb"]
    [mount] = lb["volumes"]
    source, target, _ = mount.split(":")
    assert target == "/etc/nginx/conf.d/default.conf"
    site = (ROOT / source).read_text()  # the file tests/test_load_balancer.py runs
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    assert sorted(re.findall(r"^\s*server (gateway-\d+):8000\b", site, re.M)) == gateways
    assert set(lb["depends_on"]) == set(gateways)
    assert re.search(r"^\s*listen 8000;", site, re.M) and lb["ports"] == ["8000:8000"]
