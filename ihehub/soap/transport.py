"""From HTTP request bytes to a parsed SOAP message (SOAP 1.2 Part 2 section 7; SOAP 1.1 section 6).

``Content-Type`` decides the framing: ``multipart/related`` (MTOM/XOP, the root part is the envelope),
``application/soap+xml`` (SOAP 1.2) or ``text/xml`` (SOAP 1.1).  The action is taken from wsa:Action,
else from the Content-Type ``action`` parameter (SOAP 1.2) or the SOAPAction header (SOAP 1.1).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from ihehub.soap.envelope import Envelope, parse_envelope
from ihehub.soap.fault import SOAP12, SoapFault
from ihehub.soap.mtom import Attachment, parse_content_type, read_multipart, xop_attachment
from ihehub.soap.xmlsafe import DEFAULT_MAX_XML, XmlRefused, parse_xml

__all__ = ["Limits", "SoapRequest", "read_request"]


@dataclass(frozen=True)
class Limits:
    max_xml: int = DEFAULT_MAX_XML  # the envelope (root part, or the whole non-MTOM body)
    memory_threshold: int = 1024 * 1024  # attachments above this spill to a file in spool_dir
    spool_dir: Path | None = None


@dataclass
class SoapRequest:
    envelope: Envelope
    action: str | None
    mtom: bool
    attachments: dict[str, Attachment] = field(default_factory=dict)

    @property
    def soap_ns(self) -> str:
        return self.envelope.soap_ns

    @property
    def payload(self) -> etree._Element:
        return self.envelope.body

    def content(self, element: etree._Element) -> Attachment:
        """The bytes of an element (base64Binary) that holds either an ``xop:Include`` or inline base64 text
        (MTOM 3.2: a receiver accepts both); `SoapFault` on a missing part or invalid base64."""
        att = xop_attachment(element, self.attachments)
        if att is not None:
            return att
        try:
            data = base64.b64decode("".join((element.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise SoapFault("Sender", f"element {etree.QName(element).localname} holds invalid base64") from None
        return Attachment.from_bytes(data)

    def discard(self) -> None:
        """Remove the attachments' spill files that were not moved elsewhere."""
        for a in self.attachments.values():
            a.discard()


async def _read_all(stream: AsyncIterator[bytes], limit: int) -> bytes:
    buf = bytearray()
    async for chunk in stream:
        buf += chunk
        if len(buf) > limit:
            raise SoapFault("Sender", f"the SOAP message exceeds the limit of {limit} bytes")
    return bytes(buf)


async def read_request(content_type: str, stream: AsyncIterator[bytes], *, soap_action: str | None = None,
                       limits: Limits = Limits(), understood: Iterable[str] = ()) -> SoapRequest:
    """Read and parse one SOAP request; `SoapFault` on anything unacceptable (files already removed)."""
    mime, params = parse_content_type(content_type or "")
    attachments: dict[str, Attachment] = {}
    if mime == "multipart/related":
        if params.get("type", "application/xop+xml").lower() != "application/xop+xml":
            raise SoapFault("Sender", f"multipart/related of type {params.get('type')!r}: only MTOM "
                                      "(application/xop+xml) is supported")
        parts = await read_multipart(stream, params.get("boundary", ""), start=params.get("start"),
                                     max_root=limits.max_xml, memory_threshold=limits.memory_threshold,
                                     spool_dir=limits.spool_dir)
        attachments = parts.attachments
        data = parts.root
        _, root_params = parse_content_type(parts.root_type or "application/xop+xml")
        inner = (root_params.get("type") or params.get("start-info") or "application/soap+xml").lower()
        mtom = True
    elif mime in ("application/soap+xml", "text/xml", "application/xml"):
        data = await _read_all(stream, limits.max_xml)
        inner, mtom = mime, False
    else:
        raise SoapFault("Sender", f"unsupported Content-Type {mime!r} for a SOAP message")
    try:
        try:
            root = parse_xml(data, max_size=limits.max_xml)
        except XmlRefused as exc:
            raise SoapFault("Sender", str(exc)) from None
        env = parse_envelope(root, understood=understood)
        if inner == "application/soap+xml" and env.soap_ns != SOAP12:
            raise SoapFault("VersionMismatch", "application/soap+xml carries a SOAP 1.1 envelope")
        action = env.addressing.action or params.get("action") or (soap_action or "").strip('"') or None
        if env.soap_ns == SOAP12 and env.addressing.action and params.get("action") and \
                params["action"] != env.addressing.action:
            raise SoapFault("Sender", "the Content-Type action parameter differs from wsa:Action")
    except BaseException:
        for a in attachments.values():
            a.discard()
        raise
    return SoapRequest(envelope=env, action=action, mtom=mtom, attachments=attachments)
