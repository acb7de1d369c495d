"""Scale-out queue on the machine's real RabbitMQ and PostgreSQL: outbox -> broker -> consumers -> HTTP.

Every test gets a fresh schema in the session's PostgreSQL database (``pg_url`` in tests/conftest.py)
and its own RabbitMQ queue prefix; the queues it declared are deleted at the end.  The receiver is a
scripted HTTP/1.1 server (an asyncio protocol on a free loopback port) that records which message ids
it got and answers with the status the test chooses.  Broker outages are made with a loopback TCP
proxy between the hub and RabbitMQ, so other users of the broker are not disturbed.

Reusable here: `Receiver`, `Proxy`, `Scenario` and the ``pg_engine`` / ``ns`` fixtures (import them from
``tests.bus.test_amqp``); ``pg_url`` and ``broker_url`` come from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
from sqlalchemy import Engine, select, text

from ihehub.bus import amqp, schema
from ihehub.bus.db import Writer, make_engine
from ihehub.bus.message import Message
from ihehub.bus.retry import RetryPolicy
from ihehub.bus.store import MessageStore
from ihehub.bus.tables import attempts, deliveries, metadata
from ihehub.channels.http import HTTPDestination
from ihehub.channels.registry import ConnectorContext
from ihehub.engine.dispatch import Deliverer
from ihehub.engine.pipeline import DestinationRuntime

FAST = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.2, multiplier=2.0, jitter=0.0)
ADT = "MSH|^~\\&|HIS|H1|IHEHUB|HUB|20261127101010||ADT^A01|MSG{0:05d}|P|2.5\rPID|1||MRN{0:05d}^^^H1||张^三\r"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 45) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- a scripted HTTP receiver


class Receiver:
    """HTTP/1.1 server (RFC 9112 framing: Content-Length bodies, keep-alive) that records deliveries.

    ``decide(message_id, n)`` gives the status for the n-th request carrying that message id.  It is an
    `asyncio.Protocol`, not streams, so that it stays cheap next to the workers it measures.
    """

    REASONS = {200: "OK", 400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}

    def __init__(self, decide: Callable[[str, int], int] | None = None) -> None:
        self.decide = decide or (lambda _mid, _n: 200)
        self.count: collections.Counter[str] = collections.Counter()
        self.accepted: list[str] = []  # message ids answered 2xx, in arrival order
        self._server: asyncio.Server | None = None
        self.transports: set[asyncio.Transport] = set()

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ReceiverProtocol(self), "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self.transports):
                t.abort()
            await self._server.wait_closed()

    def answer(self, mid: str) -> bytes:
        self.count[mid] += 1
        status = self.decide(mid, self.count[mid])
        if 200 <= status < 300:
            self.accepted.append(mid)
        reason = self.REASONS.get(status, "Status")
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
        return head.encode("latin-1") + b"OK"


class _ReceiverProtocol(asyncio.Protocol):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            self.transport = transport
            self.receiver.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.receiver.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            headers = {}
            for line in bytes(self.buf[:end]).decode("latin-1").split("\r\n")[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            size = end + 4 + int(headers.get("content-length", "0"))
            if len(self.buf) < size:
                return
            del self.buf[:size]
            if self.transport is not None:
                self.transport.write(self.receiver.answer(headers.get("x-ihehub-message-id", "")))


# --------------------------------------------------------------------------- a TCP proxy to RabbitMQ


class Proxy:
    """Loopback TCP proxy in front of RabbitMQ: ``cut()`` drops every connection, ``refuse`` keeps it down."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.refuse = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self.cuts += 1
        for a, b in list(self._pairs):
            a.transport.abort()
            b.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.cut()
            await self._server.wait_closed()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                 asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    schema.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE " + ", ".join(t.name for t in metadata.sorted_tables)))
    yield engine
    engine.dispose()


@dataclasses.dataclass
class Namespace:
    """This test's RabbitMQ queue prefix; queues recorded in ``names`` are deleted afterwards."""

    broker_url: str
    prefix: str
    names: set[str] = dataclasses.field(default_factory=set)


