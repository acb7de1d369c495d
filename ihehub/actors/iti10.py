"""ITI-10 PIX Update Notification: ADT^A31 to the PIX consumers a PIX Manager is configured with.

IHE ITI TF-2a 3.10 (PIX Update Notification): when the cross-reference of a patient changes (a record is
registered with a link, updated, merged, linked or unlinked), the PIX Manager sends each subscribed PIX
Consumer an ADT^A31 (HL7 v2.5, structure ADT_A05, TF-2a 3.10.4.1.2) whose PID-3 lists every identifier of
the patient in the domains that consumer asked for, PID-5 a single space (no demographics, TF-2a
3.10.4.1.2.4), EVN, and PV1 with PV1-2 = ``N`` (not applicable).

Transport: each notification is one bus `Message` on the channel ``<pix channel>-iti10`` (content type
``application/hl7-v2``, message type ``ADT^A31``) with one delivery to the consumer's destination, queue
``<pix channel>-iti10/<consumer name>``.  The hub builds those destinations from `destinations()` at start,
so both queue back-ends deliver, retry and resend them like a channel's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ihehub.actors.hl7v2 import PixConsumer, cx_text, esc
from ihehub.bus.message import Message
from ihehub.bus.store import MessageStore
from ihehub.empi import Domain, DomainType, EventType, Identifier, PatientEvent
from ihehub.hl7 import Header, hl7_timestamp, new_control_id

log = logging.getLogger("ihehub.actors.iti10")

CHANNEL_SUFFIX = "-iti10"
# events whose cross-reference an A31 carries (a retired patient — ``deleted`` — has none left)
NOTIFY_EVENTS = frozenset({EventType.REGISTERED, EventType.UPDATED, EventType.MERGED, EventType.UNMERGED,
                           EventType.LINKED, EventType.UNLINKED})

_HEADER = Header(field_sep="|", encoding_chars="^~\\&", sending_app="", sending_facility="", receiving_app="",
                 receiving_facility="", datetime="", message_type="ADT", trigger="A31", structure="ADT_A05",
                 control_id="", processing_id="P", version="2.5", charset="utf-8", charset_field="", text="")


def _msh(consumer: PixConsumer, message_type: str, *, sending_application: str, sending_facility: str,
         control_id: str, timestamp: str) -> str:
    h = _HEADER
    return "|".join(["MSH", h.encoding_chars, esc(sending_application, h), esc(sending_facility, h),
                     esc(consumer.receiving_application, h), esc(consumer.receiving_facility, h), timestamp, "",
                     message_type, control_id, "P", "2.5"])


def build_a31(ids: Sequence[tuple[Identifier, Domain | None]], consumer: PixConsumer, *, sending_application: str,
              sending_facility: str, control_id: str, timestamp: str) -> bytes:
    """The ADT^A31^ADT_A05 of IHE ITI TF-2a 3.10.4.1.2: MSH, EVN, PID (PID-3 the ids, PID-5 " "), PV1 (N)."""
    h = _HEADER
    msh = _msh(consumer, "ADT^A31^ADT_A05", sending_application=sending_application,
               sending_facility=sending_facility, control_id=control_id, timestamp=timestamp)
    pid3 = h.repetition_sep.join(cx_text(i, d, h) for i, d in ids)
    segs = [msh, f"EVN|A31|{timestamp}", f"PID|||{pid3}|| ", "PV1||N"]
    return ("\r".join(segs) + "\r").encode("utf-8")


def build_a40(ids: Sequence[tuple[Identifier, Domain | None]], subsumed: tuple[Identifier, Domain | None],
              consumer: PixConsumer, *, sending_application: str, sending_facility: str, control_id: str,
              timestamp: str) -> bytes:
    """ADT^A40^ADT_A39 (HL7 v2.5 section 3.3.40, the message of IHE ITI TF-2a 3.8.4.2 in v2.5): MSH, EVN,
    PID with the surviving patient's identifiers in PID-3 (PID-5 " ", as in the A31), MRG-1 the subsumed one."""
    h = _HEADER
    msh = _msh(consumer, "ADT^A40^ADT_A39", sending_application=sending_application,
               sending_facility=sending_facility, control_id=control_id, timestamp=timestamp)
    pid3 = h.repetition_sep.join(cx_text(i, d, h) for i, d in ids)
    segs = [msh, f"EVN|A40|{timestamp}", f"PID|||{pid3}|| ", f"MRG|{cx_text(subsumed[0], subsumed[1], h)}"]
    return ("\r".join(segs) + "\r").encode("utf-8")


def select_identifiers(ids: Sequence[Identifier], consumer: PixConsumer, domain: Callable[[str], Domain | None]
                       ) -> list[tuple[Identifier, Domain | None]]:
    """The identifiers of ``ids`` in the consumer's domains (all when it names none), with their domains."""
    picked = []
    for ident in ids:
        dom = domain(ident.domain)
        if consumer.domains is not None:
            names = {ident.domain} | ({dom.namespace, dom.universal_id or ""} if dom is not None else set())
            if not names & set(consumer.domains):
                continue
        picked.append((ident, dom))
    return picked


def _parse_ident(text: str) -> Identifier | None:
    value, sep, domain = str(text).rpartition("^^^")
    return Identifier(value=value, domain=domain) if sep and value and domain else None


