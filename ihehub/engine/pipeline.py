"""A channel at run time: source -> filter -> transformer -> persisted with its deliveries -> reply.

The source's reply is sent only after the message and its delivery rows are committed, so what was
acknowledged is never lost.  Filtering and transformation run before that commit, in memory, so a
filtered or failed message is still stored (status ``filtered`` / ``error``) and browsable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ihehub.bus.db import StoreUnavailable
from ihehub.bus.message import Message
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.store import MessageStore, queue_name
from ihehub.channels.base import Destination, Outcome, Source
from ihehub.channels.registry import import_ref
from ihehub.engine.expr import Filter
from ihehub.engine.metrics import HubMetrics

log = logging.getLogger("ihehub.channel")

Transformer = Callable[[Message], "Message | bytes | str | None"]
Handler = Callable[[Message], Awaitable[Outcome]]  # an IHE actor's handle()


def load_callable(ref: str) -> Callable[..., Any]:
    """Import ``package.module:function``; errors say which part is wrong."""
    try:
        fn = import_ref(ref)
    except ValueError as exc:
        raise ValueError(f"transformer {ref!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"transformer {ref!r}: {ref.partition(':')[2]!r} is not callable")
    return fn


@dataclasses.dataclass(kw_only=True)
class DestinationRuntime:
    name: str
    queue: str
    connector: Destination
    filter: Filter | None
    retry: RetryPolicy
    concurrency: int = 4


class ChannelRuntime:
    """Runs one channel's source and turns each received message into a committed store entry."""

    def __init__(
        self,
        *,
        name: str,
        source: Source,
        store: MessageStore,
        destinations: Sequence[DestinationRuntime],
        filter: Filter | None = None,
        transformer: Transformer | None = None,
        dedup: bool = False,
        fifo: bool = False,
        metrics: HubMetrics | None = None,
        on_queued: Callable[[Sequence[str]], None] | None = None,
        handler: Handler | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.store = store
        self.destinations = list(destinations)
        self.filter = filter
        self.transformer = transformer
        self.dedup = dedup
        self.fifo = fifo
        self.metrics = metrics
        self.on_queued = on_queued
        self.handler = handler
        self.running = False

    async def start(self) -> None:
        await self.source.start(self.inbound)
        self.running = True
        log.info("channel %s started (%s)", self.name, type(self.source).__name__)

    async def stop(self) -> None:
        if self.running:
            await self.source.stop()
            self.running = False
            log.info("channel %s stopped", self.name)

    async def inbound(self, message: Message) -> Outcome:
        t0 = time.perf_counter()
        outcome = await self._process(message)
        if self.metrics is not None:
            self.metrics.received(self.name, outcome.code, time.perf_counter() - t0)
        return outcome

    async def _process(self, message: Message) -> Outcome:
        store = self.store
        try:
            if self.filter is not None and not self.filter(message):
                await store.append(message, status="filtered")
                return Outcome(code="AA", message_id=message.id)
            transformed: bytes | None = None
            working = message
            if self.transformer is not None:
                try:
                    result = self.transformer(message)
                except Exception as exc:
                    # a MappingError names the rule, field and value, and carries an HL7 0357 code
                    log.warning("channel %s: transformer failed on %s: %s", self.name, message.id, exc)
                    await store.append(message, status="error", error=f"transformer: {exc}")
                    return Outcome(code="AE", message_id=message.id, error=f"transformer failed: {exc}",
                                   error_code=str(getattr(exc, "code", None) or "207"))
                if result is None:
                    await store.append(message, status="filtered")
                    return Outcome(code="AA", message_id=message.id)
                if isinstance(result, Message):
                    transformed = result.raw
                    if result.headers != message.headers:  # e.g. the mapping and its version: kept with it
                        message = message.evolve(headers=result.headers)
                elif isinstance(result, str):
                    transformed = result.encode(message.charset or "utf-8")
                else:
                    transformed = bytes(result)
                working = message.evolve(raw=transformed)
            targets = [d for d in self.destinations if d.filter is None or d.filter(working)]
            if self.handler is not None:
                return await self._handle(message, working, [d.name for d in targets], transformed)
            res = await store.append(
                message, [d.name for d in targets], transformed=transformed, dedup=self.dedup
            )
        except StoreUnavailable as exc:
            log.error("channel %s: store unavailable, rejecting %s: %s", self.name, message.control_id, exc)
            return Outcome(code="AR", error="message store unavailable; resend later", error_code="207")
        except Exception as exc:
            log.exception("channel %s: could not persist %s", self.name, message.control_id)
            return Outcome(code="AR", error=f"internal error: {type(exc).__name__}", error_code="207")
        if res.duplicate_of is None and targets and self.on_queued is not None:
            self.on_queued([queue_name(self.name, d.name) for d in targets])
        return Outcome(code="AA", message_id=message.id)

    async def _handle(self, message: Message, working: Message, targets: list[str],
                      transformed: bytes | None) -> Outcome:
        """Actor channel: store, let the actor answer, then record its verdict and queue deliveries (AA only)."""
        assert self.handler is not None
        res = await self.store.append(message, status="received", transformed=transformed, dedup=self.dedup)
        if res.duplicate_of is not None:
            return Outcome(code="AA", message_id=message.id)
        try:
            outcome = await self.handler(working)
        except Exception as exc:
            log.exception("channel %s: actor failed on %s", self.name, message.control_id)
            await self.store.complete(message, status="error", error=f"actor: {type(exc).__name__}: {exc}")
            return Outcome(code="AE", message_id=message.id, error=f"internal error in the actor: {exc}",
                           error_code="207")
        accepted = outcome.accepted
        queued = targets if accepted else []
        await self.store.complete(message, status="queued" if queued else ("processed" if accepted else "error"),
                                  error=None if accepted else outcome.error, destinations=queued)
        if queued and self.on_queued is not None:
            self.on_queued([queue_name(self.name, d) for d in queued])
        return dataclasses.replace(outcome, message_id=message.id)
