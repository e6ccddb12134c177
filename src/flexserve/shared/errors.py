"""What a request is told when the Redis the gateways share is away."""

from __future__ import annotations

from flexserve.errors import ServiceUnavailableError


def shared_state_unavailable(exc: BaseException) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The gateways' shared state (Redis) cannot be reached; nothing was charged. "
        f"Please retry shortly. ({type(exc).__name__})",
        retry_after=1, code="shared_state_unavailable",
    )
