"""amqp:// connectors on this machine's real RabbitMQ: ack after commit, reject, requeue, confirms, returns."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import amqp
import kombu
import pytest

from ihehub.bus.message import Message
from ihehub.channels.amqp import AMQPDestination, AMQPSource
from ihehub.channels.base import ConnectorError, DeliveryError, Outcome
from ihehub.channels.registry import ConnectorContext
from tests.channels.sql_kit import GB_HL7, Status
from tests.channels.tcp_proxy import Proxy
from tests.channels.test_file_connector import Hub, run
from tests.conftest import free_port


@pytest.fixture
def queues(broker_url: str) -> Iterator[Any]:
    """A fresh set of queue names (``queues("in")``), deleted after the test."""
    made: list[str] = []
    prefix = f"ihehub-test-{secrets.token_hex(4)}"

    def name(label: str) -> str:
        made.append(f"{prefix}-{label}")
        return made[-1]

    yield name
    with kombu.Connection(broker_url) as conn:
        channel = conn.channel()
        for queue in made:
            channel.queue_delete(queue)


def publish(broker_url: str, queue: str, *bodies: tuple[bytes, dict[str, Any]]) -> None:
    with kombu.Connection(broker_url) as conn:
        channel = conn.channel()
        for body, props in bodies:
            channel.basic_publish(amqp.Message(body, **props), exchange="", routing_key=queue)


def drain(broker_url: str, queue: str, expected: int, timeout: float = 10) -> list[Any]:
    """Get ``expected`` messages from ``queue`` (basic.get, acked)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    with kombu.Connection(broker_url) as conn:
        channel = conn.channel()
        channel.auto_decode = False
        while len(got) < expected and time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                time.sleep(0.05)
            else:
                got.append(message)
    return got


def depth(broker_url: str, queue: str) -> int:
    with kombu.Connection(broker_url) as conn:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)


