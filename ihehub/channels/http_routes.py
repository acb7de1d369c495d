"""The receiving side of the http source: a path table served as an ASGI app, and its own listener.

`RouteTable` maps a path to a `Route` (channel, inbound, options) and is itself an ASGI 3
application (the ASGI specification, "HTTP Connection Scope"), so the hub's API application can hand
it every path it does not know.  One request becomes one `Message`; the hub's `Outcome` becomes the
reply per RFC 9110: ``AA`` → 200, ``AE`` → 400 (§15.5.1), ``AR`` → 503 with ``Retry-After``
(§15.6.4, §10.2.3); a wrong method gets 405 with ``Allow`` (§15.5.6), a body over the limit 413
(§15.5.14), an unknown ``charset`` 415 (§15.5.16), an unknown path 404 — always JSON.
`Listener` serves a table on a port of its own with uvicorn, inside the running event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, Inbound, Outcome
from ihehub.channels.sniff import (
    HL7_V2,
    OCTET_STREAM,
    codec_name,
    hl7_header,
    looks_like_hl7,
    parse_content_type,
)

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("ihehub.channels.http")

# ASGI 3 callable types (the ASGI specification, "HTTP & WebSocket" message formats).
Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

MiB = 1024 * 1024
DEFAULT_MAX_BODY = 10 * MiB
DEFAULT_RETRY_AFTER = 5

# Request headers copied into Message.headers (lower-case).  Credentials (Authorization, Cookie)
# are never stored with the message.
KEPT_HEADERS = frozenset(
    {
        "content-type",
        "host",
        "user-agent",
        "soapaction",
        "x-control-id",
        "x-correlation-id",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
KEPT_PREFIX = "x-ihehub-"


def normalize_path(path: str) -> str:
    """``hl7/in/`` → ``/hl7/in``: one spelling per route."""
    return "/" + path.strip("/")


async def _reply(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: Iterable[tuple[str, str]] = (),
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1", "replace")),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _reply_json(
    send: Send, status: int, payload: Mapping[str, Any], extra: Iterable[tuple[str, str]] = ()
) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    await _reply(send, status, body, "application/json", extra)


async def _error(
    send: Send, status: int, error: str, code: str, extra: Iterable[tuple[str, str]] = ()
) -> None:
    await _reply_json(send, status, {"error": error, "code": code}, extra)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SourceOptions:
    """An http source's options after validation and defaults."""

    methods: frozenset[str] = frozenset({"POST"})
    max_body_bytes: int = DEFAULT_MAX_BODY
    content_type: str | None = None  # media type only
    charset: str | None = None  # from a ``charset`` parameter of ``content_type``
    retry_after: int = DEFAULT_RETRY_AFTER

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> SourceOptions:
        media, params = parse_content_type(options.get("content_type"))
        charset = None
        if "charset" in params:
            charset = codec_name(params["charset"])
            if charset is None:
                raise ConnectorError(f"options.content_type: unknown charset {params['charset']!r}")
        return cls(
            methods=frozenset(options.get("methods", ["POST"])),
            max_body_bytes=int(options.get("max_body_bytes", DEFAULT_MAX_BODY)),
            content_type=media,
            charset=charset,
            retry_after=int(options.get("retry_after", DEFAULT_RETRY_AFTER)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Route:
    """One registered source: requests to ``path`` with one of ``methods`` go to ``inbound``."""

    channel: str
    path: str
    inbound: Inbound
    options: SourceOptions = dataclasses.field(default_factory=SourceOptions)
    # an ASGI handler of a connector that renders its own replies (soap://), used instead of the http source's
    handler: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    @property
    def methods(self) -> frozenset[str]:
        return self.options.methods


class RouteTable:
    """Path → `Route`, served by `asgi_app`.

    The API application delegates every path it does not know to ``table.asgi_app`` (for
    FastAPI/Starlette: ``app.router.default = table.asgi_app``) and passes the table to connectors
    as ``ConnectorContext(http_routes=table)``.  ``port`` is the port that application listens on:
    sources with that port in their URL register here instead of opening a listener.
    """

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port
        self._routes: dict[str, Route] = {}

    @property
    def paths(self) -> list[str]:
        return sorted(self._routes)

    def get(self, path: str) -> Route | None:
        return self._routes.get(normalize_path(path))

    def add(self, route: Route) -> None:
        path = normalize_path(route.path)
        taken = self._routes.get(path)
        if taken is not None:
            raise ConnectorError(
                f"channel {route.channel!r}: path {path} is already served by channel {taken.channel!r}"
            )
        self._routes[path] = dataclasses.replace(route, path=path)

    def remove(self, path: str, *, channel: str | None = None) -> None:
        """Forget ``path``; with ``channel``, only when that channel is the one serving it."""
        path = normalize_path(path)
        route = self._routes.get(path)
        if route is not None and (channel is None or route.channel == channel):
            del self._routes[path]

    def __len__(self) -> int:
        return len(self._routes)

    async def asgi_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI 3 application: dispatch an HTTP request to its route, 404 JSON when none matches."""
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        route = self.get(path)
        if route is None and root and path.startswith(root):
            route = self.get(path[len(root) :])
        if route is None:
            await _error(send, 404, f"no channel listens on {path}", "not_found")
            return
        if route.handler is not None:
            await route.handler(scope, receive, send)
            return
        await _handle(route, scope, receive, send)


async def _read_body(route: Route, scope: Scope, receive: Receive, send: Send) -> bytes | None:
    """The request body, or None after a 413/400 reply or a client disconnect."""
    limit = route.options.max_body_bytes
    declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            await _error(send, 400, "Content-Length is not a number", "bad_request")
            return None
        if size > limit:
            await _error(send, 413, f"body of {size} bytes is over the limit of {limit}", "payload_too_large")
            return None
    body = bytearray()
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return None
        body += event.get("body", b"")
        if len(body) > limit:
            await _error(send, 413, f"body is over the limit of {limit} bytes", "payload_too_large")
            return None
        if not event.get("more_body", False):
            return bytes(body)


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def _handle(route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    """Turn one request into a `Message`, hand it to the route's inbound, render the `Outcome`."""
    method: str = scope["method"].upper()
    if method not in route.methods:
        allow = ", ".join(sorted(route.methods))
        text = f"{method} is not allowed here; use {allow}"
        await _error(send, 405, text, "method_not_allowed", [("allow", allow)])
        return
    body = await _read_body(route, scope, receive, send)
    if body is None:
        return
    headers: dict[str, str] = {}
    for raw_key, raw_value in scope["headers"]:
        key = raw_key.decode("latin-1").lower()
        if key in KEPT_HEADERS or key.startswith(KEPT_PREFIX):
            try:  # UTF-8 in header values is common (ids with hanzi); RFC 9110 §5.5 allows opaque bytes
                value = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                value = raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    media, params = parse_content_type(headers.get("content-type"))
    charset = route.options.charset
    if "charset" in params:
        charset = codec_name(params["charset"])
        if charset is None:
            await _error(send, 415, f"unknown charset {params['charset']!r}", "unsupported_charset")
            return
    content_type = route.options.content_type or media
    control_id = headers.get("x-control-id") or None
    message_type = None
    if looks_like_hl7(body, content_type):
        if content_type in (None, OCTET_STREAM, "text/plain"):
            content_type = HL7_V2
        header = hl7_header(body, charset)
        if header is not None:  # MSH-10 and MSH-18 describe the message itself, so they win
            control_id = header.control_id or control_id
            message_type = header.message_type
            charset = header.charset
    query: bytes = scope.get("query_string", b"")
    message = Message(
        channel=route.channel,
        raw=body,
        content_type=content_type or OCTET_STREAM,
        charset=charset,
        headers={
            **headers,
            "http.method": method,
            "http.path": scope["path"],
            "http.query": query.decode("latin-1"),
        },
        control_id=control_id,
        correlation_id=headers.get("x-correlation-id") or None,
        message_type=message_type,
        source=_peer(scope),
    )
    try:
        outcome = await route.inbound(message)
    except Exception:
        log.exception("channel %s: the hub failed to take message %s", route.channel, message.id)
        await _error(
            send,
            503,
            "the hub could not take the message; retry later",
            "unavailable",
            [("retry-after", str(route.options.retry_after))],
        )
        return
    await _render(route, message, outcome, send)


async def _render(route: Route, message: Message, outcome: Outcome, send: Send) -> None:
    """AA/CA → 200, AE/CE → 400, AR/CR → 503 + Retry-After; an actor-built body is sent as is."""
    message_id = outcome.message_id or message.id
    code = outcome.code.upper()
    extra = [("x-ihehub-message-id", message_id)]
    payload: dict[str, str | None]
    if code in ("AA", "CA"):
        status, payload = 200, {"id": message_id, "status": "accepted"}
    elif code in ("AE", "CE"):
        status = 400
        payload = {
            "id": message_id,
            "status": "error",
            "error": outcome.error or "the message was refused",
            "code": outcome.error_code,
            "location": outcome.error_location,
        }
    elif code in ("AR", "CR"):
        status = 503
        payload = {
            "id": message_id,
            "status": "rejected",
            "error": outcome.error or "the hub cannot take messages now; retry later",
            "code": outcome.error_code,
        }
        extra.append(("retry-after", str(route.options.retry_after)))
    else:
        log.error("channel %s: unknown outcome code %r for message %s", route.channel, code, message_id)
        status = 500
        payload = {"id": message_id, "status": "error", "error": f"unknown outcome code {code!r}"}
    if outcome.body is not None:
        await _reply(send, status, outcome.body, outcome.content_type or message.content_type, extra)
    else:
        await _reply_json(send, status, payload, extra)


class Listener:
    """A uvicorn server on a port of its own, inside the running event loop.

    ``uvicorn.Server.serve()`` would install SIGINT/SIGTERM handlers and take the hub's Ctrl+C, so
    the listener drives ``startup`` / ``main_loop`` / ``shutdown`` itself.  It binds the socket
    first, so a busy port is a `ConnectorError` rather than uvicorn's ``sys.exit``; port 0 picks a
    free port, which `start` returns.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], host: str, port: int, tls: ssl.SSLContext | None):
        self._app = app
        self._host = host
        self._port = port
        self._tls = tls
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen; returns the bound port.  Raises `ConnectorError` when the port cannot be had."""
        import uvicorn  # imported on first use: most hubs never open a second HTTP port

        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            sock = socket.create_server((self._host, self._port), family=family, backlog=2048)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConnectorError(f"cannot listen on {self._host}:{self._port}: {reason}") from None
        tls = self._tls
        config = uvicorn.Config(
            self._app,
            host=self._host,
            port=self._port,
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            ssl_context_factory=(lambda _config, _default: tls) if tls is not None else None,
        )
        server = uvicorn.Server(config)
        try:
            config.load()
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._server, self._sock = server, sock
        self._loop_task = asyncio.create_task(server.main_loop(), name=f"http-listener-{self._port}")
        port: int = sock.getsockname()[1]
        return port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (5 s at most), close the socket."""
        server, task = self._server, self._loop_task
        if server is None or task is None:
            return
        self._server = self._loop_task = None
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.shutdown(sockets=[self._sock] if self._sock is not None else None)
        self._sock = None
