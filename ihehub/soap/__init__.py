"""Our own SOAP stack on lxml: safe XML parsing, SOAP 1.2/1.1 envelopes, WS-Addressing, faults, MTOM/XOP.

Framework-free (no HTTP server types): `ihehub.soap.transport.read_request` turns a Content-Type and an
async byte stream into a `SoapRequest`; the HTTP routes (``ihehub.api.routes_xds``) only move bytes.
"""

from ihehub.soap.envelope import (
    SOAP11_NS,
    SOAP12_NS,
    WSA_NS,
    Addressing,
    Envelope,
    build_envelope,
    parse_envelope,
    reply_action,
)
from ihehub.soap.fault import SoapFault
from ihehub.soap.mtom import Attachment, OutPart, mtom_stream
from ihehub.soap.transport import Limits, SoapRequest, read_request
from ihehub.soap.xmlsafe import XmlRefused, parse_xml

__all__ = [
    "SOAP11_NS", "SOAP12_NS", "WSA_NS", "Addressing", "Attachment", "Envelope", "Limits", "OutPart",
    "SoapFault", "SoapRequest", "XmlRefused", "build_envelope", "mtom_stream", "parse_envelope", "parse_xml",
    "read_request", "reply_action",
]
