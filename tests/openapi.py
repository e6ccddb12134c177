"""Validate FlexServe's JSON against OpenAI's published OpenAPI schemas.

The spec mixes OpenAPI 3.0's ``nullable: true`` into 3.1 schemas; we turn it
into JSON Schema's ``type: [..., "null"]`` once, then validate with
``jsonschema`` resolving ``#/components/schemas/...`` inside the spec.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

SPEC_PATH = Path(__file__).resolve().parent / "reference" / "openai-openapi.json"
SPEC_URI = "urn:openai-openapi"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
            kind = node.get("type")
            if isinstance(kind, str):
                node["type"] = [kind, "null"]
            elif isinstance(kind, list) and "null" not in kind:
                node["type"] = [*kind, "null"]
            elif "type" not in node and "enum" not in node:
                node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _registry() -> referencing.Registry:
    spec = _nullable(json.loads(SPEC_PATH.read_text()))
    resource = referencing.Resource.from_contents(
        spec, default_specification=referencing.jsonschema.DRAFT202012
    )
    return referencing.Registry().with_resource(SPEC_URI, resource)


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless ``instance`` is a valid ``schema_name``."""
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=_registry()).validate(instance)
