"""Operators' keys: the credential of the operator's dashboard.

An operator runs the gateway for every organization: the operator's page
shows all of them and decides their verification. Its key is made from the
command line (`flexserve operators create NAME`), where only someone with
the database already has that power; it opens the dashboard and nothing
else (the API does not accept it). Like API keys it is 256 random bits,
stored as a SHA-256 hash and shown once; a revoked key opens no new session.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from flexserve.accounts.keys import display_prefix, hash_key
from flexserve.accounts.service import AccountError, new_id
from flexserve.store.database import Database
from flexserve.store.schema import operator_keys

OPERATOR_KEY_PREFIX = "fs-op-"
_NAME_MAX = 64


@dataclass(frozen=True, slots=True)
class OperatorKey:
    id: str
    name: str
    prefix: str
    created_at: int
    revoked_at: int | None


def is_operator_key(key: str) -> bool:
    return key.startswith(OPERATOR_KEY_PREFIX)


class Operators:
    """Operators' keys in the database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str) -> tuple[OperatorKey, str]:
        """A new key for operator ``name`` (several may share a name: one per
        person or machine is the habit). Returns it with the key, shown once."""
        name = name.strip()
        if not name or len(name) > _NAME_MAX:
            raise AccountError(f"an operator's name is 1 to {_NAME_MAX} characters, not {name!r}")
        key = OPERATOR_KEY_PREFIX + secrets.token_urlsafe(32)
        made = OperatorKey(new_id("opk_"), name, display_prefix(key), int(time.time()), None)
        async with self._db.engine.begin() as conn:
            await conn.execute(insert(operator_keys).values(
                id=made.id, name=made.name, key_hash=hash_key(key), prefix=made.prefix,
                created_at=made.created_at,
            ))
        return made, key

    async def list(self) -> list[OperatorKey]:
        k = operator_keys.c
        statement = select(k.id, k.name, k.prefix, k.created_at, k.revoked_at).order_by(k.created_at, k.id)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        return [OperatorKey(r.id, r.name, r.prefix, r.created_at, r.revoked_at) for r in rows]

    async def revoke(self, key_id: str) -> OperatorKey:
        """Revoke the key ``key_id`` (``opk_…``); revoking twice is no error."""
        k = operator_keys.c
        async with self._db.engine.begin() as conn:
            await conn.execute(update(operator_keys).where(k.id == key_id, k.revoked_at.is_(None))
                               .values(revoked_at=int(time.time())))
        for found in await self.list():
            if found.id == key_id:
                return found
        raise AccountError(f"no operator key {key_id!r} (see `flexserve operators list`)")

    async def authenticate(self, key: str) -> str | None:
        """The name of the operator whose active key this is, else None."""
        if not is_operator_key(key):
            return None
        k = operator_keys.c
        statement = select(k.name).where(k.key_hash == hash_key(key), k.revoked_at.is_(None))
        async with self._db.engine.connect() as conn:
            name = (await conn.execute(statement)).scalar_one_or_none()
        return None if name is None else str(name)
