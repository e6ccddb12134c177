"""The sim engine's continuous-batching model, without HTTP.

Timings are read from the model's simulated clock (``busy_seconds``, the TTFT
and inter-token histograms), never from the wall clock, so these tests do not
depend on the host's speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import pytest

from flexserve.engines.base import Delta, EngineRequest
from flexserve.engines.sim import PROFILES, SimEngine, SimModel, SimProfile, step_time
from flexserve.engines.sim.model import FILLER_WORDS, SchedulingPolicy
from flexserve.errors import InvalidRequestError

H100 = PROFILES["h100-llama3-8b"]
FAST = 1000.0


def make_request(request_id: str, words: int = 4, *, max_tokens: int | None = 8,
                 priority: int = 0, seed: int | None = None) -> EngineRequest:
    """A one-message request of exactly 4 + words + 2 prompt tokens."""
    return EngineRequest.chat(request_id, "m", [{"role": "user", "content": " ".join(["w"] * words)}],
                              max_tokens=max_tokens, priority=priority, seed=seed)


async def collect(model: SimModel, request: EngineRequest) -> list[Delta]:
    return [delta async for delta in model.generate(request)]


# --- the step-time formula ---------------------------------------------------------


def test_step_time_follows_the_formula() -> None:
    assert step_time(H100, 1, 0) == pytest.approx(0.006)
    assert step_time(H100, 128, 0) == pytest.approx(0.006)  # the first 128 tokens are free
    assert step_time(H100, 128 + 4700, 0) == pytest.approx(0.006 + 0.1)
    assert step_time(H100, 64, 1_000_000) == pytest.approx(0.006 + 0.044)
    a100 = PROFILES["a100-llama3-8b"]
    # Vidur: 2,048 tokens take ~142 ms on an A100 (attention excluded).
    assert step_time(a100, 2048, 0) == pytest.approx(0.142, rel=0.05)
    assert step_time(PROFILES["instant"], 8192, 400_000) == 0.0


def test_step_time_calibrated_costs_a_steps_first_128_tokens() -> None:
    """Vidur's figures: H100 5.6 ms for one token, 6.4 ms for 128; A100 9.7
    and 13.2 ms; linear between, the same slope beyond as the flat model."""
    assert step_time(H100, 1, 0, "calibrated") == pytest.approx(0.0056)
    assert step_time(H100, 64, 0, "calibrated") == pytest.approx(0.0056 + 0.0008 * 63 / 127)
    assert step_time(H100, 128, 0, "calibrated") == pytest.approx(0.0064)
    assert step_time(H100, 128 + 4700, 0, "calibrated") == pytest.approx(0.0064 + 0.1)
    assert step_time(H100, 64, 1_000_000, "calibrated") == pytest.approx(0.00600 + 0.044, rel=0.01)
    a100 = PROFILES["a100-llama3-8b"]
    assert step_time(a100, 1, 0, "calibrated") == pytest.approx(0.0097)
    assert step_time(a100, 64, 0, "calibrated") == pytest.approx(0.0112, rel=0.03)  # Vidur: 11.2
    assert step_time(a100, 128, 0, "calibrated") == pytest.approx(0.0132)
    assert step_time(PROFILES["instant"], 8192, 400_000, "calibrated") == 0.0


async def test_a_calibrated_engine_steps_as_its_cost_model_says_and_tells_the_gateway() -> None:
    model = SimModel(H100, speed=FAST, cost_model="calibrated")
    await collect(model, make_request("one", max_tokens=32))
    # A lone sequence: its prompt's step, then 31 one-token decode steps.
    prompt = model.num_prompt_tokens
    expected = step_time(H100, prompt, prompt + 1, "calibrated") + sum(
        step_time(H100, 1, prompt + 1 + k, "calibrated") for k in range(1, 32))
    assert model.busy_seconds == pytest.approx(expected)
    await model.close()
    engine = SimEngine(H100, speed=4.0, cost_model="calibrated")
    seen = engine.step_time_model()
    assert seen.step_time(64, 10_000) == pytest.approx(step_time(H100, 64, 10_000, "calibrated") / 4)
    assert SimEngine(H100).step_time_model().step_time(64, 0) == pytest.approx(0.006)
    with pytest.raises(ValueError, match="cost_model must be one of flat, calibrated"):
        SimModel(H100, cost_model="linear")


def test_profiles_are_named_and_say_sim() -> None:
    assert set(PROFILES) == {"h100-llama3-8b", "a100-llama3-8b", "instant"}
    for name, profile in PROFILES.items():
        assert profile.name == name
        assert "sim" in profile.model_id
    assert PROFILES["instant"].instant and not H100.instant


# --- throughput ----------------------------------------------------------------


async def measured_throughput(num_requests: int, max_num_seqs: int = 256) -> float:
    """Output tokens per simulated second with `num_requests` concurrent requests."""
    model = SimModel(H100, speed=FAST, max_num_seqs=max_num_seqs)
    await asyncio.gather(*(collect(model, make_request(f"r{i}", max_tokens=32))
                           for i in range(num_requests)))
    await model.close()
    return model.num_generation_tokens / model.busy_seconds


async def test_throughput_rises_with_batch_size() -> None:
    one, eight, thirty_two = [await measured_throughput(n) for n in (1, 8, 32)]
    assert one == pytest.approx(32 / (32 * 0.006), rel=0.05)  # ~6 ms a token alone
    assert eight > 6 * one
    assert thirty_two > 3.5 * eight


async def test_throughput_saturates() -> None:
    # Capped by max_num_seqs, more clients add queueing but no throughput.
    capped = await measured_throughput(16, max_num_seqs=16)
    oversubscribed = await measured_throughput(64, max_num_seqs=16)
    assert oversubscribed == pytest.approx(capped, rel=0.1)
    # Uncapped, the per-token costs (a, c) bound it: doubling a huge batch gains little.
    context = 1000

    def decode_rate(batch: int) -> float:
        return batch / step_time(H100, batch, batch * context)

    assert decode_rate(64) > 8 * decode_rate(4)
    assert decode_rate(4096) < 1.15 * decode_rate(2048)


# --- chunked prefill -------------------------------------------------------------


async def test_chunked_prefill_respects_the_budget() -> None:
    profile = dataclasses.replace(H100, max_num_batched_tokens=256)
    model = SimModel(profile, speed=FAST)
    words = 994  # 1,000 prompt tokens: chunks of 256, 256, 256, 232
    [*_, last] = await collect(model, make_request("long", words, max_tokens=2))
    assert last.usage is not None and last.usage.prompt_tokens == 1000
    # No step went past the budget (the 256 bucket holds every step).
    buckets = model.iteration_tokens.buckets
    assert model.iteration_tokens.cumulative()[buckets.index(256)] == model.num_steps == 5
    # TTFT is the four prefill steps, each reading the KV computed so far.
    expected = sum(step_time(profile, n, kv)
                   for n, kv in ((256, 256), (256, 512), (256, 768), (232, 1001)))
    assert model.ttft.sum == pytest.approx(expected)
    await model.close()


async def test_a_finished_request_is_logged_with_the_engines_own_times(capsys: pytest.CaptureFixture[str]) -> None:
    """With log_requests, each finished generation is one JSON line on
    stderr: its priority and sizes, its first token after the prompt's four
    prefill steps, and its three more tokens one decode step each, in
    simulated seconds; without it, nothing."""
    profile = dataclasses.replace(H100, max_num_batched_tokens=256)
    quiet = SimModel(profile, speed=FAST)
    await collect(quiet, make_request("quiet", 994, max_tokens=4))
    await quiet.close()
    assert capsys.readouterr().err == ""
    model = SimModel(profile, speed=FAST, scheduling_policy="priority", log_requests=True)
    await collect(model, make_request("long", 994, max_tokens=4, priority=1))
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert (record["event"], record["priority"], record["prompt_tokens"], record["output_tokens"]) == (
        "sim_request", 1, 1000, 4)
    prefill = sum(step_time(profile, n, kv) for n, kv in ((256, 256), (256, 512), (256, 768), (232, 1001)))
    assert record["ttft_s"] == pytest.approx(prefill, abs=1e-5)
    decode = sum(step_time(profile, 1, kv) for kv in (1002, 1003, 1004))
    assert record["decode_s"] == pytest.approx(decode, abs=1e-5)
    assert record["last_token_s"] - record["first_token_s"] == pytest.approx(record["decode_s"], abs=1e-5)
    await model.close()


async def test_each_step_is_logged_with_what_it_held(capsys: pytest.CaptureFixture[str]) -> None:
    """With log_steps, a 1,000-token prompt of priority 2 in steps of 256
    is four prefill steps (256, 256, 256 and 232 tokens) and then its
    decodes, each line with its start and its length from the step-time
    model; the steps follow one another on the simulated clock."""
    profile = dataclasses.replace(H100, max_num_batched_tokens=256)
    model = SimModel(profile, speed=FAST, scheduling_policy="priority", log_steps=True)
    await collect(model, make_request("long", 994, max_tokens=3, priority=2))
    steps = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [step["event"] for step in steps] == ["sim_step"] * 6
    assert [step["prefill_tokens"].get("2", 0) for step in steps] == [256, 256, 256, 232, 0, 0]
    assert all(step["sequences"] == {"2": 1} for step in steps)
    assert steps[0]["step_s"] == pytest.approx(step_time(profile, 256, 256), abs=1e-6)
    assert steps[4]["step_s"] == pytest.approx(step_time(profile, 1, 1002), abs=1e-6)
    for before, after in zip(steps, steps[1:]):
        assert after["start_s"] == pytest.approx(before["start_s"] + before["step_s"], abs=1e-5)
    await model.close()


async def test_a_long_prefill_is_capped_per_step_by_the_threshold() -> None:
    """vLLM V1's long_prefill_token_threshold: a 1,000-token prompt prefills
    at most 300 tokens a step though the budget would take it all at once."""
    model = SimModel(H100, speed=FAST, long_prefill_token_threshold=300)
    [*_, last] = await collect(model, make_request("long", 994, max_tokens=2))
    assert last.usage is not None and last.usage.prompt_tokens == 1000
    # Chunks of 300, 300, 300, 100 (the last samples the first token), then one decode.
    assert model.num_steps == 5
    expected = sum(step_time(H100, n, kv)
                   for n, kv in ((300, 300), (300, 600), (300, 900), (100, 1001)))
    assert model.ttft.sum == pytest.approx(expected)
    await model.close()
    uncapped = SimModel(H100, speed=FAST)
    await collect(uncapped, make_request("long", 994, max_tokens=2))
    assert uncapped.num_steps == 2
    await uncapped.close()
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        SimModel(H100, long_prefill_token_threshold=-1)


async def test_decodes_keep_running_during_a_long_prefill() -> None:
    profile = dataclasses.replace(H100, max_num_batched_tokens=256)
    model = SimModel(profile, speed=FAST)
    decoder = model.generate(make_request("short", max_tokens=40))
    await anext(decoder)  # it is now decoding
    await collect(model, make_request("long", 2000, max_tokens=1))
    # The long prompt took 8 steps of at most 256 tokens, one being the decoder's.
    assert model.iteration_tokens.cumulative()[model.iteration_tokens.buckets.index(256)] \
        == model.num_steps
    await decoder.aclose()
    await model.close()


# --- KV-cache preemption and priority ------------------------------------------------


async def run_kv_squeeze(policy: SchedulingPolicy) -> SimModel:
    """Three sequences that need 510 KV tokens together in a 300-token cache."""
    model = SimModel(H100, speed=FAST, kv_tokens=300, scheduling_policy=policy)
    requests = [make_request("A", 44, max_tokens=120, priority=0),
                make_request("B", 44, max_tokens=120, priority=1),
                make_request("C", 44, max_tokens=120, priority=0)]
    results = await asyncio.gather(*(collect(model, r) for r in requests))
    for deltas in results:
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 120
        assert len("".join(d.text for d in deltas).split()) == 120
    assert model.kv_cache_usage == 0.0 and model.num_running == 0
    await model.close()
    return model


async def test_kv_preemption_picks_the_lowest_priority_sequence() -> None:
    model = await run_kv_squeeze("priority")
    assert model.num_preemptions >= 1
    assert model.preemption_log[0] == "B"  # priority 1, although C is newer


async def test_kv_preemption_under_fcfs_picks_the_newest_sequence() -> None:
    model = await run_kv_squeeze("fcfs")
    assert model.preemption_log[0] == "C"


async def test_priority_policy_orders_by_priority_then_arrival() -> None:
    model = SimModel(H100, speed=FAST, max_num_seqs=1, scheduling_policy="priority")
    finished: list[str] = []

    async def run(agen_request: EngineRequest) -> None:
        await collect(model, agen_request)
        finished.append(agen_request.request_id)

    blocker = model.generate(make_request("X", max_tokens=20))
    await anext(blocker)  # X holds the only slot
    tasks = [asyncio.create_task(run(make_request(rid, priority=p)))
             for rid, p in (("D", 5), ("E", 1), ("F", 1), ("G", 0))]
    await asyncio.sleep(0)
    assert model.num_waiting == 4
    async for _ in blocker:
        pass
    await asyncio.gather(*tasks)
    assert finished == ["G", "E", "F", "D"]
    await model.close()


async def test_fcfs_ignores_priority() -> None:
    model = SimModel(H100, speed=FAST, max_num_seqs=1, scheduling_policy="fcfs")
    finished: list[str] = []

    async def run(request: EngineRequest) -> None:
        await collect(model, request)
        finished.append(request.request_id)

    await asyncio.gather(*(run(make_request(rid, priority=p))
                           for rid, p in (("D", 5), ("E", 1), ("G", 0))))
    assert finished == ["D", "E", "G"]
    await model.close()


async def test_running_sequences_take_the_budget_in_the_order_they_were_admitted() -> None:
    """vLLM V1's running queue: a flex prompt admitted first keeps its chunk of
    each step before a default admitted after it, priority notwithstanding.

    Budget 150, chunks of at most 100. Flex F (1,000 prompt tokens) is alone
    for steps 1-2 (100 each). D (200 tokens) arrives during step 2: from
    step 3 each step is F's 100, then D's 50, so D's prompt is complete (and
    its one token sampled) at step 6, and F's (at 100 a step) at step 10.
    Ordered by priority instead, D would take 100 first and finish at step 5.
    """
    profile = dataclasses.replace(H100, max_num_batched_tokens=150)
    model = SimModel(profile, speed=FAST, scheduling_policy="priority", long_prefill_token_threshold=100)
    done_at: dict[str, int] = {}

    async def run(request: EngineRequest) -> None:
        await collect(model, request)
        done_at[request.request_id] = model.num_steps

    flex = asyncio.create_task(run(make_request("F", 994, max_tokens=1, priority=2)))
    while model.num_steps < 1:
        await asyncio.sleep(0)
    # Step 2 is under way: D waits for step 3.
    await run(make_request("D", 194, max_tokens=1, priority=0))
    await flex
    assert done_at == {"D": 6, "F": 10}
    # Steps 3-6 were full: 150 tokens each.
    buckets = model.iteration_tokens.buckets
    assert model.iteration_tokens.cumulative()[buckets.index(128)] == 6
    await model.close()


async def test_a_victim_scheduled_earlier_in_the_step_gives_its_tokens_back() -> None:
    """Under the priority policy vLLM V1 preempts the lowest-priority running
    sequence even when it was already scheduled in this step (it was admitted
    first): its tokens return to the step's budget."""
    model = SimModel(H100, speed=FAST, kv_tokens=300, scheduling_policy="priority")
    low = model.generate(make_request("low", 44, max_tokens=200, priority=1))
    await anext(low)  # admitted first, decoding
    high = [make_request(f"high{i}", 44, max_tokens=120, priority=0) for i in range(2)]
    results = await asyncio.gather(*(collect(model, r) for r in high))
    for deltas in results:
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 120
    assert model.preemption_log[0] == "low"
    rest = [delta async for delta in low]
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 200
    assert model.kv_cache_usage == 0.0
    await model.close()


