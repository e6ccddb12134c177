"""Two gateways on one database and one Redis (setting ``redis``), as an
operator runs them behind a load balancer: an organization's budget holds
across both, whichever gateway each request reaches."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing_support import Org, cli, new_org, pico, results
from conftest import ON_POSTGRES, Gateway, ServerThread, sim_engine, sql_rows, wait_for
from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from redis_server import RedisServer, flex_rooms, slot_leases

# o3's launch prices, in micro-dollars per 1M tokens (= pico-dollars per token).
INPUT, OUTPUT = 10_000_000, 40_000_000
REFRESH = 0.1  # policy_refresh_interval of these gateways


def shared_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    name: str) -> str:
    """A database for gateways to share: on PostgreSQL when the suite runs
    there, else a SQLite file of its own."""
    if ON_POSTGRES:
        return str(request.getfixturevalue("postgres").create_database())
    return f"sqlite:///{tmp_path_factory.mktemp(name) / 'flexserve.db'}"


@pytest.fixture(scope="module")
def fleet(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer, request: pytest.FixtureRequest,
) -> list[Gateway]:
    db_url = shared_database(request, tmp_path_factory, "fleet")
    model = sim_engine().models()[0].id
    cli(db_url, "prices", "set", model, "--input", "10", "--output", "40")
    shared = {"engine": "sim", "db": db_url, "policy_refresh_interval": REFRESH,
              "redis": redis_server.url, "redis_prefix": f"fleet-{uuid.uuid4().hex[:8]}"}
    return [start_gateway(engines=[sim_engine()], org=f"fleet-admin-{i}", **shared) for i in range(2)]


def num_requests(org: Org) -> int:
    return sum(r["num_model_requests"] for r in results(org.usage()))


def total_cost(org: Org) -> int:
    return sum(pico(r["amount"]["value"]) for r in results(org.costs()))


async def test_a_budget_holds_across_gateways_to_one_request(fleet: list[Gateway]) -> None:
    org = await asyncio.to_thread(new_org, fleet[0], "fleet-budget")
    clients = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=org.key, max_retries=0)
               for g in fleet]
    model = (await clients[0].models.list()).data[0].id
    messages = [{"role": "user", "content": "Count to twenty."}]
    max_tokens = 20
    probe = await clients[0].chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
    assert probe.usage is not None and probe.usage.completion_tokens == max_tokens
    one_request = probe.usage.prompt_tokens * INPUT + max_tokens * OUTPUT
    # The gate's hold: a token per prompt byte (+8 a message, +8) and every output token.
    max_cost = (len(messages[0]["content"].encode()) + 16) * INPUT + max_tokens * OUTPUT
    await asyncio.to_thread(lambda: wait_for(lambda: num_requests(org) == 1))
    budget = one_request * 21  # the probe's, and twenty more
    budget_usd = f"{budget / 10**12:.12f}".rstrip("0")
    assert round(float(budget_usd) * 10**6) * 10**6 == budget  # whole micro-dollars
    await asyncio.to_thread(
        cli, fleet[0].db_url, "orgs", "set-budget", "fleet-budget", "--monthly-usd", budget_usd)
    await asyncio.sleep(REFRESH * 5)  # both gateways reload it

    async def one(i: int) -> object:
        try:
            return await clients[i % 2].chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one(i) for i in range(100)))
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    num_ok = len(outcomes) - len(refused)
    assert refused and num_ok >= 5
    assert {error.code for error in refused} == {"insufficient_quota"}
    # Then one at a time on each gateway in turn until both refuse.
    i, refusals = 0, 0
    while refusals < 2:
        outcome = await one(i)
        i += 1
        if isinstance(outcome, openai.RateLimitError):
            refusals += 1
        else:
            num_ok, refusals = num_ok + 1, 0
    await asyncio.to_thread(lambda: wait_for(lambda: num_requests(org) == 1 + num_ok, 30))
    spent = await asyncio.to_thread(total_cost, org)
    assert budget <= spent <= budget + max_cost, (budget, spent, max_cost)
    for client in clients:
        await client.close()


def test_each_gateway_holds_a_lease_while_it_runs(fleet: list[Gateway], redis_server: RedisServer) -> None:
    """Each gateway holds a lease in Redis while it runs (the set the budget
    script sums holds over)."""
    import redis

    with redis.Redis.from_url(redis_server.url) as client:
        prefix = fleet[0].settings.redis_prefix
        leases = client.zrange(f"{prefix}:gateways", 0, -1, withscores=True)
        now_ms = time.time() * 1000
        assert len(leases) == 2
        assert all(now_ms < score <= now_ms + fleet[0].settings.redis_lease_ttl * 1000 + 1000
                   for _, score in leases)


def test_while_redis_is_away_budgeted_requests_get_503_and_the_rest_are_served(
    fleet: list[Gateway], redis_server: RedisServer
) -> None:
    capped = new_org(fleet[1], "fleet-away-capped")
    free = new_org(fleet[1], "fleet-away-free")
    cli(fleet[1].db_url, "orgs", "set-budget", "fleet-away-capped", "--monthly-usd", "100")
    model = capped.client().models.list().data[0].id
    messages = [{"role": "user", "content": "Hello."}]
    capped.client().chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    time.sleep(REFRESH * 5)  # the budget is loaded
    redis_server.pause()
    try:
        with pytest.raises(openai.APIStatusError) as away:
            capped.client().chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
        served = free.client().chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    finally:
        redis_server.resume()
    assert away.value.status_code == 503
    assert away.value.code == "shared_state_unavailable"
    assert int(away.value.response.headers["retry-after"]) >= 1
    assert served.usage is not None
    # Back: served again; the ledger has every request served, none refused.
    capped.client().chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    wait_for(lambda: num_requests(capped) == 2 and num_requests(free) == 1, 30)


async def test_a_rate_limit_holds_across_gateways(fleet: list[Gateway]) -> None:
    org = await asyncio.to_thread(new_org, fleet[0], "fleet-rate")
    await asyncio.to_thread(
        cli, fleet[0].db_url, "orgs", "set-rate-limit", "fleet-rate", "--tier", "default", "--rpm", "6")
    await asyncio.sleep(REFRESH * 5)
    clients = [openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=org.key, max_retries=0)
               for g in fleet]
    model = (await clients[0].models.list()).data[0].id

    async def one(i: int) -> object:
        try:
            return await clients[i % 2].chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
        except openai.RateLimitError as exc:
            return exc

    outcomes = await asyncio.gather(*(one(i) for i in range(30)))
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert {error.code for error in refused} == {"rate_limit_exceeded"}
    # Six a minute for the organization, whichever gateway each reached (a
    # seventh only if the buckets refilled a whole request meanwhile: 10 s).
    assert 30 - len(refused) == 6
    for client in clients:
        await client.close()


@pytest.fixture(scope="module")
def one_engine() -> Iterator[ServerThread]:
    """One engine replica (a sim-engine server) running 4 sequences at once."""
    with ServerThread(create_sim_app(SimModel("h100-llama3-8b", speed=2.0, max_num_seqs=4))) as server:
        yield server


@pytest.fixture(scope="module")
def pair_on_one_engine(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer, one_engine: ServerThread, request: pytest.FixtureRequest,
) -> list[Gateway]:
    db_url = shared_database(request, tmp_path_factory, "pair")
    # A small quantum: a turn of flex's fair queue releases one request.
    shared = {"engine": "upstream", "upstreams": [one_engine.url], "upstream_capacity": 4,
              "db": db_url, "redis": redis_server.url, "fair_quantum": 64,
              "redis_prefix": f"pair-{uuid.uuid4().hex[:8]}"}
    return [start_gateway(org=f"pair-admin-{i}", **shared) for i in range(2)]


@contextlib.contextmanager
def watched(gateways: list[Gateway], engine: ServerThread, redis_url: str) -> Iterator[list[dict[str, float]]]:
    """Every 10 ms while the block runs: the slots the gateways lease on the
    engine (Redis), the runs each has in flight on it, and the engine's own
    running and waiting sequences."""
    import redis

    seen: list[dict[str, float]] = []
    stop = threading.Event()
    key = f"{gateways[0].settings.redis_prefix}:slots:upstream:{engine.url}"

    def metrics(http: httpx.Client, url: str) -> dict[str, float]:
        text = http.get(url + "/metrics").text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    def watch() -> None:
        with httpx.Client(timeout=5) as http, redis.Redis.from_url(redis_url) as client:
            while not stop.is_set():
                leases = client.hgetall(key)
                in_flight = [metrics(http, g.url)["flexserve_in_flight"] for g in gateways]
                on_engine = metrics(http, engine.url)
                seen.append({
                    "leased": sum(slot_leases(leases).values()),
                    "flex_room": sum(flex_rooms(leases).values()),
                    "in_flight": sum(in_flight),
                    "running": on_engine["vllm:num_requests_running"],
                    "waiting": on_engine["vllm:num_requests_waiting"],
                })
                time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.mark.parametrize("tier", ["default", "flex"])
async def test_two_gateways_never_send_one_engine_more_than_it_runs(
    pair_on_one_engine: list[Gateway], one_engine: ServerThread, redis_server: RedisServer,
    tier: str,
) -> None:
    """Each gateway alone would fill the engine's 4 slots: together, on
    shared leases, they never lease or run more than 4 (flex: 3, the fifth of
    the slots kept for default once for the engine, not once per gateway),
    and every request is served."""
    clients = [g.async_client() for g in pair_on_one_engine]
    model = (await clients[0].models.list()).data[0].id

    async def one(i: int) -> object:
        return await clients[i % 2].chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write."}], max_tokens=150,
            service_tier=tier)  # type: ignore[arg-type]

    with watched(pair_on_one_engine, one_engine, redis_server.url) as seen:
        answers = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(a.usage.completion_tokens == 150 for a in answers)  # type: ignore[attr-defined]
    assert len(seen) > 20
    assert max(s["leased"] for s in seen) <= 4
    most = max(s["in_flight"] for s in seen)
    if tier == "default":
        assert most == 4, seen  # the whole engine, shared, and no more
    else:
        assert max(s["flex_room"] for s in seen) <= 3
        assert most == 3, seen
    for client in clients:
        await client.close()


async def test_an_organization_spreading_flex_over_gateways_gets_about_its_part(
    pair_on_one_engine: list[Gateway],
) -> None:
    """A sends 16 flex requests to each gateway, B 16 to the first only.
    Leases shared by organization (and turns weighed by them) keep A near
    half of what the engine serves while both wait, not the three quarters
    a share per gateway gives it (measured: 0.73; one gateway: 0.54)."""
    orgs = [await asyncio.to_thread(new_org, pair_on_one_engine[0], name)
            for name in ("spread-a", "spread-b")]

    def client(gateway: Gateway, org: Org) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=org.key, max_retries=0)

    plan = ([(client(pair_on_one_engine[0], orgs[0]), "a")] * 16
            + [(client(pair_on_one_engine[1], orgs[0]), "a")] * 16
            + [(client(pair_on_one_engine[0], orgs[1]), "b")] * 16)
    model = (await plan[0][0].models.list()).data[0].id
    done: list[tuple[float, str]] = []

    async def one(client: openai.AsyncOpenAI, who: str) -> None:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write."}], max_tokens=100,
            service_tier="flex")
        done.append((time.monotonic(), who))

    await asyncio.gather(*(one(c, who) for c, who in plan))
    both_waiting_until = min(max(t for t, w in done if w == who) for who in ("a", "b"))
    served = [who for t, who in sorted(done) if t <= both_waiting_until]
    share_of_a = served.count("a") / len(served)
    assert share_of_a <= 0.65, (share_of_a, len(served))


def test_a_key_revoked_with_the_cli_is_refused_by_every_gateway_at_once(
    fleet: list[Gateway], redis_server: RedisServer,
) -> None:
    """The CLI, given the gateways' Redis, tells them the database changed:
    each forgets the keys it knows (kept 5 s otherwise) and reloads its policy."""
    from click.testing import CliRunner

    from flexserve.cli import main

    org = new_org(fleet[0], "fleet-revoke")
    model = org.client().models.list().data[0].id
    created = CliRunner().invoke(main, ["keys", "create", "--org", "fleet-revoke", "--db", fleet[0].db_url])
    key = created.stdout.strip()
    key_id = created.stderr.split("key ")[1].split(" ")[0]
    clients = [openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0) for g in fleet]
    for client in clients:  # each gateway now knows the key
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi."}], max_tokens=1)
    env = {"FLEXSERVE_REDIS": redis_server.url, "FLEXSERVE_REDIS_PREFIX": fleet[0].settings.redis_prefix}
    revoked = CliRunner().invoke(main, ["keys", "revoke", key_id, "--db", fleet[0].db_url], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert "warning" not in revoked.stderr

    def refused(client: openai.OpenAI) -> bool:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    # Well inside the 2.5-5 s the gateways would otherwise keep the key's
    # answer (refreshed in the background from half its 5 s on).
    wait_for(lambda: all(refused(client) for client in clients), 1.0)


@pytest.fixture(scope="module")
def batch_pair(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer, request: pytest.FixtureRequest,
) -> list[Gateway]:
    """Two gateways sharing a database and a files directory (a shared volume)."""
    db_url = shared_database(request, tmp_path_factory, "batch-pair")
    shared = {"engine": "sim", "db": db_url, "files_dir": str(tmp_path_factory.mktemp("shared-files")),
              "batch_adopt_interval": 0.3, "batch_window": 8, "redis": redis_server.url,
              "redis_prefix": f"batch-{uuid.uuid4().hex[:8]}"}
    return [start_gateway(engines=[sim_engine(speed=1.0)], org=f"batch-admin-{i}", **shared)
            for i in range(2)]


def test_a_batch_created_on_one_gateway_is_run_by_both_each_line_once(batch_pair: list[Gateway]) -> None:
    import json

    org = new_org(batch_pair[0], "fleet-batch")
    clients = [openai.OpenAI(base_url=g.url + "/v1", api_key=org.key, max_retries=0) for g in batch_pair]
    model = clients[0].models.list().data[0].id
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": f"Line {i}."}],
                       "max_tokens": 40}}
             for i in range(60)]
    upload = clients[0].files.create(
        file=("in.jsonl", "\n".join(json.dumps(line) for line in lines).encode()), purpose="batch")
    batch = clients[0].batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := clients[1].batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 60
    # Both gateways ran lines; each line ran once and is billed once.
    runners = sql_rows(batch_pair[0].db_url,
                       "SELECT claimed_by, COUNT(*) AS n, MAX(attempts) AS tries FROM batch_lines "
                       "WHERE batch_id = :b GROUP BY claimed_by", b=batch.id)
    assert len(runners) == 2 and all(r["tries"] == 1 for r in runners), runners
    wait_for(lambda: sql_rows(batch_pair[0].db_url,
                              "SELECT COUNT(*) AS n FROM usage_records u JOIN batch_lines l "
                              "ON u.request_id = l.request_id WHERE l.batch_id = :b", b=batch.id
                              )[0]["n"] >= 60, 10)
    billed = sql_rows(batch_pair[0].db_url,
                      "SELECT COUNT(*) AS n, COUNT(DISTINCT u.request_id) AS d FROM usage_records u "
                      "JOIN batch_lines l ON u.request_id = l.request_id WHERE l.batch_id = :b",
                      b=batch.id)
    assert billed[0]["n"] == billed[0]["d"] == 60
    # The output, written by whichever gateway finished, reads the same from either.
    outputs = [client.files.content(batch.output_file_id).text for client in clients]  # type: ignore[arg-type]
    assert outputs[0] == outputs[1]
    assert sorted(json.loads(row)["custom_id"] for row in outputs[0].splitlines()) == sorted(
        f"l{i}" for i in range(60))


def by_sender(gateway: Gateway, name: str) -> dict[tuple[str, str], float]:
    """The gateway's gauge ``name`` by replica and `sent_by`."""
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    return {(sample.labels["replica"], sample.labels["sent_by"]): sample.value
            for family in text_string_to_metric_families(text) if family.name == name
            for sample in family.samples}


