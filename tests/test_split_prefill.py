"""Split prefill: a flex prompt warmed into the engine's prefix cache in
pieces before the request. Against sim-engine servers behind the gateway as
upstreams (as vLLM would be), each with its own prefix cache: the answer and
usage are those of an unsplit request, the request is billed once, the
warm-ups reach the engine and are never billed, and an engine that caches
nothing has splitting turned off."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Gateway, ServerThread, sql_rows, wait_for

from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app
from flexserve.scheduler.split_prefill import natural_cached, prefix_lengths

PIECE = 64
MODEL = SimModel("h100-llama3-8b").model_id
# A prompt of a few hundred tokens (sim tokenizer: about a token a word).
PROMPT = "Label each record by its topic. " + " ".join(
    f"record {i}: the river stone light paper garden window." for i in range(60))


def metric(gateway: Gateway, name: str) -> float:
    with gateway.http() as http:
        text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.fixture
def sim_server() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(*, caching: bool = True) -> ServerThread:
        model = SimModel("h100-llama3-8b", speed=50.0, max_num_seqs=16, enable_prefix_caching=caching)
        server = ServerThread(create_sim_app(model)).__enter__()
        server.model = model  # type: ignore[attr-defined]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def ask(gateway: Gateway, tier: str = "flex", **extra: Any) -> Any:
    return gateway.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        service_tier=tier, seed=7, temperature=0, **extra)  # type: ignore[arg-type]


def usage_row(gateway: Gateway, request_id: str) -> dict[str, Any]:
    query = "SELECT * FROM usage_records WHERE request_id = :rid"
    wait_for(lambda: len(sql_rows(gateway.db_url, query, rid=request_id)) == 1)
    return sql_rows(gateway.db_url, query, rid=request_id)[0]


def test_prefix_lengths_leave_the_request_its_last_piece() -> None:
    assert prefix_lengths(64, 64) == []
    assert prefix_lengths(65, 64) == [64]
    assert prefix_lengths(200, 64) == [64, 128, 192]
    assert prefix_lengths(192, 64) == [64, 128]
    assert prefix_lengths(1000, 0) == []


def test_natural_cache_is_what_was_cached_before_any_warm_up() -> None:
    # Nothing cached before: the first piece finds nothing, the rest only the gateway's pieces.
    assert natural_cached([(64, 0), (128, 64), (192, 128)], 192) == 0
    # Another request's 300-token prefix (cached to 288): found past each piece until it ends.
    assert natural_cached([(64, 48), (128, 112), (192, 176), (256, 240), (320, 288), (384, 320)],
                          384) == 288
    # The whole prompt cached (a repeat): what the request itself finds.
    assert natural_cached([(64, 48), (128, 112)], 176) == 176
    # Ended on a piece's boundary: the whole piece, in the client's favour.
    assert natural_cached([(64, 48), (128, 64)], 128) == 64
    # A piece evicted (found less than the gateway's previous piece).
    assert natural_cached([(64, 0), (128, 16)], 128) == 0
    # No warm-ups: the request's own count.
    assert natural_cached([], 32) == 32


def test_a_split_flex_request_answers_and_bills_as_an_unsplit_one(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    split_engine, whole_engine = sim_server(), sim_server()
    split = start_gateway(engine="upstream", upstreams=[split_engine.url], split_prefill_tokens=PIECE)
    whole = start_gateway(engine="upstream", upstreams=[whole_engine.url])
    answers = {name: ask(gateway) for name, gateway in (("split", split), ("whole", whole))}
    bodies = {name: answer.parse() for name, answer in answers.items()}
    assert bodies["split"].choices[0].message.content == bodies["whole"].choices[0].message.content
    assert bodies["split"].usage.model_dump() == bodies["whole"].usage.model_dump()
    assert bodies["split"].service_tier == "flex"
    prompt_tokens = bodies["split"].usage.prompt_tokens
    pieces = (prompt_tokens - 1) // PIECE
    assert pieces >= 3
    # The warm-ups reached the engine, and its request found all of them cached.
    engine: SimModel = split_engine.model  # type: ignore[attr-defined]
    assert metric(split, "flexserve_split_prefill_runs_total") == 1
    assert metric(split, "flexserve_split_prefill_warmups_total") == pieces
    assert metric(split, "flexserve_split_prefill_misses_total") == 0
    assert engine.prefix_cache is not None
    assert engine.prefix_cache.hits >= sum(range(pieces)) * PIECE + pieces * PIECE - 16
    # Computed once: the warm-ups' own tokens and the request's last piece.
    assert metric(split, "flexserve_split_prefill_warmup_tokens_total") == pieces * PIECE
    assert metric(whole, "flexserve_split_prefill_warmups_total") == 0
    # Billed once, for the request's own tokens, as the unsplit one.
    rows = {name: usage_row(gateway, answers[name].headers["x-request-id"])
            for name, gateway in (("split", split), ("whole", whole))}
    for column in ("prompt_tokens", "completion_tokens", "cached_tokens", "served_tier", "status"):
        assert rows["split"][column] == rows["whole"][column], column
    assert sql_rows(split.db_url, "SELECT COUNT(*) AS n FROM usage_records")[0]["n"] == 1


def test_a_cache_the_client_had_is_the_clients_and_the_gateways_is_not(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    split_engine, whole_engine = sim_server(), sim_server()
    split = start_gateway(engine="upstream", upstreams=[split_engine.url], split_prefill_tokens=PIECE)
    whole = start_gateway(engine="upstream", upstreams=[whole_engine.url])
    for gateway in (split, whole):
        ask(gateway)
    again = {name: ask(gateway).parse().usage for name, gateway in (("split", split), ("whole", whole))}
    # A repeat finds its whole prompt cached (less its last block) either way.
    cached = again["whole"].prompt_tokens_details.cached_tokens
    assert cached >= again["whole"].prompt_tokens - 16
    assert again["split"].prompt_tokens_details.cached_tokens == cached


def test_default_is_never_split(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    gateway = start_gateway(engine="upstream", upstreams=[sim_server().url], split_prefill_tokens=PIECE)
    ask(gateway, tier="default")
    assert metric(gateway, "flexserve_split_prefill_warmups_total") == 0


def test_splitting_turns_off_for_an_engine_that_caches_nothing(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    gateway = start_gateway(engine="upstream", upstreams=[sim_server(caching=False).url],
                            split_prefill_tokens=PIECE)
    first = ask(gateway).parse()
    # Two pieces tell: the second found nothing of the first cached.
    assert metric(gateway, "flexserve_split_prefill_warmups_total") == 2
    second = ask(gateway).parse()
    assert metric(gateway, "flexserve_split_prefill_warmups_total") == 2
    assert first.choices[0].message.content == second.choices[0].message.content
    assert second.usage.prompt_tokens_details is None or second.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("setting", [{"split_prefill_tokens": -16}, {"split_prefill_concurrency": 0}])
def test_split_settings_out_of_range_are_refused(setting: dict[str, int]) -> None:
    from flexserve.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="split_prefill"):
        load_settings(overrides=setting, environ={})


def test_two_pieces_in_flight_per_replica_warm_the_same_prompt_as_one(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    gateway = start_gateway(engine="upstream", upstreams=[sim_server().url], split_prefill_tokens=PIECE,
                            split_prefill_concurrency=2)
    usage = ask(gateway).parse().usage
    assert metric(gateway, "flexserve_split_prefill_warmups_total") == (usage.prompt_tokens - 1) // PIECE
    assert metric(gateway, "flexserve_split_prefill_misses_total") == 0


def test_pieces_evicted_before_the_request_are_counted_and_it_is_still_served_and_billed_once(
    start_gateway: Callable[..., Gateway], sim_server: Callable[..., ServerThread]
) -> None:
    """A default prompt that needs most of the engine's KV comes while a long
    flex prompt is being warmed: the engine evicts the warmed pieces, the
    next warm-up finds them gone, and the flex request goes on whole."""
    import threading

    # A tenth of real time: the flex prompt's ~31 warm-ups take seconds, so
    # the default arrives among them however slowly a loaded machine lets the
    # test look (at full speed a CI run once saw them all done first, and
    # nothing left to evict).
    model = SimModel("h100-llama3-8b", speed=0.1, max_num_seqs=8, kv_tokens=2600,
                     enable_prefix_caching=True)
    with ServerThread(create_sim_app(model)) as engine:
        gateway = start_gateway(engine="upstream", upstreams=[engine.url], split_prefill_tokens=PIECE)
        long_prompt = " ".join(["river"] * 2000)
        answers: dict[str, Any] = {}

        def send(tier: str, words: int, max_tokens: int) -> None:
            answers[tier] = gateway.client().chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"{tier} " + " ".join(["stone"] * words)
                                        if tier == "default" else long_prompt}],
                max_tokens=max_tokens, service_tier=tier)  # type: ignore[arg-type]

        flex = threading.Thread(target=send, args=("flex", 0, 8))
        flex.start()
        # Twelve pieces (768 tokens) cached: the default's ~2,030 tokens do not
        # fit beside them in the 2,600 the engine has, so it evicts some.
        wait_for(lambda: metric(gateway, "flexserve_split_prefill_warmups_total") >= 12, timeout=30)
        send("default", 2000, 20)
        flex.join(timeout=60)
    # Counted once for the request, however many of its pieces were gone.
    assert metric(gateway, "flexserve_split_prefill_misses_total") == 1
    usage = answers["flex"].parse().usage
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 2000
    # Nothing of it was cached before the gateway began: the client is credited none.
    assert usage.prompt_tokens_details is None or usage.prompt_tokens_details.cached_tokens == 0
    row = usage_row(gateway, answers["flex"].headers["x-request-id"])
    assert (row["served_tier"], row["cached_tokens"], row["prompt_tokens"]) == ("flex", 0, usage.prompt_tokens)