# --- output text and usage -------------------------------------------------------------


async def test_text_is_deterministic_per_seed() -> None:
    model = SimModel(H100, speed=FAST)

    async def text(seed: int, max_tokens: int | None) -> str:
        deltas = await collect(model, make_request(f"s{seed}", max_tokens=max_tokens, seed=seed))
        return "".join(d.text for d in deltas)

    same = await text(7, 30)
    assert same == await text(7, 30)
    assert same != await text(8, 30)
    assert same.startswith(" ") and len(same.split()) == 30
    assert (await text(7, 60)).startswith(same)  # a shorter output is a prefix
    assert (await text(7, None)).startswith(same)
    await model.close()


def test_filler_words_are_distinct_and_divide_a_byte() -> None:
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS) == 64  # 256 / 64: equal odds per word
    assert all(w.startswith(" ") and len(w.split()) == 1 for w in FILLER_WORDS)


async def test_usage_is_exact() -> None:
    model = SimModel(H100, speed=FAST)
    request = EngineRequest.chat("u", "m", max_tokens=9, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two  three\nfour five"},
    ])
    deltas = await collect(model, request)
    last = deltas[-1]
    assert all(d.finish_reason is None for d in deltas[:-1])
    # Earlier deltas carry the usage so far: the prompt, and tokens generated up to them.
    so_far = [d.usage.completion_tokens for d in deltas[:-1] if d.usage is not None]
    assert so_far == sorted(so_far) and all(0 < n < 9 for n in so_far)
    assert all(d.usage is not None and d.usage.prompt_tokens == 17 for d in deltas[:-1])
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == ((4 + 2) + (4 + 5) + 2, 9)
    assert model.num_prompt_tokens == 17 and model.num_generation_tokens == 9
    await model.close()


