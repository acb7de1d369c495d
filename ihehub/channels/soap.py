"""``soap://`` and ``soaps://`` connectors: a SOAP endpoint source and a SOAP client destination.

Built on the hub's own SOAP stack (:mod:`ihehub.soap`): SOAP 1.2 (W3C SOAP 1.2 Part 1 section 5, Part 2
section 7 HTTP binding) and SOAP 1.1 (W3C Note section 4, 6), WS-Addressing 1.0 (Core section 3, SOAP
Binding section 2), WS-Security UsernameToken and Timestamp (:mod:`ihehub.soap.wssecurity`), WSDL 1.1
operation lookup (:mod:`ihehub.soap.wsdl`).  ``soap://`` carries HTTP, ``soaps://`` HTTPS.

Destination: the message body (an XML element) is wrapped in an envelope with wsa:Action, wsa:MessageID,
wsa:To and wsa:ReplyTo (anonymous), and a ``wsse:Security`` header when configured; a body that already is
an envelope is sent as it is (a Security header is added when configured and missing).  SOAP 1.1 sends the
action in ``SOAPAction``, SOAP 1.2 as the ``action`` parameter of ``application/soap+xml`` (RFC 3902).
A fault whose code says the request itself is wrong (``Sender``/``Client``, ``MustUnderstand``,
``VersionMismatch``, WS-Security faults) is a non-retryable `DeliveryError` (dead letter at once); a
``Receiver``/``Server`` fault, HTTP 408/429/5xx and connection failures are retried with backoff.

Source: a SOAP endpoint on the hub's main HTTP port (registered in its `RouteTable`) or on a listener of
its own.  The envelope is parsed with the safe parser (no DTD, so no XXE), WS-Security is checked when
configured, header blocks marked mustUnderstand that nobody processes get a ``MustUnderstand`` fault, and
the Body payload (or the envelope without its Security header) becomes the message.  The reply is sent
after the hub has committed the message: a response envelope with the acknowledgement payload, or a fault
(``AE`` → ``Sender``, ``AR`` or a hub failure → ``Receiver``).
"""

from __future__ import annotations

import base64
import copy
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import escape

import aiohttp
from lxml import etree

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Response
from ihehub.channels.http import (
    DESTINATION_TLS_SCHEMA,
    SOURCE_TLS_SCHEMA,
    HTTPDestination,
    RoutedSource,
    _client_tls,
    _header_safe,
    _resolve,
    _server_tls,
    _tls_settings,
    _without_password,
)
from ihehub.channels.http_routes import (
    DEFAULT_MAX_BODY,
    DEFAULT_RETRY_AFTER,
    KEPT_HEADERS,
    Listener,
    Receive,
    Route,
    RouteTable,
    Scope,
    Send,
    _peer,
    _reply,
    normalize_path,
)
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.registry import ConnectorContext
from ihehub.channels.sniff import codec_name, parse_content_type
from ihehub.soap.envelope import (
    CONTENT_TYPES,
    SOAP11_NS,
    SOAP12_NS,
    WSA_ANONYMOUS,
    WSA_NS,
    build_envelope,
    fault_envelope,
    reply_action,
)
from ihehub.soap.fault import SoapFault
from ihehub.soap.mtom import XOP_INCLUDE, xop_attachment
from ihehub.soap.transport import Limits, read_request
from ihehub.soap.wsdl import WsdlError, WsdlOperation, find_operation
from ihehub.soap.wssecurity import SECURITY, WSSE_NS, Credentials, NonceCache, security_header, verify_security
from ihehub.soap.xmlsafe import XmlRefused, parse_xml

__all__ = ["DESTINATION_OPTIONS_SCHEMA", "SOURCE_OPTIONS_SCHEMA", "SPEC", "SoapDestination", "SoapFaultInfo",
           "SoapSource", "parse_fault"]

log = logging.getLogger(__name__)

