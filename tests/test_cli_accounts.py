"""`flexserve orgs …` and `flexserve keys …`, run as click commands on a SQLite file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import run_async
from flexserve.accounts import Accounts, Principal
from flexserve.cli.accounts import keys, orgs
from flexserve.store import Database

KEY = re.compile(r"sk-fs-[A-Za-z0-9_-]{43}")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The user's own settings must not leak into the tests.
    for name in ("FLEXSERVE_DB", "FLEXSERVE_HOME", "FLEXSERVE_DEFAULT_SERVICE_TIER"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner()


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_create_org_create_key_list_verify(runner: CliRunner, tmp_db_url: str) -> None:
    created = ok(runner.invoke(orgs, ["create", "acme", "--db", tmp_db_url]))
    assert "acme" in created.stdout and "org-" in created.stdout

    made = ok(runner.invoke(keys, ["create", "--org", "acme", "--admin", "--db", tmp_db_url]))
    key = made.stdout.strip()
    assert made.stdout == key + "\n"  # the key alone on stdout: scripts capture it
    assert KEY.fullmatch(key)
    assert "admin key" in made.stderr

    listed = ok(runner.invoke(orgs, ["list", "--db", tmp_db_url]))
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "VERIFICATION", "CREATED", "(UTC)"]
    assert "acme" in lines[1] and "unverified" in lines[1]

    verified = ok(runner.invoke(orgs, ["verify", "acme", "--db", tmp_db_url]))
    assert "verified" in verified.stdout
    listed = ok(runner.invoke(orgs, ["list", "--db", tmp_db_url]))
    assert listed.stdout.splitlines()[1].split()[2] == "verified"

    principal = run_async(_authenticate(tmp_db_url, key))
    assert principal is not None
    assert (principal.org_name, principal.is_admin, principal.verification_status) == (
        "acme",
        True,
        "verified",
    )


def test_revoked_key_no_longer_authenticates(runner: CliRunner, tmp_db_url: str) -> None:
    ok(runner.invoke(orgs, ["create", "acme", "--db", tmp_db_url]))
    made = ok(runner.invoke(keys, ["create", "--org", "acme", "--db", tmp_db_url]))
    key_id = re.search(r"key_\w+", made.stderr)
    assert key_id is not None
    ok(runner.invoke(keys, ["revoke", key_id.group(), "--db", tmp_db_url]))
    assert run_async(_authenticate(tmp_db_url, made.stdout.strip())) is None


def test_unknown_org_exits_1_with_a_message(runner: CliRunner, tmp_db_url: str) -> None:
    for args in (["create", "--org", "ghost"], ["revoke", "key_nope"]):
        result = runner.invoke(keys, [*args, "--db", tmp_db_url])
        assert result.exit_code == 1
        assert result.stdout == ""
        assert "Error:" in result.stderr
    assert (
        "no organization named 'ghost'"
        in runner.invoke(keys, ["create", "--org", "ghost", "--db", tmp_db_url]).stderr
    )
    result = runner.invoke(orgs, ["verify", "ghost", "--db", tmp_db_url])
    assert result.exit_code == 1 and "no organization named 'ghost'" in result.stderr


def test_duplicate_or_invalid_org_exits_1(runner: CliRunner, tmp_db_url: str) -> None:
    ok(runner.invoke(orgs, ["create", "acme", "--db", tmp_db_url]))
    duplicate = runner.invoke(orgs, ["create", "acme", "--db", tmp_db_url])
    assert duplicate.exit_code == 1 and "already exists" in duplicate.stderr
    invalid = runner.invoke(orgs, ["create", "acme/corp", "--db", tmp_db_url])
    assert invalid.exit_code == 1 and "invalid organization name" in invalid.stderr


def test_db_from_env_and_home(runner: CliRunner, tmp_path: Path) -> None:
    env_db = tmp_path / "from-env.db"
    ok(runner.invoke(orgs, ["create", "by-env"], env={"FLEXSERVE_DB": f"sqlite:///{env_db}"}))
    assert env_db.is_file()

    home = tmp_path / "home"
    ok(runner.invoke(orgs, ["create", "by-home", "--home", str(home)]))
    assert (home / "flexserve.db").is_file()
    listed = ok(runner.invoke(orgs, ["list"], env={"FLEXSERVE_HOME": str(home)}))
    assert "by-home" in listed.stdout and "by-env" not in listed.stdout


def test_default_tier_option(runner: CliRunner, tmp_db_url: str) -> None:
    ok(runner.invoke(orgs, ["create", "bulk", "--default-tier", "flex", "--db", tmp_db_url]))
    key = ok(runner.invoke(keys, ["create", "--org", "bulk", "--db", tmp_db_url])).stdout.strip()
    principal = run_async(_authenticate(tmp_db_url, key))
    assert principal is not None and principal.default_service_tier == "flex"


def test_bad_database_url_exits_1(runner: CliRunner) -> None:
    result = runner.invoke(orgs, ["list", "--db", "mysql://localhost/x"])
    assert result.exit_code == 1 and "unsupported database" in result.stderr


def test_help_is_the_docstring(runner: CliRunner) -> None:
    assert "print it, alone, on stdout" in ok(runner.invoke(keys, ["create", "--help"])).stdout
    assert "--db" in ok(runner.invoke(orgs, ["verify", "--help"])).stdout


async def _authenticate(url: str, key: str) -> Principal | None:
    db = Database.from_url(url)
    try:
        return await Accounts(db).authenticate(key)
    finally:
        await db.close()
