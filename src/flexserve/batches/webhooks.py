"""Signed webhooks for batches, as OpenAI sends them (Standard Webhooks).

When a batch ends, one event — ``batch.completed``, ``batch.failed``,
``batch.expired`` or ``batch.cancelled`` — is POSTed to the operator's
``batch_webhook_url``, signed with ``batch_webhook_secret``.

Delivery is at least once, from an outbox: the event is written to the
``webhook_events`` table before the batch's final status (so a process
killed between the two cannot leave an ending unannounced, and a batch that
ends again after a restart replaces an event never sent), and is sent only
once the batch has that status. Each attempt is recorded, with the time of
the next one, before the request goes out; a 2xx marks it delivered.
Anything else is retried with exponential backoff and jitter until
``batch_webhook_retry_for`` has passed since the event, then marked failed
and logged. A restarted gateway carries on from the table; the event id,
``webhook-id``, is the same on every attempt. The batch runner only writes
the row: sending happens in a task of its own and never holds it up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import orjson
from sqlalchemy import RowMapping, func, insert, literal, select, update

from flexserve.config import ConfigError, Settings
from flexserve.store.database import Database
from flexserve.store.schema import batches, webhook_events

if TYPE_CHECKING:
    from flexserve.api.state import Services

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for at least this many random bytes in a signing key.
MIN_KEY_BYTES = 24
# The longest pause between two attempts, however many have failed.
_RETRY_LONGEST = 3600.0
# How long the endpoint has to answer one attempt (Standard Webhooks: 15 to 30 s).
_TIMEOUT = 30.0
# Events sent at once; more wait for the next pass.
_PER_PASS = 16
# Pause before looking again after an unexpected error (a busy database, say).
_ERROR_PAUSE = 1.0

# Only an event whose batch has reached the event's status is sent.
_BATCH_HAS_ENDED = webhook_events.c.type == literal("batch.") + batches.c.status


def signing_key(secret: str) -> bytes:
    """The HMAC key in a ``whsec_<base64>`` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ConfigError(f"setting 'batch_webhook_secret' must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ConfigError(
            f"setting 'batch_webhook_secret': the part after {SECRET_PREFIX!r} is not base64"
        ) from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"setting 'batch_webhook_secret' holds {len(key)} bytes; it needs at least "
            f"{MIN_KEY_BYTES} random bytes"
        )
    return key


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256 of
    ``{webhook-id}.{webhook-timestamp}.{body}``."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_body(event_id: str, event_type: str, created_at: int, batch_id: str) -> str:
    """OpenAI's event object: thin, the batch is retrieved for the rest."""
    return orjson.dumps({
        "id": event_id, "object": "event", "created_at": created_at, "type": event_type,
        "data": {"id": batch_id},
    }).decode()


@contextlib.asynccontextmanager
async def announcing(services: Services, batch_id: str, status: str) -> AsyncIterator[None]:
    """Around the write of a batch's final ``status``: its event is recorded
    before, and the sender woken after, when webhooks are on."""
    sender = None if services.batches is None else services.batches.webhooks
    if sender is None or not sender.enabled:
        yield
        return
    await sender.record(batch_id, status)
    yield
    sender.wake()


