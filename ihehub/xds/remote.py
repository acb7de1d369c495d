"""An external Document Registry reached with ITI-42 Register Document Set-b (SOAP 1.2, WS-Addressing).

The repository (ITI-41) registers through this when ``actors.xds.registry_url`` is set, instead of the
hub's own registry (ITI TF-2b 3.41.4.1.3: the repository forwards the metadata with ITI-42 and passes the
registry's response back).  A registry that cannot be reached, answers with a SOAP fault or with
something that is not an ``rs:RegistryResponse`` is reported as XDSRegistryNotAvailable
(ITI TF-3 Table 4.2.4.1-2).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
from lxml import etree

from ihehub.soap import SOAP12_NS, SoapFault, build_envelope, parse_envelope, parse_xml
from ihehub.soap.xmlsafe import XmlRefused
from ihehub.xds import ebrim
from ihehub.xds.errors import FAILURE, RS_NS, SEVERITY_ERROR, XdsError, registry_response

__all__ = ["REGISTRY_NOT_AVAILABLE", "RemoteRegistry", "RemoteResult"]

log = logging.getLogger("ihehub.xds.remote")

ITI_42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
REGISTRY_NOT_AVAILABLE = "XDSRegistryNotAvailable"


@dataclass
class RemoteResult:
    """The external registry's answer (``response`` is its ``rs:RegistryResponse`` as received)."""

    status: str
    errors: list[XdsError] = field(default_factory=list)
    response: etree._Element | None = None

    def to_xml(self) -> etree._Element:
        return self.response if self.response is not None else registry_response(self.errors, status=self.status)


def _failure(context: str) -> RemoteResult:
    return RemoteResult(status=FAILURE, errors=[XdsError(REGISTRY_NOT_AVAILABLE, context)])


class RemoteRegistry:
    """ITI-42 client for the registry at ``url``; ``verify``: TLS verification (a CA file, an
    `ssl.SSLContext` carrying the hub's client certificate, or a bool)."""

    def __init__(self, url: str, *, timeout: float = 60.0, verify: Any = True) -> None:
        self.url = url
        self.timeout = timeout
        self.verify = verify

    def register_submission(self, sub: ebrim.Submission) -> RemoteResult:
        body = build_envelope(copy.deepcopy(sub.request), action=ITI_42, to=self.url)
        try:
            r = httpx.post(self.url, content=body, timeout=self.timeout, verify=self.verify,
                           headers={"content-type": f'application/soap+xml; charset=utf-8; action="{ITI_42}"'})
        except httpx.HTTPError as exc:
            log.warning("ITI-42 to %s: %s", self.url, exc)
            return _failure(f"the registry at {self.url} cannot be reached: {exc}")
        try:
            payload = parse_envelope(parse_xml(r.content)).body
        except (XmlRefused, SoapFault) as exc:  # not XML, or not a SOAP envelope
            return _failure(f"the registry at {self.url} answered HTTP {r.status_code} without a SOAP "
                            f"response: {exc}")
        if etree.QName(payload).localname == "Fault":  # SOAP 1.2 env:Reason/env:Text, SOAP 1.1 faultstring
            reason = payload.findtext(f"{{{SOAP12_NS}}}Reason/{{{SOAP12_NS}}}Text") or payload.findtext("faultstring")
            return _failure(f"the registry at {self.url} answered with a SOAP fault: {reason}")
        if payload.tag != f"{{{RS_NS}}}RegistryResponse":
            return _failure(f"the registry at {self.url} answered {payload.tag}, not rs:RegistryResponse")
        errors = [XdsError(e.get("errorCode") or "", e.get("codeContext") or "",
                           severity=e.get("severity") or SEVERITY_ERROR, location=e.get("location") or "")
                  for e in payload.iter(f"{{{RS_NS}}}RegistryError")]
        return RemoteResult(status=payload.get("status") or FAILURE, errors=errors, response=payload)
