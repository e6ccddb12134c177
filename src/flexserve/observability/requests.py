"""The request log (``flexserve.requests``): a line per inference request,
and one per scheduler decision worth knowing about a request.

Every line has an ``event``:

- ``request``: a request an engine took, when it ends: who (organization
  and project ids; never a key), model, requested and served tier, the
  replica that served it (last, if it was moved), status, queue time, TTFT
  and total time (ms), tokens, and the cost it was billed (integer
  pico-dollars, as the ledger holds it).
- ``refused``: a request answered with an error before any engine ran it
  (bad input, a gate, a full queue, a flex wait past its deadline): its
  HTTP status and error code.
- ``flex_refused``: the scheduler turned a queued or arriving flex request
  away (429), with the reason and the ``Retry-After`` it was given.
- ``preempted``: a flex run aborted on its replica to make room for
  default or priority work, and requeued.
- ``priority_downgraded``: priority past its share, served (and billed) as
  default.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flexserve.errors import FlexServeError
from flexserve.observability.logs import REQUESTS_LOGGER

if TYPE_CHECKING:
    from flexserve.accounts.service import Principal
    from flexserve.billing.usage import UsageRecord

log = logging.getLogger(REQUESTS_LOGGER)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def log_request(record: UsageRecord, replica: str | None = None) -> None:
    """The line of a request an engine took, costed, and the replica that served it."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info("request", extra={"request_id": record.request_id, "fields": {
        "event": "request",
        "org_id": record.org_id,
        "project_id": record.project_id,
        "model": record.model,
        "requested_tier": record.requested_tier,
        "served_tier": record.served_tier,
        "replica": replica,
        "status": record.status,
        "queue_time_ms": _ms(record.queue_time),
        "ttft_ms": _ms(record.ttft),
        "total_time_ms": _ms(record.total_time),
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_pico": record.costs.total,
    }})


def log_refused(request_id: str, model: str, exc: BaseException,
                principal: Principal | None = None, tier: str | None = None) -> None:
    """The line of a request answered with an error before an engine ran it."""
    if not log.isEnabledFor(logging.INFO):
        return
    if isinstance(exc, FlexServeError):
        status, code, message = exc.status_code, exc.code, exc.message
    else:
        status, code, message = 500, "internal_error", type(exc).__name__
    fields: dict[str, Any] = {"event": "refused"}
    if principal is not None:
        fields.update(org_id=principal.org_id, project_id=principal.project_id)
    fields.update(model=model or None, requested_tier=tier, http_status=status, code=code, reason=message)
    log.info("refused", extra={"request_id": request_id, "fields": fields})


def log_decision(event: str, request_id: str, **fields: Any) -> None:
    """A scheduler decision about one request (``flex_refused``, ``preempted``,
    ``priority_downgraded``)."""
    if log.isEnabledFor(logging.INFO):
        log.info(event.replace("_", " "), extra={"request_id": request_id,
                                                 "fields": {"event": event, **fields}})
