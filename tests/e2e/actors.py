"""Test actors for the actor hook (channels name them as ``tests.e2e.actors:Class``)."""

from __future__ import annotations

from typing import Any

from ihehub.actors import ActorContext
from ihehub.bus.message import Message
from ihehub.channels.base import Outcome


class Responder:
    """Answers a QBP with an RSP naming the PID it was asked for; rejects a query for 'UNKNOWN'."""

    def __init__(self, *, name: str, options: dict[str, Any], context: ActorContext) -> None:
        self.name = name
        self.prefix = options.get("prefix", "RSP")
        self.context = context
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def handle(self, message: Message) -> Outcome:
        segs = message.text().split("\r")
        cid = segs[0].split("|")[9]
        if "UNKNOWN" in message.text():
            return Outcome(code="AE", error="unknown key identifier", error_code="204", error_location="QPD^1^3")
        if "CRASH" in message.text():
            raise RuntimeError("index corrupted")
        body = (f"MSH|^~\\&|HUB|H|HIS|H1|20261127||RSP^K23^RSP_K23|R{cid}|P|2.5\r"
                f"MSA|AA|{cid}\rQAK|Q1|OK\r{self.prefix}|{self.context.node_id}\r").encode()
        return Outcome(code="AA", body=body)
