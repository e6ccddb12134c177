"""Stored responses: what `POST /v1/responses` keeps when `store` is true.

Each row holds the Response object as returned, the request's input items,
and the whole conversation up to and including this response as chat
messages, so that a request continuing it (`previous_response_id`) reads one
row, not a chain. Every lookup is scoped to the organization: another
organization's id is as absent as one that never existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import delete, insert, select

from flexserve.store.database import Database
from flexserve.store.schema import stored_responses


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(
        self, *, org_id: str, project_id: str, created_at: int, response: dict[str, Any],
        input_items: list[dict[str, Any]], conversation: list[dict[str, Any]],
    ) -> None:
        async with self._db.engine.begin() as conn:
            await conn.execute(
                insert(stored_responses).values(
                    id=response["id"],
                    org_id=org_id,
                    project_id=project_id,
                    created_at=created_at,
                    previous_response_id=response.get("previous_response_id"),
                    response=orjson.dumps(response).decode(),
                    input_items=orjson.dumps(input_items).decode(),
                    conversation=orjson.dumps(conversation).decode(),
                )
            )

    async def get(self, org_id: str, response_id: str) -> StoredResponse | None:
        if "\x00" in response_id:  # never an id: and PostgreSQL would refuse to look it up
            return None
        async with self._db.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        stored_responses.c.response,
                        stored_responses.c.input_items,
                        stored_responses.c.conversation,
                    ).where(
                        stored_responses.c.id == response_id, stored_responses.c.org_id == org_id
                    )
                )
            ).first()
        if row is None:
            return None
        return StoredResponse(
            response_id, orjson.loads(row.response), orjson.loads(row.input_items),
            orjson.loads(row.conversation),
        )

    async def delete(self, org_id: str, response_id: str) -> bool:
        """Delete one; False when the organization has no such response."""
        async with self._db.engine.begin() as conn:
            result = await conn.execute(
                delete(stored_responses).where(
                    stored_responses.c.id == response_id, stored_responses.c.org_id == org_id
                )
            )
        return bool(result.rowcount)