@pytest.fixture
def ns(broker_url: str) -> Iterator[Namespace]:
    space = Namespace(broker_url, f"ihehub-test-{secrets.token_hex(4)}")
    yield space
    with kombu.Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in space.names:
            channel.queue_delete(queue=name)


@dataclasses.dataclass
class Worker:
    store: MessageStore
    deliverer: Deliverer
    consumer: amqp.Consumer


class Scenario:
    """Ingest store + outbox (the ``serve`` side) and N consumers with their own stores (``worker`` side)."""

    def __init__(self, engine: Engine, ns: Namespace, receiver: Receiver, queues: dict[str, RetryPolicy], *,
                 fifo: frozenset[str] = frozenset(), workers: int = 2, broker_url: str | None = None,
                 lease_seconds: float = 30.0) -> None:
        self.engine = engine
        self.ns = ns
        self.receiver = receiver
        self.queues = queues
        self.fifo = fifo
        self.n_workers = workers
        self.broker_url = broker_url or ns.broker_url
        self.lease_seconds = lease_seconds
        self.writers: list[Writer] = []
        self.workers: list[Worker] = []
        self.store = self._store("serve")
        self.outbox = amqp.Outbox(self.broker_url, self.store, fifo_queues=fifo, prefix=ns.prefix,
                                  poll_interval=0.1, requeue_interval=0.1)
        ns.names.update(amqp.broker_queue(q, prefix=ns.prefix) for q in queues)

    def _store(self, worker_id: str) -> MessageStore:
        writer = Writer(self.engine)
        self.writers.append(writer)
        return MessageStore(self.engine, writer, worker_id=worker_id)

    def add_worker(self, url: str) -> Worker:
        store = self._store(f"worker-{len(self.workers) + 1}")
        destinations = {q: http_destination(q, url, policy, fifo=q in self.fifo) for q, policy in self.queues.items()}
        deliverer = Deliverer(store, destinations)
        consumer = amqp.Consumer(self.broker_url, store, deliverer, queues=list(destinations),
                                 fifo_queues=self.fifo, lease_seconds=self.lease_seconds,
                                 prefix=self.ns.prefix)
        worker = Worker(store, deliverer, consumer)
        self.workers.append(worker)
        return worker

    async def __aenter__(self) -> Scenario:
        self.receiver_url = await self.receiver.start()
        for _ in range(self.n_workers):
            self.add_worker(self.receiver_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.workers:
            await w.consumer.stop()
        await self.outbox.stop()
        for w in self.workers:
            for d in w.deliverer.destinations.values():
                await d.connector.close()
        await self.receiver.stop()
        for writer in self.writers:
            await asyncio.to_thread(writer.close)

    def start_consumers(self) -> None:
        for w in self.workers:
            w.consumer.start()

    async def connected(self, timeout: float = 10) -> None:
        await until(lambda: all(w.consumer.connections for w in self.workers), timeout,
                    "the consumers to connect")

    async def ingest(self, n: int, queue: str, *, start: int = 0, sequential: bool = False) -> list[str]:
        channel, dest = queue.split("/", 1)
        msgs = [Message(channel=channel, raw=ADT.format(i).encode(), content_type="application/hl7-v2",
                        control_id=f"MSG{i:05d}") for i in range(start, start + n)]
        if sequential:
            for m in msgs:
                await self.store.append(m, [dest])
        else:
            await asyncio.gather(*(self.store.append(m, [dest]) for m in msgs))
        self.outbox.wake()
        return [m.id for m in msgs]

    def states(self) -> collections.Counter[str]:
        with self.engine.connect() as conn:
            return collections.Counter(r.state for r in conn.execute(select(deliveries.c.state)))

    def rows(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(deliveries).order_by(deliveries.c.id)))

    def attempt_log(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(attempts).order_by(attempts.c.id)))

    async def settled(self, total: int, timeout: float = 30) -> None:
        def done() -> bool:
            s = self.states()
            return s["sent"] + s["dead"] == total

        await until(done, timeout, f"{total} deliveries to be sent or dead", lambda: dict(self.states()))


