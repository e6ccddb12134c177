"""The billing and governance commands: prices, models, projects, budgets,
rate limits, verification decisions and the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from billing_support import cli, cli_fails
from conftest import run_async
from flexserve.accounts import Accounts
from flexserve.accounts.verification import Verifications
from flexserve.billing.controls import Controls
from flexserve.billing.price_book import PriceBook
from flexserve.billing.pricing import PriceCatalog
from flexserve.billing.ratelimit import RateLimit
from flexserve.cli import main
from flexserve.cli.prices import load_config_prices
from flexserve.config import load_settings
from flexserve.store import Database
from flexserve.tiers import ServiceTier

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "flexserve" / "examples" / "prices.toml"


async def _read(
    db_url: str,
) -> tuple[PriceCatalog, dict[str, int], dict[tuple[str, ServiceTier], RateLimit]]:
    db = Database.from_url(db_url)
    try:
        controls = Controls(db)
        return (
            await PriceBook(db).load(),
            await controls.load_budget_limits(),
            await controls.load_rate_limits(),
        )
    finally:
        await db.close()


def test_prices_set_list_load_and_multipliers(tmp_db_url: str) -> None:
    out = cli(tmp_db_url, "prices", "load", str(EXAMPLE))
    assert "o3       flex      5.00   1.25          20.00   list x 0.5" in out
    listed = cli(tmp_db_url, "prices", "list")
    assert "o4-mini  flex      0.55   0.1375        2.20    list x 0.5" in listed
    out = cli(
        tmp_db_url,
        "prices",
        "set",
        "o3",
        "--tier",
        "priority",
        "--input",
        "15",
        "--output",
        "60",
        "--cached-input",
        "3.75",
    )
    assert "o3     priority  15.00  3.75          60.00   set" in out
    out = cli(tmp_db_url, "prices", "set-multiplier", "flex", "0.25", "--model", "o4-mini")
    assert "o4-mini  flex      0.275  0.06875       1.10    list x 0.25" in out
    assert "not a number" in cli_fails(
        tmp_db_url, "prices", "set", "m", "--input", "ten", "--output", "1"
    )
    # Half of a micro-dollar would be billed: refused, and the catalog is unchanged.
    assert "whole number" in cli_fails(
        tmp_db_url, "prices", "set", "odd", "--input", "0.000001", "--output", "1"
    )
    catalog, _, _ = run_async(_read(tmp_db_url))
    assert catalog.models() == ["o3", "o4-mini"]
    cli(tmp_db_url, "prices", "load", "--replace", str(EXAMPLE))
    catalog, _, _ = run_async(_read(tmp_db_url))
    assert not catalog.is_explicit("o3", ServiceTier.PRIORITY)


def test_prices_set_window(tmp_db_url: str) -> None:
    cli(tmp_db_url, "prices", "set", "o3", "--input", "10", "--output", "40")
    listed = cli(tmp_db_url, "prices", "list")
    assert "o3     batch 1h  7.50   7.50          30.00   batch x 1.5" in listed
    out = cli(tmp_db_url, "prices", "set-window", "7d", "0.6")
    assert "o3     batch 7d  3.00   3.00          12.00   batch x 0.6" in out
    refused = CliRunner().invoke(main, ["prices", "set-window", "24h", "0.9", "--db", tmp_db_url])
    assert refused.exit_code != 0 and "'24h' is not one of '1h', '7d'" in refused.output
    catalog, _, _ = run_async(_read(tmp_db_url))
    assert catalog.windows == {"7d": 6_000}


def test_prices_list_when_empty(tmp_db_url: str) -> None:
    result = CliRunner().invoke(main, ["prices", "list", "--db", tmp_db_url])
    assert result.exit_code == 0 and "No prices yet" in result.stderr


def test_config_file_prices_are_loaded_at_serve(tmp_path: Path, tmp_db_url: str) -> None:
    config = tmp_path / "flexserve.toml"
    config.write_text(
        'port = 9999\n[prices."m"]\ninput = "2"\noutput = "8"\n[tier_multipliers]\nflex = 0.4\n'
    )
    settings = load_settings(config, overrides={"db": tmp_db_url}, environ={})
    assert settings.port == 9999
    load_config_prices(settings, str(config))
    catalog, _, _ = run_async(_read(tmp_db_url))
    price = catalog.price("m", ServiceTier.FLEX)
    assert price is not None
    assert (price.input, price.output) == (800_000, 3_200_000)


def test_budgets_and_rate_limits(tmp_db_url: str) -> None:
    cli(tmp_db_url, "orgs", "create", "acme")
    assert "monthly budget $12.50" in cli(
        tmp_db_url, "orgs", "set-budget", "acme", "--monthly-usd", "12.5"
    )
    project = cli(tmp_db_url, "projects", "create", "--org", "acme", "evals").strip()
    cli(tmp_db_url, "projects", "set-budget", project, "--monthly-usd", "0.25")
    assert "$0.25" in cli(tmp_db_url, "projects", "list", "--org", "acme")
    out = cli(
        tmp_db_url,
        "orgs",
        "set-rate-limit",
        "acme",
        "--tier",
        "flex",
        "--rpm",
        "60",
        "--tpm",
        "1000",
    )
    assert "60 requests, 1000 tokens per minute" in out
    _, budgets, limits = run_async(_read(tmp_db_url))
    org_id = run_async(_org_id(tmp_db_url, "acme"))
    assert budgets == {f"org:{org_id}": 12_500_000 * 10**6, f"project:{project}": 250_000 * 10**6}
    assert limits == {(org_id, ServiceTier.FLEX): RateLimit(60, 1000)}
    cli(tmp_db_url, "orgs", "set-budget", "acme", "--none")
    assert "no limit" in cli(tmp_db_url, "orgs", "set-rate-limit", "acme", "--tier", "flex")
    _, budgets, limits = run_async(_read(tmp_db_url))
    assert list(budgets) == [f"project:{project}"] and limits == {}
    assert (
        "either"
        in CliRunner().invoke(main, ["orgs", "set-budget", "acme", "--db", tmp_db_url]).output
    )
    assert "no organization" in cli_fails(
        tmp_db_url, "orgs", "set-budget", "ghost", "--monthly-usd", "1"
    )
    audit = cli(tmp_db_url, "orgs", "audit", "acme")
    assert audit.count("budget.set") == 3 and audit.count("rate_limit.set") == 2


async def _org_id(db_url: str, name: str) -> str:
    db = Database.from_url(db_url)
    try:
        return (await Accounts(db).get_org(name)).id
    finally:
        await db.close()


def test_projects_set_tier(tmp_db_url: str) -> None:
    cli(tmp_db_url, "orgs", "create", "acme")
    project = cli(tmp_db_url, "projects", "create", "--org", "acme", "bulk").strip()
    assert "`auto` now means flex" in cli(tmp_db_url, "projects", "set-tier", project, "flex")
    assert "bulk" in cli(tmp_db_url, "projects", "list", "--org", "acme")
    listed = cli(tmp_db_url, "projects", "list", "--org", "acme").splitlines()
    assert [line.split()[-2] for line in listed[1:]] == ["default", "flex"]
    assert "no project" in cli_fails(tmp_db_url, "projects", "set-tier", "proj_nope", "flex")
    result = CliRunner().invoke(
        main, ["projects", "set-tier", project, "batch", "--db", tmp_db_url]
    )
    assert result.exit_code == 2  # batch is reached only through /v1/batches


def test_model_gates(tmp_db_url: str) -> None:
    assert "to stream" in cli(tmp_db_url, "models", "gate", "o3", "--verification", "streaming")
    cli(tmp_db_url, "models", "gate", "o3-pro", "--verification", "all")
    assert cli(tmp_db_url, "models", "gates").split() == [
        "MODEL",
        "VERIFICATION",
        "o3",
        "streaming",
        "o3-pro",
        "all",
    ]
    cli(tmp_db_url, "models", "gate", "o3", "--verification", "none")
    assert cli(tmp_db_url, "models", "gates").split() == ["MODEL", "VERIFICATION", "o3-pro", "all"]


def test_verify_refuses_a_document_used_elsewhere_and_reject_needs_a_reason(
    tmp_db_url: str,
) -> None:
    cli(tmp_db_url, "orgs", "create", "one")
    cli(tmp_db_url, "orgs", "create", "two")
    run_async(_submit_both(tmp_db_url))
    assert "is verified" in cli(tmp_db_url, "orgs", "verify", "one")
    assert "90 days" in cli_fails(tmp_db_url, "orgs", "verify", "two")
    assert cli(tmp_db_url, "orgs", "list").splitlines()[2].split()[2] == "rejected"
    result = CliRunner().invoke(main, ["orgs", "reject", "one", "--db", tmp_db_url])
    assert result.exit_code == 2 and "--reason" in result.output
    assert "rejected: fraud" in cli(tmp_db_url, "orgs", "reject", "one", "--reason", "fraud")
    audit = cli(tmp_db_url, "orgs", "audit", "--limit", "3")
    assert [line.split()[3] for line in audit.splitlines()[1:]] == [
        "verification.rejected",
        "verification.rejected",
        "verification.verified",
    ]


async def _submit_both(db_url: str) -> None:
    db = Database.from_url(db_url)
    try:
        accounts, workflow = Accounts(db), Verifications(db)
        for name in ("one", "two"):
            org = await accounts.get_org(name)
            await workflow.submit(org.id, "passport", "IT", "YA1234567", actor="key:test")
    finally:
        await db.close()


@pytest.mark.parametrize(
    "command",
    [
        ["prices", "set"],
        ["prices", "list"],
        ["prices", "load"],
        ["prices", "set-multiplier"],
        ["models", "gate"],
        ["models", "gates"],
        ["projects", "create"],
        ["projects", "list"],
        ["projects", "set-tier"],
        ["projects", "set-budget"],
        ["orgs", "reject"],
        ["orgs", "set-budget"],
        ["orgs", "set-rate-limit"],
        ["orgs", "audit"],
    ],
)
def test_every_command_takes_db(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "--db" in result.output
