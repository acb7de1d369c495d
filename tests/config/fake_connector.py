"""A small connector used only by the configuration tests: an in-memory source and destination.

Its options schema has the shapes the validator must handle: an integer with a minimum, an enum,
and a nested mapping with ``additionalProperties: false``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorSpec, Inbound, Response
from ihehub.channels.registry import ConnectorContext

OPTIONS_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_frame_bytes": {"type": "integer", "minimum": 1},
        "encoding": {"enum": ["utf-8", "gb18030", "latin-1"]},
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"verify": {"type": "boolean"}, "ca": {"type": "string"}},
        },
    },
}

SPEC = ConnectorSpec(
    schemes=("fake",),
    description="in-memory connector for tests",
    source="tests.config.fake_connector:FakeSource",
    destination="tests.config.fake_connector:FakeDestination",
    options_schema=OPTIONS_SCHEMA,
    example="source: {url: 'fake://in'}",
)


class FakeSource:
    def __init__(self, *, name: str, url: str, options: dict[str, Any], context: ConnectorContext) -> None:
        self.name = name
        self.url = url
        self.options = options
        self.inbound: Inbound | None = None

    async def start(self, inbound: Inbound) -> None:
        self.inbound = inbound

    async def stop(self) -> None:
        self.inbound = None


class FakeDestination:
    def __init__(self, *, name: str, url: str, options: dict[str, Any], context: ConnectorContext) -> None:
        self.name = name
        self.url = url
        self.sent: list[Message] = []

    async def send(self, message: Message) -> Response:
        self.sent.append(message)
        return Response(ok=True, status="AA")

    async def close(self) -> None:
        self.sent.clear()
