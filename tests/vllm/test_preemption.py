"""What the gateway's aborts and priority hints do inside vLLM: a flex run the
gateway preempts, or a stream whose client leaves, is freed in vLLM (its
running count falls, no orphan generation goes on); the preempted flex is
requeued, completed once and billed once; and with `priority` hints, default
queued inside vLLM is scheduled before flex that queued there first.

vLLM counts a request that ran to its end in `vllm:request_success_total`
(by finish reason) and one aborted by its client nowhere: an aborted run
that went on generating in vLLM would end there as a success, "length".
Requests sent straight to vLLM hold part of its batch where a run must last
long enough to be watched, however slow the machine: they make vLLM's steps
bigger and its sequences slower.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import openai
from conftest import Gateway, billed

from .support import (
    GATEWAY,
    EXACT,
    MAX_NUM_SEQS,
    VllmServer,
    holders,
    num_usage_rows,
    scrape,
    wait_until,
)
from .test_load import gateway_queue, gateway_state, in_thread, join_all, vllm_view

MESSAGES = [{"role": "user", "content": "Enrich this record."}]
# Longest silence a stream's client waits through: the machine's, at most
# (upstream_idle_timeout is 120 s), where the client's own default is 600 s.
STREAM_SILENCE = 240.0


def ran_to_length(vllm: VllmServer) -> float:
    """Requests vLLM finished by reaching their max_tokens."""
    return scrape(vllm.url, finished_reason="length")["vllm:request_success_total"]


def test_preempted_flex_is_freed_in_vllm_requeued_and_billed_once(
    start_gateway: Callable[..., Gateway], vllm: VllmServer
) -> None:
    # Two slots, and flex may take only one of them: a second default needs
    # the slot flex holds.
    gateway = start_gateway(**GATEWAY, upstreams=[vllm.url], upstream_capacity=2,
                            flex_headroom=0.5)
    # Each long enough to be running still when the test looks, however
    # slowly a busy machine lets it look: 3,000 flex tokens were done first
    # once, and 1,000-token defaults were both done before they were seen
    # running side by side.
    flex_tokens, default_tokens = 10000, 4000
    finished_before = ran_to_length(vllm)
    rows_before = num_usage_rows(gateway)

    def ask(tier: str, max_tokens: int) -> Any:
        return gateway.client().chat.completions.with_raw_response.create(
            model=vllm.model, messages=MESSAGES, max_tokens=max_tokens, service_tier=tier,  # type: ignore[arg-type]
            extra_body=EXACT,
        )

    defaults: list[tuple[threading.Thread, list[Any]]] = []

    def state() -> object:
        return gateway_state(gateway), vllm_view(vllm), flex, [out for _, out in defaults]

    num_holders = MAX_NUM_SEQS - 2
    with holders(vllm, num_holders):
        wait_until(lambda: vllm_view(vllm).num_running == num_holders, 60, "holders did not start")
        flex_thread, flex = in_thread(lambda: ask("flex", flex_tokens))
        wait_until(lambda: gateway_queue(gateway, "flex") == (0, 1), 60, "flex was not admitted",
                   state)
        wait_until(lambda: vllm_view(vllm).num_running == num_holders + 1, 60,
                   "flex did not run in vLLM", state)
        # One default takes the free slot; the second, sent once the first
        # runs, needs flex's. (Sent together, CI once saw one finish with
        # nothing preempted and no default queued: the second had not been
        # queued at the gateway while the first ran.)
        defaults.append(in_thread(lambda: ask("default", default_tokens)))
        wait_until(lambda: gateway_queue(gateway, "default") == (0, 1), 60,
                   "the first default did not start", state)
        defaults.append(in_thread(lambda: ask("default", default_tokens)))
        # The gateway aborts flex and puts it back in its queue; vLLM runs
        # the two defaults beside the holders, and nothing of flex.
        wait_until(lambda: gateway_queue(gateway, "flex") == (1, 0), 60, "flex was not requeued",
                   state)
        assert scrape(gateway.url)["flexserve_preemptions_total"] == 1
        wait_until(lambda: gateway_queue(gateway, "default") == (0, 2), 60,
                   "defaults did not start", state)
        wait_until(lambda: (vllm_view(vllm).num_running, vllm_view(vllm).num_waiting)
                   == (num_holders + 2, 0), 60, "vLLM did not run the defaults", state)
    join_all([flex_thread, *(thread for thread, _ in defaults)], 600, state)

    answers = [flex[0]] + [out[0] for _, out in defaults]
    for answer in answers:
        assert not isinstance(answer, BaseException), answer
    completion = flex[0].parse()
    assert completion.service_tier == "flex"
    assert completion.usage is not None and completion.usage.completion_tokens == flex_tokens
    # Completed once, billed once: one row per request, the flex row for the
    # run that finished.
    row = billed(gateway, flex[0].headers["x-request-id"])
    assert (row["served_tier"], row["status"], row["completion_tokens"]) == ("flex", "completed", flex_tokens)
    for _, out in defaults:
        assert billed(gateway, out[0].headers["x-request-id"])["completion_tokens"] == default_tokens
    assert num_usage_rows(gateway) == rows_before + 3
    # vLLM ran three requests to their end: the defaults and the flex run that
    # counted. The aborted run is not among them (nor are the holders).
    wait_until(vllm.is_idle, 120, "vLLM did not fall idle")
    assert ran_to_length(vllm) - finished_before == 3


def test_client_disconnect_mid_stream_frees_the_sequence_in_vllm(
    gateway: Gateway, vllm: VllmServer
) -> None:
    finished_before = ran_to_length(vllm)
    num_holders = MAX_NUM_SEQS - 1
    with holders(vllm, num_holders):
        wait_until(lambda: vllm_view(vllm).num_running == num_holders, 60, "holders did not start")
        client = gateway.client(timeout=STREAM_SILENCE)
        stream = client.chat.completions.with_raw_response.create(
            model=vllm.model, messages=MESSAGES, max_tokens=3000, stream=True, extra_body=EXACT,
        )
        request_id = stream.headers["x-request-id"]
        chunks = stream.parse()
        num_read = 0
        seen: list[object] = []
        try:
            for chunk in chunks:
                seen.append([(choice.delta.content, choice.finish_reason) for choice in chunk.choices])
                num_read += sum(1 for choice in chunk.choices if choice.delta.content)
                if num_read >= 10:
                    break
        except openai.APITimeoutError as exc:
            # CI once saw this stream silent for the client's whole default
            # of 600 s after its headers, with vLLM running only the holders.
            raise AssertionError(
                f"the stream was silent for {STREAM_SILENCE:g} s after {len(seen)} chunks "
                f"(the last: {seen[-3:]}); gateway: {gateway_state(gateway)}; vLLM: {vllm_view(vllm)}"
            ) from exc
        chunks.close()
        assert num_read >= 10, f"the stream ended after {num_read} tokens with text: {seen[-3:]}"
        # Its running count falls back to the holders', while they still run:
        # the sequence was freed, not run to its end.
        wait_until(lambda: vllm_view(vllm).num_running == num_holders, 60,
                   "vLLM kept generating after the client left", lambda: vllm_view(vllm))
        assert ran_to_length(vllm) == finished_before
    row = billed(gateway, request_id)
    assert row["status"] == "client_disconnected"
    assert 10 <= row["completion_tokens"] < 3000


def test_priority_hint_schedules_default_before_flex_inside_vllm(
    start_gateway: Callable[..., Gateway], vllm: VllmServer
) -> None:
    """Both tiers released into vLLM's own queue (room at the gateway, flex
    rules relaxed): vLLM's priority policy, fed the gateway's hint, runs the
    default requests first although the flex ones queued before them."""
    gateway = start_gateway(**GATEWAY, upstreams=[vllm.url], upstream_priority_hint=True,
                            upstream_capacity=4 * MAX_NUM_SEQS, flex_headroom=0.0,
                            flex_max_engine_waiting=100, flex_kv_threshold=1.0)
    first_token: dict[str, list[float]] = {"default": [], "flex": []}
    lock = threading.Lock()

    def ask(tier: str) -> None:
        # Default's runs long enough that a flex run cannot start in vLLM until
        # they end: the first tokens' order then holds by a second or more, not
        # the few milliseconds a client thread on a busy machine is late by.
        max_tokens = 1000 if tier == "default" else 100
        chunks = gateway.client().chat.completions.create(
            model=vllm.model, messages=MESSAGES, max_tokens=max_tokens, service_tier=tier,  # type: ignore[arg-type]
            stream=True, extra_body=EXACT,
        )
        for chunk in chunks:
            if any(choice.delta.content for choice in chunk.choices):
                with lock:
                    first_token[tier].append(time.monotonic())
                break
        for _ in chunks:
            pass

    threads: list[threading.Thread] = []
    with holders(vllm, MAX_NUM_SEQS):
        wait_until(lambda: vllm_view(vllm).num_running == MAX_NUM_SEQS, 120, "holders did not start")
        for tier, num_waiting in (("flex", MAX_NUM_SEQS), ("default", 2 * MAX_NUM_SEQS)):
            for _ in range(MAX_NUM_SEQS):
                thread = threading.Thread(target=ask, args=(tier,), daemon=True)
                thread.start()
                threads.append(thread)
            wait_until(_waiting_at_least(vllm, num_waiting), 120,
                       f"{tier} did not reach vLLM's queue", lambda: gateway_state(gateway))
        # Flex queued first, then default, while the holders kept every slot.
        load = vllm_view(vllm)
        assert (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, 2 * MAX_NUM_SEQS), load
    # The holders gone, vLLM's batch has room for one tier's requests.
    join_all(threads, 300, lambda: f"first tokens {first_token}; gateway: {gateway_state(gateway)}; "
                                   f"vLLM: {vllm_view(vllm)}")
    assert len(first_token["default"]) == len(first_token["flex"]) == MAX_NUM_SEQS
    assert max(first_token["default"]) < min(first_token["flex"])


def _waiting_at_least(vllm: VllmServer, num_waiting: int) -> Callable[[], bool]:
    return lambda: vllm_view(vllm).num_waiting >= num_waiting
