"""The load signals FlexServe admits flex by are the ones vLLM exports: while
streams sent straight to vLLM fill it, its running count, waiting count and
KV-cache use move, FlexServe's parser reads the same values as Prometheus'
own, the gateway's view follows, and flex is held while vLLM reports waiting
requests or KV use above the threshold — while default is not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import Gateway, billed
from flexserve.engines.base import EngineLoad
from flexserve.engines.metrics import parse_vllm_load

from .support import (
    GATEWAY,
    EXACT,
    MAX_NUM_SEQS,
    NUM_KV_BLOCKS,
    VllmServer,
    holders,
    scrape,
    wait_until,
)

MESSAGES = [{"role": "user", "content": "Label this record."}]


def vllm_view(vllm: VllmServer, *, timeout: float = 60) -> EngineLoad:
    """vLLM's load as FlexServe's parser reads it, checked against Prometheus'
    own parser on the same text."""
    text = httpx.get(f"{vllm.url}/metrics", timeout=timeout).text
    load = parse_vllm_load(text)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert load.num_running == samples["vllm:num_requests_running"]
    assert load.num_waiting == samples["vllm:num_requests_waiting"]
    assert load.kv_cache_usage == samples["vllm:kv_cache_usage_perc"]
    return load


def gateway_view(gateway: Gateway) -> tuple[float, float, float]:
    """What the gateway last read of its replica: running, waiting, KV use."""
    values = scrape(gateway.url)
    return (values["flexserve_engine_running"], values["flexserve_engine_waiting"],
            values.get("flexserve_engine_kv_cache_usage_ratio", 0.0))


def replica_healthy(gateway: Gateway) -> bool:
    """Whether the gateway takes its replica as answering. Its view of vLLM
    keeps the last reading while it does not: a request sent then is refused
    (503) rather than held, which is not what these tests are about."""
    return scrape(gateway.url)["flexserve_engine_healthy"] == 1


def gateway_state(gateway: Gateway) -> dict[str, float]:
    """The gateway's queues, runs, replica view and events, for failure
    messages; and how often its event loop ran more than a second late (the
    gateway starved of CPU, or blocked: then every stream it relays stalls)."""
    values = scrape(gateway.url)
    by_tier = {f"{kind}[{tier}]": scrape(gateway.url, tier=tier)[f"flexserve_{kind}"]
               for kind in ("queue_depth", "in_flight") for tier in ("default", "flex")}
    lag = scrape(gateway.url, le="1.0")
    late = values["flexserve_event_loop_lag_seconds_count"] - lag["flexserve_event_loop_lag_seconds_bucket"]
    return {**by_tier, **{name: value for name, value in values.items() if name.startswith(
        ("flexserve_engine_", "flexserve_preemptions", "flexserve_flex_refused", "flexserve_requests"))},
        "loop_lag_over_1s": late, "loop_lag_seconds_sum": values["flexserve_event_loop_lag_seconds_sum"]}


def gateway_queue(gateway: Gateway, tier: str) -> tuple[float, float]:
    """Requests of ``tier`` queued at the gateway, and in flight on engines."""
    values = scrape(gateway.url, tier=tier)
    return values["flexserve_queue_depth"], values["flexserve_in_flight"]


def flex_state(gateway: Gateway, flex: list[Any]) -> str:
    """For a failure message: the flex request's answer if it came (a refusal
    says why), and the gateway's queues and view of vLLM."""
    answer = repr(flex[0]) if flex else "no answer yet"
    try:
        state: object = gateway_state(gateway)
    except httpx.HTTPError as exc:  # the failure's own message must still be shown
        state = f"unreadable ({type(exc).__name__})"
    return f"flex: {answer}; gateway: {state}"


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # checked by the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def join_all(threads: list[threading.Thread], seconds: float, state: Callable[[], object]) -> None:
    """Wait for ``threads`` within one deadline of ``seconds`` for them all;
    fail, saying what ``state`` shows, if any is still waiting for its answer
    (CI once saw requests wait until pytest's timeout ended the test with
    nothing to say)."""
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    waiting = sum(thread.is_alive() for thread in threads)
    assert not waiting, f"{waiting} of {len(threads)} requests unanswered after {seconds:.0f} s; {state()}"


def chat(gateway: Gateway, vllm: VllmServer, tier: str) -> Any:
    return gateway.client().chat.completions.with_raw_response.create(
        model=vllm.model, messages=MESSAGES, max_tokens=4, service_tier=tier,  # type: ignore[arg-type]
        extra_body=EXACT,
    )


