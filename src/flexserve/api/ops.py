"""Models, health and metrics endpoints."""

from __future__ import annotations

import math

import orjson
from starlette.requests import Request
from starlette.responses import Response

from flexserve.api.auth import authenticate
from flexserve.api.pipeline import check_place
from flexserve.api.state import Services
from flexserve.billing.pricing import format_micro_usd
from flexserve.errors import InvalidRequestError, ModelNotFoundError
from flexserve.tiers import ServiceTier


def _json(body: object, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def _model_object(services: Services, model: str) -> dict[str, object]:
    pool = services.scheduler.pools[model]
    card = next(c for r in pool.replicas for c in r.engine.models() if c.id == model)
    out: dict[str, object] = {"id": card.id, "object": "model", "created": card.created,
                              "owned_by": card.owned_by}
    pricing = _pricing(services, model)
    if pricing:
        out["pricing"] = pricing
    return out


def _pricing(services: Services, model: str) -> dict[str, dict[str, str]]:
    """The model's price per tier (dollars per million tokens, as decimal
    strings), for clients that count their cost: what this gateway bills."""
    prices = services.gate.policy.prices
    out = {}
    for tier in (ServiceTier.PRIORITY, ServiceTier.DEFAULT, ServiceTier.FLEX):
        price = prices.price(model, tier)
        if price is not None:
            out[tier.value] = {"input": format_micro_usd(price.input),
                               "cached_input": format_micro_usd(price.cached_input),
                               "output": format_micro_usd(price.output)}
    return out


async def list_models(request: Request) -> Response:
    services: Services = request.app.state.services
    await authenticate(request, services.keys)
    data = [_model_object(services, model) for model in sorted(services.scheduler.pools)]
    return _json({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    services: Services = request.app.state.services
    model = request.path_params["model"]
    await authenticate(request, services.keys)
    if model not in services.scheduler.pools:
        raise ModelNotFoundError(model)
    return _json(_model_object(services, model))


async def flex_status(request: Request) -> Response:
    """Spare flex capacity, queue depth and expected wait per model (or the
    one asked for), for a request of the caller's organization sent now (or
    at the ``place`` named, if it is still held) and the client's deadline:
    the ``max_wait`` query parameter, else the ``X-Flex-Max-Wait`` header,
    else the server's."""
    services: Services = request.app.state.services
    principal = await authenticate(request, services.keys)
    model = request.query_params.get("model")
    query = request.query_params.get("max_wait")
    header = request.headers.get("x-flex-max-wait")
    # Both are checked (a malformed one is a 400 either way); the query wins.
    from_header = None if header is None else _max_wait(header, None)
    max_wait = from_header if query is None else _max_wait(query, "max_wait")
    raw_place = request.query_params.get("place")
    place = None if raw_place is None else check_place(raw_place, "place")
    # For the caller's organization: behind what it already has queued.
    data = services.scheduler.flex_status(
        model=model, max_wait=max_wait, org_id=principal.org_id, place=place
    )
    return _json({"object": "list", "data": data})


def _max_wait(raw: str, param: str | None) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        where = "max_wait" if param else "X-Flex-Max-Wait header"
        raise InvalidRequestError(
            f"Invalid {where}: {raw!r}; expected a number of seconds >= 0.",
            param=param,
            code="invalid_value" if param else "invalid_header",
        )
    return value


async def healthz(request: Request) -> Response:
    services: Services = request.app.state.services
    pools = services.scheduler.pools
    healthy = {m: sum(1 for r in p.replicas if r.healthy) for m, p in pools.items()}
    ok = bool(pools) and all(healthy.values())
    return _json({"status": "ok" if ok else "degraded", "models": healthy}, 200 if ok else 503)


async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
