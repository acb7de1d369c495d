"""Scale-out delivery over RabbitMQ: a transactional outbox (``serve``) and queue consumers (``worker``).

The database stays the source of truth (the *transactional outbox* pattern).  Ingest commits a
message and its delivery rows (``dispatched = false``) before the source acknowledges, so a broker
outage never loses an acknowledged message.  RabbitMQ only distributes the work:

* `Outbox` (in ``ihehub serve``) publishes every undispatched delivery id as one persistent message
  (AMQP 0-9-1 ``basic.publish``, §1.8.3.7, ``delivery-mode`` 2) to the default exchange, routed to a
  durable queue per destination named ``<prefix>.<channel>.<destination>``.  It waits for RabbitMQ's
  publisher confirms (the ``confirm.select`` extension; one wait per batch, not per message) and only
  then marks the rows dispatched.  Every second it also asks the store to hand back deliveries whose
  retry time has come or whose lease expired (a worker died mid-send) and publishes them again.
* `Consumer` (in ``ihehub worker``) consumes those queues with manual acknowledgement and a prefetch
  window (``basic.qos``, §1.8.3.1), claims the delivery ids in the database, delivers them with the
  shared `Deliverer`, settles the outcome and then acks (``basic.ack``, §1.8.3.13).  A failed attempt
  is settled as ``error`` and acked; the outbox republishes it when it is due, so no broker delay
  plugin is needed.  Queues of FIFO channels are declared with ``x-single-active-consumer`` so one
  worker at a time consumes them, in order; a failed head is retried in place (see `Consumer`).

A delivery may be published twice (a crash between publish and mark, a connection lost before the
confirm, a republish while the first copy still waits in the queue).  The claim makes that harmless:
a delivery that is sent, dead or leased by another worker is not claimable, and its broker message is
just acked.  A worker killed with ``-9`` leaves its messages unacked; RabbitMQ hands them to another
worker, and the lease in the database keeps them from being sent twice until it expires.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import queue as queue_mod
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import amqp
import kombu
from amqp.exceptions import PreconditionFailed
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ihehub.bus.db import StoreUnavailable
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.store import FINAL_STATES, Claimed, MessageStore, Settlement
from ihehub.bus.tables import deliveries

if TYPE_CHECKING:
    from ihehub.engine.dispatch import Deliverer

log = logging.getLogger("ihehub.amqp")

T = TypeVar("T")

DEFAULT_PREFIX = "ihehub"
HEARTBEAT = 20  # seconds (AMQP 0-9-1 §4.2.7); a dead peer is noticed after about two of them
CONNECT_TIMEOUT = 5.0
MAX_QUEUE_NAME = 255  # bytes of UTF-8 (AMQP 0-9-1 shortstr)
_DB_ERRORS = (StoreUnavailable, SQLAlchemyError)


def broker_queue(queue: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The RabbitMQ queue of a hub queue: ``adt/ris`` → ``ihehub.adt.ris``."""
    channel, sep, destination = queue.partition("/")
    if not sep or not channel or not destination:
        raise ValueError(f"queue {queue!r} must look like 'channel/destination'")
    name = f"{prefix}.{channel}.{destination}" if prefix else f"{channel}.{destination}"
    if len(name.encode("utf-8")) > MAX_QUEUE_NAME:
        raise ValueError(f"RabbitMQ queue name {name!r} is longer than {MAX_QUEUE_NAME} bytes; use shorter "
                         "channel or destination names")
    return name


def queue_arguments(*, fifo: bool) -> dict[str, Any]:
    """Declare arguments: FIFO queues get one active consumer at a time (RabbitMQ single active consumer)."""
    return {"x-single-active-consumer": True} if fifo else {}


def _connect(url: str) -> Any:
    """A connected kombu ``Connection``; raises at once when the broker is unreachable."""
    conn = kombu.Connection(url, heartbeat=HEARTBEAT, connect_timeout=CONNECT_TIMEOUT)
    try:
        conn.ensure_connection(max_retries=0)
    except BaseException:
        conn.release()
        raise
    return conn


