"""The organization's admin endpoints: usage, costs, flex savings, verification.

All need an admin key of the organization (403 for any other key) and show
only that organization's data. The reports follow OpenAI's admin API shapes
(``UsageResponse`` of ``UsageCompletionsResult`` or ``CostsResult``
buckets); ``/v1/organization/flex/savings`` is FlexServe's own, in the same
page-of-buckets shape.

Amounts leave as JSON numbers of dollars (the spec's type), converted from
the ledger's integer pico-dollars at this edge only; a total under $9,000 is
exact to the pico-dollar once read back (``round(value * 1e12)``).

A verification submission is the one costly call here (a scrypt hash): each
organization may make ``verification_submissions_per_minute`` of them (429
past it), and the hashes run on a bounded pool (503 when it is full, the
organization's call given back).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from flexserve.accounts import Principal
from flexserve.accounts.verification import VerificationError, VerificationRequest
from flexserve.api import admin_params as qp
from flexserve.api.auth import authenticate_admin
from flexserve.api.body import read_json
from flexserve.api.state import Services
from flexserve.billing.cost import pico_to_usd
from flexserve.billing.reports import (
    COST_GROUP_BY,
    USAGE_GROUP_BY,
    ReportQuery,
    ReportRow,
    cost_report,
    savings_report,
    usage_report,
)
from flexserve.errors import InvalidRequestError, ServiceUnavailableError

_USAGE_KEYS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")
_LINES = (
    ("input", "input_cost", "input_tokens"),
    ("cached input", "cached_input_cost", "cached_input_tokens"),
    ("output", "output_cost", "output_tokens"),
)


def _json(body: object, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def _amount(pico: int) -> dict[str, object]:
    return {"value": float(pico_to_usd(pico)), "currency": "usd"}


async def _admin(request: Request) -> tuple[Services, Principal]:
    services: Services = request.app.state.services
    return services, await authenticate_admin(request, services.keys)


def _report_query(
    principal: Principal,
    window: qp.Window,
    group_by: tuple[str, ...],
    request: Request,
    *,
    with_models: bool,
) -> ReportQuery:
    params = request.query_params
    if qp.array(params, "user_ids"):
        raise InvalidRequestError(
            "Invalid 'user_ids': FlexServe has no users; filter by api_key_ids or project_ids.",
            param="user_ids",
            code="unsupported_parameter",
        )
    return ReportQuery(
        org_id=principal.org_id,
        origin=window.origin,
        width=window.width,
        start=window.page_start,
        end=window.page_end,
        group_by=group_by,
        models=qp.array(params, "models") if with_models else (),
        project_ids=qp.array(params, "project_ids"),
        api_key_ids=qp.array(params, "api_key_ids"),
        batch=qp.boolean(params, "batch") if with_models else None,
    )


def _page(window: qp.Window, results: dict[int, list[dict[str, Any]]]) -> dict[str, object]:
    data = [
        {
            "object": "bucket",
            "start_time": start,
            "end_time": min(start + window.width, window.end),
            "results": results.get(start, []),
        }
        for start in window.bucket_starts()
    ]
    return {
        "object": "page",
        "data": data,
        "has_more": window.has_more,
        "next_page": window.next_page,
    }


async def usage_completions(request: Request) -> Response:
    """GET /v1/organization/usage/completions"""
    services, principal = await _admin(request)
    window = qp.window(request.query_params, qp.USAGE_LIMITS)
    group_by = qp.array(request.query_params, "group_by", USAGE_GROUP_BY)
    query = _report_query(principal, window, group_by, request, with_models=True)
    rows = await usage_report(services.db, query)
    results: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        results.setdefault(row.bucket_start, []).append(_usage_result(row, group_by))
    return _json(_page(window, results))


def _usage_result(row: ReportRow, group_by: tuple[str, ...]) -> dict[str, Any]:
    sums = row.sums
    result: dict[str, Any] = {
        "object": "organization.usage.completions.result",
        "input_tokens": sums["input_tokens"],
        "input_cached_tokens": sums["input_cached_tokens"],
        "input_uncached_tokens": sums["input_tokens"] - sums["input_cached_tokens"],
        "output_tokens": sums["output_tokens"],
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": sums["num_model_requests"],
    }
    for key in _USAGE_KEYS:
        result[key] = row.keys.get(key) if key in group_by else None
    return result


async def costs(request: Request) -> Response:
    """GET /v1/organization/costs"""
    services, principal = await _admin(request)
    window = qp.window(request.query_params, qp.COST_LIMITS)
    group_by = qp.array(request.query_params, "group_by", COST_GROUP_BY)
    query = _report_query(principal, window, group_by, request, with_models=False)
    rows = await cost_report(services.db, query)
    return _json(_page(window, _cost_results(rows, group_by)))


def _cost_results(
    rows: list[ReportRow], group_by: tuple[str, ...]
) -> dict[int, list[dict[str, Any]]]:
    """Rows split by model and tier, merged into the groups asked for."""
    by_line = "line_item" in group_by
    # (bucket, project_id, api_key_id, line_item) → [pico-dollars, tokens]
    merged: dict[tuple[int, str | None, str | None, str | None], list[int]] = {}
    for row in rows:
        project_id = row.keys.get("project_id") if "project_id" in group_by else None
        api_key_id = row.keys.get("api_key_id") if "api_key_id" in group_by else None
        lines = _LINES if by_line else (("", "", ""),)
        for line, cost_key, tokens_key in lines:
            if by_line:
                cost, tokens = row.sums[cost_key], row.sums[tokens_key]
                if not cost and not tokens:
                    continue
                item = f"{row.keys['model']}, {line}, {row.keys['service_tier']}"
            else:
                cost = sum(row.sums[key] for _, key, _ in _LINES)
                tokens, item = 0, None
            total = merged.setdefault((row.bucket_start, project_id, api_key_id, item), [0, 0])
            total[0] += cost
            total[1] += tokens
    results: dict[int, list[dict[str, Any]]] = {}
    for (bucket, project_id, api_key_id, item), (cost, tokens) in sorted(
        merged.items(), key=lambda kv: tuple("" if k is None else str(k) for k in kv[0])
    ):
        results.setdefault(bucket, []).append(
            {
                "object": "organization.costs.result",
                "amount": _amount(cost),
                "line_item": item,
                "project_id": project_id,
                "api_key_id": api_key_id,
                "quantity": tokens if by_line else None,
                "quantity_unit": "tokens" if by_line else None,
            }
        )
    return results


async def flex_savings(request: Request) -> Response:
    """GET /v1/organization/flex/savings — FlexServe's own: by UTC day, what
    flex and batch cost against the same tokens at list (default-tier) price."""
    services, principal = await _admin(request)
    window = qp.window(request.query_params, qp.COST_LIMITS)
    query = _report_query(principal, window, (), request, with_models=False)
    rows = await savings_report(services.db, query)
    results: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        list_cost, cost = row.sums["list_cost"], row.sums["cost"]
        results.setdefault(row.bucket_start, []).append(
            {
                "object": "organization.flex_savings.result",
                "service_tier": row.keys["service_tier"],
                "num_model_requests": row.sums["num_model_requests"],
                "list_amount": _amount(list_cost),
                "amount": _amount(cost),
                "savings": _amount(list_cost - cost),
            }
        )
    return _json(_page(window, results))


def _verification_object(
    principal: Principal, status: str, latest: VerificationRequest | None
) -> dict[str, object]:
    return {
        "object": "organization.verification",
        "organization_id": principal.org_id,
        "status": status,
        "request_id": None if latest is None else latest.id,
        "document_type": None if latest is None else latest.document_type,
        "country": None if latest is None else latest.country,
        "submitted_at": None if latest is None else latest.submitted_at,
        "decided_at": None if latest is None else latest.decided_at,
        "reason": None if latest is None else latest.reason,
    }


def _string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"Invalid type for '{name}': expected a string.", param=name, code="invalid_type"
        )
    return value


async def submit_verification(request: Request) -> Response:
    """POST /v1/organization/verification: an identity document for review."""
    services, principal = await _admin(request)
    body = await read_json(request, services.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", param=None)
    document_type, country, number = (
        _string_field(body, name) for name in ("document_type", "country", "number")
    )
    services.verification_rate.take(principal.org_id)  # 429 past the organization's rate
    try:
        submitted = await services.verifications.submit(
            principal.org_id, document_type, country, number, actor=f"key:{principal.key_id}"
        )
    except VerificationError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    except ServiceUnavailableError:
        # Refused before any work: the retry it is asked to make must not find the rate spent.
        services.verification_rate.give_back(principal.org_id)
        raise
    return _json(_verification_object(principal, submitted.status, submitted))


async def verification_status(request: Request) -> Response:
    """GET /v1/organization/verification: the status and the latest submission."""
    services, principal = await _admin(request)
    org = await services.accounts.get_org(principal.org_name)
    latest = await services.verifications.latest(principal.org_id)
    return _json(_verification_object(principal, org.verification_status, latest))
