"""Validate a connector's ``options`` mapping against the JSON Schema in its ``SPEC``.

JSON Schema draft 2020-12 (``additionalProperties: false`` catches typos, answered with a "did you
mean" hint).  The first problem is reported with its location, e.g. ``options.tls.verify``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

from ihehub.channels.base import ConnectorError
from ihehub.channels.registry import did_you_mean


def check_options(options: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """Raise `ConnectorError` naming the first way ``options`` breaks ``schema``; ``where`` prefixes it."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(options)), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    error = errors[0]
    at = "options" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = [str(k) for k in error.schema.get("properties", {})]
        unknown = [str(k) for k in error.instance if k not in known]
        first = unknown[0] if unknown else "?"
        raise ConnectorError(
            f"{where}: {at}: unknown option {first!r}{did_you_mean(first, known)}; known: {', '.join(known)}"
        )
    raise ConnectorError(f"{where}: {at}: {error.message}")


def union_schema(*schemas: Mapping[str, Any]) -> dict[str, Any]:
    """One schema accepting every option of either role; the constructors check the role's own."""
    properties: dict[str, Any] = {}
    for schema in schemas:
        for key, value in schema["properties"].items():
            if key == "tls" and key in properties:
                value = {**value, "properties": {**properties[key]["properties"], **value["properties"]}}
                value.pop("description", None)
            properties[key] = value
    return {"type": "object", "additionalProperties": False, "properties": properties}
