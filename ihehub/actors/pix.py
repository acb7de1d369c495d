"""PIX Manager: ITI-8 Patient Identity Feed and ITI-9 PIX Query on an MLLP channel (``actor: pix-manager``).

* ITI-8 (IHE ITI TF-2a 3.8; HL7 v2.3.1, v2.5 accepted too): ADT A01/A04/A05 register, A08 updates (or
  registers an unknown record), A40 merges MRG-1 into PID-3.  A missing PID-3.4 is filled from the sending
  facility's domain (``facility_domains``).  The reply is an ACK (AA, or AE with ERR: the EMPI error's table
  0357 code and location).  Other events: AR 201.
* ITI-9 (IHE ITI TF-2a 3.9; v2.5): QBP^Q23 -> RSP^K23 with the cross-referenced identifiers in one PID-3
  (QPD-4 restricts the domains).  Known patient without ids in the asked domains: AA, QAK NF.  Unknown id:
  AE, QAK AE, ``ERR||QPD^1^3^1^1|204``.  Unknown domain in QPD-3: ERR at QPD^1^3^1^4; in QPD-4: ERR at
  QPD^1^4^<repetition> (TF-2a 3.9.4.2.2.6).
* ITI-10 (TF-2a 3.10): each change of a cross-reference is sent as ADT^A31 to the configured ``consumers``
  through queued bus destinations (`ihehub.actors.iti10`); patient events go to the configured ``listeners``
  (`ihehub.actors.events`).  Both follow the EMPI's event outbox (`PatientEventPublisher`), so changes made
  outside a feed (API, CLI: manual link, merge, review decisions) are notified too.
* ATNA (ITI TF-2a 3.8.5.1, 3.9.5.1): every feed and query is audited through the hub's `AuditContext`
  (``context.extras["audit"]``) when the repository runs; auditing never fails the transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ihehub.actors.hl7v2 import (
    CX,
    EmpiActor,
    Segments,
    ack,
    build_rsp,
    cx_text,
    facility_key,
    parse_cx,
    pid_record,
    record_pid,
)
from ihehub.actors.iti10 import AuditedNotifications, UpdateNotifier
from ihehub.actors.pdq_visits import pv1_visit
from ihehub.bus.message import Message
from ihehub.channels.base import Destination, Outcome
from ihehub.empi import Domain, DomainType, Empi, EmpiError, Identifier, UnknownDomain, UnknownPatient
from ihehub.hl7 import Header, HL7Error, parse_header

if TYPE_CHECKING:
    from ihehub.actors.events.publisher import PatientEventPublisher

FEED_EVENTS = frozenset({"A01", "A04", "A05", "A08", "A40"})
OUTCOME_INDICATORS = {"AA": 0, "AE": 4}  # MSA-1 -> EventOutcomeIndicator; anything else (AR) is 8

log = logging.getLogger("ihehub.actors.audit")


def _host(address: str | None) -> str | None:
    """The host of an ``ip:port`` / ``[v6]:port`` peer address (the NetworkAccessPointID)."""
    if not address:
        return None
    if address.startswith("["):
        return address[1:].partition("]")[0] or None
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else address


def audit_hl7(extras: dict[str, Any], key: str, header: Header, message: Message, outcome: Outcome, *,
              patients: Sequence[str] = (), query: bytes | None = None, trigger: str | None = None) -> None:
    """Emit the audit of an HL7 v2 transaction this node received (ITI TF-2a 3.8.5.1 / 3.9.5.1 /
    3.21.5.1): the sender (MSH-3|MSH-4 at the peer address) is the Source, this node (MSH-5|MSH-6) the
    Destination.  Does nothing without an ``audit`` service; never raises."""
    audit = extras.get("audit")
    if audit is None:
        return
    try:
        from ihehub.atna import Endpoint

        peer = _host(message.headers.get("mllp.peer") or message.source)
        source = Endpoint(user_id=f"{header.sending_app}|{header.sending_facility}", host=peer)
        destination = audit.me(f"{header.receiving_app}|{header.receiving_facility}")
        audit.emit(key, outcome=OUTCOME_INDICATORS.get(outcome.code, 8), source=source, destination=destination,
                   patients=list(patients), query=query, message_id=header.control_id or None, trigger=trigger,
                   outcome_description=outcome.error)
    except Exception:  # a notification: the transaction's reply goes out whatever happens here
        log.exception("audit: %s of message %s was not emitted", key, header.control_id)


class PixManager(EmpiActor):
    """The PIX Manager actor (ITI-8 feed, ITI-9 query) over the hub's EMPI."""

    actor = "pix-manager"
    notifier: UpdateNotifier | None = None
    publisher: PatientEventPublisher | None = None

    def destinations(self) -> list[tuple[str, str | Destination, dict[str, Any]]]:
        """The ITI-10 consumers as ``(queue, url, options)`` and the patient-event listeners as ``(queue,
        connector, {})`` (queue ``empi-events/<name>``): read by the hub before its dispatchers start."""
        from ihehub.channels.registry import ConnectorContext, Registry

        cfg = self.context.config
        ctx = ConnectorContext(home=str(getattr(cfg, "home", ".")),
                               tls={k: str(getattr(cfg.tls, k)) for k in ("ca", "cert", "key")}
                               if cfg is not None else {})
        out: list[tuple[str, str | Destination, dict[str, Any]]] = []
        notifier = self._notifier()
        for consumer, (queue, url, options) in zip(self.options.consumers, notifier.destinations(), strict=True):
            # ITI-10 notifications are audited when delivered (ITI TF-2a 3.10.5.1)
            inner = Registry().build_destination(name=queue, url=url, options=options, context=ctx)
            out.append((queue, AuditedNotifications(inner, self.context.extras, consumer), {}))
        if self.options.listeners:
            from ihehub.actors.events.listeners import build_listener

            for listener in self.options.listeners:
                out.append((listener.queue, build_listener(
                    listener, context=ctx, store=self.context.store, domain=self._lazy_domain,
                    sending_application=self.options.sending_application or "IHEHUB",
                    sending_facility=self.options.sending_facility or ""), {}))
        return out

    def _lazy_domain(self, key: str) -> Domain | None:
        """Domain lookup for listener connectors, built before the EMPI service exists (hub start order)."""
        empi = self.context.extras.get("empi")
        if not isinstance(empi, Empi):
            return None
        try:
            return empi.domain(key)
        except EmpiError:
            return None

    def _notifier(self) -> UpdateNotifier:
        return UpdateNotifier(channel=self.name, consumers=self.options.consumers, store=self.context.store,
                              domain=self.domain_or_none, wake=self.context.extras.get("wake"),
                              sending_application=self.options.sending_application or "IHEHUB",
                              sending_facility=self.options.sending_facility or "")

    async def start(self) -> None:
        await super().start()
        for c in self.options.consumers:
            for ns in c.domains or ():
                if self.domain_or_none(ns) is None:
                    raise ValueError(f"{self.actor} options: consumers/{c.name}: unknown domain {ns!r}")
        self.notifier = self._notifier() if self.options.consumers else None
        if self.notifier is not None or self.options.listeners:
            # ITI-10 and the listeners follow the EMPI's event outbox, so that changes made by the API, the CLI
            # or another process (manual links, merges, accepted reviews) are notified like feeds
            from ihehub.actors.events.publisher import PatientEventPublisher

            self.publisher = PatientEventPublisher(
                name=self.name, empi=self.empi, store=self.context.store, listeners=self.options.listeners,
                notifier=self.notifier, wake=self.context.extras.get("wake"))
            await self.publisher.start()

    async def stop(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None
        await super().stop()

    async def handle(self, message: Message) -> Outcome:
        try:
            header = parse_header(message.raw, message.charset or "ascii")
        except HL7Error as exc:
            return Outcome(code="AR", error=exc.message, error_code=exc.code, error_location=exc.location)
        seg = Segments(header)
        if header.message_type == "ADT":
            patients: list[str] = []
            out = await self.feed(header, seg, message, patients)
            event = header.trigger or seg.text(seg.field(seg.first("EVN"), 1))
            if event in FEED_EVENTS and patients:
                audit_hl7(self.context.extras, "ITI-8", header, message, out, patients=patients, trigger=event)
            return out
        if header.message_type == "QBP" and header.trigger == "Q23":
            patients = []
            out = await self.query(header, seg, patients)
            audit_hl7(self.context.extras, "ITI-9", header, message, out, patients=patients, query=message.raw)
            return out
        text = f"{header.message_code} is not an ITI-8 feed (ADT) or ITI-9 query (QBP^Q23)"
        return self._ack(header, "AR", "200", "MSH^1^9", text)

    def _ack(self, header: Header, code: str, error_code: str | None = None, location: str | None = None,
             text: str | None = None) -> Outcome:
        body = ack(header, code, error_code=error_code, location=location, text=text, options=self.options)
        return Outcome(code=code, error=text, error_code=error_code, error_location=location, body=body)

    # -- ITI-8 ------------------------------------------------------------------------------------------
    def _identify(self, seg: Segments, reps: list[str], loc: str,
                  prefer: str | None = None) -> tuple[Identifier, list[str], str | None]:
        """The identifier of a PID-3 / MRG-1: the first repetition in a configured source domain.

        A repetition without CX-4 gets the sending facility's domain.  Returns the identifier, the others
        as text, and a national id found in a ``national`` domain.  `UnknownDomain` when none is usable.
        """
        found: list[Identifier] = []
        others: list[str] = []
        national = None
        unknown = ""
        for rep in reps:
            cx: CX = parse_cx(seg, rep)
            if not cx.value or cx.value == '""':
                continue
            if cx.authority is None:
                ns = next((self.options.facility_domains[k] for k in facility_key(seg)
                           if k in self.options.facility_domains), None)
                dom = self.domain_or_none(ns) if ns else None
                if dom is None:
                    unknown = unknown or f"(PID-3.4 empty, no facility_domains entry for {facility_key(seg)[0]})"
                    continue
            else:
                dom = self.domain_or_none(cx.authority)
                if dom is None:
                    unknown = unknown or (cx.authority.namespace or cx.authority.universal_id or "")
                    others.append(rep)
                    continue
            if dom.type is DomainType.NATIONAL:
                national = national or cx.value
            elif dom.type is DomainType.SOURCE:
                found.append(Identifier(value=cx.value, domain=dom.namespace))
            else:
                others.append(rep)
        if not found:
            raise UnknownDomain(unknown or "none", field=loc)
        first = next((f for f in found if f.domain == prefer), found[0])
        others += [str(f) for f in found if f is not first]
        return first, others, national

    async def feed(self, header: Header, seg: Segments, message: Message,
                   patients: list[str] | None = None) -> Outcome:
        """ITI-8; ``patients`` receives the CX of the patient fed (for its audit)."""
        patients = [] if patients is None else patients
        event = header.trigger or seg.text(seg.field(seg.first("EVN"), 1))
        if event not in FEED_EVENTS:
            return self._ack(header, "AR", "201", "MSH^1^9^2",
                             f"event {event or '(none)'} is not an ITI-8 feed event ({', '.join(sorted(FEED_EVENTS))})")
        pid = seg.first("PID")
        if pid is None:
            return self._ack(header, "AE", "100", "PID", "the message has no PID segment")
        patients.extend(r for r in seg.reps(seg.field(pid, 3))[:1] if r)
        try:
            ident, others, national = self._identify(seg, seg.reps(seg.field(pid, 3)), "identifier.domain")
            patients[:] = [cx_text(ident, self.domain_or_none(ident.domain), header)]
            if event == "A40":
                mrg = seg.first("MRG")
                if mrg is None:
                    return self._ack(header, "AE", "100", "MRG", "an A40 merge needs an MRG segment")
                old, _, _ = self._identify(seg, seg.reps(seg.field(mrg, 1)), "subsumed.domain", prefer=ident.domain)
                result: Any = await asyncio.to_thread(self.empi.merge, ident, old, event="A40",
                                                      message_id=message.id)
            else:
                extra = {"other_identifiers": "~".join(others)} if others else {}
                record = pid_record(seg, pid, seg.first("PV1"), pid_value=ident.value,
                                    national_id_type=self.options.national_id_type, extra=extra)
                if national and not record.national_id:
                    record = dataclasses.replace(record, national_id=national)
                visit = pv1_visit(seg, seg.first("PV1"))  # kept for ITI-22
                if event == "A08":
                    result = await asyncio.to_thread(self.empi.update, ident.domain, record, event=event,
                                                     message_id=message.id, create=True, visit=visit)
                else:
                    result = await asyncio.to_thread(self.empi.register, ident.domain, record, event=event,
                                                     message_id=message.id, visit=visit)
        except EmpiError as exc:
            return self._ack(header, "AE", exc.code, exc.location, exc.message)
        if self.publisher is not None and result.events:  # ITI-10 and the listeners: read from the outbox now
            self.publisher.wake()
        return self._ack(header, "AA")

    # -- ITI-9 ------------------------------------------------------------------------------------------
    async def query(self, header: Header, seg: Segments, patients: list[str] | None = None) -> Outcome:
        """ITI-9; ``patients`` receives the CX asked for in QPD-3 (for its audit)."""
        patients = [] if patients is None else patients
        qpd = seg.first("QPD")
        tag = seg.field(qpd, 2)
        if qpd is None:
            return self._rsp(header, None, "AE", [tag, "AE"], error=("100", "QPD", "the query has no QPD segment"))
        cx = parse_cx(seg, seg.field(qpd, 3))
        if cx.value:
            patients.append(seg.field(qpd, 3))
        if not cx.value:
            return self._rsp(header, qpd, "AE", [tag, "AE"],
                             error=("101", "QPD^1^3^1^1", "QPD-3 has no patient identifier"))
        if cx.authority is None or self.domain_or_none(cx.authority) is None:
            name = "" if cx.authority is None else (cx.authority.namespace or cx.authority.universal_id or "")
            return self._rsp(header, qpd, "AE", [tag, "AE"],
                             error=("204", "QPD^1^3^1^4", f"unknown assigning authority {name!r} in QPD-3"))
        targets = []
        for i, rep in enumerate(seg.reps(seg.field(qpd, 4)), start=1):
            hd = parse_cx(seg, rep).authority
            dom = self.domain_or_none(hd) if hd is not None else None
            if dom is None:
                return self._rsp(header, qpd, "AE", [tag, "AE"],
                                 error=("204", f"QPD^1^4^{i}", f"unknown domain {seg.text(rep)!r} in QPD-4"))
            targets.append(dom.namespace)
        qdom = self.empi.domain(cx.authority)
        try:
            xref = await asyncio.to_thread(self.empi.cross_reference, Identifier(value=cx.value, domain=qdom.namespace),
                                           targets or None)
        except UnknownPatient as exc:
            return self._rsp(header, qpd, "AE", [tag, "AE"], error=("204", "QPD^1^3^1^1", exc.message))
        except EmpiError as exc:
            return self._rsp(header, qpd, "AE", [tag, "AE"], error=(exc.code, exc.query_location, exc.message))
        if not xref.identifiers:
            return self._rsp(header, qpd, "AA", [tag, "NF"])
        ids = header.repetition_sep.join(cx_text(i, self.domain_or_none(i.domain), header) for i in xref.identifiers)
        return self._rsp(header, qpd, "AA", [tag, "OK"], hits=[record_pid(1, ids, None, header)])

    def _rsp(self, header: Header, qpd: list[str] | None, code: str, qak: list[str], *,
             hits: list[str] | None = None, error: tuple[str, str | None, str] | None = None) -> Outcome:
        body = build_rsp(header, message_type="RSP^K23^RSP_K23", ack=code, qak=qak, qpd=qpd, hits=hits or (),
                         error=error, options=self.options)
        return Outcome(code=code, error=error[2] if error else None, error_code=error[0] if error else None,
                       error_location=error[1] if error else None, body=body)