async def test_unbounded_length_is_drawn_from_the_seed() -> None:
    model = SimModel("instant")
    lengths = set()
    for _ in range(2):
        [delta] = await collect(model, make_request("r", max_tokens=None, seed=42))
        assert delta.finish_reason == "stop" and delta.usage is not None
        assert 16 <= delta.usage.completion_tokens <= 512
        assert len(delta.text.split()) == delta.usage.completion_tokens
        lengths.add(delta.usage.completion_tokens)
    assert len(lengths) == 1
    by_id = [await collect(model, make_request(f"id{i}", max_tokens=None)) for i in range(8)]
    assert len({d[-1].usage.completion_tokens for d in by_id if d[-1].usage}) > 1


async def test_prompt_longer_than_the_context_is_refused() -> None:
    model = SimModel(H100, speed=FAST)
    # vLLM's parameters: the prompt's tokens, or a max_tokens past the context.
    with pytest.raises(InvalidRequestError) as info:
        await collect(model, make_request("big", H100.max_model_len))
    assert info.value.param == "input_tokens"
    with pytest.raises(InvalidRequestError) as info:
        await collect(model, make_request("full", H100.max_model_len - 6))
    assert info.value.param == "max_tokens"  # no room left to generate in
    with pytest.raises(InvalidRequestError) as info:
        await collect(model, make_request("big", 10, max_tokens=H100.max_model_len + 1))
    assert info.value.param == "max_tokens"
    assert model.num_waiting == 0 and model.num_running == 0


