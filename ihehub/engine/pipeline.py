"""A channel at run time: source -> filter -> transformer -> persisted with its deliveries -> reply.

The source's reply is sent only after the message and its delivery rows are committed, so what was
acknowledged is never lost.  Filtering and transformation run before that commit, in memory, so a
filtered or failed message is still stored (status ``filtered`` / ``error``) and browsable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ihehub.bus.db import StoreUnavailable
from ihehub.bus.message import Message
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.store import MessageStore, queue_name
from ihehub.channels.base import Destination, Outcome, Source
from ihehub.channels.registry import import_ref
from ihehub.engine.expr import Filter
from ihehub.engine.metrics import HubMetrics

if TYPE_CHECKING:
    from ihehub.config.model import ChannelConfig

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


class Routed(Protocol):
    """A destination as routing sees it: its name and its filter."""

    @property
    def name(self) -> str: ...

    @property
    def filter(self) -> Filter | None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What a channel makes of one message before it is stored: ``status`` is ``filtered``, ``error`` (the
    transformer failed: ``error``, ``error_code``) or ``routed`` (``targets``: the destinations whose filter
    accepts the transformed message; ``transformed`` None when there is no transformer)."""

    status: str
    message: Message  # the envelope to store (headers may carry the mapping and its version)
    working: Message  # what destinations and the actor see
    transformed: bytes | None = None
    targets: tuple[str, ...] = ()
    error: str | None = None
    error_code: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelPrep:
    """A channel's filter, transformer and routed destinations: what `prepare` runs, when a message arrives
    and when an operator has it processed again (`reprocess`); ``actor`` channels are answered by an actor."""

    name: str
    filter: Filter | None = None
    transformer: Transformer | None = None
    destinations: Sequence[Routed] = ()
    actor: bool = False

    def prepare(self, message: Message) -> Prepared:
        """Channel filter, transformer, destination filters; a filter error propagates, a transformer error
        is the ``error`` outcome (a MappingError names the rule, field and value and carries an HL7 0357 code)."""
        if self.filter is not None and not self.filter(message):
            return Prepared("filtered", message, message)
        transformed: bytes | None = None
        working = message
        if self.transformer is not None:
            try:
                result = self.transformer(message)
            except Exception as exc:
                log.warning("channel %s: transformer failed on %s: %s", self.name, message.id, exc)
                return Prepared("error", message, message, error=f"transformer: {exc}",
                                error_code=str(getattr(exc, "code", None) or "207"))
            if result is None:
                return Prepared("filtered", message, message)
            if isinstance(result, Message):
                transformed = result.raw
                if result.headers != message.headers:  # e.g. the mapping and its version: kept with it
                    message = message.evolve(headers=result.headers)
            elif isinstance(result, str):
                transformed = result.encode(message.charset or "utf-8")
            else:
                transformed = bytes(result)
            working = message.evolve(raw=transformed)
        targets = tuple(d.name for d in self.destinations if d.filter is None or d.filter(working))
        return Prepared("routed", message, working, transformed, targets)

    @classmethod
    def from_config(cls, ch: ChannelConfig, home: Path, mappings: Any = None) -> ChannelPrep:
        """From a channel's configuration (``mappings``: the `MappingSet` for ``mapping:`` files, else one
        on ``home``); raises ValueError / ConfigError as loading the channel would."""
        transformer = load_callable(ch.transformer) if ch.transformer else None
        if ch.mapping:
            if mappings is None:
                from ihehub.mappings import MappingSet

                mappings = MappingSet(home)
            transformer = mappings.transformer(ch.mapping)
        dests = [_Routed(d.name, Filter.compile(list(d.filter))) for d in ch.destinations]
        return cls(name=ch.name, filter=Filter.compile(list(ch.filter)), transformer=transformer,
                   destinations=dests, actor=bool(ch.actor))


@dataclasses.dataclass(frozen=True, slots=True)
class _Routed:
    name: str
    filter: Filter | None


def reprocess(store: MessageStore, message_ids: Sequence[str], preps: Mapping[str, ChannelPrep],
              only: Sequence[str] | None = None) -> tuple[int, dict[str, str]]:
    """Run stored messages (as received) through their channel again — filter, transformer as configured
    now (a fixed mapping), destination filters — on their own rows, and queue the deliveries (``only``:
    to these destinations whatever their filters, once the message passes).  For messages that never got
    a delivery: failed in the transformer, filtered, stored.  Returns (deliveries queued, {id: why not})."""
    queued, skipped = 0, {}
    envelopes = store.load_messages(message_ids, received=True)
    for mid in message_ids:
        msg = envelopes.get(mid)
        if msg is None:
            skipped[mid] = "its body was removed by retention" if store.get_message(mid, with_body=False) else \
                "no such message"
            continue
        prep = preps.get(msg.channel)
        if prep is None:
            skipped[mid] = f"channel {msg.channel!r} is not configured any more"
            continue
        if prep.actor:
            skipped[mid] = (f"channel {msg.channel!r} is answered by an actor, which had its say; send the "
                            "message again from its source")
            continue
        p = prep.prepare(msg)
        names: tuple[str, ...] = ()
        if p.status == "routed":
            names = p.targets if only is None else tuple(only)
        status = "queued" if names else ("stored" if p.status == "routed" else p.status)
        store.processed_again(p.message, status=status, transformed=p.transformed, error=p.error,
                              destinations=names)
        queued += len(names)
        if p.status != "routed":
            skipped[mid] = f"{p.status} again" + (f": {p.error}" if p.error else " by the channel's filter")
    return queued, skipped


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
        self.prep = ChannelPrep(name=name, filter=filter, transformer=transformer, destinations=self.destinations,
                                actor=handler is not None)

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
            p = self.prep.prepare(message)
            if p.status == "filtered":
                await store.append(message, status="filtered")
                return Outcome(code="AA", message_id=message.id)
            if p.status == "error":
                await store.append(message, status="error", error=p.error)
                reason = (p.error or "").removeprefix("transformer: ")
                return Outcome(code="AE", message_id=message.id, error=f"transformer failed: {reason}",
                               error_code=p.error_code)
            message, targets = p.message, p.targets
            if self.handler is not None:
                return await self._handle(message, p.working, list(targets), p.transformed)
            res = await store.append(message, list(targets), transformed=p.transformed, dedup=self.dedup)
        except StoreUnavailable as exc:
            log.error("channel %s: store unavailable, rejecting %s: %s", self.name, message.control_id, exc)
            return Outcome(code="AR", error="message store unavailable; resend later", error_code="207")
        except Exception as exc:
            log.exception("channel %s: could not persist %s", self.name, message.control_id)
            return Outcome(code="AR", error=f"internal error: {type(exc).__name__}", error_code="207")
        if res.duplicate_of is None and targets and self.on_queued is not None:
            self.on_queued([queue_name(self.name, d) for d in targets])
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