IHEHUB_SOAP_NS = "urn:ihehub:soap:1"
ACTION_HEADER = "soap.action"  # Message.headers key: the source records the request's action here; the
# destination uses it when no action is configured
_WIRE_ACTION = "soap.wire-action"  # internal: the SOAPAction of one outgoing SOAP 1.1 request
VERSIONS = {"1.2": SOAP12_NS, "1.1": SOAP11_NS}
VERSION_OF = {ns: v for v, ns in VERSIONS.items()}
DEFAULT_ACK = f'<ack:Acknowledgement xmlns:ack="{IHEHUB_SOAP_NS}" messageId="{{message_id}}" status="accepted"/>'
_XML_DECLARES_ENCODING = re.compile(rb"^(\xef\xbb\xbf)?\s*<\?xml[^>]*\bencoding\s*=", re.S)
_STRING = {"type": "string", "minLength": 1}

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "dependentRequired": {"username": ["password"], "password": ["username"]},
    "properties": {
        "username": {**_STRING, "description": "WS-Security UsernameToken the sender must present"},
        "password": {"type": "string", "description": "its password (write ${VARIABLE} to keep it out of files)"},
        "password_type": {"enum": ["text", "digest", "any"], "default": "any"},
        "require_timestamp": {"type": "boolean", "default": False},
        "timestamp_ttl": {"type": "number", "exclusiveMinimum": 0, "default": 300,
                          "description": "freshness window (s) of UsernameToken wsu:Created and nonces"},
        "message": {"enum": ["body", "envelope"], "default": "body"},
        "ack": {**_STRING, "description": "XML of the response payload; {message_id} and {control_id} are replaced"},
        "understood": {"type": "array", "items": {"type": "string", "pattern": r"^\{[^}]*\}\S+$"},
                       "description": "header QNames ({namespace}local) accepted with mustUnderstand"},
        "max_body_bytes": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_BODY},
        "retry_after": {"type": "integer", "minimum": 0, "default": DEFAULT_RETRY_AFTER},
        "wsdl": {**_STRING, "description": "WSDL file (relative to the hub home) served at GET ?wsdl; "
                                           "{{LOCATION}} becomes the endpoint URL"},
        "tls": SOURCE_TLS_SCHEMA,
    },
}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "dependentRequired": {"username": ["password"], "operation": ["wsdl"]},
    "properties": {
        "action": {**_STRING, "description": "wsa:Action / SOAPAction (default: the WSDL's, else the message's)"},
        "version": {"enum": ["1.1", "1.2"], "description": "SOAP version (default: the WSDL binding's, else 1.2)"},
        "addressing": {"type": "boolean", "default": True, "description": "send WS-Addressing headers"},
        "username": _STRING,
        "password": {"type": "string"},
        "password_type": {"enum": ["text", "digest"], "default": "digest"},
        "timestamp_ttl": {"type": "number", "exclusiveMinimum": 0,
                          "description": "add a wsu:Timestamp expiring after this many seconds"},
        "wsdl": {**_STRING, "description": "WSDL 1.1 file (relative to the hub home) or http(s) URL"},
        "operation": {**_STRING, "description": "WSDL operation: gives the action, version and address"},
        "service": _STRING,
        "port": _STRING,
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 30},
        "connect_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 5},
        "max_connections": {"type": "integer", "minimum": 1, "default": 10},
        "tls": DESTINATION_TLS_SCHEMA,
    },
}


