"""Metering end to end: the official SDK against a real gateway (in front of
the in-process sim engine), prices set with the real CLI, and the usage and
costs APIs read back — every number compared to the token and the pico-dollar."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from billing_support import Org, cli, ledger, new_org, pico, results
from conftest import Gateway, sim_engine, sim_model_id, wait_for
from openapi import validate

MESSAGES = [{"role": "user", "content": "Summarise flex processing in a few words."}]
# o3's launch prices, in micro-dollars per 1M tokens (= pico-dollars per token).
INPUT, CACHED, OUTPUT = 10_000_000, 2_500_000, 40_000_000
REFRESH = 0.1  # policy_refresh_interval of these gateways


@pytest.fixture(scope="module")
def billed(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('billing') / 'flexserve.db'}"
    model = sim_engine().models()[0].id
    cli(db_url, "prices", "set", model, "--input", "10", "--output", "40", "--cached-input", "2.5")
    return start_gateway(
        engines=[sim_engine()], engine="sim", db=db_url, policy_refresh_interval=REFRESH
    )


@pytest.fixture(scope="module")
def model(billed: Gateway) -> str:
    return sim_model_id(billed)


def wait_for_policy() -> None:
    """Long enough for the gateway to reload what the CLI just changed."""
    time.sleep(REFRESH * 5)


def num_requests(org: Org) -> int:
    return sum(r["num_model_requests"] for r in results(org.usage()))


def total_cost(org: Org) -> int:
    return sum(pico(r["amount"]["value"]) for r in results(org.costs()))


def test_usage_and_costs_per_tier_match_the_responses(billed: Gateway, model: str) -> None:
    org = new_org(billed, "tiers")
    client = org.client()
    seen: dict[str, list[int]] = {"default": [0, 0, 0], "flex": [0, 0, 0]}

    def add(tier: str | None, usage: Any) -> None:
        assert tier is not None and usage is not None
        seen[tier][0] += usage.prompt_tokens
        seen[tier][1] += usage.completion_tokens
        seen[tier][2] += 1

    for tier, max_tokens in [(None, 5), ("default", 7), ("auto", 3), ("flex", 9), ("flex", 11)]:
        extra = {} if tier is None else {"service_tier": tier}
        completion = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=max_tokens,
            **extra,
        )
        add(completion.service_tier, completion.usage)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=13,
            service_tier="flex",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    add(chunks[-1].service_tier, chunks[-1].usage)
    wait_for(lambda: num_requests(org) == 6)

    usage = org.usage(group_by="service_tier")
    validate(usage, "UsageResponse")
    by_tier = {r["service_tier"]: r for r in results(usage)}
    assert set(by_tier) == {"default", "flex"}
    for tier, (prompt, completion_tokens, count) in seen.items():
        assert (
            by_tier[tier]["input_tokens"],
            by_tier[tier]["output_tokens"],
            by_tier[tier]["num_model_requests"],
        ) == (prompt, completion_tokens, count)
        assert by_tier[tier]["model"] is None and by_tier[tier]["project_id"] is None

    costs = org.costs(group_by="line_item")
    validate(costs, "UsageResponse")
    lines = {r["line_item"]: r for r in results(costs)}
    assert set(lines) == {
        f"{model}, {line}, {tier}" for line in ("input", "output") for tier in ("default", "flex")
    }
    (d_in, d_out, _), (f_in, f_out, _) = seen["default"], seen["flex"]
    expected = {
        f"{model}, input, default": (d_in, d_in * INPUT),
        f"{model}, output, default": (d_out, d_out * OUTPUT),
        f"{model}, input, flex": (f_in, f_in * INPUT // 2),
        f"{model}, output, flex": (f_out, f_out * OUTPUT // 2),
    }
    for item, (tokens, cost) in expected.items():
        assert (lines[item]["quantity"], pico(lines[item]["amount"]["value"])) == (tokens, cost)
        assert (
            lines[item]["quantity_unit"] == "tokens" and lines[item]["amount"]["currency"] == "usd"
        )

    # Costs = default at list price + flex at half.
    default_list = d_in * INPUT + d_out * OUTPUT
    flex_list = f_in * INPUT + f_out * OUTPUT
    (whole,) = results(org.costs())
    assert (
        whole["line_item"] is None
        and pico(whole["amount"]["value"]) == default_list + flex_list // 2
    )

    savings = org.get("/v1/organization/flex/savings", start_time=int(time.time()) - 3600).json()
    (flex,) = results(savings)
    assert flex["service_tier"] == "flex" and flex["num_model_requests"] == 3
    assert pico(flex["list_amount"]["value"]) == flex_list
    assert pico(flex["savings"]["value"]) == flex_list - flex_list // 2

    # Each ledger row keeps the served tier's price beside its cost.
    rows = ledger(
        billed,
        "org_id = (SELECT org_id FROM api_keys WHERE prefix = :prefix)",
        prefix=org.key[:8] + "…" + org.key[-4:],
    )
    assert len(rows) == 6
    for row in rows:
        factor = 2 if row["served_tier"] == "flex" else 1
        assert row["input_price_micro"] * factor == INPUT
        assert row["output_price_micro"] * factor == OUTPUT
        assert row["cached_input_price_micro"] * factor == CACHED
        assert row["output_cost_pico"] == row["completion_tokens"] * row["output_price_micro"]
        assert (
            row["list_cost_pico"]
            == row["prompt_tokens"] * INPUT + row["completion_tokens"] * OUTPUT
        )


def test_a_refused_flex_request_adds_nothing(billed: Gateway, model: str) -> None:
    org = new_org(billed, "refused")
    cli(billed.db_url, "orgs", "set-rate-limit", "refused", "--tier", "flex", "--rpm", "1")
    client = org.client()
    served = 0

    def limit_in_force() -> bool:
        nonlocal served
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=4, service_tier="flex"
        )
        served += 1
        return raw.headers.get("x-ratelimit-limit-requests") == "1"

    wait_for(limit_in_force)  # the last one took the only request of this minute
    wait_for(lambda: num_requests(org) == served)
    before = total_cost(org)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, service_tier="flex"
        )
    assert caught.value.code == "rate_limit_exceeded"
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    refused_id = headers["x-request-id"]

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=3
    )
    after = raw.parse()
    assert after.service_tier == "default" and after.usage is not None
    wait_for(lambda: num_requests(org) == served + 1)
    assert ledger(billed, "request_id = :rid", rid=refused_id) == []
    cost = after.usage.prompt_tokens * INPUT + after.usage.completion_tokens * OUTPUT
    assert total_cost(org) == before + cost


async def test_budget_under_concurrency_overspends_by_at_most_one_request(
    billed: Gateway, model: str
) -> None:
    org = await asyncio.to_thread(new_org, billed, "budget")
    messages = [{"role": "user", "content": "Count to twenty."}]
    max_tokens = 20
    probe = await org.async_client().chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
    )
    assert probe.usage is not None and probe.usage.completion_tokens == max_tokens
    one_request = probe.usage.prompt_tokens * INPUT + max_tokens * OUTPUT
    # The gate's hold: a token per prompt byte (+8 a message, +8) and every output token.
    max_cost = (len(messages[0]["content"].encode()) + 16) * INPUT + max_tokens * OUTPUT
    await asyncio.to_thread(lambda: wait_for(lambda: num_requests(org) == 1))
    budget = one_request * 11  # the probe's, and ten more
    budget_usd = f"{budget / 10**12:.12f}".rstrip("0")
    assert round(float(budget_usd) * 10**6) * 10**6 == budget  # whole micro-dollars
    await asyncio.to_thread(
        cli, billed.db_url, "orgs", "set-budget", "budget", "--monthly-usd", budget_usd
    )
    await asyncio.to_thread(wait_for_policy)

    client = org.async_client()

    async def one() -> object:
        try:
            return await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
            )
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one() for _ in range(50)))
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    num_ok = 50 - len(refused)
    assert refused and num_ok >= 5
    for error in refused:
        assert error.code == "insufficient_quota"
        assert error.response.headers["x-should-retry"] == "false"
        assert "budget" in error.message
    # Then one at a time until the budget is spent.
    while True:
        outcome = await one()
        if isinstance(outcome, openai.RateLimitError):
            break
        num_ok += 1
    await asyncio.to_thread(lambda: wait_for(lambda: num_requests(org) == 1 + num_ok))
    spent = await asyncio.to_thread(total_cost, org)
    assert budget <= spent <= budget + max_cost
    await client.close()


def test_a_project_budget_of_its_own(billed: Gateway, model: str) -> None:
    org = new_org(billed, "projects")
    project_id = cli(billed.db_url, "projects", "create", "--org", "projects", "capped").strip()
    cli(billed.db_url, "projects", "set-budget", project_id, "--monthly-usd", "0.000001")
    wait_for_policy()
    capped = org.client(org.member_key(project_id))
    capped.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)  # under: admitted
    wait_for(lambda: num_requests(org) == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        capped.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert caught.value.code == "insufficient_quota" and project_id in caught.value.message
    # The organization's other projects are not capped.
    org.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)


async def test_simultaneous_requests_never_pass_the_rate_limit(billed: Gateway, model: str) -> None:
    org = await asyncio.to_thread(new_org, billed, "limited")
    await asyncio.to_thread(
        cli, billed.db_url, "orgs", "set-rate-limit", "limited", "--tier", "flex", "--rpm", "5"
    )
    await asyncio.to_thread(wait_for_policy)
    client = org.async_client()

    async def one() -> Any:
        try:
            return await client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=2, service_tier="flex"
            )
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one() for _ in range(20)))
    ok = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(ok) == 5 and len(refused) == 15
    remaining = sorted(int(o.headers["x-ratelimit-remaining-requests"]) for o in ok)
    assert remaining == [0, 1, 2, 3, 4]
    for raw in ok:
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    for error in refused:
        assert error.code == "rate_limit_exceeded" and error.type == "requests"
        assert int(error.response.headers["retry-after"]) >= 1
    # Default is a tier of its own: not limited.
    completion = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert completion.service_tier == "default"
    await client.close()


def test_organizations_see_only_their_own(billed: Gateway, model: str) -> None:
    mine, theirs = new_org(billed, "mine"), new_org(billed, "theirs")
    mine.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    for _ in range(2):
        theirs.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    wait_for(lambda: num_requests(mine) == 1 and num_requests(theirs) == 2)
    their_projects = {r["project_id"] for r in results(theirs.usage(group_by="project_id"))}
    (their_project,) = their_projects
    assert results(mine.usage(project_ids=their_project)) == []
    assert results(mine.costs(project_ids=their_project)) == []
    (mine_only,) = results(mine.usage(group_by=["project_id", "api_key_id", "model"]))
    assert mine_only["project_id"] != their_project and mine_only["model"] == model


@pytest.mark.parametrize(
    "path",
    [
        "/v1/organization/usage/completions",
        "/v1/organization/costs",
        "/v1/organization/flex/savings",
        "/v1/organization/verification",
    ],
)
def test_non_admin_keys_are_refused(billed: Gateway, path: str) -> None:
    org = new_org(billed, f"members-{path.rsplit('/', 1)[-1]}")
    member = org.member_key()
    response = org.get(path, key=member, start_time=0)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "insufficient_permissions"
    assert org.get(path, key="sk-fs-nope", start_time=0).status_code == 401
    if path.endswith("verification"):
        refused = org.post(
            path, {"document_type": "passport", "country": "FR", "number": "AB1234"}, key=member
        )
        assert refused.status_code == 403


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/organization/usage/completions", {}, "start_time"),
        ("/v1/organization/usage/completions", {"start_time": "yesterday"}, "start_time"),
        ("/v1/organization/usage/completions", {"start_time": 100, "end_time": 50}, "end_time"),
        (
            "/v1/organization/usage/completions",
            {"start_time": 0, "bucket_width": "2h"},
            "bucket_width",
        ),
        ("/v1/organization/usage/completions", {"start_time": 0, "group_by": "colour"}, "group_by"),
        ("/v1/organization/usage/completions", {"start_time": 0, "limit": 0}, "limit"),
        (
            "/v1/organization/usage/completions",
            {"start_time": 0, "bucket_width": "1d", "limit": 32},
            "limit",
        ),
        ("/v1/organization/usage/completions", {"start_time": 0, "page": "xyz"}, "page"),
        ("/v1/organization/usage/completions", {"start_time": 0, "batch": "maybe"}, "batch"),
        ("/v1/organization/usage/completions", {"start_time": 0, "user_ids": "u1"}, "user_ids"),
        ("/v1/organization/costs", {"start_time": 0, "bucket_width": "1h"}, "bucket_width"),
        ("/v1/organization/costs", {"start_time": 0, "group_by": "model"}, "group_by"),
        ("/v1/organization/costs", {"start_time": 0, "limit": 181}, "limit"),
    ],
)
def test_query_parameters_are_validated(
    billed: Gateway, path: str, params: dict[str, Any], param: str
) -> None:
    org = Org("test-org", billed.api_key, billed)
    response = org.get(path, **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]


def test_pagination_by_buckets(billed: Gateway, model: str) -> None:
    org = new_org(billed, "pages")
    org.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=3)
    wait_for(lambda: num_requests(org) == 1)
    start = int(time.time()) - 3600
    end = int(time.time()) + 60
    first = org.usage(start_time=start, end_time=end, bucket_width="1m", limit=25)
    validate(first, "UsageResponse")
    assert len(first["data"]) == 25 and first["has_more"] and first["next_page"]
    pages, page = [first], first
    while page["has_more"]:
        page = org.usage(
            start_time=start, end_time=end, bucket_width="1m", limit=25, page=page["next_page"]
        )
        pages.append(page)
    buckets = [bucket for p in pages for bucket in p["data"]]
    assert len(pages) == 3 and len(buckets) == 61
    assert [b["start_time"] for b in buckets] == list(range(start, end, 60))
    assert buckets[-1]["end_time"] == end
    assert sum(r["num_model_requests"] for b in buckets for r in b["results"]) == 1


def test_the_project_tier_is_what_auto_means(billed: Gateway, model: str) -> None:
    org = new_org(billed, "auto-tier")
    project_id = cli(
        billed.db_url, "projects", "create", "--org", "auto-tier", "evals", "--default-tier", "flex"
    ).strip()
    evals = org.client(org.member_key(project_id))
    assert (
        evals.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).service_tier
        == "flex"
    )
    cli(billed.db_url, "projects", "set-tier", project_id, "default")
    # A new key is not in the gateway's key cache: it sees the new tier at once.
    again = org.client(org.member_key(project_id))
    completion = again.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, service_tier="auto"
    )
    assert completion.service_tier == "default"
    wait_for(lambda: num_requests(org) == 2)
    tiers = {
        r["service_tier"]: r["num_model_requests"]
        for r in results(org.usage(group_by="service_tier"))
    }
    assert tiers == {"flex": 1, "default": 1}


@pytest.fixture(scope="module")
def tiny(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    """One sequence at a time, in real time: easy to keep busy."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('tiny') / 'flexserve.db'}"
    engine = sim_engine(speed=1.0, max_num_seqs=1)
    cli(db_url, "prices", "set", engine.models()[0].id, "--input", "10", "--output", "40")
    return start_gateway(engines=[engine], engine="sim", db=db_url, policy_refresh_interval=REFRESH)


