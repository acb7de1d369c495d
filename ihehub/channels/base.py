"""Connector base types: what a source and a destination look like to the rest of the hub.

A *source* turns bytes on the wire into `Message` objects and hands each to an
``Inbound`` callable, which persists it and returns an `Outcome` that the source renders
(for MLLP: the ACK).  A *destination* sends a `Message` and returns a `Response`.
Connectors are registered by URL scheme in :mod:`ihehub.channels.registry`; each connector
module carries its JSON-Schema fragment (``SPEC``) next to its code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from ihehub.bus.message import Message


class ConnectorError(Exception):
    """A connector could not be built or could not do its job; the message says why."""


class DeliveryError(ConnectorError):
    """A destination failed to deliver.  ``retryable`` False sends the message straight to dead letters."""

    def __init__(self, message: str, *, retryable: bool = True, response: bytes | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.response = response


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Response:
    """What a destination got back.  ``ok`` False with ``retryable`` True is retried with backoff."""

    ok: bool = True
    body: bytes = b""
    status: str = ""  # e.g. "AA", "200"
    error: str | None = None
    retryable: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What the hub decided about one received message; the source renders it for its peer.

    ``code`` follows HL7 acknowledgment codes because they say exactly what a sender must do:
    ``AA`` accepted (persisted), ``AE`` error in the message itself (fix it, don't resend as is),
    ``AR`` rejected for reasons unrelated to content (hub unavailable: resend later).
    ``error_code`` is the HL7 table 0357 code (e.g. ``"207"``) and ``error_location`` an ERR-2
    location such as ``"MSH^1^9"``.  ``body`` set means the reply was built by an actor (e.g. an
    RSP^K23) and is sent as is.  An MLLP source builds an ACK with MSA and ERR; an HTTP source
    maps AA to 200, AE to 400 and AR to 503.
    """

    code: str = "AA"
    message_id: str | None = None
    error: str | None = None
    error_code: str | None = None
    error_location: str | None = None
    body: bytes | None = None
    content_type: str | None = None

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


# The bus-facing callable a source calls for every received message.
Inbound = Callable[[Message], Awaitable[Outcome]]


@runtime_checkable
class Source(Protocol):
    """A listener or poller.  ``start`` begins receiving and returns once it is listening."""

    name: str

    async def start(self, inbound: Inbound) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Destination(Protocol):
    """A one-method transport: send a message, return the response or raise `DeliveryError`."""

    name: str

    async def send(self, message: Message) -> Response: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ConnectorSpec:
    """Registry entry: the schemes it serves, how to build it, and its options' JSON Schema."""

    schemes: tuple[str, ...]
    description: str
    source: str | None = None  # "pkg.mod:Class", imported lazily
    destination: str | None = None
    options_schema: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    example: str = ""
