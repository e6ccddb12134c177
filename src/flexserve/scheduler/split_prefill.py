"""Split prefill: a flex prompt warmed into the engine's prefix cache in pieces.

A flex prompt of 2,000 tokens prefilled whole is one long engine step that
every default sequence decoding beside it waits through (default's TPOT), and
that a default prompt arriving meanwhile waits behind (default's TTFT).
Engines that cache prefixes automatically (vLLM V1, SGLang, the sim engine
with ``--enable-prefix-caching``) let the gateway cut that work up without
touching the engine: it sends growing prefixes of the prompt as token ids
(``/v1/completions``, ``max_tokens: 1``), each ``piece`` tokens longer than
the last, so that each rides along with the decode steps as a small chunk;
the request itself then finds all but its last piece cached and prefills at
most ``piece`` tokens.

* **Tokens.** The prompt is tokenised once by the engine itself
  (``Engine.tokenize``: vLLM's ``/tokenize`` applies the chat template as its
  chat endpoint does), so the pieces are exactly the request's own prefix.
  ``piece`` must be a multiple of the engine's KV block size (vLLM on GPU and
  the sim: 16; vLLM's CPU backend: 128): only whole blocks are cached.
* **Pacing.** At most ``width`` pieces in flight per replica
  (``Replica.warm_gate``, ``split_prefill_concurrency``: one by default), and
  none while a default or priority run on the replica has not had its first
  output (its own prompt is being prefilled: a piece beside it would lengthen
  that step) or while default or priority waits at the gateway for the
  model. The request itself keeps the same turn until its first output.
* **Billing.** The warm-ups are the gateway's own requests: never billed, never
  shown to the client, counted in ``/metrics``. The request's usage is the
  engine's, except that its cached tokens are those the engine had cached
  before the gateway warmed anything (``natural_cached``), so that splitting
  never lowers nor raises what the client pays.
* **Engines that do not cache.** The first warm-up that should have found the
  previous piece cached and did not (no prefix cache, no cached-token counts
  in usage, or pieces that are not whole blocks) turns splitting off for that
  replica, with a warning; later misses (a piece evicted before the request
  came) are counted, and the rest of the prompt goes whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from flexserve.engines.base import Delta, EngineRequest, SequenceControl
from flexserve.errors import FlexServeError
from flexserve.tiers import ServiceTier

if TYPE_CHECKING:
    from flexserve.scheduler.replicas import ModelPool, Replica

logger = logging.getLogger(__name__)

# Seconds between looks at whether a piece may go, when no step time is known.
_POLL = 0.002


def prefix_lengths(num_tokens: int, piece: int) -> list[int]:
    """The prefixes to warm before a prompt of ``num_tokens``: ``piece``,
    ``2 * piece``, … each shorter than the prompt, so that the request itself
    prefills between 1 and ``piece`` tokens."""
    if piece <= 0 or num_tokens <= piece:
        return []
    return list(range(piece, num_tokens, piece))


def natural_cached(found: list[tuple[int, int]], final_cached: int) -> int:
    """Of a prompt warmed in pieces, the tokens the engine had cached before
    the gateway warmed any. ``found`` holds each warm-up's prefix length and
    the cached tokens the engine reported for it, in order; ``final_cached``
    is what it reported for the request itself.

    Each warm-up finds at least the gateway's previous piece cached; it finds
    more only where the cache already held the prompt beyond it (another
    request's prefix). The first warm-up that finds no more than the previous
    piece marks where that cache ended. A piece found cached up to its last
    block (an engine always computes a prompt's last token, so never reports
    more) may have been cached whole: that block is counted the client's.
    The engine's block is the largest that divides every count seen."""
    block = math.gcd(*(n for pair in found for n in pair), final_cached)
    natural = previous = 0
    for length, cached in found:
        if cached <= previous:
            break
        natural, previous = cached, length
    else:
        if final_cached > previous:
            return final_cached
    return previous if natural and natural == previous - block else natural


class SplitPrefill:
    """Runs one flex request on ``replica`` with its prompt warmed in pieces."""

    def __init__(self, pool: ModelPool, replica: Replica, piece: int, width: int = 1) -> None:
        self.pool = pool
        self.replica = replica
        self.piece = piece
        # Set once a miss was counted for this request (counted once).
        self._missed = False
        if replica.warm_gate is None:
            replica.warm_gate = asyncio.Semaphore(width)

    async def generate(
        self, request: EngineRequest, control: SequenceControl | None = None
    ) -> AsyncIterator[Delta]:
        engine = self.replica.engine
        ids = await engine.tokenize(request)
        lengths = prefix_lengths(len(ids), self.piece) if ids else []
        found: list[tuple[int, int]] = []
        for length in lengths:
            assert ids is not None
            cached = await self._warm(request, ids[:length], len(found))
            if cached is None:
                break
            previous = found[-1][0] if found else 0
            found.append((length, cached))
            if not self._held(previous, cached):
                break
        if found:
            self.pool.num_split_runs += 1
        deltas = engine.generate(request, control)
        try:
            if found:
                async with self._turn():
                    # The request's own prefill takes the turn until its first output.
                    first = await anext(deltas, None)
                if first is None:
                    return
                yield self._billed(first, found)
            async for delta in deltas:
                yield self._billed(delta, found) if found else delta
        finally:
            await _close(deltas)

    async def _warm(self, request: EngineRequest, prefix: list[int], index: int) -> int | None:
        """Send one piece; the tokens the engine found cached for it (None: it failed)."""
        body = {"model": request.body.get("model", request.model), "prompt": prefix,
                "max_tokens": 1, "temperature": 0}
        warm = EngineRequest(f"{request.request_id}-warm-{index}", request.model, body,
                             "completion", request.priority, stream=False)
        cached = 0
        async with self._turn():
            deltas = self.replica.engine.generate(warm)
            try:
                async for delta in deltas:
                    if delta.usage is not None:
                        cached = delta.usage.cached_tokens
            except FlexServeError as exc:
                logger.info("warming a prompt for %s on %s failed, sending it whole: %s",
                            request.request_id, self.replica.name, exc)
                return None
            finally:
                # Closed however it ends (a preemption cancels it mid-piece).
                await _close(deltas)
        self.pool.num_warmups += 1
        self.pool.num_warmup_tokens += len(prefix) - cached
        return cached

    def _held(self, previous: int, cached: int) -> bool:
        """Whether the cache held the previous piece; the first answer decides
        whether the replica caches prefixes at all."""
        if not previous:
            return True  # the first piece: nothing of the gateway's to find yet
        if cached >= previous:
            self.replica.caches_prefixes = True
            return True
        if self.replica.caches_prefixes is None:
            self._off(f"a warm-up found {cached} of the {previous} tokens warmed before it cached "
                      "(no prefix cache, no cached-token counts in its usage, or pieces that are "
                      "not whole KV blocks)")
        else:
            self._miss()
        return False

    def _billed(self, delta: Delta, found: list[tuple[int, int]]) -> Delta:
        """The request's usage with the cached tokens it had before any warming."""
        usage = delta.usage
        if usage is not None:
            if usage.cached_tokens < found[-1][0] and self.replica.caches_prefixes:
                self._miss()
            usage.cached_tokens = min(usage.cached_tokens, natural_cached(found, usage.cached_tokens))
        return delta

    def _miss(self) -> None:
        """A warmed piece was gone when the next piece or the request came."""
        if not self._missed:
            self._missed = True
            self.pool.num_split_misses += 1

    def _off(self, why: str) -> None:
        if self.replica.caches_prefixes is not False:
            logger.warning("split prefill is off for %s: %s; flex prompts go to it whole",
                           self.replica.name, why)
        self.replica.caches_prefixes = False

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A turn at this replica's flex prefill (``warm_gate``), once no default prompt is pending."""
        assert self.replica.warm_gate is not None
        async with self.replica.warm_gate:
            model = self.replica.engine.step_time_model()
            poll = max(_POLL, model.t0) if model is not None else _POLL
            while self._default_pending():
                await asyncio.sleep(poll)
            yield

    def _default_pending(self) -> bool:
        queue = self.pool.queue
        if queue.num_waiting(ServiceTier.DEFAULT) or queue.num_waiting(ServiceTier.PRIORITY):
            return True
        return any(not run.tier.is_preemptible and run.num_output == 0 for run in self.replica.running)


async def _close(deltas: AsyncIterator[Delta]) -> None:
    """Close an engine's generator (which aborts its sequence if still running)."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()
