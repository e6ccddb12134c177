"""A valid instance of a JSON schema, built directly from the schema.

A real engine honours `response_format: json_schema` and tool parameters by
constraining its sampler to a grammar compiled from the schema. The sim has
no sampler, so it writes one instance of the schema instead: seeded, so that
one seed gives one document, and made of filler words where a string goes.

Covered: ``type`` (one or a list), ``object`` (``properties``, ``required``,
``additionalProperties``, ``minProperties``/``maxProperties``), ``array``
(``items``, ``prefixItems``, ``minItems``/``maxItems``, ``uniqueItems``),
``string`` (``minLength``/``maxLength``, common ``format``s), ``integer`` and
``number`` (inclusive and exclusive bounds, ``multipleOf``), ``boolean``,
``null``, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf`` and local
``$ref``s (``#/$defs/…``, ``#/definitions/…``, ``#``). A schema that needs
more (``pattern``, ``not``, conditionals…) raises ``SchemaError`` rather than
yield a document that does not validate: the caller refuses the request.
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from typing import Any

from flexserve.engines.sim.tokenizer import FILLER_WORDS

__all__ = ["SchemaError", "instance_of"]

# Keywords whose constraint the builder cannot promise to meet.
UNSUPPORTED = frozenset({
    "pattern", "patternProperties", "propertyNames", "not", "if", "then", "else",
    "dependentSchemas", "dependentRequired", "dependencies", "contains",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
# Past this nesting, optional members are left out so that recursive schemas end.
_SHALLOW_DEPTH = 6
# Past this nesting a schema is taken to recurse without end.
_MAX_DEPTH = 40
# Attempts at a new distinct item before `uniqueItems` gives up.
_UNIQUE_TRIES = 16
# Range drawn from when a numeric schema leaves a side unbounded.
_DEFAULT_SPAN = 100

_OBJECT_KEYS = ("properties", "required", "additionalProperties", "minProperties",
                "maxProperties")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems")
_STRING_KEYS = ("minLength", "maxLength", "format")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class SchemaError(ValueError):
    """The schema admits nothing, or asks for something the sim cannot build."""


def instance_of(schema: Any, rng: random.Random) -> Any:
    """A JSON value valid against ``schema`` (draft 2020-12), drawn from ``rng``."""
    try:
        return _Builder(schema, rng).build(schema, 0)
    except SchemaError:
        raise
    except (TypeError, ValueError, AttributeError, LookupError, RecursionError) as exc:
        # A keyword of the wrong type (`"properties": []`, `"minItems": "2"`…).
        raise SchemaError(f"the schema is malformed ({exc})") from exc


class _Builder:
    __slots__ = ("rng", "root")

    def __init__(self, root: Any, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def build(self, schema: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise SchemaError("the schema recurses without end")
        schema = self._flatten(schema, depth)
        if schema is True or not schema:
            return self._words(1, 4)
        for name in UNSUPPORTED.intersection(schema):
            raise SchemaError(f"the sim engine cannot honour '{name}'")
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            if not isinstance(options, list) or not options:
                raise SchemaError("'enum' must be a non-empty array")
            return self.rng.choice(options)
        for name in ("anyOf", "oneOf"):
            if name in schema:
                rest = {k: v for k, v in schema.items() if k != name}
                branch = self._pick_branch(schema[name], depth)
                return self.build(_merge(rest, self._flatten(branch, depth)) if rest else branch,
                                  depth + 1)
        kind = self._pick_type(schema, depth)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        raise SchemaError(f"unknown type {kind!r}")

    # --- references and composition ---------------------------------------------

    def _flatten(self, schema: Any, depth: int) -> Any:
        """The schema with its `$ref` and `allOf` folded in."""
        if schema is False:
            raise SchemaError("the schema `false` admits nothing")
        if schema is True:
            return schema
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean")
        if "$ref" in schema:
            if depth > _MAX_DEPTH:
                raise SchemaError("the schema recurses without end")
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            target = self._flatten(self._resolve(schema["$ref"]), depth + 1)
            schema = _merge(target, rest) if rest else target
            if schema is True:
                return schema
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise SchemaError("'allOf' must be an array")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                flat = self._flatten(part, depth + 1)
                if flat is not True:
                    merged = _merge(merged, flat)
            schema = merged
        return schema

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"only local references are supported, not {ref!r}")
        node = self.root
        for token in ref[1:].split("/")[1:] if ref != "#" else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise SchemaError(f"reference {ref!r} points nowhere")
        return node

    def _pick_branch(self, branches: Any, depth: int) -> Any:
        if not isinstance(branches, list) or not branches:
            raise SchemaError("'anyOf' and 'oneOf' must be non-empty arrays")
        if depth >= _SHALLOW_DEPTH:
            # Deep down, the branch that refers to the fewest others ends soonest.
            return min(branches, key=lambda b: json.dumps(b).count('"$ref"'))
        return self.rng.choice(branches)

    def _pick_type(self, schema: dict[str, Any], depth: int) -> str:
        kind = schema.get("type")
        if isinstance(kind, str):
            return kind
        if isinstance(kind, list):
            if not kind:
                raise SchemaError("'type' must not be an empty array")
            kinds = [str(k) for k in kind]
            if depth >= _SHALLOW_DEPTH:
                flat = [k for k in kinds if k not in ("object", "array")]
                kinds = flat or kinds
            elif len(kinds) > 1 and "null" in kinds:
                kinds.remove("null")  # null is a dull answer; keep it for the last resort
            return self.rng.choice(kinds)
        for keys, name in ((_OBJECT_KEYS, "object"), (_ARRAY_KEYS, "array"),
                           (_STRING_KEYS, "string"), (_NUMBER_KEYS, "number")):
            if any(k in schema for k in keys):
                return name
        return "string"

    # --- the types ---------------------------------------------------------------

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = list(dict.fromkeys(schema.get("required") or ()))
        extra = schema.get("additionalProperties", True)
        least = int(schema.get("minProperties", 0))
        most = schema.get("maxProperties")
        if most is not None and len(required) > most:
            raise SchemaError("'required' names more properties than 'maxProperties' allows")
        keys = list(required)
        optional = [k for k in properties if k not in required]
        if depth < _SHALLOW_DEPTH:
            keys += [k for k in optional if self.rng.random() < 0.5]
        if most is not None:
            keys = keys[:int(most)]
        for k in optional:
            if len(keys) >= least:
                break
            if k not in keys:
                keys.append(k)
        number = 1
        while len(keys) < least:
            if extra is False:
                raise SchemaError("'minProperties' needs more properties than the schema allows")
            name = f"extra_{number}"
            number += 1
            if name not in properties and name not in keys:
                keys.append(name)
        value: dict[str, Any] = {}
        for k in keys:
            if k in properties:
                member = properties[k]
            elif extra is False:
                raise SchemaError(f"required property {k!r} is not allowed by the schema")
            else:
                member = extra if isinstance(extra, dict) else True
            value[k] = self.build(member, depth + 1)
        return value

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        least = int(schema.get("minItems", 0))
        most = schema.get("maxItems")
        if items is False:
            most = len(prefix) if most is None else min(int(most), len(prefix))
        high = least + 3 if most is None else int(most)
        if high < least:
            raise SchemaError("'maxItems' is below 'minItems'")
        count = least if depth >= _SHALLOW_DEPTH else self.rng.randint(least, min(high, least + 3))
        unique = bool(schema.get("uniqueItems"))
        seen: set[str] = set()
        value: list[Any] = []
        for i in range(count):
            member = prefix[i] if i < len(prefix) else items
            item = self.build(member, depth + 1)
            if unique:
                key = _identity(item)
                for _ in range(_UNIQUE_TRIES):
                    if key not in seen:
                        break
                    item = self.build(member, depth + 1)
                    key = _identity(item)
                if key in seen:
                    if len(value) >= least:
                        break
                    raise SchemaError("'uniqueItems' cannot be met with the items allowed")
                seen.add(key)
            value.append(item)
        return value

    def _words(self, least: int, most: int) -> str:
        count = self.rng.randint(least, most)
        return "".join(self.rng.choice(FILLER_WORDS) for _ in range(count)).strip()

    def _string(self, schema: dict[str, Any]) -> str:
        least = int(schema.get("minLength", 0))
        most = schema.get("maxLength")
        if most is not None and int(most) < least:
            raise SchemaError("'maxLength' is below 'minLength'")
        fmt = schema.get("format")
        text = self._formatted(fmt) if isinstance(fmt, str) else None
        if text is not None:
            if len(text) < least or (most is not None and len(text) > int(most)):
                raise SchemaError(f"a '{fmt}' string cannot meet the length bounds")
            return text
        text = self._words(1, 4)
        while len(text) < least:
            text += self.rng.choice(FILLER_WORDS)
        return text if most is None else text[:int(most)]

    def _formatted(self, fmt: str) -> str | None:
        rng = self.rng
        word = rng.choice(FILLER_WORDS).strip()
        day = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        if fmt == "date-time":
            return f"{day}T{clock}Z"
        if fmt == "date":
            return day
        if fmt == "time":
            return f"{clock}Z"
        if fmt == "email":
            return f"{word}@example.com"
        if fmt in ("hostname", "idn-hostname"):
            return f"{word}.example.com"
        if fmt in ("uri", "url", "iri", "uri-reference", "iri-reference"):
            return f"https://example.com/{word}"
        if fmt == "uuid":
            hex_ = f"{rng.getrandbits(128):032x}"
            return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"
        if fmt == "ipv4":
            return ".".join(str(rng.randint(1, 254)) for _ in range(4))
        if fmt == "ipv6":
            return ":".join(f"{rng.getrandbits(16):x}" for _ in range(8))
        if fmt == "duration":
            return f"P{rng.randint(1, 30)}D"
        return None  # an unknown format is an annotation only

    def _integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema)
        least = None if low is None else (math.floor(low[0]) + 1 if low[1] else math.ceil(low[0]))
        most = None if high is None else (math.ceil(high[0]) - 1 if high[1] else math.floor(high[0]))
        least, most = _span(least, most)
        if least > most:
            raise SchemaError("no integer lies within the bounds")
        step = schema.get("multipleOf")
        if step is None:
            return self.rng.randint(least, most)
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0:
            raise SchemaError("'multipleOf' must be a positive number")
        # Integers that are multiples of p/q (in lowest terms) are multiples of p.
        unit = Fraction(str(step)).numerator if isinstance(step, float) else step
        found = self._multiple(least, most, unit, step)
        return int(found)

    def _number(self, schema: dict[str, Any]) -> float | int:
        low, high = _bounds(schema)
        if low is None and high is None:
            lo, hi = 0.0, float(_DEFAULT_SPAN)
        elif low is None:
            assert high is not None
            lo, hi = high[0] - _DEFAULT_SPAN, high[0]
        elif high is None:
            lo, hi = low[0], low[0] + _DEFAULT_SPAN
        else:
            lo, hi = low[0], high[0]
        step = schema.get("multipleOf")
        if step is not None:
            if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0:
                raise SchemaError("'multipleOf' must be a positive number")
            return self._multiple(lo, hi, step, step, low, high)
        candidates = [round(lo + (hi - lo) * self.rng.random(), 2), (lo + hi) / 2]
        for value in candidates:
            if _within(value, low, high):
                return value
        raise SchemaError("no number lies within the bounds")

    def _multiple(self, lo: float, hi: float, unit: float, step: float,
                  low: tuple[float, bool] | None = None,
                  high: tuple[float, bool] | None = None) -> float | int:
        """A multiple of ``unit`` in [lo, hi] (and strictly inside exclusive
        bounds) that a validator dividing by ``step`` sees as a multiple."""
        first, last = math.ceil(lo / unit), math.floor(hi / unit)
        if first > last:
            raise SchemaError("no multiple of 'multipleOf' lies within the bounds")
        ks = [self.rng.randint(first, last) for _ in range(8)] + [first, last]
        if first <= 0 <= last:
            ks.append(0)
        for k in ks:
            value = k * unit
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                value = int(value)
            if _within(value, low, high) and _is_multiple(value, step):
                return value
        raise SchemaError("no multiple of 'multipleOf' within the bounds could be written")


def _bounds(schema: dict[str, Any]) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
    """The tightest (value, exclusive) lower and upper bounds of a numeric schema."""
    low: tuple[float, bool] | None = None
    high: tuple[float, bool] | None = None
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    for name, value in (("minimum", minimum), ("maximum", maximum)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise SchemaError(f"'{name}' must be a number")
    if minimum is not None:
        low = (minimum, ex_min is True)  # draft 4: a boolean exclusiveMinimum
    if maximum is not None:
        high = (maximum, ex_max is True)
    if isinstance(ex_min, (int, float)) and not isinstance(ex_min, bool):
        if low is None or ex_min >= low[0]:
            low = (ex_min, True)
    if isinstance(ex_max, (int, float)) and not isinstance(ex_max, bool):
        if high is None or ex_max <= high[0]:
            high = (ex_max, True)
    return low, high


def _span(least: int | None, most: int | None) -> tuple[int, int]:
    if least is None and most is None:
        return 0, _DEFAULT_SPAN
    if least is None:
        assert most is not None
        return most - _DEFAULT_SPAN, most
    if most is None:
        return least, least + _DEFAULT_SPAN
    return least, most


def _within(value: float, low: tuple[float, bool] | None, high: tuple[float, bool] | None) -> bool:
    if low is not None and (value <= low[0] if low[1] else value < low[0]):
        return False
    return not (high is not None and (value >= high[0] if high[1] else value > high[0]))


def _identity(value: Any) -> str:
    """What `uniqueItems` compares: JSON equality, where 1 and 1.0 are one value."""
    def canonical(node: Any) -> Any:
        if isinstance(node, float) and node.is_integer():
            return int(node)
        if isinstance(node, list):
            return [canonical(v) for v in node]
        if isinstance(node, dict):
            return {k: canonical(v) for k, v in node.items()}
        return node

    return json.dumps(canonical(value), sort_keys=True)


def _is_multiple(value: float, step: float) -> bool:
    """What a JSON Schema validator checks: an integral quotient for a float
    divisor, no remainder for an integer one."""
    if isinstance(step, float):
        quotient = value / step
        return math.isfinite(quotient) and quotient == int(quotient)
    return value % step == 0


def _merge(a: Any, b: Any) -> Any:
    """Two flattened schemas that must both hold, as one (for `allOf` and `$ref` siblings)."""
    if a is True:
        return b
    if b is True:
        return a
    merged = dict(a)
    for key, value in b.items():
        if key not in merged:
            merged[key] = value
            continue
        old = merged[key]
        if key == "properties":
            props = dict(old)
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            merged[key] = props
        elif key == "required":
            merged[key] = list(dict.fromkeys([*old, *value]))
        elif key == "type":
            kinds = _types_in_common(old, value)
            if not kinds:
                raise SchemaError("'allOf' asks for types that have nothing in common")
            merged[key] = kinds[0] if len(kinds) == 1 else kinds
        elif key == "enum":
            merged[key] = [v for v in old if v in value]
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            merged[key] = max(old, value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            merged[key] = min(old, value)
        elif key in ("items", "additionalProperties"):
            if old is False or value is False:
                merged[key] = False
            else:
                merged[key] = {"allOf": [old, value]}
        elif key in ("anyOf", "oneOf", "multipleOf", "const", "prefixItems") and old != value:
            raise SchemaError(f"'allOf' combines two different '{key}'s")
        else:
            merged[key] = value
    return merged


def _types_in_common(a: Any, b: Any) -> list[str]:
    left = [a] if isinstance(a, str) else list(a)
    right = [b] if isinstance(b, str) else list(b)
    common = [k for k in left if k in right]
    # An integer is a number too.
    if "integer" in left and "number" in right and "integer" not in common:
        common.append("integer")
    if "number" in left and "integer" in right and "integer" not in common:
        common.append("integer")
    return common