def awaiting_prefill(gateway: Gateway) -> dict[str, float]:
    """The gateway's `flexserve_engine_prompt_tokens_awaiting_prefill` by
    `sent_by` (one replica)."""
    return {sent_by: value for (_, sent_by), value in
            by_sender(gateway, "flexserve_engine_prompt_tokens_awaiting_prefill").items()}


def test_a_prompt_awaiting_prefill_on_one_gateway_is_counted_by_the_other(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer, request: pytest.FixtureRequest,
) -> None:
    """A long prompt on a slow engine, sent through the first gateway: while
    it awaits its first token the second counts it as the other gateways'
    (and would place default elsewhere by it); once it has its output, as
    nothing."""
    slow = SimModel("h100-llama3-8b", speed=0.02, max_num_seqs=4)  # 2,500 tokens prefill in ~2.5 s
    with ServerThread(create_sim_app(slow)) as engine:
        shared = {"engine": "upstream", "upstreams": [engine.url], "upstream_capacity": 4,
                  "db": shared_database(request, tmp_path_factory, "prefills"), "redis": redis_server.url,
                  "redis_prefix": f"prefills-{uuid.uuid4().hex[:8]}"}
        first, second = [start_gateway(org=f"prefills-admin-{i}", **shared) for i in range(2)]
        answer: list[object] = []
        sender = threading.Thread(target=lambda: answer.append(first.client().chat.completions.create(
            model=slow.model_id, messages=[{"role": "user", "content": "word " * 2_500}], max_tokens=1,
            service_tier="flex")))
        sender.start()
        try:
            wait_for(lambda: awaiting_prefill(first)["this_gateway"] > 2_000, 10)
            mine = awaiting_prefill(first)["this_gateway"]
            wait_for(lambda: awaiting_prefill(second)["other_gateways"] == mine, 5)
            assert awaiting_prefill(second)["this_gateway"] == 0
        finally:
            sender.join(timeout=60)
        assert len(answer) == 1
        wait_for(lambda: awaiting_prefill(second)["other_gateways"] == 0, 5)
        assert awaiting_prefill(first)["this_gateway"] == 0