def http_destination(queue: str, url: str, policy: RetryPolicy, *, fifo: bool = False) -> DestinationRuntime:
    return DestinationRuntime(
        name=queue.split("/", 1)[1], queue=queue, filter=None, retry=policy, concurrency=1 if fifo else 4,
        connector=HTTPDestination(name=queue, url=f"{url}/{queue}", options={}, context=ConnectorContext()),
    )


async def until(pred: Callable[[], bool], timeout: float, what: str,
                detail: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" +
                                 (f": {detail()}" if detail else ""))
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- without services


def test_broker_queue_names() -> None:
    assert amqp.broker_queue("adt/ris") == "ihehub.adt.ris"
    assert amqp.broker_queue("adt/ris", prefix="t1") == "t1.adt.ris"
    assert amqp.queue_arguments(fifo=True) == {"x-single-active-consumer": True}
    assert amqp.queue_arguments(fifo=False) == {}
    with pytest.raises(ValueError, match="channel/destination"):
        amqp.broker_queue("no-slash")
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        amqp.broker_queue("影像" * 50 + "/ris")


def test_consumer_rejects_bad_configuration(tmp_path: Any) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/bus.sqlite")
    store = MessageStore(engine, Writer(engine), worker_id="w")
    dest = DestinationRuntime(name="ris", queue="adt/ris", filter=None, retry=FAST,
                              connector=HTTPDestination(name="ris", url="http://127.0.0.1:9/", options={},
                                                        context=ConnectorContext()))
    deliverer = Deliverer(store, {"adt/ris": dest})
    url = "amqp://guest:guest@127.0.0.1:5672//"
    with pytest.raises(ValueError, match=r"no destination .* for 'adt/pacs' \(configured: 'adt/ris'\)"):
        amqp.Consumer(url, store, deliverer, queues=["adt/ris", "adt/pacs"])
    with pytest.raises(ValueError, match="not among the consumed queues"):
        amqp.Consumer(url, store, deliverer, queues=["adt/ris"], fifo_queues={"orm/ris"})
    with pytest.raises(ValueError, match="no queues"):
        amqp.Consumer(url, store, deliverer, queues=[])
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        amqp.Consumer(url, store, deliverer, queues=["adt/ris"]).start()
    with pytest.raises(ValueError, match="channel/destination"):
        amqp.Outbox(url, store, fifo_queues={"adt"})
    engine.dispose()


# --------------------------------------------------------------------------- against the real services


@pytest.mark.scaleout
def test_two_consumers_send_every_delivery_exactly_once(
    pg_engine: Engine, ns: Namespace, record_property: Callable[[str, object], None]
) -> None:
    n = 3000
    receiver = Receiver()

    async def main() -> float:
        async with Scenario(pg_engine, ns, receiver, {"bulk/ris": FAST}) as sc:
            sc.start_consumers()
            await sc.connected()
            ids = await sc.ingest(n, "bulk/ris")
            t0 = time.perf_counter()
            sc.outbox.start()
            await sc.settled(n)
            elapsed = time.perf_counter() - t0
            assert sc.states() == {"sent": n}
            assert set(receiver.count) == set(ids)
            assert set(receiver.count.values()) == {1}, "a delivery was sent twice"
            workers = collections.Counter(a.worker for a in sc.attempt_log())
            assert set(workers) == {"worker-1", "worker-2"} and sum(workers.values()) == n
            # mark_dispatched skips rows a worker holds locked at that moment (no deadlock with settle),
            # so "dispatched" is not asserted; each delivery was still attempted exactly once.
            assert all(r.attempts == 1 for r in sc.rows())
            assert sc.outbox.published >= n
            return n / elapsed

    rate = run(main())
    record_property("deliveries_per_second", round(rate))
    print(f"\n2 consumers: {rate:.0f} deliveries/s")