def test_vllms_load_signals_move_and_flexserve_reads_them(gateway: Gateway, vllm: VllmServer) -> None:
    idle = vllm_view(vllm)
    assert (idle.num_running, idle.num_waiting, idle.kv_cache_usage) == (0, 0, 0.0)
    # Prompts of three KV blocks each (and more as they generate), in each slot.
    kv_in_use = 3 * MAX_NUM_SEQS / NUM_KV_BLOCKS
    with holders(vllm, MAX_NUM_SEQS + 2, prompt_words=300):
        # Every read, for the failure message: CI once saw none come true in
        # minutes while vLLM's own log showed a full batch and its queue.
        reads: list[str] = []

        def full() -> bool:
            started = time.monotonic()
            try:
                load = vllm_view(vllm, timeout=10)
            except httpx.TimeoutException:
                reads.append(f"timed out after {time.monotonic() - started:.1f} s")
                return False
            reads.append(f"{load.num_running:.0f}/{load.num_waiting:.0f}/{load.kv_cache_usage} "
                         f"in {time.monotonic() - started:.1f} s")
            assert load.kv_cache_usage is not None and 0 <= load.kv_cache_usage <= 1
            return (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, 2) and load.kv_cache_usage >= kv_in_use

        wait_until(full, 300, "vLLM never reported a full batch, a queue and KV in use",
                   state=lambda: f"{len(reads)} reads (running/waiting/KV), the last: {reads[-8:]}")
        # The gateway reads the same endpoint on its own schedule.
        wait_until(lambda: gateway_view(gateway)[:2] == (MAX_NUM_SEQS, 2) and gateway_view(gateway)[2] >= kv_in_use,
                   60, "the gateway never saw vLLM full")
    wait_until(lambda: gateway_view(gateway) == (0, 0, 0.0), 60,
               "the gateway's view did not return to idle")


def test_flex_is_held_while_vllm_reports_waiting_requests(gateway: Gateway, vllm: VllmServer) -> None:
    """Default settings: flex is not released while the engine queues
    anything; default is."""
    with holders(vllm, MAX_NUM_SEQS + 2):
        wait_until(lambda: gateway_view(gateway)[1] == 2 and replica_healthy(gateway), 120,
                   "the gateway never saw vLLM's queue", state=lambda: gateway_state(gateway))
        flex_thread, flex = in_thread(lambda: chat(gateway, vllm, "flex"))
        wait_until(lambda: gateway_queue(gateway, "flex") == (1, 0), 30,
                   "flex did not queue at the gateway", state=lambda: flex_state(gateway, flex))
        default_thread, default = in_thread(lambda: chat(gateway, vllm, "default"))
        wait_until(lambda: gateway_queue(gateway, "default") == (0, 1), 30,
                   "default was held at the gateway")
        wait_until(lambda: vllm_view(vllm).num_waiting == 3, 60, "default did not reach vLLM's queue")
        # Flex still waits at the gateway while vLLM queues work.
        assert gateway_queue(gateway, "flex") == (1, 0)
    # The holders gone, vLLM's queue empties: default runs, flex is released.
    join_all([default_thread, flex_thread], 300, lambda: flex_state(gateway, flex))
    for answer in (flex[0], default[0]):
        assert not isinstance(answer, BaseException), answer
    assert flex[0].parse().service_tier == "flex"
    row = billed(gateway, flex[0].headers["x-request-id"])
    assert (row["served_tier"], row["completion_tokens"]) == ("flex", 4)
    assert row["queue_time_ms"] > billed(gateway, default[0].headers["x-request-id"])["queue_time_ms"]


def test_flex_is_held_while_vllms_kv_cache_is_above_the_threshold(
    start_gateway: Callable[..., Gateway], vllm: VllmServer
) -> None:
    """Nothing waits in vLLM here: KV-cache use alone holds flex back."""
    threshold = 0.005
    gateway = start_gateway(**GATEWAY, upstreams=[vllm.url], flex_kv_threshold=threshold,
                            flex_max_engine_waiting=100)
    # A full batch of long prompts (ten of vLLM's 5,120 KV blocks each, more
    # as they generate): all run, nothing waits.
    with holders(vllm, MAX_NUM_SEQS, prompt_words=1200):
        # On a busy machine the last holder may still be on its way.
        wait_until(lambda: vllm_view(vllm).num_running == MAX_NUM_SEQS, 120,
                   "the holders never all ran", state=lambda: vllm_view(vllm))
        wait_until(lambda: gateway_view(gateway)[2] >= threshold and replica_healthy(gateway), 120,
                   "the gateway never saw vLLM's KV use above the threshold")
        flex_thread, flex = in_thread(lambda: chat(gateway, vllm, "flex"))
        wait_until(lambda: gateway_queue(gateway, "flex") == (1, 0), 30,
                   "flex did not queue at the gateway", state=lambda: flex_state(gateway, flex))
        load = vllm_view(vllm)
        # Flex is not in vLLM.
        assert (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, 0), flex_state(gateway, flex)
        assert load.kv_cache_usage is not None and load.kv_cache_usage >= threshold
    join_all([flex_thread], 300, lambda: (flex_state(gateway, flex), vllm_view(vllm)))
    # A refusal here most often means vLLM kept the holders: say what it runs.
    assert not isinstance(flex[0], BaseException), (flex_state(gateway, flex), vllm_view(vllm))
    assert flex[0].parse().service_tier == "flex"
    assert billed(gateway, flex[0].headers["x-request-id"])["completion_tokens"] == 4