async def test_max_tokens_is_cut_to_the_room_left_in_the_context() -> None:
    """As vLLM: a max_tokens the prompt leaves no room for generates until the
    context is full, and ends with "length"."""
    model = SimModel(H100, speed=FAST)
    prompt_tokens = 4 + 100 + 2
    deltas = await collect(model, make_request("cut", 100, max_tokens=H100.max_model_len))
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, H100.max_model_len - prompt_tokens)
    assert deltas[-1].finish_reason == "length"
    await model.close()


# --- aborts ------------------------------------------------------------------------


async def test_aborting_a_generation_frees_its_slot() -> None:
    model = SimModel(H100, speed=FAST, max_num_seqs=1)
    running = model.generate(make_request("a", max_tokens=500))
    await anext(running)
    waiting = asyncio.create_task(collect(model, make_request("b", max_tokens=500)))
    await asyncio.sleep(0)
    assert (model.num_running, model.num_waiting) == (1, 1)
    assert model.kv_cache_usage > 0
    waiting.cancel()  # aborted while queued
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert model.num_waiting == 0
    await running.aclose()  # aborted while running
    assert (model.num_running, model.kv_cache_usage) == (0, 0.0)
    # The slot is free again: a new request completes.
    deltas = await collect(model, make_request("c", max_tokens=3))
    assert deltas[-1].finish_reason == "length"
    await model.close()