class WebhookSender:
    """Records batch events and sends them to ``batch_webhook_url``."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._url = settings.batch_webhook_url
        self.enabled = bool(self._url)
        self._key = b""
        if self.enabled:
            url = urlsplit(self._url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(
                    f"setting 'batch_webhook_url': {self._url!r} is not an http(s) URL"
                )
            if not settings.batch_webhook_secret:
                raise ConfigError("setting 'batch_webhook_secret' is needed with batch_webhook_url")
            self._key = signing_key(settings.batch_webhook_secret)
        self._retry_first = settings.batch_webhook_retry_first
        self._retry_for_ms = int(settings.batch_webhook_retry_for * 1000)
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.enabled:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        """Stop sending; an attempt cut short is made again after the restart."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def record(self, batch_id: str, status: str) -> None:
        """Write the event announcing that the batch ends with ``status``. A
        batch ends once; if it ends again (its process was killed before
        the status was written), an event not yet sent is replaced."""
        event_type = f"batch.{status}"
        now = int(time.time())
        async with self._db.engine.begin() as conn:
            row = (await conn.execute(
                select(webhook_events.c.id, webhook_events.c.attempts)
                .where(webhook_events.c.batch_id == batch_id)
            )).first()
            if row is None:
                event_id = "evt_" + secrets.token_hex(16)
                await conn.execute(insert(webhook_events).values(
                    id=event_id, batch_id=batch_id, type=event_type, created_at=now,
                    body=event_body(event_id, event_type, now, batch_id),
                    next_attempt_ms=now * 1000,
                ))
            elif row.attempts == 0:
                await conn.execute(
                    update(webhook_events).where(webhook_events.c.id == row.id).values(
                        type=event_type, created_at=now,
                        body=event_body(row.id, event_type, now, batch_id),
                    )
                )

    async def _run(self) -> None:
        while True:
            # Cleared before looking, so a wake during the look is not lost.
            self._wake.clear()
            pause: float | None
            try:
                pause = await self._send_due()
            except Exception:
                log.exception("batch webhooks: sending stopped on an error; trying again")
                pause = _ERROR_PAUSE
            if pause != 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)

    async def _send_due(self) -> float | None:
        """Send the events due; seconds until the next one (None: none is pending)."""
        pending = webhook_events.c.state == "pending"
        async with self._db.engine.connect() as conn:
            due = (await conn.execute(
                select(webhook_events)
                .join(batches, batches.c.id == webhook_events.c.batch_id)
                .where(pending, webhook_events.c.next_attempt_ms <= _now_ms(), _BATCH_HAS_ENDED)
                .order_by(webhook_events.c.next_attempt_ms)
                .limit(_PER_PASS)
            )).mappings().all()
            if not due:
                next_ms = (await conn.execute(
                    select(func.min(webhook_events.c.next_attempt_ms))
                    .join(batches, batches.c.id == webhook_events.c.batch_id)
                    .where(pending, _BATCH_HAS_ENDED)
                )).scalar()
                return None if next_ms is None else max(0.001, (next_ms - _now_ms()) / 1000)
        outcomes = await asyncio.gather(*(self._attempt(event) for event in due),
                                        return_exceptions=True)
        errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        for error in errors:
            log.error("batch webhooks: an attempt stopped on an error", exc_info=error)
        return _ERROR_PAUSE if errors else 0

    async def _attempt(self, event: RowMapping) -> None:
        now_ms = _now_ms()
        where = (webhook_events.c.id == event["id"], webhook_events.c.state == "pending")
        if now_ms >= event["created_at"] * 1000 + self._retry_for_ms:
            async with self._db.engine.begin() as conn:
                await conn.execute(update(webhook_events).where(*where).values(state="failed"))
            log.error(
                "batch webhook %s (%s for %s) not delivered after %d attempts; giving up. "
                "Last: %s", event["id"], event["type"], event["batch_id"], event["attempts"],
                event["last_error"],
            )
            return
        attempt = event["attempts"] + 1
        pause = min(_RETRY_LONGEST, self._retry_first * 2 ** (attempt - 1))
        # Recorded first: if the process dies while sending, it is sent again.
        async with self._db.engine.begin() as conn:
            claimed = await conn.execute(
                update(webhook_events)
                .where(*where, webhook_events.c.attempts == event["attempts"])
                .values(attempts=attempt,
                        next_attempt_ms=now_ms + int(pause * (0.5 + random.random()) * 1000))
            )
        if not claimed.rowcount:
            return  # another process took it
        error = await self._post(event["id"], event["body"].encode())
        async with self._db.engine.begin() as conn:
            if error is None:
                await conn.execute(update(webhook_events).where(*where).values(
                    state="delivered", delivered_at=int(time.time()), last_error=None))
            else:
                await conn.execute(update(webhook_events).where(*where).values(last_error=error))
        if error is not None:
            log.warning("batch webhook %s, attempt %d: %s", event["id"], attempt, error)

    async def _post(self, event_id: str, body: bytes) -> str | None:
        """One attempt; None when the endpoint answered 2xx, else what went wrong."""
        assert self._session is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self._key, event_id, timestamp, body),
        }
        try:
            # A redirect is a failure, as Standard Webhooks has it: not followed.
            async with self._session.post(self._url, data=body, headers=headers,
                                          allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)
