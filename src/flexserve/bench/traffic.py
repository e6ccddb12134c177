"""Benchmark traffic: request lengths, arrival times and the prompts that carry them.

No dataset can be downloaded here, so lengths are drawn from distributions
with published means (reference/engine-calibration.md, "Traffic shapes"):

- Interactive chat, ShareGPT as used in the vLLM paper: a lognormal with mean
  input ≈ 161 tokens and mean output ≈ 338 tokens, long-tailed, capped.
- Flex work (evaluations, enrichment): longer prompts, shorter answers —
  uniform input 500–2,000 tokens and output 50–300 tokens.

Every draw comes from a ``random.Random`` seeded by the run's seed and a
label, so that two scenarios with one seed send the same default requests at
the same offsets with the same lengths, and each flex client sends the same
sequence of jobs.

Prompt lengths are exact on the sim engine, whose tokenizer counts
``4 + words`` per message plus 2 (``engines/sim/model.py``). On a real model
(the embedded engine) a word is about one token, so lengths are approximate
there and the benchmark reports what the engine counted.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import cycle, islice

__all__ = [
    "EMBEDDED_DEFAULT",
    "EMBEDDED_FLEX",
    "FLEX_LENGTHS",
    "SHAREGPT_LENGTHS",
    "Job",
    "LengthMix",
    "default_schedule",
    "flex_jobs",
    "messages_for",
    "poisson_arrivals",
]

# The sim tokenizer's overhead for one user message: 4 for the message, 2 to prime the reply.
_SIM_OVERHEAD_TOKENS = 6

_VOCABULARY = (
    "river", "stone", "light", "paper", "garden", "window", "morning", "yellow", "green",
    "orange", "little", "bright", "gentle", "calm", "clear", "early", "fresh", "open",
    "plain", "round", "warm", "quiet", "steady", "simple", "answer", "sample", "value",
    "result", "model", "token", "batch", "queue", "engine", "latency", "cache", "step",
    "spare",
)

_TOPICS = (
    "a lighthouse keeper", "a city under the sea", "the first train to the mountains",
    "a robot who learns to paint", "a village that lost its clocks", "two rival bakers",
    "a map that changes at night", "the last summer market", "a cat that runs a library",
    "a storm over the harbour",
)


@dataclass(frozen=True, slots=True)
class LengthMix:
    """Input and output length distributions for one kind of request.

    ``kind`` is ``lognormal`` (``*_a`` is the mean, ``*_b`` the sigma of the
    underlying normal) or ``uniform`` (``*_a`` to ``*_b`` inclusive); every
    draw is clipped to ``[*_min, *_max]``.
    """

    name: str
    kind: str
    input_a: float
    input_b: float
    output_a: float
    output_b: float
    input_min: int
    input_max: int
    output_min: int
    output_max: int

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One (input tokens, output tokens) pair."""
        if self.kind == "lognormal":
            raw_in = _lognormal(rng, self.input_a, self.input_b)
            raw_out = _lognormal(rng, self.output_a, self.output_b)
        elif self.kind == "uniform":
            raw_in = rng.randint(int(self.input_a), int(self.input_b))
            raw_out = rng.randint(int(self.output_a), int(self.output_b))
        else:
            raise ValueError(f"unknown length distribution {self.kind!r}")
        prompt = min(self.input_max, max(self.input_min, round(raw_in)))
        output = min(self.output_max, max(self.output_min, round(raw_out)))
        return prompt, output

    def describe(self) -> str:
        """One line for the report."""
        if self.kind == "lognormal":
            return (f"lognormal: input mean {self.input_a:g} (sigma {self.input_b:g}) "
                    f"in [{self.input_min}, {self.input_max}], output mean {self.output_a:g} "
                    f"(sigma {self.output_b:g}) in [{self.output_min}, {self.output_max}]")
        return (f"uniform: input {self.input_a:g}-{self.input_b:g}, "
                f"output {self.output_a:g}-{self.output_b:g} tokens")

    def shortened(self, max_output: int) -> LengthMix:
        """The same mix with outputs clipped to ``max_output`` (for smoke runs)."""
        return dataclasses.replace(self, name=f"{self.name}-short", output_max=max_output,
                                   output_min=min(self.output_min, max_output))

    def expected_output(self, seed: int = 0, samples: int = 20_000) -> float:
        """Mean output tokens after clipping, estimated from a fixed sample."""
        rng = random.Random(f"{seed}-expected-{self.name}")
        return sum(self.draw(rng)[1] for _ in range(samples)) / samples


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A lognormal draw whose mean (not median) is ``mean``."""
    mu = math.log(mean) - sigma * sigma / 2
    return rng.lognormvariate(mu, sigma)


# ShareGPT-like chat (vLLM paper means). Output floor 4 so that TPOT is defined.
SHAREGPT_LENGTHS = LengthMix("sharegpt", "lognormal", 161, 1.0, 338, 0.8, 8, 4096, 4, 2048)
# Flex work: long prompts, short answers.
FLEX_LENGTHS = LengthMix("flex", "uniform", 500, 2000, 50, 300, 500, 2000, 50, 300)
# The embedded engine (SmolLM2 on two CPU cores, tens of tokens/s in all): the same
# shapes — chat with longer answers than prompts, flex with long prompts — scaled down.
EMBEDDED_DEFAULT = LengthMix("embedded-default", "lognormal", 20, 0.5, 32, 0.5, 8, 80, 8, 96)
EMBEDDED_FLEX = LengthMix("embedded-flex", "uniform", 40, 120, 16, 48, 40, 120, 16, 48)


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send: when (seconds after the window opens) and how long."""

    index: int
    at: float
    prompt_tokens: int
    output_tokens: int
    # Passed as the request's `seed`: the sim engine's filler text follows it.
    seed: int