def test_packed_gateways_send_default_to_the_same_replica_while_flex_runs(
    start_gateway: Callable[..., Gateway], tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer, request: pytest.FixtureRequest,
) -> None:
    """Two gateways with `default_placement = "pack"` in front of two slow
    engines, each running a flex request: the two default requests sent to
    the first gateway, then the two sent to the second, all run on the
    replica first by name (a flex room of 6 holds them), and the second
    gateway counts the first's there, as told through Redis. Spread, the
    first gateway's two would have gone one to each replica."""
    engines = [SimModel("h100-llama3-8b", speed=0.2, max_num_seqs=8) for _ in range(2)]  # ~30 ms a step
    with ServerThread(create_sim_app(engines[0])) as one, ServerThread(create_sim_app(engines[1])) as two:
        shared = {"engine": "upstream", "upstreams": [one.url, two.url], "upstream_capacity": 8,
                  "default_placement": "pack", "redis": redis_server.url,
                  "db": shared_database(request, tmp_path_factory, "packed"),
                  "redis_prefix": f"packed-{uuid.uuid4().hex[:8]}"}
        gateways = [start_gateway(org=f"packed-admin-{i}", **shared) for i in range(2)]
        model = engines[0].model_id
        first_replica = min(f"upstream:{url}" for url in (one.url, two.url))
        answers: list[object] = []

        def ask(gateway: Gateway, tier: str, max_tokens: int) -> threading.Thread:
            def send() -> None:
                try:
                    answers.append(gateway.client().chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "Enrich this record."}],
                        max_tokens=max_tokens, service_tier=tier))  # type: ignore[arg-type]
                except openai.APIError as exc:
                    answers.append(exc)
            thread = threading.Thread(target=send, daemon=True)
            thread.start()
            return thread

        def runs(gateway: Gateway, sent_by: str) -> list[float]:
            values = by_sender(gateway, "flexserve_engine_default_runs")
            return [values[(replica, sent_by)] for replica in sorted({r for r, _ in values})]

        threads = [ask(gateway, "flex", 400) for gateway in gateways]
        wait_for(lambda: all(scrape_in_flight(gateway, "flex") == 1 for gateway in gateways), 20)
        threads += [ask(gateways[0], "default", 150) for _ in range(2)]
        wait_for(lambda: runs(gateways[0], "this_gateway") == [2, 0], 20)
        wait_for(lambda: runs(gateways[1], "other_gateways") == [2, 0], 5)
        threads += [ask(gateways[1], "default", 150) for _ in range(2)]
        wait_for(lambda: runs(gateways[1], "this_gateway") == [2, 0], 20)
        assert sorted({r for r, _ in by_sender(gateways[1], "flexserve_engine_default_runs")})[0] == first_replica
        for thread in threads:
            thread.join(timeout=60)
        assert len(answers) == 6
        assert not any(isinstance(answer, BaseException) for answer in answers), answers


def scrape_in_flight(gateway: Gateway, tier: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "flexserve_in_flight" for sample in family.samples
               if sample.labels.get("tier") == tier)
