"""What a job costs, counted exactly (``Decimal`` dollars) from each answer's usage.

Prices are dollars per million input and output tokens at each tier:
those the endpoint publishes (``published_prices``: FlexServe's model
objects carry them), else ``Prices.parse`` of ``--price 10/40`` (the default
tier), flex half of it unless ``--flex-price`` says otherwise (OpenAI's discount).
``--max-cost`` holds a request back unless its worst case fits: its prompt's
UTF-8 bytes (no token is shorter than a byte) plus a margin for the chat
template, and its ``max_tokens`` (``DEFAULT_MAX_OUTPUT`` where it has none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import openai

MILLION = Decimal(1_000_000)
# Output tokens a request without max_tokens is assumed to make, for --max-cost.
DEFAULT_MAX_OUTPUT = 4096
# Tokens a chat template may add per message, for --max-cost.
TEMPLATE_TOKENS = 16


@dataclass(frozen=True)
class Price:
    """Dollars per million input and output tokens."""

    input: Decimal
    output: Decimal

    @classmethod
    def parse(cls, text: str) -> Price:
        """``IN/OUT`` in dollars per million tokens, e.g. ``10/40``."""
        parts = text.split("/")
        try:
            values = [Decimal(p.strip().lstrip("$")) for p in parts]
        except InvalidOperation:
            values = []
        if len(values) != 2 or any(v < 0 or not v.is_finite() for v in values):
            raise ValueError(f"expected INPUT/OUTPUT dollars per million tokens (e.g. 10/40), "
                             f"not {text!r}")
        return cls(values[0], values[1])

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (self.input * input_tokens + self.output * output_tokens) / MILLION

    def scaled(self, factor: Decimal) -> Price:
        return Price(self.input * factor, self.output * factor)


@dataclass(frozen=True)
class Prices:
    """Each tier's price; None: costs are not counted."""

    default: Price | None = None
    flex: Price | None = None
    priority: Price | None = None

    @classmethod
    def parse(cls, default: str | None, flex: str | None = None,
              priority: str | None = None) -> Prices:
        base = Price.parse(default) if default else None
        return cls(
            default=base,
            flex=Price.parse(flex) if flex else (base.scaled(Decimal("0.5")) if base else None),
            priority=Price.parse(priority) if priority else base,
        )

    @property
    def known(self) -> bool:
        return self.default is not None

    def for_tier(self, tier: str | None) -> Price | None:
        if tier == "flex":
            return self.flex
        if tier == "priority":
            return self.priority
        return self.default


def usage_tokens(usage: Mapping[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of a usage object: chat/completions or responses."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)


def worst_case_tokens(body: Mapping[str, Any]) -> tuple[int, int]:
    """The most (input, output) tokens a request can be billed for."""
    prompt_bytes = 0
    messages = body.get("messages")
    for value in (messages, body.get("prompt"), body.get("input"), body.get("instructions")):
        if value is not None:
            prompt_bytes += len(json.dumps(value, ensure_ascii=False).encode())
    num_messages = len(messages) if isinstance(messages, list) else 1
    limit = next((body[k] for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                  if isinstance(body.get(k), int)), DEFAULT_MAX_OUTPUT)
    return prompt_bytes + TEMPLATE_TOKENS * num_messages, limit


async def published_prices(client: openai.AsyncOpenAI, model: str) -> Prices:
    """The prices an endpoint publishes for ``model`` (FlexServe: ``pricing``
    on the model object, dollars per million tokens per tier); none where it
    publishes none (OpenAI, vLLM) or the model is not found."""
    try:
        answer = await client.get(f"/models/{model}", cast_to=object)
    except openai.APIError:
        return Prices()
    pricing = answer.get("pricing") if isinstance(answer, dict) else None
    if not isinstance(pricing, dict):
        return Prices()

    def tier(name: str) -> Price | None:
        entry = pricing.get(name)
        if not isinstance(entry, dict):
            return None
        try:
            return Price(Decimal(str(entry["input"])), Decimal(str(entry["output"])))
        except (KeyError, InvalidOperation):
            return None

    return Prices(default=tier("default"), flex=tier("flex"), priority=tier("priority"))


@dataclass
class Ledger:
    """Cost so far, what default would have cost, and what is held for requests in flight."""

    prices: Prices
    max_cost: Decimal | None = None
    spent: Decimal = Decimal(0)
    at_default: Decimal = Decimal(0)
    held: Decimal = Decimal(0)
    holds: dict[str, Decimal] = field(default_factory=dict)

    def hold(self, custom_id: str, body: Mapping[str, Any], tier: str | None) -> bool:
        """Hold the worst case of a request at ``tier`` (the dearer of it and
        its fallback is the caller's to pass); False if it would pass ``max_cost``."""
        if self.max_cost is None:
            return True
        price = self.prices.for_tier(tier)
        if price is None:
            return True
        worst = price.cost(*worst_case_tokens(body))
        if self.spent + self.held + worst > self.max_cost:
            return False
        self.holds[custom_id] = worst
        self.held += worst
        return True

    def settle(self, custom_id: str, usage: Mapping[str, Any], tier: str | None) -> Decimal:
        """Count an answered request at the tier it was served at; give back its hold."""
        self.held -= self.holds.pop(custom_id, Decimal(0))
        price = self.prices.for_tier(tier)
        if price is None:
            return Decimal(0)
        tokens = usage_tokens(usage)
        cost = price.cost(*tokens)
        self.spent += cost
        if self.prices.default is not None:
            self.at_default += self.prices.default.cost(*tokens)
        return cost

    def release(self, custom_id: str) -> None:
        self.held -= self.holds.pop(custom_id, Decimal(0))

    @property
    def saved(self) -> Decimal:
        return self.at_default - self.spent
