"""SOAP faults (SOAP 1.2 Part 1 section 5.4; SOAP 1.1 section 4.4) and their HTTP status.

A `SoapFault` is raised anywhere below the HTTP route and turned into a fault envelope there.  SOAP 1.2
HTTP binding (Part 2 section 7.5.2): env:Sender → 400, every other code → 500; SOAP 1.1 always 500.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

__all__ = ["WSA_FAULT_ACTION", "SoapFault"]

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
WSA_FAULT_ACTION = "http://www.w3.org/2005/08/addressing/fault"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_SOAP11_CODES = {"Sender": "Client", "Receiver": "Server", "MustUnderstand": "MustUnderstand",
                 "VersionMismatch": "VersionMismatch", "DataEncodingUnknown": "Client"}


@dataclass
class SoapFault(Exception):
    """``code``: Sender | Receiver | MustUnderstand | VersionMismatch; ``subcode``: (namespace, local name),
    e.g. ``(WSA, "ActionNotSupported")`` or ``("urn:ihe:iti:2007", "XDSMissingDocument")``."""

    code: str
    reason: str
    subcode: tuple[str, str] | None = None
    not_understood: list[etree.QName] = field(default_factory=list)  # SOAP 1.2 5.4.8 NotUnderstood headers

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    @property
    def http_status(self) -> int:
        return 400 if self.code == "Sender" else 500

    def body(self, soap_ns: str = SOAP12) -> etree._Element:
        """The env:Fault element for the envelope version ``soap_ns``."""
        if soap_ns == SOAP11:
            fault = etree.Element(f"{{{SOAP11}}}Fault", nsmap={"env": SOAP11})
            code = etree.SubElement(fault, "faultcode")
            code.text = f"env:{_SOAP11_CODES.get(self.code, 'Server')}"
            if self.subcode is not None:
                code.text += f".{self.subcode[1]}"
            etree.SubElement(fault, "faultstring").text = self.reason
            return fault
        fault = etree.Element(f"{{{SOAP12}}}Fault", nsmap={"env": SOAP12})
        code = etree.SubElement(fault, f"{{{SOAP12}}}Code")
        etree.SubElement(code, f"{{{SOAP12}}}Value").text = f"env:{self.code}"
        if self.subcode is not None:
            sub = etree.SubElement(code, f"{{{SOAP12}}}Subcode")
            # the QName's prefix is declared on the Value itself: it survives re-parenting into any envelope
            # (lxml drops a declaration an ancestor already makes, so WS-Addressing keeps the envelope's "wsa")
            prefix = "wsa" if self.subcode[0] == WSA else "sub"
            value = etree.SubElement(sub, f"{{{SOAP12}}}Value", nsmap={prefix: self.subcode[0]})
            value.text = f"{prefix}:{self.subcode[1]}"
        reason = etree.SubElement(fault, f"{{{SOAP12}}}Reason")
        text = etree.SubElement(reason, f"{{{SOAP12}}}Text")
        text.set(XML_LANG, "en")
        text.text = self.reason
        return fault