@pytest.mark.scaleout
def test_receiver_errors_are_retried_with_backoff_then_sent(pg_engine: Engine, ns: Namespace) -> None:
    receiver = Receiver(lambda _mid, nth: 500 if nth <= 2 else 200)

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}) as sc:
            sc.start_consumers()
            sc.outbox.start()
            ids = await sc.ingest(20, "adt/ris")
            await sc.settled(20)
            assert sc.states() == {"sent": 20}
            assert all(receiver.count[i] == 3 for i in ids)
            assert all(r.attempts == 3 for r in sc.rows())
            log = collections.defaultdict(list)
            for a in sc.attempt_log():
                log[a.delivery_id].append(a)
            for tries in log.values():
                assert [(a.number, a.ok, a.status) for a in tries] == [(1, False, "500"), (2, False, "500"),
                                                                      (3, True, "200")]
                # the backoff was honoured: 0.05 s after the first failure, 0.1 s after the second
                assert tries[1].started_at - tries[0].finished_at >= 0.05 - 0.01
                assert tries[2].started_at - tries[1].finished_at >= 0.1 - 0.01

    run(main())


@pytest.mark.scaleout
def test_non_retryable_failure_is_dead_after_one_attempt(pg_engine: Engine, ns: Namespace) -> None:
    receiver = Receiver(lambda _mid, _n: 400)

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}, workers=1) as sc:
            sc.start_consumers()
            sc.outbox.start()
            ids = await sc.ingest(5, "adt/ris")
            await sc.settled(5)
            await asyncio.sleep(0.5)  # several requeue rounds: nothing may be tried again
            assert sc.states() == {"dead": 5}
            assert all(r.attempts == 1 and "HTTP 400" in r.error for r in sc.rows())
            assert all(receiver.count[i] == 1 for i in ids)

    run(main())


@pytest.mark.scaleout
def test_max_attempts_then_dead(pg_engine: Engine, ns: Namespace) -> None:
    receiver = Receiver(lambda _mid, _n: 503)
    policy = dataclasses.replace(FAST, max_attempts=3)

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {"adt/ris": policy}) as sc:
            sc.start_consumers()
            sc.outbox.start()
            ids = await sc.ingest(10, "adt/ris")
            await sc.settled(10)
            await asyncio.sleep(0.5)
            assert sc.states() == {"dead": 10}
            assert all(r.attempts == 3 and "HTTP 503" in r.error for r in sc.rows())
            assert all(receiver.count[i] == 3 for i in ids)
            assert len(sc.attempt_log()) == 30

    run(main())


@pytest.mark.scaleout
def test_broker_connection_dropped_mid_run(pg_engine: Engine, ns: Namespace, broker_url: str) -> None:
    receiver = Receiver()
    host_port = kombu.Connection(broker_url)

    async def main() -> None:
        proxy = Proxy(host_port.hostname or "127.0.0.1", int(host_port.port or 5672))
        port = await proxy.start()
        via_proxy = kombu.Connection(broker_url).as_uri(include_password=True).replace(
            f":{host_port.port or 5672}/", f":{port}/")
        try:
            async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}, broker_url=via_proxy) as sc:
                sc.start_consumers()
                await sc.connected()
                sc.outbox.start()
                first = await sc.ingest(1500, "adt/ris")
                await until(lambda: len(receiver.accepted) >= 300, 20, "the first deliveries")
                proxy.refuse = True
                proxy.cut()  # the broker "goes away" mid-run, with messages unacked and in flight
                second = await sc.ingest(500, "adt/ris", start=1500)  # committed while the broker is down
                await asyncio.sleep(1.0)
                proxy.refuse = False
                await sc.settled(2000, timeout=40)
                assert sc.states() == {"sent": 2000}
                assert set(receiver.count) == set(first + second)
                assert set(receiver.count.values()) == {1}, "a delivery was sent twice"
                assert sc.outbox.connections >= 2
                assert all(w.consumer.connections >= 2 for w in sc.workers)
        finally:
            await proxy.stop()

    run(main(), timeout=60)


