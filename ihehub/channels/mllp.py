"""``mllp://`` and ``mllps://`` connectors: HL7 v2 over MLLP, plain or over TLS.

The source listens (`MLLPSource`, wrapping the bare `MLLPServer`), reads MSH of every frame
(:func:`ihehub.hl7.parse_header`), hands a `Message` to the bus and answers with the bus's
`Outcome` as an HL7 ACK (HL7 v2.5 chapter 2, section 2.9.2 original mode).  The destination
(`MLLPDestination`) sends on a kept connection and judges MSA-1 of the reply.

TLS follows IHE ITI TF-2 section 3.19.6.1 (ATNA Authenticate Node, ITI-19): TLS 1.2 or later,
optionally requiring client certificates issued by ``tls.ca``.  Refused handshakes are logged
and reported to ``on_security_event(kind, peer, detail)`` for ATNA auditing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ihehub.bus.message import Message
from ihehub.channels.base import (
    ConnectorError,
    ConnectorSpec,
    DeliveryError,
    Inbound,
    Outcome,
    Response,
)
from ihehub.channels.mllp_wire import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    MLLPServer,
    Oversize,
    Peer,
    SecurityHook,
    frame,
    hl7_error_reply,
    mllp_send,
    read_frame,
)
from ihehub.channels.options import check_options
from ihehub.channels.registry import ConnectorContext
from ihehub.hl7 import (
    ACK_CODES,
    HL7Error,
    MessageTypeFilter,
    build_ack,
    build_nak_without_header,
    default_codec,
    parse_header,
    read_ack,
)
from ihehub.tls import TlsError, client_ssl_context, server_ssl_context

__all__ = [
    "SPEC",
    "FrameDecoder",
    "MLLPDestination",
    "MLLPServer",
    "MLLPSource",
    "Oversize",
    "Peer",
    "frame",
    "mllp_send",
    "read_frame",
]

log = logging.getLogger("ihehub.mllp")

DEFAULT_PORT = 2575  # IANA "hl7" port

_PATH = {"type": "string", "minLength": 1}
_TLS_VERSION = {"enum": ["1.2", "1.3"], "default": "1.2"}
_NAK_ACTION = {"enum": ["retry", "dead", "accept"]}

SOURCE_TLS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "mllps:// only; keys left out come from the hub-wide tls settings (paths: from the home)",
    "properties": {
        "cert": {**_PATH, "description": "PEM server certificate (chain)"},
        "key": {**_PATH, "description": "PEM private key of cert"},
        "ca": {**_PATH, "description": "PEM CA bundle that client certificates must chain to"},
        "require_client_cert": {"type": "boolean", "default": False, "description": "mutual TLS (ITI-19)"},
        "min_version": _TLS_VERSION,
    },
}
DESTINATION_TLS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "mllps:// only; keys left out come from the hub-wide tls settings (paths: from the home)",
    "properties": {
        "ca": {**_PATH, "description": "PEM CA bundle to verify the server (default: system store)"},
        "cert": {**_PATH, "description": "PEM client certificate for mutual TLS"},
        "key": {**_PATH, "description": "PEM private key of the client certificate"},
        "verify": {"type": "boolean", "default": True, "description": "verify the server's certificate"},
        "server_hostname": {"type": "string", "description": "name expected in the server's certificate"},
        "min_version": _TLS_VERSION,
    },
}

_COMMON: dict[str, Any] = {
    "max_frame_bytes": {"type": "integer", "minimum": 1024, "default": DEFAULT_MAX_FRAME,
                        "description": "largest frame accepted (source) or reply read (destination), bytes"},
    "default_charset": {"type": "string", "minLength": 1, "default": "ascii",
                        "description": "charset when MSH-18 is empty: HL7 table 0211 name or Python codec"},
}

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "idle_timeout": {"type": "number", "exclusiveMinimum": 0, "default": 300,
                         "description": "close a connection silent for this many seconds"},
        "message_types": {"type": "array", "items": {"type": "string"},
                          "description": "accepted MSH-9: 'ADT' or 'ADT^A01'; default any table 0076 code"},
        "max_connections": {"type": "integer", "minimum": 1, "default": 200},
        "tls": SOURCE_TLS_SCHEMA,
    },
}

DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 30,
                    "description": "connect and write timeout, seconds"},
        "ack_timeout": {"type": "number", "exclusiveMinimum": 0,
                        "description": "wait this long for the ACK, seconds (default: timeout)"},
        "keepalive": {"type": "boolean", "default": True, "description": "reuse the connection"},
        "nak_policy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "AE": {**_NAK_ACTION, "default": "dead"},
                "AR": {**_NAK_ACTION, "default": "retry"},
            },
            "description": "what an AE or AR reply means: retry later, dead letter, or accept",
        },
        "tls": DESTINATION_TLS_SCHEMA,
    },
}

# One schema with every option of either role (what the registry publishes and YAML validation
# checks); each constructor then checks its own role's schema.
OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **SOURCE_OPTIONS_SCHEMA["properties"],
        **DESTINATION_OPTIONS_SCHEMA["properties"],
        "tls": {
            "type": "object",
            "additionalProperties": False,
            "properties": {**SOURCE_TLS_SCHEMA["properties"], **DESTINATION_TLS_SCHEMA["properties"]},
        },
    },
}

SPEC = ConnectorSpec(
    schemes=("mllp", "mllps"),
    description="HL7 v2 over MLLP (mllps: over TLS); persistent connections, ACK per message",
    source="ihehub.channels.mllp:MLLPSource",
    destination="ihehub.channels.mllp:MLLPDestination",
    options_schema=OPTIONS_SCHEMA,
    example=(
        "source: mllp://0.0.0.0:2575\n"
        "options: {default_charset: GB 18030-2000, message_types: [ADT, 'ORM^O01']}\n"
        "# destination: mllps://ris.example:2576 with options {tls: {ca: ca.pem}, nak_policy: {AE: dead}}"
    ),
)


def _check_options(options: Mapping[str, Any], role: str, scheme: str, name: str) -> dict[str, Any]:
    """Validate ``options`` for ``role``; raise `ConnectorError` saying why (and what was meant)."""
    opts = dict(options)
    own, other = (
        (SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA)
        if role == "source"
        else (DESTINATION_OPTIONS_SCHEMA, SOURCE_OPTIONS_SCHEMA)
    )
    where = f"mllp {role} {name!r}"
    for key in opts:
        if key not in own["properties"] and key in other["properties"]:
            raise ConnectorError(f"{where}: options.{key} applies to mllp {_other(role)}s only")
    tls = opts.get("tls")
    if isinstance(tls, Mapping):
        own_tls, other_tls = own["properties"]["tls"]["properties"], other["properties"]["tls"]["properties"]
        for key in tls:
            if key not in own_tls and key in other_tls:
                raise ConnectorError(f"{where}: options.tls.{key} applies to mllp {_other(role)}s only")
    check_options(opts, own, where)
    if tls is not None and scheme != "mllps":
        raise ConnectorError(f"{where}: options.tls needs the mllps:// scheme")
    if "default_charset" in opts:
        try:
            default_codec(opts["default_charset"])
        except ValueError as exc:
            raise ConnectorError(f"{where}: options.default_charset: {exc}") from None
    return opts


def _other(role: str) -> str:
    return "destination" if role == "source" else "source"


def _parse_url(url: str, *, listen: bool) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SPEC.schemes:
        raise ConnectorError(f"{url!r} is not an mllp:// or mllps:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConnectorError(f"{url!r}: an MLLP URL is just {scheme}://host:port")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConnectorError(f"{url!r}: bad port ({exc})") from None
    host = parts.hostname or ("0.0.0.0" if listen else "")
    if not host:
        raise ConnectorError(f"{url!r}: a destination needs a host, e.g. {scheme}://ris.example:2575")
    return scheme, host, DEFAULT_PORT if port is None else port


def _tls_settings(
    options: Mapping[str, Any], context: ConnectorContext, keys: Iterable[str]
) -> dict[str, Any]:
    """Hub-wide ``context.tls`` overridden key by key by the channel's ``tls`` option, paths resolved."""
    merged = {k: v for k, v in (context.tls or {}).items() if k in keys}
    merged.update(options.get("tls") or {})
    for key in ("cert", "key", "ca"):
        if merged.get(key):
            merged[key] = os.path.join(context.home, os.path.expanduser(str(merged[key])))
    return merged


