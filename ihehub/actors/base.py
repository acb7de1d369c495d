"""What an actor is to the hub.

A channel with ``actor:`` hands every message, once it is stored, to the actor; the actor speaks the
transaction (e.g. ITI-9: QBP^Q23 in, RSP^K23 out), calls its domain service, and returns an `Outcome`
whose ``body`` is the reply the source sends back.  An actor that raises gets its message marked
``error`` and the sender an AR/AE with ERR 207 — never a dropped connection.  Destinations of an actor
channel receive only the messages the actor accepted (AA).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from ihehub.bus.message import Message
from ihehub.bus.store import MessageStore
from ihehub.channels.base import Outcome


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ActorContext:
    """What the hub gives an actor: its configuration, the message store and the database engine."""

    node_id: str
    store: MessageStore
    config: Any = None  # ihehub.config.HubConfig
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # domain services (empi, audit, ...)


@runtime_checkable
class Actor(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def handle(self, message: Message) -> Outcome: ...
