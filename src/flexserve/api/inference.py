"""What the pipeline knows of a request, whatever its endpoint, and the
interface each inference endpoint implements.

An endpoint (chat, completions, responses, embeddings) declares only its
shapes: how a JSON body becomes an ``Inference`` (validation, the engine
request, the features it needs, token estimates) and how the engine's
deltas become its answer (``Output``: a JSON document, or stream events).
Everything between (auth, gates, the scheduler, disconnects, release or
settle, billing) is ``api/pipeline.py``, once for all of them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from flexserve.engines.base import Delta, EngineRequest, Feature, Usage
from flexserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from flexserve.accounts import Principal
    from flexserve.api.state import Services
    from flexserve.config import Settings
    from flexserve.scheduler.scheduler import Ticket
    from flexserve.tiers import ServiceTier


@dataclass(slots=True)
class Inference:
    """A validated inference request, as the pipeline needs it."""

    engine: EngineRequest
    # The raw `service_tier` the client sent (None when absent).
    service_tier: str | None
    stream: bool
    # Expected prompt tokens (about four characters a token): fair shares,
    # wait estimates, rate limits.
    prompt_tokens: int
    # At most this many prompt tokens: a budget hold is never too small.
    prompt_token_bound: int
    # Most tokens each choice may generate; None: until the model stops.
    max_output_tokens: int | None = None
    # Choices generated in all (`n`, times the prompts of a completions call).
    num_choices: int = 1
    # Stream a last chunk with the usage (`stream_options.include_usage`).
    include_usage: bool = False
    # What the engine must honour, each with the parameter that needs it.
    needs: list[tuple[Feature, str]] = field(default_factory=list)
    # Body fields FlexServe does not know (passed on where an engine takes them).
    unknown_fields: list[str] = field(default_factory=list)
    # The client's `user`, for the usage record.
    user: str | None = None
    # Whatever else the endpoint keeps for its answer (the responses endpoint's
    # request, say).
    extra: Any = None

    @property
    def model(self) -> str:
        return self.engine.model

    def output_tokens_guess(self, unlimited: int) -> int:
        """Output tokens to expect of all choices, ``unlimited`` a choice when
        the request sets no limit."""
        per_choice = unlimited if self.max_output_tokens is None else self.max_output_tokens
        return per_choice * self.num_choices


def check_features(inference: Inference, features: frozenset[Feature], model: str) -> None:
    """400 for the first thing the request needs that its model's engines lack."""
    for feature, param in inference.needs:
        if feature not in features:
            raise InvalidRequestError(
                f"Unsupported parameter: '{param}' is not supported with the model `{model}` "
                f"({_WHY[feature]}).",
                param=param,
                code="unsupported_parameter",
            )
    if inference.unknown_fields and Feature.EXTRA_FIELDS not in features:
        name = inference.unknown_fields[0]
        raise InvalidRequestError(
            f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter"
        )


_WHY = {
    Feature.TOOLS: "its engine cannot call tools",
    Feature.JSON_OBJECT: "its engine cannot constrain output to JSON",
    Feature.JSON_SCHEMA: "its engine cannot constrain output to a JSON schema",
    Feature.LOGPROBS: "its engine does not return log probabilities",
    Feature.N: "its engine generates one choice per request",
    Feature.PENALTIES: "its engine has no presence or frequency penalties",
    Feature.LOGIT_BIAS: "its engine does not take a logit bias",
    Feature.IMAGES: "it does not take image input",
    Feature.AUDIO: "it does not take or produce audio",
    Feature.COMPLETIONS: "its engine does not serve /v1/completions",
    Feature.TOKEN_PROMPTS: "its engine does not take prompts as token ids",
    Feature.ECHO: "its engine cannot echo the prompt",
    Feature.SUFFIX: "its engine cannot fill in the middle",
    Feature.BEST_OF: "its engine does not rank several candidates",
    Feature.EMBEDDINGS: "it is not served for embeddings",
    Feature.DIMENSIONS: "its engine cannot shorten embeddings",
    Feature.EXTRA_FIELDS: "only an upstream engine can act on it",
}


class Output(abc.ABC):
    """How one call's deltas become its answer.

    A non-streamed call ``collect``s every delta, then sends ``document``;
    a stream sends ``open`` with its first delta's ``event``, then an
    ``event`` per delta, then ``close`` (or ``failed`` if the generation
    failed after the stream began)."""

    @abc.abstractmethod
    def collect(self, delta: Delta) -> None:
        """Keep a delta for the whole answer."""

    @abc.abstractmethod
    def document(self, usage: Usage) -> dict[str, Any]:
        """The whole answer, once every delta is in."""

    @abc.abstractmethod
    def open(self) -> bytes:
        """A stream's first events, sent with its first delta's."""

    @abc.abstractmethod
    def event(self, delta: Delta) -> bytes:
        """The stream events of one delta (b"" when there are none yet)."""

    @abc.abstractmethod
    def close(self, usage: Usage) -> bytes:
        """The stream's last events, after every delta."""

    @abc.abstractmethod
    def failed(self, error: BaseException) -> bytes:
        """The event that ends a stream whose generation failed."""


class Endpoint(abc.ABC):
    """One inference endpoint's shapes; ``api/pipeline.py`` does the rest."""

    #: The path it is served on.
    path: ClassVar[str]

    @abc.abstractmethod
    def parse(self, body: Any, request_id: str, settings: Settings) -> Inference:
        """Validate a decoded JSON body; raise InvalidRequestError naming the param."""

    async def prepare(self, services: Services, principal: Principal, inference: Inference) -> None:
        """Work that needs the caller's identity, before any gate (the responses
        endpoint reads the conversation a `previous_response_id` continues)."""

    @abc.abstractmethod
    def output(self, call: Call) -> Output:
        """A fresh ``Output`` for one call."""

    # Whether ``finished`` does anything: the pipeline skips the call (and the
    # cancellation shield a stream needs around it) when it does not.
    has_finish_step = False

    async def finished(self, services: Services, call: Call, output: Output) -> None:
        """After a generation completed, before its answer is sent (the
        responses endpoint stores the response here). Set ``has_finish_step``
        when overriding it."""


@dataclass(eq=False, slots=True)
class Call:
    """One admitted request on its way through the pipeline."""

    request_id: str
    principal: Principal
    inference: Inference
    ticket: Ticket
    # time.monotonic() and time.time() when the request arrived.
    arrived_at: float
    created: int
    # Deltas with output, for a usage estimate when an engine reports none.
    num_deltas: int = 0
    # The latest usage an engine reported before the end (for streams cut short).
    partial_usage: Usage | None = None
    # The gates' holds (budget, rate limit), settled or released exactly once.
    admission: Any = None
    # time.monotonic() when it had passed the gates (for its trace).
    gated_at: float = 0.0

    @property
    def served_tier(self) -> ServiceTier:
        return self.ticket.served_tier or self.ticket.tier

    @property
    def model(self) -> str:
        return self.inference.engine.model