@pytest.mark.scaleout
def test_fifo_order_is_kept_with_two_consumers(pg_engine: Engine, ns: Namespace) -> None:
    n = 200
    ids: list[str] = []
    handed_over = asyncio.Event()

    def decide(mid: str, nth: int) -> int:
        if mid == ids[39] and nth <= 2:
            return 500  # fails twice: the queue must wait for it, not skip ahead
        if mid == ids[119] and not handed_over.is_set():
            return 500  # fails until the active worker has left: the other one must go on from here
        return 200

    receiver = Receiver(decide)
    queue = "orders/ris"
    patient = dataclasses.replace(FAST, max_attempts=1000)

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {queue: patient}, fifo=frozenset({queue})) as sc:
            ids.extend(await sc.ingest(n, queue, sequential=True))
            sc.start_consumers()
            await sc.connected()
            sc.outbox.start()
            await until(lambda: receiver.count[ids[119]] >= 2, 20, "the 120th message to be retried in place")
            assert receiver.accepted == ids[:119]
            # single active consumer: one worker has done it all so far; it leaves and the other takes over
            [active] = [w.consumer for w in sc.workers if w.consumer.acked]
            [standby] = [w.consumer for w in sc.workers if w.consumer is not active]
            assert standby.received == 0
            await active.stop()
            handed_over.set()
            await sc.settled(n)
            assert standby.acked > 0
            assert receiver.accepted == ids, "FIFO order broken"
            assert receiver.count[ids[39]] == 3
            assert all(receiver.count[i] == 1 for i in ids if i not in (ids[39], ids[119]))

    run(main())


@pytest.mark.scaleout
def test_outbox_republishes_a_delivery_whose_lease_expired(pg_engine: Engine, ns: Namespace) -> None:
    receiver = Receiver()

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}, workers=1) as sc:
            sc.outbox.start()
            [mid] = await sc.ingest(1, "adt/ris")
            await until(lambda: all(r.dispatched for r in sc.rows()), 10, "the outbox to publish")
            # A worker claimed it and was killed with -9 before it could settle: its lease runs out.
            killed = sc._store("killed-worker")
            claimed = await killed.claim_ids([sc.rows()[0].id], lease_seconds=1.0)
            assert len(claimed) == 1
            sc.start_consumers()
            consumer = sc.workers[0].consumer
            # RabbitMQ hands the message to the live worker, which finds it leased and acks it ...
            await until(lambda: consumer.skipped >= 1, 10, "the leased delivery to be skipped")
            assert receiver.count[mid] == 0
            # ... and once the lease is over the outbox publishes it again and it is delivered.
            await sc.settled(1, timeout=10)
            [row] = sc.rows()
            assert (row.state, row.attempts) == ("sent", 2)
            assert receiver.count[mid] == 1
            assert [a.worker for a in sc.attempt_log()] == ["worker-1"]

    run(main())


@pytest.mark.scaleout
def test_broker_down_at_start_then_up(pg_engine: Engine, ns: Namespace, broker_url: str) -> None:
    """Messages committed while RabbitMQ is unreachable are delivered once it comes up."""
    receiver = Receiver()
    target = kombu.Connection(broker_url)

    async def main() -> None:
        proxy = Proxy(target.hostname or "127.0.0.1", int(target.port or 5672))
        proxy.refuse = True
        port = await proxy.start()
        via_proxy = target.as_uri(include_password=True).replace(f":{target.port or 5672}/", f":{port}/")
        try:
            async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}, broker_url=via_proxy,
                                workers=1) as sc:
                sc.start_consumers()
                sc.outbox.start()
                ids = await sc.ingest(50, "adt/ris")
                await asyncio.sleep(0.8)
                assert sc.states() == {"queued": 50} and not any(r.dispatched for r in sc.rows())
                proxy.refuse = False
                await sc.settled(50, timeout=20)
                assert set(receiver.count) == set(ids) and set(receiver.count.values()) == {1}
        finally:
            await proxy.stop()

    run(main())


@pytest.mark.scaleout
def test_garbage_on_the_queue_is_dropped_not_fatal(pg_engine: Engine, ns: Namespace, broker_url: str) -> None:
    receiver = Receiver()

    async def main() -> None:
        async with Scenario(pg_engine, ns, receiver, {"adt/ris": FAST}, workers=1) as sc:
            name = amqp.broker_queue("adt/ris", prefix=ns.prefix)
            with kombu.Connection(broker_url) as conn:
                channel = conn.channel()
                channel.queue_declare(queue=name, durable=True, auto_delete=False)
                producer = kombu.Producer(channel)
                for body in (b"not json", b'{"delivery_id": "7"}', b"[]"):
                    producer.publish(body, routing_key=name, content_type="application/octet-stream")
            sc.start_consumers()
            sc.outbox.start()
            ids = await sc.ingest(3, "adt/ris")
            await sc.settled(3)
            assert set(receiver.count) == set(ids)
            with kombu.Connection(broker_url) as conn:
                ok = conn.channel().queue_declare(queue=name, passive=True)
            assert ok.message_count == 0

    run(main())