def _http_url(url: str, role: str) -> tuple[str, str, int | None, str, str]:
    """``soap[s]://host:port/path?q`` → (http scheme, host, port, path, query)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("soap", "soaps"):
        raise ConnectorError(f"{url!r} is not a soap:// or soaps:// URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConnectorError(f"{url!r}: bad port ({exc})") from None
    if role == "source" and (parts.query or parts.fragment):
        raise ConnectorError(f"{url!r}: a source URL is host, port and path only (no '?' or '#')")
    return ("https" if scheme == "soaps" else "http"), parts.hostname or "", port, parts.path, parts.query


def _utf8_xml(raw: bytes, charset: str | None) -> bytes:
    """XML bytes lxml can parse: text in a non-UTF-8 charset without an encoding declaration is transcoded."""
    codec = codec_name(charset) if charset else None
    if codec in (None, "utf-8") or _XML_DECLARES_ENCODING.match(raw):
        return raw
    return raw.decode(codec).encode("utf-8")


def _is_envelope(root: etree._Element) -> bool:
    return etree.QName(root).localname == "Envelope" and etree.QName(root).namespace in VERSION_OF


# --------------------------------------------------------------------------- faults in responses


class SoapFaultInfo:
    """A fault read from a response: ``code`` and ``subcodes`` as ``{namespace}local``, the reason text."""

    def __init__(self, code: str, subcodes: list[str], reason: str, soap_ns: str) -> None:
        self.code = code
        self.subcodes = subcodes
        self.reason = reason
        self.soap_ns = soap_ns

    @property
    def local_code(self) -> str:
        return etree.QName(self.code).localname if self.code.startswith("{") else self.code

    @property
    def permanent(self) -> bool:
        """Resending the same request cannot help: the sender's fault, or one the receiver cannot process.
        SOAP 1.2 Part 1 section 5.4.6; SOAP 1.1 section 4.4.1 (``Client`` and its dotted specialisations);
        WSS 1.1 section 12 faults (authentication) need a configuration change, not a retry."""
        namespace = etree.QName(self.code).namespace if self.code.startswith("{") else None
        if namespace == WSSE_NS or any(s.startswith(f"{{{WSSE_NS}}}") for s in self.subcodes):
            return True
        if namespace not in (None, SOAP11_NS, SOAP12_NS):
            return False
        head = self.local_code.split(".", 1)[0]
        return head in ("Sender", "Client", "MustUnderstand", "VersionMismatch", "DataEncodingUnknown")

    def describe(self) -> str:
        def short(q: str) -> str:
            return etree.QName(q).localname if q.startswith("{") else q

        code = "/".join([self.local_code, *(short(s) for s in self.subcodes)])
        return f"SOAP fault {code}: {self.reason}" if self.reason else f"SOAP fault {code}"


def _qname_text(el: etree._Element | None) -> str:
    """A QName-valued element (``env:Sender``) in Clark notation, resolved with the element's namespaces."""
    if el is None or not el.text:
        return ""
    text = el.text.strip()
    prefix, sep, local = text.rpartition(":")
    namespace = el.nsmap.get(prefix if sep else None)
    return f"{{{namespace}}}{local}" if namespace else text


