"""Service tiers: an enum with an explicit rank, and the resolution of `auto`."""

from __future__ import annotations

import enum

from flexserve.errors import InvalidRequestError


class ServiceTier(str, enum.Enum):
    """A tier a request can be served on. Lower ``rank`` is admitted first."""

    PRIORITY = "priority"
    DEFAULT = "default"
    FLEX = "flex"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def is_preemptible(self) -> bool:
        """Work that yields its room when higher tiers need it."""
        return self in (ServiceTier.FLEX, ServiceTier.BATCH)


_RANK = {
    ServiceTier.PRIORITY: 0,
    ServiceTier.DEFAULT: 1,
    ServiceTier.FLEX: 2,
    ServiceTier.BATCH: 3,
}

# What a client may put in `service_tier`. `scale` is an older OpenAI tier that
# we serve as `default`; `fast` is OpenAI's other name for `priority`; `batch`
# is reached only through the Batch API.
REQUESTABLE_TIERS = ("auto", "default", "flex", "priority", "scale", "fast")


def resolve_tier(requested: str | None, project_default: ServiceTier) -> ServiceTier:
    """Map the request's `service_tier` to the tier it is queued on."""
    if requested is None or requested == "auto":
        return project_default
    if requested == "scale":
        return ServiceTier.DEFAULT
    if requested == "fast":
        return ServiceTier.PRIORITY
    if requested in ("default", "flex", "priority"):
        return ServiceTier(requested)
    raise InvalidRequestError(
        f"Invalid value for 'service_tier': {requested!r}. "
        f"Supported values are: {', '.join(repr(t) for t in REQUESTABLE_TIERS)}.",
        param="service_tier",
        code="invalid_value",
    )