def _tls_version(settings: Mapping[str, Any]) -> ssl.TLSVersion:
    """``tls.min_version``: TLS 1.2 (the BCP 195 floor) unless "1.3" is asked for."""
    newest_only = str(settings.get("min_version", "1.2")) == "1.3"
    return ssl.TLSVersion.TLSv1_3 if newest_only else ssl.TLSVersion.TLSv1_2


def _server_tls(settings: Mapping[str, Any], where: str) -> ssl.SSLContext:
    cert, key, ca = settings.get("cert"), settings.get("key"), settings.get("ca")
    if not cert:
        raise ConnectorError(f"{where}: mllps:// needs tls.cert and tls.key (the server certificate)")
    require = bool(settings.get("require_client_cert", False))
    if require and not ca:
        raise ConnectorError(f"{where}: tls.require_client_cert needs tls.ca to verify client certificates")
    if not key:
        raise ConnectorError(f"{where}: mllps:// needs tls.key with tls.cert")
    # ihehub.tls: True demands a client certificate, None verifies one when offered, False asks none.
    ask: bool | None = True if require else (None if ca else False)
    try:
        ctx = server_ssl_context(cert, key, ca, require_client_cert=ask)
    except TlsError as exc:
        raise ConnectorError(f"{where}: {exc}") from None
    ctx.minimum_version = _tls_version(settings)
    return ctx


