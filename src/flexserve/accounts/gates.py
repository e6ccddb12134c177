"""Model gates: which models need a verified organization.

A gate is ``none`` (anyone), ``streaming`` (only streamed requests need
verification, as o3 streaming did at the Flex launch) or ``all``. A model
without a gate is open.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, insert, select

from flexserve.store.audit import append_audit
from flexserve.store.database import Database
from flexserve.store.schema import model_gates

GATE_LEVELS = ("none", "streaming", "all")


class GateError(ValueError):
    """A gate that cannot be set; the message says why."""


def needs_verification(gate: str, stream: bool) -> bool:
    """Whether a request to a model with this gate needs a verified organization."""
    return gate == "all" or (gate == "streaming" and stream)


class ModelGates:
    """Reads and writes the model gates."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set_gate(self, model: str, verification: str, *, actor: str) -> None:
        if verification not in GATE_LEVELS:
            raise GateError(
                f"invalid verification gate {verification!r}: use one of {', '.join(GATE_LEVELS)}"
            )
        if not model:
            raise GateError("the model id is empty")
        async with self._db.engine.begin() as conn:
            await conn.execute(delete(model_gates).where(model_gates.c.model == model))
            if verification != "none":
                await conn.execute(
                    insert(model_gates).values(
                        model=model, verification=verification, updated_at=int(time.time())
                    )
                )
            await append_audit(
                conn,
                actor=actor,
                action="model_gate.set",
                org_id=None,
                detail={"model": model, "verification": verification},
            )

    async def load(self) -> dict[str, str]:
        """Every gated model and its gate (open models are absent)."""
        async with self._db.engine.connect() as conn:
            rows = await conn.execute(select(model_gates.c.model, model_gates.c.verification))
            return {row.model: row.verification for row in rows}