async def test_closing_the_model_fails_requests_in_flight() -> None:
    model = SimModel(H100, speed=FAST)
    agen = model.generate(make_request("a", max_tokens=500))
    await anext(agen)
    await model.close()
    with pytest.raises(Exception) as info:
        async for _ in agen:
            pass
    assert getattr(info.value, "status_code", None) == 503


# --- the in-process engine -------------------------------------------------------------


async def test_sim_engine_adapter() -> None:
    engine = SimEngine("a100-llama3-8b", speed=FAST, max_num_seqs=4)
    assert (engine.name, engine.capacity, engine.supports_pause) == ("sim", 4, False)
    assert engine.accepts_priority
    [card] = engine.models()
    assert card.id == "llama3-8b-sim-a100" and card.max_model_len == 8192
    deltas = [d async for d in engine.generate(make_request("e", max_tokens=5))]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 5
    load = await engine.read_load()
    assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)
    await engine.close()
    assert not SimEngine(scheduling_policy="fcfs").accepts_priority


def test_a_custom_profile_can_be_built() -> None:
    profile = SimProfile(name="tiny", model_id="tiny-sim", t0=0.001, a=0.0, c=0.0,
                         max_num_batched_tokens=64, kv_tokens=1000, max_model_len=512)
    model = SimModel(profile, max_num_seqs=2)
    assert model.load().num_running == 0 and model.max_model_len == 512
    with pytest.raises(ValueError):
        SimModel("no-such-profile")


