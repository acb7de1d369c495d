"""Destination connectors of the patient-event listeners (see `ihehub.actors.events.config` for the kinds).

Every patient event is ONE bus message (channel ``empi-events``, the event JSON of
`PatientEvent.to_json`) with one delivery per listener; each listener's destination renders that JSON in
its own format when it sends.  So the bus does the rest for every kind alike: per-listener state, attempts
with their responses and errors, backoff, dead letters, resend (``ihehub messages resend``, the API).

A destination returns a `Response` or raises `DeliveryError`; ``retryable=False`` means "sending again
cannot help" (a malformed event body, a SOAP ``env:Sender`` fault, an HTTP 4xx) and dead-letters at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from lxml import etree
from sqlalchemy import Connection, Engine, MetaData, Table, create_engine, insert, update

from ihehub.actors.events.config import LOCAL, Listener
from ihehub.actors.events.tables import OUTBOX_TABLE, outbox, outbox_table
from ihehub.actors.hl7v2 import PixConsumer
from ihehub.actors.iti10 import build_a31, build_a40, select_identifiers
from ihehub.bus.message import Message
from ihehub.bus.store import MessageStore
from ihehub.channels.base import DeliveryError, Destination, Response
from ihehub.channels.http import HTTPDestination
from ihehub.channels.mllp import MLLPDestination
from ihehub.channels.registry import ConnectorContext
from ihehub.empi import Domain, DomainType, EventType, PatientEvent
from ihehub.empi.store import event_from_row
from ihehub.hl7 import hl7_timestamp, new_control_id

SOAP_ENV = "http://www.w3.org/2003/05/soap-envelope"  # SOAP 1.2 Part 1, 5
WSA = "http://www.w3.org/2005/08/addressing"  # WS-Addressing 1.0 Core
EVENTS_NS = "urn:ihehub:empi:events:1"
DEFAULT_SOAP_ACTION = "urn:ihehub:empi:PatientEvent"
DEFAULT_SIGNATURE_HEADER = "X-Ihehub-Signature"
CONFIRM_TIMEOUT = 30.0  # seconds to wait for RabbitMQ's publisher confirm

DomainLookup = Callable[[str], Domain | None]


def event_of(message: Message) -> PatientEvent:
    """The `PatientEvent` a bus message of ``empi-events`` carries; non-retryable `DeliveryError` otherwise."""
    try:
        d = json.loads(message.raw)
        row = SimpleNamespace(id=d["id"], type=d["type"], patient=d["patient"], at=float(d["at"]),
                              payload=message.raw)
        return event_from_row(row)  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError) as exc:
        raise DeliveryError(f"message {message.id} is not a patient event ({type(exc).__name__}: {exc})",
                            retryable=False) from None


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- webhook ------------------------------------------------------------------------------------------

class _SignedHTTP(HTTPDestination):
    """The http destination plus the event headers and the body's HMAC-SHA256 (RFC 2104) signature."""

    def __init__(self, *, secret: str | None, header: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.secret = secret.encode("utf-8") if secret else None
        self.signature_header = header

    def _request_headers(self, message: Message) -> dict[str, str]:
        headers = super()._request_headers(message)
        for key in ("empi.event", "empi.type", "empi.patient"):
            if key in message.headers:
                headers["X-Ihehub-" + key.split(".")[1].capitalize()] = str(message.headers[key])
        if self.secret is not None:
            digest = hmac.new(self.secret, message.raw, hashlib.sha256).hexdigest()
            headers[self.signature_header] = f"sha256={digest}"
        return headers


class WebhookDestination:
    """``kind: webhook``: POST the event JSON as it is stored (``application/json``)."""

    def __init__(self, listener: Listener, context: ConnectorContext) -> None:
        self.name = listener.queue
        self.http = _SignedHTTP(name=listener.queue, url=listener.url, options=listener.options, context=context,
                                secret=listener.settings.get("secret"),
                                header=listener.settings.get("signature_header", DEFAULT_SIGNATURE_HEADER))

    async def send(self, message: Message) -> Response:
        event_of(message)  # a body that is no event is not sent anywhere
        return await self.http.send(message)

    async def close(self) -> None:
        await self.http.close()


# -- SOAP ---------------------------------------------------------------------------------------------

def soap_envelope(event: PatientEvent, *, action: str, to: str, message_id: str) -> bytes:
    """A SOAP 1.2 envelope (SOAP 1.2 Part 1, 5) with WS-Addressing headers and the event in the body:
    ``<ev:PatientEvent id= type=><ev:patient/><ev:at/><ev:identifiers><ev:identifier value= domain=/>...``."""
    E = etree.Element
    env = E(f"{{{SOAP_ENV}}}Envelope", nsmap={"env": SOAP_ENV, "wsa": WSA, "ev": EVENTS_NS})
    header = etree.SubElement(env, f"{{{SOAP_ENV}}}Header")
    for tag, text in (("Action", action), ("MessageID", message_id), ("To", to)):
        etree.SubElement(header, f"{{{WSA}}}{tag}").text = text
    body = etree.SubElement(env, f"{{{SOAP_ENV}}}Body")
    ev = etree.SubElement(body, f"{{{EVENTS_NS}}}PatientEvent", id=str(event.id), type=event.type.value)
    etree.SubElement(ev, f"{{{EVENTS_NS}}}patient").text = event.patient
    etree.SubElement(ev, f"{{{EVENTS_NS}}}at").text = iso(event.at)
    ids = etree.SubElement(ev, f"{{{EVENTS_NS}}}identifiers")
    for i in event.identifiers:
        etree.SubElement(ids, f"{{{EVENTS_NS}}}identifier", value=i.value, domain=i.domain)
    for tag, ident in (("record", event.record), ("subsumed", event.subsumed)):
        if ident is not None:
            etree.SubElement(ev, f"{{{EVENTS_NS}}}{tag}", value=ident.value, domain=ident.domain)
    if event.other_patient:
        etree.SubElement(ev, f"{{{EVENTS_NS}}}otherPatient").text = event.other_patient
    if event.detail:
        etree.SubElement(ev, f"{{{EVENTS_NS}}}detail").text = json.dumps(dict(event.detail), ensure_ascii=False)
    return bytes(etree.tostring(env, xml_declaration=True, encoding="UTF-8"))


_SAFE_XML = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def soap_fault(body: bytes) -> tuple[str, str] | None:
    """(code value, reason text) of a SOAP 1.2 fault (Part 1, 5.4), or None when ``body`` is none."""
    try:
        root = etree.fromstring(body, _SAFE_XML)
    except etree.XMLSyntaxError:
        return None
    ns = {"env": SOAP_ENV}
    fault = root.find("env:Body/env:Fault", ns)
    if fault is None:
        return None
    code = fault.findtext("env:Code/env:Value", default="", namespaces=ns).strip()
    reason = fault.findtext("env:Reason/env:Text", default="", namespaces=ns).strip()
    return code, reason


class SoapDestination:
    """``kind: soap``: the event as a SOAP 1.2 request; a ``env:Sender`` fault dead-letters, others retry."""

    def __init__(self, listener: Listener, context: ConnectorContext) -> None:
        self.name = listener.queue
        self.url = listener.url
        self.action = listener.settings.get("soap_action", DEFAULT_SOAP_ACTION)
        self.http = HTTPDestination(name=listener.queue, url=listener.url, options=listener.options, context=context)

    async def send(self, message: Message) -> Response:
        event = event_of(message)
        envelope = soap_envelope(event, action=self.action, to=self.url, message_id=f"urn:uuid:{uuid.uuid4()}")
        soap = message.evolve(raw=envelope, charset="utf-8",
                              content_type=f'application/soap+xml; action="{self.action}"')
        resp = await self.http.send(soap)
        if resp.ok:
            fault = soap_fault(resp.body) if resp.body else None
            if fault is None:
                return resp
            return Response(ok=False, body=resp.body, status=resp.status, error=f"SOAP fault {fault[0]}: {fault[1]}",
                            retryable=not fault[0].endswith("Sender"))
        fault = soap_fault(resp.body) if resp.body else None
        if fault is not None:
            return Response(ok=False, body=resp.body, status=resp.status,
                            error=f"SOAP fault {fault[0]}: {fault[1]} (HTTP {resp.status})",
                            retryable=resp.retryable and not fault[0].endswith("Sender"))
        return resp

    async def close(self) -> None:
        await self.http.close()


# -- database outbox ----------------------------------------------------------------------------------

def _upsert(conn: Connection, table: Table, listener: str, event: PatientEvent, payload: str) -> str:
    """Insert the event's row, or refresh it when it is there (a resend): returns "inserted" or "updated"."""
    now = time.time()
    c = table.c
    res = conn.execute(update(table).where(c.listener == listener, c.event_id == event.id).values(
        payload=payload, delivered_at=now, deliveries=c.deliveries + 1))
    if res.rowcount:
        return "updated"
    conn.execute(insert(table).values(listener=listener, event_id=event.id, type=event.type.value,
                                      patient=event.patient, payload=payload, event_at=event.at, delivered_at=now,
                                      deliveries=1))
    return "inserted"


class DbDestination:
    """``kind: db``: a row in the hub's ``empi_event_outbox`` (``url: local``, written by the hub's writer, so
    SQLite never sees two writers) or in a table of an external database (SQLAlchemy URL, created if missing)."""

    def __init__(self, listener: Listener, store: MessageStore) -> None:
        self.name = listener.queue
        self.listener = listener.name
        self.url = listener.url
        self.store = store
        self.table_name = listener.settings.get("table", OUTBOX_TABLE)
        self._engine: Engine | None = None
        self._table: Table | None = None
        self._lock = threading.Lock()

    def _external(self) -> tuple[Engine, Table]:
        with self._lock:
            if self._engine is None or self._table is None:
                engine = create_engine(self.url, pool_pre_ping=True, pool_size=1, max_overflow=1)
                table = outbox_table(MetaData(), self.table_name)
                try:
                    table.metadata.create_all(engine, checkfirst=True)
                except Exception:
                    engine.dispose()
                    raise
                self._engine, self._table = engine, table
            return self._engine, self._table

    def _write_external(self, event: PatientEvent, payload: str) -> str:
        engine, table = self._external()
        with engine.begin() as conn:
            return _upsert(conn, table, self.listener, event, payload)

    async def send(self, message: Message) -> Response:
        event = event_of(message)
        payload = message.raw.decode("utf-8")
        try:
            if self.url == LOCAL:
                done = await self.store.writer.arun(lambda conn: _upsert(conn, outbox, self.listener, event, payload))
            else:
                done = await asyncio.to_thread(self._write_external, event, payload)
        except Exception as exc:  # the database is down, refused the login, the table is not ours: retried
            with self._lock:
                if self._engine is not None:
                    self._engine.dispose()
                self._engine = self._table = None
            raise DeliveryError(f"{self.name}: cannot write {self.table_name}: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return Response(ok=True, status=done, body=f"{self.table_name} event {event.id} {done}".encode())

    async def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = self._table = None


# -- AMQP -----------------------------------------------------------------------------------------------

class AmqpDestination:
    """``kind: amqp``: a persistent message (delivery-mode 2) published with RabbitMQ publisher confirms
    (``confirm_publish``: the publish returns once the broker has taken responsibility for it)."""

    def __init__(self, listener: Listener) -> None:
        self.name = listener.queue
        self.url = listener.url
        s = listener.settings
        self.exchange_name: str = s.get("exchange", "")
        self.exchange_type: str = s.get("exchange_type", "topic")
        self.routing_key: str = s.get("routing_key", "empi.{type}")
        self.queue: str | None = s.get("queue")
        self.events = listener.events
        self._conn: Any = None
        self._producer: Any = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        import kombu

        if self._producer is not None:
            return self._producer
        conn = kombu.Connection(self.url, heartbeat=0, connect_timeout=5,
                                transport_options={"confirm_publish": True})
        try:
            conn.ensure_connection(max_retries=0)
            channel = conn.channel()
            exchange = kombu.Exchange(self.exchange_name, type=self.exchange_type, durable=True)
            if self.exchange_name:
                exchange(channel).declare()
            if self.queue:
                q = kombu.Queue(self.queue, durable=True, bindings=[
                    kombu.binding(exchange, routing_key=k) for k in self._binding_keys()] or None)
                q(channel).declare()
            self._producer = kombu.Producer(channel, exchange=exchange)
        except BaseException:
            conn.release()
            raise
        self._conn = conn
        return self._producer

    def _binding_keys(self) -> list[str]:
        """How ``queue`` is bound to ``exchange``: topic ``empi.*`` for ``empi.{type}``, one key per event type
        for a direct exchange; the default exchange routes by queue name and needs no binding."""
        if not self.exchange_name:
            return []
        if "{type}" not in self.routing_key or self.exchange_type in ("fanout", "headers"):
            return [self.routing_key]
        if self.exchange_type == "topic":
            return [self.routing_key.replace("{type}", "*")]
        return [self.routing_key.replace("{type}", t) for t in sorted(self.events)]

    def _publish(self, message: Message, key: str, headers: dict[str, Any]) -> None:
        with self._lock:
            for attempt in (1, 2):  # a kept connection the broker dropped while idle: once more on a new one
                fresh = self._producer is None
                try:
                    self._open().publish(message.raw, routing_key=key, delivery_mode=2,
                                         content_type="application/json", content_encoding="utf-8", headers=headers,
                                         message_id=message.id, retry=False, timeout=CONFIRM_TIMEOUT)
                    return
                except Exception:
                    self._reset()
                    if fresh or attempt == 2:
                        raise

    def _reset(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # already broken: nothing more to release
                return

    async def send(self, message: Message) -> Response:
        event = event_of(message)
        key = self.routing_key.replace("{type}", event.type.value)
        if not self.exchange_name and self.queue:
            key = self.queue  # the default exchange routes by queue name
        headers = {"event_id": event.id, "event_type": event.type.value, "patient": event.patient}
        try:
            await asyncio.to_thread(self._publish, message, key, headers)
        except Exception as exc:
            raise DeliveryError(f"{self.name}: publish to {self.exchange_name or '(default exchange)'} "
                                f"routing key {key!r} failed: {type(exc).__name__}: {exc}") from exc
        return Response(ok=True, status="confirmed", body=f"{self.exchange_name}/{key}".encode())

    async def close(self) -> None:
        with self._lock:
            self._reset()


# -- MLLP: ADT^A31 / ADT^A40 -----------------------------------------------------------------------

class MllpEventDestination:
    """``kind: mllp``: ADT^A40 for a merge (PID-3 survivor, MRG-1 the subsumed id), ADT^A31 otherwise, with
    the identifiers in the listener's ``domains``; the ACK is judged by the mllp destination (AA/CA ok)."""

    def __init__(self, listener: Listener, context: ConnectorContext, domain: DomainLookup, *,
                 sending_application: str, sending_facility: str) -> None:
        self.name = listener.queue
        s = listener.settings
        self.consumer = PixConsumer(name=listener.name, url=listener.url,
                                    domains=None if s.get("domains") is None else tuple(s["domains"]),
                                    receiving_application=s.get("receiving_application", ""),
                                    receiving_facility=s.get("receiving_facility", ""))
        self.domain = domain
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.mllp = MLLPDestination(name=listener.queue, url=listener.url, options=listener.options, context=context)

    def render(self, event: PatientEvent) -> tuple[bytes, str, str] | None:
        """(HL7 bytes, MSH-10, message type) of an event; None when the patient has no identifier for this
        listener but the enterprise one (as ITI-10 sends no A31 then)."""
        picked = select_identifiers(event.identifiers, self.consumer, self.domain)
        if all(d is not None and d.type is DomainType.ENTERPRISE for _, d in picked):
            return None
        cid = new_control_id()
        kw = {"sending_application": self.sending_application, "sending_facility": self.sending_facility,
              "control_id": cid, "timestamp": hl7_timestamp()}
        if event.type is EventType.MERGED and event.subsumed is not None:
            sub = event.subsumed
            return build_a40(picked, (sub, self.domain(sub.domain)), self.consumer, **kw), cid, "ADT^A40"
        return build_a31(picked, self.consumer, **kw), cid, "ADT^A31"

    async def send(self, message: Message) -> Response:
        event = event_of(message)
        if event.type is EventType.DELETED:
            raise DeliveryError(f"{self.name}: a 'deleted' event has no cross-reference for an A31", retryable=False)
        rendered = self.render(event)
        if rendered is None:
            return Response(ok=True, status="skipped",
                            body=f"patient {event.patient} has no identifier in the listener's domains".encode())
        raw, cid, mtype = rendered
        return await self.mllp.send(message.evolve(raw=raw, charset="utf-8", content_type="application/hl7-v2",
                                                   control_id=cid, message_type=mtype))

    async def close(self) -> None:
        await self.mllp.close()


def build_listener(listener: Listener, *, context: ConnectorContext, store: MessageStore, domain: DomainLookup,
                   sending_application: str, sending_facility: str) -> Destination:
    """The destination connector of one listener (no connection is opened before the first send)."""
    dest: Destination
    if listener.kind == "webhook":
        dest = WebhookDestination(listener, context)
    elif listener.kind == "soap":
        dest = SoapDestination(listener, context)
    elif listener.kind == "db":
        dest = DbDestination(listener, store)
    elif listener.kind == "amqp":
        dest = AmqpDestination(listener)
    else:
        dest = MllpEventDestination(listener, context, domain, sending_application=sending_application,
                                    sending_facility=sending_facility)
    return dest
