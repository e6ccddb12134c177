"""The sim engine served for real on loopback, driven by the official openai SDK."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from flexserve.engines.sim import SimModel
from flexserve.engines.sim.server import create_sim_app

# 4 + 3 + 2 = 9 prompt tokens for the sim tokenizer.
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say something nice"}]


@contextmanager
def serving(model: SimModel) -> Iterator[str]:
    """Run the sim server in a thread on a free port, with the production settings."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_sim_app(model), loop="uvloop", http="httptools",
                            access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # start-up only; the server has no readiness hook
        assert thread.is_alive() and time.monotonic() < deadline, "sim server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def instant() -> Iterator[tuple[SimModel, str]]:
    model = SimModel("instant")
    with serving(model) as url:
        yield model, url


@pytest.fixture(scope="module")
def timed() -> Iterator[tuple[SimModel, str]]:
    model = SimModel("h100-llama3-8b", speed=20, scheduling_policy="priority")
    with serving(model) as url:
        yield model, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped: one model per server)."""
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if "le" not in s.labels}


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_non_stream(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    reply = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                 max_tokens=7, seed=3)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == model.model_id
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len((choice.message.content or "").split()) == 7
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (9, 7, 16)


@pytest.mark.parametrize("fixture", ["instant", "timed"])
def test_stream_with_usage(fixture: str, request: pytest.FixtureRequest) -> None:
    model, url = request.getfixturevalue(fixture)
    chunks = list(client(url).chat.completions.create(
        model=model.model_id, messages=MESSAGES, seed=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert [c.choices[0].finish_reason for c in content].count("stop") == 1
    assert content[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert len(text.split()) == usage_chunk.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == 9
    # Same seed, same text, streamed or not.
    whole = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES, seed=5)
    assert whole.choices[0].message.content == text


def test_priority_is_refused_under_fcfs(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                            extra_body={"priority": 2})
    assert info.value.body["param"] == "priority"  # type: ignore[index]
    # Priority 0 is the default and always fine.
    client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                        extra_body={"priority": 0})


def test_priority_is_accepted_under_priority_policy(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    reply = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                max_tokens=2, extra_body={"priority": -3})
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": "sim-instant"}',
                                  b'{"model": "sim-instant", "messages": []}'])
def test_bad_requests_get_the_openai_envelope(instant: tuple[SimModel, str], body: bytes) -> None:
    _, url = instant
    response = httpx.post(f"{url}/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_long_prompt_is_400(instant: tuple[SimModel, str]) -> None:
    model, url = instant
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(
            model=model.model_id, messages=[{"role": "user", "content": "w " * 9000}])
    assert info.value.body["param"] == "messages"  # type: ignore[index]


def test_models_list(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    [card] = client(url).models.list().data
    assert card.id == model.model_id == "llama3-8b-sim-h100"


def test_metrics_use_vllm_names(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    client(url).chat.completions.create(model=model.model_id, messages=MESSAGES, max_tokens=4)
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:num_preemptions": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        assert all(s.labels["model_name"] == model.model_id for s in families[name].samples)
    samples = metrics(url)
    assert samples["vllm:generation_tokens_total"] >= 4
    assert samples["vllm:num_preemptions_total"] == 0
    assert samples["vllm:time_to_first_token_seconds_count"] >= 1


def wait_until_idle(url: str) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while True:
        samples = metrics(url)
        if samples["vllm:num_requests_running"] == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_client_disconnect_aborts_the_sequence(timed: tuple[SimModel, str]) -> None:
    model, url = timed
    # 8,000 tokens take ~2.6 s at 20x; an aborted one stops after a few.
    max_tokens = 8000
    before = metrics(url)["vllm:generation_tokens_total"]
    stream = client(url).chat.completions.create(model=model.model_id, messages=MESSAGES,
                                                 max_tokens=max_tokens, stream=True)
    next(iter(stream))
    next(iter(stream))
    assert metrics(url)["vllm:num_requests_running"] == 1
    stream.close()
    samples = wait_until_idle(url)
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0
    assert samples["vllm:generation_tokens_total"] - before < max_tokens / 2
    # A non-streamed request whose client gives up is aborted too.
    before = samples["vllm:generation_tokens_total"]
    with pytest.raises(openai.APITimeoutError):
        client(url).with_options(timeout=0.3).chat.completions.create(
            model=model.model_id, messages=MESSAGES, max_tokens=max_tokens)
    samples = wait_until_idle(url)
    assert samples["vllm:num_requests_running"] == 0
    assert samples["vllm:generation_tokens_total"] - before < max_tokens / 2
