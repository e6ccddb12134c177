"""`/v1/batches`: create, retrieve, list and cancel (``batches/service.py``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flexserve.accounts import Principal
from flexserve.api.auth import principal_of
from flexserve.api.state import Services
from flexserve.batches import Batches
from flexserve.errors import InvalidRequestError, ServiceUnavailableError

# A create request is a few fields: anything much larger is not one.
_MAX_CREATE_BODY = 64 * 1024


async def _caller(request: Request) -> tuple[Batches, Principal]:
    services: Services = request.app.state.services
    principal = await principal_of(request.headers.get("authorization"), services.keys)
    if services.batches is None:
        raise ServiceUnavailableError("Batches are not available on this server.", retry_after=60)
    return services.batches, principal


def _json(document: dict[str, Any]) -> Response:
    return Response(orjson.dumps(document), media_type="application/json")


async def create_batch(request: Request) -> Response:
    """`POST /v1/batches`."""
    batches, principal = await _caller(request)
    raw = await request.body()
    if len(raw) > _MAX_CREATE_BODY:
        raise InvalidRequestError("The request body is too large.", param=None, code="invalid_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request.", param=None, code="invalid_json"
        ) from None
    return _json(await batches.create(principal, body))


async def retrieve_batch(request: Request) -> Response:
    """`GET /v1/batches/{batch_id}`."""
    batches, principal = await _caller(request)
    return _json(await batches.retrieve(principal.org_id, request.path_params["batch_id"]))


async def cancel_batch(request: Request) -> Response:
    """`POST /v1/batches/{batch_id}/cancel`."""
    batches, principal = await _caller(request)
    return _json(await batches.cancel(principal.org_id, request.path_params["batch_id"]))


async def list_batches(request: Request) -> Response:
    """`GET /v1/batches`: newest first, `limit` 1–100, `after` a batch id."""
    batches, principal = await _caller(request)
    raw = request.query_params.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequestError(
            f"Invalid 'limit': {raw!r}; expected an integer between 1 and 100.",
            param="limit", code="invalid_value",
        )
    after = request.query_params.get("after") or None
    return _json(await batches.list(principal.org_id, limit=limit, after=after))


async def batch_results(request: Request) -> Response:
    """`GET /v1/batches/{batch_id}/output` and `…/errors` (FlexServe's own): the
    lines finished so far, as the output or error file will hold them."""
    batches, principal = await _caller(request)
    lines = await batches.results(principal.org_id, request.path_params["batch_id"],
                                  errors=request.url.path.endswith("/errors"))
    return StreamingResponse(lines, media_type="application/jsonl")