def _client_tls(settings: Mapping[str, Any], where: str) -> ssl.SSLContext:
    verify = bool(settings.get("verify", True))
    try:
        ctx = client_ssl_context(settings.get("ca"), settings.get("cert"), settings.get("key"),
                                 check_hostname=verify)
    except TlsError as exc:
        raise ConnectorError(f"{where}: {exc}") from None
    if not verify:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = _tls_version(settings)
    return ctx


class MLLPSource:
    """Listen on ``mllp://host:port`` (port 0: ephemeral, see `port`); one ACK per message.

    Every frame is answered on the same connection, in order: an unreadable header gets an AE
    with ERR (HL7 table 0357 code from `HL7Error`), a message type not accepted AE 200/201, an
    exception in ``inbound`` AR 207; otherwise the `Outcome` of ``inbound`` (its ``body`` as is,
    or an ACK built from its code and error).
    """

    def __init__(
        self,
        *,
        name: str,
        url: str,
        options: Mapping[str, Any],
        context: ConnectorContext,
        on_security_event: SecurityHook | None = None,
    ) -> None:
        scheme, host, port = _parse_url(url, listen=True)
        opts = _check_options(options, "source", scheme, name)
        self.name = name
        self.url = url
        self.charset = opts.get("default_charset", "ascii")
        try:
            self.types = MessageTypeFilter(opts.get("message_types"))
        except ValueError as exc:
            raise ConnectorError(f"mllp source {name!r}: options.message_types: {exc}") from None
        ssl_context = None
        if scheme == "mllps":
            keys = SOURCE_TLS_SCHEMA["properties"]
            ssl_context = _server_tls(_tls_settings(opts, context, keys), f"mllp source {name!r}")
        hook = on_security_event or getattr(context, "on_security_event", None)
        self._inbound: Inbound | None = None
        self.server = MLLPServer(
            self._handle,
            host,
            port,
            ssl_context=ssl_context,
            max_frame_bytes=int(opts.get("max_frame_bytes", DEFAULT_MAX_FRAME)),
            idle_timeout=float(opts.get("idle_timeout", 300)),
            max_connections=int(opts.get("max_connections", 200)),
            on_security_event=hook,
            error_reply=self._error_reply,
            name=name,
        )

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self, inbound: Inbound) -> None:
        self._inbound = inbound
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    def _error_reply(self, payload: bytes, code: str, text: str, error_code: str) -> bytes:
        return hl7_error_reply(payload, code, text, error_code, self.charset)

    async def _handle(self, payload: bytes, peer: Peer) -> bytes:
        try:
            header = parse_header(payload, self.charset)
            self.types.check(header)
        except HL7Error as err:
            log.info("%s: AE %s to %s: %s", self.name, err.code, peer.address, err.message)
            if err.header is None:
                return build_nak_without_header("AE", err.message, err.code, error_location=err.location)
            return build_ack(err.header, "AE", text=err.message, error_code=err.code,
                             error_location=err.location)
        headers = {
            "mllp.peer": peer.address,
            "hl7.version": header.version,
            "hl7.sending_application": header.sending_app,
            "hl7.sending_facility": header.sending_facility,
            "hl7.receiving_application": header.receiving_app,
            "hl7.receiving_facility": header.receiving_facility,
            "hl7.processing_id": header.processing_id,
        }
        if peer.tls_version:
            headers["mllp.tls"] = peer.tls_version
        if peer.tls_subject:
            headers["mllp.tls.subject"] = peer.tls_subject
        message = Message(
            channel=self.name,
            raw=payload,
            content_type="application/hl7-v2",
            charset=header.charset,
            control_id=header.control_id,
            message_type=header.message_code,
            source=peer.address,
            headers=headers,
        )
        inbound = self._inbound
        if inbound is None:
            return build_ack(header, "AR", text="channel is not started", error_code="207")
        try:
            outcome: Outcome = await inbound(message)
        except Exception:
            log.exception("%s: inbound failed on message %s (MSH-10 %r) from %s",
                          self.name, message.id, header.control_id, peer.address)
            return build_ack(header, "AR", text=f"application internal error (hub message {message.id})",
                             error_code="207")
        if outcome.body is not None:
            return outcome.body
        code = outcome.code
        if code not in ACK_CODES:
            log.error("%s: inbound returned acknowledgment code %r; answering AR", self.name, code)
            return build_ack(header, "AR", text="application internal error (bad outcome)", error_code="207")
        return build_ack(header, code, text=outcome.error, error_code=outcome.error_code,
                         error_location=outcome.error_location)