def parse_fault(body: bytes) -> SoapFaultInfo | None:
    """The fault of a SOAP 1.2 or 1.1 response envelope, None when ``body`` is no fault (or no envelope)."""
    if not body.strip():
        return None
    try:
        root = parse_xml(body)
    except XmlRefused:
        return None
    if not _is_envelope(root):
        return None
    ns = etree.QName(root).namespace
    fault = root.find(f"{{{ns}}}Body/{{{ns}}}Fault")
    if fault is None:
        return None
    if ns == SOAP12_NS:
        code_el = fault.find(f"{{{ns}}}Code")
        code = _qname_text(code_el.find(f"{{{ns}}}Value") if code_el is not None else None)
        subcodes = []
        node = code_el
        while node is not None:
            node = node.find(f"{{{ns}}}Subcode")
            if node is not None:
                subcodes.append(_qname_text(node.find(f"{{{ns}}}Value")))
        texts = fault.findall(f"{{{ns}}}Reason/{{{ns}}}Text")
        reason = next((t.text for t in texts if t.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"),
                      texts[0].text if texts else "")
        return SoapFaultInfo(code, subcodes, (reason or "").strip(), ns)
    code = _qname_text(fault.find("faultcode"))
    return SoapFaultInfo(code, [], (fault.findtext("faultstring") or "").strip(), ns)


def _payload_bytes(body: bytes) -> bytes:
    """The first Body child of a response envelope (UTF-8), or ``body`` as it is when it is no envelope."""
    try:
        root = parse_xml(body)
    except XmlRefused:
        return body
    if not _is_envelope(root):
        return body
    ns = etree.QName(root).namespace
    payload = root.find(f"{{{ns}}}Body/*")
    if payload is None:
        return b""
    return bytes(etree.tostring(payload, encoding="UTF-8", xml_declaration=True))


# --------------------------------------------------------------------------- destination


class _SoapHTTP(HTTPDestination):
    """The http destination plus the per-request ``SOAPAction`` header of SOAP 1.1 (SOAP 1.1 section 6.1.1)."""

    def _request_headers(self, message: Message) -> dict[str, str]:
        headers = super()._request_headers(message)
        action = message.headers.get(_WIRE_ACTION)
        if action is not None:
            headers["SOAPAction"] = f'"{_header_safe(action)}"'
        return headers


class SoapDestination:
    """Call a SOAP web service with each message (see the module docstring)."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        check_options(options, DESTINATION_OPTIONS_SCHEMA, f"soap destination {name!r}")
        scheme, host, _port, path, query = _http_url(url, "destination")
        self.name = name
        self.url = url
        self._context = context
        self._options = dict(options)
        self.endpoint: str | None = None
        if host:
            # the URL's user:password (HTTP Basic authentication, RFC 7617) stays; errors show it as ***
            self.endpoint = urlunsplit((scheme, urlsplit(url).netloc, path or "/", query, ""))
        elif not options.get("operation"):
            raise ConnectorError(f"soap destination {name!r}: {url!r} has no host; write one, or give options.wsdl "
                                 "and options.operation to take the endpoint address from the WSDL")
        self.action: str | None = options.get("action")
        self.version: str | None = options.get("version")
        self.addressing = bool(options.get("addressing", True))
        self.username: str | None = options.get("username")
        self.password: str = options.get("password") or ""
        self.digest = options.get("password_type", "digest") == "digest"
        ttl = options.get("timestamp_ttl")
        self.timestamp_ttl = float(ttl) if ttl is not None else None
        self.wsdl: str | None = options.get("wsdl")
        self._operation: WsdlOperation | None = None
        if self.wsdl and not options.get("operation"):
            raise ConnectorError(f"soap destination {name!r}: options.wsdl needs options.operation (the one to call)")
        if self.wsdl and not self.wsdl.lower().startswith(("http://", "https://")):
            self._operation = self._resolve_operation(self._read_wsdl_file(self.wsdl))
        self._http: _SoapHTTP | None = None
        if self.endpoint is not None:
            self._http = self._client(self.endpoint)
        self.shown_url = _without_password(self.endpoint or url)

    def _read_wsdl_file(self, path: str) -> bytes:
        try:
            with open(_resolve(path, self._context.home), "rb") as f:
                return f.read()
        except OSError as exc:
            raise ConnectorError(f"soap destination {self.name!r}: cannot read options.wsdl: {exc}") from None

    def _resolve_operation(self, data: bytes) -> WsdlOperation:
        try:
            op = find_operation(data, str(self._options["operation"]), service=self._options.get("service"),
                                port=self._options.get("port"))
        except WsdlError as exc:
            raise ConnectorError(f"soap destination {self.name!r}: {self.wsdl}: {exc}") from None
        if self.endpoint is None and not (op.address or "").lower().startswith(("http://", "https://")):
            raise ConnectorError(f"soap destination {self.name!r}: the WSDL gives no http(s) address for "
                                 f"{op.name!r}; put the host in the URL")
        return op

    def _client(self, endpoint: str) -> _SoapHTTP:
        keys = ("headers", "timeout", "connect_timeout", "max_connections", "tls")
        http_options = {k: self._options[k] for k in keys if k in self._options}
        return _SoapHTTP(name=self.name, url=endpoint, options={**http_options, "success_status": ["2xx"],
                                                                "retry_status": [408, 429, "500-599"]},
                         context=self._context)

    async def _fetch_wsdl(self, url: str) -> bytes:
        verify: ssl.SSLContext | bool = True
        if url.lower().startswith("https://"):
            keys = ("ca", "cert", "key", "verify", "min_version")
            verify = _client_tls(_tls_settings(self._options, self._context, keys), url)
        timeout = aiohttp.ClientTimeout(total=float(self._options.get("timeout", 30)))
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, ssl=verify) as reply:
                if reply.status != 200:
                    raise DeliveryError(f"{self.name}: WSDL {_without_password(url)} answered HTTP {reply.status}")
                return await reply.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{self.name}: cannot fetch WSDL {_without_password(url)}: "
                                f"{exc or type(exc).__name__}") from exc

    async def _ready(self) -> _SoapHTTP:
        """The HTTP client, once the WSDL (fetched on first use when it is a URL) gave what was missing."""
        if self.wsdl and self._operation is None:
            data = await self._fetch_wsdl(self.wsdl)
            try:
                self._operation = self._resolve_operation(data)
            except ConnectorError as exc:
                raise DeliveryError(str(exc), retryable=False) from None
        if self._http is None:
            assert self._operation is not None and self._operation.address
            try:
                self._http = self._client(self._operation.address)
            except ConnectorError as exc:
                raise DeliveryError(str(exc), retryable=False) from None
            self.shown_url = _without_password(self._operation.address)
        return self._http

    def _security(self, soap_ns: str) -> etree._Element | None:
        if self.username is None and self.timestamp_ttl is None:
            return None
        return security_header(soap_ns=soap_ns, username=self.username, password=self.password,
                               digest=self.digest, timestamp_ttl=self.timestamp_ttl)

    def _envelope(self, message: Message, endpoint: str) -> tuple[bytes, str, str | None]:
        """(envelope bytes, SOAP namespace, action) for ``message``; non-retryable `DeliveryError` when its body
        is not XML."""
        try:
            root = parse_xml(_utf8_xml(message.raw, message.charset))
        except (XmlRefused, UnicodeDecodeError) as exc:
            raise DeliveryError(f"{self.name}: message {message.id} is not XML: {exc}", retryable=False) from None
        op = self._operation
        action = self.action or (op.action if op else None) or message.headers.get(ACTION_HEADER) or None
        if _is_envelope(root):
            soap_ns = etree.QName(root).namespace or SOAP12_NS
            header = root.find(f"{{{soap_ns}}}Header")
            if action is None and header is not None:
                action = (header.findtext(f"{{{WSA_NS}}}Action") or "").strip() or None
            security = self._security(soap_ns)
            if security is not None and (header is None or header.find(SECURITY) is None):
                if header is None:
                    header = etree.Element(f"{{{soap_ns}}}Header")
                    root.insert(0, header)
                header.append(security)
            return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8")), soap_ns, action
        version = self.version or (VERSION_OF[op.soap_ns] if op else "1.2")
        soap_ns = VERSIONS[version]
        extra: list[etree._Element] = []
        if self.addressing and action is not None:
            reply_to = etree.Element(f"{{{WSA_NS}}}ReplyTo")
            etree.SubElement(reply_to, f"{{{WSA_NS}}}Address").text = WSA_ANONYMOUS
            extra.append(reply_to)
        security = self._security(soap_ns)
        if security is not None:
            extra.append(security)
        envelope = build_envelope(root, soap_ns=soap_ns, action=action if self.addressing else None, to=endpoint,
                                  extra_headers=extra)
        return envelope, soap_ns, action

    async def send(self, message: Message) -> Response:
        """Send one request; a fault or status decides ok / retry / dead (see the module docstring)."""
        http = await self._ready()
        parts = urlsplit(http.url)
        to = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # without the URL's user:password
        envelope, soap_ns, action = self._envelope(message, to)
        headers = dict(message.headers)
        if soap_ns == SOAP12_NS:
            content_type = "application/soap+xml" + (f'; action="{_header_safe(action)}"' if action else "")
        else:
            content_type = "text/xml"
            headers[_WIRE_ACTION] = action or ""
        wire = message.evolve(raw=envelope, charset="utf-8", content_type=content_type, headers=headers)
        resp = await http.send(wire)
        fault = parse_fault(resp.body)
        if fault is not None:
            raise DeliveryError(f"{self.name}: {self.shown_url} answered {fault.describe()} (HTTP {resp.status})",
                                retryable=not fault.permanent, response=resp.body)
        if not resp.ok:
            return resp
        payload = _payload_bytes(resp.body)
        refused = registry_failure(payload)
        if refused is not None:  # ebXML RS (XDS ITI-41/42, ...): a Failure comes back as HTTP 200, no fault
            raise DeliveryError(f"{self.name}: {self.shown_url} answered RegistryResponse Failure: {refused}",
                                retryable=False, response=payload)
        return Response(ok=True, body=payload, status=resp.status)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


RS_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
_RS = "{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}"


def registry_failure(payload: bytes) -> str | None:
    """The errors of an ebXML Registry Services response whose status is Failure (OASIS ebRS 3.0; IHE XDS
    answers ITI-41/42 this way), as "code: context; ..."; None for anything else (PartialSuccess included:
    what it accepted is stored, its errors are in the response kept with the delivery)."""
    if b"ResponseStatusType:Failure" not in payload:
        return None
    try:
        root = etree.fromstring(payload, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return None
    responses = [root] if root.tag == f"{_RS}RegistryResponse" else list(root.iter(f"{_RS}RegistryResponse"))
    for rr in responses:
        if rr.get("status") == RS_FAILURE:
            errors = [f"{e.get('errorCode')}: {e.get('codeContext') or ''}".strip()
                      for e in rr.iter(f"{_RS}RegistryError")]
            return "; ".join(errors) or "no RegistryError given"
    return None


# --------------------------------------------------------------------------- source


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _inline_xop(payload: etree._Element, attachments: Mapping[str, Any]) -> None:
    """Put every MTOM attachment back into the element that references it, as base64 text (XOP 1.0 section 3.2:
    the reconstituted infoset), so the message holds the whole payload."""
    for include in list(payload.iter(XOP_INCLUDE)):
        parent = include.getparent()
        if parent is None:
            continue
        att = xop_attachment(parent, dict(attachments))
        if att is not None:
            parent.remove(include)
            parent.text = base64.b64encode(att.read_bytes()).decode("ascii")


class SoapSource(RoutedSource):
    """Receive SOAP requests on ``soap[s]://host:port/path`` (see the module docstring)."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        check_options(options, SOURCE_OPTIONS_SCHEMA, f"soap source {name!r}")
        scheme, host, port, path, _query = _http_url(url, "source")
        self.name = name
        self.url = url
        self.host = host or "0.0.0.0"
        self.port: int = port if port is not None else (443 if scheme == "https" else 80)
        self.path = normalize_path(path)
        self._context = context
        self.credentials: Credentials | None = None
        if options.get("username") is not None:
            self.credentials = Credentials(str(options["username"]), str(options.get("password", "")),
                                           str(options.get("password_type", "any")))
        self.require_timestamp = bool(options.get("require_timestamp", False))
        self.freshness = float(options.get("timestamp_ttl", 300))
        self._nonces = NonceCache(self.freshness)
        self.whole_envelope = options.get("message", "body") == "envelope"
        self.ack_template: str = options.get("ack", DEFAULT_ACK)
        try:
            parse_xml(self._ack_text("x", "x").encode("utf-8"))
        except XmlRefused as exc:
            raise ConnectorError(f"soap source {name!r}: options.ack is not XML: {exc}") from None
        self.understood = frozenset([SECURITY, *options.get("understood", [])])
        self.max_body = int(options.get("max_body_bytes", DEFAULT_MAX_BODY))
        self.retry_after = int(options.get("retry_after", DEFAULT_RETRY_AFTER))
        self.wsdl: bytes | None = None
        if options.get("wsdl"):
            try:
                with open(_resolve(str(options["wsdl"]), context.home), "rb") as f:
                    self.wsdl = f.read()
            except OSError as exc:
                raise ConnectorError(f"soap source {name!r}: cannot read options.wsdl: {exc}") from None
        self._tls: ssl.SSLContext | None = None
        if self._uses_main_port():
            if "tls" in options:
                raise ConnectorError(f"soap source {name!r}: port {self.port} is the hub's main HTTP port, whose "
                                     "TLS is the API server's; drop options.tls or use another port")
        elif scheme == "https":
            keys = ("cert", "key", "ca", "require_client_cert", "min_version")
            self._tls = _server_tls(_tls_settings(options, context, keys), url)
        elif "tls" in options:
            raise ConnectorError(f"soap source {name!r}: options.tls needs a soaps:// URL")
        self._inbound: Inbound | None = None
        self._table: RouteTable | None = None
        self._listener: Listener | None = None

    def _ack_text(self, message_id: str, control_id: str) -> str:
        return self.ack_template.replace("{message_id}", escape(message_id, {'"': "&quot;"})).replace(
            "{control_id}", escape(control_id, {'"': "&quot;"}))

    async def start(self, inbound: Inbound) -> None:
        if self._table is not None:
            raise ConnectorError(f"soap source {self.name!r} is already started")
        self._inbound = inbound
        await self._mount(Route(channel=self.name, path=self.path, inbound=inbound, handler=self._serve),
                          "SOAP endpoint")

    # -- one request ----------------------------------------------------------------------------------

    async def _read(self, receive: Receive) -> bytes | None:
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return None
            body += event.get("body", b"")
            if len(body) > self.max_body:
                raise SoapFault("Sender", f"the SOAP message exceeds the limit of {self.max_body} bytes")
            if not event.get("more_body", False):
                return bytes(body)

    async def _fault(self, send: Send, fault: SoapFault, soap_ns: str, relates_to: str | None = None,
                     extra: Iterable[tuple[str, str]] = ()) -> None:
        """SOAP 1.2 Part 2 section 7.5.2.2: Sender → 400, other faults → 500; SOAP 1.1 section 6.2: always 500."""
        body = fault_envelope(fault, soap_ns=soap_ns, relates_to=relates_to)
        status = fault.http_status if soap_ns == SOAP12_NS else 500
        await _reply(send, status, body, f"{CONTENT_TYPES[soap_ns]}; charset=utf-8", extra)

    def _security_event(self, peer: str | None, fault: SoapFault) -> None:
        hook = self._context.on_security_event
        if hook is None:
            return
        try:
            hook("soap-authentication", peer or "?", f"channel {self.name}: {fault.reason}")
        except Exception:
            log.exception("channel %s: the security-event hook failed", self.name)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request → envelope checks → `Message` → the hub → response envelope or fault."""
        headers: dict[str, str] = {}
        for raw_key, raw_value in scope["headers"]:
            key = raw_key.decode("latin-1").lower()
            try:
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                value = raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        content_type = headers.get("content-type", "")
        media, params = parse_content_type(content_type)
        soap_ns = SOAP11_NS if media == "text/xml" else SOAP12_NS
        peer = _peer(scope)
        query = scope.get("query_string", b"").decode("latin-1").lower()
        if scope["method"].upper() == "GET" and self.wsdl is not None and query.split("&")[0] == "wsdl":
            host = headers.get("host") or f"{self.host}:{self.port}"
            location = f"{scope.get('scheme', 'http')}://{host}{scope['path']}"
            await _reply(send, 200, self.wsdl.replace(b"{{LOCATION}}", escape(location).encode("utf-8")),
                         "text/xml; charset=utf-8")
            return
        if scope["method"].upper() != "POST":
            fault = SoapFault("Sender", f"{scope['method']} is not allowed here; SOAP requests are POSTed")
            body = fault_envelope(fault, soap_ns=soap_ns)
            await _reply(send, 405, body, f"{CONTENT_TYPES[soap_ns]}; charset=utf-8", [("allow", "POST")])
            return
        try:
            data = await self._read(receive)
            if data is None:
                return
            if media != "multipart/related":
                charset = params.get("charset")
                if charset and codec_name(charset) is None:
                    raise SoapFault("Sender", f"unknown charset {charset!r}")
                data = _utf8_xml(data, charset)
            req = await read_request(content_type, _one_chunk(data), soap_action=headers.get("soapaction"),
                                     limits=Limits(max_xml=self.max_body), understood=self.understood)
        except UnicodeDecodeError as exc:
            await self._fault(send, SoapFault("Sender", f"the body is not valid {params.get('charset')}: {exc}"),
                              soap_ns)
            return
        except SoapFault as fault:
            await self._fault(send, fault, soap_ns)
            return
        soap_ns = req.soap_ns
        addressing = req.envelope.addressing
        relates = addressing.message_id
        try:
            result = verify_security(req.envelope.header, credentials=self.credentials,
                                     require_timestamp=self.require_timestamp, freshness=self.freshness,
                                     nonces=self._nonces)
            payload = req.envelope.body
            if req.mtom:
                _inline_xop(payload, req.attachments)
        except SoapFault as fault:
            req.discard()
            if fault.subcode is not None and fault.subcode[0] == WSSE_NS:
                self._security_event(peer, fault)
            await self._fault(send, fault, soap_ns, relates)
            return
        req.discard()
        if self.whole_envelope:
            root = copy.deepcopy(payload.getroottree().getroot())
            header = root.find(f"{{{soap_ns}}}Header")
            for block in header.findall(SECURITY) if header is not None else []:
                header.remove(block)  # credentials are never stored with a message
            raw = bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))
            message_content_type = CONTENT_TYPES[soap_ns]
        else:
            raw = bytes(etree.tostring(payload, xml_declaration=True, encoding="UTF-8"))
            message_content_type = "application/xml"
        kept = {k: v for k, v in headers.items() if k in KEPT_HEADERS or k.startswith("x-ihehub-")}
        soap_headers = {"soap.version": VERSION_OF[soap_ns], ACTION_HEADER: req.action,
                        "soap.message_id": relates, "soap.to": addressing.to, "soap.reply_to": addressing.reply_to,
                        "wsse.username": result.username}
        message = Message(
            channel=self.name, raw=raw, content_type=message_content_type, charset="utf-8",
            headers={**kept, **{k: v for k, v in soap_headers.items() if v}, "http.method": "POST",
                     "http.path": scope["path"]},
            control_id=relates, correlation_id=headers.get("x-correlation-id") or None,
            message_type=etree.QName(payload).localname, source=peer,
        )
        inbound = self._inbound
        assert inbound is not None
        try:
            outcome = await inbound(message)
        except Exception:
            log.exception("channel %s: the hub failed to take message %s", self.name, message.id)
            await self._fault(send, SoapFault("Receiver", "the hub could not take the message; retry later",
                                              subcode=(IHEHUB_SOAP_NS, "Unavailable")), soap_ns, relates,
                              [("retry-after", str(self.retry_after))])
            return
        message_id = outcome.message_id or message.id
        extra = [("x-ihehub-message-id", message_id)]
        code = outcome.code.upper()
        if code in ("AE", "CE"):
            refused = SoapFault("Sender", outcome.error or "the message was refused",
                                subcode=(IHEHUB_SOAP_NS, "MessageRejected"))
            await self._fault(send, refused, soap_ns, relates, extra)
            return
        if code not in ("AA", "CA"):
            unavailable = SoapFault("Receiver", outcome.error or "the hub cannot take messages now; retry later",
                                    subcode=(IHEHUB_SOAP_NS, "Unavailable"))
            await self._fault(send, unavailable, soap_ns, relates, [*extra, ("retry-after", str(self.retry_after))])
            return
        action = reply_action(req.action) if req.action else None
        envelope = self._response(outcome.body, soap_ns, action, relates, message_id, message.control_id or "")
        content_type = CONTENT_TYPES[soap_ns] + "; charset=utf-8"
        if soap_ns == SOAP12_NS and action:
            content_type += f'; action="{_header_safe(action)}"'
        await _reply(send, 200, envelope, content_type, extra)

    def _response(self, body: bytes | None, soap_ns: str, action: str | None, relates: str | None,
                  message_id: str, control_id: str) -> bytes:
        """The response envelope: an actor's reply (an envelope as it is, an XML payload wrapped) or the ack."""
        if body is not None:
            try:
                root = parse_xml(body)
            except XmlRefused:
                root = etree.fromstring(self._ack_text(message_id, control_id).encode("utf-8"))
                root.text = body.decode("utf-8", "replace")
            else:
                if _is_envelope(root):
                    return body
        else:
            root = etree.fromstring(self._ack_text(message_id, control_id).encode("utf-8"))
        return build_envelope(root, soap_ns=soap_ns, action=action, relates_to=relates)


def _spec_schema() -> dict[str, Any]:
    """Options of either role (the constructors check their own); ``password_type`` allows both roles' values."""
    schema = union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA)
    schema["properties"]["password_type"] = {"enum": ["text", "digest", "any"]}
    return schema


SPEC = ConnectorSpec(
    schemes=("soap", "soaps"),
    description="SOAP 1.1/1.2 web service endpoint (source) and client (destination), WS-Addressing, WS-Security",
    source="ihehub.channels.soap:SoapSource",
    destination="ihehub.channels.soap:SoapDestination",
    options_schema=_spec_schema(),
    example="""\
source:
  url: soap://0.0.0.0:8080/ws/his            # the hub's main HTTP port: served by the API application
  options: {username: his, password: "${HIS_WS_PASSWORD}", password_type: digest}
destinations:
  - url: soaps://emr.example.org/services/PatientService
    options:
      wsdl: wsdl/PatientService.wsdl          # relative to the hub home, or an http(s) URL
      operation: AddPatient                   # soapAction, SOAP version (and address, when the URL has no host)
      username: hub
      password: "${EMR_WS_PASSWORD}"
      password_type: digest
      timestamp_ttl: 300
      tls: {ca: certs/emr-ca.pem}
""",
)
