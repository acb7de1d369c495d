"""JSON Schema (draft 2020-12) validation whose errors read like advice, at the right line.

Each `jsonschema` error is turned into a `Problem` located through the round-trip document
(:func:`ihehub.config.yamlfile.position`): an unknown key points at the key and suggests the
closest known one, a missing key points at the mapping that lacks it, and a wrong value points at
the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match

from ihehub.channels.registry import did_you_mean
from ihehub.config.errors import Problem, redact
from ihehub.config.yamlfile import PathStep, dotted, position, yaml_type

_TYPE_WORDS = {
    "object": "mapping",
    "array": "list",
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean (true or false)",
    "null": "null",
}
_YAML11_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}


def load_schema(name: str) -> dict[str, Any]:
    """The packaged schema ``ihehub/config/schemas/<name>.json`` (``hub`` or ``channel``)."""
    text = resources.files("ihehub.config").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def check(
    instance: Any,
    schema: Mapping[str, Any],
    *,
    file: str,
    document: Any,
    base: Sequence[PathStep] = (),
) -> list[Problem]:
    """Validate ``instance`` (plain data) against ``schema``; every error becomes a located `Problem`.

    ``document`` is the round-trip YAML the instance came from and ``base`` the path of the
    instance inside it (``("source", "options")`` when checking a connector's options).
    """
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return [
            Problem(
                file=file,
                path=dotted(base),
                message=f"cannot check these settings, their JSON Schema is invalid: {exc.message}",
            )
        ]
    errors = list(Draft202012Validator(schema).iter_errors(instance))
    translator = _Translator(file=file, document=document, base=tuple(base))
    # Unknown keys first, so a "did you mean 'source'?" silences "missing required key 'source'".
    for error in sorted(errors, key=lambda e: e.validator != "additionalProperties"):
        translator.add(error)
    return translator.problems


class _Translator:
    def __init__(self, *, file: str, document: Any, base: tuple[PathStep, ...]) -> None:
        self.file = file
        self.document = document
        self.base = base
        self.problems: list[Problem] = []
        self._suggested: set[tuple[tuple[PathStep, ...], str]] = set()
        self._seen: set[tuple[str, str]] = set()

    def _emit(
        self,
        path: Sequence[PathStep],
        message: str,
        *,
        at_key: bool = False,
        at: Sequence[PathStep] | None = None,
    ) -> None:
        """Record a problem shown at ``path``, located at ``at`` (default: ``path`` itself)."""
        shown = dotted(path)
        if (shown, message) in self._seen:
            return
        self._seen.add((shown, message))
        line, column = position(self.document, path if at is None else at, at_key=at_key)
        self.problems.append(Problem(file=self.file, line=line, column=column, path=shown, message=message))

    def add(self, error: ValidationError) -> None:
        path = (*self.base, *error.absolute_path)
        kind = error.validator
        value = error.instance
        if kind == "additionalProperties" and isinstance(value, dict):
            self._unknown_keys(path, value, error.schema)
        elif kind == "required" and isinstance(value, dict):
            for key in error.validator_value:
                if key not in value and (path, key) not in self._suggested:
                    # Point at the key of the mapping that lacks it (``source:``), or line 1 for the file.
                    self._emit((*path, key), f"missing required key {key!r}", at_key=True, at=path)
        elif kind in ("anyOf", "oneOf") and error.context:
            best = best_match(error.context)
            if best is not None:
                self.add(best)
        else:
            self._emit(path, _describe(error))

    def _unknown_keys(self, path: tuple[PathStep, ...], value: dict[str, Any], schema: Any) -> None:
        known = list(schema.get("properties", {})) if isinstance(schema, dict) else []
        patterns = list(schema.get("patternProperties", {})) if isinstance(schema, dict) else []
        for key in value:
            if key in known or any(re.search(p, str(key)) for p in patterns):
                continue
            hint = did_you_mean(str(key), known)
            if hint:
                suggestion = hint.split("'")[1]
                self._suggested.add((path, suggestion))
            elif known:
                hint = f"; expected one of: {', '.join(known)}"
            else:
                hint = "; this mapping takes no keys"
            self._emit((*path, key), f"unknown key {key!r}{hint}", at_key=True)


def _describe(error: ValidationError) -> str:
    """A sentence for one schema error other than unknown/missing keys."""
    kind = error.validator
    value = error.instance
    rule: Any = error.validator_value
    if kind == "type":
        wanted = [rule] if isinstance(rule, str) else list(rule)
        words = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted)
        got = yaml_type(value)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            got += f" {value!r}"
        message = f"wrong type: expected {words}, got {got}"
        if "boolean" in wanted and isinstance(value, str) and value.lower() in _YAML11_BOOLEANS:
            message += " (YAML 1.2: write true or false)"
        return message
    if kind == "enum":
        choices = ", ".join(repr(c) for c in rule)
        return f"{value!r} is not one of {choices}{did_you_mean(str(value), [str(c) for c in rule])}"
    if kind == "const":
        return f"must be {rule!r}, not {value!r}"
    if kind == "pattern":
        hint = error.schema.get("x-hint") if isinstance(error.schema, dict) else None
        shown = redact(repr(value))
        return f"{shown} {hint}" if hint else f"{shown} does not match the pattern {rule!r}"
    if kind == "minLength" and rule == 1:
        return "must not be empty"
    if kind == "minimum":
        return f"{value!r} is less than the minimum {rule!r}"
    if kind == "maximum":
        return f"{value!r} is more than the maximum {rule!r}"
    if kind == "exclusiveMinimum":
        return f"{value!r} must be greater than {rule!r}"
    if kind == "exclusiveMaximum":
        return f"{value!r} must be less than {rule!r}"
    return error.message