class MLLPDestination:
    """Send messages to ``mllp://host:port`` on a kept connection; one ACK awaited per message.

    MSA-1 AA/CA is success.  AE/CE and AR/CR follow ``nak_policy`` (``retry``: retryable failure,
    ``dead``: final failure, ``accept``: success).  Refused connections, timeouts and broken
    connections raise a retryable `DeliveryError`; the next send reconnects.  A reply that is not
    an acknowledgment raises a non-retryable one; an ACK whose MSA-2 is another message's
    control id (the connection is out of step) a retryable one, after dropping the connection.
    """

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        scheme, self.host, self.port = _parse_url(url, listen=False)
        opts = _check_options(options, "destination", scheme, name)
        self.name = name
        self.url = url
        self.charset = opts.get("default_charset", "ascii")
        self.timeout = float(opts.get("timeout", 30))
        self.ack_timeout = float(opts.get("ack_timeout", self.timeout))
        self.keepalive = bool(opts.get("keepalive", True))
        self.max_frame_bytes = int(opts.get("max_frame_bytes", DEFAULT_MAX_FRAME))
        policy = dict(opts.get("nak_policy") or {})
        self.nak_policy = {"AE": policy.get("AE", "dead"), "AR": policy.get("AR", "retry")}
        self._ssl: ssl.SSLContext | None = None
        self._server_hostname: str | None = None
        if scheme == "mllps":
            tls = _tls_settings(opts, context, DESTINATION_TLS_SCHEMA["properties"])
            self._ssl = _client_tls(tls, f"mllp destination {name!r}")
            self._server_hostname = tls.get("server_hostname") or self.host
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def send(self, message: Message) -> Response:
        async with self._lock:
            reply = await self._exchange(frame(message.raw))
            if not self.keepalive:
                await self._drop()
            return await self._judge(message, reply)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, server_hostname=self._server_hostname,
                    limit=self.max_frame_bytes + 16,
                ),
                self.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise DeliveryError(f"{self.name}: cannot connect to {self.address}: {exc or 'timeout'}",
                                retryable=True) from exc
        self._reader, self._writer = reader, writer
        return reader, writer

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _exchange(self, data: bytes) -> bytes:
        for attempt in (1, 2):
            reused = self._writer is not None
            if self._reader is not None and self._writer is not None and (
                self._reader.at_eof() or self._writer.is_closing()
            ):
                await self._drop()  # the server closed the kept connection (idle timeout, restart)
                reused = False
            if self._reader is not None and self._writer is not None:
                reader, writer = self._reader, self._writer
            else:
                reader, writer = await self._connect()
            try:
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.timeout)
                return await asyncio.wait_for(read_frame(reader), self.ack_timeout)
            except asyncio.IncompleteReadError as exc:
                await self._drop()
                if reused and attempt == 1 and not exc.partial.strip(b"\r\n"):
                    continue  # closed before answering anything: a stale kept connection, try a fresh one
                raise DeliveryError(f"{self.name}: {self.address} closed the connection before the ACK",
                                    retryable=True) from exc
            except (ConnectionResetError, BrokenPipeError) as exc:
                await self._drop()
                if reused and attempt == 1:
                    continue
                raise DeliveryError(f"{self.name}: connection to {self.address} broke: {exc}",
                                    retryable=True) from exc
            except TimeoutError as exc:
                await self._drop()
                raise DeliveryError(f"{self.name}: no ACK from {self.address} within {self.ack_timeout:g} s",
                                    retryable=True) from exc
            except asyncio.LimitOverrunError as exc:
                await self._drop()
                raise DeliveryError(f"{self.name}: reply from {self.address} exceeds {self.max_frame_bytes} "
                                    "bytes (max_frame_bytes)", retryable=False) from exc
            except OSError as exc:
                await self._drop()
                raise DeliveryError(f"{self.name}: sending to {self.address} failed: {exc}",
                                    retryable=True) from exc
        raise DeliveryError(f"{self.name}: {self.address} keeps closing the connection", retryable=True)

    async def _judge(self, message: Message, reply: bytes) -> Response:
        try:
            ack = read_ack(reply, self.charset)
        except HL7Error as exc:
            raise DeliveryError(f"{self.name}: {self.address} answered with no readable acknowledgment: "
                                f"{exc.message}", retryable=False, response=reply) from None
        expected = message.control_id
        if expected is None:
            with contextlib.suppress(HL7Error, ValueError):
                expected = parse_header(message.raw, self.charset).control_id
        if expected is not None and ack.control_id != expected:
            await self._drop()  # out of step: a late ACK of an earlier message may follow
            raise DeliveryError(
                f"{self.name}: ACK from {self.address} is for MSH-10 {ack.control_id!r}, not {expected!r}",
                retryable=True, response=reply,
            )
        if ack.accepted:
            return Response(ok=True, status=ack.code, body=reply)
        detail = f"{ack.code}{' ' + ack.error_code if ack.error_code else ''}: {ack.text or 'no error text'}"
        policy = self.nak_policy["AE" if ack.code in ("AE", "CE") else "AR"]
        log.info("%s: %s answered %s (policy %s)", self.name, self.address, detail, policy)
        if policy == "accept":
            return Response(ok=True, status=ack.code, body=reply, error=detail)
        return Response(ok=False, status=ack.code, body=reply, error=detail, retryable=policy == "retry")
