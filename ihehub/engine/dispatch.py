"""Delivery: send claimed deliveries through their destination connector and settle the outcome.

`Deliverer` is shared by both queue back-ends: the embedded lease loop (`LeaseDispatcher`, one per
destination queue, claiming from SQL) and the scale-out worker (claims the ids RabbitMQ hands it).
A destination that raises never stops the loop; the error is recorded on the delivery and retried
with the destination's backoff policy, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from ihehub.bus.db import StoreUnavailable
from ihehub.bus.message import Message
from ihehub.bus.store import Claimed, MessageStore, Settlement
from ihehub.channels.base import DeliveryError, Response
from ihehub.engine.metrics import HubMetrics
from ihehub.engine.pipeline import DestinationRuntime

log = logging.getLogger("ihehub.dispatch")


class Deliverer:
    def __init__(self, store: MessageStore, destinations: Mapping[str, DestinationRuntime],
                 metrics: HubMetrics | None = None) -> None:
        self.store = store
        self.destinations = destinations  # by queue name
        self.metrics = metrics

    async def deliver(self, claimed: Sequence[Claimed], *, fifo: bool = False) -> list[Settlement]:
        if not claimed:
            return []
        messages = await asyncio.to_thread(self.store.load_messages, [c.message_id for c in claimed])
        if fifo:
            out: list[Settlement] = []
            for i, c in enumerate(claimed):
                s = await self._one(c, messages.get(c.message_id))
                out.append(s)
                if not s.ok:  # keep order: give the rest back without counting an attempt
                    out.extend(_release(x) for x in claimed[i + 1:])
                    break
            return out
        dest = self.destinations.get(claimed[0].queue)
        sem = asyncio.Semaphore(dest.concurrency if dest else 1)

        async def bounded(c: Claimed) -> Settlement:
            async with sem:
                return await self._one(c, messages.get(c.message_id))

        return list(await asyncio.gather(*(bounded(c) for c in claimed)))

    async def _one(self, c: Claimed, message: Message | None) -> Settlement:
        started = time.time()
        t0 = time.perf_counter()
        dest = self.destinations.get(c.queue)
        if dest is None:
            s = _settle(c, started, ok=False, error=f"destination {c.queue!r} is not configured", retryable=True)
        elif message is None:
            s = _settle(c, started, ok=False, error="message body is gone (pruned by retention)", retryable=False)
        else:
            try:
                resp: Response = await dest.connector.send(message)
            except DeliveryError as exc:
                s = _settle(c, started, ok=False, error=str(exc), retryable=exc.retryable, body=exc.response)
            except Exception as exc:  # a connector bug must not stop delivery of everything else
                log.exception("destination %s failed on %s", c.queue, c.message_id)
                s = _settle(c, started, ok=False, error=f"{type(exc).__name__}: {exc}", retryable=True)
            else:
                s = _settle(c, started, ok=resp.ok, status=resp.status, body=resp.body or None,
                            error=resp.error, retryable=resp.retryable)
        if self.metrics is not None:
            pol = dest.retry if dest else None
            dead = not s.ok and (not s.retryable or (pol is not None and pol.exhausted(c.attempt)))
            self.metrics.delivered(c.queue, ok=s.ok, dead=dead, seconds=time.perf_counter() - t0)
        if not s.ok:
            log.info("delivery %s of %s to %s failed (attempt %d): %s", c.delivery_id, c.message_id, c.queue,
                     c.attempt, s.error)
        return s


def _settle(c: Claimed, started: float, *, ok: bool, status: str = "", body: bytes | None = None,
            error: str | None = None, retryable: bool = True) -> Settlement:
    return Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                      started_at=started, ok=ok, status=status, response=body, error=error, retryable=retryable)


def _release(c: Claimed) -> Settlement:
    return Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                      started_at=time.time(), ok=False, release=True)


class LeaseDispatcher:
    """Embedded queue consumer for one destination queue: claim due deliveries, send, settle, repeat."""

    def __init__(self, deliverer: Deliverer, queue: str, *, fifo: bool = False, lease_seconds: float = 30.0,
                 batch: int = 50, idle_poll: float = 0.5) -> None:
        self.deliverer = deliverer
        self.queue = queue
        self.fifo = fifo
        self.lease_seconds = lease_seconds
        self.batch = batch
        self.idle_poll = idle_poll
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"dispatch:{self.queue}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except TimeoutError:
                self._task.cancel()

    async def _run(self) -> None:
        store = self.deliverer.store
        dest = self.deliverer.destinations[self.queue]
        backoff = 0.5
        while not self._stopping:
            self._wake.clear()  # a wake() from now on is not lost: the claim below or the sleep sees it
            try:
                claimed = await store.claim(self.queue, limit=self.batch, lease_seconds=self.lease_seconds,
                                            fifo=self.fifo)
                if claimed:
                    results = await self.deliverer.deliver(claimed, fifo=self.fifo)
                    await store.settle(results, dest.retry)
                    backoff = 0.5
                    if any(not r.ok for r in results):
                        await self._sleep(0.05)
                    continue
            except StoreUnavailable as exc:
                log.warning("queue %s: store unavailable (%s); retrying in %.1fs", self.queue, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except Exception:
                log.exception("queue %s: dispatcher error", self.queue)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            await self._sleep(self.idle_poll)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            return
