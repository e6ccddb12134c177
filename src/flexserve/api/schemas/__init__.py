"""OpenAI's request bodies as msgspec structs, and the one function that
turns a validation failure into an OpenAI-style 400 naming its `param`.

msgspec rather than pydantic: it validates a chat request from the decoded
body in a few microseconds, on the hot path (docs/benchmarks.md, "Request
validation"). Structs list what FlexServe knows of each request; validation
never drops anything: engines get the client's own body (``EngineRequest``).
"""

from flexserve.api.schemas.errors import convert, lookup

__all__ = ["convert", "lookup"]