def test_flex_refused_for_capacity_is_not_billed_and_a_disconnect_pays_what_it_got(
    tiny: Gateway,
) -> None:
    model = sim_model_id(tiny)
    org = new_org(tiny, "busy")
    client = org.client()
    # A long default stream holds the only slot.
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4000, stream=True
    )
    stream_id = stream.response.headers["x-request-id"]
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=3,
            service_tier="flex",
            extra_headers={"X-Flex-Max-Wait": "0"},
        )
    assert caught.value.code == "resource_unavailable"
    refused_id = caught.value.response.headers["x-request-id"]
    stream.close()  # the client goes away mid-stream

    wait_for(lambda: len(ledger(tiny, "request_id = :rid", rid=stream_id)) == 1)
    (row,) = ledger(tiny, "request_id = :rid", rid=stream_id)
    assert row["status"] == "client_disconnected" and row["served_tier"] == "default"
    assert 3 <= row["completion_tokens"] < 4000
    # It pays for the tokens generated so far, at the served tier's price.
    assert row["output_cost_pico"] == row["completion_tokens"] * OUTPUT
    assert row["input_cost_pico"] == row["prompt_tokens"] * INPUT
    assert row["prompt_tokens"] > 0  # the prompt was processed: it is billed too
    assert ledger(tiny, "request_id = :rid", rid=refused_id) == []
    (only,) = results(org.costs())
    assert pico(only["amount"]["value"]) == (
        row["input_cost_pico"] + row["cached_input_cost_pico"] + row["output_cost_pico"]
    )


