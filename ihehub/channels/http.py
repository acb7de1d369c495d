"""``http://`` and ``https://`` connectors: an HTTP listener source and an HTTP client destination.

The source takes one message per request body.  Sources whose port is the hub's main HTTP port
register their path in the `RouteTable` that the API application hands unknown paths to
(``ConnectorContext.http_routes``); any other port gets a `Listener` of its own.  Request handling
and the Outcome → status mapping (RFC 9110) live in :mod:`ihehub.channels.http_routes`.

The destination sends ``Message.raw`` (RFC 9110 §9.3.3 POST by default) over one keep-alive
an ``aiohttp.ClientSession`` (keep-alive pool) per destination and classifies the status code: ``success_status`` → ok,
``retry_status`` → retry with backoff, anything else → dead letter.  Connection failures and
timeouts raise a retryable `DeliveryError`.  TLS follows RFC 8446 / RFC 9110 §4.3.4 (server
identity checked against the URL's host unless ``tls.verify`` is false).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Response
from ihehub.channels.http_routes import (
    DEFAULT_MAX_BODY,
    DEFAULT_RETRY_AFTER,
    Listener,
    Route,
    RouteTable,
    SourceOptions,
    normalize_path,
)
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.registry import ConnectorContext

__all__ = [
    "DESTINATION_OPTIONS_SCHEMA",
    "SOURCE_OPTIONS_SCHEMA",
    "SPEC",
    "HTTPDestination",
    "HTTPSource",
    "Route",
    "RouteTable",
    "SourceOptions",
    "StatusSet",
]

log = logging.getLogger(__name__)

_STATUS_ITEM: dict[str, Any] = {
    "oneOf": [
        {"type": "integer", "minimum": 100, "maximum": 599},
        {"type": "string", "pattern": r"^([1-5][0-9][0-9]-[1-5][0-9][0-9]|[1-5]xx)$"},
    ]
}
_PATH = {"type": "string", "minLength": 1}

SOURCE_TLS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "Own listener only (https://). Paths relative to the hub home.",
    "properties": {
        "cert": {**_PATH, "description": "PEM server certificate (chain)"},
        "key": {**_PATH, "description": "PEM private key"},
        "ca": {**_PATH, "description": "PEM CA bundle that client certificates must chain to"},
        "require_client_cert": {"type": "boolean", "default": False},
        "min_version": {"enum": ["1.2", "1.3"], "default": "1.2"},
    },
}
DESTINATION_TLS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "https:// only. Paths relative to the hub home.",
    "properties": {
        "ca": {**_PATH, "description": "PEM CA bundle to verify the server (default: system store)"},
        "cert": {**_PATH, "description": "PEM client certificate for mutual TLS"},
        "key": {**_PATH, "description": "PEM private key of the client certificate"},
        "verify": {"type": "boolean", "default": True},
        "min_version": {"enum": ["1.2", "1.3"], "default": "1.2"},
    },
}

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "methods": {
            "type": "array",
            "items": {"enum": ["POST", "PUT", "PATCH", "GET", "DELETE"]},
            "minItems": 1,
            "uniqueItems": True,
            "default": ["POST"],
        },
        "max_body_bytes": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_BODY},
        "content_type": {
            "type": "string",
            "minLength": 1,
            "description": "Media type to record instead of the request's Content-Type",
        },
        "retry_after": {"type": "integer", "minimum": 0, "default": DEFAULT_RETRY_AFTER},
        "tls": SOURCE_TLS_SCHEMA,
    },
}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "method": {"enum": ["POST", "PUT", "PATCH"], "default": "POST"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 30},
        "connect_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 5},
        "max_connections": {"type": "integer", "minimum": 1, "default": 10},
        "tls": DESTINATION_TLS_SCHEMA,
        "success_status": {"type": "array", "items": _STATUS_ITEM, "minItems": 1, "default": ["2xx"]},
        "retry_status": {"type": "array", "items": _STATUS_ITEM, "default": [408, 429, "500-599"]},
    },
}


# --------------------------------------------------------------------------- status lists


@dataclasses.dataclass(frozen=True, slots=True)
class StatusSet:
    """A set of HTTP status codes written as ints, ``"500-599"`` ranges or ``"5xx"`` classes."""

    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, items: Iterable[int | str]) -> StatusSet:
        ranges: list[tuple[int, int]] = []
        for item in items:
            if isinstance(item, int):
                ranges.append((item, item))
            elif item.endswith("xx"):
                first = int(item[0]) * 100
                ranges.append((first, first + 99))
            else:
                low, _, high = item.partition("-")
                if int(low) > int(high):
                    raise ConnectorError(f"status range {item!r} is empty (write low-high)")
                ranges.append((int(low), int(high)))
        return cls(tuple(ranges))

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and any(low <= status <= high for low, high in self.ranges)


# --------------------------------------------------------------------------- shared helpers


def _resolve(path: str, home: str) -> str:
    return path if os.path.isabs(path) else os.path.join(home, path)


def _tls_settings(
    options: Mapping[str, Any], context: ConnectorContext, keys: tuple[str, ...]
) -> dict[str, Any]:
    """Hub-wide ``context.tls`` overridden key by key by the connector's ``tls`` option."""
    merged = {k: v for k, v in context.tls.items() if k in keys}
    merged.update(options.get("tls") or {})
    for key in ("cert", "key", "ca"):
        if merged.get(key):
            merged[key] = _resolve(str(merged[key]), context.home)
    return merged


