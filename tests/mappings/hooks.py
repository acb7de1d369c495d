"""A Python hook for the mapping tests (``hook: tests.mappings.hooks:add_checksum``)."""

from __future__ import annotations

from typing import Any


def add_checksum(message: Any, output: dict[str, Any]) -> dict[str, Any]:
    output["checksum"] = len(output["id"])
    return output


def explode(message: Any, output: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("hook exploded")
