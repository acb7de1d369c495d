"""A source-only connector for the configuration tests (it cannot be a destination)."""

from __future__ import annotations

from ihehub.channels.base import ConnectorSpec

SPEC = ConnectorSpec(
    schemes=("listen",),
    description="source-only connector for tests",
    source="tests.config.fake_connector:FakeSource",
    destination=None,
    options_schema={"type": "object", "additionalProperties": False, "properties": {}},
)