def test_the_flex_client_takes_a_spent_budget_as_final_not_as_a_429_to_wait_out(
    billed: Gateway, model: str, tmp_path: Path,
) -> None:
    """FlexServe refuses past a budget with 429 and `x-should-retry: false`:
    the runner sends each such line once and files it with the reason."""
    from flexserve.client import CallPolicy, RunOptions, run_job
    from flexserve.client.jobs import Line

    org = new_org(billed, "client-budget")
    cli(billed.db_url, "orgs", "set-budget", "client-budget", "--monthly-usd", "0.000001")
    wait_for_policy()
    lines = [Line(f"b-{i}", "/v1/chat/completions", {"model": model, "max_tokens": 5,
                                                      "messages": MESSAGES}) for i in range(4)]
    attempts: list[int] = []

    async def go() -> Any:
        async with org.async_client() as client:
            return await run_job(client, lines, out, RunOptions(
                policy=CallPolicy(tier="default"), concurrency=1),
                on_outcome=lambda line, outcome: attempts.append(outcome.attempts))

    out = tmp_path / "client-budget.jsonl"
    progress = asyncio.run(go())
    assert (progress.done, progress.failed) == (1, 3)  # the first spends it
    assert attempts == [1, 1, 1, 1] and progress.retries == 0
    errors = [line for line in out.with_name("client-budget.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 3 and all('"insufficient_quota"' in line for line in errors)


def test_models_publish_their_prices_and_the_flex_client_counts_with_them(
    billed: Gateway, model: str, tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    org = new_org(billed, "client-prices")
    listed = org.get("/v1/models").json()["data"]
    [entry] = [m for m in listed if m["id"] == model]
    assert entry["pricing"]["default"] == {"input": "10.00", "cached_input": "2.50", "output": "40.00"}
    assert entry["pricing"]["flex"]["output"] == "20.00"  # half, as billed
    validate(org.get(f"/v1/models/{model}").json(), "Model")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": f"p-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 10, "messages": MESSAGES}}) + "\n" for i in range(30)))
    # No --price: the client counts with the prices the gateway publishes.
    done = subprocess.run(
        [sys.executable, "-m", "flexserve.cli", "run", str(source), "-o", str(tmp_path / "out.jsonl"),
         "--base-url", billed.url + "/v1", "--api-key", org.key, "--concurrency", "2",
         "--max-cost", "0.002", "--quiet"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "stopped: the next request could pass --max-cost" in done.stderr
    answered = len((tmp_path / "out.jsonl").read_text().splitlines())
    assert 0 < answered < 30
    cost = Decimal(done.stderr.split("cost: $")[1].split(",")[0])
    assert 0 < cost <= Decimal("0.002")
