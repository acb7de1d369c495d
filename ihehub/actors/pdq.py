"""PDQ Supplier: ITI-21 Patient Demographics Query on an MLLP channel (``actor: pdq-supplier``).

IHE ITI TF-2a 3.21 (HL7 v2.5 chapter 5 query/response):

* QBP^Q22 -> RSP^K22.  QPD-3 is a list of ``@PID.<field>[.<component>[.<sub>]]^value`` pairs; ``*`` is a
  wildcard.  QPD-8 (what domains returned) restricts the patients and their PID-3 identifiers; an unknown
  domain there is AE with ERR 204 at QPD^1^8^<repetition>.  No match: AA, QAK NF.
* RCP-2 quantity limit (``10^RD``): at most that many PIDs per reply; when more remain the reply ends with
  ``DSC|<pointer>|I`` and QAK-4/5/6 give the hit counts.  The consumer asks for the next page by sending the
  same query with DSC-1 = the pointer (TF-2a 3.21.4.1.3.2); the cursor is kept per query tag (QPD-2).
* QCN^J01 (QID-1 the query tag) cancels a query: its cursor is dropped; answered with ACK^J01.
* ITI-22 (ITI TF-2a 3.22): QBP^ZV1 -> RSP^ZV2 with the same rules plus the visit fields of QPD-3
  (``@PV1.2``, ``@PV1.3.1``, ``@PV1.7.1``, ``@PV1.10``, ``@PV1.19.1``, see `ihehub.actors.pdq_visits`); one
  PID/PV1 pair per matching visit, paged and cancelled like ITI-21.
* ATNA (ITI TF-2a 3.21.5.1): every query is audited (110112, the QBP base64 and MSH-10, the patients
  returned) through the hub's `AuditContext` when the repository runs; auditing never fails the query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections import OrderedDict
from typing import Any

from ihehub.actors.base import ActorContext
from ihehub.actors.hl7v2 import EmpiActor, Segments, ack, build_rsp, comp, cx_text, parse_hd, record_pid
from ihehub.actors.pdq_visits import VISIT_FIELDS, pv1_segment
from ihehub.actors.pix import audit_hl7
from ihehub.bus.message import Message
from ihehub.channels.base import Outcome
from ihehub.empi import (
    HD,
    EmpiError,
    FindResult,
    Identifier,
    PatientMatch,
    PatientQuery,
    VisitMatch,
    VisitQuery,
    VisitResult,
)
from ihehub.hl7 import Header, HL7Error, parse_header

# QPD-3 field name (@PID.x[.y]) -> PatientQuery attribute.
QUERY_FIELDS = {
    "PID.3": "identifier", "PID.3.1": "identifier",
    "PID.5": "family", "PID.5.1": "family", "PID.5.1.1": "family", "PID.5.2": "given",
    "PID.6": "mother_maiden_name", "PID.6.1": "mother_maiden_name", "PID.6.1.1": "mother_maiden_name",
    "PID.7": "birth_date", "PID.7.1": "birth_date",
    "PID.8": "sex",
    "PID.11.1": "line1", "PID.11.1.1": "line1", "PID.11.3": "city", "PID.11.5": "postcode",
    "PID.13": "phone", "PID.13.1": "phone", "PID.14": "phone", "PID.14.1": "phone",
    "PID.19": "national_id",
}
AUTHORITY_FIELDS = {"PID.3.4": 0, "PID.3.4.1": 1, "PID.3.4.2": 2, "PID.3.4.3": 3}


class QueryError(Exception):
    def __init__(self, code: str, location: str, text: str) -> None:
        super().__init__(text)
        self.code, self.location, self.text = code, location, text


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Cursor:
    """Where a paged query stands: what was asked, the next offset, the pointer handed out."""

    pointer: str
    query: PatientQuery
    domains: tuple[str, ...]
    offset: int
    limit: int
    at: float
    visit: VisitQuery | None = None  # ITI-22


class PdqSupplier(EmpiActor):
    """The PDQ Supplier actor (ITI-21) over the hub's EMPI."""

    actor = "pdq-supplier"

    def __init__(self, *, name: str, options: dict[str, Any], context: ActorContext) -> None:
        super().__init__(name=name, options=options, context=context)
        # (MSH-3, MSH-4, query tag) -> cursor: two consumers reusing a tag never see each other's pages
        self._cursors: OrderedDict[tuple[str, str, str], Cursor] = OrderedDict()

    async def handle(self, message: Message) -> Outcome:
        try:
            header = parse_header(message.raw, message.charset or "ascii")
        except HL7Error as exc:
            return Outcome(code="AR", error=exc.message, error_code=exc.code, error_location=exc.location)
        seg = Segments(header)
        if header.message_type == "QCN" and header.trigger == "J01":
            tag = seg.field(seg.first("QID"), 1)
            if not tag:
                return self._ack(header, "AE", "101", "QID^1^1", "QCN^J01 needs QID-1, the query tag")
            self._cursors.pop((header.sending_app, header.sending_facility, tag), None)
            return self._ack(header, "AA")
        if header.message_type == "QBP" and header.trigger == "Q22":
            patients: list[str] = []
            out = await self.query(header, seg, patients)
            audit_hl7(self.context.extras, "ITI-21", header, message, out, patients=patients, query=message.raw)
            return out
        if header.message_type == "QBP" and header.trigger == "ZV1":
            patients = []
            out = await self.query(header, seg, patients, visits=True)
            audit_hl7(self.context.extras, "ITI-22", header, message, out, patients=patients, query=message.raw)
            return out
        return self._ack(header, "AR", "200", "MSH^1^9",
                         f"{header.message_code} is not an ITI-21 (QBP^Q22) or ITI-22 (QBP^ZV1) query or a cancel "
                         "(QCN^J01)")

    def _ack(self, header: Header, code: str, error_code: str | None = None, location: str | None = None,
             text: str | None = None) -> Outcome:
        body = ack(header, code, error_code=error_code, location=location, text=text, options=self.options)
        return Outcome(code=code, error=text, error_code=error_code, error_location=location, body=body)

    def _parse(self, seg: Segments, qpd: list[str], *, visits: bool = False
               ) -> tuple[PatientQuery, tuple[str, ...], VisitQuery | None]:
        values: dict[str, Any] = {}
        visit_values: dict[str, str] = {}
        auth = ["", "", ""]
        for i, rep in enumerate(seg.reps(seg.field(qpd, 3)), start=1):
            parts = seg.comps(rep)
            name, value = seg.text(comp(parts, 1)).lstrip("@"), seg.text(comp(parts, 2))
            if not name:
                continue
            if name in AUTHORITY_FIELDS:
                idx = AUTHORITY_FIELDS[name]
                if idx == 0:
                    hd = parse_hd(seg, comp(parts, 2))
                    auth = [hd.namespace or "", hd.universal_id or "", hd.universal_id_type or ""] if hd else auth
                else:
                    auth[idx - 1] = value
                continue
            if visits and name in VISIT_FIELDS:
                if value:
                    visit_values[VISIT_FIELDS[name]] = value
                continue
            attr = QUERY_FIELDS.get(name)
            if attr is None:
                known = sorted(QUERY_FIELDS) + sorted(AUTHORITY_FIELDS) + (sorted(VISIT_FIELDS) if visits else [])
                raise QueryError("207", f"QPD^1^3^{i}", f"query field @{name} is not supported; supported: "
                                 f"{', '.join('@' + k for k in known)}")
            if value:
                values[attr] = value
        ident = None
        if "identifier" in values:
            hd = HD(namespace=auth[0] or None, universal_id=auth[1] or None)
            if not (hd.namespace or hd.universal_id):
                raise QueryError("101", "QPD^1^3", "@PID.3.1 needs its assigning authority (@PID.3.4.1 or .2)")
            dom = self.domain_or_none(hd)
            if dom is None:
                raise QueryError("204", "QPD^1^3", f"unknown assigning authority {auth[0] or auth[1]!r} in QPD-3")
            ident = Identifier(value=values.pop("identifier"), domain=dom.namespace)
        query = PatientQuery(identifier=ident, **values)
        domains = []
        for i, rep in enumerate(seg.reps(seg.field(qpd, 8)), start=1):
            hd = parse_hd(seg, comp(seg.comps(rep), 4))
            dom = self.domain_or_none(hd) if hd is not None else None
            if dom is None:
                raise QueryError("204", f"QPD^1^8^{i}", f"unknown domain {seg.text(rep)!r} in QPD-8")
            domains.append(dom.namespace)
        return query, tuple(domains), VisitQuery(**visit_values) if visits else None

    def _limit(self, seg: Segments) -> int:
        rcp2 = seg.comps(seg.field(seg.first("RCP"), 2))
        qty, unit = seg.text(comp(rcp2, 1)), seg.text(comp(rcp2, 2)) or "RD"
        if not qty:
            return self.empi.config.find_limit
        if not qty.isdigit() or int(qty) < 1 or unit != "RD":
            raise QueryError("102", "RCP^1^2", f"RCP-2 quantity limit {qty}^{unit} must be a positive count in RD")
        return int(qty)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._cursors.items() if now - c.at > self.options.cursor_ttl]:
            del self._cursors[key]
        while len(self._cursors) > self.options.max_cursors:
            self._cursors.popitem(last=False)

    async def query(self, header: Header, seg: Segments, patients: list[str] | None = None, *,
                    visits: bool = False) -> Outcome:
        """ITI-21 (ITI-22 when ``visits``); ``patients`` receives the identifiers of every patient returned
        (for the audit)."""
        rsp = "RSP^ZV2^RSP_ZV2" if visits else "RSP^K22^RSP_K21"
        patients = [] if patients is None else patients
        qpd = seg.first("QPD")
        tag = seg.field(qpd, 2)
        if qpd is None or not tag:
            return self._rsp(header, qpd, "AE", [tag, "AE"], rsp=rsp,
                             error=("101", "QPD^1^2", "the query needs a QPD segment with a query tag (QPD-2)"))
        self._expire()
        key = (header.sending_app, header.sending_facility, tag)
        pointer = seg.text(seg.field(seg.first("DSC"), 1))
        try:
            if pointer:
                cur = self._cursors.get(key)
                if cur is None or cur.pointer != pointer:
                    raise QueryError("204", "DSC^1^1", f"continuation pointer {pointer!r} is not known for query "
                                     f"tag {tag!r} (finished, cancelled or expired)")
                if (cur.visit is not None) != visits:
                    raise QueryError("204", "DSC^1^1", f"continuation pointer {pointer!r} belongs to another kind "
                                     "of query (ITI-21 / ITI-22)")
                query, domains, offset, limit, vq = cur.query, cur.domains, cur.offset, cur.limit, cur.visit
            else:
                query, domains, vq = self._parse(seg, qpd, visits=visits)
                limit, offset = self._limit(seg), 0
                self._cursors.pop(key, None)
            found: FindResult | VisitResult
            if vq is not None:
                found = await asyncio.to_thread(self.empi.find_visits, query, vq, domains=domains or None,
                                                limit=limit, offset=offset)
            else:
                found = await asyncio.to_thread(self.empi.find, query, domains=domains or None, limit=limit,
                                                offset=offset)
        except QueryError as exc:
            return self._rsp(header, qpd, "AE", [tag, "AE"], rsp=rsp, error=(exc.code, exc.location, exc.text))
        except EmpiError as exc:
            loc = "QPD^1^3" if exc.field != "what_domains" else "QPD^1^8"
            return self._rsp(header, qpd, "AE", [tag, "AE"], rsp=rsp, error=(exc.code, loc, exc.message))
        if not found.matches:
            self._cursors.pop(key, None)
            return self._rsp(header, qpd, "AA", [tag, "NF", seg.field(qpd, 1), str(found.total), "0", "0"], rsp=rsp)
        hits = []
        matches: tuple[PatientMatch | VisitMatch, ...] = found.matches
        for n, m in enumerate(matches, start=offset + 1):
            ids = header.repetition_sep.join(cx_text(i, self.domain_or_none(i.domain), header) for i in m.identifiers)
            hits.append(record_pid(n, ids, m.record.record, header))
            if isinstance(m, VisitMatch):
                hits.append(pv1_segment(m.visit, n, header))
            patients.extend(cx_text(i, self.domain_or_none(i.domain), header) for i in m.identifiers)
        remaining = max(0, found.total - offset - len(found.matches))
        dsc = None
        if remaining:
            dsc = secrets.token_hex(8)
            self._cursors[key] = Cursor(pointer=dsc, query=query, domains=domains, offset=offset + len(found.matches),
                                        limit=limit, at=time.monotonic(), visit=vq)
        else:
            self._cursors.pop(key, None)
        qak = [tag, "OK", seg.field(qpd, 1), str(found.total), str(len(found.matches)), str(remaining)]
        return self._rsp(header, qpd, "AA", qak, hits=hits, dsc=dsc, rsp=rsp)

    def _rsp(self, header: Header, qpd: list[str] | None, code: str, qak: list[str], *,
             hits: list[str] | None = None, error: tuple[str, str | None, str] | None = None,
             dsc: str | None = None, rsp: str = "RSP^K22^RSP_K21") -> Outcome:
        body = build_rsp(header, message_type=rsp, ack=code, qak=qak, qpd=qpd, hits=hits or (),
                         error=error, dsc=dsc, options=self.options)
        return Outcome(code=code, error=error[2] if error else None, error_code=error[0] if error else None,
                       error_location=error[1] if error else None, body=body)