async def until(predicate: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def consuming(url: str, hub: Any, status: Status | None = None, **options: Any) -> AsyncIterator[AMQPSource]:
    source = AMQPSource(name="mq", url=url, options=options, context=ConnectorContext(on_source_status=status))
    await source.start(hub)
    try:
        yield source
    finally:
        await source.stop()


def test_deliveries_become_messages_acked_after_the_hub_took_them(broker_url: str, queues: Any) -> None:
    queue, dead = queues("in"), queues("dead")
    with kombu.Connection(broker_url) as conn:  # a queue with a dead-letter queue, declared by its owner
        channel = conn.channel()
        channel.queue_declare(dead, durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False,
                              arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
    json_props = {"content_type": "application/json", "message_id": "J-1", "type": "order", "correlation_id": "c9",
                  "application_headers": {"ward": "W3", "bed": 12}}
    publish(broker_url, queue, (GB_HL7, {"message_id": "ignored", "content_type": "text/plain; charset=GB18030"}),
            (b'{"order": 1}', json_props), (b"MSH|broken", {}))
    hub = Hub(Outcome(code="AA"), Outcome(code="AA"), Outcome(code="AE", error="not HL7"))

    async def scenario() -> None:
        async with consuming(broker_url, hub, queue=queue, declare=False, prefetch=2):
            await until(lambda: len(hub.messages) == 3, "three messages")
            await until(lambda: depth(broker_url, dead) == 1, "the refused one dead-lettered")
            assert depth(broker_url, queue) == 0

    run(scenario())
    gb, order, _broken = hub.messages
    assert gb.raw == GB_HL7 and gb.charset == "gb18030" and "张三" in gb.text()
    assert (gb.control_id, gb.message_type, gb.content_type) == ("HIS-0001", "ADT^A01", "text/plain")
    assert gb.headers["amqp.routing_key"] == queue and gb.headers["amqp.redelivered"] == "false"
    assert (order.control_id, order.message_type, order.correlation_id) == ("J-1", "order", "c9")
    assert order.headers["amqp.ward"] == "W3" and order.headers["amqp.bed"] == "12"
    assert order.source == f"amqp:{queue}" and order.content_type == "application/json"
    assert [m.body for m in drain(broker_url, dead, 1)] == [b"MSH|broken"]


def test_unacked_messages_go_back_in_order_when_the_hub_cannot_take_them(broker_url: str, queues: Any) -> None:
    queue = queues("in")
    hub = Hub(Outcome(code="AA"), Outcome(code="AR", error="store down"), RuntimeError("store crashed"),
              Outcome(code="AA"))

    async def scenario() -> None:
        async with consuming(broker_url, hub, queue=queue, prefetch=10) as source:
            await until(source.consuming.is_set, "the consumer")
            publish(broker_url, queue, *((f"m{i}".encode(), {"message_id": f"m{i}"}) for i in range(3)))
            await until(lambda: [m.control_id for m in hub.messages][-2:] == ["m1", "m2"] and
                        len(hub.messages) == 5, "redelivery")
            assert source.connections == 3  # let go of the channel twice, consumed again after a backoff

    run(scenario())
    assert [m.control_id for m in hub.messages] == ["m0", "m1", "m1", "m1", "m2"]
    assert [m.headers["amqp.redelivered"] for m in hub.messages] == ["false", "false", "true", "true", "true"]
    assert depth(broker_url, queue) == 0


def test_broker_unreachable_is_reported_and_stop_works() -> None:
    status = Status()
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"

    async def scenario() -> None:
        async with consuming(url, Hub(), status, queue="q") as source:
            await until(lambda: status.reports, "a status report")
            assert not source.consuming.is_set()

    run(scenario())
    (channel, error), cleared = status.reports
    assert channel == "mq" and error is not None
    assert error.startswith("amqp source 'mq': RabbitMQ at amqp://guest:**@127.0.0.1:") and "unavailable" in error
    assert cleared == ("mq", None)


def test_a_lost_connection_is_reported_and_consuming_resumes(broker_url: str, queues: Any) -> None:
    """RabbitMQ behind a proxy that is cut mid-stream: the outage shows in the status; nothing is lost."""
    queue, status, hub = queues("in"), Status(), Hub()
    with Proxy(("127.0.0.1", 5672)) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"

        async def scenario() -> None:
            async with consuming(url, hub, status, queue=queue) as source:
                await until(source.consuming.is_set, "the consumer")
                publish(broker_url, queue, (b"before", {"message_id": "1"}))
                await until(lambda: len(hub.messages) == 1, "the first message")
                proxy.cut()
                await until(lambda: status.reports, "the outage in the status")
                publish(broker_url, queue, (b"during", {"message_id": "2"}))
                proxy.restore()
                await until(lambda: len(hub.messages) == 2 and status.reports[-1][1] is None, "the resumption")

        run(scenario())
    assert [m.raw for m in hub.messages] == [b"before", b"during"]
    errors = [error for _, error in status.reports]  # lost, maybe refused while cut, then cleared
    assert errors[0] is not None and errors[0].startswith(f"amqp source 'mq': consuming {queue} from amqp://guest:**@")
    assert all(errors[:-1]) and errors[-1] is None and {c for c, _ in status.reports} == {"mq"}
    assert depth(broker_url, queue) == 0


def test_destination_publishes_persistent_confirmed_messages(broker_url: str, queues: Any) -> None:
    queue = queues("out")
    dest = AMQPDestination(name="adt/mq", url=broker_url, options={"declare_queue": queue, "headers": {"x-site": "H1"}},
                           context=ConnectorContext())
    message = Message(channel="adt", raw=GB_HL7, content_type="application/hl7-v2", charset="gb18030",
                      control_id="HIS-0001", message_type="ADT^A01", correlation_id="c1")

    async def scenario() -> Any:
        try:
            first = await dest.send(message)
            together = [message.evolve(id=f"m{i}", control_id=f"C{i}") for i in range(20)]
            answers = await asyncio.gather(*(dest.send(m) for m in together))  # one batch of confirms
            assert {a.status for a in answers} == {"confirmed"}
            return first
        finally:
            await dest.close()

    response = run(scenario())
    assert response.ok and response.status == "confirmed"
    got, *rest = drain(broker_url, queue, 21)
    assert sorted(m.properties["message_id"] for m in rest) == sorted(f"C{i}" for i in range(20))
    assert got.body == GB_HL7
    props = got.properties
    assert props["delivery_mode"] == 2 and props["content_type"] == "application/hl7-v2; charset=gb18030"
    assert (props["message_id"], props["type"], props["correlation_id"]) == ("HIS-0001", "ADT^A01", "c1")
    assert props["application_headers"] == {"x-ihehub-message-id": message.id, "x-ihehub-channel": "adt",
                                            "x-site": "H1"}


def test_destination_errors(broker_url: str, queues: Any) -> None:
    ctx = ConnectorContext()
    with pytest.raises(ConnectorError, match="routing_key is required"):
        AMQPDestination(name="d", url=broker_url, options={"exchange": "amq.topic"}, context=ctx)
    nowhere = AMQPDestination(name="d", url=broker_url, options={"routing_key": queues("missing")}, context=ctx)
    down = AMQPDestination(name="d", url=f"amqp://guest:guest@127.0.0.1:{free_port()}//",
                           options={"routing_key": "q"}, context=ctx)
    message = Message(channel="adt", raw=b"x")

    async def scenario() -> list[DeliveryError]:
        errors = []
        for dest in (nowhere, down):
            with pytest.raises(DeliveryError) as info:
                await dest.send(message)
            errors.append(info.value)
            await dest.close()
        return errors

    unroutable, unreachable = run(scenario())
    assert unroutable.retryable and "could not route the message" in str(unroutable)
    assert "NO_ROUTE" in str(unroutable) or "312" in str(unroutable)
    assert unreachable.retryable and str(unreachable).startswith("d: publishing to RabbitMQ at amqp://guest:**@")
