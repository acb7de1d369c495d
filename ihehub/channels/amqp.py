"""``amqp://`` connectors: consume a RabbitMQ queue (source); publish with confirms (destination).

URL: ``amqp://user:password@host:5672/vhost`` (kombu syntax; ``//`` is the default vhost ``/``).

**Source.**  A consumer with manual acknowledgement and a prefetch window (AMQP 0-9-1
``basic.qos``, §1.8.3.1) on ``queue``.  Every delivery becomes one `Message`; it is acknowledged
(``basic.ack``, §1.8.3.13) only after the hub has committed it, so a hub that dies mid-way leaves it
in the queue.  A message the channel refuses (``AE``) is rejected without requeue (``basic.reject``,
§1.8.3.14): RabbitMQ sends it to the queue's dead-letter exchange when one is set, and the hub's store
keeps it with the reason either way.  When the hub cannot take a message (``AR``, store down) the
consumer lets go of the channel, so everything unacknowledged goes back to the queue in order, and
consumes again after a backoff.  Message properties map to `Message` fields: ``message_id`` →
``control_id`` (MSH-10 for HL7 v2 bodies wins), ``correlation_id``, ``type`` → ``message_type``
(MSH-9 wins), ``content_type`` (and its ``charset``), application headers → ``headers["amqp.<name>"]``.

**Destination.**  ``basic.publish`` of ``Message.raw`` as a persistent message (``delivery-mode``
2) to ``exchange`` with ``routing_key``, ``mandatory`` so an unroutable message is an error, and a
wait for RabbitMQ's publisher confirm (the ``confirm.select`` extension).  No confirm, a
``basic.nack``, a return or a broken connection is a retryable `DeliveryError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import amqp
import kombu

from ihehub.bus.amqp import _Backoff, _connect
from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Outcome, Response
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.registry import ConnectorContext
from ihehub.channels.sniff import codec_name, label, parse_content_type

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
_NAME = {"type": "string", "minLength": 1, "maxLength": 255}

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["queue"],
    "properties": {
        "queue": {**_NAME, "description": "the queue to consume"},
        "declare": {"type": "boolean", "default": True, "description": "declare the queue (durable) first"},
        "exchange": {**_NAME, "description": "bind the queue to this exchange (declared too when declare)"},
        "exchange_type": {"enum": ["direct", "topic", "fanout", "headers"], "default": "direct"},
        "binding_keys": {"type": "array", "items": {"type": "string", "maxLength": 255}, "minItems": 1},
        "prefetch": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 10},
        "charset": {"type": "string", "minLength": 1},
        "content_type": {"type": "string", "minLength": 1},
    },
}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "exchange": {"type": "string", "maxLength": 255, "default": "", "description": "\"\" is the default exchange"},
        "routing_key": {"type": "string", "maxLength": 255, "description": "with the default exchange: the queue"},
        "declare_queue": {**_NAME, "description": "declare this durable queue (and bind it to exchange) first"},
        "mandatory": {"type": "boolean", "default": True, "description": "an unroutable message is an error"},
        "confirm_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _shown(url: str) -> str:
    return str(kombu.Connection(url).as_uri())  # the password masked


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- source


async def _offer_all(inbound: Inbound, messages: list[Message]) -> tuple[list[Outcome], str | None]:
    """The outcomes of the messages the hub decided on (AA or AE), in order, and why it stopped early, if it did."""
    outcomes: list[Outcome] = []
    for message in messages:
        try:
            outcome = await inbound(message)
        except Exception as exc:
            log.warning("channel %s: the hub failed on message %s", message.channel, message.id, exc_info=True)
            return outcomes, f"{type(exc).__name__}: {exc}"
        if not outcome.accepted and outcome.code.upper() not in ("AE", "CE"):
            return outcomes, f"{outcome.code}: {outcome.error or 'not taken'}"
        outcomes.append(outcome)
    return outcomes, None


class _HubUnavailable(Exception):
    """The hub answered AR or failed: let go of the unacknowledged messages and back off."""


class AMQPSource:
    """Consume ``queue`` in a thread of its own; each delivery goes through the hub, then is acked."""

    kind = "amqp source"

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"amqp source {name!r}"
        check_options(options, SOURCE_OPTIONS_SCHEMA, where)
        self.name = name
        self.url = url
        self.shown = _shown(url)
        self.queue: str = options["queue"]
        self.declare = bool(options.get("declare", True))
        self.exchange: str | None = options.get("exchange")
        self.exchange_type: str = options.get("exchange_type", "direct")
        self.binding_keys: list[str] = list(options.get("binding_keys") or [self.queue])
        self.prefetch = int(options.get("prefetch", 10))
        media, params = parse_content_type(options.get("content_type"))
        self.content_type = media
        label = options.get("charset") or params.get("charset")
        self.charset = codec_name(label) if label else None
        if label and self.charset is None:
            raise ConnectorError(f"{where}: unknown charset {label!r}")
        self._on_status = context.on_source_status
        self._inbound: Inbound | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connections = 0  # successful connects, for health checks and tests
        self.consuming = threading.Event()
        self.last_error: str | None = None

    async def start(self, inbound: Inbound) -> None:
        if self._thread is not None:
            raise ConnectorError(f"amqp source {self.name!r} is already started")
        self._inbound = inbound
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"amqp-source-{self.name}", daemon=True)
        self._thread.start()
        log.info("channel %s: consuming %s from %s", self.name, self.queue, self.shown)

    async def stop(self) -> None:
        """Finish the message in hand, cancel the consumer; what was prefetched goes back to the queue."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join, STOP_GRACE_SECONDS)
        self.consuming.clear()
        if self.last_error is not None:
            self._report(None)

    def _report(self, error: str | None) -> None:
        if error == self.last_error:
            return  # an outage is logged and reported once, not on every reconnect attempt
        if error is not None:
            log.warning("channel %s: %s", self.name, error)
        self.last_error = error
        if self._on_status is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_status, self.name, error)

    # -- the consumer thread

    def _run(self) -> None:
        backoff = _Backoff(first=0.5, cap=30.0)
        while not self._stop.is_set():
            try:
                conn = _connect(self.url)
            except Exception as exc:
                self._report(f"{self.kind} {self.name!r}: RabbitMQ at {self.shown} unavailable: "
                             f"{type(exc).__name__}: {exc}")
                self._stop.wait(backoff.next())
                continue
            try:
                self.connections += 1
                self._consume(conn, backoff)
            except _HubUnavailable:
                self._stop.wait(backoff.next())
            except Exception as exc:
                if not self._stop.is_set():
                    self._report(f"{self.kind} {self.name!r}: consuming {self.queue} from {self.shown} failed: "
                                 f"{type(exc).__name__}: {exc}")
                    self._stop.wait(backoff.next())
            finally:
                self.consuming.clear()
                with contextlib.suppress(Exception):
                    conn.release()  # unacknowledged messages go back to the queue

    def _consume(self, conn: Any, backoff: _Backoff) -> None:
        channel = conn.channel()
        channel.auto_decode = False  # the body stays bytes whatever its content_encoding says
        if self.declare:
            channel.queue_declare(queue=self.queue, durable=True, auto_delete=False)
            if self.exchange:
                channel.exchange_declare(exchange=self.exchange, type=self.exchange_type, durable=True,
                                         auto_delete=False)
        if self.exchange:
            for key in self.binding_keys:
                channel.queue_bind(queue=self.queue, exchange=self.exchange, routing_key=key)
        channel.basic_qos(0, self.prefetch, False)
        held: list[Any] = []
        tag = channel.basic_consume(queue=self.queue, callback=held.append, no_ack=False)
        self.consuming.set()
        if self.last_error is not None:
            log.info("channel %s: consuming %s again", self.name, self.queue)
            self._report(None)
        backoff.reset()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
                for _ in range(3 * self.prefetch):  # take what already arrived (3 frames a message)
                    conn.drain_events(timeout=0)
            conn.heartbeat_check()
            if held and not self._stop.is_set():
                batch = held[:]
                del held[:]
                self._handle(channel, batch)
        with contextlib.suppress(Exception):
            channel.basic_cancel(tag)

    def _handle(self, channel: Any, deliveries: list[Any]) -> None:
        """Hand the deliveries to the hub in order (one hop to the event loop), then ack or reject each."""
        messages = [self._message(d) for d in deliveries]
        inbound, loop = self._inbound, self._loop
        if inbound is None or loop is None:
            raise _HubUnavailable("not started")
        outcomes, failure = asyncio.run_coroutine_threadsafe(_offer_all(inbound, messages), loop).result()
        for delivery, message, outcome in zip(deliveries, messages, outcomes, strict=False):
            if outcome.accepted:
                channel.basic_ack(delivery.delivery_tag)
            else:
                log.warning("channel %s: message %s from %s refused (%s); rejected without requeue", self.name,
                            message.id, self.queue, outcome.error)
                channel.basic_reject(delivery.delivery_tag, requeue=False)
        if failure is not None:
            log.warning("channel %s: the hub did not take a message from %s (%s); it goes back to the queue",
                        self.name, self.queue, failure)
            raise _HubUnavailable(failure)

    def _message(self, delivery: Any) -> Message:
        raw = delivery.body if isinstance(delivery.body, bytes) else _text(delivery.body).encode()
        props: Mapping[str, Any] = delivery.properties
        media, params = parse_content_type(props.get("content_type"))
        said = params.get("charset") or props.get("content_encoding")
        labels = label(raw, content_type=self.content_type or media,
                       charset=(codec_name(said) if said else None) or self.charset,
                       control_id=_text(props["message_id"]) if props.get("message_id") else None,
                       message_type=_text(props["type"]) if props.get("type") else None)
        info = delivery.delivery_info
        headers = {f"amqp.{k}": _text(v) for k, v in (props.get("application_headers") or {}).items()}
        headers.update({"amqp.exchange": _text(info.get("exchange", "")),
                        "amqp.routing_key": _text(info.get("routing_key", "")),
                        "amqp.redelivered": "true" if info.get("redelivered") else "false"})
        return Message(
            channel=self.name,
            raw=raw,
            content_type=labels.content_type,
            charset=labels.charset,
            headers=headers,
            correlation_id=_text(props["correlation_id"]) if props.get("correlation_id") else None,
            control_id=labels.control_id,
            message_type=labels.message_type,
            source=f"amqp:{self.queue}",
        )


