"""The message envelope that every channel hands to the bus.

A `Message` is what a source connector received, byte for byte, plus what the hub learnt about it
(charset, control id, type).  It is immutable; the store adds state per destination.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    """A time-ordered 32-hex-char id (UUIDv7 layout), so ids sort by arrival."""
    ms = int(utcnow().timestamp() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return f"{value:032x}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """One received message.

    ``raw`` holds the bytes as they came off the wire; ``charset`` is the codec they were decoded
    with (for HL7 v2, from MSH-18).  ``control_id`` is the sender's id for the message (MSH-10 for
    HL7), used for de-duplication and in the message browser.
    """

    channel: str
    raw: bytes
    content_type: str = "application/octet-stream"
    charset: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    id: str = dataclasses.field(default_factory=new_id)
    correlation_id: str | None = None
    control_id: str | None = None
    message_type: str | None = None
    source: str | None = None  # peer address or file name
    received_at: dt.datetime = dataclasses.field(default_factory=utcnow)

    def text(self) -> str:
        """The body decoded with its charset (UTF-8 when unknown), undecodable bytes replaced."""
        return self.raw.decode(self.charset or "utf-8", errors="replace")

    def evolve(self, **changes: Any) -> Message:
        return dataclasses.replace(self, **changes)
