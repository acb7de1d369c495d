"""Just enough WSDL 1.1 to call an operation: its SOAP action, SOAP version and endpoint address.

WSDL 1.1 (W3C Note, 2001) section 3 (SOAP binding): ``binding/operation/soap:operation/@soapAction`` and
``service/port/soap:address/@location``; the binding's namespace (``.../wsdl/soap/`` or ``.../wsdl/soap12/``)
says SOAP 1.1 or 1.2.  When the portType's input message carries a WS-Addressing Metadata action
(``wsam:Action``, or the older ``wsaw:Action``), that is the action (WS-Addressing 1.0 Metadata section 4.4).
The document is parsed with the hub's safe XML parser (no DTD, no network); ``wsdl:import`` is not followed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from ihehub.soap.fault import SOAP11, SOAP12
from ihehub.soap.xmlsafe import XmlRefused, parse_xml

__all__ = ["WsdlError", "WsdlOperation", "find_operation"]

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP11 = "http://schemas.xmlsoap.org/wsdl/soap/"
WSDL_SOAP12 = "http://schemas.xmlsoap.org/wsdl/soap12/"
_WSA_METADATA = ("http://www.w3.org/2007/05/addressing/metadata", "http://www.w3.org/2006/05/addressing/wsdl")
_MAX_WSDL = 16 * 1024 * 1024


class WsdlError(ValueError):
    """The WSDL cannot be read, or it does not describe the operation asked for."""


@dataclass(frozen=True)
class WsdlOperation:
    name: str
    action: str | None  # soapAction / wsam:Action; None when the WSDL gives neither
    soap_ns: str  # SOAP11 or SOAP12 envelope namespace
    address: str | None  # soap:address/@location of a port using the binding


def _local(qname: str | None) -> str:
    """``tns:PatientBinding`` → ``PatientBinding`` (WSDL refers by QName; one document, so the local name)."""
    return (qname or "").rpartition(":")[2]


def _operations(root: etree._Element) -> list[str]:
    return sorted({op.get("name", "") for op in root.iter(f"{{{WSDL_NS}}}operation")} - {""})


def find_operation(data: bytes, operation: str, *, service: str | None = None,
                   port: str | None = None) -> WsdlOperation:
    """The SOAP binding details of ``operation``; `WsdlError` naming the known operations when it is not there."""
    try:
        root = parse_xml(data, max_size=_MAX_WSDL)
    except XmlRefused as exc:
        raise WsdlError(f"the WSDL is not acceptable XML: {exc}") from None
    if etree.QName(root).text != f"{{{WSDL_NS}}}definitions":
        raise WsdlError("not a WSDL 1.1 document (the root is not wsdl:definitions)")
    ports = []
    for svc in root.iter(f"{{{WSDL_NS}}}service"):
        if service is not None and svc.get("name") != service:
            continue
        for p in svc.iter(f"{{{WSDL_NS}}}port"):
            if port is not None and p.get("name") != port:
                continue
            address = p.find(f"{{{WSDL_SOAP12}}}address")
            if address is None:
                address = p.find(f"{{{WSDL_SOAP11}}}address")
            if address is not None:
                ports.append((_local(p.get("binding")), address.get("location"), etree.QName(address).namespace))
    if not ports:
        where = f" (service {service!r}, port {port!r})" if service or port else ""
        raise WsdlError(f"the WSDL has no SOAP port{where}")
    portype_actions: dict[tuple[str, str], str] = {}
    for pt in root.iter(f"{{{WSDL_NS}}}portType"):
        for op in pt.iter(f"{{{WSDL_NS}}}operation"):
            inp = op.find(f"{{{WSDL_NS}}}input")
            if inp is None:
                continue
            for ns in _WSA_METADATA:
                action = inp.get(f"{{{ns}}}Action")
                if action:
                    portype_actions[(pt.get("name", ""), op.get("name", ""))] = action
    bindings = {b.get("name", ""): b for b in root.iter(f"{{{WSDL_NS}}}binding")}
    for binding_name, location, address_ns in ports:
        binding = bindings.get(binding_name)
        if binding is None:
            continue
        for op in binding.findall(f"{{{WSDL_NS}}}operation"):
            if op.get("name") != operation:
                continue
            soap_op = op.find(f"{{{WSDL_SOAP12}}}operation")
            if soap_op is None:
                soap_op = op.find(f"{{{WSDL_SOAP11}}}operation")
            action = portype_actions.get((_local(binding.get("type")), operation))
            if action is None and soap_op is not None:
                action = soap_op.get("soapAction") or None
            is_12 = binding.find(f"{{{WSDL_SOAP12}}}binding") is not None or address_ns == WSDL_SOAP12
            return WsdlOperation(name=operation, action=action, soap_ns=SOAP12 if is_12 else SOAP11,
                                 address=location)
    known = ", ".join(_operations(root)) or "none"
    raise WsdlError(f"the WSDL has no SOAP operation {operation!r} (operations: {known})")