class UpdateNotifier:
    """Turns the EMPI's `PatientEvent`s into A31 messages queued to each consumer (TF-2a 3.10.4.1)."""

    def __init__(self, *, channel: str, consumers: Sequence[PixConsumer], store: MessageStore,
                 domain: Callable[[str], Domain | None], wake: Callable[[Sequence[str]], None] | None,
                 sending_application: str, sending_facility: str) -> None:
        self.channel = channel + CHANNEL_SUFFIX
        self.consumers = tuple(consumers)
        self.store = store
        self.domain = domain
        self.wake = wake
        self.sending_application = sending_application
        self.sending_facility = sending_facility

    def queue(self, consumer: PixConsumer) -> str:
        return f"{self.channel}/{consumer.name}"

    def destinations(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(queue, url, options)`` per consumer: the hub's actor-destination hook builds these."""
        return [(self.queue(c), c.url, dict(c.options)) for c in self.consumers]

    def cross_references(self, events: Iterable[PatientEvent]) -> dict[str, tuple[Identifier, ...]]:
        """Enterprise id -> its identifiers after the change: the last event about a patient wins, and the
        other patient of a link, unlink, merge or unmerge gets its own entry (``detail.other_identifiers``)."""
        out: dict[str, tuple[Identifier, ...]] = {}
        for ev in events:
            if ev.type not in NOTIFY_EVENTS:
                continue
            out.pop(ev.patient, None)
            out[ev.patient] = tuple(ev.identifiers)
            others = ev.detail.get("other_identifiers") if ev.detail else None
            if ev.other_patient and isinstance(others, list):
                parsed = tuple(i for i in (_parse_ident(t) for t in others) if i is not None)
                if ev.other_patient not in out:
                    out[ev.other_patient] = parsed
        return out

    def messages(self, events: Iterable[PatientEvent]) -> list[tuple[Message, PixConsumer]]:
        """One A31 per consumer and changed patient that has identifiers in the consumer's domains."""
        out = []
        for _patient, ids in self.cross_references(events).items():
            for consumer in self.consumers:
                picked = select_identifiers(ids, consumer, self.domain)
                if all(d is not None and d.type is DomainType.ENTERPRISE for _, d in picked):
                    continue  # nothing but the enterprise id left (a merged-away patient): no A31
                cid = new_control_id()
                raw = build_a31(picked, consumer, sending_application=self.sending_application,
                                sending_facility=self.sending_facility, control_id=cid, timestamp=hl7_timestamp())
                out.append((Message(channel=self.channel, raw=raw, content_type="application/hl7-v2",
                                    charset="utf-8", control_id=cid, message_type="ADT^A31"), consumer))
        return out

    async def notify(self, events: Iterable[PatientEvent]) -> int:
        """Queue the A31s of ``events``; returns how many.  A store error is logged, never raised: the
        feed was committed and acknowledged by then (the events stay in ``empi_events``)."""
        sent: list[str] = []
        for msg, consumer in self.messages(events):
            try:
                await self.store.append(msg, [consumer.name])
            except Exception as exc:
                log.error("ITI-10: could not queue the A31 for %s to %s: %s", msg.control_id, consumer.name, exc)
                continue
            sent.append(self.queue(consumer))
        if sent and self.wake is not None:
            self.wake(sorted(set(sent)))
        return len(sent)


class AuditedNotifications:
    """The destination of one PIX Consumer, auditing each ITI-10 notification it delivered or failed to
    deliver (ITI TF-2a 3.10.5.1: the PIX Manager is the Source, the consumer the Destination, the patient's
    identifiers the participant objects).  Everything else is the wrapped connector's (retry, response)."""

    def __init__(self, inner: Any, extras: Any, consumer: PixConsumer) -> None:
        self.inner = inner
        self.name = inner.name
        self.extras = extras
        self.consumer = consumer

    async def send(self, message: Message) -> Any:
        from ihehub.channels.base import DeliveryError

        try:
            response = await self.inner.send(message)
        except DeliveryError as exc:
            self._audit(message, 8, str(exc))
            raise
        self._audit(message, 0 if getattr(response, "ok", True) else 8, getattr(response, "error", None))
        return response

    async def close(self) -> None:
        await self.inner.close()

    def _audit(self, message: Message, outcome: int, error: str | None) -> None:
        audit = self.extras.get("audit") if hasattr(self.extras, "get") else None
        if audit is None:
            return
        try:
            from urllib.parse import urlsplit

            from ihehub.atna import Endpoint
            from ihehub.hl7 import parse_header

            header = parse_header(message.raw, message.charset or "utf-8")
            patients = []
            for seg in message.raw.decode(message.charset or "utf-8", "replace").split("\r"):
                if seg.startswith("PID" + header.field_sep):
                    fields = seg.split(header.field_sep)
                    patients = [r for r in (fields[3].split(header.repetition_sep) if len(fields) > 3 else ()) if r]
            peer = Endpoint(user_id=f"{header.receiving_app}|{header.receiving_facility}",
                            host=urlsplit(self.consumer.url).hostname)
            audit.emit("ITI-10", source=audit.me(f"{header.sending_app}|{header.sending_facility}"),
                       destination=peer, patients=patients, message_id=header.control_id or None,
                       outcome=outcome, outcome_description=error)
        except Exception:  # auditing never fails a delivery
            log.exception("audit: ITI-10 to %s was not emitted", self.consumer.name)
