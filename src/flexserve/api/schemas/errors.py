"""msgspec validation failures as OpenAI's 400s.

msgspec says what was wrong and where (``Expected `int` >= 1 - at
`$.messages[0].max_tokens```); OpenAI names the parameter
(``messages[0].content``) and words it for people. ``convert`` validates a
decoded body against a struct and raises ``InvalidRequestError`` with the
parameter's path, a code in OpenAI's vocabulary and, where it helps, the
value that was sent.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from flexserve.errors import InvalidRequestError

T = TypeVar("T")

_WHERE = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_TYPE = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`")
_BOUND = re.compile(r"Expected `(?P<kind>[^`]+)` (?P<op>>=|<=|>|<) (?P<bound>\S+)")
_LENGTH = re.compile(r"Expected `(?P<kind>[^`]+)` of length (?P<op>>=|<=) (?P<bound>\d+)")
_TAG = re.compile(r"Invalid value (?P<value>.+)")
_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]|\[(\.\.\.)\]")

# msgspec's type names in OpenAI's words.
_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "null": "null",
    "array": "an array",
    "object": "an object",
    "str | array": "a string or an array",
    "str | null": "a string",
    "array | null": "an array",
    "object | null": "an object",
    "int | null": "an integer",
    "float | null": "a number",
    "bool | null": "a boolean",
}


def convert(body: Any, kind: type[T]) -> T:
    """``body`` (decoded JSON) as a ``kind`` struct, or the 400 that says why not."""
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "The request body must be a JSON object.", param=None, code="invalid_type"
        )
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise to_invalid_request(exc, body) from None


def to_invalid_request(exc: msgspec.ValidationError, body: Any) -> InvalidRequestError:
    match = _WHERE.match(str(exc))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], (match["path"] or "").lstrip(".")
    param = path or None
    if missing := _MISSING.match(what):
        name = missing["field"]
        param = f"{path}.{name}" if path else name
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if bound := _BOUND.match(what):
        value = lookup(body, path)
        below = bound["op"] in (">=", ">")
        noun = "integer" if bound["kind"] == "int" else "decimal"
        return InvalidRequestError(
            f"Invalid '{param}': {noun} {'below minimum' if below else 'above maximum'} value. "
            f"Expected a value {bound['op']} {bound['bound']}, but got {_show(value)} instead.",
            param=param,
            code=f"{noun}_{'below_min' if below else 'above_max'}_value",
        )
    if length := _LENGTH.match(what):
        value = lookup(body, path)
        size = len(value) if isinstance(value, list | str | dict) else "?"
        longer = length["op"] == "<="
        if not longer and size == 0:
            return InvalidRequestError(
                f"Invalid '{param}': empty array. Expected at least {length['bound']} item"
                f"{'' if length['bound'] == '1' else 's'}.",
                param=param,
                code="empty_array",
            )
        return InvalidRequestError(
            f"Invalid '{param}': {'array too long' if longer else 'array too short'}. Expected "
            f"{'at most' if longer else 'at least'} {length['bound']} items, but got {size}.",
            param=param,
            code="array_above_max_length" if longer else "array_below_min_length",
        )
    if kinds := _TYPE.match(what):
        expected = _WORDS.get(kinds["expected"], kinds["expected"])
        got = _WORDS.get(kinds["got"], kinds["got"])
        return InvalidRequestError(
            f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
            param=param,
            code="invalid_type",
        )
    if tag := _TAG.match(what):
        return InvalidRequestError(
            f"Invalid value for '{param}': {tag['value']}.", param=param, code="invalid_value"
        )
    if what.startswith("Invalid enum value"):
        return InvalidRequestError(
            f"Invalid value for '{param}': {what.removeprefix('Invalid enum value ')}.",
            param=param,
            code="invalid_value",
        )
    return InvalidRequestError(f"Invalid '{param}': {what}.", param=param, code="invalid_value")


def lookup(body: Any, path: str) -> Any:
    """The value at a msgspec path (``messages[0].content``) of a decoded body."""
    value = body
    for name, index, _ in _PATH_PART.findall("." + path if path and path[0] != "[" else path):
        try:
            value = value[name] if name else value[int(index)]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