# --------------------------------------------------------------------------- destination


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    message: Message
    future: concurrent.futures.Future[None]


def _settle(job: _Job, error: Exception | None) -> None:
    """Resolve a send once; a send the caller gave up on (cancelled, timed out) is left alone."""
    if job.future.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(error)


class AMQPDestination:
    """Publish each message persistently and wait for RabbitMQ's confirm.

    One thread owns the connection: it publishes whatever the channel's concurrent sends have queued,
    then waits for their confirms together (delivery tags, ``multiple`` acks), so four sends in flight
    cost one round trip, not four.  While idle it keeps the connection alive with heartbeats.
    """

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"amqp destination {name!r}"
        check_options(options, DESTINATION_OPTIONS_SCHEMA, where)
        self.name = name
        self.url = url
        self.shown = _shown(url)
        self.exchange: str = options.get("exchange", "")
        self.declare_queue: str | None = options.get("declare_queue")
        routing_key = options.get("routing_key")
        if routing_key is None and not self.exchange:
            routing_key = self.declare_queue
        if routing_key is None:
            raise ConnectorError(f"{where}: options.routing_key is required (with the default exchange: the queue)")
        self.routing_key: str = routing_key
        self.mandatory = bool(options.get("mandatory", True))
        self.confirm_timeout = float(options.get("confirm_timeout", 10))
        self.headers: dict[str, str] = dict(options.get("headers") or {})
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # publisher thread only:
        self._conn: Any = None
        self._channel: Any = None
        self._tag = 0
        self._waiting: dict[int, _Job] = {}  # delivery tag -> job, until confirmed
        self._returned: dict[str, str] = {}  # message id -> why RabbitMQ returned it

    # -- the caller's side

    async def send(self, message: Message) -> Response:
        job = _Job(message, concurrent.futures.Future())
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"amqp-destination-{self.name}", daemon=True)
                self._thread.start()
            self._jobs.put(job)
        await asyncio.wrap_future(job.future)
        return Response(ok=True, status="confirmed")

    async def close(self) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if thread is not None:
            await asyncio.to_thread(thread.join, self.confirm_timeout + 5)

    # -- the publisher thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=1.0)
                except queue.Empty:
                    self._keep_alive()
                    continue
                batch: list[_Job] = []
                while job is not None:
                    batch.append(job)
                    if len(batch) >= 500:
                        break
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._publish(batch)
                if job is None:
                    return
        finally:
            self._reset()

    def _keep_alive(self) -> None:
        if self._conn is None:
            return
        try:
            with contextlib.suppress(TimeoutError):
                self._conn.drain_events(timeout=0)  # read the broker's heartbeats
            self._conn.heartbeat_check()
        except Exception as exc:
            log.info("%s: RabbitMQ connection dropped while idle (%s); reconnecting on the next send", self.name, exc)
            self._reset()

    def _open(self) -> Any:
        if self._channel is not None:
            return self._channel
        conn = _connect(self.url)
        try:
            channel = conn.channel()
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            if self.declare_queue:
                channel.queue_declare(queue=self.declare_queue, durable=True, auto_delete=False)
                if self.exchange:
                    channel.queue_bind(queue=self.declare_queue, exchange=self.exchange, routing_key=self.routing_key)
        except BaseException:
            conn.release()
            raise
        self._conn, self._channel, self._tag = conn, channel, 0
        return channel

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def _settled(self, tag: int, multiple: bool) -> list[_Job]:
        tags = [t for t in self._waiting if t <= tag] if multiple else [tag]
        return [job for t in tags if (job := self._waiting.pop(t, None)) is not None]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        for job in self._settled(tag, multiple):
            reason = self._returned.pop(job.message.id, None)
            if reason is None:
                _settle(job, None)
            else:
                where = f"exchange {self.exchange!r}" if self.exchange else "the default exchange"
                _settle(job, DeliveryError(
                    f"{self.name}: RabbitMQ could not route the message ({reason}): no queue is bound to {where} "
                    f"with routing key {self.routing_key!r}"))

    def _on_nack(self, tag: int, multiple: bool, *_: Any) -> None:
        for job in self._settled(tag, multiple):
            _settle(job, DeliveryError(f"{self.name}: RabbitMQ refused the message (basic.nack)"))

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        headers = message.properties.get("application_headers") or {}
        self._returned[_text(headers.get("x-ihehub-message-id", ""))] = str(exc)

    def _publish(self, batch: list[_Job]) -> None:
        """Publish the batch, then wait for every confirm; whatever is left unconfirmed fails retryably."""
        try:
            channel = self._open()
            self._returned.clear()
            for job in batch:
                self._tag += 1
                self._waiting[self._tag] = job
                body = amqp.Message(job.message.raw, **self._properties(job.message))
                channel.basic_publish(body, exchange=self.exchange, routing_key=self.routing_key,
                                      mandatory=self.mandatory)
            deadline = time.monotonic() + self.confirm_timeout
            while self._waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                with contextlib.suppress(TimeoutError):
                    self._conn.drain_events(timeout=min(left, 1.0))
        except Exception as exc:
            self._reset()
            reason = "no publisher confirm within the timeout" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {exc}"
            error = f"{self.name}: publishing to RabbitMQ at {self.shown} failed: {reason}"
            for job in batch:
                _settle(job, DeliveryError(error))
            self._waiting.clear()

    def _properties(self, message: Message) -> dict[str, Any]:
        content_type = message.content_type
        if message.charset and "charset=" not in content_type.lower():
            content_type = f"{content_type}; charset={message.charset}"
        headers: dict[str, Any] = {"x-ihehub-message-id": message.id, "x-ihehub-channel": message.channel}
        headers.update(self.headers)
        props: dict[str, Any] = {
            "content_type": content_type,
            "delivery_mode": 2,
            "message_id": message.control_id or message.id,
            "timestamp": int(message.received_at.timestamp()),
            "application_headers": headers,
        }
        if message.correlation_id:
            props["correlation_id"] = message.correlation_id
        if message.message_type:
            props["type"] = message.message_type
        return props


SPEC = ConnectorSpec(
    schemes=("amqp",),
    description="Consume a RabbitMQ queue with manual acks (source); publish persistently with confirms",
    source="ihehub.channels.amqp:AMQPSource",
    destination="ihehub.channels.amqp:AMQPDestination",
    options_schema=union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA),
    example="""\
source:
  url: amqp://hub:${MQ_PASSWORD}@mq.example.org:5672/his
  options: {queue: his.adt, prefetch: 20, exchange: his, exchange_type: topic, binding_keys: ["adt.#"]}
destinations:
  - name: lab
    url: amqp://hub:${MQ_PASSWORD}@mq.example.org:5672/lab
    options: {exchange: lab.orders, routing_key: orm, confirm_timeout: 10}
""",
)