def _split_http_url(url: str, role: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConnectorError(f"{url!r} is not an http:// or https:// URL")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConnectorError(f"{url!r}: bad port ({exc})") from None
    if role == "source" and (parts.query or parts.fragment):
        raise ConnectorError(f"{url!r}: a source URL is host, port and path only (no '?' or '#')")
    if role == "destination" and not parts.hostname:
        raise ConnectorError(f"{url!r}: a destination URL needs a host, e.g. https://ris.example.org/hl7")
    return scheme, parts.hostname or "0.0.0.0", port, parts.path


def _tls_version(settings: Mapping[str, Any]) -> ssl.TLSVersion:
    """``tls.min_version``: "1.2" (default) or "1.3" (RFC 8446); older versions are never offered."""
    newest_only = str(settings.get("min_version", "1.2")) == "1.3"
    return ssl.TLSVersion.TLSv1_3 if newest_only else ssl.TLSVersion.TLSv1_2


def _server_tls(settings: Mapping[str, Any], url: str) -> ssl.SSLContext:
    cert, key = settings.get("cert"), settings.get("key")
    if not cert or not key:
        raise ConnectorError(f"{url}: an https:// source needs tls.cert and tls.key (PEM files)")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = _tls_version(settings)
        context.load_cert_chain(cert, key)
        if settings.get("ca"):
            context.load_verify_locations(cafile=settings["ca"])
            context.verify_mode = ssl.CERT_OPTIONAL
        if settings.get("require_client_cert"):
            if not settings.get("ca"):
                raise ConnectorError(f"{url}: tls.require_client_cert needs tls.ca to check them against")
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConnectorError(f"{url}: cannot load TLS files: {exc}") from None
    return context


class RoutedSource:
    """What the sources served over HTTP share (http://, soap://): their route lives on the hub's main HTTP
    port (the API app's `RouteTable`) when the URL names that port, else on a listener of their own."""

    name: str
    host: str
    port: int
    path: str
    _context: ConnectorContext
    _tls: ssl.SSLContext | None
    _table: RouteTable | None
    _listener: Listener | None

    def _uses_main_port(self) -> bool:
        routes = self._context.http_routes
        return isinstance(routes, RouteTable) and routes.port is not None and routes.port == self.port

    async def _mount(self, route: Route, what: str) -> None:
        if self._uses_main_port():
            table: RouteTable = self._context.http_routes
            table.add(route)
            self._table = table
            log.info("channel %s: %s on the main HTTP port at %s", self.name, what, self.path)
            return
        table = RouteTable()
        table.add(route)
        listener = Listener(table.asgi_app, self.host, self.port, self._tls)
        self.port = await listener.start()
        self._table, self._listener = table, listener
        log.info("channel %s: %s on %s:%d%s", self.name, what, self.host, self.port, self.path)

    async def stop(self) -> None:
        table, listener = self._table, self._listener
        self._table = self._listener = None
        if listener is not None:
            await listener.stop()
        elif table is not None:
            table.remove(self.path, channel=self.name)


class HTTPSource(RoutedSource):
    """Receive messages as HTTP request bodies on ``http[s]://host:port/path``."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        check_options(options, SOURCE_OPTIONS_SCHEMA, f"http source {name!r}")
        scheme, host, port, path = _split_http_url(url, "source")
        self.name = name
        self.url = url
        self.host = host
        self.port: int = port if port is not None else (443 if scheme == "https" else 80)
        self.path = normalize_path(path)
        self.options = SourceOptions.parse(options)
        self._context = context
        self._tls: ssl.SSLContext | None = None
        self._tls_requested = "tls" in options
        if self._uses_main_port():
            if self._tls_requested:
                raise ConnectorError(
                    f"http source {name!r}: port {self.port} is the hub's main HTTP port, whose TLS is the "
                    "API server's; drop options.tls or use another port"
                )
        elif scheme == "https":
            keys = ("cert", "key", "ca", "require_client_cert", "min_version")
            self._tls = _server_tls(_tls_settings(options, context, keys), url)
        elif self._tls_requested:
            raise ConnectorError(f"http source {name!r}: options.tls needs an https:// URL")
        self._table: RouteTable | None = None
        self._listener: Listener | None = None

    async def start(self, inbound: Inbound) -> None:
        if self._table is not None:
            raise ConnectorError(f"http source {self.name!r} is already started")
        await self._mount(Route(channel=self.name, path=self.path, inbound=inbound, options=self.options),
                          "receiving")


# --------------------------------------------------------------------------- destination


def _client_tls(settings: Mapping[str, Any], url: str) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.get("ca"))
        context.minimum_version = _tls_version(settings)
        if not settings.get("verify", True):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if settings.get("cert"):
            context.load_cert_chain(settings["cert"], settings.get("key"))
        elif settings.get("key"):
            raise ConnectorError(f"{url}: tls.key given without tls.cert")
    except (OSError, ssl.SSLError) as exc:
        raise ConnectorError(f"{url}: cannot load TLS files: {exc}") from None
    return context


def _without_password(url: str) -> str:
    """``https://user:secret@host/x`` → ``https://user:***@host/x``: URLs end up in error texts."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _header_safe(value: str) -> str:
    """Header values may not carry CR/LF (RFC 9110 §5.5); other non-ASCII goes out as UTF-8."""
    return value.replace("\r", " ").replace("\n", " ")


class HTTPDestination:
    """Deliver ``Message.raw`` as the body of an HTTP request (POST by default)."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        check_options(options, DESTINATION_OPTIONS_SCHEMA, f"http destination {name!r}")
        scheme, _host, _port, _path = _split_http_url(url, "destination")
        if scheme == "http" and "tls" in options:
            raise ConnectorError(f"http destination {name!r}: options.tls needs an https:// URL")
        self.name = name
        self.url = url
        self.shown_url = _without_password(url)  # for errors and logs
        self.method: str = options.get("method", "POST")
        self.headers: dict[str, str] = dict(options.get("headers") or {})
        self.success = StatusSet.parse(options.get("success_status", ["2xx"]))
        self.retry = StatusSet.parse(options.get("retry_status", [408, 429, "500-599"]))
        self._timeout = aiohttp.ClientTimeout(
            total=float(options.get("timeout", 30)), connect=float(options.get("connect_timeout", 5))
        )
        self._connections = int(options.get("max_connections", 10))
        self._verify: ssl.SSLContext | bool = True
        if scheme == "https":
            keys = ("ca", "cert", "key", "verify", "min_version")
            self._verify = _client_tls(_tls_settings(options, context, keys), url)
        self._client: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # aiohttp rather than httpx: measured on this 2-core machine, httpx's AsyncClient tops out near
        # 1,000 requests/s while aiohttp keeps 5,000-9,000/s with the same keep-alive server (bench/).
        if self._client is None or self._client.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._verify, enable_cleanup_closed=True)
            self._client = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._client

    def _request_headers(self, message: Message) -> dict[str, str]:
        content_type = message.content_type
        if message.charset and "charset=" not in content_type.lower():
            content_type = f"{content_type}; charset={message.charset}"
        headers = {"Content-Type": content_type, "X-Ihehub-Message-Id": message.id, "User-Agent": "ihehub"}
        if message.control_id:
            headers["X-Control-Id"] = _header_safe(message.control_id)
        if message.correlation_id:
            headers["X-Correlation-Id"] = _header_safe(message.correlation_id)
        lower = {k.lower(): k for k in headers}
        for key, value in self.headers.items():  # configured headers win, whatever their case
            headers.pop(lower.get(key.lower(), key), None)
            headers[key] = value
        return headers

    async def _request(self, message: Message) -> tuple[int, str, bytes]:
        async with self._http().request(
            self.method, self.url, data=message.raw, headers=self._request_headers(message), allow_redirects=False
        ) as reply:
            return reply.status, reply.reason or "", await reply.read()

    async def send(self, message: Message) -> Response:
        """Send one message; the status code decides ok / retry / dead (see module docstring)."""
        try:
            try:
                status, reason, content = await self._request(message)
            except aiohttp.ServerDisconnectedError:
                # a kept-alive connection the server had closed: one immediate retry on a fresh one
                status, reason, content = await self._request(message)
        except TimeoutError as exc:
            raise DeliveryError(f"{self.name}: {self.shown_url} timed out ({type(exc).__name__})") from exc
        except aiohttp.ClientError as exc:
            reason_text = str(exc) or type(exc).__name__
            raise DeliveryError(f"{self.name}: cannot reach {self.shown_url}: {reason_text}") from exc
        if status in self.success:
            return Response(ok=True, body=content, status=str(status))
        snippet = content[:200].decode("utf-8", "replace").strip()
        error = f"{self.shown_url} answered HTTP {status} {reason}"
        error += f": {snippet}" if snippet else ""
        retryable = status in self.retry
        return Response(ok=False, body=content, status=str(status), error=error, retryable=retryable)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


SPEC = ConnectorSpec(
    schemes=("http", "https"),
    description="HTTP(S) listener (one message per request body) and HTTP(S) client destination",
    source="ihehub.channels.http:HTTPSource",
    destination="ihehub.channels.http:HTTPDestination",
    options_schema=union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA),
    example="""\
source:
  url: http://0.0.0.0:8080/hl7/in
  options: {methods: [POST], max_body_bytes: 10485760}
destinations:
  - url: https://ris.example.org/api/hl7
    options:
      headers: {Authorization: "Bearer ${RIS_TOKEN}"}
      timeout: 30
      retry_status: [408, 429, "500-599"]
      tls: {ca: certs/ris-ca.pem}
""",
)
