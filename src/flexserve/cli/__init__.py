"""The `flexserve` command line: noun groups with verb subcommands.

Each command lives in the module of its concept; this module only assembles
them. A command's docstring is its ``--help`` text.
"""

from __future__ import annotations

import click

from flexserve import __version__


@click.group()
@click.version_option(__version__, prog_name="flexserve")
def main() -> None:
    """FlexServe: an OpenAI-compatible gateway that sells spare inference
    capacity as a flex service tier."""


def _register() -> None:
    from flexserve.cli.accounts import keys, orgs
    from flexserve.cli.batches import batches
    from flexserve.cli.bench import bench
    from flexserve.cli.db import db
    from flexserve.cli.operators import operators
    from flexserve.cli.plan import plan
    from flexserve.cli.run import run
    from flexserve.cli.serve import serve
    from flexserve.cli.sim import sim_engine

    for command in (serve, db, orgs, keys, operators, sim_engine, bench, batches, run, plan):
        main.add_command(command)
    _register_billing()


def _register_billing() -> None:
    from flexserve.cli.accounts import orgs
    from flexserve.cli.governance import ORG_COMMANDS
    from flexserve.cli.prices import models, prices
    from flexserve.cli.projects import projects

    for group in (prices, models, projects):
        main.add_command(group)
    for command in ORG_COMMANDS:
        orgs.add_command(command)


_register()
