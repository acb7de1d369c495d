"""SOAP envelopes (SOAP 1.2 Part 1 section 5, SOAP 1.1 section 4) with WS-Addressing 1.0 headers.

IHE ITI TF-2x V.3.2: requests carry wsa:Action and wsa:MessageID (and usually wsa:To / wsa:ReplyTo);
the response's wsa:Action is the request's with ``Response`` appended (e.g.
``urn:ihe:iti:2007:RegistryStoredQueryResponse``) and its wsa:RelatesTo is the request's MessageID.
A header block we do not process that carries ``mustUnderstand="1"``/``"true"`` is answered with an
env:MustUnderstand fault (SOAP 1.2 Part 1 section 5.2.3).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from ihehub.soap.fault import SOAP11, SOAP12, WSA, WSA_FAULT_ACTION, SoapFault

__all__ = ["SOAP11_NS", "SOAP12_NS", "WSA_ANONYMOUS", "WSA_NS", "Addressing", "Envelope", "build_envelope",
           "fault_envelope", "parse_envelope", "reply_action"]

SOAP12_NS = SOAP12
SOAP11_NS = SOAP11
WSA_NS = WSA
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
CONTENT_TYPES = {SOAP12: "application/soap+xml", SOAP11: "text/xml"}
_WSA_HEADERS = {"Action", "MessageID", "To", "ReplyTo", "RelatesTo", "From", "FaultTo"}
_TRUE = {"1", "true"}


@dataclass
class Addressing:
    """The WS-Addressing 1.0 message information headers of one message."""

    action: str | None = None
    message_id: str | None = None
    to: str | None = None
    reply_to: str | None = None
    relates_to: str | None = None


@dataclass
class Envelope:
    soap_ns: str  # SOAP12_NS or SOAP11_NS
    header: etree._Element | None
    body: etree._Element  # the first child of env:Body (the payload)
    addressing: Addressing


def reply_action(action: str) -> str:
    """IHE: the response Action is the request Action + ``Response``."""
    return f"{action}Response"


def _text(header: etree._Element, local: str) -> str | None:
    el = header.find(f"{{{WSA}}}{local}")
    if el is None:
        return None
    if local in ("ReplyTo", "From", "FaultTo"):
        el = el.find(f"{{{WSA}}}Address")
        if el is None:
            return None
    return (el.text or "").strip() or None


def parse_envelope(root: etree._Element, *, understood: Iterable[str] = ()) -> Envelope:
    """Split ``root`` into header, payload and addressing; `SoapFault` when it is not a SOAP envelope, its
    body is empty, or a header we do not understand is marked mustUnderstand.  ``understood``: extra header
    QNames (Clark notation) the caller processes."""
    qn = etree.QName(root)
    if qn.localname != "Envelope" or qn.namespace not in (SOAP12, SOAP11):
        raise SoapFault("VersionMismatch" if qn.localname == "Envelope" else "Sender",
                        f"not a SOAP 1.2 or 1.1 envelope: {{{qn.namespace}}}{qn.localname}")
    ns = qn.namespace
    header = root.find(f"{{{ns}}}Header")
    body = root.find(f"{{{ns}}}Body")
    if body is None or len(body) == 0:
        raise SoapFault("Sender", "the SOAP envelope has no Body payload")
    payload = body[0]
    addressing = Addressing()
    if header is not None:
        known = set(understood)
        missing = []
        for block in header:
            if not isinstance(block.tag, str):
                continue
            bq = etree.QName(block)
            if bq.namespace == WSA and bq.localname in _WSA_HEADERS:
                continue
            if block.tag in known:
                continue
            if (block.get(f"{{{ns}}}mustUnderstand") or "").strip() in _TRUE:
                missing.append(bq)
        if missing:
            names = ", ".join(q.text for q in missing)
            raise SoapFault("MustUnderstand", f"header block(s) not understood: {names}", not_understood=missing)
        addressing = Addressing(action=_text(header, "Action"), message_id=_text(header, "MessageID"),
                                to=_text(header, "To"), reply_to=_text(header, "ReplyTo"),
                                relates_to=_text(header, "RelatesTo"))
    return Envelope(soap_ns=ns, header=header, body=payload, addressing=addressing)


def build_envelope(payload: etree._Element, *, soap_ns: str = SOAP12, action: str | None = None,
                   relates_to: str | None = None, to: str | None = None, message_id: str | None = None,
                   extra_headers: Sequence[etree._Element] = ()) -> bytes:
    """The serialised envelope around ``payload`` with WS-Addressing headers (mustUnderstand on Action, as
    the IHE ITI TF-2x V.3.2.1 examples do).  A new ``urn:uuid:`` MessageID when none is given."""
    env = etree.Element(f"{{{soap_ns}}}Envelope", nsmap={"env": soap_ns, "wsa": WSA})
    header = etree.SubElement(env, f"{{{soap_ns}}}Header")
    if action is not None:
        el = etree.SubElement(header, f"{{{WSA}}}Action")
        el.set(f"{{{soap_ns}}}mustUnderstand", "1" if soap_ns == SOAP11 else "true")
        el.text = action
        etree.SubElement(header, f"{{{WSA}}}MessageID").text = message_id or uuid.uuid4().urn
        if relates_to is not None:
            etree.SubElement(header, f"{{{WSA}}}RelatesTo").text = relates_to
        if to is not None:
            etree.SubElement(header, f"{{{WSA}}}To").text = to
    for extra in extra_headers:
        header.append(extra)
    body = etree.SubElement(env, f"{{{soap_ns}}}Body")
    body.append(payload)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def fault_envelope(fault: SoapFault, *, soap_ns: str = SOAP12, relates_to: str | None = None) -> bytes:
    """The fault message: wsa:Action is the WS-Addressing fault action (WS-Addressing SOAP Binding 6)."""
    extra = []
    if soap_ns == SOAP12:
        for q in fault.not_understood:  # SOAP 1.2 Part 1 5.4.8
            nu = etree.Element(f"{{{SOAP12}}}NotUnderstood", nsmap={"nu": q.namespace} if q.namespace else None)
            nu.set("qname", f"nu:{q.localname}" if q.namespace else q.localname)
            extra.append(nu)
    return build_envelope(fault.body(soap_ns), soap_ns=soap_ns, action=WSA_FAULT_ACTION, relates_to=relates_to,
                          extra_headers=extra)
