"""FlexServe's one exception hierarchy.

Every error a client can see is a ``FlexServeError``; ``api.errors`` turns any
of them (and anything unexpected) into OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``::

    FlexServeError                      (500 api_error)
    ├── InvalidRequestError             (400 invalid_request_error, names `param`)
    ├── AuthenticationError             (401 invalid_api_key)
    ├── PermissionDeniedError           (403)
    │   └── VerificationRequiredError   (403 organization_verification_required)
    ├── NotFoundError                   (404)
    │   └── ModelNotFoundError          (404 model_not_found)
    ├── RequestTooLargeError            (413)
    ├── RateLimitError                  (429 rate_limit_exceeded, Retry-After)
    ├── InsufficientQuotaError          (429 insufficient_quota, never retried)
    ├── ResourceUnavailableError        (429 resource_unavailable: no flex capacity)
    ├── EngineError                     (502 upstream_error: the engine failed)
    ├── EngineUnavailableError          (503 engine_unavailable: no healthy replica)
    │   └── EngineOverloadedError       (503 engine_overloaded, Retry-After: replicas turned it away)
    ├── ServiceUnavailableError         (503 service_unavailable, Retry-After: the gateway or its database is busy,
    │   │                                 or it is shutting down: server_shutting_down)
    │   ├── LedgerUnavailableError      (503 ledger_unavailable: usage cannot be recorded)
    │   └── TooManyConnectionsError     (503 too_many_connections: past the connection caps)
    ├── RequestTimeoutError             (408 request_timeout: headers or body too slow)
    └── EngineTimeoutError              (504 upstream_timeout)

Engines raise the ``Engine*`` errors, translating their transport's own
exceptions at one boundary with ``raise … from exc``. An engine raises
``EngineOverloadedError`` only when the replica turned the request away before
any output; the scheduler then tries another replica, and a client sees it
only when none could take the request.
"""

from __future__ import annotations

import math


class FlexServeError(Exception):
    """Base of every error FlexServe reports to a client."""

    status_code: int = 500
    error_type: str = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(FlexServeError):
    status_code = 400
    error_type = "invalid_request_error"
    code = None


class AuthenticationError(FlexServeError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(FlexServeError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class VerificationRequiredError(PermissionDeniedError):
    code = "organization_verification_required"


class NotFoundError(FlexServeError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class RequestTooLargeError(FlexServeError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


def told_retry_after(seconds: float) -> int:
    """The whole seconds a ``Retry-After`` of ``seconds`` tells a client (at least 1)."""
    return max(1, math.ceil(seconds))


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(told_retry_after(seconds))}


class RateLimitError(FlexServeError):
    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None):
        super().__init__(message, headers={**_retry_after(retry_after), **(headers or {})})


class InsufficientQuotaError(FlexServeError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str) -> None:
        # The official SDKs honour x-should-retry: a spent budget will not refill by retrying.
        super().__init__(message, headers={"x-should-retry": "false"})


class ResourceUnavailableError(FlexServeError):
    """Flex could not be served before its deadline. Never billed."""

    status_code = 429
    error_type = "resource_unavailable"
    code = "resource_unavailable"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**_retry_after(retry_after), **(headers or {})})
        self.retry_after = retry_after


class EngineError(FlexServeError):
    status_code = 502
    error_type = "api_error"
    code = "upstream_error"


class EngineUnavailableError(FlexServeError):
    status_code = 503
    error_type = "api_error"
    code = "engine_unavailable"


class EngineOverloadedError(EngineUnavailableError):
    """A replica turned the request away before producing anything: it answered
    429 or 503, or its connection failed. Nothing ran, so nothing is billed,
    and the request may be sent elsewhere as it is."""

    code = "engine_overloaded"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, headers=None if retry_after is None else _retry_after(retry_after))
        # Seconds the replica asked for (its own Retry-After); None when it said nothing.
        self.retry_after = retry_after


class ServiceUnavailableError(FlexServeError):
    """The gateway itself cannot take the request now: its database is locked
    or unreachable, or the bounded pool for expensive work is full. Retrying
    after ``Retry-After`` is expected to work."""

    status_code = 503
    error_type = "api_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code, headers=_retry_after(retry_after))


class LedgerUnavailableError(ServiceUnavailableError):
    """A new billable request is refused because its usage could not be
    recorded safely: the database has been away long enough that the rows
    waiting for it reached their bound, or the usage journal cannot be written.
    Nothing ran, so nothing is billed."""

    code = "ledger_unavailable"


class TooManyConnectionsError(ServiceUnavailableError):
    """A new connection past the gateway's cap, or its client's."""

    code = "too_many_connections"


class RequestTimeoutError(FlexServeError):
    """The client took too long to send its request's headers or body."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class EngineTimeoutError(FlexServeError):
    status_code = 504
    error_type = "api_error"
    code = "upstream_timeout"
