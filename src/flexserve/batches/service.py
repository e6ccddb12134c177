"""The Batches service: create, retrieve, list and cancel, as OpenAI's API has
them; the work itself is the runner's (``batches/runner.py``)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from flexserve.accounts import Principal
from flexserve.api.inference import Endpoint
from flexserve.api.state import Services
from flexserve.batches.runner import BatchRunner, output_line
from flexserve.billing.cost import pico_to_usd
from flexserve.billing.pricing import BATCH_WINDOWS
from flexserve.batches.store import BatchStore
from flexserve.batches.webhooks import WebhookSender
from flexserve.errors import InvalidRequestError, NotFoundError
from flexserve.files.service import MAX_TTL, MIN_TTL

MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
_TIMESTAMPS = (
    "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
    "cancelling_at", "cancelled_at",
)


def not_found(batch_id: str) -> NotFoundError:
    return NotFoundError(f"No batch found with id '{batch_id}'.", param="batch_id")


class Batches:
    def __init__(self, services: Services, endpoints: list[Endpoint], files: Any) -> None:
        self._services = services
        self._files = files
        self._endpoints = {e.path: e for e in endpoints}
        self.store = BatchStore(services.db)
        self.runner = BatchRunner(services, self._endpoints, self.store, files)
        self.webhooks = WebhookSender(services.db, services.settings)

    async def start(self) -> None:
        await self.webhooks.start()
        await self.runner.start()

    async def close(self) -> None:
        await self.runner.close()
        await self.webhooks.close()

    async def create(self, principal: Principal, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequestError("The body must be a JSON object.", param=None, code="invalid_type")
        input_file_id = _required_str(body, "input_file_id")
        endpoint = _required_str(body, "endpoint")
        if endpoint not in self._endpoints:
            raise InvalidRequestError(
                f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                + ", ".join(repr(p) for p in self._endpoints) + ".",
                param="endpoint", code="invalid_value",
            )
        window = _required_str(body, "completion_window")
        if window not in BATCH_WINDOWS:
            raise InvalidRequestError(
                f"Invalid value for 'completion_window': {window!r}. Supported values are: "
                + ", ".join(repr(w) for w in BATCH_WINDOWS) + ".",
                param="completion_window", code="invalid_value",
            )
        metadata = _metadata(body.get("metadata"))
        output_ttl = _output_ttl(body.get("output_expires_after"))
        record = await self._files.get(principal.org_id, input_file_id)
        if record.purpose != "batch":
            raise InvalidRequestError(
                f"File {input_file_id} has purpose {record.purpose!r}; a batch needs a file "
                "uploaded with purpose 'batch'.",
                param="input_file_id", code="invalid_file_purpose",
            )
        now = int(time.time())
        batch_id = "batch_" + secrets.token_hex(12)
        await self.store.insert({
            "id": batch_id, "org_id": principal.org_id, "project_id": principal.project_id,
            "api_key_id": principal.key_id, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window, "status": "validating",
            "metadata": None if metadata is None else orjson.dumps(metadata).decode(),
            "created_at": now, "expires_at": now + BATCH_WINDOWS[window],
            "output_ttl": output_ttl,
        })
        self.runner.submit(batch_id)
        return await self.retrieve(principal.org_id, batch_id)

    async def retrieve(self, org_id: str | None, batch_id: str) -> dict[str, Any]:
        row = await self.store.get(org_id, batch_id)
        if row is None:
            raise not_found(batch_id)
        return await self.to_openai(row)

    async def list(
        self, org_id: str | None, *, limit: int = 20, after: str | None = None
    ) -> dict[str, Any]:
        rows, has_more = await self.store.page(org_id, limit=limit, after=after)
        data = [await self.to_openai(row) for row in rows]
        document: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
        if data:
            document["first_id"], document["last_id"] = data[0]["id"], data[-1]["id"]
        return document

    async def cancel(self, org_id: str | None, batch_id: str) -> dict[str, Any]:
        if await mark_cancelling(self.store, org_id, batch_id):
            self.runner.cancel(batch_id)
        return await self.retrieve(org_id, batch_id)

    async def results(self, org_id: str, batch_id: str, *, errors: bool) -> AsyncIterator[bytes]:
        """The output (or error) lines finished so far, in file order; while the
        batch runs, a snapshot that only ever grows, each line whole."""
        if await self.store.get(org_id, batch_id) is None:
            raise not_found(batch_id)
        return self._results(batch_id, ("failed",) if errors else ("done",))

    async def _results(self, batch_id: str, states: tuple[str, ...]) -> AsyncIterator[bytes]:
        async for line in self.store.iter_finished(batch_id, states):
            yield output_line(batch_id, line)

    async def to_openai(self, row: dict[str, Any]) -> dict[str, Any]:
        document = await batch_object(self.store, row,
                                      in_flight=self.runner.lines_in_flight(row["id"]))
        if row["status"] == "in_progress":
            counts = document["request_counts"]
            left = counts["total"] - counts["completed"] - counts["failed"]
            document["flexserve"]["estimated_completion_at"] = self.runner.estimated_completion(
                row["id"], left)
        return document


async def mark_cancelling(store: BatchStore, org_id: str | None, batch_id: str) -> bool:
    """Move a batch to `cancelling`; False when it already was (or is cancelled).
    The runner running it stops taking lines and ends it as `cancelled`."""
    row = await store.get(org_id, batch_id)
    if row is None:
        raise not_found(batch_id)
    if row["status"] in ("validating", "in_progress"):
        return await store.set_status(batch_id, "cancelling", int(time.time()),
                                      only_from=("validating", "in_progress"))
    if row["status"] in ("cancelling", "cancelled"):
        return False
    raise InvalidRequestError(
        f"Cannot cancel a batch with status '{row['status']}'.", param=None, code="invalid_state"
    )


async def batch_object(
    store: BatchStore, row: dict[str, Any], *, in_flight: int | None = None
) -> dict[str, Any]:
    """OpenAI's ``Batch``: fields without a value are left out (the spec does
    not type them as nullable). ``in_flight``: its lines running now, when
    this process runs it (else read from its lines)."""
    document: dict[str, Any] = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "created_at": row["created_at"],
        "request_counts": {
            "total": row["total"], "completed": row["completed"], "failed": row["failed"],
        },
    }
    if row["model"]:
        document["model"] = row["model"]
    if row["errors"]:
        document["errors"] = {"object": "list", "data": orjson.loads(row["errors"])}
    for name in ("output_file_id", "error_file_id", *_TIMESTAMPS):
        if row[name] is not None:
            document[name] = row[name]
    document["metadata"] = None if row["metadata"] is None else orjson.loads(row["metadata"])
    if in_flight is None:
        in_flight = await store.num_running(row["id"]) if row["status"] == "in_progress" else 0
    # FlexServe's own fields, beside OpenAI's: lines being run now, what the
    # batch cost so far, and (while in progress) when it should be done.
    document["flexserve"] = {
        "lines_in_flight": in_flight,
        "cost": {"value": float(pico_to_usd(row["cost_pico"])), "currency": "usd"},
        "estimated_completion_at": None,
    }
    if row["total"]:
        prompt, completion, cached = row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]
        document["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return document


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequestError(f"Missing required parameter: '{name}'.", param=name,
                                  code="missing_required_parameter")
    if not isinstance(value, str):
        raise InvalidRequestError(f"Invalid type for '{name}': expected a string.", param=name,
                                  code="invalid_type")
    return value


def _output_ttl(value: Any) -> int | None:
    """``output_expires_after``: ``{"anchor": "created_at", "seconds": N}``, N
    from an hour to 30 days, as for an upload's ``expires_after``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("Invalid type for 'output_expires_after': expected an object.",
                                  param="output_expires_after", code="invalid_type")
    if value.get("anchor") != "created_at":
        raise InvalidRequestError(
            "Invalid 'output_expires_after.anchor': the only anchor is 'created_at'.",
            param="output_expires_after.anchor", code="invalid_value",
        )
    seconds = value.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_TTL <= seconds <= MAX_TTL:
        raise InvalidRequestError(
            f"Invalid 'output_expires_after.seconds': expected an integer between {MIN_TTL} "
            f"and {MAX_TTL}.",
            param="output_expires_after.seconds", code="invalid_value",
        )
    return seconds


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("Invalid type for 'metadata': expected an object.",
                                  param="metadata", code="invalid_type")
    if len(value) > MAX_METADATA_PAIRS:
        raise InvalidRequestError(
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs, not {len(value)}.",
            param="metadata", code="object_above_max_properties",
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequestError(
                f"Invalid 'metadata': key {key[:70]!r} is longer than {MAX_METADATA_KEY} characters.",
                param=f"metadata.{key[:64]}", code="string_above_max_length",
            )
        if not isinstance(item, str):
            raise InvalidRequestError(f"Invalid type for 'metadata.{key}': expected a string.",
                                      param=f"metadata.{key}", code="invalid_type")
        if len(item) > MAX_METADATA_VALUE:
            raise InvalidRequestError(
                f"Invalid 'metadata.{key}': longer than {MAX_METADATA_VALUE} characters.",
                param=f"metadata.{key}", code="string_above_max_length",
            )
    return value