# --------------------------------------------------------------------------- separate worker processes


async def _worker_process(db_url: str, broker_url: str, prefix: str, queue: str, url: str, worker_id: str) -> None:
    """What ``ihehub worker`` does for one queue, without the config: run a Consumer until SIGTERM."""
    engine = make_engine(db_url)
    writer = Writer(engine)
    store = MessageStore(engine, writer, worker_id=worker_id)
    dest = http_destination(queue, url, FAST)
    consumer = amqp.Consumer(broker_url, store, Deliverer(store, {queue: dest}), queues=[queue], prefix=prefix)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer.start()
    while not consumer.connections:
        await asyncio.sleep(0.02)
    print("ready", flush=True)
    await stop.wait()
    await consumer.stop()
    await dest.connector.close()
    await asyncio.to_thread(writer.close)
    engine.dispose()
    print(consumer.acked, consumer.skipped, flush=True)


@pytest.mark.scaleout
def test_two_worker_processes_send_every_delivery_exactly_once(
    pg_engine: Engine, pg_url: str, ns: Namespace, record_property: Callable[[str, object], None]
) -> None:
    """The real scale-out shape: two worker processes, each with its own event loop and connection."""
    n = 4000
    queue = "bulk/ris"
    receiver = Receiver()
    root = Path(__file__).resolve().parents[2]

    async def main() -> float:
        async with Scenario(pg_engine, ns, receiver, {queue: FAST}, workers=0) as sc:
            url = sc.receiver_url
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.bus.test_amqp", pg_url, ns.broker_url, ns.prefix, queue, url,
                    f"process-{i}", cwd=root, stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, "PYTHONPATH": str(root)})
                for i in (1, 2)
            ]
            try:
                for p in procs:
                    assert p.stdout is not None
                    line = await asyncio.wait_for(p.stdout.readline(), 30)
                    assert line == b"ready\n", f"worker process did not start: {line!r}"
                ids = await sc.ingest(n, queue)
                t0 = time.perf_counter()
                sc.outbox.start()
                await sc.settled(n)
                elapsed = time.perf_counter() - t0
            finally:
                for p in procs:
                    if p.returncode is None:
                        p.send_signal(signal.SIGTERM)
                acked, skipped = [], []
                for p in procs:
                    try:
                        out, _ = await asyncio.wait_for(p.communicate(), 30)
                    except TimeoutError:
                        p.kill()
                        out, _ = await p.communicate()
                    counts = out.split()[-2:]
                    acked.append(int(counts[0]) if len(counts) == 2 else -1)
                    skipped.append(int(counts[1]) if len(counts) == 2 else -1)
            assert sc.states() == {"sent": n}
            assert set(receiver.count) == set(ids) and set(receiver.count.values()) == {1}
            workers = collections.Counter(a.worker for a in sc.attempt_log())
            assert set(workers) == {"process-1", "process-2"}
            # a delivery may be published twice (a republish while its first copy waits in the queue, on a
            # busy box); the second copy is acked without a claim (skipped): never sent twice, as checked above
            assert min(acked) > 0 and min(skipped) >= 0 and sum(acked) - sum(skipped) == n, (acked, skipped)
            return n / elapsed

    rate = run(main(), timeout=90)
    record_property("deliveries_per_second", round(rate))
    print(f"\n2 worker processes: {rate:.0f} deliveries/s")


if __name__ == "__main__":  # python -m tests.bus.test_amqp DB_URL BROKER_URL PREFIX QUEUE RECEIVER_URL WORKER_ID
    asyncio.run(_worker_process(*sys.argv[1:7]))