def _declare(conn: Any, channel: Any, name: str, *, fifo: bool) -> Any:
    """Declare a durable queue; returns the channel to go on with (a new one after a refused declare)."""
    try:
        args = queue_arguments(fifo=fifo)
        channel.queue_declare(queue=name, durable=True, auto_delete=False, arguments=args)
        return channel
    except PreconditionFailed as exc:
        # The queue exists with other arguments (e.g. the channel became FIFO).  The broker closed the
        # channel; carry on with the queue as it is and tell the operator how to fix it.
        log.error("RabbitMQ queue %s exists with other arguments than ihehub declares (%s); it is used "
                  "as is, so FIFO order across workers is %s. Delete it once it is empty "
                  "(rabbitmqctl delete_queue %s) to have it declared again.",
                  name, exc, "NOT guaranteed" if fifo else "still enforced", name)
        channel = conn.channel()
        channel.queue_declare(queue=name, passive=True)
        return channel


class _Backoff:
    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class _Outage:
    """Log a broker outage once when it starts and once when it is over, not on every retry."""

    def __init__(self, who: str, url: str) -> None:
        self.who = who
        self.uri = kombu.Connection(url).as_uri()  # password masked
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: RabbitMQ at %s is unavailable (%s: %s); deliveries stay queued in the database, "
                        "retrying with backoff", self.who, self.uri, type(exc).__name__, exc)
        else:
            log.debug("%s: RabbitMQ still unavailable: %s", self.who, exc)

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s: RabbitMQ at %s is back after %.1fs", self.who, self.uri,
                     time.monotonic() - self.since)
            self.since = None


class BrokerError(Exception):
    """RabbitMQ did not confirm what was published in time."""


# --------------------------------------------------------------------------- outbox


class _Publisher:
    """One connection and confirm-mode channel of the outbox (outbox thread only)."""

    def __init__(self, url: str) -> None:
        self.conn = _connect(url)
        self.declared: set[str] = set()
        self._open(self.conn.channel())

    def _open(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_select()
        self.tag = 0
        self.pending: dict[int, int] = {}  # delivery tag -> delivery id, until confirmed
        self.confirmed: list[int] = []
        self.nacked: list[int] = []
        self.returned: set[int] = set()
        channel.events["basic_ack"].add(functools.partial(self._confirm, self.confirmed))
        channel.events["basic_nack"].add(functools.partial(self._confirm, self.nacked))
        channel.events["basic_return"].add(self._on_return)

    def _confirm(self, into: list[int], tag: int, multiple: bool) -> None:
        tags = [t for t in self.pending if t <= tag] if multiple else ([tag] if tag in self.pending else [])
        into.extend(self.pending.pop(t) for t in tags)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # mandatory publish that no queue took (the queue was deleted under us): not dispatched
        with contextlib.suppress(ValueError, TypeError, KeyError):
            self.returned.add(int(json.loads(message.body)["delivery_id"]))
        log.warning("outbox: RabbitMQ returned a message for %s (%s); the queue will be declared again",
                    routing_key, exc)

    def declare(self, name: str, *, fifo: bool) -> None:
        if name not in self.declared:
            channel = _declare(self.conn, self.channel, name, fifo=fifo)
            if channel is not self.channel:
                self._open(channel)
            self.declared.add(name)

    def publish(self, rows: Sequence[tuple[int, str, str]], timeout: float) -> list[int]:
        """Publish (delivery id, hub queue, broker queue) rows; returns the ids the broker confirmed."""
        self.confirmed.clear()
        self.nacked.clear()
        self.returned.clear()
        for delivery_id, queue, name in rows:
            body = json.dumps({"delivery_id": delivery_id, "queue": queue})
            msg = amqp.Message(body, content_type="application/json", delivery_mode=2)
            self.tag += 1
            self.pending[self.tag] = delivery_id
            self.channel.basic_publish(msg, exchange="", routing_key=name, mandatory=True)
        deadline = time.monotonic() + timeout
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"no publisher confirm for {len(self.pending)} messages within {timeout:.0f}s")
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=min(left, 1.0))
        if self.nacked:
            log.warning("outbox: RabbitMQ refused %d messages (basic.nack); they are published again",
                        len(self.nacked))
        if self.returned:
            self.declared.clear()
        bad = set(self.nacked) | self.returned
        return [i for i in self.confirmed if i not in bad]

    def heartbeat(self) -> None:
        self.conn.heartbeat_check()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.release()


