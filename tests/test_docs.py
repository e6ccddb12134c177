"""Every setting and every command is documented (a new one fails this test)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import click
import click.testing
import pytest

from flexserve.cli import main
from flexserve.config import Settings, setting_help

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _commands(command: click.Command, path: list[str]) -> Iterator[str]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, [*path, name])
    else:
        yield " ".join(path)


COMMANDS = sorted(_commands(main, ["flexserve"]))


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_setting_is_documented(name: str) -> None:
    assert f"`{name}`" in (DOCS / "configuration.md").read_text()
    assert setting_help()[name].strip()


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_documented(command: str) -> None:
    assert f"`{command}" in (DOCS / "cli.md").read_text()


@pytest.mark.parametrize("command", COMMANDS)
def test_command_has_help(command: str) -> None:
    runner = click.testing.CliRunner()
    result = runner.invoke(main, [*command.split()[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) > 3
