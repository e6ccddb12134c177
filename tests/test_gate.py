"""The gate between validation and the scheduler: admission and settlement,
over a real (SQLite) database, without a network."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from flexserve.accounts import Principal
from flexserve.accounts.gates import ModelGates
from flexserve.api.gates import Gate
from flexserve.api.endpoints.chat import ChatCompletions
from flexserve.api.inference import Inference
from flexserve.config import Settings
from flexserve.billing.budget import org_scope
from flexserve.billing.price_book import PriceBook
from flexserve.billing.pricing import ModelPrice, PriceEntry
from flexserve.billing.usage import UsageRecord
from flexserve.errors import InsufficientQuotaError, VerificationRequiredError
from flexserve.store import Database
from flexserve.tiers import ServiceTier

PRINCIPAL = Principal(
    key_id="key_1",
    org_id="org-1",
    org_name="acme",
    project_id="proj_1",
    is_admin=False,
    default_service_tier="default",
    verification_status="unverified",
)


def chat_request(model: str = "m", *, stream: bool = False) -> Inference:
    """A chat request as the pipeline hands it to the gate."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 10, "stream": stream}
    return ChatCompletions().parse(body, "req_test", Settings())


CHAT = chat_request()


@pytest.fixture
async def gate(tmp_db_url: str) -> AsyncIterator[Gate]:
    db = Database.from_url(tmp_db_url)
    await db.migrate()
    await PriceBook(db).set_price(
        PriceEntry("m", ServiceTier.DEFAULT, ModelPrice(1_000_000, 500_000, 4_000_000)),
        actor="test",
    )
    await ModelGates(db).set_gate("gated", "streaming", actor="test")
    gate = Gate(db, refresh_interval=60)
    await gate.start()
    yield gate
    await gate.close()
    await db.close()


def record(status: str, served_tier: str = "default", **changes: object) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": "req_1",
        "org_id": "org-1",
        "project_id": "proj_1",
        "api_key_id": "key_1",
        "model": "m",
        "requested_tier": "auto",
        "served_tier": served_tier,
        "prompt_tokens": 6,
        "completion_tokens": 10,
        "queue_time": 0.0,
        "ttft": 0.1,
        "total_time": 0.2,
        "status": status,
    }
    fields.update(changes)
    return UsageRecord(**fields)  # type: ignore[arg-type]


async def test_a_completed_request_is_costed_at_the_served_tier_once(gate: Gate) -> None:
    gate.budgets.set_limits({org_scope("org-1"): 10**15})
    admission = await gate.admit(PRINCIPAL, CHAT, ServiceTier.PRIORITY)
    assert admission.headers == {}
    held = gate.budgets.reserved(org_scope("org-1"))
    assert held == (2 * (len("hi there") + 16)) * 1_000_000 + 2 * 10 * 4_000_000  # priority: 2x
    done = record("completed", served_tier="default")  # downgraded by the scheduler
    gate.settle(admission, done)
    assert done.price == ModelPrice(1_000_000, 500_000, 4_000_000)
    assert done.costs.total == 6 * 1_000_000 + 10 * 4_000_000 == done.list_cost
    gate.settle(admission, done)
    gate.release(admission)
    assert gate.budgets.spent(org_scope("org-1")) == done.costs.total
    assert gate.budgets.reserved(org_scope("org-1")) == 0


@pytest.mark.parametrize("status", ["error", "preempted", "aborted"])
async def test_work_that_did_not_finish_costs_nothing(gate: Gate, status: str) -> None:
    admission = await gate.admit(PRINCIPAL, CHAT, ServiceTier.FLEX)
    unfinished = record(status, served_tier="flex")
    gate.settle(admission, unfinished)
    assert unfinished.costs.total == 0 and unfinished.list_cost == 0
    assert unfinished.price is not None and unfinished.price.input == 500_000  # still shown
    assert gate.budgets.spent(org_scope("org-1")) == 0


async def test_flex_is_half_and_the_list_cost_shows_the_saving(gate: Gate) -> None:
    admission = await gate.admit(PRINCIPAL, CHAT, ServiceTier.FLEX)
    flex = record("client_disconnected", served_tier="flex", prompt_tokens=0, completion_tokens=3)
    gate.settle(admission, flex)
    assert (flex.costs.total, flex.list_cost) == (3 * 2_000_000, 3 * 4_000_000)


async def test_a_spent_budget_refuses_with_insufficient_quota(gate: Gate) -> None:
    gate.budgets.set_limits({org_scope("org-1"): 1})
    admission = await gate.admit(PRINCIPAL, CHAT, ServiceTier.DEFAULT)  # 0 < 1: admitted
    gate.settle(admission, record("completed"))
    with pytest.raises(InsufficientQuotaError) as refused:
        await gate.admit(PRINCIPAL, CHAT, ServiceTier.FLEX)
    assert refused.value.headers == {"x-should-retry": "false"}
    assert "organization 'acme'" in refused.value.message


@pytest.mark.parametrize(
    ("status", "says"),
    [
        ("unverified", "can submit an identity document"),
        ("pending", "pending review"),
        ("rejected", "was rejected"),
    ],
)
async def test_verification_messages_say_what_to_do(gate: Gate, status: str, says: str) -> None:
    principal = replace(PRINCIPAL, verification_status=status)
    streamed = chat_request("gated", stream=True)
    with pytest.raises(VerificationRequiredError) as refused:
        await gate.admit(principal, streamed, ServiceTier.DEFAULT)
    assert refused.value.param == "stream" and says in refused.value.message
    await gate.admit(principal, replace(streamed, stream=False), ServiceTier.DEFAULT)
    await gate.admit(
        replace(principal, verification_status="verified"), streamed, ServiceTier.DEFAULT
    )