class Outbox:
    """Hands queued deliveries from the database to RabbitMQ (runs in ``ihehub serve``).

    Runs in its own thread with its own connection; ``wake()`` (thread-safe) makes it look at the
    store at once, otherwise it looks every ``poll_interval`` seconds.  ``fifo_queues`` are hub queue
    names (``channel/destination``) whose RabbitMQ queue is declared single-active-consumer.
    """

    def __init__(
        self,
        broker_url: str,
        store: MessageStore,
        *,
        fifo_queues: Collection[str] = (),
        prefix: str = DEFAULT_PREFIX,
        batch: int = 500,
        poll_interval: float = 0.5,
        requeue_interval: float = 1.0,
        confirm_timeout: float = 30.0,
    ) -> None:
        if batch < 1 or poll_interval <= 0 or requeue_interval <= 0 or confirm_timeout <= 0:
            raise ValueError("Outbox: batch must be >= 1 and the intervals and timeout > 0")
        for q in fifo_queues:
            broker_queue(q, prefix=prefix)  # a bad name fails here, not in the thread
        self.broker_url = broker_url
        self.store = store
        self.fifo_queues = frozenset(fifo_queues)
        self.prefix = prefix
        self.batch = batch
        self.poll_interval = poll_interval
        self.requeue_interval = requeue_interval
        self.confirm_timeout = confirm_timeout
        self.published = 0  # deliveries confirmed by the broker and marked dispatched
        self.connections = 0  # successful (re)connections
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = _Outage("outbox", broker_url)
        self._names: dict[str, str | None] = {}

    @property
    def declared(self) -> set[str]:
        """RabbitMQ queues this outbox has declared (for tools and tests that clean up)."""
        return {n for n in self._names.values() if n}

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Outbox already started")
        self._thread = threading.Thread(target=self._run, name="ihehub-outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the thread and close the connection (blocking)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.confirm_timeout + 10)

    def _name(self, queue: str) -> str | None:
        if queue not in self._names:
            try:
                self._names[queue] = broker_queue(queue, prefix=self.prefix)
            except ValueError as exc:
                log.error("outbox: delivery queue %r cannot be published: %s", queue, exc)
                self._names[queue] = None
        return self._names[queue]

    def _run(self) -> None:
        pub: _Publisher | None = None
        backoff = _Backoff()
        next_requeue = 0.0
        try:
            while not self._stop.is_set():
                self._wake.clear()  # a wake() from here on is seen by the wait below
                retry_in: float | None = None  # set when something failed: back off, ignore wake()
                more = False
                try:
                    if time.monotonic() >= next_requeue:
                        self.store.requeue_for_dispatch().result(timeout=60)
                        next_requeue = time.monotonic() + self.requeue_interval
                    rows = self.store.undispatched(limit=self.batch)
                    if pub is None:
                        pub = _Publisher(self.broker_url)
                        self.connections += 1
                        self._outage.ok()
                    if rows:
                        ids, tried = self._publish(pub, rows)
                        if ids:
                            self.store.mark_dispatched(ids).result(timeout=60)
                            self.published += len(ids)
                        if len(ids) < tried:
                            retry_in = backoff.next()  # not all confirmed: don't spin on them
                        more = len(rows) == self.batch
                    else:
                        pub.heartbeat()
                except _DB_ERRORS as exc:  # down, or a deadlock with a worker: published again, harmless
                    log.warning("outbox: database error (%s); retrying", exc)
                    retry_in = backoff.next()
                except Exception as exc:  # any broker or network error: reconnect with backoff
                    self._outage.failed(exc)
                    if pub is not None:
                        pub.close()
                        pub = None
                    retry_in = backoff.next()
                if retry_in is not None:
                    self._stop.wait(retry_in)
                    continue
                backoff.reset()
                if not more:
                    self._wake.wait(self.poll_interval)
        finally:
            if pub is not None:
                pub.close()

    def _publish(self, pub: _Publisher, rows: Sequence[tuple[int, str]]) -> tuple[list[int], int]:
        """Publish what can be; returns (confirmed ids, how many were published)."""
        out: list[tuple[int, str, str]] = []
        for delivery_id, queue in rows:
            name = self._name(queue)
            if name is None:
                continue  # logged once; it stays queued in the database for an operator to see
            pub.declare(name, fifo=queue in self.fifo_queues)
            out.append((delivery_id, queue, name))
        return (pub.publish(out, self.confirm_timeout) if out else []), len(out)


# --------------------------------------------------------------------------- consumer


@dataclasses.dataclass(frozen=True, slots=True)
class _Item:
    """One broker message held (unacked) by this worker."""

    delivery_id: int
    tag: int


class Consumer:
    """Delivers what RabbitMQ hands this worker (runs in ``ihehub worker``).

    ``queues`` are hub queue names (``channel/destination``), each configured in
    ``deliverer.destinations``; ``fifo_queues`` is the subset that belongs to FIFO channels.  A thread
    with its own connection receives messages and bridges them into the event loop that called
    `start`; messages of one queue that arrive together are claimed, delivered and settled as one
    batch.  Each ``Consumer`` needs its own ``store.worker_id``: settling checks the lease owner.

    FIFO queues are processed one batch at a time, in broker order.  When the head fails it is
    settled ``error`` and retried *in place* after its backoff, without acking or reordering: the
    messages behind it wait (head-of-line blocking), which is the price of keeping order.  Only when
    it is sent or dead (attempts exhausted, non-retryable error) does the queue move on.
    """

    def __init__(
        self,
        broker_url: str,
        store: MessageStore,
        deliverer: Deliverer,
        *,
        queues: Sequence[str],
        fifo_queues: Collection[str] = (),
        lease_seconds: float = 30.0,
        prefix: str = DEFAULT_PREFIX,
        prefetch: int = 100,
        batch: int = 50,
        batches_in_flight: int = 4,
        stop_grace: float = 15.0,
    ) -> None:
        if not queues:
            raise ValueError("Consumer: no queues to consume")
        unknown = [q for q in queues if q not in deliverer.destinations]
        if unknown:
            raise ValueError(f"Consumer: no destination is configured for {', '.join(map(repr, unknown))} "
                             f"(configured: {', '.join(map(repr, sorted(deliverer.destinations)))})")
        stray = sorted(set(fifo_queues) - set(queues))
        if stray:
            raise ValueError(f"Consumer: fifo_queues {stray} are not among the consumed queues")
        if prefetch < 1 or batch < 1 or batches_in_flight < 1 or lease_seconds <= 0:
            raise ValueError("Consumer: prefetch, batch and batches_in_flight must be >= 1 and "
                             "lease_seconds > 0")
        self.broker_url = broker_url
        self.store = store
        self.deliverer = deliverer
        self.queues = list(dict.fromkeys(queues))
        self.fifo_queues = frozenset(fifo_queues)
        self.names = {q: broker_queue(q, prefix=prefix) for q in self.queues}
        self.lease_seconds = lease_seconds
        self.prefetch = prefetch
        self.batch = min(batch, prefetch)
        self.batches_in_flight = batches_in_flight
        self.stop_grace = stop_grace
        # counters (read by tests and tools)
        self.received = 0
        self.acked = 0
        self.skipped = 0  # broker messages whose delivery was not claimable (duplicate, done, leased)
        self.connections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_async: asyncio.Event | None = None
        self._outage = _Outage(f"worker {store.worker_id}", broker_url)
        # thread-owned state
        self._gen = 0  # connection generation: results of an older one are not acked
        self._pending: dict[str, collections.deque[_Item]] = {q: collections.deque() for q in self.queues}
        self._inflight: dict[str, int] = dict.fromkeys(self.queues, 0)
        self._retry_at: dict[str, float] = dict.fromkeys(self.queues, 0.0)
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._done: queue_mod.SimpleQueue[tuple[concurrent.futures.Future[Any], int, str, list[_Item]]] = (
            queue_mod.SimpleQueue()
        )

    @property
    def declared(self) -> set[str]:
        return set(self.names.values())

    # -- life cycle (event loop) ----------------------------------------------------------------
    def start(self) -> None:
        """Start consuming; call from the event loop that deliveries should run on."""
        if self._thread is not None:
            raise RuntimeError("Consumer already started")
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("Consumer.start() must be called from a running asyncio event loop") from None
        self._stop_async = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"ihehub-consumer-{self.store.worker_id}",
                                        daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking messages, finish (and ack) the batches in flight, close the connection."""
        self._stop.set()
        if self._stop_async is not None:
            self._stop_async.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.stop_grace + 15)
        left = [asyncio.wrap_future(f) for f in self._futures]
        if left:  # batches of a lost connection still running: let them settle, then cancel
            _, late = await asyncio.wait(left, timeout=self.stop_grace)
            for f in late:
                f.cancel()
            results = await asyncio.gather(*left, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    log.debug("worker %s: batch ended with %r at stop", self.store.worker_id, r)
        self._futures.clear()

    # -- the broker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = _Backoff()
        while not self._stop.is_set():
            try:
                conn = _connect(self.broker_url)
            except Exception as exc:
                self._outage.failed(exc)
                self._stop.wait(backoff.next())
                continue
            try:
                channel, tags = self._subscribe(conn)
                self.connections += 1
                self._outage.ok()
                backoff.reset()
                self._serve(conn, channel, tags)
            except Exception as exc:  # connection lost / broker error: reconnect
                if not self._stop.is_set():
                    self._outage.failed(exc)
            finally:
                self._gen += 1
                for dq in self._pending.values():
                    dq.clear()  # unacked: the broker requeues them when the connection closes
                with contextlib.suppress(Exception):
                    conn.release()
            if not self._stop.is_set():
                self._stop.wait(backoff.next())

    def _subscribe(self, conn: Any) -> tuple[Any, list[str]]:
        channel = conn.channel()
        for q in self.queues:
            channel = _declare(conn, channel, self.names[q], fifo=q in self.fifo_queues)
        channel.basic_qos(0, self.prefetch, False)  # per consumer (RabbitMQ semantics of global=false)
        tags = [
            channel.basic_consume(queue=self.names[q], callback=functools.partial(self._on_message, q),
                                  no_ack=False)
            for q in self.queues
        ]
        return channel, tags

    def _serve(self, conn: Any, channel: Any, tags: Iterable[str]) -> None:
        grace_until: float | None = None
        while True:
            if self._stop.is_set():
                if grace_until is None:
                    grace_until = time.monotonic() + self.stop_grace
                    for tag in tags:  # no new messages; what is held but not started goes back
                        channel.basic_cancel(tag)
                if not self._futures or time.monotonic() > grace_until:
                    return
            try:
                conn.drain_events(timeout=0.005 if self._futures else 0.2)
                for _ in range(3000):  # take what already arrived (3 frames a message), then act on it
                    conn.drain_events(timeout=0)
            except TimeoutError:
                pass
            conn.heartbeat_check()
            self._collect(channel)
            if not self._stop.is_set():
                self._dispatch()

    def _on_message(self, queue: str, message: Any) -> None:
        tag = message.delivery_tag
        try:
            data = json.loads(message.body)
            delivery_id = data["delivery_id"]
            if not isinstance(delivery_id, int) or isinstance(delivery_id, bool):
                raise TypeError("delivery_id is not an integer")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("worker %s: dropping a message on %s that is not an ihehub delivery (%s): %r",
                        self.store.worker_id, self.names[queue], exc, bytes(message.body[:120]))
            message.channel.basic_reject(tag, requeue=False)
            return
        self.received += 1
        self._pending[queue].append(_Item(delivery_id, tag))

    def _dispatch(self) -> None:
        now = time.monotonic()
        for q, dq in self._pending.items():
            if not dq or now < self._retry_at[q]:
                continue
            if q in self.fifo_queues:
                if self._inflight[q] == 0:  # one batch at a time; the items stay at the front until done
                    items = list(itertools.islice(dq, self.batch))
                    self._submit(q, items, self._fifo_batch(q, [i.delivery_id for i in items], self._gen))
            else:
                while dq and self._inflight[q] < self.batches_in_flight:
                    items = [dq.popleft() for _ in range(min(self.batch, len(dq)))]
                    self._submit(q, items, self._batch(q, [i.delivery_id for i in items]))

    def _submit(self, queue: str, items: list[_Item], coro: Coroutine[Any, Any, Any]) -> None:
        try:
            if self._loop is None:
                raise RuntimeError("not started")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the event loop is gone: nothing can be delivered any more
            coro.close()
            log.error("worker %s: event loop closed without stop(); consumer ends", self.store.worker_id)
            self._stop.set()
            return
        self._inflight[queue] += 1
        self._futures.add(fut)
        gen = self._gen
        fut.add_done_callback(lambda f: self._done.put((f, gen, queue, items)))

    def _collect(self, channel: Any) -> None:
        while True:
            try:
                fut, gen, q, items = self._done.get_nowait()
            except queue_mod.Empty:
                return
            self._futures.discard(fut)
            self._inflight[q] -= 1
            fifo = q in self.fifo_queues
            if gen != self._gen:
                continue  # that channel is closed; the broker has requeued its messages
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is not None:
                log.error("worker %s: queue %s batch failed: %r; retrying in 1s", self.store.worker_id, q,
                          exc)
                if not fifo:
                    self._pending[q].extendleft(reversed(items))
                self._retry_at[q] = time.monotonic() + 1.0
                continue
            result = fut.result()
            if fifo:
                dq = self._pending[q]
                for _ in range(int(result)):
                    channel.basic_ack(dq.popleft().tag)
                    self.acked += 1
            elif result is not None:
                for item in items:
                    if item.delivery_id in result:  # still locked by another writer: let the broker retry
                        channel.basic_reject(item.tag, requeue=True)
                    else:
                        channel.basic_ack(item.tag)
                        self.acked += 1
            # else: stopping before the claim; left unacked, the broker requeues them on close

    # -- delivery (event loop) --------------------------------------------------------------------
    def _policy(self, queue: str) -> RetryPolicy:
        return self.deliverer.destinations[queue].retry

    async def _batch(self, queue: str, ids: list[int]) -> set[int] | None:
        """Claim, deliver and settle.  Returns the ids whose broker message must NOT be acked (empty:
        ack all, also those that were not claimable), or None when stopping before anything was claimed.
        """
        try:
            claimed, locked = await self._claim(ids)
        except _Stopped:
            return None  # stopping and the database is away: leave them to the broker
        self.skipped += len(set(ids)) - len(claimed) - len(locked)
        if claimed:
            results = await self.deliverer.deliver(claimed)
            # If this never gets written the lease expires and the outbox publishes it again.
            with contextlib.suppress(_Stopped):
                await self._db(functools.partial(self.store.settle, results, self._policy(queue)))
        return locked

    async def _claim(self, ids: list[int]) -> tuple[list[Claimed], set[int]]:
        """Claim ``ids``; returns (claimed, still locked).

        The claim skips rows another transaction holds locked at that moment (``SKIP LOCKED``): the
        outbox marking them dispatched, a concurrent requeue.  Such a row is still due, so acking its
        message would strand it; claim it again after a moment instead.
        """
        claim = functools.partial(self.store.claim_ids, ids, lease_seconds=self.lease_seconds)
        claimed = await self._db(claim)
        missing = set(ids) - {c.delivery_id for c in claimed}
        for attempt in range(40):
            if not missing:
                break
            missing = await asyncio.to_thread(self._claimable, missing)
            if not missing or self._stopping():
                break
            await asyncio.sleep(0.005 * (attempt + 1))
            more = await self._db(functools.partial(self.store.claim_ids, sorted(missing),
                                                    lease_seconds=self.lease_seconds))
            claimed.extend(more)
            missing -= {c.delivery_id for c in more}
        claimed.sort(key=lambda c: c.delivery_id)
        return claimed, missing

    def _claimable(self, ids: Collection[int]) -> set[int]:
        """Those of ``ids`` that a claim would take now (queued, error, or leased with the lease over)."""
        d = deliveries.c
        now = time.time()
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(d.id, d.state, d.lease_expires).where(d.id.in_(list(ids)))).all()
        return {r.id for r in rows
                if r.state in ("queued", "error") or (r.state == "sending" and (r.lease_expires or 0) < now)}

    async def _fifo_batch(self, queue: str, ids: list[int], gen: int) -> int:
        """Deliver ``ids`` strictly in order; returns how many from the front are finished (to ack)."""
        policy = self._policy(queue)
        done = 0
        with contextlib.suppress(_Stopped):
            while done < len(ids) and not self._stopping() and gen == self._gen:
                rest = ids[done:]
                claimed = await self._db(
                    functools.partial(self.store.claim_ids, rest, lease_seconds=self.lease_seconds))
                by_id = {c.delivery_id: c for c in claimed}
                run: list[Claimed] = []
                for delivery_id in rest:  # the claimed run at the head, in broker order
                    c = by_id.pop(delivery_id, None)
                    if c is None:
                        break
                    run.append(c)
                give_back = [_release(c) for c in by_id.values()]  # claimed behind a gap: untouched
                if not run:
                    if give_back:
                        await self._db(functools.partial(self.store.settle, give_back, policy))
                    wait = await asyncio.to_thread(self._head_wait, rest[0])
                    if wait is None:  # sent, dead or gone: a duplicate or an old copy, move on
                        done += 1
                        self.skipped += 1
                    else:  # leased by a worker that may have died: wait for the lease, keep the order
                        await self._sleep(wait, gen)
                    continue
                results = await self.deliverer.deliver(run, fifo=True)
                await self._db(functools.partial(self.store.settle, [*results, *give_back], policy))
                for r in results:
                    if r.release:
                        break
                    if r.ok or not r.retryable or policy.exhausted(r.attempt):
                        done += 1  # sent or dead: the queue moves on
                        continue
                    await self._sleep(await asyncio.to_thread(self._retry_in, r.delivery_id), gen)
                    break
        return done

    def _head_wait(self, delivery_id: int) -> float | None:
        """None when the delivery is finished (or gone), else how long to wait before claiming again."""
        row = self._row(delivery_id)
        if row is None or row.state in FINAL_STATES:
            return None
        if row.state == "sending" and row.lease_expires is not None:
            return max(0.05, min(1.0, row.lease_expires - time.time()))
        return 0.05  # locked by a concurrent claim for a moment

    def _retry_in(self, delivery_id: int) -> float:
        row = self._row(delivery_id)
        return 0.0 if row is None else max(0.0, float(row.next_attempt_at) - time.time())

    def _row(self, delivery_id: int) -> Any:
        d = deliveries.c
        with self.store.engine.connect() as conn:
            return conn.execute(
                select(d.state, d.next_attempt_at, d.lease_expires).where(d.id == delivery_id)
            ).first()

    def _stopping(self) -> bool:
        return self._stop_async is not None and self._stop_async.is_set()

    async def _sleep(self, seconds: float, gen: int | None = None) -> None:
        """Sleep, cut short by stop() (and, with ``gen``, by a lost broker connection)."""
        if self._stop_async is None:
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and (gen is None or gen == self._gen):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_async.wait(), timeout=min(left, 0.5))
            if self._stop_async.is_set():
                return

    async def _db(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a store call, retrying while the database is away; raises `_Stopped` when stopping first."""
        backoff = _Backoff()
        while True:
            try:
                return await op()
            except _DB_ERRORS as exc:
                if self._stopping():
                    raise _Stopped from exc
                delay = backoff.next()
                log.warning("worker %s: database unavailable (%s); retrying in %.1fs", self.store.worker_id,
                            exc, delay)
                await self._sleep(delay)


class _Stopped(Exception):
    """The consumer is stopping while the database is unavailable."""


def _release(c: Claimed) -> Settlement:
    return Settlement(delivery_id=c.delivery_id, message_id=c.message_id, queue=c.queue, attempt=c.attempt,
                      started_at=time.time(), ok=False, release=True)


__all__ = [
    "DEFAULT_PREFIX",
    "BrokerError",
    "Consumer",
    "Outbox",
    "broker_queue",
    "queue_arguments",
]
