"""What the vLLM tests share: reading metrics, calling vLLM directly (its
`/tokenize`, requests that bypass the gateway, bursts that fill it), reading
the gateway's usage rows, and the one schema check OpenAI's document lacks."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import Gateway, sql_rows
from openapi import validate

# The vLLM server's settings (conftest.server_command), which tests reason with.
MODEL_ID = "tiny-llama"
# Tests hold vLLM's batch with requests that generate until their context is
# full: that must outlast any test's waits on the fastest machine. This tiny
# model generates hundreds of tokens a second even on two cores: a short
# context ran out within a test's waits (which then waited in vain for a
# batch already gone, or saw it leave mid-test); 32,768 tokens lasted about
# 100 s once the holders were no longer streamed; this lasts minutes.
MAX_MODEL_LEN = 131072
# Few sequences at once, so that a handful of requests already queue inside vLLM.
MAX_NUM_SEQS = 4
# vLLM's CPU backend holds KV in blocks of 128 tokens. 5,120 of them hold the
# whole batch at full context with a fifth to spare (so vLLM never preempts
# on its own), and keep KV use visible, where the default 1 GiB would hold a
# million tokens of this model.
KV_BLOCK_SIZE = 128
NUM_KV_BLOCKS = 5120

# The gateways in front of vLLM: its /metrics can take seconds to answer
# while it generates on two busy cores, which must not read as a hung replica.
# Each read costs vLLM's API server a render of all its metrics, on the core
# it shares with its engine's scheduler, the gateways and the tests: the
# gateways read twice a second (not ten times) and take what they read as
# fresh for 5 s, and the tests poll vLLM five times a second (not twenty).
# Reads at full rate were part of what starved that server in CI. A stream
# may be as slow: CI once saw a flex run's stream silent for the default 30 s
# (and the gateway's own /metrics unanswered for as long) while it ran, and
# the gateway ended it with a 504. The tests are about what vLLM does with
# the gateway's requests; a silence shorter than two minutes is the machine's.
# Flex its client reads whole is asked of vLLM in chunks of four tokens (its
# per-request `stream_interval`), as docs/deployment.md advises a fleet:
# test_chat_whole[flex] compares what comes that way with vLLM's own answer.
GATEWAY: dict[str, Any] = {"engine": "upstream", "replica_silent_after": 60.0,
                           "scrape_interval": 0.5, "load_stale_after": 5.0,
                           "upstream_idle_timeout": 120.0, "upstream_stream_interval": 4}
POLL_SECONDS = 0.2

# Greedy, so that the same request gives the same text directly and through
# the gateway; vLLM's `ignore_eos`, so that every answer is exactly
# max_tokens long (random weights may draw the end-of-text token).
EXACT: dict[str, Any] = {"temperature": 0, "ignore_eos": True}


@dataclass(frozen=True)
class VllmServer:
    url: str
    model: str

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def is_idle(self) -> bool:
        values = self.metrics()
        return values["vllm:num_requests_running"] == 0 and values["vllm:num_requests_waiting"] == 0


def scrape(url: str, **labels: str) -> dict[str, float]:
    """A Prometheus endpoint's samples by name, summed over the label sets that
    have ``labels``; histogram buckets left out unless ``labels`` names one
    (``le="1.0"``).

    A read whose connection is dropped before an answer is made again (twice
    at most): reading metrics changes nothing, and on two saturated cores a
    CI run once saw the gateway drop one."""
    for attempt in range(3):
        try:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            break
        except (httpx.RemoteProtocolError, httpx.ConnectError):
            if attempt == 2:
                raise
            time.sleep(POLL_SECONDS)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if ("le" in sample.labels and "le" not in labels) or any(
                    sample.labels.get(k) != v for k, v in labels.items()):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               state: Callable[[], object] | None = None) -> None:
    """Poll ``predicate`` until it holds; past ``timeout``, fail with ``what``
    and, to show why, what ``state`` returns then.

    A read that fails at the transport (it timed out, or the connection was
    closed before an answer: a CI run once saw the gateway drop one `/metrics`
    read on two saturated cores) answers nothing either way: it is polled
    again, and named in the failure if the time runs out."""
    deadline = time.monotonic() + timeout
    failed: list[str] = []
    while True:
        try:
            if predicate():
                return
        except httpx.TransportError as exc:
            failed.append(f"{exc.request.method} {exc.request.url.path}: {type(exc).__name__}")
        if time.monotonic() > deadline:
            seen = f"; {state()}" if state is not None else ""
            lost = f"; reads failed: {failed[-5:]}" if failed else ""
            raise AssertionError(f"{what} (waited {timeout:.0f} s){seen}{lost}")
        time.sleep(POLL_SECONDS)


def tokenize(vllm: VllmServer, **body: Any) -> list[int]:
    """vLLM's own tokenization (its `/tokenize`, not part of OpenAI's API)."""
    response = httpx.post(f"{vllm.url}/tokenize", json={"model": vllm.model, **body}, timeout=30)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["count"] == len(data["tokens"])
    tokens: list[int] = data["tokens"]
    return tokens


def direct(vllm: VllmServer, path: str, **body: Any) -> dict[str, Any]:
    """A request straight to vLLM, bypassing the gateway."""
    response = httpx.post(f"{vllm.url}{path}", json={"model": vllm.model, **body}, timeout=300)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


# Words of one token each for SmolLM2's tokenizer.
_WORDS = ("river", "stone", "light", "paper", "garden", "window")


def unique_prompt(num_words: int) -> str:
    """A prompt of about ``num_words`` tokens (and a nonce of a few dozen)
    that shares no cached prefix with any other."""
    return f"{uuid.uuid4().hex} " + " ".join(_WORDS[i % len(_WORDS)] for i in range(num_words))


# Tokens per chunk a holder is streamed in (``holders``): a write to its
# socket every second or two, at this model's speed on two cores.
HOLDER_STREAM_INTERVAL = 256


@contextmanager
def holders(vllm: VllmServer, num_requests: int, *, prompt_words: int = 20) -> Iterator[None]:
    """``num_requests`` long requests sent straight to vLLM (outside the gateway)
    that hold their sequences — running, or waiting once vLLM's batch is full —
    until the block is left, when they are aborted by name (vLLM's
    ``/inference/v1/abort_requests``, each holder having sent its own
    ``X-Request-Id``) and their connections closed.

    Closing alone left it to vLLM to notice the client gone: CI saw holders
    run on for minutes after their sockets were closed (below); and a later
    CI run saw a test's requests unanswered until their clients' 600 s
    timeouts and pytest's 900 s, which holders left running would explain.
    An abort by name idled vLLM 3.2 s after it was sent, with four holders
    running, two waiting and every socket still open.

    Each would generate until its context is full: far longer than a test
    takes to look at vLLM while they run. Each is a bare socket with its
    request written and nothing read. They are streamed in chunks of
    ``HOLDER_STREAM_INTERVAL`` tokens (vLLM's per-request `stream_interval`):

    - Streamed a token at a time, holders made vLLM's server serialise and
      send every token of every holder, which on two busy cores starved its
      event loop until `/metrics` and the gateway's own streams stalled for
      tens of seconds (a CI run saw a replica silent for 91 s).
    - Not streamed at all, vLLM learns that a holder left only by hearing its
      connection close. CI once saw four such holders run on for minutes
      after their sockets were closed, which held a test's flex request until
      its deadline; I could not find why. A streamed holder is also written
      to every chunk, and a write to a closed connection fails: a second way
      for vLLM to see it gone, within a chunk's time (a second or two here).
    """
    url = httpx.URL(vllm.url)
    sockets: list[socket.socket] = []
    names: list[str] = []
    try:
        for _ in range(num_requests):
            body = json.dumps({"model": vllm.model, "prompt": unique_prompt(prompt_words),
                               "max_tokens": MAX_MODEL_LEN - prompt_words - 40,
                               "ignore_eos": True, "stream": True,
                               "stream_interval": HOLDER_STREAM_INTERVAL}).encode()
            name = f"holder-{uuid.uuid4().hex}"
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                    f"X-Request-Id: {name}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            sock = socket.create_connection((url.host, url.port), timeout=30)
            sockets.append(sock)
            names.append(name)
            sock.sendall(head.encode() + body)
        yield
    except BaseException as exc:
        # A holder vLLM refused (it answered at once) is most often why the
        # test's wait did not end.
        answered = [answer for answer in map(_early_answer, sockets) if answer]
        if answered:
            raise AssertionError(f"{exc}; and vLLM answered a holder: {answered[0][:500]!r}") from exc
        raise
    finally:
        abort(vllm, names)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def abort(vllm: VllmServer, names: list[str]) -> None:
    """Abort the completions requests sent with these ``X-Request-Id``s: vLLM
    names a completions request ``cmpl-{X-Request-Id}``, and its one prompt's
    sequence that and ``-0``. A name vLLM no longer runs is ignored there."""
    if not names:
        return
    ids = [f"cmpl-{name}-0" for name in names]
    response = httpx.post(f"{vllm.url}/inference/v1/abort_requests", json={"request_ids": ids}, timeout=60)
    assert response.status_code == 200, f"vLLM refused the abort of {len(ids)} holders: {response.text}"


def _early_answer(sock: socket.socket) -> bytes:
    """What vLLM has already sent back on a holder's socket if it was not the
    start of a stream (a refusal); nothing while the holder runs or waits."""
    sock.setblocking(False)
    try:
        answer = sock.recv(4096)
    except (BlockingIOError, OSError):
        return b""
    return b"" if answer.startswith(b"HTTP/1.1 200") else answer


def num_usage_rows(gateway: Gateway) -> int:
    return int(sql_rows(gateway.db_url, "SELECT COUNT(*) AS n FROM usage_records")[0]["n"])


def sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a server-sent event stream, after checking its framing."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(data))
    assert done, "the stream did not end with [DONE]"
    return chunks


def validate_completion_chunk(chunk: dict[str, Any]) -> None:
    """OpenAI's document has no schema of its own for a streamed completion:
    its chunks are `CreateCompletionResponse` objects whose choices have a
    null finish_reason until their last, and whose usage is null but in the
    last chunk (as OpenAI's API sends them)."""
    choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
    whole = {**chunk, "choices": choices}
    if whole.get("usage", 0) is None:
        del whole["usage"]
    validate(whole, "CreateCompletionResponse")