def poisson_arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Arrival offsets in ``[0, duration)`` of a Poisson process of ``rate`` per second."""
    if rate <= 0:
        return []
    out: list[float] = []
    at = rng.expovariate(rate)
    while at < duration:
        out.append(at)
        at += rng.expovariate(rate)
    return out


def default_schedule(seed: int, rate: float, duration: float, lengths: LengthMix) -> list[Job]:
    """The default tier's open-loop traffic: Poisson arrivals, one length pair each.

    Arrivals and lengths come from separate streams, so a different rate
    changes the times but not the sequence of lengths.
    """
    times = poisson_arrivals(random.Random(f"{seed}-default-arrivals"), rate, duration)
    length_rng = random.Random(f"{seed}-default-lengths")
    jobs = []
    for index, at in enumerate(times):
        prompt, output = lengths.draw(length_rng)
        jobs.append(Job(index, at, prompt, output, seed=seed * 1_000_003 + index))
    return jobs


def overlaid_schedule(jobs: Sequence[Job], duration: float) -> list[Job]:
    """Default traffic ``jobs`` cut into spans of ``duration`` seconds laid
    over one another: the same requests, each once, in time order, all in
    ``[0, duration)``. One engine's traffic over M times the window, laid
    over the window, is what a fleet of M engines is sent: the same
    requests as the single engine (the same lengths, as many of them: a p99
    ranks as many values in each layout) at the same rate per engine."""
    moved = sorted((dataclasses.replace(job, at=job.at % duration) for job in jobs),
                   key=lambda job: job.at)
    return [dataclasses.replace(job, index=index) for index, job in enumerate(moved)]


def flex_jobs(seed: int, client: int, lengths: LengthMix) -> Iterator[Job]:
    """Closed-loop flex client number ``client``: an endless, seeded sequence of jobs."""
    rng = random.Random(f"{seed}-flex-{client}")
    index = 0
    while True:
        prompt, output = lengths.draw(rng)
        yield Job(index, 0.0, prompt, output, seed=(seed * 1_000_003 + client) * 7919 + index)
        index += 1


def messages_for(job: Job, *, real_text: bool) -> list[dict[str, str]]:
    """One user message of ``job.prompt_tokens`` tokens.

    For the sim engine (``real_text=False``) the length is exact in its
    tokenizer. For a real model it is about one token a word: notes made of
    plain words, then an instruction to write at length, so that the model
    uses the ``max_tokens`` it is given rather than stopping at once.
    """
    words = max(1, job.prompt_tokens - _SIM_OVERHEAD_TOKENS)
    start = job.seed % len(_VOCABULARY)
    filler = islice(cycle(_VOCABULARY[start:] + _VOCABULARY[:start]), words)
    if not real_text:
        # A word of its own first (one sim token), so that no two prompts
        # share a cached prefix on an engine that caches them.
        return [{"role": "user", "content": " ".join((f"job{job.seed}", *islice(filler, words - 1)))}]
    topic = _TOPICS[job.seed % len(_TOPICS)]
    instruction = f"Using these notes, write a long and detailed story about {topic}."
    notes = " ".join(islice(filler, max(1, words - len(instruction.split()) - 2)))
    return [{"role": "user", "content": f"Notes: {notes}\n\n{instruction}"}]