# --- the step token budget ---------------------------------------------------------


@pytest.mark.parametrize(("budget", "steps"), [(None, 2), (256, 5)])
async def test_step_budget_chunks_a_long_prompt(budget: int | None, steps: int) -> None:
    # 4 + 994 + 2 = 1,000 prompt tokens, then one more token decoded.
    model = SimModel(H100, speed=FAST, max_num_batched_tokens=budget)
    await collect(model, make_request("long", words=994, max_tokens=2))
    # 8,192: prefill in one step, then a decode; 256: four chunks, then a decode.
    assert model.num_steps == steps
    assert model.num_prompt_tokens == 1000
    await model.close()


def test_step_budget_must_hold_every_running_sequence() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SimModel(H100, max_num_seqs=64, max_num_batched_tokens=32)


def test_an_unknown_cost_model_is_a_config_error() -> None:
    from flexserve.config import ConfigError, load_settings

    assert load_settings(overrides={"sim_cost_model": "calibrated"}, environ={}).sim_cost_model == "calibrated"
    with pytest.raises(ConfigError, match="sim_cost_model.*not flat or calibrated"):
        load_settings(overrides={"sim_cost_model": "linear"}, environ={})


# --- prefix caching ----------------------------------------------------------------


async def test_a_repeated_prompt_skips_the_prefill_its_cached_blocks_hold() -> None:
    from flexserve.engines.sim.metrics import render_metrics

    model = SimModel(H100, speed=FAST, enable_prefix_caching=True)
    [*_, first] = await collect(model, make_request("first", 994, max_tokens=2))
    assert first.usage is not None and first.usage.cached_tokens == 0
    first_ttft = model.ttft.sum
    [*_, again] = await collect(model, make_request("again", 994, max_tokens=2))
    assert again.usage is not None
    # 1,000 prompt tokens: 62 full blocks cached; the last token is always computed.
    assert (again.usage.prompt_tokens, again.usage.cached_tokens) == (1000, 992)
    # Its first step prefills the 8 tokens not cached, reading the 1,001 it holds.
    assert model.ttft.sum - first_ttft == pytest.approx(step_time(H100, 8, 1001))
    assert model.prefix_cache is not None
    assert (model.prefix_cache.queries, model.prefix_cache.hits) == (2000, 992)
    text = render_metrics(model)
    assert re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} 992(\.0)?$", text, re.M)
    assert re.search(r"^vllm:prefix_cache_queries_total\{[^}]*\} 2000(\.0)?$", text, re.M)
    # A prompt that starts the same way finds the whole blocks they share:
    # the message header (3 tokens) and 500 words, 31 blocks.
    [*_, shorter] = await collect(model, make_request("shorter", 500, max_tokens=2))
    assert shorter.usage is not None and shorter.usage.cached_tokens == 496
    await model.close()
    uncached = SimModel(H100, speed=FAST)
    for name in ("one", "two"):
        [*_, last] = await collect(uncached, make_request(name, 994, max_tokens=2))
        assert last.usage is not None and last.usage.cached_tokens == 0
    await uncached.close()


async def test_cached_blocks_make_way_for_running_sequences_a_prompts_last_blocks_first() -> None:
    model = SimModel(H100, speed=FAST, kv_tokens=1500, enable_prefix_caching=True)
    await collect(model, make_request("a", 994, max_tokens=2))
    assert model.prefix_cache is not None and model.prefix_cache.free_tokens == 992
    other = EngineRequest.chat("x", "m", [{"role": "user", "content": " ".join(["x"] * 994)}],
                               max_tokens=2)
    [*_, last] = await collect(model, other)
    assert last.usage is not None and last.usage.cached_tokens == 0  # nothing shared
    # While it ran (1,001 KV tokens) only 499 were left: 31 of a's blocks were
    # evicted, its last ones first.
    [*_, again] = await collect(model, make_request("a-again", 994, max_tokens=2))
    assert again.usage is not None and again.usage.cached_tokens == 31 * 16
    await model.close()


def test_usage_tells_the_cached_tokens_as_vllm_does() -> None:
    from flexserve.engines.base import Usage
    from flexserve.engines.sim.replies import usage_dict

    assert usage_dict(Usage(10, 2, 8))["prompt_tokens_details"] == {"cached_tokens": 8}
    assert "prompt_tokens_details" not in usage_dict(Usage(10, 2))
